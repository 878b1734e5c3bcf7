//! Per-step cgroups: memory, pids and CPU limits, and the usage read back after the step.
//!
//! cgroup v2 is used when the unified hierarchy offers the memory, pids and cpu controllers;
//! otherwise (a hybrid host) the v1 controllers memory, pids, cpu and cpuacct. A controller
//! that is neither is an error naming it: limits are never silently skipped.
//!
//! Layout: v1 nests `kiln/<step>` below the supervisor's own cgroup in each hierarchy, so
//! whatever limits the operator set on the daemon's service still bound every step. v2
//! forbids enabling controllers below a cgroup that holds processes (the daemon's), so
//! there the parent is `kiln/` at the root of the unified hierarchy (like Docker's cgroupfs
//! driver).
//!
//! In a container with a cgroup namespace of its own (a Kubernetes pod), the root of the
//! unified hierarchy as the daemon sees it is the container's cgroup, which is not the
//! real root and holds the daemon itself: there the rule applies to `kiln/`'s parent too,
//! so the daemon first moves the processes of that root into the leaf `kiln-daemon/` (as
//! Docker-in-Docker's entrypoint does), once, when it probes the host. On a host nothing
//! moves.
//!
//! The supervisor (host root, single-threaded) creates the step cgroup, sets the limits,
//! writes its own pid into it just before the clone (so the cgroup namespace is rooted there
//! and pid 1 is born inside), and moves itself back out right after the clone, before pid 1
//! is released. `pids.max` is therefore the step's limit + 1 during that window (the
//! supervisor counts once) and exactly the step's limit afterwards.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::failure::{fail, Failure};
use crate::{Limits, ResourceUsage};

/// CFS period for the CPU quota: 100 ms, the kernel's default.
const CPU_PERIOD_US: u64 = 100_000;
/// The v1 controllers Kiln needs, in the order they are set up.
const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// Name of the parent cgroup of every step.
const PARENT: &str = "kiln";
/// The leaf the daemon's processes move to out of the root of a cgroup namespace.
pub const DAEMON_LEAF: &str = "kiln-daemon";
/// Rounds of moving a namespace root's processes (those forked meanwhile come next round).
const MOVE_ROUNDS: usize = 16;

/// Which cgroup interface the host offers, as reported by [`crate::Sandbox::probe`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct CgroupSupport {
    /// "v2" or "v1".
    pub mode: String,
    /// Controllers Kiln sets up for every step.
    pub controllers: Vec<String>,
    /// The parent cgroup directories steps are created in (one per v1 hierarchy).
    pub parents: Vec<PathBuf>,
    /// The leaf the daemon moved its processes to, out of the root of its cgroup
    /// namespace (a container's); none on a host.
    pub moved_to: Option<PathBuf>,
}

impl CgroupSupport {
    /// Removes the empty step cgroups of supervisors that no longer exist (killed before
    /// they could clean up: SIGKILL, a host crash leaves none). A cgroup is named after its
    /// supervisor's pid, and one whose supervisor is alive is never touched, so daemons
    /// sharing the parent do not disturb each other; a populated one cannot be removed
    /// (EBUSY) and stays. Returns how many directories were removed.
    pub fn remove_stale(&self) -> usize {
        let mut removed = 0;
        for parent in &self.parents {
            let Ok(entries) = fs::read_dir(parent) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(supervisor_pid_of) else {
                    continue;
                };
                let gone = matches!(
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                    Err(nix::errno::Errno::ESRCH)
                );
                // No retry on EBUSY: a populated leftover stays, and start-up is not delayed.
                if gone && fs::remove_dir(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// The supervisor pid in a cgroup name made by [`unique_name`] (`step-PID-N-NANOS`).
fn supervisor_pid_of(name: &str) -> Option<i32> {
    let rest = name
        .strip_prefix("step-")
        .or_else(|| name.strip_prefix("probe-"))?;
    let mut parts = rest.split('-');
    let pid = parts.next()?.parse::<i32>().ok().filter(|p| *p > 0)?;
    let all_numeric = parts.clone().count() == 2 && parts.all(|p| p.parse::<u64>().is_ok());
    all_numeric.then_some(pid)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    V1,
    V2,
}

/// The cgroup layout a step's cgroup is created in ([`StepCgroup::locate`]).
pub(crate) struct Placement(Layout);

/// Where each controller lives on this host.
#[derive(Debug, Clone)]
struct Layout {
    mode: Mode,
    /// (controller, parent directory `.../kiln`, the supervisor's own cgroup directory)
    controllers: Vec<(&'static str, PathBuf, PathBuf)>,
}

struct MountEntry {
    /// The cgroup path the mount exposes (normally "/").
    root: String,
    mount_point: PathBuf,
    fstype: String,
    /// Per-mount options (nosuid, relatime, ...).
    mount_options: Vec<String>,
    super_options: Vec<String>,
}

fn mounts() -> Result<Vec<MountEntry>, String> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 3 {
            continue;
        }
        out.push(MountEntry {
            root: unescape(l[3]),
            mount_point: PathBuf::from(unescape(l[4])),
            fstype: r[0].to_string(),
            mount_options: l[5].split(',').map(String::from).collect(),
            super_options: r[2].split(',').map(String::from).collect(),
        });
    }
    Ok(out)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The supervisor's own cgroup path per hierarchy: (v1 controllers of the line, path).
fn own_cgroups() -> Result<Vec<(Vec<String>, String)>, String> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            let ctrls = ctrls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect();
            Some((ctrls, path.to_string()))
        })
        .collect())
}

