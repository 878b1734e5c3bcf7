//! The daemon's configuration: a TOML file with strict validation (unknown keys are
//! errors), overridden by command-line flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, RunnerError};

pub const DEFAULT_SOCKET: &str = "/run/kiln/kiln.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kiln";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unix socket the daemon listens on (mode 0660).
    pub socket: PathBuf,
    /// Content store, job database, images, workspaces and the signing key.
    pub state_dir: PathBuf,
    /// Jobs that run at the same time; more are queued.
    pub max_concurrent_jobs: u32,
    /// Step timeout when the job gives none.
    pub default_timeout_seconds: u32,
    /// The longest timeout a job may ask for.
    pub max_timeout_seconds: u32,
    /// First host uid/gid of the sandboxes' id ranges. Concurrent sandboxes get
    /// disjoint ranges of `id_range` ids each, starting here.
    pub uid_base: u32,
    /// Size of one sandbox's id range.
    pub id_range: u32,
    /// Size of each step's /tmp, in MiB.
    pub tmp_size_mib: u64,
    /// Bytes of stdout and of stderr kept in a step's link (the full log is hashed).
    pub link_log_bytes: usize,
    /// Bytes of output a step may stream to clients before the rest is dropped.
    pub max_log_bytes: u64,
    /// Group allowed to use the socket (numeric gid); none keeps it root-only.
    pub socket_gid: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            max_concurrent_jobs: 2,
            default_timeout_seconds: 600,
            max_timeout_seconds: 6 * 3600,
            uid_base: 200_000_000,
            id_range: 65_536,
            tmp_size_mib: 512,
            link_log_bytes: 64 * 1024,
            max_log_bytes: 64 * 1024 * 1024,
            socket_gid: None,
        }
    }
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(RunnerError::io_path("reading config", path))?;
                toml::from_str(&text).map_err(|e| {
                    RunnerError::invalid(format!("config {}", path.display()), e.to_string())
                })?
            }
        };
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: &str| Err(RunnerError::invalid(field, reason));
        if self.max_concurrent_jobs == 0 || self.max_concurrent_jobs > 256 {
            return bad("max_concurrent_jobs", "must be 1 to 256");
        }
        if self.default_timeout_seconds == 0 {
            return bad("default_timeout_seconds", "must be positive");
        }
        if self.default_timeout_seconds > self.max_timeout_seconds {
            return bad(
                "default_timeout_seconds",
                "must not exceed max_timeout_seconds",
            );
        }
        if self.id_range < 2000 {
            return bad(
                "id_range",
                "must be at least 2000 (the build user is uid 1000)",
            );
        }
        if self.uid_base < 65_536 {
            return bad("uid_base", "must be at least 65536, away from host users");
        }
        let last = u64::from(self.uid_base)
            + u64::from(self.id_range) * u64::from(self.max_concurrent_jobs);
        if last >= u64::from(u32::MAX) {
            return bad("uid_base", "the id ranges run past the largest uid");
        }
        if self.tmp_size_mib == 0 {
            return bad("tmp_size_mib", "must be positive");
        }
        if !self.state_dir.is_absolute() {
            return bad("state_dir", "must be an absolute path");
        }
        Ok(())
    }

    /// The first host uid of concurrency slot `slot`.
    pub fn slot_uid_base(&self, slot: u32) -> u32 {
        self.uid_base + slot * self.id_range
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "max_concurent_jobs = 3\n").unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");

        std::fs::write(&path, "max_concurrent_jobs = 0\n").unwrap();
        let cfg = Config::load(Some(&path)).unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_concurrent_jobs"));

        Config::default().validate().unwrap();
    }
}
