//! A job's workspace: its enclosure and quota, the inputs copied in, the walks that
//! survey and hash it, and collecting and storing the declared outputs.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agent_proto::v1::OutputFile;
use provenance::walk::{
    Entry as WalkEntry, Flow, Kind as WalkKind, Problem as WalkProblem, WalkError, WalkOptions,
};

use crate::config::Config;
use crate::engine::end::{blocking, JobEnd};
use crate::engine::jobs::Runner;
use crate::error::{Result, RunnerError};
use crate::plan::ValidatedJob;
use crate::store::cas::ContentStore;

/// Where a step sees its workspace: messages name files under it, never by host path.
pub(super) const WORKSPACE_IN_SANDBOX: &str = "/workspace";

impl Runner {
    /// A fresh workspace in its enclosure, owned by the step's host uid, holding the
    /// inputs copied out of the content store (each copy hash-checked).
    pub(super) fn prepare_workspace(
        &self,
        plan: &ValidatedJob,
        (enclosure, enclosure_owner): (&Path, u32),
        workspace: &Path,
        owner: u32,
    ) -> Result<()> {
        let spec = plan.spec();
        let quota = plan.workspace_quota(&self.config);
        self.executor
            .create_workspace(enclosure, enclosure_owner, workspace, quota, owner)?;
        for input in &spec.inputs {
            let dest = workspace.join(&input.path);
            if let Some(parent) = dest.parent() {
                create_dirs_0755(workspace, parent)?;
            }
            let mode = if input.executable { 0o755 } else { 0o644 };
            self.cas
                .copy_out(&input.digest, &dest, mode)
                .map_err(|e| match e {
                    RunnerError::NotFound(_) => RunnerError::FailedPrecondition(format!(
                        "input {:?}: blob {} is not in the content store (upload it first)",
                        input.path, input.digest
                    )),
                    other
                        if self
                            .executor
                            .workspace_usage(workspace)
                            .is_some_and(|u| u.1) =>
                    {
                        // The error names host paths: the daemon's log gets it, not the client.
                        tracing::info!(error = %other, "inputs exceed the workspace quota");
                        RunnerError::FailedPrecondition(format!(
                            "the inputs do not fit in the workspace quota of {}",
                            crate::units::format_size(quota)
                        ))
                    }
                    other => other,
                })?;
        }
        self.executor.give_workspace(workspace, owner)
    }

    /// Stores the declared outputs. The step is over (every process of its sandbox
    /// is dead), so the tree cannot change under us; still, no symlink is followed
    /// and only regular files are taken, each opened relative to its directory.
    pub(super) fn collect_outputs(
        &self,
        workspace: &Path,
        outputs: &[String],
    ) -> Result<Vec<OutputFile>> {
        let options = workspace_walk(&self.config);
        // Everything is counted and checked before anything is stored.
        let mut budget = OutputBudget {
            config: &self.config,
            files: 0,
            bytes: 0,
            listing: 0,
        };
        let mut found = Vec::with_capacity(outputs.len());
        for output in outputs {
            let path = resolve_in_workspace(workspace, output)?;
            let meta = fs::symlink_metadata(&path).map_err(|_| {
                RunnerError::invalid(
                    format!("output {output:?}"),
                    "was not produced by the steps",
                )
            })?;
            if meta.is_dir() {
                provenance::walk::walk(&path, options, |entry: &WalkEntry<'_>| {
                    match entry.kind() {
                        WalkKind::Dir => {}
                        WalkKind::File => {
                            budget.add(output.len() + 1 + entry.path().len(), entry.size())?
                        }
                        WalkKind::Symlink => {
                            return Err(Collect::Runner(not_regular(
                                &format!("{output}/{}", entry.path()),
                                true,
                            )))
                        }
                    }
                    Ok(Flow::Continue)
                })
                .map_err(|e| e.for_output(output))?;
            } else if meta.is_file() {
                budget.add(output.len(), meta.len())?;
            } else {
                return Err(not_regular(output, meta.file_type().is_symlink()));
            }
            found.push((output, path, meta));
        }
        let cap = self.config.max_outputs_size.0;
        if budget.bytes > cap {
            return Err(RunnerError::invalid(
                "outputs",
                format!(
                    "the declared outputs total {}, more than the runner's max_outputs_size of {}; nothing was stored",
                    crate::units::format_size(budget.bytes),
                    crate::units::format_size(cap)
                ),
            ));
        }
        let mut files = Vec::new();
        for (output, path, meta) in found {
            if meta.is_dir() {
                provenance::walk::walk(&path, options, |entry: &WalkEntry<'_>| {
                    if entry.kind() == WalkKind::File {
                        let rel = format!("{output}/{}", entry.path());
                        let file = entry.open_file()?;
                        let stored = store_output(&self.cas, file, rel.clone(), entry.mode());
                        files.push(without_host_path(stored, &rel)?);
                    }
                    Ok::<_, Collect>(Flow::Continue)
                })
                .map_err(|e| e.for_output(output))?;
            } else {
                // A declared path is short (checked at submit): by name is fine here.
                let (digest, size) = without_host_path(self.cas.put_file(&path), output)?;
                files.push(OutputFile {
                    path: output.clone(),
                    digest,
                    size,
                    executable: meta.mode() & 0o111 != 0,
                });
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files.dedup_by(|a, b| a.path == b.path);
        Ok(files)
    }
}

