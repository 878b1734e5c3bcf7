//! The seccomp policy of a step, as one reviewable table, and its compilation to BPF.
//!
//! Default action: allow. Every syscall in [`policy`] is denied either always or when its
//! arguments match the listed condition. A denial is not answered by the kernel but handed
//! to the supervisor (SECCOMP_RET_USER_NOTIF): it counts the denial per syscall name and
//! answers EPERM, so every denial a step triggers is reported on the step. The syscall itself
//! never runs: the supervisor never answers "continue", and without a listener (supervisor
//! gone) the kernel fails the call with ENOSYS.
//!
//! Three checks that seccompiler cannot express are emitted by [`prefix`] in front of the
//! compiled program: the architecture check (a foreign ABI, e.g. i386 through `int 0x80`,
//! -> kill), the x32 ABI (syscall numbers with bit 0x40000000 -> kill) and clone3 -> ENOSYS
//! (so libc falls back to clone(2), whose flags seccomp *can* inspect; clone3 passes them in
//! memory). Kill, not EPERM, for foreign ABIs: their syscall numbers name other syscalls, so
//! the table does not apply to them, no build of native code uses them, and the kernel kills
//! without depending on the supervisor. Those kills are reported as the process's SIGSYS
//! death, not in the denial counts; clone3's ENOSYS is a steering to clone(2), not a denial,
//! and is not counted either (glibc tries clone3 on every thread creation).
//!
//! Only the rows that must look at arguments do (clone flags, socket domain, personality,
//! seccomp's listener flag); none of them is a hot syscall, so the kernel's per-syscall
//! action cache still answers "allow" for everything else without running the filter.
//!
//! The program is compiled once per process ([`compiled`], first called by
//! [`crate::Sandbox::probe`] when the daemon starts) and handed to each supervisor in the
//! control message, with its SHA-256 recorded in the sandbox profile.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

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
    /// With EPERM when seccomp(2)'s flags (arg1) ask for a notification listener: a filter
    /// of the step's own with a listener would take precedence over ours for USER_NOTIF
    /// results (the newest filter wins ties) and could answer "continue".
    NewListener,
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
        // a listener of the step's own could answer our notifications' syscalls "continue"
        ("seccomp", nr::SYS_seccomp, NewListener),
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
pub(crate) const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "aarch64")]
pub(crate) const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;

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
        Deny::NewListener => {
            let f = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
            vec![rule(vec![cond(1, Qword, SeccompCmpOp::MaskedEq(f), f)?])?]
        }
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

/// seccompiler has no USER_NOTIF action: the table is compiled with this (otherwise unused)
/// TRACE value as its match action, and every `ret` of exactly this value is then rewritten
/// to SECCOMP_RET_USER_NOTIF.
const NOTIF_PLACEHOLDER: u32 = libc::SECCOMP_RET_TRACE | 0x4b1c;

/// The compiled filter and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    program: BpfProgram,
    sha256: String,
}

impl CompiledPolicy {
    /// The instructions, in the order the kernel runs them.
    pub fn instructions(&self) -> &[sock_filter] {
        &self.program
    }

    /// Hex SHA-256 of the program as the kernel receives it (each instruction as
    /// code u16, jt u8, jf u8, k u32, little-endian): recorded in the sandbox profile.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The program for the control message: one u64 per instruction (see [`encode`]).
    pub(crate) fn encoded(&self) -> Vec<u64> {
        self.program.iter().map(encode).collect()
    }

    /// Rebuilds a program received on the control socket, checking only its shape (the
    /// daemon compiled it; the control socket is root-to-root).
    pub(crate) fn decode(words: &[u64]) -> Result<Self, String> {
        if words.is_empty() || words.len() > BPF_MAXINSNS {
            return Err(format!(
                "program of {} instructions (1 to {BPF_MAXINSNS} allowed)",
                words.len()
            ));
        }
        Ok(Self::new(words.iter().map(|w| decode(*w)).collect()))
    }

    fn new(program: BpfProgram) -> Self {
        let mut h = Sha256::new();
        for i in &program {
            h.update(i.code.to_le_bytes());
            h.update([i.jt, i.jf]);
            h.update(i.k.to_le_bytes());
        }
        let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Self { program, sha256 }
    }
}

/// code | jt << 16 | jf << 24 | k << 32
fn encode(i: &sock_filter) -> u64 {
    u64::from(i.code) | u64::from(i.jt) << 16 | u64::from(i.jf) << 24 | u64::from(i.k) << 32
}

fn decode(w: u64) -> sock_filter {
    // Truncating casts pick the fields back out of the packed word.
    sock_filter {
        code: (w & 0xffff) as u16,
        jt: ((w >> 16) & 0xff) as u8,
        jf: ((w >> 24) & 0xff) as u8,
        k: (w >> 32) as u32,
    }
}

