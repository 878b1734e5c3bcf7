#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;

use crate::egress::proxy::ProxyLimits;
use crate::egress::testing::{exchange, origin, proxy};

#[tokio::test]
async fn forwards_allowed_http_and_records_it() {
    let (port, _) = origin().await;
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
    let reply = exchange(
        &p,
        &format!("GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Connection: keep-alive\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(
        reply.starts_with("HTTP/1.1 200 OK") && reply.ends_with("hello"),
        "{reply}"
    );
    let report = p.finish().await;
    assert_eq!(report.attempts.len(), 1);
    let a = &report.attempts[0];
    assert_eq!(
        (a.decision.as_str(), a.method.as_str(), a.port),
        ("allowed", "GET", port)
    );
    assert_eq!(a.address, format!("127.0.0.1:{port}"));
    assert!(a.bytes_down > 0 && a.bytes_up > 0, "{a:?}");
}

#[tokio::test]
async fn the_origin_gets_the_checked_authority_as_host_and_no_proxy_headers() {
    let (port, _) = origin().await;
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
    // No Host at all, a hop-by-hop header named by Connection, and a body.
    let reply = exchange(
        &p,
        &format!(
            "POST http://127.0.0.1:{port}/submit?q=1 HTTP/1.1\r\nProxy-Authorization: Basic eA==\r\nX-Hop: 1\r\nConnection: close, X-Hop\r\nContent-Length: 3\r\n\r\nabc"
        ),
    )
    .await;
    let echoed = reply.to_lowercase();
    assert!(echoed.starts_with("http/1.1 200 ok"), "{reply}");
    assert!(echoed.contains("post /submit?q=1 http/1.1\r\n"), "{reply}");
    assert!(
        echoed.contains(&format!("host: 127.0.0.1:{port}\r\n")),
        "{reply}"
    );
    assert!(echoed.contains("content-length: 3\r\n"), "{reply}");
    assert!(echoed.ends_with("\r\n\r\nabc"), "{reply}");
    for gone in ["proxy-authorization", "x-hop"] {
        assert!(!echoed.contains(gone), "{gone} forwarded: {reply}");
    }
    p.finish().await;
}

#[tokio::test]
async fn a_host_header_naming_another_authority_is_refused_and_recorded() {
    let (port, accepted) = origin().await;
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
    for host_lines in [
        "Host: admin.internal\r\n".to_string(),
        format!("Host: 127.0.0.1:{port}\r\nHost: admin.internal\r\n"),
        format!("Host: 127.0.0.1:{}\r\n", port.wrapping_add(1)),
        "Host: 127.0.0.1\r\n".to_string(),
        format!("Host: user@127.0.0.1:{port}\r\n"),
    ] {
        let r = exchange(
            &p,
            &format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\n{host_lines}\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 403"), "{host_lines}: {r}");
        assert!(r.contains("Host header"), "{host_lines}: {r}");
    }
    // Case does not matter; the default port may be left out.
    let r = exchange(
        &p,
        &format!(
            "GET http://LOCALHOST.test:{port}/ HTTP/1.1\r\nHost: localhost.TEST:{port}\r\n\r\n"
        ),
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("allow-list"),
        "{r}"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused request reached the origin"
    );
    let report = p.finish().await;
    assert_eq!(report.attempts.len(), 6);
    assert!(report.attempts.iter().all(|a| a.decision == "denied"));
    assert!(report.attempts[..5]
        .iter()
        .all(|a| a.reason.contains("Host header") && a.port == port));
}

#[tokio::test]
async fn every_request_on_a_connection_is_checked_and_recorded() {
    let (port, accepted) = origin().await;
    let unlisted = port.wrapping_add(1);
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
    // Two allowed requests kept alive, then one the list does not name, pipelined.
    let r = exchange(
        &p,
        &format!(
            "GET http://127.0.0.1:{port}/a HTTP/1.1\r\n\r\n\
             GET http://127.0.0.1:{port}/b HTTP/1.1\r\n\r\n\
             GET http://127.0.0.1:{unlisted}/c HTTP/1.1\r\n\r\n\
             GET http://127.0.0.1:{port}/d HTTP/1.1\r\n\r\n"
        ),
    )
    .await;
    let statuses: Vec<&str> = r.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(statuses.len(), 3, "{r}");
    assert!(
        statuses[0].starts_with("200") && statuses[1].starts_with("200"),
        "{r}"
    );
    assert!(statuses[2].starts_with("403"), "{r}");
    // Each allowed request had an upstream connection of its own; nothing after
    // the refusal was read.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let report = p.finish().await;
    let seen: Vec<(&str, u16)> = report
        .attempts
        .iter()
        .map(|a| (a.decision.as_str(), a.port))
        .collect();
    assert_eq!(
        seen,
        [("allowed", port), ("allowed", port), ("denied", unlisted)]
    );
    assert!(report.attempts[..2].iter().all(|a| a.bytes_down > 0));
}

#[tokio::test]
async fn the_byte_budget_cuts_a_forwarded_body_written_in_one_vectored_write() {
    let (port, _) = origin().await;
    let limits = ProxyLimits {
        max_bytes: 1000,
        ..ProxyLimits::default()
    };
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], limits).await;
    // Head and body go upstream together (a vectored write) unless the budget is short.
    let body = "x".repeat(16 * 1024);
    let reply = exchange(
        &p,
        &format!(
            "POST http://127.0.0.1:{port}/ HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(!reply.contains(&body[..2000]), "{reply}");
    let report = p.finish().await;
    let a = &report.attempts[0];
    assert!(a.bytes_up + a.bytes_down <= 1000, "{a:?}");
    assert!(a.bytes_up > 0, "{a:?}");
}
