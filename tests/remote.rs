//! The daemon over TCP with mutual TLS: a real daemon with a Unix and a TCP listener,
//! certificates made here (rcgen). A job runs end to end over TLS with the `kiln` CLI
//! and with grpcio; clients without a good certificate, or speaking TLS 1.2, are
//! refused in the handshake; certificates and the client CA are reloaded without a
//! restart, and a broken new file keeps the old ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use support::{describe, require_root, text, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_ID: &str = "spiffe://example.org/ci";
/// The tenant the test's client certificate belongs to: a TLS client must be a member.
const TENANT: &str = "\n[tenants.ci]\nidentities = [\"spiffe://example.org/ci\"]\n";

/// A certificate authority made for the test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate and its key (PEM), for a server or a client.
    fn leaf(
        &self,
        sans: Vec<SanType>,
        server: bool,
        serial: u64,
        expired: bool,
    ) -> (String, String) {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server(&self, serial: u64) -> (String, String) {
        self.leaf(
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress(Ipv4Addr::LOCALHOST.into()),
            ],
            true,
            serial,
            false,
        )
    }

    fn client(&self, expired: bool) -> (String, String) {
        self.leaf(
            vec![
                SanType::URI(CLIENT_ID.try_into().unwrap()),
                SanType::DnsName("ci.example.org".try_into().unwrap()),
            ],
            false,
            7,
            expired,
        )
    }
}

/// The files of a TLS setup: the server's certificate, key and client CA, and the
/// server CA a client trusts.
struct Pki {
    dir: tempfile::TempDir,
    server_ca: Ca,
    client_ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::Builder::new()
                .prefix("kiln-tls-")
                .tempdir()
                .unwrap(),
            server_ca: Ca::new("kiln test server CA"),
            client_ca: Ca::new("kiln test client CA"),
        };
        let (cert, key) = pki.server_ca.server(1);
        pki.write("server.pem", &cert);
        pki.write("server.key", &key);
        pki.write("clients.pem", &pki.client_ca.pem);
        pki.write("server-ca.pem", &pki.server_ca.pem);
        let (cert, key) = pki.client_ca.client(false);
        pki.write("client.pem", &cert);
        pki.write("client.key", &key);
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, content: &str) {
        // Written beside and renamed over, as a certificate manager does.
        let temporary = self.path(&format!(".{name}.new"));
        std::fs::write(&temporary, content).unwrap();
        std::fs::rename(&temporary, self.path(name)).unwrap();
    }

    /// A client configuration with this certificate and key (PEM), trusting the
    /// server CA.
    fn client_config(&self, cert: &str, key: &str) -> rustls::ClientConfig {
        runner::cli::client::client_tls_config(
            cert.as_bytes(),
            key.as_bytes(),
            self.server_ca.pem.as_bytes(),
        )
        .unwrap()
    }

    fn good_client(&self) -> rustls::ClientConfig {
        self.client_config(
            &std::fs::read_to_string(self.path("client.pem")).unwrap(),
            &std::fs::read_to_string(self.path("client.key")).unwrap(),
        )
    }
}

/// A port on loopback that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon with its `--socket`, a second Unix socket of mode 0600, and a TLS listener
/// on loopback.
fn start_daemon(pki: &Pki) -> (Daemon, u16, tempfile::NamedTempFile) {
    start_daemon_with(pki, "")
}

fn start_daemon_with(pki: &Pki, extra: &str) -> (Daemon, u16, tempfile::NamedTempFile) {
    let port = free_port();
    let config = support::config_file(&format!(
        "{extra}[[listen]]\nunix = {:?}\nmode = \"0600\"\n\n[[listen]]\ntcp = \"127.0.0.1:{port}\"\ntls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\n{TENANT}",
        pki.path("second.sock"),
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("clients.pem"),
    ));
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    (daemon, port, config)
}

