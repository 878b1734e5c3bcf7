//! The sandbox profile: every layer a step runs under, as the JSON whose digest each
//! link records.

use serde_json::{json, Value};

use crate::spec::{RootEntry, StepSpec};
use crate::{child, landlock_rules, seccomp, HostSupport, NAMESPACES};

/// A canonical JSON description of the isolation applied to a step with this spec
/// (namespaces, mounts, seccomp policy, Landlock ABI and rules, ids, timeout), to be hashed
/// into the profile digest recorded in provenance. Object keys are sorted (serde_json's
/// default map). The host path of the workspace is left out: it differs per job while the
/// isolation does not.
pub fn profile(spec: &StepSpec, host: &HostSupport) -> Value {
    let ro = ["ro", "nosuid", "nodev"];
    let root: Vec<Value> = spec
        .root
        .iter()
        .map(|e| match e {
            RootEntry::Bind { source, target } => json!({"bind": {
                "source": source, "target": target, "recursive": true, "flags": ro}}),
            RootEntry::Symlink { path, points_to } => {
                json!({"symlink": {"path": path, "points_to": points_to}})
            }
            RootEntry::Dir { path } => json!({"dir": {"path": path}}),
        })
        .collect();
    json!({
        "profile_version": 2,
        "namespaces": NAMESPACES.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "ids": {
            "uid_map": [0, spec.host_uid_base, spec.id_range],
            "gid_map": [0, spec.host_uid_base, spec.id_range],
            "setgroups": "deny",
            "supplementary_groups": [],
            "init_uid": 0,
            "step_uid": spec.step_uid,
            "step_gid": spec.step_uid,
        },
        "filesystem": {
            "root": {"fs": "tmpfs", "flags": ro, "pivot_root": true, "old_root": "detached"},
            "entries": root,
            "workspace": {"target": "/workspace", "flags": ["rw", "nosuid", "nodev"], "cwd": true},
            "proc": {
                "target": "/proc", "fresh": true, "pid_namespace": "the step's own",
                "flags": ["nosuid", "nodev", "noexec"],
                "read_only": {"paths": child::PROC_READ_ONLY, "flags": ["ro", "nosuid", "nodev", "noexec"]},
                "masked": {
                    "paths": child::PROC_MASKED,
                    "files": "bind of /dev/null", "directories": "empty tmpfs, ro",
                    "absent_entries": "skipped",
                },
            },
            "sys": "absent",
            "dev": {
                "fs": "tmpfs", "flags": ["ro", "nosuid", "noexec"],
                "host_nodes": child::DEV_NODES,
                "host_node_flags": ["nosuid", "noexec"],
                "symlinks": {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
                             "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"},
                "pts": {"fs": "devpts", "options": "newinstance,ptmxmode=0666,mode=0620", "flags": ["nosuid", "noexec"]},
                "shm": {"fs": "tmpfs", "flags": ["nosuid", "nodev"], "mode": "1777", "size_bytes": spec.tmp_size_bytes},
            },
            "tmp": {"fs": "tmpfs", "flags": ["nosuid", "nodev"], "mode": "1777", "size_bytes": spec.tmp_size_bytes},
        },
        "hostname": spec.hostname,
        "capabilities": {"bounding": [], "permitted": [], "effective": [], "inheritable": [], "ambient": []},
        "no_new_privs": true,
        "landlock": landlock_rules::describe(
            host.landlock_abi,
            &spec.tcp_connect_ports,
            spec.waived_layers.iter().any(|l| l == "landlock"),
        ),
        "network": {
            "namespace": "new, made ahead by the supervisor with a user namespace of its own (neither the host's nor the step's): the step holds no capability in it; no interface but loopback, no route",
            "loopback": if spec.egress_proxy_port.is_some() { "up" } else { "down" },
            "egress_proxy": spec.egress_proxy_port.map(|port| format!("127.0.0.1:{port}")),
            "tcp_connect_ports": spec.tcp_connect_ports,
        },
        "waived_layers": spec.waived_layers,
        "seccomp": seccomp::describe(&host.seccomp_policy_sha256),
        "rlimits": {"core": 0, "nofile": spec.limits.nofile, "fsize": spec.limits.fsize_bytes},
        "cgroup": {
            "mode": host.cgroup.mode,
            "controllers": host.cgroup.controllers,
            "namespace": "rooted at the step's own cgroup",
            "memory_bytes": spec.limits.memory_bytes,
            "swap": "none",
            "pids": spec.limits.pids,
            "cpu_millis": spec.limits.cpu_millis,
            "cpu_period_us": 100_000,
        },
        "umask": "0022",
        "signals": "default dispositions, none blocked",
        "parent_death_signal": "SIGKILL",
        "init": {"pid": 1, "dumpable": false, "kills_namespace_on_step_exit": true,
                 "session": "new, no controlling terminal"},
        "timeout_ms": spec.timeout_ms,
    })
}
