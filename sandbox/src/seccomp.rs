//! The seccomp policy of a step, as one reviewable table, and its compilation to BPF.
//!
//! Default action: allow. Every syscall in [`POLICY`] is denied (EPERM) either always or when
//! its arguments match the listed condition. Three checks that seccompiler cannot express are
//! emitted by [`prefix`] in front of the compiled program: the architecture check (foreign ABI
//! → kill), the x32 ABI (syscall numbers with bit 0x40000000 → kill) and clone3 → ENOSYS (so
//! libc falls back to clone(2), whose flags seccomp *can* inspect; clone3 passes them in memory).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use serde_json::{json, Value};

use crate::SandboxError;

/// When a table entry denies its syscall.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Deny {
    /// Always, with EPERM.
    Always,
    /// With EPERM when arg0 has any of the CLONE_NEW* bits set.
    CloneNamespaceFlags,
    /// With EPERM when arg0 (socket domain) is not AF_UNIX, AF_INET or AF_INET6.
    SocketDomainNotUnixOrInet,
    /// With EPERM unless arg0 is PER_LINUX (0) or the query value 0xffffffff.
    PersonalityChange,
    /// With ENOSYS, emitted in the hand-written prefix (see module docs).
    AlwaysEnosys,
}

/// The syscall numbers for the build target. `open_tree_attr` (Linux 6.15) is not in libc yet;
/// its number is the same on every architecture (asm-generic table).
mod nr {
    pub(super) use libc::*;
    pub(super) const SYS_OPEN_TREE_ATTR: libc::c_long = 467;
}

/// The policy table: (name, number, when denied). Names go into the profile.
pub(crate) fn policy() -> Vec<(&'static str, i64, Deny)> {
    use Deny::*;
    // c_long is i64 on every 64-bit target this crate supports.
    let mut table: Vec<(&'static str, i64, Deny)> = vec![
        // mounts and the root: the step must not reshape its filesystem view
        ("mount", nr::SYS_mount, Always),
        ("umount2", nr::SYS_umount2, Always),
        ("pivot_root", nr::SYS_pivot_root, Always),
        ("chroot", nr::SYS_chroot, Always),
        ("fsopen", nr::SYS_fsopen, Always),
        ("fsconfig", nr::SYS_fsconfig, Always),
        ("fsmount", nr::SYS_fsmount, Always),
        ("fspick", nr::SYS_fspick, Always),
        ("move_mount", nr::SYS_move_mount, Always),
        ("open_tree", nr::SYS_open_tree, Always),
        ("open_tree_attr", nr::SYS_OPEN_TREE_ATTR, Always),
        ("mount_setattr", nr::SYS_mount_setattr, Always),
        // namespaces: no nesting, no joining
        ("setns", nr::SYS_setns, Always),
        ("unshare", nr::SYS_unshare, Always),
        ("clone", nr::SYS_clone, CloneNamespaceFlags),
        ("clone3", nr::SYS_clone3, AlwaysEnosys),
        // inspecting or controlling other processes
        ("ptrace", nr::SYS_ptrace, Always),
        ("process_vm_readv", nr::SYS_process_vm_readv, Always),
        ("process_vm_writev", nr::SYS_process_vm_writev, Always),
        ("pidfd_getfd", nr::SYS_pidfd_getfd, Always),
        // large kernel attack surface with no use in a build
        ("bpf", nr::SYS_bpf, Always),
        ("perf_event_open", nr::SYS_perf_event_open, Always),
        ("userfaultfd", nr::SYS_userfaultfd, Always),
        ("io_uring_setup", nr::SYS_io_uring_setup, Always),
        ("io_uring_enter", nr::SYS_io_uring_enter, Always),
        ("io_uring_register", nr::SYS_io_uring_register, Always),
        ("open_by_handle_at", nr::SYS_open_by_handle_at, Always),
        ("name_to_handle_at", nr::SYS_name_to_handle_at, Always),
        ("lookup_dcookie", nr::SYS_lookup_dcookie, Always),
        // kernel keyrings are not namespaced
        ("keyctl", nr::SYS_keyctl, Always),
        ("add_key", nr::SYS_add_key, Always),
        ("request_key", nr::SYS_request_key, Always),
        // kernel and module loading
        ("kexec_load", nr::SYS_kexec_load, Always),
        ("kexec_file_load", nr::SYS_kexec_file_load, Always),
        ("init_module", nr::SYS_init_module, Always),
        ("finit_module", nr::SYS_finit_module, Always),
        ("delete_module", nr::SYS_delete_module, Always),
        // host-global state
        ("acct", nr::SYS_acct, Always),
        ("swapon", nr::SYS_swapon, Always),
        ("swapoff", nr::SYS_swapoff, Always),
        ("reboot", nr::SYS_reboot, Always),
        ("settimeofday", nr::SYS_settimeofday, Always),
        ("clock_settime", nr::SYS_clock_settime, Always),
        ("clock_adjtime", nr::SYS_clock_adjtime, Always),
        ("adjtimex", nr::SYS_adjtimex, Always),
        ("quotactl", nr::SYS_quotactl, Always),
        ("quotactl_fd", nr::SYS_quotactl_fd, Always),
        ("vhangup", nr::SYS_vhangup, Always),
        // execution-domain changes (e.g. READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE)
        ("personality", nr::SYS_personality, PersonalityChange),
        // only ordinary sockets: no AF_PACKET, AF_NETLINK, AF_VSOCK, ...
        ("socket", nr::SYS_socket, SocketDomainNotUnixOrInet),
    ];
    #[cfg(target_arch = "x86_64")]
    table.extend([
        ("iopl", nr::SYS_iopl, Always),
        ("ioperm", nr::SYS_ioperm, Always),
        ("uselib", nr::SYS_uselib, Always),
        ("_sysctl", nr::SYS__sysctl, Always),
        ("nfsservctl", nr::SYS_nfsservctl, Always),
    ]);
    table
}

