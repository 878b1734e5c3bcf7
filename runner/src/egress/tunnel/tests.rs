#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::egress::proxy::ProxyLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::egress::testing::{
    client_hello, opened, origin, proxy, read_answer, records, through_tunnel,
};

#[tokio::test]
async fn tunnels_allowed_connect() {
    let (port, _) = origin().await;
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
    // A tunnel to a listed address may carry something other than TLS.
    let back = through_tunnel(&p, &format!("127.0.0.1:{port}"), b"ping").await;
    assert_eq!(back, b"ping");
    let report = p.finish().await;
    assert_eq!(report.attempts[0].decision, "allowed");
    assert_eq!(report.attempts[0].bytes_up, 4);
}

#[tokio::test]
async fn a_tunnel_opens_only_for_a_client_hello_naming_its_host() {
    let (port, accepted) = origin().await;
    let p = proxy(
        &[&format!("origin.test:{port}"), &format!("127.0.0.1:{port}")],
        &[("origin.test", "127.0.0.1")],
        ProxyLimits::default(),
    )
    .await;
    let target = format!("origin.test:{port}");
    // The right name, in any case: the hello reaches the origin unchanged.
    let hello = client_hello(Some("Origin.Test"));
    assert_eq!(through_tunnel(&p, &target, &hello).await, hello);
    // The hello split over two records and written in pieces.
    let whole = client_hello(Some("origin.test"));
    let handshake = &whole[5..];
    let split = records(&[&handshake[..10], &handshake[10..]]);
    assert_eq!(through_tunnel(&p, &target, &split).await, split);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // Another name, no name, no TLS at all, or a name in a tunnel to an address:
    // closed before anything is connected.
    for (target, first) in [
        (target.clone(), client_hello(Some("admin.internal"))),
        (target.clone(), client_hello(None)),
        (target.clone(), b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        (
            format!("127.0.0.1:{port}"),
            client_hello(Some("origin.test")),
        ),
    ] {
        let back = through_tunnel(&p, &target, &first).await;
        assert!(back.is_empty(), "{target}: {back:?}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // A tunnel to an address may carry TLS without a name.
    let nameless = client_hello(None);
    let back = through_tunnel(&p, &format!("127.0.0.1:{port}"), &nameless).await;
    assert_eq!(back, nameless);
    let report = p.finish().await;
    let seen: Vec<(&str, &str, &str)> = report
        .attempts
        .iter()
        .map(|a| (a.host.as_str(), a.sni.as_str(), a.decision.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("origin.test", "origin.test", "allowed"),
            ("origin.test", "origin.test", "allowed"),
            ("origin.test", "admin.internal", "denied"),
            ("origin.test", "", "denied"),
            ("origin.test", "", "denied"),
            ("127.0.0.1", "origin.test", "denied"),
            ("127.0.0.1", "", "allowed"),
        ]
    );
    let reasons: Vec<&str> = report.attempts.iter().map(|a| a.reason.as_str()).collect();
    assert!(
        reasons[2].contains("names admin.internal, not origin.test"),
        "{reasons:?}"
    );
    assert!(reasons[3].contains("no server (SNI)"), "{reasons:?}");
    assert!(reasons[4].contains("must carry TLS"), "{reasons:?}");
    assert!(report.attempts[2..6].iter().all(|a| a.address.is_empty()));
}

#[test]
fn a_tunnel_to_a_name_opens_only_for_tls_naming_it_and_one_to_an_address_for_no_name() {
    use super::{judge, Verdict};
    use crate::egress::tls::Hello;
    let timeout = Duration::from_secs(10);
    let tls = |sni: Option<&str>, ech: bool| Hello::Tls {
        sni: sni.map(String::from),
        ech,
    };
    let refused = |verdict: Verdict, part: &str| {
        assert!(
            matches!(&verdict, Verdict::Refuse(reason) if reason.contains(part)),
            "{verdict:?}, expected a refusal with {part:?}"
        );
    };
    let name = "origin.test";
    assert_eq!(
        judge(tls(Some("Origin.Test."), false), name, false, timeout),
        Verdict::Open { ech: false }
    );
    assert_eq!(
        judge(tls(Some("origin.test"), true), name, false, timeout),
        Verdict::Open { ech: true }
    );
    refused(
        judge(tls(Some("a.test"), false), name, false, timeout),
        "names a.test, not",
    );
    refused(
        judge(tls(None, false), name, false, timeout),
        "no server (SNI)",
    );
    refused(judge(Hello::NotTls, name, false, timeout), "must carry TLS");
    refused(judge(Hello::Silent, name, false, timeout), "within 10 s");
    refused(
        judge(Hello::Refused("bad".into()), name, false, timeout),
        "bad",
    );
    assert_eq!(
        judge(Hello::Closed, name, false, timeout),
        Verdict::ClientGone
    );

    let address = "127.0.0.1";
    for open in [tls(None, false), Hello::NotTls, Hello::Silent] {
        assert_eq!(
            judge(open, address, true, timeout),
            Verdict::Open { ech: false }
        );
    }
    refused(
        judge(tls(Some("origin.test"), false), address, true, timeout),
        "named the address 127.0.0.1",
    );
}

/// Opens a tunnel to the echoing origin at `port` and shows it relays (so the splice
/// relay is running before the test goes on).
async fn echoing_tunnel(p: &crate::egress::proxy::Proxy, port: u16) -> TcpStream {
    let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
    s.write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_answer(&mut s).await;
    assert!(opened(head.as_bytes()), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("no echo through the tunnel")
        .unwrap();
    assert_eq!(&back, b"ping");
    s
}

/// Bytes that show where in a stream they are.
fn pattern(len: usize) -> Vec<u8> {
    (0u8..251).cycle().take(len).collect()
}

/// Writes `data` and then closes the write side, while the caller reads.
fn send_then_close(mut write: tokio::net::tcp::OwnedWriteHalf, data: Vec<u8>) {
    tokio::spawn(async move {
        let _ = write.write_all(&data).await;
        let _ = write.shutdown().await;
    });
}

async fn read_until_closed(read: &mut tokio::net::tcp::OwnedReadHalf) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), read.read_to_end(&mut got))
        .await
        .expect("the tunnel was not closed");
    got
}

#[tokio::test]
async fn a_spliced_tunnel_counts_exactly_the_bytes_it_relays() {
    let (port, _) = origin().await;
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
    let s = echoing_tunnel(&p, port).await;
    let (mut read, write) = s.into_split();
    // Several pipefuls, and not a multiple of a page.
    let sent = pattern((3 << 20) + 5);
    send_then_close(write, sent.clone());
    let got = read_until_closed(&mut read).await;
    assert!(
        got == sent,
        "{} of {} bytes came back",
        got.len(),
        sent.len()
    );
    let report = p.finish().await;
    let a = &report.attempts[0];
    let relayed = 4 + sent.len() as u64;
    assert_eq!((a.bytes_up, a.bytes_down), (relayed, relayed), "{a:?}");
}

#[tokio::test]
async fn the_byte_budget_cuts_a_spliced_tunnel() {
    let (port, _) = origin().await;
    let limits = ProxyLimits {
        max_bytes: 1 << 20,
        ..ProxyLimits::default()
    };
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], limits).await;
    let s = echoing_tunnel(&p, port).await;
    let (mut read, write) = s.into_split();
    send_then_close(write, pattern(8 << 20));
    let got = read_until_closed(&mut read).await;
    let report = p.finish().await;
    let a = &report.attempts[0];
    assert!(a.bytes_up + a.bytes_down <= 1 << 20, "{a:?}");
    assert!(a.bytes_up > 4, "the relay did not run: {a:?}");
    // The client gets no byte the budget did not pay for.
    assert!(
        got.len() as u64 + 4 <= a.bytes_down,
        "{} bytes, {a:?}",
        got.len()
    );
}

