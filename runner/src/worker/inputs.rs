//! An action's input root, fetched from the CAS, validated as a whole, then written into an
//! empty workspace. Every entry is created below a directory descriptor that Kiln itself
//! created (`mkdirat`/`openat` with `O_NOFOLLOW`, files with `O_EXCL`), so no symlink is ever
//! followed while writing, whatever the action's symlinks say.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::cas::{CasClient, Digest};
use super::ActionLimits;
use crate::error::{Result, RunnerError};

/// Path components looked up while checking all the symlinks of one input root.
const SYMLINK_RESOLUTION_STEPS: u64 = 50_000_000;

/// One entry of a validated input root.
#[derive(Clone, Debug)]
enum Node {
    Directory(BTreeMap<String, Node>),
    File { digest: Digest, executable: bool },
    Symlink(String),
}

/// A validated input root: every Directory matched its digest, every name and symlink
/// target is safe, and its size is within the limits.
#[derive(Debug)]
pub struct InputTree {
    root_digest: Digest,
    root: BTreeMap<String, Node>,
    entries: u64,
    file_bytes: u64,
}

/// A name of an entry of a Directory (REAPI: a single path component).
pub fn validate_name(name: &str, field: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "an empty name"
    } else if name == "." || name == ".." {
        "a `.` or `..` name"
    } else if name.contains('/') {
        "a name with `/`"
    } else if name.contains('\0') {
        "a name with NUL"
    } else if name.len() > 255 {
        "a name longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(RunnerError::invalid(field, format!("{reason}: {name:?}")))
}

/// A relative path of `/`-separated valid names (no `.`, `..`, empty components, leading or
/// trailing `/`). The empty path is the directory itself when `allow_empty`.
pub fn split_relative_path(
    path: &str,
    field: &str,
    allow_empty: bool,
    limits: &ActionLimits,
) -> Result<Vec<String>> {
    if path.is_empty() {
        return if allow_empty {
            Ok(Vec::new())
        } else {
            Err(RunnerError::invalid(field, "an empty path"))
        };
    }
    if path.len() > limits.max_path_bytes {
        return Err(RunnerError::invalid(field, "a path longer than the limit"));
    }
    if path.starts_with('/') {
        return Err(RunnerError::invalid(
            field,
            format!("an absolute path: {path:?}"),
        ));
    }
    let components: Vec<String> = path.split('/').map(str::to_string).collect();
    if components.len() > limits.max_depth {
        return Err(RunnerError::invalid(field, "a path deeper than the limit"));
    }
    for component in &components {
        validate_name(component, field)?;
    }
    Ok(components)
}

struct Counters<'a> {
    limits: &'a ActionLimits,
    entries: u64,
    file_bytes: u64,
}

impl Counters<'_> {
    fn add_entry(&mut self) -> Result<()> {
        self.entries += 1;
        if self.entries > self.limits.max_input_entries {
            return Err(RunnerError::ResourceExhausted(format!(
                "the input root has more than {} entries",
                self.limits.max_input_entries
            )));
        }
        Ok(())
    }

    fn add_bytes(&mut self, size: u64) -> Result<()> {
        self.file_bytes = self.file_bytes.saturating_add(size);
        if self.file_bytes > self.limits.max_input_bytes {
            return Err(RunnerError::ResourceExhausted(format!(
                "the input root's files exceed {} bytes",
                self.limits.max_input_bytes
            )));
        }
        Ok(())
    }
}

