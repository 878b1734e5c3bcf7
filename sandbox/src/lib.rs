//! Linux isolation for one Kiln build step.
//!
//! The multi-threaded daemon never sets up namespaces itself: [`Sandbox::spawn`] re-executes
//! the Kiln binary (which calls [`init_main`] when its argv[1] is [`INIT_ARG`]). That fresh,
//! single-threaded process (the *supervisor*) stays in the host namespaces, reads the
//! [`StepSpec`] from its stdin (the control socket), prepares every fd and the seccomp program,
//! clones the sandbox's pid 1 into new user/mount/pid/net/ipc/uts/cgroup namespaces, enforces
//! the timeout and cancellation, and reports one [`StepOutcome`] as JSON on the same socket.
//!
//! Layers are never skipped: a layer that cannot be set up makes the step `SetupFailed`
//! naming the layer.
//!
//! Every `unsafe` block of the crate lives in its one `sys` module, each with a
//! `// SAFETY:` comment; the compiler holds the rest of the crate to that.
#![deny(unsafe_code)]

use std::path::PathBuf;

use serde::Serialize;

pub mod cgroup;
mod child;
mod egress;
mod failure;
mod landlock_rules;
mod launch;
mod notify;
mod plan;
mod profile;
mod protocol;
pub mod seccomp;
pub mod spec;
mod supervisor;
#[allow(unsafe_code)]
mod sys;

pub use launch::{Canceller, RunningStep, Sandbox, Standby};
pub use profile::profile;
pub use spec::{
    monotonic_now_ns, validate, Limits, ResourceUsage, RootEntry, StepOutcome, StepSpec,
    StepStatus, MIN_CPU_MILLIS, MIN_MEMORY_BYTES, MIN_NOFILE, MIN_PIDS,
};

/// argv[1] of the re-executed Kiln binary that runs the sandbox supervisor.
pub const INIT_ARG: &str = "__kiln-sandbox-init";

/// Errors of the daemon-side API.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid step spec: {0}")]
    InvalidSpec(String),
    #[error("host cannot provide sandbox layer {layer}: {reason}")]
    Unsupported { layer: String, reason: String },
    #[error("seccomp policy: {0}")]
    Seccomp(String),
    #[error("starting the sandbox supervisor {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox supervisor: {0}")]
    Supervisor(String),
    #[error("I/O with the sandbox supervisor: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding the step spec: {0}")]
    Json(#[from] serde_json::Error),
}

/// What the host offers, as found by [`Sandbox::probe`].
#[derive(Debug, Clone, Serialize)]
pub struct HostSupport {
    /// Landlock ABI version of the running kernel (>= 1).
    pub landlock_abi: i32,
    /// Namespaces created together in one clone (probed for real).
    pub namespaces: Vec<String>,
    /// seccomp return actions the kernel offers.
    pub seccomp_actions: Vec<String>,
    /// `uname -r`.
    pub kernel_release: String,
    /// SHA-256 of the seccomp program, compiled once by the probe (see [`seccomp::compiled`]).
    pub seccomp_policy_sha256: String,
    /// Layers the host lacks and the operator's config waived; recorded in provenance.
    pub waived_layers: Vec<String>,
    /// The cgroup interface used for the limits (probed for real).
    pub cgroup: cgroup::CgroupSupport,
}

/// The namespaces of a sandbox, created in one clone.
pub(crate) const NAMESPACES: [(&str, libc::c_int); 7] = [
    ("user", libc::CLONE_NEWUSER),
    ("mount", libc::CLONE_NEWNS),
    ("pid", libc::CLONE_NEWPID),
    ("net", libc::CLONE_NEWNET),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("cgroup", libc::CLONE_NEWCGROUP),
];

pub(crate) fn namespace_flags() -> libc::c_int {
    NAMESPACES.iter().fold(0, |acc, (_, f)| acc | f)
}

/// Layers an operator may waive (config `waive`) for a host that lacks them; every other
/// layer is mandatory.
pub const WAIVABLE_LAYERS: [&str; 1] = ["landlock"];

