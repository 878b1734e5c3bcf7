//! What the supervisor prepares before the clone (as host root, with host paths) and
//! hands the sandbox's init: nothing in the init reads a host path again.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use seccompiler::BpfProgram;

use crate::StepSpec;

/// A root entry with its host side already opened.
pub(crate) enum Prepared {
    /// A detached, read-only, nosuid, nodev copy of the source's mount tree.
    Bind {
        target: PathBuf,
        tree: OwnedFd,
        is_dir: bool,
    },
    Symlink {
        path: PathBuf,
        points_to: PathBuf,
    },
    Dir {
        path: PathBuf,
    },
}

/// Everything the sandbox needs, prepared before clone (as host root, with host paths).
pub(crate) struct Plan {
    pub spec: StepSpec,
    pub entries: Vec<Prepared>,
    pub workspace: OwnedFd,
    pub workspace_id: (u64, u64),
    pub dev_nodes: Vec<(&'static str, OwnedFd)>,
    pub seccomp: BpfProgram,
    pub landlock_abi: i32,
    pub cap_last: u32,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    /// Paths execve tries in order (argv[0] resolved through the spec's PATH).
    pub exec_candidates: Vec<CString>,
}