/// The kernel limit on a filter's length.
const BPF_MAXINSNS: usize = 4096;

/// Compiles the policy. Callers in the daemon use [`compiled`], which does this once.
pub fn compile() -> Result<CompiledPolicy, SandboxError> {
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
        SeccompAction::Trace(NOTIF_PLACEHOLDER & libc::SECCOMP_RET_DATA),
        TARGET,
    )
    .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    let compiled: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))?;
    let mut program = prefix();
    let mut rewritten = 0usize;
    for mut i in compiled {
        if i.code == BPF_RET_K && i.k == NOTIF_PLACEHOLDER {
            i.k = libc::SECCOMP_RET_USER_NOTIF;
            rewritten += 1;
        }
        program.push(i);
    }
    if rewritten == 0 {
        return Err(SandboxError::Seccomp(
            "no deny rule in the compiled program".to_string(),
        ));
    }
    if program.len() > BPF_MAXINSNS {
        return Err(SandboxError::Seccomp(format!(
            "program too long: {} instructions",
            program.len()
        )));
    }
    Ok(CompiledPolicy::new(program))
}

/// The policy compiled once per process: the daemon's first call (in
/// [`crate::Sandbox::probe`] at start-up) compiles it, every step reuses it.
pub fn compiled() -> Result<&'static CompiledPolicy, SandboxError> {
    static ONCE: OnceLock<Result<CompiledPolicy, String>> = OnceLock::new();
    ONCE.get_or_init(|| compile().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| SandboxError::Seccomp(e.clone()))
}

/// The table's name for a native syscall number the filter sent to the supervisor.
pub(crate) fn syscall_name(nr: i32) -> String {
    policy()
        .into_iter()
        .find(|(_, n, _)| *n == i64::from(nr))
        .map_or_else(|| format!("nr:{nr}"), |(name, _, _)| name.to_string())
}

