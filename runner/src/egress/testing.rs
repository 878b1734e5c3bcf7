//! Fixtures of the proxy's tests: an origin on loopback, a proxy with a fixed resolver,
//! a client that speaks to it, and TLS ClientHellos built byte by byte.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::netpolicy::AllowList;
use super::proxy::{Proxy, ProxyLimits, Resolver};

pub(super) fn resolver(table: &[(&str, &str)]) -> Resolver {
    let table: HashMap<String, IpAddr> = table
        .iter()
        .map(|(h, ip)| (h.to_string(), ip.parse().unwrap()))
        .collect();
    Arc::new(move |host: String| {
        let found = table.get(&host).copied();
        Box::pin(async move {
            found
                .map(|ip| vec![ip])
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such host"))
        })
    })
}

/// An origin on loopback. An HTTP request (up to its blank line, then as many
/// body bytes as its Content-Length says) is answered with "hello" for a GET and
/// with the request itself for anything else; bytes that do not start like an
/// HTTP request are echoed. Counts the connections it accepted.
pub(super) async fn origin() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                got.extend_from_slice(&buf[..n]);
                let is_http = [&b"GET "[..], b"POST ", b"PUT "]
                    .iter()
                    .any(|m| got.starts_with(m));
                if !is_http {
                    let _ = s.write_all(&got).await;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    return;
                }
                let head_end = loop {
                    if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                };
                let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while got.len() < head_end + length {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let body = if got.starts_with(b"GET ") {
                    b"hello".to_vec()
                } else {
                    got
                };
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    (port, accepted)
}

pub(super) async fn proxy(allow: &[&str], table: &[(&str, &str)], limits: ProxyLimits) -> Proxy {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Proxy::start(
        listener,
        AllowList::parse(allow).unwrap(),
        limits,
        resolver(table),
    )
    .unwrap()
}

pub(super) fn opened(out: &[u8]) -> bool {
    out.starts_with(b"HTTP/1.1 200 Connection Established\r\n")
        && out.windows(4).any(|w| w == b"\r\n\r\n")
}

/// Reads until the proxy closes, or an opened tunnel's answer is complete.
pub(super) async fn read_answer(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        match read {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
        if opened(&out) {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends a request and reads the answer: to the end, or for an opened tunnel
/// just its head.
pub(super) async fn exchange(proxy: &Proxy, request: &str) -> String {
    let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_answer(&mut s).await
}

/// Opens a tunnel, sends `first` through it and returns what comes back before
/// the tunnel closes (or 5 s pass).
pub(super) async fn through_tunnel(proxy: &Proxy, target: &str, first: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_answer(&mut s).await;
    assert!(opened(head.as_bytes()), "{head}");
    s.write_all(first).await.unwrap();
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    while back.len() < first.len() {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => back.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    back
}

/// A TLS length field of two bytes.
pub(super) fn be16(len: usize) -> [u8; 2] {
    u16::try_from(len)
        .expect("test length fits 16 bits")
        .to_be_bytes()
}

/// A TLS length field of three bytes (a handshake message's).
pub(super) fn be24(len: usize) -> [u8; 3] {
    let [high, a, b, c] = u32::try_from(len).expect("test length fits").to_be_bytes();
    assert_eq!(high, 0, "test length fits 24 bits");
    [a, b, c]
}

/// A TLS 1.2-framed ClientHello record with these extensions.
pub(super) fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    let mut block = Vec::new();
    for (kind, data) in extensions {
        block.extend(kind.to_be_bytes());
        block.extend(be16(data.len()));
        block.extend(data);
    }
    body.extend(be16(block.len()));
    body.extend(block);
    let mut handshake = vec![1];
    handshake.extend(be24(body.len()));
    handshake.extend(body);
    records(&[&handshake])
}

pub(super) fn records(fragments: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for fragment in fragments {
        out.extend([0x16, 0x03, 0x01]);
        out.extend(be16(fragment.len()));
        out.extend(*fragment);
    }
    out
}

pub(super) fn server_name(name: &str) -> (u16, Vec<u8>) {
    let name = name.as_bytes();
    let mut data = be16(name.len() + 3).to_vec();
    data.push(0);
    data.extend(be16(name.len()));
    data.extend(name);
    (0, data)
}

pub(super) fn client_hello(name: Option<&str>) -> Vec<u8> {
    let supported_versions = (43, vec![2, 0x03, 0x04]);
    match name {
        Some(name) => hello_with(&[server_name(name), supported_versions]),
        None => hello_with(&[supported_versions]),
    }
}
