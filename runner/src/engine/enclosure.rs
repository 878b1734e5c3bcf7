//! Where workspaces live: `work/` (traversable, not listable), one enclosure per job
//! (0700, owned by the slot's mapped root) and the workspace inside it, which the step
//! owns and may chmod without opening it to host users.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::engine::executor::Executor;
use crate::error::{Result, RunnerError};

/// The workspace's name inside its enclosure.
pub(super) const WORKSPACE_DIR: &str = "ws";

/// A directory only `owner` (the slot's mapped root) may enter.
pub(crate) fn make_enclosure(dir: &Path, owner: u32) -> Result<()> {
    fs::create_dir(dir).map_err(RunnerError::io_path("creating", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(RunnerError::io_path("chmod", dir))?;
    std::os::unix::fs::chown(dir, Some(owner), Some(owner))
        .map_err(RunnerError::io_path("chown", dir))
}

/// Empties the directory of workspaces at start-up: what is there belongs to jobs a crash
/// interrupted (failed by the recovery), and may still have its quota mounted.
pub(crate) fn reset_work_dir(work_dir: &Path, executor: &dyn Executor) -> Result<()> {
    if work_dir.exists() {
        if let Ok(entries) = fs::read_dir(work_dir) {
            for entry in entries.flatten() {
                let _ = executor.release_workspace(&entry.path().join(WORKSPACE_DIR));
                // Daemons before enclosures mounted the workspace here.
                let _ = executor.release_workspace(&entry.path());
            }
        }
        fs::remove_dir_all(work_dir).map_err(RunnerError::io_path("cleaning", work_dir))?;
    }
    fs::create_dir_all(work_dir).map_err(RunnerError::io_path("creating", work_dir))?;
    fs::set_permissions(work_dir, fs::Permissions::from_mode(0o711))
        .map_err(RunnerError::io_path("chmod", work_dir))
}