/// Fetches and validates the input root `root` (all of it, before anything is written).
pub async fn fetch_input_tree(
    cas: &CasClient,
    root: &Digest,
    limits: &ActionLimits,
) -> Result<InputTree> {
    // Each Directory message is fetched once, level by level, and checked against its
    // digest by the CAS client; the number of distinct ones is bounded like the entries.
    let mut directories: HashMap<Digest, reapi::Directory> = HashMap::new();
    let mut frontier = vec![root.clone()];
    let mut depth = 0usize;
    let mut tree_bytes = 0u64;
    while !frontier.is_empty() {
        if depth > limits.max_depth {
            return Err(RunnerError::invalid(
                "input root",
                format!("directories nested deeper than {}", limits.max_depth),
            ));
        }
        for digest in &frontier {
            if digest.size() > limits.max_message_bytes {
                return Err(RunnerError::invalid(
                    "input root",
                    format!(
                        "Directory {digest} is larger than {} bytes",
                        limits.max_message_bytes
                    ),
                ));
            }
        }
        tree_bytes = frontier
            .iter()
            .fold(tree_bytes, |total, d| total.saturating_add(d.size()));
        if tree_bytes > limits.max_tree_bytes {
            return Err(RunnerError::ResourceExhausted(format!(
                "the input root's Directory messages exceed {} bytes",
                limits.max_tree_bytes
            )));
        }
        let fetched = cas.read_blobs(&frontier).await?;
        let mut next = Vec::new();
        let mut queued = HashSet::new();
        for (digest, bytes) in fetched {
            let directory = <reapi::Directory as prost::Message>::decode(bytes.as_slice())
                .map_err(|e| {
                    RunnerError::invalid(
                        "input root",
                        format!("Directory {digest} does not decode: {e}"),
                    )
                })?;
            for child in &directory.directories {
                let child = Digest::from_field(child.digest.as_ref(), "input root directory")?;
                if !directories.contains_key(&child)
                    && child != digest
                    && queued.insert(child.clone())
                {
                    next.push(child);
                }
            }
            directories.insert(digest, directory);
            if directories.len() as u64 > limits.max_input_entries {
                return Err(RunnerError::ResourceExhausted(
                    "the input root has too many directories".into(),
                ));
            }
        }
        next.retain(|d| !directories.contains_key(d));
        frontier = next;
        depth += 1;
    }
    let mut counters = Counters {
        limits,
        entries: 0,
        file_bytes: 0,
    };
    let root_node = build_directory(root, &directories, 0, 0, &mut counters)?;
    let tree = InputTree {
        root_digest: root.clone(),
        root: root_node,
        entries: counters.entries,
        file_bytes: counters.file_bytes,
    };
    tree.check_symlinks(limits)?;
    Ok(tree)
}

fn build_directory(
    digest: &Digest,
    directories: &HashMap<Digest, reapi::Directory>,
    depth: usize,
    path_bytes: usize,
    counters: &mut Counters<'_>,
) -> Result<BTreeMap<String, Node>> {
    let limits = counters.limits;
    if depth > limits.max_depth {
        return Err(RunnerError::invalid(
            "input root",
            format!("directories nested deeper than {}", limits.max_depth),
        ));
    }
    let directory = directories
        .get(digest)
        .ok_or_else(|| RunnerError::Internal(format!("Directory {digest} was not fetched")))?;
    let mut entries = BTreeMap::new();
    let mut insert = |name: &str, node: Node| -> Result<()> {
        validate_name(name, "input root")?;
        if path_bytes + 1 + name.len() > limits.max_path_bytes {
            return Err(RunnerError::invalid(
                "input root",
                "a path longer than the limit",
            ));
        }
        if entries.insert(name.to_string(), node).is_some() {
            return Err(RunnerError::invalid(
                "input root",
                format!("two entries named {name:?} in one directory"),
            ));
        }
        Ok(())
    };
    for file in &directory.files {
        counters.add_entry()?;
        let file_digest = Digest::from_field(file.digest.as_ref(), "input file")?;
        counters.add_bytes(file_digest.size())?;
        insert(
            &file.name,
            Node::File {
                digest: file_digest,
                executable: file.is_executable,
            },
        )?;
    }
    for symlink in &directory.symlinks {
        counters.add_entry()?;
        validate_symlink_target(&symlink.target, limits)?;
        insert(&symlink.name, Node::Symlink(symlink.target.clone()))?;
    }
    for child in &directory.directories {
        counters.add_entry()?;
        // Validated before recursing, so that a bad name fails before a deep walk.
        validate_name(&child.name, "input root")?;
        let child_digest = Digest::from_field(child.digest.as_ref(), "input root directory")?;
        let node = build_directory(
            &child_digest,
            directories,
            depth + 1,
            path_bytes + 1 + child.name.len(),
            counters,
        )?;
        insert(&child.name, Node::Directory(node))?;
    }
    Ok(entries)
}

fn validate_symlink_target(target: &str, limits: &ActionLimits) -> Result<()> {
    if target.is_empty() {
        return Err(RunnerError::invalid("input symlink", "an empty target"));
    }
    if target.starts_with('/') {
        return Err(RunnerError::invalid(
            "input symlink",
            format!("an absolute target: {target:?}"),
        ));
    }
    if target.contains('\0') || target.len() > limits.max_path_bytes {
        return Err(RunnerError::invalid(
            "input symlink",
            "a target with NUL or too long",
        ));
    }
    Ok(())
}

impl InputTree {
    pub fn root_digest(&self) -> &Digest {
        &self.root_digest
    }

    /// Files, directories and symlinks (each occurrence).
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Total bytes of the files (each occurrence).
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    fn lookup(&self, components: &[String]) -> Option<&Node> {
        let (last, parents) = components.split_last()?;
        let mut entries = &self.root;
        for component in parents {
            match entries.get(component)? {
                Node::Directory(children) => entries = children,
                _ => return None,
            }
        }
        entries.get(last)
    }

