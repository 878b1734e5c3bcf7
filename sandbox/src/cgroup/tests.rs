#![allow(clippy::unwrap_used)]
use super::*;

fn mount(point: &str, fstype: &str, opts: &str) -> MountEntry {
    MountEntry {
        root: "/".into(),
        mount_point: point.into(),
        fstype: fstype.into(),
        mount_options: vec!["rw".into(), "relatime".into()],
        super_options: opts.split(',').map(String::from).collect(),
    }
}

#[test]
fn stale_cgroup_names_give_their_supervisor() {
    assert_eq!(supervisor_pid_of("step-1234-0-99"), Some(1234));
    assert_eq!(supervisor_pid_of("probe-77-3-5"), Some(77));
    for other in [
        "step-0-0-1",
        "step-x-0-1",
        "step-12-0",
        "kiln",
        "step-1-2-3-4",
        "a-1-2-3",
    ] {
        assert_eq!(supervisor_pid_of(other), None, "{other}");
    }
}

#[test]
fn favordynmods_remount_keeps_every_other_option() {
    use nix::mount::MsFlags;
    let mut m = mount(
        "/sys/fs/cgroup",
        "cgroup2",
        "rw,nsdelegate,memory_recursiveprot",
    );
    m.mount_options = ["rw", "nosuid", "nodev", "noexec", "relatime"]
        .map(String::from)
        .to_vec();
    let (flags, data) = favordynmods_remount(&m).unwrap();
    assert_eq!(data, "nsdelegate,memory_recursiveprot,favordynmods");
    assert_eq!(
        flags,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC
            | MsFlags::MS_RELATIME
    );
    let on = mount("/sys/fs/cgroup", "cgroup2", "rw,favordynmods");
    assert!(favordynmods_remount(&on).is_none());
}

fn own(lines: &[(&str, &str)]) -> Vec<(Vec<String>, String)> {
    lines
        .iter()
        .map(|(c, p)| {
            (
                c.split(',')
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect(),
                p.to_string(),
            )
        })
        .collect()
}

