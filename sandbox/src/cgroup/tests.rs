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
