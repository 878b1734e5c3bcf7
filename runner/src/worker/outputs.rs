//! An action's outputs, collected after it ran: files (with their digests and executable
//! bit), directories as Trees, symlinks as symlinks. Everything is opened below the workspace
//! with `O_NOFOLLOW`, one component at a time, so a symlink the action left behind is
//! recorded, never followed or read, and nothing outside the workspace is read.

use std::collections::HashSet;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use prost::Message;
use sha2::{Digest as _, Sha256};

use super::cas::{CasClient, Digest, UploadSource, WorkspaceFile};
use super::inputs::{CommandPaths, OutputKind};
use super::ActionLimits;
use crate::error::{Result, RunnerError};

/// Files up to this size are kept in memory until uploaded; larger ones are opened again
/// (without following symlinks) and re-hashed when uploaded.
const IN_MEMORY_BYTES: u64 = 1024 * 1024;

/// Outputs found in the workspace: the ActionResult's output fields, and the blobs it refers
/// to (file contents, Tree messages) still to be uploaded.
#[derive(Debug, Default)]
pub struct CollectedOutputs {
    pub result: reapi::ActionResult,
    pub blobs: Vec<(Digest, UploadSource)>,
    entries: u64,
    bytes: u64,
}

struct Collector<'a> {
    limits: &'a ActionLimits,
    root: Arc<OwnedFd>,
    out: CollectedOutputs,
}

fn output_error(path: &str, reason: impl std::fmt::Display) -> RunnerError {
    RunnerError::invalid("output", format!("{path}: {reason}"))
}

