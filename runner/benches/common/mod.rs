//! A real `kiln serve` for the benchmarks: private socket and state directory, its log
//! (KILN_LOG=info) in a file, stopped with SIGTERM on drop.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

pub struct Daemon {
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kiln.sock");
        let log = dir.path().join("daemon.log");
        let child = Command::new(KILN)
            .arg("--socket")
            .arg(&socket)
            .arg("serve")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
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
            socket,
            log,
            child,
            _dir: dir,
        }
    }

    /// `kiln --socket SOCKET ARGS...`
    pub fn kiln(&self, args: &[&str]) -> Command {
        let mut c = Command::new(KILN);
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
