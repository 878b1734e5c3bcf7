//! The building blocks of `kiln worker`, a bot of a remote-execution scheduler (the Remote
//! Workers API, e.g. BuildGrid): the scheduler's CAS ([`cas`]), an action's input root
//! materialised as a workspace ([`inputs`]) and its outputs collected into an ActionResult
//! ([`outputs`]). An action is untrusted input: every digest, name, path and symlink it
//! holds is validated, and nothing outside the workspace is ever written, read or followed.

pub mod bots;
pub mod cas;
pub mod image;
pub mod inputs;
pub mod outputs;
pub mod run;

#[cfg(test)]
mod fake_cas;
#[cfg(test)]
mod tests;

/// Bounds on one action's inputs and outputs.
#[derive(Clone, Debug)]
pub struct ActionLimits {
    /// The deepest directory nesting of the input root and of an output directory.
    pub max_depth: usize,
    /// Files, directories and symlinks in the input root (each occurrence counted).
    pub max_input_entries: u64,
    /// Total bytes of the input root's files (each occurrence counted).
    pub max_input_bytes: u64,
    /// The largest Action, Command or Directory message.
    pub max_message_bytes: u64,
    /// Total bytes of the input root's distinct Directory messages (all held while the
    /// tree is validated).
    pub max_tree_bytes: u64,
    /// Bytes of a path below the workspace (PATH_MAX is 4096).
    pub max_path_bytes: usize,
    /// Files, directories and symlinks collected as outputs.
    pub max_output_entries: u64,
    /// Total bytes of the output files (and of stdout and stderr).
    pub max_output_bytes: u64,
    /// Symlinks followed while checking where one input symlink resolves.
    pub max_symlink_hops: u32,
}

impl Default for ActionLimits {
    fn default() -> Self {
        ActionLimits {
            max_depth: 64,
            max_input_entries: 1_000_000,
            max_input_bytes: 16 * 1024 * 1024 * 1024,
            max_message_bytes: 4 * 1024 * 1024,
            max_tree_bytes: 256 * 1024 * 1024,
            max_path_bytes: 4000,
            max_output_entries: 100_000,
            max_output_bytes: 4 * 1024 * 1024 * 1024,
            max_symlink_hops: 40,
        }
    }
}