impl Collector<'_> {
    fn count_entry(&mut self, path: &str) -> Result<()> {
        self.out.entries += 1;
        if self.out.entries > self.limits.max_output_entries {
            return Err(RunnerError::ResourceExhausted(format!(
                "{path}: the outputs have more than {} entries",
                self.limits.max_output_entries
            )));
        }
        Ok(())
    }

    /// Hashes a regular file opened (without following) below `dir`.
    fn file(
        &mut self,
        dir: &impl AsFd,
        name: &str,
        path: &str,
        components: Vec<String>,
    ) -> Result<(Digest, bool)> {
        let fd = nix::fcntl::openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| output_error(path, format!("cannot open: {e}")))?;
        let stat = nix::sys::stat::fstat(&fd).map_err(|e| output_error(path, e))?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(output_error(path, "changed while it was collected"));
        }
        let executable = stat.st_mode & 0o100 != 0;
        let mut file = std::fs::File::from(fd);
        let budget = self.limits.max_output_bytes.saturating_sub(self.out.bytes);
        let mut hasher = Sha256::new();
        let mut kept = Vec::new();
        let mut size = 0u64;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buffer).map_err(|e| output_error(path, e))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > budget {
                return Err(RunnerError::ResourceExhausted(format!(
                    "{path}: the outputs exceed {} bytes",
                    self.limits.max_output_bytes
                )));
            }
            hasher.update(&buffer[..n]);
            if size <= IN_MEMORY_BYTES {
                kept.extend_from_slice(&buffer[..n]);
            }
        }
        self.out.bytes += size;
        let digest = Digest::from_parts(hex::encode(hasher.finalize()), size);
        let source = if size <= IN_MEMORY_BYTES {
            UploadSource::Bytes(kept)
        } else {
            UploadSource::Workspace(WorkspaceFile {
                root: self.root.clone(),
                components,
            })
        };
        if !digest.is_empty_blob() {
            self.out.blobs.push((digest.clone(), source));
        }
        Ok((digest, executable))
    }

    fn symlink_target(&self, dir: &impl AsFd, name: &str, path: &str) -> Result<String> {
        let target = nix::fcntl::readlinkat(dir, name).map_err(|e| output_error(path, e))?;
        target
            .into_string()
            .map_err(|_| output_error(path, "a symlink target that is not UTF-8"))
    }

    /// A directory (opened without following) as a Directory message; its subdirectories
    /// are added to `children` once each.
    fn directory(
        &mut self,
        fd: OwnedFd,
        path: &str,
        components: &[String],
        depth: usize,
        children: &mut Vec<reapi::Directory>,
        seen: &mut HashSet<Digest>,
    ) -> Result<reapi::Directory> {
        if depth > self.limits.max_depth {
            return Err(output_error(
                path,
                "directories nested deeper than the limit",
            ));
        }
        let listing_fd = fd.try_clone().map_err(|e| output_error(path, e))?;
        let mut listing = nix::dir::Dir::from_fd(listing_fd).map_err(|e| output_error(path, e))?;
        let mut names = Vec::new();
        for entry in listing.iter() {
            let entry = entry.map_err(|e| output_error(path, e))?;
            let name = entry
                .file_name()
                .to_str()
                .map_err(|_| output_error(path, "a name that is not UTF-8"))?;
            if name != "." && name != ".." {
                names.push(name.to_string());
                // Bounded while listing, before each entry is counted.
                if self.out.entries + names.len() as u64 > self.limits.max_output_entries {
                    return Err(RunnerError::ResourceExhausted(format!(
                        "{path}: the outputs have more than {} entries",
                        self.limits.max_output_entries
                    )));
                }
            }
        }
        names.sort();
        let mut directory = reapi::Directory::default();
        for name in names {
            let child_path = format!("{path}/{name}");
            self.count_entry(&child_path)?;
            let stat = nix::sys::stat::fstatat(&fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| output_error(&child_path, e))?;
            let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFREG {
                let (digest, is_executable) =
                    self.file(&fd, &name, &child_path, child_components(components, &name))?;
                directory.files.push(reapi::FileNode {
                    name,
                    digest: Some(digest.to_proto()),
                    is_executable,
                    node_properties: None,
                });
            } else if kind == SFlag::S_IFLNK {
                let target = self.symlink_target(&fd, &name, &child_path)?;
                directory.symlinks.push(reapi::SymlinkNode {
                    name,
                    target,
                    node_properties: None,
                });
            } else if kind == SFlag::S_IFDIR {
                let child_fd =
                    open_directory(&fd, &name).map_err(|e| output_error(&child_path, e))?;
                let child = self.directory(
                    child_fd,
                    &child_path,
                    &child_components(components, &name),
                    depth + 1,
                    children,
                    seen,
                )?;
                let (digest, _) = Digest::of_message(&child);
                if seen.insert(digest.clone()) {
                    children.push(child);
                }
                directory.directories.push(reapi::DirectoryNode {
                    name,
                    digest: Some(digest.to_proto()),
                });
            } else {
                return Err(output_error(
                    &child_path,
                    "not a file, directory or symlink",
                ));
            }
        }
        Ok(directory)
    }
}

fn child_components(parent: &[String], name: &str) -> Vec<String> {
    let mut components = parent.to_vec();
    components.push(name.to_string());
    components
}