/// What a TLS client sees of the listener: Ok with the serial number of the server's
/// certificate when the handshake succeeds and the server then speaks HTTP/2 (its
/// SETTINGS frame arrives), or the error that ended the connection.
async fn probe(port: u16, config: rustls::ClientConfig) -> Result<u8, String> {
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let serial = {
        let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        *cert.raw_serial().last().unwrap()
    };
    // In TLS 1.3 the server judges the client's certificate after the client finished
    // its side: a refusal arrives as an alert on the first read.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut frame = [0u8; 9];
    match tls.read_exact(&mut frame).await {
        Ok(_) if frame[3] == 0x04 => Ok(serial),
        Ok(_) => Err(format!("not a SETTINGS frame: {frame:?}")),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// How a TLS handshake with the listener went (a full one, or a resumed session).
async fn probe_kind(port: u16, config: rustls::ClientConfig) -> Option<rustls::HandshakeKind> {
    let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.handshake_kind()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The `kiln` flags that reach the daemon's TLS listener with the good client.
fn remote_flags(pki: &Pki, port: u16) -> Vec<String> {
    vec![
        "--server".into(),
        format!("https://localhost:{port}"),
        "--tls-cert".into(),
        pki.path("client.pem").display().to_string(),
        "--tls-key".into(),
        pki.path("client.key").display().to_string(),
        "--tls-ca".into(),
        pki.path("server-ca.pem").display().to_string(),
    ]
}

fn kiln(daemon: &Daemon, args: &[String]) -> std::process::Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    daemon.kiln(&args)
}

#[test]
fn a_job_runs_over_mutual_tls_and_bad_clients_are_refused_in_the_handshake() {
    if !require_root("a_job_runs_over_mutual_tls_and_bad_clients_are_refused_in_the_handshake") {
        return;
    }
    let pki = Pki::new();
    let (daemon, port, _config) = start_daemon(&pki);

    // The config's second socket, with its mode.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(pki.path("second.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // (a) `kiln run` over TLS, the options before the subcommand: the job runs and its
    // output comes back.
    let mut args = remote_flags(&pki, port);
    args.extend(
        [
            "run",
            "--output",
            "out.txt",
            "--out",
            "remote-out",
            "--",
            "/bin/sh",
            "-c",
            "echo hi > out.txt",
        ]
        .map(String::from),
    );
    let out = kiln(&daemon, &args);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        std::fs::read_to_string(daemon.path("remote-out/out.txt")).unwrap(),
        "hi\n"
    );

    // The options after the subcommand, and from the environment.
    let mut args: Vec<String> = ["keys", "public"].map(String::from).to_vec();
    args.extend(remote_flags(&pki, port));
    let out = kiln(&daemon, &args);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("BEGIN PUBLIC KEY"),
        "{}",
        describe(&out)
    );
    let out = std::process::Command::new(support::KILN)
        .args(["keys", "public"])
        .env("KILN_SOCKET", "/nonexistent/kiln.sock")
        .env("KILN_SERVER", format!("https://127.0.0.1:{port}"))
        .env("KILN_TLS_CERT", pki.path("client.pem"))
        .env("KILN_TLS_KEY", pki.path("client.key"))
        .env("KILN_TLS_CA", pki.path("server-ca.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));

    // A TLS client is not an operator: root's job over the socket is not its to see.
    let rt = runtime();
    let root_job = rt.block_on(async {
        let client = runner::cli::client::Client::connect(&daemon.socket)
            .await
            .unwrap();
        client
            .submit(agent_proto::v1::JobSpec {
                name: "root's".into(),
                image: "host".into(),
                steps: vec![agent_proto::v1::Step {
                    name: "s".into(),
                    argv: vec!["/bin/true".into()],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
    });
    let mut args = remote_flags(&pki, port);
    args.extend(["status".to_string(), root_job.clone()]);
    let out = kiln(&daemon, &args);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(text(&out.stderr).contains("NotFound"), "{}", describe(&out));

    // A missing client certificate file is named.
    let mut args = remote_flags(&pki, port);
    args[3] = pki.path("missing.pem").display().to_string();
    args.extend(["keys", "public"].map(String::from));
    let out = kiln(&daemon, &args);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("missing.pem"),
        "{}",
        describe(&out)
    );

    // (b) The good client speaks HTTP/2 with the daemon; a client without a
    // certificate, with one from another CA, or with an expired one is refused in the
    // handshake: an alert, never the daemon's HTTP/2 SETTINGS.
    rt.block_on(async {
        probe(port, pki.good_client()).await.unwrap();
        // No resumption: a second connection of the same client is a full handshake,
        // its certificate checked again.
        let client = pki.good_client();
        probe(port, client.clone()).await.unwrap();
        assert_eq!(
            probe_kind(port, client).await,
            Some(rustls::HandshakeKind::Full)
        );

        let provider = runner::daemon::tls::crypto_provider();
        let roots = runner::cli::client::ca_roots(pki.server_ca.pem.as_bytes()).unwrap();
        let anonymous = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let err = probe(port, anonymous).await.unwrap_err();
        assert!(err.contains("CertificateRequired"), "{err}");

        let stranger = Ca::new("another CA");
        let (cert, key) = stranger.client(false);
        let err = probe(port, pki.client_config(&cert, &key))
            .await
            .unwrap_err();
        assert!(err.contains("alert"), "{err}");

        let (cert, key) = pki.client_ca.client(true);
        let err = probe(port, pki.client_config(&cert, &key))
            .await
            .unwrap_err();
        assert!(err.contains("CertificateExpired"), "{err}");

        // (c) TLS 1.2 only: refused at the ClientHello.
        let (cert, key) = pki.client_ca.client(false);
        let old = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        let err = probe(port, old).await.unwrap_err();
        assert!(
            err.starts_with("handshake:") && err.contains("ProtocolVersion"),
            "{err}"
        );

        // Through the CLI's own connector, a refused client gets no answer either.
        let (cert, key) = stranger.client(false);
        let refused = async {
            let channel = runner::cli::client::channel_over_tls(
                &format!("https://localhost:{port}"),
                Arc::new(pki.client_config(&cert, &key)),
            )
            .await?;
            agent_proto::v1::attestations_client::AttestationsClient::new(channel)
                .get_public_key(agent_proto::v1::GetPublicKeyRequest {})
                .await?;
            anyhow::Ok(())
        };
        assert!(refused.await.is_err());
    });
    // The CLI with that certificate fails, saying it was the TLS connection.
    let (cert, key) = Ca::new("a third CA").client(false);
    pki.write("stranger.pem", &cert);
    pki.write("stranger.key", &key);
    let mut args = remote_flags(&pki, port);
    args[3] = pki.path("stranger.pem").display().to_string();
    args[5] = pki.path("stranger.key").display().to_string();
    args.extend(["keys", "public"].map(String::from));
    let out = kiln(&daemon, &args);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("TLS connection"),
        "{}",
        describe(&out)
    );
    assert!(
        daemon.log().contains("TLS handshake failed"),
        "{}",
        daemon.log()
    );

    // A certificate from the right CA that names no identity (no SAN URI or DNS name)
    // gets through the handshake but identifies nobody.
    let (cert, key) = pki.client_ca.leaf(Vec::new(), false, 9, false);
    let status = rt.block_on(async {
        let channel = runner::cli::client::channel_over_tls(
            &format!("https://localhost:{port}"),
            Arc::new(pki.client_config(&cert, &key)),
        )
        .await
        .unwrap();
        agent_proto::v1::attestations_client::AttestationsClient::new(channel)
            .get_public_key(agent_proto::v1::GetPublicKeyRequest {})
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}

/// Whether the peer closed the connection within `wait` (reads reach end of file).
fn closed_by_peer(stream: &mut std::net::TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(stream, &mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Idle TCP connections count in the caps before any handshake (per peer address), and
/// are closed when no handshake finished by the deadline; the socket's clients are
/// served meanwhile, and TLS clients again once the flood is gone.
#[test]
fn tls_connections_count_in_the_caps_and_must_finish_the_handshake_in_time() {
    if !require_root("tls_connections_count_in_the_caps_and_must_finish_the_handshake_in_time") {
        return;
    }
    let pki = Pki::new();
    let (daemon, port, _config) = start_daemon_with(
        &pki,
        "max_connections_per_client = 3\nconnection_handshake_timeout_seconds = 2\n",
    );
    let rt = runtime();
    // Half a ClientHello, then nothing.
    let mut flood: Vec<_> = (0..10)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
            std::io::Write::write_all(&mut stream, &[0x16, 0x03, 0x01, 0x01, 0x00]).unwrap();
            stream
        })
        .collect();
    // The socket's clients count apart: served during the flood.
    rt.block_on(async {
        let client = runner::cli::client::Client::connect(&daemon.socket)
            .await
            .unwrap();
        client.public_key().await.unwrap();
    });
    let closed = flood
        .iter_mut()
        .map(|stream| closed_by_peer(stream, Duration::from_secs(15)))
        .filter(|closed| *closed)
        .count();
    assert_eq!(closed, 10, "idle connections the daemon never closed");
    let log = daemon.log();
    assert!(log.contains("max_connections_per_client"), "{log}");
    assert!(
        log.contains("no TLS handshake before the handshake deadline"),
        "{log}"
    );
    // Their places are given back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(err) = rt.block_on(probe(port, pki.good_client())) {
        assert!(Instant::now() < deadline, "{err}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

use rustls::pki_types::pem::PemObject;

/// Waits until a probe with `config` gives the serial `want` (a reload is applied
/// asynchronously); the last result otherwise.
fn wait_for_serial(
    rt: &tokio::runtime::Runtime,
    port: u16,
    config: &rustls::ClientConfig,
    want: u8,
) -> Result<u8, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = rt.block_on(probe(port, config.clone()));
        if seen == Ok(want) || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hangup(daemon: &Daemon) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.pid().unwrap()).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

#[test]
fn certificates_and_the_client_ca_reload_without_a_restart() {
    if !require_root("certificates_and_the_client_ca_reload_without_a_restart") {
        return;
    }
    let pki = Pki::new();
    let (mut daemon, port, _config) = start_daemon(&pki);
    let rt = runtime();
    let old_client = pki.good_client();
    assert_eq!(rt.block_on(probe(port, old_client.clone())).unwrap(), 1);

    // A new server certificate and a new client CA, then SIGHUP.
    let new_ca = Ca::new("kiln test client CA 2");
    let (cert, key) = pki.server_ca.server(2);
    pki.write("server.pem", &cert);
    pki.write("server.key", &key);
    pki.write("clients.pem", &new_ca.pem);
    hangup(&daemon);
    let (cert, key) = new_ca.client(false);
    let new_client = pki.client_config(&cert, &key);
    assert_eq!(
        wait_for_serial(&rt, port, &new_client, 2).unwrap(),
        2,
        "{}",
        daemon.log()
    );
    let err = rt.block_on(probe(port, old_client)).unwrap_err();
    assert!(err.contains("alert"), "{err}");

    // A broken key: the listener keeps what it had, and the log names it.
    pki.write(
        "server.key",
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    );
    hangup(&daemon);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log().contains("could not reload the TLS files") {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.log().contains("listen[1]"), "{}", daemon.log());
    assert_eq!(rt.block_on(probe(port, new_client.clone())).unwrap(), 2);
    assert!(daemon.is_running());

    // Good files again, with no signal: the change is noticed.
    let (cert, key) = pki.server_ca.server(3);
    pki.write("server.key", &key);
    pki.write("server.pem", &cert);
    assert_eq!(
        wait_for_serial(&rt, port, &new_client, 3).unwrap(),
        3,
        "{}",
        daemon.log()
    );
    assert!(daemon.stop().success());
    // Every reload, the failed one too, is in the audit log.
    let audit = std::fs::read_to_string(daemon.dir.path().join("state/audit/audit.jsonl")).unwrap();
    let reloads: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"config.reload\""))
        .collect();
    assert!(reloads.iter().any(|l| l.contains("failed")), "{audit}");
    assert!(
        reloads.iter().any(|l| l.contains("reloaded the TLS")),
        "{audit}"
    );
}

#[test]
fn a_python_grpcio_client_runs_a_job_over_mutual_tls() {
    if !require_root("a_python_grpcio_client_runs_a_job_over_mutual_tls") {
        return;
    }
    let Some(python) = support::python("a_python_grpcio_client_runs_a_job_over_mutual_tls") else {
        return;
    };
    let pki = Pki::new();
    let (daemon, port, _config) = start_daemon(&pki);
    let stubs = tempfile::tempdir().unwrap();
    let proto = support::repo_root().join("agent-proto/proto");
    let out = std::process::Command::new(&python)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.display()))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg(proto.join("kiln/v1/kiln.proto"))
        .output()
        .unwrap();
    assert!(out.status.success(), "protoc: {}", describe(&out));
    let out = std::process::Command::new(&python)
        .arg(support::repo_root().join("tests/py/remote_job.py"))
        .arg(format!("127.0.0.1:{port}"))
        .arg("localhost")
        .arg(pki.path("server-ca.pem"))
        .arg(pki.path("client.pem"))
        .arg(pki.path("client.key"))
        .env("PYTHONPATH", stubs.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["state"], "JOB_STATE_SUCCEEDED", "{seen}");
    assert_eq!(seen["outputs"]["out.txt"], "hi\n", "{seen}");
    assert!(
        seen["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "job_finished"),
        "{seen}"
    );
}

/// A TCP listener whose files do not load stops the start, naming the listener and the
/// file; the daemon never runs without a listener it was configured with.
#[test]
fn a_bad_tls_file_at_start_stops_the_daemon_naming_the_listener() {
    if !require_root("a_bad_tls_file_at_start_stops_the_daemon_naming_the_listener") {
        return;
    }
    let pki = Pki::new();
    pki.write("server.key", "not a key\n");
    let config = support::config_file(&format!(
        "[[listen]]\ntcp = \"127.0.0.1:{}\"\ntls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\n{TENANT}",
        free_port(),
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("clients.pem"),
    ));
    let state = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(support::KILN)
        .arg("--socket")
        .arg(pki.path("kiln.sock"))
        .args([
            "serve",
            "--config",
            config.path().to_str().unwrap(),
            "--state-dir",
        ])
        .arg(state.path().join("state"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("listen[0]") && err.contains("tls_key"),
        "{err}"
    );
}

/// Two tenants over TCP: each certificate maps to its own tenant, and neither sees,
/// cancels or reads the other's jobs and blobs.
#[test]
fn two_tenants_over_tls_see_nothing_of_each_other() {
    if !require_root("two_tenants_over_tls_see_nothing_of_each_other") {
        return;
    }
    use agent_proto::v1::content_store_client::ContentStoreClient;
    use agent_proto::v1::jobs_client::JobsClient;
    use agent_proto::v1::{
        CancelRequest, GetRequest, JobSpec, ReadRequest, Step, SubmitRequest, WhoAmIRequest,
    };
    let pki = Pki::new();
    let (web_cert, web_key) = pki.client_ca.leaf(
        vec![SanType::URI("spiffe://example.org/web".try_into().unwrap())],
        false,
        9,
        false,
    );
    let (daemon, port, _config) = start_daemon_with(
        &pki,
        "[tenants.web]\nidentities = [\"spiffe://example.org/web\"]\n\n",
    );
    let server = format!("https://localhost:{port}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let connect = |config: rustls::ClientConfig| {
            let server = server.clone();
            async move {
                runner::cli::client::channel_over_tls(&server, Arc::new(config))
                    .await
                    .unwrap()
            }
        };
        let ci = connect(pki.good_client()).await;
        let web = connect(pki.client_config(&web_cert, &web_key)).await;
        let whoami = |channel: tonic::transport::Channel| async move {
            JobsClient::new(channel)
                .who_am_i(WhoAmIRequest {})
                .await
                .unwrap()
                .into_inner()
        };
        assert_eq!(whoami(ci.clone()).await.tenant, "ci");
        assert_eq!(whoami(web.clone()).await.tenant, "web");

        let spec = JobSpec {
            name: "secret".into(),
            image: "host".into(),
            steps: vec![Step {
                name: "make".into(),
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo ci-secret > out.txt".into(),
                ],
                ..Default::default()
            }],
            outputs: vec!["out.txt".into()],
            ..Default::default()
        };
        let mut ci_jobs = JobsClient::new(ci.clone());
        let id = ci_jobs
            .submit(SubmitRequest {
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let deadline = Instant::now() + Duration::from_secs(60);
        let job = loop {
            let job = ci_jobs
                .get(GetRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if job.finished_unix_ms != 0 {
                break job;
            }
            assert!(Instant::now() < deadline, "the job did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let output = job.outputs[0].digest.clone();

        let mut web_jobs = JobsClient::new(web.clone());
        let err = web_jobs
            .get(GetRequest { job_id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        let err = web_jobs
            .cancel(CancelRequest { job_id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        let read = async {
            let mut stream = ContentStoreClient::new(web.clone())
                .read(ReadRequest {
                    digest: output.clone(),
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        };
        assert_eq!(read.await.unwrap_err().code(), tonic::Code::NotFound);
        // The owner reads it.
        let mut stream = ContentStoreClient::new(ci)
            .read(ReadRequest { digest: output })
            .await
            .unwrap()
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            data.extend(chunk.data);
        }
        assert_eq!(data, b"ci-secret\n");
    });
    assert!(daemon.log().contains("listening"));
}