    /// Whether `components` names a directory of the tree (not through a symlink); the empty
    /// path is the root.
    pub fn is_directory(&self, components: &[String]) -> bool {
        components.is_empty() || matches!(self.lookup(components), Some(Node::Directory(_)))
    }

    /// Every symlink must resolve inside the workspace: resolved as the kernel would, symlink
    /// by symlink through the tree (a `..` after a symlink goes to the parent of where the
    /// link points, not lexically back), and never above the root. A part that does not
    /// exist is resolved lexically.
    fn check_symlinks(&self, limits: &ActionLimits) -> Result<()> {
        let mut stack: Vec<(Vec<String>, &BTreeMap<String, Node>)> = vec![(Vec::new(), &self.root)];
        // The resolution of all the symlinks together is bounded, so that many long chains
        // cannot keep the worker busy.
        let mut budget = SYMLINK_RESOLUTION_STEPS;
        while let Some((dir, entries)) = stack.pop() {
            for (name, node) in entries {
                match node {
                    Node::Directory(children) => {
                        let mut path = dir.clone();
                        path.push(name.clone());
                        stack.push((path, children));
                    }
                    Node::Symlink(target) => {
                        self.resolve_inside(&dir, target, limits, &mut budget)
                            .map_err(|reason| {
                                RunnerError::invalid(
                                    "input symlink",
                                    format!("{}/{name} -> {target:?}: {reason}", dir.join("/")),
                                )
                            })?;
                    }
                    Node::File { .. } => {}
                }
            }
        }
        Ok(())
    }

    fn resolve_inside(
        &self,
        link_dir: &[String],
        target: &str,
        limits: &ActionLimits,
        budget: &mut u64,
    ) -> Result<(), String> {
        let mut current: Vec<String> = link_dir.to_vec();
        let mut pending: std::collections::VecDeque<String> =
            target.split('/').map(str::to_string).collect();
        let mut hops = 0u32;
        // Once a component does not exist, the rest is resolved lexically.
        let mut dangling = false;
        while let Some(component) = pending.pop_front() {
            *budget = budget
                .checked_sub(1 + current.len() as u64)
                .ok_or("the input root's symlinks take too long to resolve")?;
            match component.as_str() {
                "" | "." => continue,
                ".." => {
                    if current.pop().is_none() {
                        return Err("resolves outside the workspace".into());
                    }
                    continue;
                }
                _ => {}
            }
            current.push(component);
            if dangling {
                continue;
            }
            match self.lookup(&current) {
                Some(Node::Directory(_)) => {}
                Some(Node::Symlink(next)) => {
                    hops += 1;
                    if hops > limits.max_symlink_hops {
                        return Err("too many levels of symlinks".into());
                    }
                    if next.starts_with('/') {
                        return Err("resolves through an absolute symlink".into());
                    }
                    current.pop();
                    for part in next.rsplit('/') {
                        pending.push_front(part.to_string());
                    }
                }
                // A file with more components after it cannot be resolved (ENOTDIR).
                Some(Node::File { .. }) => return Ok(()),
                None => dangling = true,
            }
        }
        Ok(())
    }

    /// Writes the tree into `workspace`, which must be an empty directory. Files get mode
    /// 0555 or 0444 (0755/0644 with `writable`), directories 0755.
    pub async fn materialize(
        &self,
        cas: &CasClient,
        workspace: &Path,
        writable: bool,
    ) -> Result<()> {
        let mut listing =
            std::fs::read_dir(workspace).map_err(RunnerError::io_path("reading", workspace))?;
        if listing.next().is_some() {
            return Err(RunnerError::Internal("the workspace is not empty".into()));
        }
        let root = nix::fcntl::open(
            workspace,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| RunnerError::io_path("opening", workspace)(e.into()))?;

        // Small blobs are fetched batch by batch in the order the files are written, so
        // that at most one batch is held in memory; large ones are streamed into their file.
        let mut order = Vec::new();
        collect_files(&self.root, &mut |digest| {
            if is_small(cas, digest) {
                order.push(digest.clone());
            }
        });
        let mut feeder = BlobFeeder {
            order,
            cursor: 0,
            batch: HashMap::new(),
        };
        write_directory(&root, &self.root, cas, &mut feeder, writable).await
    }
}

fn is_small(cas: &CasClient, digest: &Digest) -> bool {
    !digest.is_empty_blob() && digest.size() <= cas.max_batch_bytes() / 2
}

