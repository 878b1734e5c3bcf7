//! A real `kiln serve` for the benchmarks: private socket and state directory, its log
//! (KILN_LOG=info) in a file, stopped with SIGTERM on drop.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

pub struct Daemon {
    /// The `kiln` binary the daemon and its clients run.
    pub binary: PathBuf,
    pub socket: PathBuf,
    /// Its state directory (read by the audit benchmark only).
    #[allow(dead_code)]
    pub state: PathBuf,
    pub log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_binary(KILN)
    }

    /// A daemon of another `kiln` binary (e.g. a baseline build to compare with).
    pub fn start_binary(binary: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kiln.sock");
        let state = dir.path().join("state");
        let log = dir.path().join("daemon.log");
        let child = Command::new(binary)
            .arg("--socket")
            .arg(&socket)
            .arg("serve")
            .arg("--state-dir")
            .arg(&state)
            .env("KILN_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            binary: PathBuf::from(binary),
            socket,
            state,
            log,
            child,
            _dir: dir,
        }
    }

    /// `kiln --socket SOCKET ARGS...`
    pub fn kiln(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--socket").arg(&self.socket).args(args);
        c
    }

    /// SIGTERM, then wait; returns the daemon's log.
    pub fn stop(mut self) -> String {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
