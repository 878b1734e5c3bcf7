//! Resource limits of steps (the operator's defaults and caps applied to what a job
//! asks), and the workspace quota.
//!
//! The workspace quota is a size-limited tmpfs (mode 0700, nosuid, nodev, owned by the
//! step's host uid) that the daemon mounts on the job's workspace directory in the host
//! mount namespace for the job's lifetime. Before each step it is remounted with that
//! step's size, so a write beyond it fails with ENOSPC in the step; after the step,
//! statvfs showing (almost) no free block reports the quota as reached.

use std::path::Path;

use agent_proto::v1::ResourceLimits;

use crate::error::{Result, RunnerError};
use crate::units::format_size;

/// Mounts the job's workspace quota: an empty tmpfs of `size` bytes on `dir`, owned by
/// `owner`. Not noexec: builds run what they compile there.
pub fn mount_workspace(dir: &Path, size: u64, owner: u32) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    // 0700: the step's host uid only; other host users see neither names nor content.
    let data = format!("size={size},mode=0700,uid={owner},gid={owner}");
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| {
        RunnerError::Internal(format!(
            "mounting the workspace quota ({}) on {}: {e}",
            format_size(size),
            dir.display()
        ))
    })
}

/// Sets the workspace quota for the next step. Fails (the caller says why) when the
/// workspace already holds more than `size`.
pub fn resize_workspace(dir: &Path, size: u64) -> std::result::Result<(), nix::Error> {
    use nix::mount::{mount, MsFlags};
    let data = format!("size={size}");
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
}

/// Unmounts the workspace quota (lazily: nothing of the job may still use it, and a
/// failure must not keep the daemon from going on).
pub fn unmount_workspace(dir: &Path) -> std::result::Result<(), nix::Error> {
    nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)
}

/// Bytes used in the workspace, and whether the quota was reached (free space below
/// one 64 KiB, i.e. a further write of any size could fail).
pub fn workspace_usage(dir: &Path) -> Option<(u64, bool)> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let frsize = st.fragment_size();
    let used = (st.blocks().saturating_sub(st.blocks_free())).saturating_mul(frsize);
    let free = st.blocks_available().saturating_mul(frsize);
    Some((used, free < 64 * 1024))
}

/// A step's limits after defaults: what the sandbox and the workspace quota enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub memory_bytes: u64,
    pub pids: u32,
    pub cpu_millis: u32,
    pub disk_bytes: u64,
    pub nofile: u64,
    pub fsize_bytes: u64,
}

impl Effective {
    /// The job's values (already checked against the caps at Submit), 0 meaning the
    /// operator's default.
    pub fn of(config: &crate::config::Config, asked: Option<&ResourceLimits>) -> Self {
        let asked = asked.copied().unwrap_or_default();
        let or = |v: u64, default: u64| if v == 0 { default } else { v };
        let disk_bytes = or(asked.disk_bytes, config.default_disk.0);
        // No file can legitimately be larger than the tmpfs it is written to (the workspace
        // or /tmp); a bigger one could only be sparse, which costs no quota but would cost
        // the daemon its hashing time.
        let tmp_bytes = config.tmp_size_mib.saturating_mul(1 << 20);
        let fsize_bytes = config.max_file_size.0.min(disk_bytes.max(tmp_bytes));
        Self {
            memory_bytes: or(asked.memory_bytes, config.default_memory.0),
            pids: if asked.pids == 0 {
                config.default_pids
            } else {
                asked.pids
            },
            cpu_millis: if asked.cpu_millis == 0 {
                config.default_cpus.0
            } else {
                asked.cpu_millis
            },
            disk_bytes,
            nofile: config.nofile,
            fsize_bytes,
        }
    }

    pub fn sandbox(&self) -> sandbox::Limits {
        sandbox::Limits {
            memory_bytes: self.memory_bytes,
            pids: self.pids,
            cpu_millis: self.cpu_millis,
            nofile: self.nofile,
            fsize_bytes: self.fsize_bytes,
        }
    }

    /// For the link's environment.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "memory_bytes": self.memory_bytes,
            "pids": self.pids,
            "cpu_millis": self.cpu_millis,
            "disk_bytes": self.disk_bytes,
            "nofile": self.nofile,
            "fsize_bytes": self.fsize_bytes,
        })
    }
}