/// An error while walking a declared output: the walker's, or storing's.
enum Collect {
    Walk(WalkError),
    Runner(RunnerError),
}

impl From<WalkError> for Collect {
    fn from(err: WalkError) -> Self {
        Collect::Walk(err)
    }
}

impl From<RunnerError> for Collect {
    fn from(err: RunnerError) -> Self {
        Collect::Runner(err)
    }
}

impl Collect {
    fn for_output(self, output: &str) -> RunnerError {
        match self {
            Collect::Walk(err) => output_walk_error(output, &err),
            Collect::Runner(err) => err,
        }
    }
}

/// Creates `dir` and its missing parents below `workspace` as 0755, as a build expects
/// them, whatever the daemon's umask (the workspace root itself is 0700).
fn create_dirs_0755(workspace: &Path, dir: &Path) -> Result<()> {
    let Ok(relative) = dir.strip_prefix(workspace) else {
        return Err(RunnerError::Internal(
            "input directory outside the workspace".into(),
        ));
    };
    let mut path = workspace.to_path_buf();
    for component in relative.components() {
        path.push(component);
        match fs::create_dir(&path) {
            Ok(()) => fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                .map_err(RunnerError::io_path("chmod", &path))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(RunnerError::io_path("creating", &path)(e)),
        }
    }
    Ok(())
}

/// The options every walk of a workspace uses: the entry budget is checked while the
/// tree is read, so a workspace over it costs the daemon no more than the budget.
pub(super) fn workspace_walk(config: &Config) -> WalkOptions {
    WalkOptions {
        max_entries: Some(config.max_workspace_entries),
        max_total_path_bytes: Some(MAX_WORKSPACE_PATH_BYTES),
    }
}

/// The most bytes a workspace's paths may add up to: a link lists each path (twice,
/// as a material of the next step too), and a client must be able to read it.
const MAX_WORKSPACE_PATH_BYTES: u64 = 16 << 20;

/// Why a step's workspace cannot be recorded: (message for the step, limit reason).
/// Paths are named as the step saw them, under /workspace, never by a host path.
pub(super) fn unrecordable(err: &WalkError) -> (String, &'static str) {
    match err.problem {
        WalkProblem::TooManyEntries { limit } => (
            format!(
                "the workspace holds more than {limit} entries (files, directories and symlinks), the runner's max_workspace_entries; they are not hashed or attested"
            ),
            "files",
        ),
        WalkProblem::PathsTooLong { limit } => (
            format!(
                "the paths of the workspace's files add up to more than {}; they are not hashed or attested",
                crate::units::format_size(limit)
            ),
            "files",
        ),
        _ => (
            format!(
                "the workspace cannot be attested: {}",
                err.under(WORKSPACE_IN_SANDBOX)
            ),
            "",
        ),
    }
}

/// The sum of the apparent sizes of the workspace's regular files, after checking
/// that every entry can be recorded (the same walk the hashing does, without reading
/// a byte): what hashing would refuse is found before anything is read.
pub(super) fn survey_workspace(workspace: &Path, options: WalkOptions) -> Result<u64, WalkError> {
    let mut total = 0u64;
    provenance::walk::walk(workspace, options, |entry: &WalkEntry<'_>| {
        if entry.kind() == WalkKind::File {
            total = total.saturating_add(entry.size());
        }
        Ok::<_, WalkError>(Flow::Continue)
    })?;
    Ok(total)
}

/// Hashes the workspace; a tree that cannot be recorded is the walk's error (naming
/// the entry relative to the workspace), anything else is the daemon's.
pub(super) async fn hash_workspace(
    workspace: PathBuf,
    options: WalkOptions,
) -> Result<Result<BTreeMap<String, String>, WalkError>, JobEnd> {
    blocking(
        move || match provenance::hash::hash_tree_within(&workspace, options) {
            Ok(tree) => Ok(Ok(tree)),
            Err(provenance::ProvenanceError::Walk(err)) => Ok(Err(err)),
            Err(other) => Err(other.into()),
        },
    )
    .await
}

