#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::egress::testing::{be16, be24, client_hello, hello_with, records, server_name};

#[test]
fn client_hellos_are_read_strictly() {
    let tls = |sni: Option<&str>| {
        Some(Hello::Tls {
            sni: sni.map(String::from),
            ech: false,
        })
    };
    let hello = client_hello(Some("a.example.org"));
    assert_eq!(parse_client_hello(&hello), tls(Some("a.example.org")));
    assert_eq!(parse_client_hello(&client_hello(None)), tls(None));
    // Every prefix is incomplete, not wrong.
    for cut in 1..hello.len() {
        assert_eq!(parse_client_hello(&hello[..cut]), None, "cut at {cut}");
    }
    assert_eq!(parse_client_hello(b""), None);
    assert_eq!(parse_client_hello(b"SSH-2.0-x\r\n"), Some(Hello::NotTls));
    assert_eq!(
        parse_client_hello(&hello_with(&[
            server_name("a.example.org"),
            (0xfe0d, vec![0; 8])
        ])),
        Some(Hello::Tls {
            sni: Some("a.example.org".into()),
            ech: true
        })
    );
    let refused = |bytes: &[u8]| matches!(parse_client_hello(bytes), Some(Hello::Refused(_)));
    // Two server names, a name list with trailing bytes, a non-host-name type, a
    // name that is not a host name.
    assert!(refused(&hello_with(&[
        server_name("a.org"),
        server_name("b.org")
    ])));
    let (_, mut data) = server_name("a.org");
    data.push(0);
    assert!(refused(&hello_with(&[(0, data)])));
    let (_, mut data) = server_name("a.org");
    data[2] = 1;
    assert!(refused(&hello_with(&[(0, data)])));
    assert!(refused(&hello_with(&[server_name("a.org\0b.org")])));
    // One byte more in the hello: past the extension block (a trailing field), or
    // inside it (an extension that does not fit).
    let grown = |extension_block_too: bool| {
        let mut hello = client_hello(Some("a.org"));
        hello.push(0x13);
        let n = hello.len();
        hello[3..5].copy_from_slice(&be16(n - 5));
        hello[6..9].copy_from_slice(&be24(n - 9));
        if extension_block_too {
            // After the record and handshake headers, version, random, an empty
            // session id, one cipher suite and one compression method.
            let at = 5 + 4 + 41;
            let block = u16::from_be_bytes([hello[at], hello[at + 1]]) + 1;
            hello[at..at + 2].copy_from_slice(&block.to_be_bytes());
        }
        hello
    };
    let reason = |bytes: &[u8]| match parse_client_hello(bytes) {
        Some(Hello::Refused(reason)) => reason,
        other => panic!("{other:?}"),
    };
    assert!(reason(&grown(false)).contains("trailing"));
    assert!(reason(&grown(true)).contains("bad extensions"));
    // Not a ClientHello, or another record type inside it.
    let mut server_hello = client_hello(None);
    server_hello[5] = 2;
    assert!(refused(&server_hello));
    let mut alert = client_hello(None);
    alert[0] = 0x15;
    assert_eq!(parse_client_hello(&alert), Some(Hello::NotTls));
    let mut mixed = records(&[&hello[5..12]]);
    mixed.extend([0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x28]);
    assert!(refused(&mixed));
    // More than a ClientHello's worth of handshake.
    let mut huge = vec![1, 0x01, 0x00, 0x00];
    huge.extend([0u8; 100]);
    assert!(refused(&records(&[&huge])));
}
