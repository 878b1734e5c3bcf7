//! The egress proxy's cost: a large download and small requests from inside a step,
//! through the step's proxy, against the same curl on the host fetching directly, from
//! the same local server, in the same run.
//!
//!     cargo bench -p runner --bench proxy [-- MIB]
//!
//! Needs root and curl. The server (in this binary) answers `GET /bytes/N` with N zero
//! bytes. Throughput and time-to-first-byte are curl's own figures (`-w`), so the
//! sandbox's start-up is not counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;

mod common;
use common::Daemon;
const RUNS: usize = 3;
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

fn main() {
    let mib: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1024);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the proxy benchmark needs root");
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || serve(listener));

    let daemon = Daemon::start();

    let allow = format!("127.0.0.1:{port}");
    let big = format!("http://127.0.0.1:{port}/bytes/{}", mib << 20);
    let small = format!("http://127.0.0.1:{port}/bytes/1");
    let throughput = |runs: Vec<(f64, f64)>| median(runs.iter().map(|r| r.0).collect());
    let ttfb = |runs: Vec<(f64, f64)>| median(runs.iter().map(|r| r.1).collect());

    let direct_big = throughput(direct(&curl_script(&big, RUNS, "")));
    let proxied_big = throughput(in_step(&daemon, &allow, &curl_script(&big, RUNS, "")));
    let tunneled_big = throughput(in_step(&daemon, &allow, &curl_script(&big, RUNS, "-p")));
    let direct_small = ttfb(direct(&curl_script(&small, SMALL_REQUESTS, "")));
    let proxied_small = ttfb(in_step(
        &daemon,
        &allow,
        &curl_script(&small, SMALL_REQUESTS, ""),
    ));
    let tunneled_small = ttfb(in_step(
        &daemon,
        &allow,
        &curl_script(&small, SMALL_REQUESTS, "-p"),
    ));

    daemon.stop();

    let mbs = |b: f64| b / (1024.0 * 1024.0);
    println!("download of {mib} MiB, median of {RUNS}, same run:");
    println!(
        "  direct (host curl)              {:8.0} MiB/s",
        mbs(direct_big)
    );
    println!(
        "  step, HTTP forward via proxy    {:8.0} MiB/s   ratio {:.2}",
        mbs(proxied_big),
        proxied_big / direct_big
    );
    println!(
        "  step, CONNECT tunnel via proxy  {:8.0} MiB/s   ratio {:.2}",
        mbs(tunneled_big),
        tunneled_big / direct_big
    );
    println!("time to first byte of a 1-byte GET, median of {SMALL_REQUESTS}:");
    println!(
        "  direct (host curl)              {:8.3} ms",
        direct_small * 1e3
    );
    println!(
        "  step, HTTP forward via proxy    {:8.3} ms   added {:.3} ms",
        proxied_small * 1e3,
        (proxied_small - direct_small) * 1e3
    );
    println!(
        "  step, CONNECT tunnel via proxy  {:8.3} ms   added {:.3} ms",
        tunneled_small * 1e3,
        (tunneled_small - direct_small) * 1e3
    );
}