/// CLONE_NEW* bits as clone(2) takes them (CLONE_NEWTIME shares bits with the exit signal in
/// clone(2) and is only accepted by clone3/unshare, which are denied).
const CLONE_NEW_FLAGS: [(&str, libc::c_int); 7] = [
    ("CLONE_NEWNS", libc::CLONE_NEWNS),
    ("CLONE_NEWCGROUP", libc::CLONE_NEWCGROUP),
    ("CLONE_NEWUTS", libc::CLONE_NEWUTS),
    ("CLONE_NEWIPC", libc::CLONE_NEWIPC),
    ("CLONE_NEWUSER", libc::CLONE_NEWUSER),
    ("CLONE_NEWPID", libc::CLONE_NEWPID),
    ("CLONE_NEWNET", libc::CLONE_NEWNET),
];

const ALLOWED_SOCKET_DOMAINS: [(&str, libc::c_int); 3] = [
    ("AF_UNIX", libc::AF_UNIX),
    ("AF_INET", libc::AF_INET),
    ("AF_INET6", libc::AF_INET6),
];

/// personality(2) values that change nothing: PER_LINUX and the query.
const PERSONALITY_ALLOWED: [u64; 2] = [0, 0xffff_ffff];

#[cfg(target_arch = "x86_64")]
const TARGET: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET: TargetArch = TargetArch::aarch64;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    val: u64,
) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, len, op, val).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conds).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

fn rules_for(deny: Deny) -> Result<Vec<SeccompRule>, SandboxError> {
    use SeccompCmpArgLen::{Dword, Qword};
    Ok(match deny {
        // An empty rule list means "match on the syscall number alone".
        Deny::Always | Deny::AlwaysEnosys => vec![],
        // One rule per flag: rules of a chain are OR-ed.
        Deny::CloneNamespaceFlags => CLONE_NEW_FLAGS
            .iter()
            .map(|&(_, f)| {
                let f = u64::from(f.unsigned_abs());
                rule(vec![cond(0, Qword, SeccompCmpOp::MaskedEq(f), f)?])
            })
            .collect::<Result<_, _>>()?,
        // Conditions of a rule are AND-ed: matches when the domain is none of the allowed.
        Deny::SocketDomainNotUnixOrInet => vec![rule(
            ALLOWED_SOCKET_DOMAINS
                .iter()
                .map(|&(_, d)| cond(0, Dword, SeccompCmpOp::Ne, u64::from(d.unsigned_abs())))
                .collect::<Result<_, _>>()?,
        )?],
        Deny::PersonalityChange => vec![rule(
            PERSONALITY_ALLOWED
                .iter()
                .map(|&v| cond(0, Dword, SeccompCmpOp::Ne, v))
                .collect::<Result<_, _>>()?,
        )?],
    })
}