/// The directory of cgroup `path` in a hierarchy mounted at `m`.
fn dir_of(m: &MountEntry, path: &str) -> PathBuf {
    let rel = path
        .strip_prefix(m.root.trim_end_matches('/'))
        .unwrap_or(path)
        .trim_start_matches('/');
    if rel.is_empty() {
        m.mount_point.clone()
    } else {
        m.mount_point.join(rel)
    }
}

/// Finds the interface and directories; the error names the missing controller.
fn detect() -> Result<Layout, (String, String)> {
    let general = |e: String| ("cgroup".to_string(), e);
    let mounts = mounts().map_err(general)?;
    let own = own_cgroups().map_err(general)?;
    detect_from(&mounts, &own, |p| fs::read_to_string(p).unwrap_or_default())
}

/// [`detect`] over given mounts and own cgroups; `read` reads a cgroup file.
fn detect_from(
    mounts: &[MountEntry],
    own: &[(Vec<String>, String)],
    read: impl Fn(&Path) -> String,
) -> Result<Layout, (String, String)> {
    let v2 = mounts.iter().find(|m| m.fstype == "cgroup2");
    if let Some(m) = v2 {
        let offered = read(&m.mount_point.join("cgroup.controllers"));
        let offered: Vec<&str> = offered.split_whitespace().collect();
        if V2_CONTROLLERS.iter().all(|c| offered.contains(c)) {
            let root = dir_of(m, "/");
            let own_path = own
                .iter()
                .find(|(c, _)| c.is_empty())
                .map(|(_, p)| p.as_str())
                .unwrap_or("/");
            let own_dir = dir_of(m, own_path);
            return Ok(Layout {
                mode: Mode::V2,
                controllers: V2_CONTROLLERS
                    .iter()
                    .map(|c| (*c, root.join(PARENT), own_dir.clone()))
                    .collect(),
            });
        }
    }

    let mut controllers = Vec::new();
    for c in V1_CONTROLLERS {
        let Some(m) = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == c))
        else {
            let v2_note = match v2 {
                Some(m) => format!(
                    "and the cgroup2 hierarchy at {} does not offer it",
                    m.mount_point.display()
                ),
                None => "and there is no cgroup2 hierarchy".to_string(),
            };
            return Err((
                c.to_string(),
                format!("the cgroup v1 controller {c} is not mounted {v2_note}"),
            ));
        };
        let own_path = own
            .iter()
            .find(|(ctrls, _)| ctrls.iter().any(|x| x == c))
            .map(|(_, p)| p.as_str())
            .ok_or_else(|| {
                (
                    c.to_string(),
                    format!("/proc/self/cgroup has no line for the {c} controller"),
                )
            })?;
        let own_dir = dir_of(m, own_path);
        controllers.push((c, own_dir.join(PARENT), own_dir));
    }
    Ok(Layout {
        mode: Mode::V1,
        controllers,
    })
}

