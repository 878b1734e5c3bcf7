//! What the sandbox integration tests share: the root check, a host-built root
//! with a workspace owned by the step's host uid, running a spec, and finding
//! host processes by uid.
#![allow(dead_code)]

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use sandbox::{RootEntry, Sandbox, StepOutcome, StepSpec};

pub const STEP_UID: u32 = 1000;

pub fn is_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root, and CI=true forbids skipping"
    );
    println!("SKIPPED: {test} needs root");
    false
}

/// A root built from the host's /usr, a workspace owned by the step's host uid, and a
/// small /etc. Each test passes its own `base` so parallel tests never share host uids.
pub struct Fixture {
    pub _dirs: Vec<tempfile::TempDir>,
    pub spec: StepSpec,
}

pub fn fixture(base: u32, script: &str) -> Fixture {
    let etc = tempfile::tempdir().unwrap();
    std::fs::write(
        etc.path().join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000::/workspace:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(etc.path().join("group"), "root:x:0:\nbuilder:x:1000:\n").unwrap();
    let ws = tempfile::tempdir().unwrap();
    let owner = Some(nix::unistd::Uid::from_raw(base + STEP_UID));
    let group = Some(nix::unistd::Gid::from_raw(base + STEP_UID));
    nix::unistd::chown(ws.path(), owner, group).unwrap();
    let spec = StepSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("HOME".into(), "/workspace".into()),
            ("LC_ALL".into(), "C".into()),
        ],
        root: vec![
            RootEntry::Bind {
                source: "/usr".into(),
                target: "/usr".into(),
            },
            RootEntry::Symlink {
                path: "/bin".into(),
                points_to: "usr/bin".into(),
            },
            RootEntry::Symlink {
                path: "/lib".into(),
                points_to: "usr/lib".into(),
            },
            RootEntry::Symlink {
                path: "/lib64".into(),
                points_to: "usr/lib64".into(),
            },
            RootEntry::Symlink {
                path: "/sbin".into(),
                points_to: "usr/sbin".into(),
            },
            RootEntry::Bind {
                source: etc.path().to_path_buf(),
                target: "/etc".into(),
            },
            RootEntry::Dir {
                path: "/var/empty".into(),
            },
        ],
        workspace: ws.path().to_path_buf(),
        working_directory: Vec::new(),
        host_uid_base: base,
        id_range: 65536,
        step_uid: STEP_UID,
        timeout_ms: 20_000,
        hostname: "kiln-test".into(),
        tmp_size_bytes: 16 << 20,
        limits: sandbox::Limits::default(),
        tcp_connect_ports: vec![],
        egress_proxy_port: None,
        waived_layers: vec![],
    };
    Fixture {
        _dirs: vec![etc, ws],
        spec,
    }
}

pub fn sandbox() -> Sandbox {
    Sandbox::new(PathBuf::from(env!("CARGO_BIN_EXE_kiln-sandbox-init")))
}

pub fn drain(fd: Option<OwnedFd>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(fd) = fd {
            let _ = std::fs::File::from(fd).read_to_string(&mut s);
        }
        s
    })
}

pub struct Ran {
    pub outcome: StepOutcome,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(spec: &StepSpec) -> Ran {
    let mut step = sandbox().spawn(spec).unwrap();
    let out = drain(step.take_stdout());
    let err = drain(step.take_stderr());
    let outcome = step.wait().unwrap();
    Ran {
        outcome,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Host pids whose real uid is `uid`.
pub fn host_processes_of(uid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let uid_line = status.lines().find(|l| l.starts_with("Uid:"));
        if let Some(l) = uid_line {
            if l.split_whitespace().nth(1) == Some(&uid.to_string()) {
                found.push(pid);
            }
        }
    }
    found
}