#[tokio::test]
async fn a_spliced_tunnel_passes_on_a_half_close_both_ways() {
    let (port, accepted) = origin().await;
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
    let s = echoing_tunnel(&p, port).await;
    let (mut read, write) = s.into_split();
    // The origin echoes until it reads the end of the client's side, then closes
    // its own: the client reads everything and then the end, only if the proxy
    // passed the half-close up and the origin's close back down.
    send_then_close(write, b"last words".to_vec());
    let got = read_until_closed(&mut read).await;
    assert_eq!(got, b"last words");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let report = p.finish().await;
    assert_eq!(report.attempts[0].bytes_up, 14);
    assert_eq!(report.attempts[0].bytes_down, 14);
}

#[tokio::test]
async fn a_spliced_tunnel_ends_when_the_step_ends() {
    let (port, _) = origin().await;
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
    let s = echoing_tunnel(&p, port).await;
    let (mut read, mut write) = s.into_split();
    // Bytes keep flowing while the step ends.
    tokio::spawn(async move {
        let chunk = pattern(64 * 1024);
        while write.write_all(&chunk).await.is_ok() {}
    });
    let mut some = vec![0u8; 256 * 1024];
    read.read_exact(&mut some).await.unwrap();
    let report = p.finish().await;
    assert_eq!(report.attempts.len(), 1);
    // Whatever was in flight, then the end: not a tunnel left running.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the tunnel outlived the step");
}

