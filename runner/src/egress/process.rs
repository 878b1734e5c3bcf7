//! The egress proxy runs in a process of its own: the HTTP and TLS bytes a step sends
//! are parsed there, never in the daemon that holds the signing key, the job database
//! and the content store.
//!
//! The daemon re-executes its own binary with [`EGRESS_ARG`]. The child's stdin is the
//! listener the supervisor made in the step's network namespace, and its stdout a
//! socket to the daemon: the configuration comes in as one JSON line, "finish" later,
//! and the record goes out as one JSON line. Before it reads a byte of step traffic the
//! child takes an unprivileged uid of the job slot's range (no capabilities), sets
//! `no_new_privs`, makes itself non-dumpable and installs a seccomp filter of its own.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::egress::netpolicy::AllowList;
use crate::egress::proxy::Proxy;
use crate::egress::record::Report;
use crate::egress::state::{system_resolver, ProxyLimits};

/// argv[1] of the re-executed binary that serves one step's egress.
/// "json" when the daemon logs JSON lines (set by `kiln serve`, passed to the proxy).
pub const LOG_FORMAT_ENV: &str = "KILN_LOG_FORMAT";
pub const EGRESS_ARG: &str = "__kiln-egress-proxy";

/// What the daemon tells the proxy process.
#[derive(Debug, Serialize, Deserialize)]
struct Assignment {
    allow_net: Vec<String>,
    limits: ProxyLimits,
    /// The unprivileged uid and gid the proxy runs as.
    uid: u32,
}

/// The daemon's side of one step's proxy process.
pub struct EgressProcess {
    child: tokio::process::Child,
    control: BufReader<tokio::net::UnixStream>,
}

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("starting the egress proxy process: {0}")]
    Start(std::io::Error),
    #[error("the egress proxy process ended without the step's network record ({0})")]
    NoRecord(String),
}

impl EgressProcess {
    /// Starts the proxy process serving `listener` for a step whose allow-list is
    /// `allow_net` (validated at Submit), as `uid`.
    pub async fn start(
        listener: OwnedFd,
        allow_net: &[String],
        limits: ProxyLimits,
        uid: u32,
    ) -> Result<Self, EgressError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(EgressError::Start)?;
        // /proc/self/exe: this daemon's own binary, even after an upgrade replaced the file.
        let child = tokio::process::Command::new("/proc/self/exe")
            .arg(EGRESS_ARG)
            .env_clear()
            // The daemon's log format, for the lines the proxy writes to the same stderr.
            .envs(std::env::var_os(LOG_FORMAT_ENV).map(|v| (LOG_FORMAT_ENV, v)))
            .stdin(Stdio::from(listener))
            .stdout(Stdio::from(OwnedFd::from(theirs)))
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(EgressError::Start)?;
        ours.set_nonblocking(true).map_err(EgressError::Start)?;
        let mut control = tokio::net::UnixStream::from_std(ours).map_err(EgressError::Start)?;
        let assignment = Assignment {
            allow_net: allow_net.to_vec(),
            limits,
            uid,
        };
        let mut line = serde_json::to_vec(&assignment)
            .map_err(|e| EgressError::Start(std::io::Error::other(e)))?;
        line.push(b'\n');
        control.write_all(&line).await.map_err(EgressError::Start)?;
        Ok(Self {
            child,
            control: BufReader::new(control),
        })
    }

    /// Stops the proxy (every connection is closed) and returns its record.
    pub async fn finish(mut self) -> Result<Report, EgressError> {
        let no_record = |what: String| EgressError::NoRecord(what);
        // A proxy already gone shows in the missing record below.
        let _ = self.control.get_mut().write_all(b"finish\n").await;
        let mut line = String::new();
        let read = self.control.read_line(&mut line).await;
        let status = self.child.wait().await;
        read.map_err(|e| no_record(e.to_string()))?;
        serde_json::from_str(&line).map_err(|_| {
            no_record(match status {
                Ok(status) => status.to_string(),
                Err(e) => e.to_string(),
            })
        })
    }
}

