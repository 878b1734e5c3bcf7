//! `CONNECT` tunnels: the authority is checked against the allow-list when the
//! CONNECT arrives; the tunnel opens to the checked addresses only after the client's
//! first bytes pass: a TLS ClientHello naming the CONNECT's host, or, in a tunnel to
//! a listed address, anything but a ClientHello naming a host.

use std::io::Cursor;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::http::{answer, ProxyBody};
use super::metered::Metered;
use super::record::{attempt, denied, Live};
use super::splice;
use super::state::{connect, decide, literal_ip, Shared};
use super::tls::{read_client_hello, Hello};

/// Large reads where splicing cannot apply: a bulk transfer moves in few syscalls.
const RELAY_BUFFER: usize = 256 * 1024;

/// Checks a CONNECT's authority and leaves the tunnel in `slot`; it runs once hyper
/// has sent the 200 and handed the connection over.
pub(super) async fn open_tunnel(
    shared: &Arc<Shared>,
    slot: &Mutex<Option<Tunnel>>,
    mut request: Request<Incoming>,
) -> Response<ProxyBody> {
    let uri = request.uri();
    let target = uri
        .authority()
        .filter(|_| uri.scheme().is_none())
        .and_then(|a| Some((a.host().to_string(), a.port_u16().filter(|p| *p > 0)?)))
        .filter(|_| !uri.to_string().contains('@'));
    let Some((host, port)) = target else {
        let reason = format!("{uri:?} is not HOST:PORT");
        shared.record(denied("CONNECT", "", 0, reason.clone()));
        return answer(StatusCode::BAD_REQUEST, &reason);
    };
    let (addresses, resolved) = match decide(shared, &host, port).await {
        Ok(found) => found,
        Err((reason, resolved)) => {
            let mut refused = denied("CONNECT", &host, port, reason.clone());
            refused.resolved = resolved.iter().map(ToString::to_string).collect();
            shared.record(refused);
            return answer(StatusCode::FORBIDDEN, &reason);
        }
    };
    let mut opened = attempt(
        "CONNECT",
        &host,
        port,
        "allowed",
        "on the allow-list".into(),
    );
    opened.resolved = resolved.iter().map(ToString::to_string).collect();
    // Recorded now: a tunnel still waiting for its ClientHello when the step ends
    // is in the link too.
    let live = shared.record(opened);
    let literal = literal_ip(&host).is_some();
    let Ok(mut tunnel) = slot.lock() else {
        live.update(|a| a.reason = "internal error: the tunnel was not opened".into());
        live.end();
        return answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the tunnel was not opened",
        );
    };
    *tunnel = Some(Tunnel {
        upgrade: hyper::upgrade::on(&mut request),
        host,
        port,
        literal,
        addresses,
        live,
    });
    drop(tunnel);
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    response
        .extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(
            b"Connection Established",
        ));
    response
}

/// A CONNECT that passed the allow-list.
pub(super) struct Tunnel {
    upgrade: hyper::upgrade::OnUpgrade,
    host: String,
    port: u16,
    /// The CONNECT named an address, not a name.
    literal: bool,
    addresses: Vec<IpAddr>,
    live: Arc<Live>,
}

impl Tunnel {
    /// Reads the ClientHello, checks its server name against the CONNECT's host, and
    /// only then connects and relays. The permit keeps the tunnel counted.
    pub(super) async fn run(self, shared: &Arc<Shared>, _permit: OwnedSemaphorePermit) {
        let live = self.live.clone();
        self.relay(shared).await;
        live.end();
    }

    async fn relay(self, shared: &Arc<Shared>) {
        let Tunnel {
            upgrade,
            host,
            port,
            literal,
            addresses,
            live,
        } = self;
        let Ok(upgraded) = upgrade.await else {
            live.update(|a| a.reason = "the client left before the tunnel opened".into());
            return;
        };
        // The client's own socket, for splicing, with the bytes hyper read past the
        // CONNECT; any other connection type is relayed the buffered way.
        let mut client = match upgraded.downcast::<TokioIo<Metered<TcpStream>>>() {
            Ok(parts) => Client::Socket {
                early: Cursor::new(parts.read_buf),
                socket: parts.io.into_inner(),
            },
            Err(upgraded) => Client::Other(TokioIo::new(upgraded)),
        };
        let mut hello = Vec::new();
        let head_timeout = shared.limits.head_timeout;
        let seen = match &mut client {
            Client::Socket { early, socket } => {
                first_bytes(&mut early.chain(socket), &mut hello, head_timeout).await
            }
            Client::Other(io) => first_bytes(io, &mut hello, head_timeout).await,
        };
        if let Hello::Tls {
            sni: Some(name), ..
        } = &seen
        {
            live.update(|a| a.sni = name.clone());
        }
        let ech = match judge(seen, &host, literal, head_timeout) {
            Verdict::Open { ech } => ech,
            Verdict::ClientGone => {
                live.update(|a| {
                    a.reason = "the client closed the tunnel before sending anything".into()
                });
                return;
            }
            Verdict::Refuse(reason) => {
                live.update(|a| {
                    a.decision = "denied".into();
                    a.reason = reason;
                });
                return;
            }
        };
        if ech {
            live.update(|a| {
                a.reason =
                    "on the allow-list; the ClientHello is encrypted (ECH): the server name above is its outer one"
                        .into()
            });
        }
        let (stream, address) = match connect(shared, &addresses, port).await {
            Ok(connected) => connected,
            Err(reason) => {
                live.update(|a| a.reason = reason);
                return;
            }
        };
        live.update(|a| a.address = address.to_string());
        let mut upstream = Metered::new(stream, shared.clone(), Some(live.clone()));
        if upstream.write_all(&hello).await.is_err() {
            return;
        }
        match client {
            Client::Socket { early, socket } => {
                // What hyper read past the CONNECT and the hello did not take.
                let rest = &early.get_ref()[early_position(&early)..];
                if upstream.write_all(rest).await.is_err() {
                    return;
                }
                let (client, upstream) = (socket.into_inner(), upstream.into_inner());
                if splice::relay(&client, &upstream, shared, &live)
                    .await
                    .is_ok()
                {
                    return;
                }
                let mut client = Metered::new(client, shared.clone(), None);
                let mut upstream = Metered::new(upstream, shared.clone(), Some(live));
                buffered_relay(&mut client, &mut upstream).await;
            }
            Client::Other(mut client) => buffered_relay(&mut client, &mut upstream).await,
        }
    }
}