/// Joins a validated workspace path to the workspace, refusing any symlink on the way.
fn resolve_in_workspace(workspace: &Path, relative: &str) -> Result<PathBuf> {
    crate::spec::check_workspace_path("output", relative)?;
    let mut path = workspace.to_path_buf();
    let components: Vec<&str> = relative.split('/').collect();
    for (i, component) in components.iter().enumerate() {
        path.push(component);
        if i + 1 < components.len() {
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(RunnerError::invalid(
                        format!("output {relative:?}"),
                        "a directory on its path is a symlink; outputs never follow links",
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(path)
}

/// Encoded bytes of one output in the job's outputs list, besides its path: the digest
/// and the field tags, lengths and varints.
const OUTPUT_ENTRY_OVERHEAD: usize = 80;
/// The most the outputs list may take in a `Job` message: every answer about the job
/// carries it, and a client decodes at most 4 MiB.
const MAX_OUTPUT_LISTING_BYTES: usize = 2 << 20;

/// Counts what a job's declared outputs would store, refusing what cannot be stored
/// before anything is: more files than `max_outputs`, a listing too long for a client,
/// or more bytes than `max_outputs_size`.
struct OutputBudget<'a> {
    config: &'a Config,
    files: u64,
    bytes: u64,
    listing: usize,
}

impl OutputBudget<'_> {
    fn add(&mut self, path_len: usize, size: u64) -> Result<()> {
        self.files += 1;
        self.bytes = self.bytes.saturating_add(size);
        self.listing = self
            .listing
            .saturating_add(path_len + OUTPUT_ENTRY_OVERHEAD);
        let max = self.config.max_outputs;
        if self.files > max {
            return Err(RunnerError::invalid(
                "outputs",
                format!("the declared outputs hold more than {max} files, the runner's max_outputs; nothing was stored"),
            ));
        }
        if self.listing > MAX_OUTPUT_LISTING_BYTES {
            return Err(RunnerError::invalid(
                "outputs",
                format!(
                    "the declared outputs' list of {} files and their paths takes more than {}, more than a client can read with the job; nothing was stored",
                    self.files,
                    crate::units::format_size(MAX_OUTPUT_LISTING_BYTES as u64)
                ),
            ));
        }
        Ok(())
    }
}

/// A failure to store an output, told to the client without the daemon's paths (the
/// content store's or the workspace's); the log keeps the details.
fn without_host_path<T>(stored: Result<T>, rel: &str) -> Result<T> {
    stored.map_err(|err| match err {
        RunnerError::InvalidArgument { .. } => err,
        other => {
            tracing::error!(output = %rel, error = %other, "could not store an output");
            RunnerError::Internal(format!(
                "could not store output {rel:?} in the content store"
            ))
        }
    })
}

/// An output that cannot be collected, named as the step saw it.
fn output_walk_error(output: &str, err: &WalkError) -> RunnerError {
    RunnerError::invalid(
        format!("output {output:?}"),
        err.under(&format!("{WORKSPACE_IN_SANDBOX}/{output}")),
    )
}

fn not_regular(rel: &str, symlink: bool) -> RunnerError {
    let kind = if symlink {
        "a symlink"
    } else {
        "not a regular file"
    };
    RunnerError::invalid(
        format!("output {rel:?}"),
        format!("is {kind}; outputs must be regular files"),
    )
}

/// Copies an open output file into the content store, hashing what is read.
fn store_output(
    cas: &ContentStore,
    mut file: fs::File,
    rel: String,
    mode: u32,
) -> Result<OutputFile> {
    let mut writer = cas.writer()?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(RunnerError::invalid(
                    format!("output {rel:?}"),
                    format!("cannot be read: {e}"),
                ))
            }
        };
        writer.write(&buf[..n])?;
    }
    let size = writer.size();
    let digest = writer.commit(None)?;
    Ok(OutputFile {
        path: rel,
        digest,
        size,
        executable: mode & 0o111 != 0,
    })
}

/// Gives every entry of the workspace (the root included) to `id`, never following
/// a symlink.
pub(super) fn chown_tree(root: &Path, id: u32) -> Result<()> {
    std::os::unix::fs::lchown(root, Some(id), Some(id))
        .map_err(RunnerError::io_path("chown", root))?;
    provenance::walk::walk(root, WalkOptions::default(), |entry: &WalkEntry<'_>| {
        entry.chown(id, id)?;
        Ok::<_, WalkError>(Flow::Continue)
    })
    .map_err(|e| RunnerError::Internal(format!("chown of the workspace: {e}")))?;
    Ok(())
}