#[tokio::test]
async fn an_idle_spliced_tunnel_is_closed() {
    let (port, _) = origin().await;
    let limits = ProxyLimits {
        idle_timeout: Duration::from_millis(200),
        ..ProxyLimits::default()
    };
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], limits).await;
    let s = echoing_tunnel(&p, port).await;
    let (mut read, _write) = s.into_split();
    // The client's side stays open; only the idle timeout can end the tunnel.
    let got = read_until_closed(&mut read).await;
    assert!(got.is_empty(), "{got:?}");
    let report = p.finish().await;
    assert_eq!(report.attempts[0].bytes_up, 4);
}

/// An origin that echoes the first 4 bytes of each connection and then reads slowly to
/// the end, counting every byte it received or sent, and the connections still open.
struct SlowSink {
    port: u16,
    moved: std::sync::Arc<std::sync::atomic::AtomicU64>,
    open: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

async fn slow_sink() -> SlowSink {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (moved, open) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (counter, connections) = (moved.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (counter, connections) = (counter.clone(), connections.clone());
            connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut ping = [0u8; 4];
                if s.read_exact(&mut ping).await.is_ok() && s.write_all(&ping).await.is_ok() {
                    counter.fetch_add(8, Ordering::SeqCst);
                    // Not reading at first: every relay fills its buffers and waits.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        counter.fetch_add(n as u64, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                connections.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    SlowSink { port, moved, open }
}

/// Several tunnels whose origin reads slowly, all waiting to write as the budget runs
/// out: none may pass on bytes another one spent meanwhile.
#[tokio::test]
async fn tunnels_waiting_on_a_slow_origin_never_pass_more_than_the_budget_together() {
    let sink = slow_sink().await;
    let port = sink.port;
    // More than the socket buffers of one connection hold, so the relays wait to write.
    let max_bytes = 12 << 20;
    let limits = ProxyLimits {
        max_bytes,
        ..ProxyLimits::default()
    };
    let p = proxy(&[&format!("127.0.0.1:{port}")], &[], limits).await;
    // Every tunnel open before any sends: a spent budget refuses new ones.
    let mut tunnels = Vec::new();
    for _ in 0..4 {
        tunnels.push(echoing_tunnel(&p, port).await);
    }
    let mut readers = Vec::new();
    for s in tunnels {
        let (read, write) = s.into_split();
        send_then_close(write, pattern(16 << 20));
        readers.push(read);
    }
    for read in &mut readers {
        read_until_closed(read).await;
    }
    let report = p.finish().await;
    // Everything the proxy passed on reaches the origin, which reads it to the end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sink.open.load(Ordering::SeqCst) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the origin's connections stay open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = sink.moved.load(Ordering::SeqCst);
    assert!(
        received <= max_bytes,
        "the origins got {received} bytes of a {max_bytes}-byte budget"
    );
    assert!(
        received > max_bytes / 2,
        "the relays did not run: {received}"
    );
    let counted: u64 = report
        .attempts
        .iter()
        .map(|a| a.bytes_up + a.bytes_down)
        .sum();
    assert!(counted <= max_bytes, "{counted}");
}