/// The client side of an opened tunnel.
enum Client {
    /// Its socket (spliced once the hello passed), after the bytes hyper already read.
    Socket {
        early: Cursor<Bytes>,
        socket: Metered<TcpStream>,
    },
    /// Anything else hyper handed over: relayed through buffers.
    Other(TokioIo<Upgraded>),
}

fn early_position(early: &Cursor<Bytes>) -> usize {
    usize::try_from(early.position())
        .unwrap_or(usize::MAX)
        .min(early.get_ref().len())
}

/// The relay where splicing cannot apply. Ends on EOF both ways (each side's close
/// passes on as a half-close), on an error, on idleness or on a spent byte budget
/// (the metered sides fail).
async fn buffered_relay(
    client: &mut (impl AsyncRead + AsyncWrite + Unpin),
    upstream: &mut (impl AsyncRead + AsyncWrite + Unpin),
) {
    let _ = tokio::io::copy_bidirectional_with_sizes(client, upstream, RELAY_BUFFER, RELAY_BUFFER)
        .await;
}

/// The client's first bytes, read into `hello` (to be forwarded) until they are a
/// complete ClientHello, show they are none, or the head timeout passes.
async fn first_bytes(
    client: &mut (impl AsyncRead + Unpin),
    hello: &mut Vec<u8>,
    head_timeout: Duration,
) -> Hello {
    match tokio::time::timeout(head_timeout, read_client_hello(client, hello)).await {
        Ok(seen) => seen,
        Err(_) if hello.is_empty() => Hello::Silent,
        Err(_) => Hello::Refused(format!(
            "the ClientHello did not arrive within {} s",
            head_timeout.as_secs()
        )),
    }
}

/// Whether a tunnel opens, judged on its first bytes.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Connect; `ech`: the ClientHello is encrypted, so the server name checked is its
    /// outer one.
    Open {
        ech: bool,
    },
    /// The client closed before sending anything: nothing to refuse.
    ClientGone,
    Refuse(String),
}

/// A tunnel to a name must carry TLS whose ClientHello names that host; a tunnel to
/// a listed address may carry anything but a ClientHello naming a host (there is no
/// name to check it against).
fn judge(seen: Hello, host: &str, literal: bool, head_timeout: Duration) -> Verdict {
    let refuse = Verdict::Refuse;
    match seen {
        Hello::Closed => Verdict::ClientGone,
        Hello::Tls { sni, ech } => match (sni, literal) {
            (Some(name), false) if same_name(&name, host) => Verdict::Open { ech },
            (Some(name), false) => refuse(format!(
                "the TLS ClientHello names {name}, not {host}, the host of the CONNECT"
            )),
            (None, false) => refuse(format!(
                "the TLS ClientHello names no server (SNI); a tunnel to {host} must name it"
            )),
            (Some(name), true) => refuse(format!(
                "the TLS ClientHello names {name}, but the CONNECT named the address {host}"
            )),
            (None, true) => Verdict::Open { ech },
        },
        // A tunnel to a listed address may carry any protocol: there is no name
        // to check.
        Hello::NotTls | Hello::Silent if literal => Verdict::Open { ech: false },
        Hello::NotTls => refuse(format!(
            "the tunnel does not start with a TLS ClientHello; a tunnel to a name ({host}) must carry TLS"
        )),
        Hello::Silent => refuse(format!(
            "no TLS ClientHello within {} s; a tunnel to a name ({host}) must carry TLS",
            head_timeout.as_secs()
        )),
        Hello::Refused(reason) => refuse(reason),
    }
}

fn same_name(a: &str, b: &str) -> bool {
    a.trim_end_matches('.')
        .eq_ignore_ascii_case(b.trim_end_matches('.'))
}

#[cfg(test)]
mod tests;