/// The proxy process: never returns. Exit codes: 0 served and reported, 2 the daemon
/// sent nothing usable, 3 it could not give up privileges, 4 the proxy failed.
pub fn child_main() -> ! {
    std::process::exit(match serve_assignment() {
        Ok(()) => 0,
        Err((code, message)) => {
            eprintln!("kiln egress proxy: {message}");
            code
        }
    })
}

fn serve_assignment() -> Result<(), (i32, String)> {
    let inherited = |fd: std::io::Result<OwnedFd>| fd.map_err(|e| (2, e.to_string()));
    let listener = inherited(std::io::stdin().as_fd().try_clone_to_owned())?;
    let control = inherited(std::io::stdout().as_fd().try_clone_to_owned())?;
    let control = std::os::unix::net::UnixStream::from(control);
    // The assignment is read before anything else, one byte at a time, so nothing of a
    // later line is consumed here.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        let n = std::io::Read::read(&mut &control, &mut byte).map_err(|e| (2, e.to_string()))?;
        if n == 0 || line.len() > 1 << 20 {
            return Err((2, "no assignment from the daemon".into()));
        }
        line.push(byte[0]);
    }
    let assignment: Assignment =
        serde_json::from_slice(&line).map_err(|e| (2, format!("assignment: {e}")))?;
    let allow = AllowList::parse(&assignment.allow_net).map_err(|e| (2, e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (4, e.to_string()))?;
    // Started as root, in the host's namespaces: it reads the host's interface
    // addresses (netlink) before the filter; it serves only once privileges are gone.
    let proxy = {
        let _entered = runtime.enter();
        Proxy::start(
            std::net::TcpListener::from(listener),
            allow,
            assignment.limits,
            system_resolver(),
        )
        .map_err(|e| (4, e.to_string()))?
    };
    drop_privileges(assignment.uid).map_err(|e| (3, e))?;
    control
        .set_nonblocking(true)
        .map_err(|e| (4, e.to_string()))?;
    runtime.block_on(async move {
        let control = tokio::net::UnixStream::from_std(control).map_err(|e| (4, e.to_string()))?;
        let (read, mut write) = control.into_split();
        // Serves until the daemon says "finish", or is gone.
        let mut finish = String::new();
        let _ = BufReader::new(read).read_line(&mut finish).await;
        let report = proxy.finish().await;
        let mut line = serde_json::to_vec(&report).map_err(|e| (4, e.to_string()))?;
        line.push(b'\n');
        write
            .write_all(&line)
            .await
            .map_err(|e| (4, e.to_string()))?;
        write.shutdown().await.map_err(|e| (4, e.to_string()))
    })
}

/// Becomes `uid`/`gid` with no supplementary groups (which drops every capability),
/// can no longer gain privileges or be ptraced or dumped, and filters syscalls.
fn drop_privileges(uid: u32) -> Result<(), String> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    let (gid, uid) = (Gid::from_raw(uid), Uid::from_raw(uid));
    setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    // The uid change from root clears every capability; checked, never assumed.
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let no_capabilities = status
        .lines()
        .any(|l| l.starts_with("CapEff:") && l.trim_end().ends_with("0000000000000000"));
    if nix::unistd::geteuid().is_root() || !no_capabilities {
        return Err("still privileged after the uid change".into());
    }
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("dumpable: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    install_filter()
}

/// Syscalls the proxy never needs, answered EPERM: running programs, debugging or
/// reading other processes, mounts and namespaces, kernel keys, BPF, modules, and the
/// like. It keeps what serving sockets needs.
fn install_filter() -> Result<(), String> {
    let denied = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_personality,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
    ];
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        denied.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(u32::try_from(libc::EPERM).unwrap_or(1)),
        std::env::consts::ARCH
            .try_into()
            .map_err(|e| format!("seccomp: {e:?}"))?,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    let program: seccompiler::BpfProgram =
        filter.try_into().map_err(|e| format!("seccomp: {e:?}"))?;
    // Every thread, the runtime's included.
    seccompiler::apply_filter_all_threads(&program).map_err(|e| format!("seccomp: {e}"))
}