fn open_directory(dir: &impl AsFd, name: &str) -> nix::Result<OwnedFd> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Collects the outputs `paths` names from `workspace` (nothing is uploaded yet). An output
/// that does not exist is left out, as REAPI says; one below a symlink or a file is an error.
// The typed symlink lists are deprecated in REAPI v2.1 but are what a v2.0 client reads.
#[allow(deprecated)]
pub fn collect_outputs(
    workspace: &Path,
    paths: &CommandPaths,
    limits: &ActionLimits,
) -> Result<CollectedOutputs> {
    let root = nix::fcntl::open(
        workspace,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| RunnerError::io_path("opening", workspace)(e.into()))?;
    let mut collector = Collector {
        limits,
        root: Arc::new(root),
        out: CollectedOutputs::default(),
    };
    for request in &paths.outputs {
        let path = request.path.as_str();
        let Some((name, parents)) = request.components.split_last() else {
            return Err(output_error(path, "names the workspace itself"));
        };
        // Walk to the parent one component at a time, never through a symlink.
        let mut dir = collector
            .root
            .try_clone()
            .map_err(RunnerError::io("duplicating a descriptor"))?;
        let mut missing = false;
        for component in parents {
            match open_directory(&dir, component) {
                Ok(next) => dir = next,
                Err(Errno::ENOENT) => {
                    missing = true;
                    break;
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(output_error(path, "lies below a symlink or a file"));
                }
                Err(e) => return Err(output_error(path, e)),
            }
        }
        if missing {
            continue;
        }
        let stat = match nix::sys::stat::fstatat(&dir, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(output_error(path, e)),
        };
        collector.count_entry(path)?;
        let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            let target = collector.symlink_target(&dir, name, path)?;
            let symlink = reapi::OutputSymlink {
                path: path.to_string(),
                target,
                node_properties: None,
            };
            let result = &mut collector.out.result;
            match request.kind {
                OutputKind::Any => result.output_symlinks.push(symlink),
                OutputKind::File => result.output_file_symlinks.push(symlink),
                OutputKind::Directory => result.output_directory_symlinks.push(symlink),
            }
        } else if kind == SFlag::S_IFREG {
            if request.kind == OutputKind::Directory {
                return Err(output_error(
                    path,
                    "is a file, but declared an output directory",
                ));
            }
            let (digest, is_executable) =
                collector.file(&dir, name, path, request.components.clone())?;
            collector.out.result.output_files.push(reapi::OutputFile {
                path: path.to_string(),
                digest: Some(digest.to_proto()),
                is_executable,
                contents: Vec::new(),
                node_properties: None,
            });
        } else if kind == SFlag::S_IFDIR {
            if request.kind == OutputKind::File {
                return Err(output_error(
                    path,
                    "is a directory, but declared an output file",
                ));
            }
            let fd = open_directory(&dir, name).map_err(|e| output_error(path, e))?;
            let mut children = Vec::new();
            let mut seen = HashSet::new();
            let root_directory = collector.directory(
                fd,
                path,
                &request.components,
                request.components.len(),
                &mut children,
                &mut seen,
            )?;
            let (root_digest, _) = Digest::of_message(&root_directory);
            let tree = reapi::Tree {
                root: Some(root_directory),
                children,
            };
            let (tree_digest, tree_bytes) = Digest::of_message(&tree);
            collector.out.bytes = collector.out.bytes.saturating_add(tree_digest.size());
            collector
                .out
                .blobs
                .push((tree_digest.clone(), UploadSource::Bytes(tree_bytes)));
            collector
                .out
                .result
                .output_directories
                .push(reapi::OutputDirectory {
                    path: path.to_string(),
                    tree_digest: Some(tree_digest.to_proto()),
                    is_topologically_sorted: false,
                    root_directory_digest: Some(root_digest.to_proto()),
                });
        } else {
            return Err(output_error(path, "not a file, directory or symlink"));
        }
    }
    Ok(collector.out)
}

/// Uploads what the CAS lacks of the outputs and of stdout/stderr, and completes the
/// ActionResult with the exit code and the stdout/stderr digests.
pub async fn upload_outputs(
    cas: &CasClient,
    mut collected: CollectedOutputs,
    exit_code: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    limits: &ActionLimits,
) -> Result<reapi::ActionResult> {
    let total = collected
        .bytes
        .saturating_add(stdout.len() as u64)
        .saturating_add(stderr.len() as u64);
    if total > limits.max_output_bytes {
        return Err(RunnerError::ResourceExhausted(format!(
            "the outputs with stdout and stderr exceed {} bytes",
            limits.max_output_bytes
        )));
    }
    let stdout_digest = Digest::of(&stdout);
    let stderr_digest = Digest::of(&stderr);
    collected.result.exit_code = exit_code;
    collected.result.stdout_digest = Some(stdout_digest.to_proto());
    collected.result.stderr_digest = Some(stderr_digest.to_proto());
    collected
        .blobs
        .push((stdout_digest, UploadSource::Bytes(stdout)));
    collected
        .blobs
        .push((stderr_digest, UploadSource::Bytes(stderr)));
    cas.upload_missing(collected.blobs).await?;
    Ok(collected.result)
}

/// The encoded bytes of a message for the CAS, with its digest (for an ActionResult's
/// attachments, e.g. a signed statement).
pub fn message_blob(message: &impl Message) -> (Digest, Vec<u8>) {
    Digest::of_message(message)
}
