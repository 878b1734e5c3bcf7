//! Running Kiln as a service: the Prometheus endpoint after real jobs (checked by
//! promtool), JSON log lines, readiness told to systemd, and the systemd unit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A tool from the host, or `None` (the test is skipped, saying so) outside CI.
fn host_tool(test: &str, name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            !in_ci(),
            "{test}: CI=true but {name} is missing (Debian package {package})"
        );
        eprintln!("SKIPPED: {test} needs {name} (Debian package {package})");
    }
    found
}

/// A loopback port free when asked.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request; answers the status line and the body (empty when the server
/// closed or reset the connection without an answer).
fn http(port: u16, request: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // A server refusing the request may close before it is all written.
    let _ = stream.write_all(request.as_bytes());
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let answer = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the sample named exactly `series` (name and labels) in `text`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_after_jobs_pass_promtool_and_count_them() {
    if !require_root("metrics_after_jobs_pass_promtool_and_count_them") {
        return;
    }
    let port = free_port();
    let config = config_file(&format!("metrics_listen = \"127.0.0.1:{port}\"\n"));
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let ok = daemon.kiln(&["run", "--", "/bin/true"]);
    assert!(ok.status.success(), "{}", describe(&ok));
    let failed = daemon.kiln(&["run", "--", "/bin/false"]);
    assert_eq!(failed.status.code(), Some(1), "{}", describe(&failed));
    // unshare(2) is denied by the seccomp filter, twice.
    let denied = daemon.kiln(&[
        "run",
        "--",
        "/bin/sh",
        "-c",
        "unshare -U true; unshare -U true; exit 0",
    ]);
    assert!(denied.status.success(), "{}", describe(&denied));

    // Through the egress proxy: one fetch allowed (a server on loopback answering once),
    // one to a port not on the list, denied.
    let curl = host_tool(
        "metrics_after_jobs_pass_promtool_and_count_them",
        "curl",
        "curl",
    );
    if curl.is_some() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let allowed = server.local_addr().unwrap().port();
        let denied_port = free_port();
        let serving = std::thread::spawn(move || {
            let (mut stream, _) = server.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).unwrap();
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n",
                )
                .unwrap();
        });
        let fetched = daemon.kiln(&[
            "run",
            "--allow-net",
            &format!("127.0.0.1:{allowed}"),
            "--",
            "/bin/sh",
            "-c",
            &format!(
                "curl -sS --max-time 20 http://127.0.0.1:{allowed}/ && \
                 ! curl -fsS --max-time 20 http://127.0.0.1:{denied_port}/"
            ),
        ]);
        assert!(fetched.status.success(), "{}", describe(&fetched));
        assert_eq!(text(&fetched.stdout), "hello\n");
        serving.join().unwrap();
    }

    let succeeded = if curl.is_some() { 3.0 } else { 2.0 };
    let (status, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(
        sample(&body, "kiln_jobs{state=\"succeeded\",tenant=\"uid:0\"}"),
        succeeded
    );
    if curl.is_some() {
        assert_eq!(
            sample(&body, "kiln_proxy_decisions_total{decision=\"allowed\"}"),
            1.0
        );
        assert_eq!(
            sample(&body, "kiln_proxy_decisions_total{decision=\"denied\"}"),
            1.0
        );
        assert!(sample(&body, "kiln_proxy_bytes_total{direction=\"down\"}") >= 6.0);
        assert!(sample(&body, "kiln_proxy_bytes_total{direction=\"up\"}") > 0.0);
    }
    assert_eq!(
        sample(&body, "kiln_jobs{state=\"failed\",tenant=\"uid:0\"}"),
        1.0
    );
    assert_eq!(
        sample(&body, "kiln_jobs{state=\"running\",tenant=\"uid:0\"}"),
        0.0
    );
    assert_eq!(sample(&body, "kiln_queue_depth{tenant=\"uid:0\"}"), 0.0);
    assert_eq!(
        sample(&body, "kiln_step_duration_seconds_count"),
        succeeded + 1.0
    );
    assert_eq!(
        sample(&body, "kiln_step_start_latency_seconds_count"),
        succeeded + 1.0
    );
    assert_eq!(sample(&body, "kiln_seccomp_denials_total"), 2.0);
    assert!(sample(&body, "kiln_audit_entries_total") >= 10.0);
    assert!(sample(&body, "kiln_audit_last_checkpoint_timestamp_seconds") > 0.0);
    assert!(sample(&body, "kiln_cas_objects") >= 1.0);
    assert_eq!(sample(&body, "kiln_tls_handshake_failures_total"), 0.0);

    // Prometheus itself asks for OpenMetrics.
    let (status, openmetrics) = http(
        port,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
    );
    assert!(status.contains(" 200 "), "{status}");
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE kiln_seccomp_denials counter\n"));

    // Nothing else is served.
    let (status, _) = http(port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status.contains(" 404 "), "{status}");
    let (status, _) = http(
        port,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(status.contains(" 405 "), "{status}");

    // Bounded: a request head over 8 KiB is refused ...
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(16 << 10)
    );
    let (status, _) = http(port, &big);
    assert!(!status.contains(" 200 "), "{status}");
    // ... and past 8 connections at once, a new one is closed unanswered. Twice as many
    // idle ones as places: the places of earlier requests still closing are taken too.
    let idle: Vec<std::net::TcpStream> = (0..16)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let (status, _) = http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "", "a connection past the cap was served");
    drop(idle);
    let served = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .0
            .contains(" 200 ")
    });
    assert!(
        served,
        "the endpoint did not serve again once the idle connections closed"
    );

    let Some(promtool) = host_tool(
        "metrics_after_jobs_pass_promtool_and_count_them",
        "promtool",
        "prometheus",
    ) else {
        return;
    };
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}\n{body}",
        describe(&checked)
    );
}