/// The small blobs of the input root in the order their files are written, fetched one
/// batch at a time.
struct BlobFeeder {
    order: Vec<Digest>,
    cursor: usize,
    batch: HashMap<Digest, Vec<u8>>,
}

impl BlobFeeder {
    async fn get(&mut self, cas: &CasClient, digest: &Digest) -> Result<&[u8]> {
        if !self.batch.contains_key(digest) {
            // The files are written in the order they were listed: the next batch starts
            // at this digest.
            while self.order.get(self.cursor).is_some_and(|d| d != digest) {
                self.cursor += 1;
            }
            let mut wanted = Vec::new();
            let mut bytes = 0u64;
            while let Some(next) = self.order.get(self.cursor) {
                if !wanted.is_empty() && bytes + next.size() > cas.max_batch_bytes() / 2 {
                    break;
                }
                bytes += next.size();
                wanted.push(next.clone());
                self.cursor += 1;
            }
            if wanted.is_empty() {
                wanted.push(digest.clone());
            }
            self.batch = cas.read_blobs(&wanted).await?;
        }
        self.batch
            .get(digest)
            .map(Vec::as_slice)
            .ok_or_else(|| RunnerError::Internal(format!("blob {digest} was not fetched")))
    }
}

fn collect_files(entries: &BTreeMap<String, Node>, found: &mut impl FnMut(&Digest)) {
    // The same order as `write_directory`.
    for node in entries.values() {
        match node {
            Node::Directory(children) => collect_files(children, found),
            Node::File { digest, .. } => found(digest),
            Node::Symlink(_) => {}
        }
    }
}

fn write_directory<'a>(
    dir: &'a OwnedFd,
    entries: &'a BTreeMap<String, Node>,
    cas: &'a CasClient,
    feeder: &'a mut BlobFeeder,
    writable: bool,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
    Box::pin(async move {
        for (name, node) in entries {
            let failed = |e: nix::errno::Errno| {
                RunnerError::io(format!("creating input {name:?}"))(e.into())
            };
            match node {
                Node::Directory(children) => {
                    nix::sys::stat::mkdirat(dir, name.as_str(), Mode::from_bits_truncate(0o755))
                        .map_err(failed)?;
                    let child = nix::fcntl::openat(
                        dir,
                        name.as_str(),
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(failed)?;
                    write_directory(&child, children, cas, feeder, writable).await?;
                }
                Node::Symlink(target) => {
                    nix::unistd::symlinkat(target.as_str(), dir, name.as_str()).map_err(failed)?;
                }
                Node::File { digest, executable } => {
                    let fd = nix::fcntl::openat(
                        dir,
                        name.as_str(),
                        OFlag::O_WRONLY
                            | OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o600),
                    )
                    .map_err(failed)?;
                    let mut file = std::fs::File::from(fd);
                    if is_small(cas, digest) {
                        let data = feeder.get(cas, digest).await?;
                        file.write_all(data)
                            .map_err(RunnerError::io(format!("writing input {name:?}")))?;
                    } else {
                        cas.stream_read(digest, &mut file).await?;
                    }
                    let mode = match (*executable, writable) {
                        (true, true) => 0o755,
                        (true, false) => 0o555,
                        (false, true) => 0o644,
                        (false, false) => 0o444,
                    };
                    nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(mode))
                        .map_err(failed)?;
                }
            }
        }
        Ok(())
    })
}

/// Fetches, validates and writes the input root `root` into the empty `workspace`.
pub async fn materialize_input_root(
    cas: &CasClient,
    root: &Digest,
    workspace: &Path,
    limits: &ActionLimits,
) -> Result<InputTree> {
    let tree = fetch_input_tree(cas, root, limits).await?;
    tree.materialize(cas, workspace, true).await?;
    Ok(tree)
}

/// What an output request asks for (REAPI v2.1 `output_paths`, or v2.0's typed lists).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// `output_paths`: whatever is there.
    Any,
    /// `output_files`.
    File,
    /// `output_directories`.
    Directory,
}

/// One validated output path.
#[derive(Clone, Debug)]
pub struct OutputRequest {
    /// As the Command states it, relative to the working directory (reported back as such).
    pub path: String,
    /// Components below the workspace root (working directory first).
    pub components: Vec<String>,
    pub kind: OutputKind,
}

/// The validated paths of a Command.
#[derive(Clone, Debug)]
pub struct CommandPaths {
    /// Components of the working directory below the workspace (empty: the root).
    pub working_directory: Vec<String>,
    pub outputs: Vec<OutputRequest>,
}