#[test]
fn hybrid_host_uses_v1_below_its_own_cgroup() {
    let mounts = vec![
        mount("/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
        mount("/sys/fs/cgroup/pids", "cgroup", "rw,pids"),
        mount("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
        mount("/sys/fs/cgroup/unified", "cgroup2", "rw"),
    ];
    let own = own(&[
        ("memory", "/svc"),
        ("pids", "/"),
        ("cpu,cpuacct", "/"),
        ("", "/"),
    ]);
    let layout = detect_from(&mounts, &own, |_| String::new()).unwrap();
    assert_eq!(layout.mode, Mode::V1);
    let dirs: Vec<_> = layout
        .controllers
        .iter()
        .map(|(c, p, _)| (*c, p.clone()))
        .collect();
    assert_eq!(
        dirs,
        vec![
            ("memory", PathBuf::from("/sys/fs/cgroup/memory/svc/kiln")),
            ("pids", PathBuf::from("/sys/fs/cgroup/pids/kiln")),
            ("cpu", PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/kiln")),
            ("cpuacct", PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/kiln")),
        ]
    );
}

#[test]
fn unified_host_with_controllers_uses_v2() {
    let mounts = vec![mount("/sys/fs/cgroup", "cgroup2", "rw")];
    let layout = detect_from(&mounts, &own(&[("", "/system.slice/kiln.service")]), |_| {
        "cpuset cpu io memory pids".into()
    })
    .unwrap();
    assert_eq!(layout.mode, Mode::V2);
    assert!(layout
        .controllers
        .iter()
        .all(|(_, p, _)| p == Path::new("/sys/fs/cgroup/kiln")));
}

#[test]
fn a_missing_controller_is_named() {
    let mounts = vec![
        mount("/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
        mount("/sys/fs/cgroup/cpu", "cgroup", "rw,cpu"),
        mount("/sys/fs/cgroup/unified", "cgroup2", "rw"),
    ];
    let own = own(&[("memory", "/"), ("cpu", "/"), ("", "/")]);
    let (controller, reason) = detect_from(&mounts, &own, |_| "memory".into()).unwrap_err();
    assert_eq!(controller, "pids");
    assert!(
        reason.contains("not mounted") && reason.contains("does not offer it"),
        "{reason}"
    );
}

#[test]
fn dir_of_strips_the_mount_root() {
    let m = MountEntry {
        root: "/".into(),
        mount_point: "/sys/fs/cgroup/memory".into(),
        fstype: "cgroup".into(),
        mount_options: vec!["rw".into()],
        super_options: vec!["rw".into(), "memory".into()],
    };
    assert_eq!(dir_of(&m, "/"), PathBuf::from("/sys/fs/cgroup/memory"));
    assert_eq!(
        dir_of(&m, "/a/b"),
        PathBuf::from("/sys/fs/cgroup/memory/a/b")
    );
    let m = MountEntry {
        root: "/a".into(),
        ..m
    };
    assert_eq!(dir_of(&m, "/a/b"), PathBuf::from("/sys/fs/cgroup/memory/b"));
}

#[test]
fn on_a_host_nothing_moves() {
    // The real root (no cgroup.type) and a daemon below the root: no move.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let layout = Layout {
        mode: Mode::V2,
        controllers: vec![("memory", root.join(PARENT), root.to_path_buf())],
    };
    assert_eq!(leave_namespace_root(&layout).unwrap(), None);
    fs::write(root.join("cgroup.type"), "domain\n").unwrap();
    let below = Layout {
        mode: Mode::V2,
        controllers: vec![("memory", root.join(PARENT), root.join("system.slice"))],
    };
    assert_eq!(leave_namespace_root(&below).unwrap(), None);
    let v1 = Layout {
        mode: Mode::V1,
        controllers: vec![("memory", root.join(PARENT), root.to_path_buf())],
    };
    assert_eq!(leave_namespace_root(&v1).unwrap(), None);
    assert!(!root.join(DAEMON_LEAF).exists());
}

/// Set in the child [`a_daemon_at_a_pod_namespace_root_moves_out_and_delegates`] starts:
/// the controllers it may use, space-separated.
const POD_CHILD: &str = "KILN_TEST_POD_CGROUP_CONTROLLERS";
/// Controllers by name, for a [`Layout`] of the ones a host offers.
const KNOWN: [&str; 8] = [
    "memory", "pids", "cpu", "io", "cpuset", "hugetlb", "rdma", "misc",
];

/// The cgroup2 mount of the host and the domain controllers a cgroup made below its root
/// can use: Kiln's three where the root delegates them (a unified host), else the first
/// the root offers (a hybrid host, where v1 holds the others; the rule is the same for
/// every domain controller). Enables that one for the root's children if it is not, and
/// says so, to undo it.
fn pod_controllers(root: &Path) -> Option<(Vec<&'static str>, bool)> {
    let read = |f: &str| fs::read_to_string(root.join(f)).unwrap_or_default();
    let delegated = read("cgroup.subtree_control");
    let delegated: Vec<&str> = delegated.split_whitespace().collect();
    if V2_CONTROLLERS.iter().all(|c| delegated.contains(c)) {
        return Some((V2_CONTROLLERS.to_vec(), false));
    }
    let offered = read("cgroup.controllers");
    let pick = KNOWN
        .into_iter()
        .find(|c| c != &"cpu" && c != &"pids" && offered.split_whitespace().any(|o| o == *c))?;
    if delegated.contains(&pick) {
        return Some((vec![pick], false));
    }
    fs::write(root.join("cgroup.subtree_control"), format!("+{pick}")).ok()?;
    Some((vec![pick], true))
}

/// A pod for real: a cgroup below the host's root, a process moved into it, then a new
/// cgroup namespace (rooted there) and mount namespace with cgroup2 mounted at
/// /sys/fs/cgroup, as a container runtime makes them; the process is this test binary
/// again, running [`pod_namespace_child`].
#[test]
fn a_daemon_at_a_pod_namespace_root_moves_out_and_delegates() {
    if !nix::unistd::geteuid().is_root() {
        // In CI a missing privilege is a failure, never a silent pass.
        assert!(
            std::env::var_os("CI").is_none_or(|v| v != "true"),
            "needs root to make cgroups and namespaces (CI=true)"
        );
        eprintln!("SKIPPED: needs root to make cgroups and namespaces");
        return;
    }
    let all = mounts().unwrap();
    let Some(host) = all.iter().find(|m| m.fstype == "cgroup2" && m.root == "/") else {
        eprintln!("SKIPPED: no cgroup2 hierarchy");
        return;
    };
    let root = host.mount_point.clone();
    let Some((controllers, enabled)) = pod_controllers(&root) else {
        eprintln!("SKIPPED: the cgroup2 hierarchy offers no domain controller to delegate");
        return;
    };
    let pod = root.join(format!("kiln-pod-test-{}", std::process::id()));
    fs::create_dir(&pod).unwrap();
    let script = r#"echo $$ > "$1/cgroup.procs" && shift && exec unshare --cgroup --mount --propagation private sh -c 'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"' sh "$@""#;
    let out = std::process::Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(&pod)
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cgroup::tests::pod_namespace_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(POD_CHILD, controllers.join(" "))
        .output()
        .unwrap();
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{said}");
    // The child is gone: its cgroups are empty.
    for leftover in [pod.join(PARENT), pod.join(DAEMON_LEAF), pod.clone()] {
        let _ = rmdir(&leftover);
    }
    if enabled {
        let _ = fs::write(
            root.join("cgroup.subtree_control"),
            format!("-{}", controllers[0]),
        );
    }
    assert!(out.status.success(), "{said}");
    assert!(said.contains("1 passed"), "the child did not run: {said}");
    assert!(said.contains("pod child: done"), "{said}");
    assert!(!pod.exists());
}

/// The pod's side of [`a_daemon_at_a_pod_namespace_root_moves_out_and_delegates`]; runs
/// only there (it is started with `--ignored`).
#[test]
#[ignore = "run by a_daemon_at_a_pod_namespace_root_moves_out_and_delegates, in a pod's namespaces"]
fn pod_namespace_child() {
    let Ok(names) = std::env::var(POD_CHILD) else {
        panic!(
            "started outside its pod: run a_daemon_at_a_pod_namespace_root_moves_out_and_delegates"
        );
    };
    let controllers: Vec<&'static str> = names
        .split_whitespace()
        .map(|n| KNOWN.into_iter().find(|k| *k == n).unwrap())
        .collect();
    let root = PathBuf::from("/sys/fs/cgroup");
    // The unified hierarchy's line (a hybrid host lists its v1 hierarchies too).
    let unified = |text: String| {
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_string()
    };
    let own = || unified(fs::read_to_string("/proc/self/cgroup").unwrap());
    // At the root of its own namespace, which is not the real root.
    assert_eq!(own(), "/");
    assert!(root.join("cgroup.type").exists());
    let layout = |own_dir: &Path| Layout {
        mode: Mode::V2,
        controllers: controllers
            .iter()
            .map(|c| (*c, root.join(PARENT), own_dir.to_path_buf()))
            .collect(),
    };
    // What the daemon did before: enabling controllers in a root that holds it fails.
    let (_, before) = prepare_parents(&layout(&root)).unwrap_err();
    assert!(
        before.contains("cgroup.subtree_control") && before.contains("busy"),
        "{before}"
    );
    // The move: every thread of this (multi-threaded) process goes, the root empties.
    let leaf = leave_namespace_root(&layout(&root)).unwrap();
    assert_eq!(leaf, Some(root.join(DAEMON_LEAF)));
    assert_eq!(own(), format!("/{DAEMON_LEAF}"));
    assert_eq!(fs::read_to_string(root.join("cgroup.procs")).unwrap(), "");
    for task in fs::read_dir("/proc/self/task").unwrap().flatten() {
        let cgroup = unified(fs::read_to_string(task.path().join("cgroup")).unwrap());
        assert_eq!(cgroup, format!("/{DAEMON_LEAF}"));
    }
    // Now the root delegates to kiln/, and kiln/ to each step.
    let moved = layout(&root.join(DAEMON_LEAF));
    assert_eq!(
        leave_namespace_root(&moved).unwrap(),
        None,
        "once is enough"
    );
    prepare_parents(&moved).unwrap();
    let step_dir = root.join(PARENT).join(unique_name("step"));
    fs::create_dir(&step_dir).unwrap();
    let offered = fs::read_to_string(step_dir.join("cgroup.controllers")).unwrap();
    for c in &controllers {
        assert!(
            offered.split_whitespace().any(|o| o == *c),
            "{c}: {offered}"
        );
    }
    fs::remove_dir(&step_dir).unwrap();
    if controllers == V2_CONTROLLERS {
        // A unified host: a step cgroup with memory and pids limits, joined and left as
        // the supervisor does, a process running in it.
        let limits = Limits {
            memory_bytes: 64 << 20,
            pids: 16,
            ..Limits::default()
        };
        let mut step = StepCgroup::create_in(&moved, &unique_name("step"), &limits).unwrap();
        let dir = step.dir("memory").unwrap().to_path_buf();
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap().trim(),
            (64u64 << 20).to_string()
        );
        step.join().unwrap();
        let child = std::process::Command::new("true").status().unwrap();
        assert!(child.success());
        step.leave().unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("pids.max")).unwrap().trim(),
            "16"
        );
        drop(step);
        assert!(!dir.exists());
        println!("pod child: a step cgroup with memory and pids limits ran a process");
    } else {
        println!("pod child: this host's cgroup2 offers {names} only, no step limits set");
    }
    let _ = fs::remove_dir(root.join(PARENT));
    println!("pod child: done");
}
