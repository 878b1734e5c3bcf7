#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::egress::testing::{exchange, opened, origin, proxy, read_answer};

#[tokio::test]
async fn refuses_what_the_list_does_not_name() {
    let (port, _) = origin().await;
    let p = proxy(
        &[
            &format!("127.0.0.1:{port}"),
            "example.org:443",
            &format!("internal.test:{port}"),
        ],
        &[
            ("example.org", "93.184.216.34"),
            ("internal.test", "127.0.0.1"),
        ],
        ProxyLimits::default(),
    )
    .await;
    // Not listed at all.
    let r = exchange(&p, "CONNECT other.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("not on the step's allow-list"),
        "{r}"
    );
    // Listed host, other port.
    let r = exchange(&p, "CONNECT example.org:80 HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // Listed name that resolves to loopback: the literal entry does not cover
    // names, and the name alone may not reach the host.
    let p2 = proxy(
        &[&format!("internal.test:{port}")],
        &[("internal.test", "127.0.0.1")],
        ProxyLimits::default(),
    )
    .await;
    let r = exchange(
        &p2,
        &format!("CONNECT internal.test:{port} HTTP/1.1\r\n\r\n"),
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("loopback"),
        "{r}"
    );
    let report = p2.finish().await;
    assert_eq!(report.attempts[0].decision, "denied");
    // With the literal address also listed, the same name passes.
    let r = exchange(
        &p,
        &format!("CONNECT internal.test:{port} HTTP/1.1\r\n\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // https:// URLs must use CONNECT; origin-form requests are no proxy requests;
    // malformed requests are refused.
    let r = exchange(&p, "GET https://example.org/ HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = exchange(&p, "GET /x HTTP/1.1\r\nHost: example.org\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = exchange(&p, "GET\x01 nonsense\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let report = p.finish().await;
    let decisions: Vec<&str> = report
        .attempts
        .iter()
        .map(|a| a.decision.as_str())
        .collect();
    assert_eq!(
        decisions,
        ["denied", "denied", "allowed", "denied", "denied", "denied"]
    );
    assert!(report.attempts[5].reason.contains("malformed request"));
}

#[tokio::test]
async fn enforces_connection_and_byte_limits_and_closes_on_finish() {
    let (port, _) = origin().await;
    let limits = ProxyLimits {
        max_connections: 1,
        max_bytes: 8,
        ..ProxyLimits::default()
    };
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], limits).await;
    let mut tunnel = TcpStream::connect(p.local_addr()).await.unwrap();
    tunnel
        .write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_answer(&mut tunnel).await;
    assert!(opened(head.as_bytes()), "{head}");
    // A second connection while the first is open exceeds the limit.
    let r = exchange(&p, &format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n")).await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    // More than 8 bytes in total ends the tunnel.
    tunnel.write_all(b"0123456789abcdef").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest)).await;
    assert!(
        rest.len() < 16,
        "byte limit not enforced: {} bytes",
        rest.len()
    );
    let report = p.finish().await;
    assert!(report
        .attempts
        .iter()
        .any(|a| a.reason.contains("too many connections")));
    let tunnelled = &report.attempts[0];
    assert!(
        tunnelled.bytes_up + tunnelled.bytes_down <= 8,
        "{tunnelled:?}"
    );
}

#[tokio::test]
async fn finish_closes_open_tunnels() {
    let (port, _) = origin().await;
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
    let mut tunnel = TcpStream::connect(p.local_addr()).await.unwrap();
    tunnel
        .write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_answer(&mut tunnel).await;
    assert!(opened(head.as_bytes()), "{head}");
    let report = p.finish().await;
    assert_eq!(report.attempts.len(), 1);
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf))
        .await
        .expect("tunnel still open after the step ended")
        .unwrap_or(0);
    assert_eq!(n, 0);
}