/// Validates a Command's working directory (an existing directory of the input root) and
/// output paths (relative, inside the workspace, not the working directory itself). Usable
/// before the action runs.
// The typed output lists are deprecated in REAPI v2.1 but are all a v2.0 client sends.
#[allow(deprecated)]
pub fn validate_command_paths(
    command: &reapi::Command,
    tree: &InputTree,
    limits: &ActionLimits,
) -> Result<CommandPaths> {
    let working_directory = split_relative_path(
        &command.working_directory,
        "working_directory",
        true,
        limits,
    )?;
    if !tree.is_directory(&working_directory) {
        return Err(RunnerError::invalid(
            "working_directory",
            "not a directory of the input root",
        ));
    }
    // REAPI: output_paths (v2.1) supersedes the typed lists when it is set.
    let requested: Vec<(&String, OutputKind)> = if command.output_paths.is_empty() {
        command
            .output_files
            .iter()
            .map(|p| (p, OutputKind::File))
            .chain(
                command
                    .output_directories
                    .iter()
                    .map(|p| (p, OutputKind::Directory)),
            )
            .collect()
    } else {
        command
            .output_paths
            .iter()
            .map(|p| (p, OutputKind::Any))
            .collect()
    };
    if requested.len() as u64 > limits.max_output_entries {
        return Err(RunnerError::invalid("output paths", "more than the limit"));
    }
    let mut seen = HashSet::new();
    let mut outputs = Vec::with_capacity(requested.len());
    for (path, kind) in requested {
        let relative = split_relative_path(path, "output path", false, limits)?;
        if !seen.insert(path.as_str()) {
            return Err(RunnerError::invalid(
                "output path",
                format!("{path:?} is named twice"),
            ));
        }
        let mut components = working_directory.clone();
        components.extend(relative);
        if components.len() > limits.max_depth {
            return Err(RunnerError::invalid("output path", "deeper than the limit"));
        }
        outputs.push(OutputRequest {
            path: path.clone(),
            components,
            kind,
        });
    }
    Ok(CommandPaths {
        working_directory,
        outputs,
    })
}

/// An action fetched from the CAS and validated: its Command, its input root (not yet
/// written) and the Command's paths.
#[derive(Debug)]
pub struct FetchedAction {
    pub action_digest: Digest,
    pub action: reapi::Action,
    pub command_digest: Digest,
    pub command: reapi::Command,
    pub input_root: InputTree,
    pub paths: CommandPaths,
}

/// Fetches the Action `action_digest`, its Command and its input root, and validates them
/// all (digests, the Command's arguments and environment, the input root, the working
/// directory and output paths). Nothing is written: [`InputTree::materialize`] does that.
pub async fn fetch_action(
    cas: &CasClient,
    action_digest: &Digest,
    limits: &ActionLimits,
) -> Result<FetchedAction> {
    let action: reapi::Action = cas
        .read_message(action_digest, limits.max_message_bytes, "action")
        .await?;
    let command_digest = Digest::from_field(action.command_digest.as_ref(), "command_digest")?;
    let input_root_digest =
        Digest::from_field(action.input_root_digest.as_ref(), "input_root_digest")?;
    let command: reapi::Command = cas
        .read_message(&command_digest, limits.max_message_bytes, "command")
        .await?;
    validate_command_text(&command)?;
    let input_root = fetch_input_tree(cas, &input_root_digest, limits).await?;
    let paths = validate_command_paths(&command, &input_root, limits)?;
    Ok(FetchedAction {
        action_digest: action_digest.clone(),
        action,
        command_digest,
        command,
        input_root,
        paths,
    })
}

/// What execve needs of a Command: arguments (at least one) and an environment without
/// NUL, variable names without `=`, each name once.
pub fn validate_command_text(command: &reapi::Command) -> Result<()> {
    if command.arguments.is_empty() || command.arguments[0].is_empty() {
        return Err(RunnerError::invalid("command", "no program to run"));
    }
    if command.arguments.iter().any(|a| a.contains('\0')) {
        return Err(RunnerError::invalid("command", "an argument with NUL"));
    }
    let mut names = HashSet::new();
    for variable in &command.environment_variables {
        let name = &variable.name;
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(RunnerError::invalid(
                "command",
                format!("a bad environment variable name {name:?}"),
            ));
        }
        if variable.value.contains('\0') {
            return Err(RunnerError::invalid(
                "command",
                format!("environment variable {name} has NUL"),
            ));
        }
        if !names.insert(name.as_str()) {
            return Err(RunnerError::invalid(
                "command",
                format!("environment variable {name} is set twice"),
            ));
        }
    }
    Ok(())
}