/// The policy as data, for the sandbox profile.
pub(crate) fn describe(policy_sha256: &str) -> Value {
    let rules: Vec<Value> = policy()
        .into_iter()
        .map(|(name, n, deny)| {
            let deny_counted = "user_notif:EPERM";
            let (action, when) = match deny {
                Deny::Always => (deny_counted, json!("always")),
                Deny::AlwaysEnosys => ("errno:ENOSYS", json!("always")),
                Deny::CloneNamespaceFlags => (
                    deny_counted,
                    json!({"arg0_has_any_of": CLONE_NEW_FLAGS.iter().map(|f| f.0).collect::<Vec<_>>()}),
                ),
                Deny::SocketDomainNotUnixOrInet => (
                    deny_counted,
                    json!({"arg0_not_in": ALLOWED_SOCKET_DOMAINS.iter().map(|f| f.0).collect::<Vec<_>>()}),
                ),
                Deny::PersonalityChange => {
                    (deny_counted, json!({"arg0_not_in": PERSONALITY_ALLOWED}))
                }
                Deny::NewListener => (
                    deny_counted,
                    json!({"arg1_has_any_of": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]}),
                ),
            };
            json!({"syscall": name, "nr": n, "action": action, "when": when})
        })
        .collect();
    json!({
        "engine": "seccompiler 0.5 + hand-written prefix, USER_NOTIF answered by the supervisor",
        "program_sha256": policy_sha256,
        "arch": std::env::consts::ARCH,
        "arch_mismatch": "kill_process",
        "x32_abi": if cfg!(target_arch = "x86_64") { "kill_process" } else { "n/a" },
        "default": "allow",
        "denials": "counted per syscall by the supervisor, answered with EPERM",
        "deny": rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;

    /// A classic-BPF interpreter for the opcodes seccompiler and the prefix emit, so the
    /// program's decisions can be checked without installing it.
    fn run(p: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let word = |off: u32| -> u32 {
            match off {
                0 => nr,
                4 => arch,
                8 | 12 => 0,
                o if (16..64).contains(&o) => {
                    let a = args[((o - 16) / 8) as usize];
                    // The low word, then the high word (little-endian `seccomp_data`).
                    let half = if o % 8 == 0 {
                        a & u64::from(u32::MAX)
                    } else {
                        a >> 32
                    };
                    u32::try_from(half).unwrap_or(u32::MAX)
                }
                o => panic!("load at offset {o}"),
            }
        };
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &p[pc];
            pc += 1;
            let jump = |cond: bool| usize::from(if cond { i.jt } else { i.jf });
            match i.code {
                0x20 => acc = word(i.k),
                0x54 => acc &= i.k,
                0x05 => pc += i.k as usize,
                0x15 => pc += jump(acc == i.k),
                0x25 => pc += jump(acc > i.k),
                0x35 => pc += jump(acc >= i.k),
                0x45 => pc += jump(acc & i.k != 0),
                0x06 => return i.k,
                c => panic!("opcode {c:#x} at {}", pc - 1),
            }
        }
    }

    fn nr(n: i64) -> u32 {
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    #[test]
    fn program_decisions() -> Result<(), SandboxError> {
        let c = compile()?;
        let p = c.instructions();
        let native = |n: i64, args: [u64; 6]| run(p, AUDIT_ARCH, nr(n), args);
        let none = [0u64; 6];
        let notif = libc::SECCOMP_RET_USER_NOTIF;
        let allow = libc::SECCOMP_RET_ALLOW;
        // Every table row is answered by the supervisor (or ENOSYS for clone3).
        for (name, n, deny) in policy() {
            let got = native(n, none);
            match deny {
                Deny::Always => assert_eq!(got, notif, "{name}"),
                Deny::AlwaysEnosys => assert_eq!(
                    got,
                    libc::SECCOMP_RET_ERRNO | libc::ENOSYS.unsigned_abs(),
                    "{name}"
                ),
                // AF_UNSPEC (0) is not an allowed socket domain
                Deny::SocketDomainNotUnixOrInet => assert_eq!(got, notif, "{name}"),
                // with harmless zero arguments: allowed (personality(PER_LINUX), fork...)
                _ => assert_eq!(got, allow, "{name} with zero arguments"),
            }
        }
        assert_eq!(native(libc::SYS_getppid, none), allow);
        assert_eq!(native(libc::SYS_read, none), allow);
        let sock = |d: i32| native(libc::SYS_socket, [d.unsigned_abs().into(), 3, 0, 0, 0, 0]);
        assert_eq!(sock(libc::AF_INET), allow);
        assert_eq!(sock(libc::AF_INET6), allow);
        assert_eq!(sock(libc::AF_UNIX), allow);
        assert_eq!(sock(libc::AF_PACKET), notif);
        assert_eq!(sock(libc::AF_NETLINK), notif);
        assert_eq!(sock(libc::AF_VSOCK), notif);
        let clone = |f: i32| native(libc::SYS_clone, [f.unsigned_abs().into(), 0, 0, 0, 0, 0]);
        assert_eq!(clone(libc::SIGCHLD), allow);
        assert_eq!(clone(libc::CLONE_VM | libc::CLONE_THREAD), allow);
        assert_eq!(clone(libc::CLONE_NEWUSER | libc::SIGCHLD), notif);
        assert_eq!(clone(libc::CLONE_NEWNET), notif);
        let pers = |v: u64| native(libc::SYS_personality, [v, 0, 0, 0, 0, 0]);
        assert_eq!(pers(0xffff_ffff), allow);
        assert_eq!(pers(0x0040_0000), notif); // READ_IMPLIES_EXEC
        let secc = |flags: u64| native(libc::SYS_seccomp, [1, flags, 0, 0, 0, 0]);
        assert_eq!(secc(0), allow);
        assert_eq!(secc(libc::SECCOMP_FILTER_FLAG_NEW_LISTENER), notif);
        // 32-bit entry (int 0x80 / sysenter: AUDIT_ARCH_I386) is killed whatever the number,
        // including numbers that are harmless on x86_64 and denied ones alike.
        for n in [0u32, 20, 21, 26, 120, 0x1_0000] {
            assert_eq!(
                run(p, AUDIT_ARCH_I386, n, none),
                libc::SECCOMP_RET_KILL_PROCESS
            );
        }
        // x32 (same arch value, bit 30 in the number) is killed too.
        #[cfg(target_arch = "x86_64")]
        for n in [39u32, 165, 0x3fff_ffff] {
            assert_eq!(
                run(p, AUDIT_ARCH, X32_SYSCALL_BIT | n, none),
                libc::SECCOMP_RET_KILL_PROCESS
            );
        }
        Ok(())
    }

    #[test]
    fn compiled_once_and_encoding_round_trips() -> Result<(), SandboxError> {
        let a = compiled()?;
        let b = compiled()?;
        assert!(std::ptr::eq(a, b), "compiled once per process");
        assert_eq!(a, &compile()?);
        let back = CompiledPolicy::decode(&a.encoded()).map_err(SandboxError::Seccomp)?;
        assert_eq!(&back, a);
        assert_eq!(back.sha256().len(), 64);
        assert!(CompiledPolicy::decode(&[]).is_err());
        let keyctl = i32::try_from(libc::SYS_keyctl).unwrap_or(-1);
        assert_eq!(syscall_name(keyctl), "keyctl");
        assert_eq!(syscall_name(1), "nr:1");
        Ok(())
    }

    #[test]
    fn policy_compiles_with_prefix() -> Result<(), SandboxError> {
        let p = compile()?.program;
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
