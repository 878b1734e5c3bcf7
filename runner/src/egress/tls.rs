//! The first bytes of a tunnel: whether they are a TLS ClientHello, and the server
//! name (SNI) it sends. Parsed strictly (every length must add up), so the name
//! checked here is the name the server reads.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Real ClientHellos are a few KiB (post-quantum key shares included).
const MAX_CLIENT_HELLO: usize = 32 * 1024;

/// What a tunnel's first bytes showed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Hello {
    /// A complete, well-formed ClientHello.
    Tls {
        sni: Option<String>,
        /// It carries an encrypted ClientHello (ECH): the real server name is inside.
        ech: bool,
    },
    /// The first byte is not a TLS handshake record.
    NotTls,
    /// Nothing arrived in time.
    Silent,
    /// The client closed before sending a byte.
    Closed,
    /// A broken, truncated or oversized ClientHello.
    Refused(String),
}

/// Reads from the client until its first bytes are a complete ClientHello or show
/// that they are none; every byte read stays in `buf`, to be forwarded.
pub(super) async fn read_client_hello(
    client: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Hello {
    let mut chunk = vec![0u8; 4096];
    loop {
        if let Some(seen) = parse_client_hello(buf) {
            return seen;
        }
        if buf.len() >= MAX_CLIENT_HELLO {
            return Hello::Refused(format!(
                "the ClientHello is larger than {} KiB",
                MAX_CLIENT_HELLO / 1024
            ));
        }
        let room = chunk.len().min(MAX_CLIENT_HELLO - buf.len());
        match client.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) if buf.is_empty() => return Hello::Closed,
            Ok(0) | Err(_) => {
                return Hello::Refused("the client closed the tunnel inside its ClientHello".into())
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Judges the bytes so far; `None` while a ClientHello is incomplete. Every length in
/// the hello must add up exactly: what this parser reads is what a server reads.
fn parse_client_hello(buf: &[u8]) -> Option<Hello> {
    use tls_parser::nom::Err as NomErr;
    use tls_parser::{parse_tls_handshake_client_hello, parse_tls_raw_record, TlsRecordType};
    const CLIENT_HELLO: u8 = 1;

    let first = *buf.first()?;
    if first != TlsRecordType::Handshake.0 {
        return Some(Hello::NotTls);
    }
    let refused = |why: &str| Some(Hello::Refused(format!("malformed TLS ClientHello: {why}")));
    // A ClientHello may span several handshake records.
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        let record = match parse_tls_raw_record(rest) {
            Ok((after, record)) => {
                rest = after;
                record
            }
            Err(NomErr::Incomplete(_)) => return None,
            Err(_) => return refused("bad record"),
        };
        if record.hdr.record_type != TlsRecordType::Handshake {
            return refused("a record other than a handshake inside it");
        }
        handshake.extend_from_slice(record.data);
        let Some(header) = handshake.get(..4) else {
            continue;
        };
        if header[0] != CLIENT_HELLO {
            return refused("the first handshake message is not a ClientHello");
        }
        let length =
            usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
        if length + 4 > MAX_CLIENT_HELLO {
            return Some(Hello::Refused(format!(
                "the ClientHello is larger than {} KiB",
                MAX_CLIENT_HELLO / 1024
            )));
        }
        if handshake.len() < length + 4 {
            continue;
        }
        if handshake.len() > length + 4 {
            return refused("more than the ClientHello in its records");
        }
        let hello = match parse_tls_handshake_client_hello(&handshake[4..]) {
            Ok(([], hello)) => hello,
            _ => return refused("bad or trailing fields"),
        };
        return Some(match hello.ext {
            None => Hello::Tls {
                sni: None,
                ech: false,
            },
            Some(extensions) => examine_extensions(extensions)
                .unwrap_or_else(|why| Hello::Refused(format!("malformed TLS ClientHello: {why}"))),
        });
    }
}

/// The server name and ECH of a ClientHello's extension block. Every extension's
/// length must fit and the lengths must add up to the block exactly, so no server name
/// can hide past a malformed one; at most one server name extension.
fn examine_extensions(block: &[u8]) -> Result<Hello, &'static str> {
    use tls_parser::{parse_tls_extension_sni_content, SNIType, TlsExtension};
    const SERVER_NAME: u16 = 0;
    const ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

    let mut server_names = Vec::new();
    let mut ech = false;
    let mut rest = block;
    while !rest.is_empty() {
        let [a, b, c, d, after_header @ ..] = rest else {
            return Err("bad extensions");
        };
        let kind = u16::from_be_bytes([*a, *b]);
        let length = usize::from(u16::from_be_bytes([*c, *d]));
        let (data, after) = after_header
            .split_at_checked(length)
            .ok_or("bad extensions")?;
        match kind {
            SERVER_NAME => server_names.push(data),
            ENCRYPTED_CLIENT_HELLO => ech = true,
            _ => {}
        }
        rest = after;
    }
    let sni = match server_names.as_slice() {
        [] => None,
        [data] => {
            let name = match parse_tls_extension_sni_content(data) {
                Ok(([], TlsExtension::SNI(names))) => match names.as_slice() {
                    [(SNIType::HostName, name)] if data.len() == name.len() + 5 => *name,
                    _ => return Err("the server name list is not one host name"),
                },
                _ => return Err("bad server name"),
            };
            let name = std::str::from_utf8(name)
                .ok()
                .filter(|n| is_host_name(n))
                .ok_or("the server name is not a host name")?;
            Some(name.to_ascii_lowercase())
        }
        _ => return Err("more than one server name extension"),
    };
    Ok(Hello::Tls { sni, ech })
}

/// ASCII letters, digits, '-', '_' and dots, at most 253 bytes: what a DNS name in SNI
/// can be.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests;