#[test]
fn json_log_format_writes_one_json_object_a_line() {
    if !require_root("json_log_format_writes_one_json_object_a_line") {
        return;
    }
    let config = config_file("log_format = \"json\"\n");
    let mut daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let ok = daemon.kiln(&["run", "--", "/bin/true"]);
    assert!(ok.status.success(), "{}", describe(&ok));
    // A step's egress proxy (a process of its own) logs each attempt, in the same format.
    let curl = host_tool(
        "json_log_format_writes_one_json_object_a_line",
        "curl",
        "curl",
    );
    if curl.is_some() {
        let (listed, other) = (free_port(), free_port());
        let denied = daemon.kiln(&[
            "run",
            "--allow-net",
            &format!("127.0.0.1:{listed}"),
            "--",
            "/bin/sh",
            "-c",
            &format!("! curl -fsS --max-time 20 http://127.0.0.1:{other}/"),
        ]);
        assert!(denied.status.success(), "{}", describe(&denied));
    }
    assert!(daemon.stop().success());
    let log = daemon.log();
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{log}"));
        assert!(
            entry["level"].is_string() && entry["timestamp"].is_string(),
            "{line}"
        );
        messages.push(
            entry["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    assert!(messages.iter().any(|m| m == "job finished"), "{log}");
    assert!(messages.iter().any(|m| m == "stopped"), "{log}");
    if curl.is_some() {
        assert!(
            messages.iter().any(|m| m == "step network attempt"),
            "{log}"
        );
    }
}

#[test]
fn readiness_is_sent_to_notify_socket_once_the_listeners_are_bound() {
    if !require_root("readiness_is_sent_to_notify_socket_once_the_listeners_are_bound") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let socket = dir.path().join("kiln.sock");
    let port = free_port();
    let config = config_file(&format!("metrics_listen = \"127.0.0.1:{port}\"\n"));
    let mut child = Command::new(KILN)
        .arg("--socket")
        .arg(&socket)
        .args(["serve", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--config")
        .arg(config.path())
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = notify
        .recv(&mut buf)
        .expect("no notification from the daemon");
    let message = String::from_utf8_lossy(&buf[..n]).to_string();
    // Told ready: both listeners answer already.
    let connected = std::os::unix::net::UnixStream::connect(&socket);
    let scraped = std::net::TcpStream::connect(("127.0.0.1", port));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopping = notify
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).to_string());
    let status = child.wait().unwrap();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert!(
        connected.is_ok(),
        "the socket was not bound when READY=1 came"
    );
    assert!(
        scraped.is_ok(),
        "the metrics endpoint was not bound when READY=1 came"
    );
    assert!(stopping.unwrap().lines().any(|l| l == "STOPPING=1"));
    assert!(status.success());
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = host_tool(
        "systemd_unit_passes_systemd_analyze_verify",
        "systemd-analyze",
        "systemd",
    ) else {
        return;
    };
    let unit = std::fs::read_to_string(repo_root().join("runner/systemd/kiln.service")).unwrap();
    assert!(unit.contains("\nType=notify\n"));
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let installed = "ExecStart=/usr/local/bin/kiln ";
    assert_eq!(unit.matches(installed).count(), 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.service");
    std::fs::write(
        &path,
        unit.replace(installed, &format!("ExecStart={KILN} ")),
    )
    .unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .current_dir(Path::new("/"))
        .output()
        .unwrap();
    // Unknown or malformed directives are only warnings: any mention of the unit fails.
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !text(&out.stderr).contains("kiln.service"),
        "{}",
        describe(&out)
    );
    assert!(
        !text(&out.stdout).contains("kiln.service"),
        "{}",
        describe(&out)
    );
}
