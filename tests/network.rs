//! The allow-listed network, end to end: a real daemon, steps fetching with an
//! unmodified curl through the egress proxy from servers on the host's loopback
//! (plain HTTP and HTTPS through CONNECT), every way around the proxy failing, and
//! each attempt in the step's signed link. The attacks on the proxy itself: a Host
//! header naming another virtual host, requests pipelined behind an allowed one, and
//! tunnels whose TLS names another host or that carry no TLS.
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
    /// One line per request that reached a server: "HOST-HEADERS PATH".
    requests: std::path::PathBuf,
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
            http: u16::try_from(ports["http"].as_u64().unwrap()).unwrap(),
            https: u16::try_from(ports["https"].as_u64().unwrap()).unwrap(),
            ca: dir.path().join("ca.pem"),
            requests: dir.path().join("requests.log"),
            _dir: dir,
        }
    }
}

impl Servers {
    /// What reached the servers, one "HOST-HEADERS PATH" line per request.
    fn requests(&self) -> String {
        std::fs::read_to_string(&self.requests).unwrap_or_default()
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

/// Runs a step script with an allow-list and returns its stdout and the network
/// attempts its signed link records.
fn run_step(
    daemon: &Daemon,
    servers: &Servers,
    allow: &[String],
    script: &str,
) -> (String, Vec<Value>) {
    let attest = daemon.path("attest");
    let mut args = vec![
        "run".to_string(),
        "--attest-dir".into(),
        attest.to_str().unwrap().into(),
        "--input".into(),
        format!("{}:ca.pem", servers.ca.display()),
    ];
    for entry in allow {
        args.extend(["--allow-net".to_string(), entry.clone()]);
    }
    args.extend(["--", "/bin/bash", "-c", script].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = daemon.kiln(&args);
    assert!(out.status.success(), "{}", describe(&out));
    (text(&out.stdout), attempts(&signed_link(&attest, "run")))
}

fn line(stdout: &str, name: &str) -> String {
    stdout
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} line in:\n{stdout}"))
        .to_string()
}

#[test]
fn a_host_header_cannot_reach_another_virtual_host_of_an_allowed_address() {
    if !require_root("a_host_header_cannot_reach_another_virtual_host_of_an_allowed_address") {
        return;
    }
    let Some(python) = python("a_host_header_cannot_reach_another_virtual_host") else {
        return;
    };
    let servers = Servers::start(&python);
    let daemon = Daemon::start();
    let http = servers.http;
    // The server answers Host: admin.internal as another virtual host.
    let script = format!(
        r#"set +e
         echo spoofed: $(curl -sS --max-time 10 -H 'Host: admin.internal' http://127.0.0.1:{http}/hello.txt 2>&1)
         exec 3<>/dev/tcp/127.0.0.1/3128
         printf 'GET http://127.0.0.1:{http}/hello.txt HTTP/1.1\r\nHost: 127.0.0.1:{http}\r\nHost: admin.internal\r\n\r\n' >&3
         echo duplicate: $(timeout 20 cat <&3 | tr -d '\r')
         echo matching: $(curl -sS --max-time 10 -H 'Host: 127.0.0.1:{http}' http://127.0.0.1:{http}/hello.txt 2>&1)
         exit 0"#
    );
    let (stdout, attempts) = run_step(&daemon, &servers, &[format!("127.0.0.1:{http}")], &script);
    let spoofed = line(&stdout, "spoofed");
    assert!(!spoofed.contains("admin vhost"), "{stdout}");
    assert!(spoofed.contains("Host header"), "{stdout}");
    let duplicate = line(&stdout, "duplicate");
    assert!(!duplicate.contains("admin vhost"), "{stdout}");
    assert!(duplicate.contains("403"), "{stdout}");
    assert_eq!(
        line(&stdout, "matching"),
        "matching: hello through the proxy"
    );
    // Nothing reached the server with any Host but the checked authority.
    let requests = servers.requests();
    assert!(!requests.contains("admin.internal"), "{requests}");
    assert_eq!(requests, format!("127.0.0.1:{http} /hello.txt\n"));
    // Both refusals are in the signed link.
    let refused: Vec<&Value> = attempts
        .iter()
        .filter(|a| a["decision"] == "denied" && a["host"] == "127.0.0.1" && a["port"] == http)
        .collect();
    assert_eq!(refused.len(), 2, "{attempts:#?}");
    assert!(
        refused
            .iter()
            .all(|a| a["reason"].as_str().unwrap().contains("Host")),
        "{attempts:#?}"
    );
}

#[test]
fn every_request_on_a_kept_alive_connection_is_checked_and_recorded() {
    if !require_root("every_request_on_a_kept_alive_connection_is_checked_and_recorded") {
        return;
    }
    let Some(python) = python("every_request_on_a_kept_alive_connection_is_checked") else {
        return;
    };
    let servers = Servers::start(&python);
    let daemon = Daemon::start();
    let http = servers.http;
    // Three requests pipelined on one connection: two allowed, then the metadata
    // address, which the list does not name (the proxy never connects to it).
    let script = format!(
        r#"set +e
         exec 3<>/dev/tcp/127.0.0.1/3128
         printf 'GET http://127.0.0.1:{http}/hello.txt HTTP/1.1\r\nHost: 127.0.0.1:{http}\r\n\r\nGET http://127.0.0.1:{http}/again.txt HTTP/1.1\r\n\r\nGET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n' >&3
         timeout 20 cat <&3 | tr -d '\r' | grep -E '^(HTTP/|kiln proxy|hello)'
         exit 0"#
    );
    let (stdout, attempts) = run_step(&daemon, &servers, &[format!("127.0.0.1:{http}")], &script);
    let statuses: Vec<&str> = stdout.lines().filter(|l| l.starts_with("HTTP/")).collect();
    assert_eq!(statuses.len(), 3, "{stdout}");
    assert!(statuses[0].contains(" 200"), "{stdout}");
    assert!(statuses[1].contains(" 404"), "{stdout}");
    assert!(statuses[2].contains(" 403"), "{stdout}");
    // Each request is its own attempt in the link, the refused one included.
    let gets: Vec<&Value> = attempts
        .iter()
        .filter(|a| a["method"] == "GET" && a["host"] == "127.0.0.1" && a["port"] == http)
        .collect();
    assert_eq!(gets.len(), 2, "{attempts:#?}");
    assert!(
        gets.iter().all(|a| a["decision"] == "allowed"),
        "{attempts:#?}"
    );
    let metadata = find(&attempts, "GET", "169.254.169.254", 80);
    assert_eq!(metadata["decision"], "denied", "{metadata}");
    assert_eq!(metadata["address"], "", "{metadata}");
    // The server saw exactly the two allowed requests, each with its own Host.
    assert_eq!(
        servers.requests(),
        format!("127.0.0.1:{http} /hello.txt\n127.0.0.1:{http} /again.txt\n")
    );
}

#[test]
fn a_tunnel_must_carry_tls_naming_the_host_it_was_opened_for() {
    if !require_root("a_tunnel_must_carry_tls_naming_the_host_it_was_opened_for") {
        return;
    }
    let Some(python) = python("a_tunnel_must_carry_tls_naming_the_host_it_was_opened_for") else {
        return;
    };
    let servers = Servers::start(&python);
    let daemon = Daemon::start();
    let (http, https) = (servers.http, servers.https);
    // localhost resolves to loopback, so its literal address is listed too.
    let allow = [
        format!("localhost:{https}"),
        format!("localhost:{http}"),
        format!("127.0.0.1:{https}"),
        format!("127.0.0.1:{http}"),
    ];
    let script = format!(
        r#"set +e
         echo named: $(curl -sS --max-time 10 --cacert ca.pem https://localhost:{https}/hello.txt 2>&1)
         echo other-sni: $(curl -sS --max-time 10 -k --connect-to evil.kiln.test:{https}:localhost:{https} https://evil.kiln.test:{https}/hello.txt 2>&1; echo rc=$?)
         echo plain-to-name: $(curl -sS --max-time 30 -p http://localhost:{http}/hello.txt 2>&1; echo rc=$?)
         echo plain-to-address: $(curl -sS --max-time 30 -p http://127.0.0.1:{http}/hello.txt 2>&1)
         exit 0"#
    );
    let (stdout, attempts) = run_step(&daemon, &servers, &allow, &script);
    assert_eq!(line(&stdout, "named"), "named: hello through the proxy");
    let other = line(&stdout, "other-sni");
    assert!(!other.contains("hello"), "{stdout}");
    assert!(!other.ends_with("rc=0"), "{stdout}");
    let plain = line(&stdout, "plain-to-name");
    assert!(!plain.contains("hello"), "{stdout}");
    assert!(!plain.ends_with("rc=0"), "{stdout}");
    assert_eq!(
        line(&stdout, "plain-to-address"),
        "plain-to-address: hello through the proxy"
    );

    let connects: Vec<&Value> = attempts
        .iter()
        .filter(|a| a["method"] == "CONNECT")
        .collect();
    let named = connects
        .iter()
        .find(|a| a["sni"] == "localhost")
        .unwrap_or_else(|| panic!("{attempts:#?}"));
    assert_eq!(named["decision"], "allowed", "{named}");
    assert_eq!(named["host"], "localhost", "{named}");
    let spoofed = connects
        .iter()
        .find(|a| a["sni"] == "evil.kiln.test")
        .unwrap_or_else(|| panic!("{attempts:#?}"));
    assert_eq!(spoofed["decision"], "denied", "{spoofed}");
    assert_eq!(spoofed["host"], "localhost", "{spoofed}");
    assert_eq!(spoofed["address"], "", "{spoofed}");
    let plain = find(&attempts, "CONNECT", "localhost", http);
    assert_eq!(plain["decision"], "denied", "{plain}");
    assert!(plain["reason"].as_str().unwrap().contains("TLS"), "{plain}");
    assert_eq!(
        find(&attempts, "CONNECT", "127.0.0.1", http)["decision"],
        "allowed"
    );
    // The TLS server was reached once (the named fetch), the plain one once.
    let requests = servers.requests();
    assert_eq!(requests.matches("/hello.txt").count(), 2, "{requests}");
}
