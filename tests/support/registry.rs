//! Debian's `docker-registry` on loopback for the registry tests, and plain HTTP/1.1
//! requests to speak to it (or to a registry of a test's own) byte by byte.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{in_ci, text};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An HTTP/1.1 answer.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on its own connection (`Connection: close`), plain HTTP on loopback.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':').unwrap();
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut body = Vec::new();
    reader.read_to_end(&mut body).unwrap();
    Answer {
        status,
        headers,
        body,
    }
}

/// Debian's docker-registry on 127.0.0.1, storing in a temporary directory.
pub struct Registry {
    pub addr: String,
    /// Where the registry keeps its blobs and manifests.
    pub storage: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// None (and says so) outside CI when docker-registry is not installed.
    pub fn start(test: &str) -> Option<Registry> {
        Self::start_with_users(test, None)
    }

    /// As [`Registry::start`]; with `htpasswd` (lines `USER:BCRYPT-HASH`), every request
    /// must carry one of those users' credentials (HTTP Basic).
    pub fn start_with_users(test: &str, htpasswd: Option<&str>) -> Option<Registry> {
        if !Path::new(REGISTRY_BIN).is_file() {
            assert!(!in_ci(), "{test}: CI=true but {REGISTRY_BIN} is missing");
            eprintln!("SKIPPED: {test} needs {REGISTRY_BIN} (apt-get install docker-registry)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // A free port: taken from the kernel, released just before the registry binds it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        );
        if let Some(users) = htpasswd {
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, users).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                file.display()
            ));
        }
        std::fs::write(&config, yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let mut child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "docker-registry exited ({status}):\n{}",
                    std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
                );
            }
            if TcpStream::connect(&addr).is_ok()
                && matches!(http(&addr, "GET", "/v2/", &[], b"").status, 200 | 401)
            {
                break;
            }
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Registry {
            addr,
            storage: dir.path().join("storage"),
            child,
            _dir: dir,
        })
    }

    /// A blob upload as the distribution API has it: POST, then PUT with the digest.
    pub fn push_blob(&self, repo: &str, blob: &[u8]) {
        let started = http(
            &self.addr,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            b"",
        );
        assert_eq!(started.status, 202, "{}", text(&started.body));
        let location = started.header("Location").unwrap();
        let path = location
            .strip_prefix(&format!("http://{}", self.addr))
            .unwrap_or(location);
        let separator = if path.contains('?') { '&' } else { '?' };
        let done = http(
            &self.addr,
            "PUT",
            &format!("{path}{separator}digest=sha256:{}", sha256(blob)),
            &[("Content-Type", "application/octet-stream")],
            blob,
        );
        assert_eq!(done.status, 201, "{}", text(&done.body));
    }

    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, manifest: &[u8]) {
        let done = http(
            &self.addr,
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", media_type)],
            manifest,
        );
        assert_eq!(done.status, 201, "{}", text(&done.body));
    }
}