fn write(controller: &str, dir: &Path, file: &str, value: &str) -> Result<(), (String, String)> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(|e| {
        (
            controller.to_string(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

fn mkdir(controller: &str, dir: &Path) -> Result<(), (String, String)> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err((
            controller.to_string(),
            format!("creating {}: {e}", dir.display()),
        )),
    }
}

/// Removes an empty cgroup; tasks that just died may still be leaving it, so EBUSY is
/// retried for a moment.
fn rmdir(dir: &Path) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 200 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `<prefix>-<pid>-<n>-<ns>`: unique among live supervisors (pid), among probes of one
/// process (counter), and against leftovers of a crashed one (clock).
fn unique_name(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos}", std::process::id())
}

/// The parent directories, created (and for v2 with the controllers delegated to them).
fn prepare_parents(layout: &Layout) -> Result<(), (String, String)> {
    let mut done: Vec<&Path> = Vec::new();
    for (c, parent, _) in &layout.controllers {
        if done.contains(&parent.as_path()) {
            continue;
        }
        if layout.mode == Mode::V2 {
            let root = parent.parent().unwrap_or(parent);
            let enable = layout
                .controllers
                .iter()
                .map(|(c, _, _)| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(" ");
            write(c, root, "cgroup.subtree_control", &enable)?;
            mkdir(c, parent)?;
            write(c, parent, "cgroup.subtree_control", &enable)?;
        } else {
            mkdir(c, parent)?;
        }
        done.push(parent);
    }
    Ok(())
}

/// In v2, when the daemon's cgroup is the root of the hierarchy as it sees it and that
/// root is not the real one (which alone may hold processes and enable controllers for its
/// children: it has no `cgroup.type`), that is, in a container with a cgroup namespace of
/// its own: moves every process of that root (the daemon first; the container's init, and
/// anything else of the container, too) into the leaf [`DAEMON_LEAF`], so that the root
/// may enable controllers for `kiln/`. Returns the leaf when it moved them.
fn leave_namespace_root(layout: &Layout) -> Result<Option<PathBuf>, (String, String)> {
    if layout.mode != Mode::V2 {
        return Ok(None);
    }
    let Some((_, parent, own)) = layout.controllers.first() else {
        return Ok(None);
    };
    let root = parent.parent().unwrap_or(parent);
    if own != root || !root.join("cgroup.type").exists() {
        return Ok(None);
    }
    let leaf = root.join(DAEMON_LEAF);
    mkdir("cgroup", &leaf)?;
    move_processes(root, &leaf)?;
    Ok(Some(leaf))
}

/// Moves every process of cgroup `from` into `to` (each with all its threads).
fn move_processes(from: &Path, to: &Path) -> Result<(), (String, String)> {
    let failed = |why: String| {
        (
            "cgroup".to_string(),
            format!(
                "the daemon is at the root of its cgroup namespace ({}), whose processes must                  move to {} before it can enable controllers for the steps' cgroups: {why}",
                from.display(),
                to.display()
            ),
        )
    };
    let move_one = |pid: &str| match fs::write(to.join("cgroup.procs"), pid) {
        Ok(()) => Ok(()),
        // Exited meanwhile.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        Err(e) => Err(failed(format!("moving process {pid}: {e}"))),
    };
    move_one(&std::process::id().to_string())?;
    for _ in 0..MOVE_ROUNDS {
        let procs = fs::read_to_string(from.join("cgroup.procs"))
            .map_err(|e| failed(format!("reading its cgroup.procs: {e}")))?;
        let pids: Vec<&str> = procs.split_whitespace().collect();
        if pids.is_empty() {
            return Ok(());
        }
        // 0: a process of another pid namespace, which cannot be named here.
        if pids.iter().all(|p| *p == "0") {
            return Err(failed(format!(
                "{} of them are outside this pid namespace",
                pids.len()
            )));
        }
        for pid in pids.into_iter().filter(|p| *p != "0") {
            move_one(pid)?;
        }
    }
    Err(failed(format!(
        "processes were still forked into it after {MOVE_ROUNDS} rounds"
    )))
}

/// What [`favor_dynamic_migrations`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Favordynmods {
    /// Already on (by the host's own mount options or an earlier daemon).
    AlreadyOn,
    /// Turned on by remounting this cgroup2 mount point.
    Enabled(PathBuf),
    /// The host has no cgroup2 mount to set it on.
    NoCgroup2,
}

/// Every step moves its supervisor into and out of cgroups. Such a move takes the kernel's
/// cgroup_threadgroup_rwsem for writing, which by default waits for an RCU grace period
/// once the lock has been idle for a few ms: 7-17 ms per step on an otherwise idle host,
/// more than the rest of the sandbox set-up. The cgroup2 mount option `favordynmods` (Linux
/// 6.0+; it acts on the lock shared by every hierarchy, v1 included) keeps the lock in the
/// mode where a move is cheap, at a small cost to fork and exit. It is a host-wide setting:
/// the daemon turns it on only when the operator's config asks (the default), keeping every
/// other option of the mount, and the daemon's log says so.
pub fn favor_dynamic_migrations() -> Result<Favordynmods, String> {
    let all = mounts()?;
    let Some(m) = all.iter().find(|m| m.fstype == "cgroup2") else {
        return Ok(Favordynmods::NoCgroup2);
    };
    let Some((flags, data)) = favordynmods_remount(m) else {
        return Ok(Favordynmods::AlreadyOn);
    };
    nix::mount::mount(
        None::<&str>,
        &m.mount_point,
        None::<&str>,
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| format!("remounting {} with {data}: {e}", m.mount_point.display()))?;
    Ok(Favordynmods::Enabled(m.mount_point.clone()))
}

/// The remount that adds `favordynmods` and changes nothing else, or None when it is on.
fn favordynmods_remount(m: &MountEntry) -> Option<(nix::mount::MsFlags, String)> {
    use nix::mount::MsFlags;
    if m.super_options.iter().any(|o| o == "favordynmods") {
        return None;
    }
    // A remount re-parses the superblock options from scratch (leaving one out would clear
    // nsdelegate, memory_recursiveprot, ...) and replaces the per-mount flags: keep both.
    let mut options: Vec<&str> = m
        .super_options
        .iter()
        .map(String::as_str)
        .filter(|o| *o != "rw" && *o != "ro")
        .collect();
    options.push("favordynmods");
    let mut flags = MsFlags::MS_REMOUNT;
    for option in &m.mount_options {
        flags |= match option.as_str() {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            _ => MsFlags::empty(),
        };
    }
    Some((flags, options.join(",")))
}

/// Checks the limits can really be set: creates a throw-away step cgroup, sets every limit,
/// removes it.
///
/// In a container whose cgroup namespace's root holds the daemon, first moves the daemon
/// out of it (see [`leave_namespace_root`]); every supervisor it starts later is born in
/// the leaf.
pub(crate) fn probe() -> Result<CgroupSupport, (String, String)> {
    let layout = detect()?;
    let moved_to = leave_namespace_root(&layout)?;
    let layout = match moved_to {
        Some(_) => detect()?,
        None => layout,
    };
    let limits = Limits::default();
    let step = StepCgroup::create_in(&layout, &unique_name("probe"), &limits)?;
    drop(step);
    let mut parents: Vec<PathBuf> = layout
        .controllers
        .iter()
        .map(|(_, p, _)| p.clone())
        .collect();
    parents.dedup();
    Ok(CgroupSupport {
        mode: match layout.mode {
            Mode::V1 => "v1",
            Mode::V2 => "v2",
        }
        .to_string(),
        controllers: layout
            .controllers
            .iter()
            .map(|(c, _, _)| c.to_string())
            .collect(),
        parents,
        moved_to,
    })
}

/// The step's cgroup (one directory per v1 hierarchy, one for v2). Dropping it moves the
/// supervisor out if needed and removes the directories.
pub(crate) struct StepCgroup {
    mode: Mode,
    /// (controller, step directory, the supervisor's original cgroup directory)
    dirs: Vec<(&'static str, PathBuf, PathBuf)>,
    pids: u32,
    joined: bool,
}

fn to_failure((controller, message): (String, String)) -> Failure {
    fail("cgroup", format!("{controller}: {message}"))
}

impl StepCgroup {
    /// Creates the step cgroup with every limit set; the error names the controller.
    /// Where the step's cgroup goes, read before the spec arrives (a standby supervisor
    /// does it while it waits).
    pub(crate) fn locate() -> Result<Placement, Failure> {
        detect().map(Placement).map_err(to_failure)
    }

    pub(crate) fn create(placement: &Placement, limits: &Limits) -> Result<Self, Failure> {
        Self::create_in(&placement.0, &unique_name("step"), limits).map_err(to_failure)
    }

    fn create_in(layout: &Layout, name: &str, limits: &Limits) -> Result<Self, (String, String)> {
        prepare_parents(layout)?;
        let mut cg = StepCgroup {
            mode: layout.mode,
            dirs: Vec::new(),
            pids: limits.pids,
            joined: false,
        };
        for (c, parent, own) in &layout.controllers {
            let dir = parent.join(name);
            // Co-mounted v1 controllers (e.g. "cpu,cpuacct") and v2 share one directory.
            if !cg.dirs.iter().any(|(_, d, _)| *d == dir) {
                // Strict: an existing directory would be another step's. On error, Drop
                // removes only the directories created so far.
                fs::create_dir(&dir)
                    .map_err(|e| (c.to_string(), format!("creating {}: {e}", dir.display())))?;
            }
            cg.dirs.push((c, dir, own.clone()));
        }
        cg.set_limits(limits)?;
        Ok(cg)
    }

    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _, _)| *c == controller)
            .map(|(_, d, _)| d.as_path())
    }

    fn set_limits(&self, limits: &Limits) -> Result<(), (String, String)> {
        let need = |c: &str| {
            self.dir(c)
                .ok_or_else(|| (c.to_string(), "controller missing".to_string()))
        };
        let memory = limits.memory_bytes.to_string();
        // +1: the supervisor is in the cgroup while it clones pid 1 (see the module docs).
        let pids_with_supervisor = u64::from(limits.pids).saturating_add(1).to_string();
        let quota = u64::from(limits.cpu_millis).saturating_mul(CPU_PERIOD_US) / 1000;
        match self.mode {
            Mode::V2 => {
                let d = need("memory")?;
                write("memory", d, "memory.max", &memory)?;
                // No swap: the memory limit is the whole budget.
                if d.join("memory.swap.max").exists() {
                    write("memory", d, "memory.swap.max", "0")?;
                }
                write("pids", need("pids")?, "pids.max", &pids_with_supervisor)?;
                write(
                    "cpu",
                    need("cpu")?,
                    "cpu.max",
                    &format!("{quota} {CPU_PERIOD_US}"),
                )?;
            }
            Mode::V1 => {
                let d = need("memory")?;
                // memory first: memsw must never be below it.
                write("memory", d, "memory.limit_in_bytes", &memory)?;
                if d.join("memory.memsw.limit_in_bytes").exists() {
                    write("memory", d, "memory.memsw.limit_in_bytes", &memory)?;
                }
                write("pids", need("pids")?, "pids.max", &pids_with_supervisor)?;
                let d = need("cpu")?;
                write("cpu", d, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                write("cpu", d, "cpu.cfs_quota_us", &quota.to_string())?;
                need("cpuacct")?;
            }
        }
        Ok(())
    }

    fn move_self(&self, to_step: bool) -> Result<(), Failure> {
        let pid = std::process::id().to_string();
        let mut done: Vec<&Path> = Vec::new();
        for (c, step, own) in &self.dirs {
            let target = if to_step { step } else { own };
            if done.contains(&target.as_path()) {
                continue;
            }
            write(c, target, "cgroup.procs", &pid).map_err(to_failure)?;
            done.push(target);
        }
        Ok(())
    }

    /// Puts the supervisor into the step cgroup (setup step 1 in docs/ARCHITECTURE.md,
    /// before the clone).
    pub(crate) fn join(&mut self) -> Result<(), Failure> {
        self.joined = true;
        self.move_self(true)
    }

    /// Moves the supervisor back out (after the clone) and sets pids.max to the step's own
    /// limit now that the supervisor no longer counts.
    pub(crate) fn leave(&mut self) -> Result<(), Failure> {
        self.move_self(false)?;
        self.joined = false;
        if let Some(d) = self.dir("pids") {
            write("pids", d, "pids.max", &self.pids.to_string()).map_err(to_failure)?;
        }
        Ok(())
    }

    /// What the step used; fields that cannot be read stay 0 / false.
    pub(crate) fn usage(&self) -> ResourceUsage {
        let read = |c: &str, file: &str| -> Option<String> {
            fs::read_to_string(self.dir(c)?.join(file)).ok()
        };
        let number = |c: &str, file: &str| -> u64 {
            read(c, file)
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let key = |c: &str, file: &str, key: &str| -> u64 {
            read(c, file)
                .and_then(|s| {
                    s.lines().find_map(|l| {
                        let (k, v) = l.split_once(' ')?;
                        (k == key).then(|| v.trim().parse().ok()).flatten()
                    })
                })
                .unwrap_or(0)
        };
        match self.mode {
            Mode::V2 => ResourceUsage {
                peak_memory_bytes: number("memory", "memory.peak"),
                cpu_time_ms: key("cpu", "cpu.stat", "usage_usec") / 1000,
                oom_killed: key("memory", "memory.events", "oom_kill") > 0,
                pids_limit_hit: key("pids", "pids.events", "max") > 0,
            },
            Mode::V1 => ResourceUsage {
                peak_memory_bytes: number("memory", "memory.max_usage_in_bytes"),
                cpu_time_ms: number("cpuacct", "cpuacct.usage") / 1_000_000,
                oom_killed: key("memory", "memory.oom_control", "oom_kill") > 0,
                pids_limit_hit: key("pids", "pids.events", "max") > 0,
            },
        }
    }
}

impl Drop for StepCgroup {
    fn drop(&mut self) {
        if self.joined {
            let _ = self.move_self(false);
        }
        let mut done: Vec<PathBuf> = Vec::new();
        for (_, dir, _) in &self.dirs {
            if done.contains(dir) {
                continue;
            }
            // Nothing to report to: a leftover empty cgroup is harmless and visible.
            let _ = rmdir(dir);
            done.push(dir.clone());
        }
    }
}

#[cfg(test)]
mod tests;
