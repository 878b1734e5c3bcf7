//! The egress proxy's cost: a large download and small requests from inside a step,
//! through the step's proxy, against the same curl on the host fetching directly, from
//! the same local server, in the same run.
//!
//!     cargo bench -p runner --bench proxy [-- MIB [ROUNDS]]
//!
//! Needs root and curl. The server (in this binary) answers `GET /bytes/N` with N zero
//! bytes, written from a buffer. If busybox is installed, `busybox httpd` (which sends
//! files with sendfile(2)) serves a sparse file of MIB MiB as a second server.
//!
//! The download (default 1024 MiB) runs ROUNDS times (default 15); each round fetches
//! once directly, once through the proxy as a plain HTTP request and once through a
//! CONNECT tunnel, one after the other, so a change in the machine's load touches all
//! three alike. Time to first byte is the median of 30 requests of 1 byte each.
//! Throughput and time to first byte are curl's own figures (`-w`), so the sandbox's
//! start-up is not counted.
//!
//! With KILN_BASELINE=PATH (another `kiln` binary, e.g. a build of an older commit), the
//! proxied figures of that binary's daemon are measured in the same rounds too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};

mod common;
use common::Daemon;
const ROUNDS: usize = 15;
const SMALL_REQUESTS: usize = 30;

fn serve(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || answer(stream));
    }
}

fn answer(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    let size: u64 = request_line
        .split_whitespace()
        .nth(1)
        .and_then(|path| path.rsplit('/').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut out = stream;
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left).map_or(chunk.len(), |left| left.min(chunk.len()));
        if out.write_all(&chunk[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
}

/// `busybox httpd` serving `dir` on a free loopback port, if busybox is installed.
struct Busybox {
    child: Child,
    port: u16,
}

impl Busybox {
    fn start(dir: &std::path::Path) -> Option<Busybox> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("busybox")
            .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
            .arg(dir)
            .spawn()
            .ok()?;
        for _ in 0..500 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Busybox { child, port });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("busybox httpd did not start");
    }
}

