//! The step's Landlock policy: read and execute everywhere in the (read-only) root, read-write
//! only where the mounts are writable and meant to be (/workspace, /tmp, /dev/shm), and
//! read-write on the few character devices a build uses.
//!
//! Network (ABI >= 4): TCP bind and connect are handled; the only rules are connects to
//! `StepSpec::tcp_connect_ports` (the egress proxy's port on the step's loopback, once it
//! exists). A step without them can neither bind nor connect any TCP port, loopback
//! included; AF_UNIX sockets and UDP on loopback are untouched (Landlock has no UDP rules;
//! the network namespace holds only loopback).

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy)]
enum Grant {
    /// Execute, read files, list directories.
    Read,
    /// Every right the ABI has.
    All,
    /// Read/write/truncate/ioctl on device files.
    Device,
    /// `Device` plus listing, for /dev/pts.
    DeviceDir,
}

const RULES: [(&str, Grant); 9] = [
    ("/", Grant::Read),
    ("/workspace", Grant::All),
    ("/tmp", Grant::All),
    ("/dev/shm", Grant::All),
    ("/dev/null", Grant::Device),
    ("/dev/zero", Grant::Device),
    ("/dev/full", Grant::Device),
    ("/dev/tty", Grant::Device),
    ("/dev/pts", Grant::DeviceDir),
];

fn access(grant: Grant, abi: ABI) -> BitFlags<AccessFs> {
    let all = AccessFs::from_all(abi);
    let device =
        (AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev) & all;
    match grant {
        Grant::Read => AccessFs::from_read(abi),
        Grant::All => all,
        Grant::Device => device,
        Grant::DeviceDir => device | AccessFs::ReadDir,
    }
}

/// Scopes (ABI 6): no signals to processes outside the step's domain (pid 1, the reaper),
/// no abstract unix sockets created outside it.
fn scopes(abi: ABI) -> BitFlags<Scope> {
    if abi >= ABI::V6 {
        Scope::AbstractUnixSocket | Scope::Signal
    } else {
        BitFlags::EMPTY
    }
}

/// TCP rights handled at this ABI (empty before ABI 4).
fn net_handled(abi: ABI) -> BitFlags<AccessNet> {
    AccessNet::from_all(abi)
}

fn net_names(flags: BitFlags<AccessNet>) -> Vec<String> {
    flags.iter().map(|f| format!("{f:?}")).collect()
}

fn fs_names(flags: BitFlags<AccessFs>) -> Vec<String> {
    flags.iter().map(|f| format!("{f:?}")).collect()
}

fn scope_names(flags: BitFlags<Scope>) -> Vec<String> {
    flags.iter().map(|f| format!("{f:?}")).collect()
}

/// Restricts the calling (step) process. Requests every filesystem right of the kernel's ABI
/// (capped at the newest ABI the landlock crate knows) and fails unless the kernel reports
/// the ruleset fully enforced: the step never runs with a partial policy.
pub(crate) fn enforce(kernel_abi: i32, tcp_connect_ports: &[u16]) -> Result<(), String> {
    let abi = ABI::from(kernel_abi);
    if abi == ABI::Unsupported {
        return Err(format!(
            "kernel does not support Landlock (ABI {kernel_abi})"
        ));
    }
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| e.to_string())?;
    let net = net_handled(abi);
    if !net.is_empty() {
        ruleset = ruleset.handle_access(net).map_err(|e| e.to_string())?;
    }
    let sc = scopes(abi);
    if !sc.is_empty() {
        ruleset = ruleset.scope(sc).map_err(|e| e.to_string())?;
    }
    let mut created = ruleset.create().map_err(|e| e.to_string())?;
    for (path, grant) in RULES {
        let fd = PathFd::new(path).map_err(|e| format!("{path}: {e}"))?;
        created = created
            .add_rule(PathBeneath::new(fd, access(grant, abi)))
            .map_err(|e| format!("rule for {path}: {e}"))?;
    }
    if net.contains(AccessNet::ConnectTcp) {
        for port in tcp_connect_ports {
            created = created
                .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
                .map_err(|e| format!("rule for TCP port {port}: {e}"))?;
        }
    }
    let status = created.restrict_self().map_err(|e| e.to_string())?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(format!(
            "ruleset not fully enforced ({:?}) at ABI {kernel_abi}",
            status.ruleset
        ));
    }
    Ok(())
}

pub(crate) fn describe(kernel_abi: i32, tcp_connect_ports: &[u16], waived: bool) -> Value {
    if kernel_abi < 1 && waived {
        return json!({"abi": kernel_abi, "waived": true});
    }
    let abi = ABI::from(kernel_abi);
    let net = net_handled(abi);
    let net_rules: Vec<Value> = if net.contains(AccessNet::ConnectTcp) {
        tcp_connect_ports
            .iter()
            .map(|p| json!({"port": p, "access": ["ConnectTcp"]}))
            .collect()
    } else {
        vec![]
    };
    let rules: Vec<Value> = RULES
        .iter()
        .map(|(path, grant)| json!({"path": path, "access": fs_names(access(*grant, abi))}))
        .collect();
    json!({
        "abi": kernel_abi,
        "handled_access_fs": fs_names(AccessFs::from_all(abi)),
        "handled_access_net": net_names(net),
        "net_rules": net_rules,
        "scopes": scope_names(scopes(abi)),
        "rules": rules,
        "required_status": "fully_enforced",
    })
}