/// The layers steps run without: those the host lacks (`landlock_abi` < 1) and `waive` names.
/// A waived layer the host has is still applied (a waiver permits running without a layer,
/// it never weakens a host that has it). Unknown or repeated names are errors, as is a
/// missing layer that is not waived.
pub fn decide_waivers(landlock_abi: i32, waive: &[String]) -> Result<Vec<String>, SandboxError> {
    for (i, w) in waive.iter().enumerate() {
        if !WAIVABLE_LAYERS.contains(&w.as_str()) {
            return Err(SandboxError::InvalidSpec(format!(
                "layer {w:?} cannot be waived (waivable: {})",
                WAIVABLE_LAYERS.join(", ")
            )));
        }
        if waive[..i].contains(w) {
            return Err(SandboxError::InvalidSpec(format!(
                "layer {w:?} waived twice"
            )));
        }
    }
    let mut waived = Vec::new();
    if landlock_abi < 1 {
        if !waive.iter().any(|w| w == "landlock") {
            return Err(SandboxError::Unsupported {
                layer: "landlock".to_string(),
                reason: "the kernel does not support Landlock or it is not enabled (lsm=); \
                         `waive = [\"landlock\"]` in the config runs steps without it"
                    .to_string(),
            });
        }
        waived.push("landlock".to_string());
    }
    Ok(waived)
}

/// Entry point of the re-executed init; never returns.
pub fn init_main() -> ! {
    let code = supervisor::run();
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiver_decision() {
        let none: Vec<String> = vec![];
        let landlock = vec!["landlock".to_string()];
        // Host with Landlock: nothing waived, whatever the config says.
        assert_eq!(decide_waivers(7, &none).ok(), Some(vec![]));
        assert_eq!(decide_waivers(1, &landlock).ok(), Some(vec![]));
        // Host without: refused unless waived, and then exactly that layer.
        match decide_waivers(0, &none) {
            Err(SandboxError::Unsupported { layer, .. }) => assert_eq!(layer, "landlock"),
            other => panic!("{other:?}"),
        }
        assert!(decide_waivers(-1, &none).is_err());
        assert_eq!(decide_waivers(0, &landlock).ok(), Some(landlock.clone()));
        // Only known layers, once each.
        for bad in [
            vec!["seccomp".to_string()],
            vec!["Landlock".to_string()],
            vec!["landlock".to_string(), "landlock".to_string()],
        ] {
            assert!(matches!(
                decide_waivers(0, &bad),
                Err(SandboxError::InvalidSpec(_))
            ));
            assert!(decide_waivers(7, &bad).is_err());
        }
    }

    #[test]
    fn control_message_carries_the_compiled_program() -> Result<(), SandboxError> {
        let spec = StepSpec {
            argv: vec!["true".into()],
            env: vec![],
            root: vec![],
            workspace: "/w".into(),
            working_directory: Vec::new(),
            host_uid_base: 100_000,
            id_range: 65536,
            step_uid: 1000,
            timeout_ms: 1000,
            hostname: "h".into(),
            tmp_size_bytes: 1 << 20,
            limits: Limits::default(),
            tcp_connect_ports: vec![],
            egress_proxy_port: None,
            waived_layers: vec![],
        };
        let policy = seccomp::compiled()?;
        let line = protocol::control_message(&spec, policy)?;
        assert_eq!(line.last(), Some(&b'\n'));
        let msg: protocol::ControlMessage = serde_json::from_slice(&line)?;
        assert_eq!(msg.spec.argv, spec.argv);
        let received =
            seccomp::CompiledPolicy::decode(&msg.seccomp_bpf).map_err(SandboxError::Seccomp)?;
        assert_eq!(&received, policy);
        Ok(())
    }

    #[test]
    fn canceller_is_send_sync_clone() {
        fn is<T: Send + Sync + Clone>() {}
        is::<Canceller>();
    }
}