impl Drop for Busybox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl -w` lines: "speed_download time_starttransfer" per request.
fn curl_script(url: &str, count: usize, extra: &str) -> String {
    format!(
        "for i in $(seq 1 {count}); do curl -sS {extra} -o /dev/null \
         -w '%{{speed_download}} %{{time_starttransfer}}\\n' {url} || exit 1; done"
    )
}

fn parse(stdout: &[u8]) -> Vec<(f64, f64)> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|x| x.parse::<f64>().ok());
            Some((f.next()??, f.next()??))
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `command` and parses its `curl -w` lines.
fn curl_figures(mut command: Command) -> Vec<(f64, f64)> {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&out.stdout)
}

/// The script on the host, without any proxy.
fn direct(script: &str) -> Vec<(f64, f64)> {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", script])
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY");
    curl_figures(c)
}

/// The script in a step allowed to reach `allow` through its egress proxy.
fn in_step(daemon: &Daemon, allow: &str, script: &str) -> Vec<(f64, f64)> {
    curl_figures(daemon.kiln(&["run", "--allow-net", allow, "--", "/bin/sh", "-c", script]))
}

/// One server's download figures: every round's throughput of each way to fetch.
struct Downloads {
    server: &'static str,
    direct: Vec<f64>,
    /// Per daemon (this build, then the baseline if any): plain HTTP, CONNECT tunnel.
    forward: Vec<Vec<f64>>,
    tunnel: Vec<Vec<f64>>,
}

fn download_rounds(
    server: &'static str,
    daemons: &[(&str, Daemon)],
    port: u16,
    url: &str,
    rounds: usize,
) -> Downloads {
    let allow = format!("127.0.0.1:{port}");
    let once = curl_script(url, 1, "");
    let once_tunneled = curl_script(url, 1, "-p");
    let mut d = Downloads {
        server,
        direct: Vec::new(),
        forward: vec![Vec::new(); daemons.len()],
        tunnel: vec![Vec::new(); daemons.len()],
    };
    for _ in 0..rounds {
        d.direct.push(direct(&once)[0].0);
        for (i, (_, daemon)) in daemons.iter().enumerate() {
            d.forward[i].push(in_step(daemon, &allow, &once)[0].0);
            d.tunnel[i].push(in_step(daemon, &allow, &once_tunneled)[0].0);
        }
    }
    d
}

fn print_downloads(d: &Downloads, daemons: &[(&str, Daemon)]) {
    let mbs = |b: f64| b / (1024.0 * 1024.0);
    let direct = median(d.direct.clone());
    println!("  {} server:", d.server);
    println!(
        "    direct (host curl)                    {:8.0} MiB/s",
        mbs(direct)
    );
    for (i, (name, _)) in daemons.iter().enumerate() {
        let forward = median(d.forward[i].clone());
        let tunnel = median(d.tunnel[i].clone());
        println!(
            "    {name:8} step, HTTP forward via proxy {:8.0} MiB/s   ratio {:.2}",
            mbs(forward),
            forward / direct
        );
        println!(
            "    {name:8} step, CONNECT tunnel         {:8.0} MiB/s   ratio {:.2}",
            mbs(tunnel),
            tunnel / direct
        );
    }
}

fn main() {
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mib = numbers.first().copied().unwrap_or(1024);
    let rounds = numbers
        .get(1)
        .and_then(|r| usize::try_from(*r).ok())
        .unwrap_or(ROUNDS)
        .max(1);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the proxy benchmark needs root");
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || serve(listener));

    let mut daemons = vec![("this", Daemon::start())];
    if let Ok(baseline) = std::env::var("KILN_BASELINE") {
        daemons.push(("baseline", Daemon::start_binary(&baseline)));
    }

    let files = tempfile::tempdir().unwrap();
    let busybox = {
        // Sparse: the page cache serves zeros without a GiB on disk.
        let file = std::fs::File::create(files.path().join("big")).unwrap();
        file.set_len(mib << 20).unwrap();
        Busybox::start(files.path())
    };

    let big = format!("http://127.0.0.1:{port}/bytes/{}", mib << 20);
    let small = format!("http://127.0.0.1:{port}/bytes/1");
    let mut downloads = vec![download_rounds(
        "this benchmark's own",
        &daemons,
        port,
        &big,
        rounds,
    )];
    if let Some(busybox) = &busybox {
        let url = format!("http://127.0.0.1:{}/big", busybox.port);
        downloads.push(download_rounds(
            "busybox httpd (sendfile)",
            &daemons,
            busybox.port,
            &url,
            rounds,
        ));
    }

    let allow = format!("127.0.0.1:{port}");
    let ttfb = |runs: Vec<(f64, f64)>| median(runs.iter().map(|r| r.1).collect());
    let direct_small = ttfb(direct(&curl_script(&small, SMALL_REQUESTS, "")));
    let small_in_step: Vec<(f64, f64)> = daemons
        .iter()
        .map(|(_, daemon)| {
            let forward = ttfb(in_step(
                daemon,
                &allow,
                &curl_script(&small, SMALL_REQUESTS, ""),
            ));
            let tunnel = ttfb(in_step(
                daemon,
                &allow,
                &curl_script(&small, SMALL_REQUESTS, "-p"),
            ));
            (forward, tunnel)
        })
        .collect();

    println!("download of {mib} MiB, median of {rounds} rounds, same run:");
    for d in &downloads {
        print_downloads(d, &daemons);
    }
    if busybox.is_none() {
        println!("  (busybox is not installed: no busybox httpd figures)");
    }
    println!("time to first byte of a 1-byte GET, median of {SMALL_REQUESTS}:");
    println!(
        "  direct (host curl)                      {:8.3} ms",
        direct_small * 1e3
    );
    for ((name, _), (forward, tunnel)) in daemons.iter().zip(&small_in_step) {
        println!(
            "  {name:8} step, HTTP forward via proxy   {:8.3} ms   added {:.3} ms",
            forward * 1e3,
            (forward - direct_small) * 1e3
        );
        println!(
            "  {name:8} step, CONNECT tunnel           {:8.3} ms   added {:.3} ms",
            tunnel * 1e3,
            (tunnel - direct_small) * 1e3
        );
    }
    drop(busybox);
    for (_, daemon) in daemons {
        daemon.stop();
    }
}
