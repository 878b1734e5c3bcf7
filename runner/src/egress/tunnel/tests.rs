#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::egress::proxy::ProxyLimits;
use crate::egress::testing::{client_hello, origin, proxy, records, through_tunnel};

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