// Classic BPF opcodes (linux/bpf_common.h) for the hand-written prefix.
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JMP_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
#[cfg(target_arch = "x86_64")]
const BPF_JMP_JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Checks seccompiler cannot express, run before the compiled table. All jumps are relative
/// and stay inside the prefix, so prepending it leaves the compiled program's jumps intact.
fn prefix() -> Vec<sock_filter> {
    let enosys = libc::SECCOMP_RET_ERRNO | (libc::ENOSYS.unsigned_abs() & libc::SECCOMP_RET_DATA);
    let clone3 = u32::try_from(libc::SYS_clone3).unwrap_or(u32::MAX);
    let mut p = vec![
        // foreign architecture (e.g. i386 via int 0x80) -> kill
        ins(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        ins(BPF_JMP_JEQ_K, 1, 0, AUDIT_ARCH),
        ins(BPF_RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        ins(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
    ];
    // x32 shares AUDIT_ARCH_X86_64 and is told apart only by this bit in the number.
    #[cfg(target_arch = "x86_64")]
    p.extend([
        ins(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(BPF_RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
    ]);
    p.extend([
        ins(BPF_JMP_JEQ_K, 0, 1, clone3),
        ins(BPF_RET_K, 0, 0, enosys),
    ]);
    p
}

/// Compiles the policy to the BPF program installed in the step just before exec.
pub fn compile() -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, n, deny) in policy() {
        if matches!(deny, Deny::AlwaysEnosys) {
            continue; // handled in the prefix
        }
        rules.insert(n, rules_for(deny)?);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        TARGET,
    )
    .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    let compiled: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))?;
    let mut program = prefix();
    program.extend(compiled);
    // The kernel limit (BPF_MAXINSNS).
    if program.len() > 4096 {
        return Err(SandboxError::Seccomp(format!(
            "program too long: {} instructions",
            program.len()
        )));
    }
    Ok(program)
}

/// The policy as data, for the sandbox profile.
pub(crate) fn describe() -> Value {
    let rules: Vec<Value> = policy()
        .into_iter()
        .map(|(name, n, deny)| {
            let (action, when) = match deny {
                Deny::Always => ("errno:EPERM", json!("always")),
                Deny::AlwaysEnosys => ("errno:ENOSYS", json!("always")),
                Deny::CloneNamespaceFlags => (
                    "errno:EPERM",
                    json!({"arg0_has_any_of": CLONE_NEW_FLAGS.iter().map(|f| f.0).collect::<Vec<_>>()}),
                ),
                Deny::SocketDomainNotUnixOrInet => (
                    "errno:EPERM",
                    json!({"arg0_not_in": ALLOWED_SOCKET_DOMAINS.iter().map(|f| f.0).collect::<Vec<_>>()}),
                ),
                Deny::PersonalityChange => {
                    ("errno:EPERM", json!({"arg0_not_in": PERSONALITY_ALLOWED}))
                }
            };
            json!({"syscall": name, "nr": n, "action": action, "when": when})
        })
        .collect();
    json!({
        "engine": "seccompiler 0.5 + hand-written prefix",
        "arch": std::env::consts::ARCH,
        "arch_mismatch": "kill_process",
        "x32_abi": if cfg!(target_arch = "x86_64") { "kill_process" } else { "n/a" },
        "default": "allow",
        "deny": rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_compiles_with_prefix() -> Result<(), SandboxError> {
        let p = compile()?;
        let pre = prefix();
        assert!(p.len() > pre.len() + 50);
        assert_eq!(&p[..pre.len()], &pre[..]);
        // first check is the architecture
        assert_eq!(p[0].k, SECCOMP_DATA_ARCH);
        assert_eq!(p[1].k, AUDIT_ARCH);
        Ok(())
    }

    #[test]
    fn table_has_no_duplicates_and_required_entries() {
        let t = policy();
        let mut names: Vec<_> = t.iter().map(|e| e.0).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
        for required in [
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "ptrace",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "request_key",
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "open_by_handle_at",
            "name_to_handle_at",
            "setns",
            "unshare",
            "acct",
            "swapon",
            "swapoff",
            "reboot",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "personality",
            "lookup_dcookie",
            "vhangup",
            "quotactl",
            "fsopen",
            "fsmount",
            "fsconfig",
            "move_mount",
            "open_tree",
            "fspick",
            "mount_setattr",
            "clone",
            "clone3",
            "socket",
        ] {
            assert!(
                names.contains(&required),
                "{required} missing from the policy"
            );
        }
        #[cfg(target_arch = "x86_64")]
        {
            assert!(names.contains(&"iopl"));
            assert!(names.contains(&"ioperm"));
        }
    }
}
