//! The allow-listed network, end to end: a real daemon, steps fetching with an
//! unmodified curl through the egress proxy from servers on the host's loopback
//! (plain HTTP and HTTPS through CONNECT), every way around the proxy failing, and
//! each attempt in the step's signed link.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use support::*;

/// HTTP and HTTPS servers on 127.0.0.1 (tests/py/servers.py), stopped on drop.
struct Servers {
    child: Child,
    http: u16,
    https: u16,
    /// The HTTPS server's self-signed certificate.
    ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Servers {
    fn start(python: &std::path::Path) -> Servers {
        let dir = tempfile::tempdir().unwrap();
        let www = dir.path().join("www");
        std::fs::create_dir(&www).unwrap();
        std::fs::write(www.join("hello.txt"), "hello through the proxy\n").unwrap();
        let mut child = Command::new(python)
            .arg(repo_root().join("tests/py/servers.py"))
            .arg(&www)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ports: Value = serde_json::from_str(&line).expect("servers.py printed its ports");
        Servers {
            child,
            http: ports["http"].as_u64().unwrap() as u16,
            https: ports["https"].as_u64().unwrap() as u16,
            ca: dir.path().join("ca.pem"),
            _dir: dir,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn attempts(link: &Value) -> Vec<Value> {
    link["byproducts"]["kiln"]["network"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn find<'a>(attempts: &'a [Value], method: &str, host: &str, port: u16) -> &'a Value {
    attempts
        .iter()
        .find(|a| a["method"] == method && a["host"] == host && a["port"] == port)
        .unwrap_or_else(|| panic!("no {method} {host}:{port} among {attempts:#?}"))
}

#[test]
fn allow_listed_fetches_pass_everything_else_fails_and_the_link_records_each() {
    if !require_root("allow_listed_fetches_pass_everything_else_fails_and_the_link_records_each") {
        return;
    }
    let Some(python) = python("allow_listed_fetches_pass_everything_else_fails") else {
        return;
    };
    let servers = Servers::start(&python);
    let daemon = Daemon::start();
    let (http, https) = (servers.http, servers.https);
    let unlisted_port = if http == 65535 { http - 1 } else { http + 1 };
    // Each line prints what happened; the step itself always succeeds so that the
    // assertions below see every attempt.
    let script = format!(
        "set +e
         echo http: $(curl -sS --max-time 10 http://127.0.0.1:{http}/hello.txt 2>&1)
         echo https: $(curl -sS --max-time 10 --cacert ca.pem https://127.0.0.1:{https}/hello.txt 2>&1)
         echo other-port: $(curl -sS --max-time 10 http://127.0.0.1:{unlisted_port}/hello.txt 2>&1)
         echo unlisted: $(curl -sS --max-time 10 http://unlisted.kiln.test:{http}/ 2>&1)
         echo private: $(curl -sS --max-time 10 http://localhost:{unlisted_port}/ 2>&1)
         echo direct: $(curl -sS --max-time 10 --noproxy '*' http://127.0.0.1:{http}/hello.txt 2>&1; echo rc=$?)
         echo direct-out: $(curl -sS --max-time 10 --noproxy '*' http://192.0.2.1:80/ 2>&1; echo rc=$?)
         echo dns: $(getent hosts example.com; echo rc=$?)
         exit 0"
    );
    let attest = daemon.path("attest");
    let out = daemon.kiln(&[
        "run",
        "--attest-dir",
        attest.to_str().unwrap(),
        "--input",
        &format!("{}:ca.pem", servers.ca.display()),
        "--allow-net",
        &format!("127.0.0.1:{http}"),
        "--allow-net",
        &format!("127.0.0.1:{https}"),
        // A listed name that resolves to loopback, which the list names only on
        // other ports: refused (no way around the list through DNS).
        "--allow-net",
        &format!("localhost:{unlisted_port}"),
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} line in:\n{}", describe(&out)))
            .to_string()
    };
    assert_eq!(line("http"), "http: hello through the proxy");
    assert_eq!(line("https"), "https: hello through the proxy");
    // Denials come back as 403 with the reason, which the build log shows.
    assert!(
        line("other-port").contains("not on the step's allow-list"),
        "{stdout}"
    );
    assert!(
        line("unlisted").contains("not on the step's allow-list"),
        "{stdout}"
    );
    assert!(line("private").contains("loopback"), "{stdout}");
    // Around the proxy: nothing listens on the step's loopback but the proxy, Landlock
    // allows TCP connect only to the proxy's port, and there is no route out.
    assert!(!line("direct").contains("hello"), "{stdout}");
    assert!(!line("direct").ends_with("rc=0"), "{stdout}");
    assert!(!line("direct-out").ends_with("rc=0"), "{stdout}");
    assert!(!line("dns").ends_with("rc=0"), "{stdout}");
    assert!(!line("dns").contains("example.com"), "{stdout}");

    // The summary shows the connections; the signed link records each attempt.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("net GET 127.0.0.1:{http}")),
        "{stderr}"
    );
    let link = signed_link(&attest, "run");
    let attempts = attempts(&link);
    let get = find(&attempts, "GET", "127.0.0.1", http);
    assert_eq!(get["decision"], "allowed", "{get}");
    assert!(get["bytes_down"].as_u64().unwrap() > 0, "{get}");
    let connect = find(&attempts, "CONNECT", "127.0.0.1", https);
    assert_eq!(connect["decision"], "allowed", "{connect}");
    assert_eq!(
        connect["address"],
        format!("127.0.0.1:{https}"),
        "{connect}"
    );
    assert!(connect["bytes_up"].as_u64().unwrap() > 0, "{connect}");
    assert!(connect["bytes_down"].as_u64().unwrap() > 0, "{connect}");
    for (host, port) in [
        ("127.0.0.1", unlisted_port),
        ("unlisted.kiln.test", http),
        ("localhost", unlisted_port),
    ] {
        let denied = find(&attempts, "GET", host, port);
        assert_eq!(denied["decision"], "denied", "{denied}");
        assert!(!denied["reason"].as_str().unwrap().is_empty(), "{denied}");
    }
    let private = find(&attempts, "GET", "localhost", unlisted_port);
    assert!(
        private["resolved"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "127.0.0.1"),
        "{private}"
    );
    // Everything the proxy saw is in the daemon's log too.
    assert!(
        daemon.log().contains("step network attempt"),
        "{}",
        daemon.log()
    );
}

#[test]
fn a_step_without_an_allow_list_has_no_proxy_and_no_network() {
    if !require_root("a_step_without_an_allow_list_has_no_proxy_and_no_network") {
        return;
    }
    let Some(python) = python("a_step_without_an_allow_list_has_no_proxy_and_no_network") else {
        return;
    };
    let servers = Servers::start(&python);
    let daemon = Daemon::start();
    let http = servers.http;
    let attest = daemon.path("attest");
    let out = daemon.kiln(&[
        "run",
        "--attest-dir",
        attest.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        &format!(
            "env | grep -i _proxy; \
             curl -sS --max-time 5 -x http://127.0.0.1:3128 http://127.0.0.1:{http}/hello.txt; \
             curl -sS --max-time 5 http://127.0.0.1:{http}/hello.txt; \
             exit 0"
        ),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(
        !stdout.contains("_proxy") && !stdout.contains("_PROXY"),
        "{stdout}"
    );
    assert!(!stdout.contains("hello"), "{}", describe(&out));
    let link = signed_link(&attest, "run");
    assert_eq!(attempts(&link), Vec::<Value>::new());
    assert!(
        !daemon.log().contains("egress proxy serving"),
        "{}",
        daemon.log()
    );
}

#[test]
fn allow_lists_outside_the_operators_ceiling_are_refused() {
    if !require_root("allow_lists_outside_the_operators_ceiling_are_refused") {
        return;
    }
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "network_ceiling = [\"*.example.org:443\", \"10.0.0.0/8:*\"]\n",
    )
    .unwrap();
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let run = |entry: &str| daemon.kiln(&["run", "--allow-net", entry, "--", "/bin/true"]);
    for inside in ["a.example.org:443", "10.1.2.3:8080"] {
        let out = run(inside);
        assert!(out.status.success(), "{inside}: {}", describe(&out));
    }
    for outside in ["example.org:443", "a.example.org:80", "192.0.2.1:443"] {
        let out = run(outside);
        assert!(!out.status.success(), "{outside}: {}", describe(&out));
        let err = text(&out.stderr);
        assert!(
            err.contains("outside the network ceiling"),
            "{outside}: {err}"
        );
        assert!(err.contains(outside), "{outside}: {err}");
    }
    // A malformed entry is a bad argument, named.
    let out = run("example.org");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("a port is required"),
        "{}",
        describe(&out)
    );
}

#[test]
fn one_step_flooding_its_proxy_does_not_stop_another_steps() {
    if !require_root("one_step_flooding_its_proxy_does_not_stop_another_steps") {
        return;
    }
    let Some(python) = python("one_step_flooding_its_proxy_does_not_stop_another_steps") else {
        return;
    };
    let servers = Servers::start(&python);
    let daemon = Daemon::start();
    let http = servers.http;
    let allow = format!("127.0.0.1:{http}");
    // 100 connections held open without a request: past the step's limit of 64 the proxy
    // answers 503 and records the refusal.
    let flood_attest = daemon.path("flood");
    let flood = Command::new(KILN)
        .env("KILN_SOCKET", &daemon.socket)
        .args(["run", "--step", "flood", "--attest-dir"])
        .arg(&flood_attest)
        .args(["--allow-net", &allow, "--", "/bin/sh", "-c"])
        .arg(
            "for i in $(seq 1 100); do (sleep 6 | busybox nc 127.0.0.1 3128 >/dev/null 2>&1) & done; \
             wait; exit 0",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let out = daemon.kiln(&[
        "run",
        "--allow-net",
        &allow,
        "--",
        "/bin/sh",
        "-c",
        &format!("curl -sS --max-time 10 http://127.0.0.1:{http}/hello.txt"),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "hello through the proxy\n");
    let flood = flood.wait_with_output().unwrap();
    assert!(flood.status.success(), "{}", describe(&flood));
    let refused = attempts(&signed_link(&flood_attest, "flood"))
        .iter()
        .filter(|a| a["reason"] == "too many connections for this step")
        .count();
    assert!(refused >= 30, "only {refused} connections refused");
}

#[test]
fn a_job_file_gives_each_step_its_own_allow_list() {
    if !require_root("a_job_file_gives_each_step_its_own_allow_list") {
        return;
    }
    let Some(python) = python("a_job_file_gives_each_step_its_own_allow_list") else {
        return;
    };
    let servers = Servers::start(&python);
    let daemon = Daemon::start();
    let http = servers.http;
    let job = daemon.path("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"name = "fetch"
image = "host"

[[steps]]
name = "fetch"
run = ["/bin/sh", "-c", "curl -sS --max-time 10 -o got.txt http://127.0.0.1:{http}/hello.txt"]
network = ["127.0.0.1:{http}"]

[[steps]]
name = "offline"
run = ["/bin/sh", "-c", "cat got.txt; curl -sS --max-time 5 http://127.0.0.1:{http}/hello.txt && exit 1; exit 0"]

[[outputs]]
path = "got.txt"
"#
        ),
    )
    .unwrap();
    let attest = daemon.path("attest");
    let out = daemon.kiln(&[
        "submit",
        job.to_str().unwrap(),
        "--attest-dir",
        attest.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let fetch = attempts(&signed_link(&attest, "fetch"));
    assert_eq!(
        find(&fetch, "GET", "127.0.0.1", http)["decision"],
        "allowed"
    );
    // The next step of the same job has no allow-list: no proxy, nothing recorded.
    let offline = signed_link(&attest, "offline");
    assert_eq!(attempts(&offline), Vec::<Value>::new());
    // Same job, slot and limits: only the network differs, and the sandbox profile each
    // link records says so.
    let profile = |link: &Value| link["environment"]["sandbox_profile"]["sha256"].clone();
    let fetch_link = signed_link(&attest, "fetch");
    assert!(profile(&fetch_link).is_string(), "{fetch_link}");
    assert_ne!(profile(&fetch_link), profile(&offline));
}
