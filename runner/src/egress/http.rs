//! Plain HTTP through the proxy: each request in absolute form is checked, recorded
//! and sent on an upstream connection of its own, in origin form, with a Host
//! header naming the checked authority and no hop-by-hop or proxy headers.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;

use super::metered::Metered;
use super::record::{attempt, denied};
use super::state::{connect, decide, Shared};

/// A response of the origin (streamed through) or of the proxy itself.
pub(super) type ProxyBody = Either<Incoming, Full<Bytes>>;

/// An answer of the proxy itself; it closes the client connection, so a refused
/// client starts afresh.
pub(super) fn answer(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(format!("kiln proxy: {reason}\n")));
    let mut response = Response::new(Either::Right(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A plain HTTP request: checked, recorded, and sent on an upstream connection of its
/// own with a Host header naming the checked authority. The upstream connection runs
/// in `upstreams`, which closes it when the client connection ends.
pub(super) async fn forward(
    shared: &Arc<Shared>,
    upstreams: &Mutex<JoinSet<()>>,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let method = request.method().to_string();
    let target = match HttpTarget::of(request.uri()) {
        Ok(target) => target,
        Err(reason) => {
            shared.record(denied(&method, "", 0, reason.clone()));
            return answer(StatusCode::BAD_REQUEST, &reason);
        }
    };
    let (host, port) = (target.host.as_str(), target.port);
    if let Err(reason) = check_host_header(request.headers(), host, port) {
        shared.record(denied(&method, host, port, reason.clone()));
        return answer(StatusCode::FORBIDDEN, &reason);
    }
    let (addresses, resolved) = match decide(shared, host, port).await {
        Ok(found) => found,
        Err((reason, resolved)) => {
            let mut refused = denied(&method, host, port, reason.clone());
            refused.resolved = resolved.iter().map(ToString::to_string).collect();
            shared.record(refused);
            return answer(StatusCode::FORBIDDEN, &reason);
        }
    };
    let mut allowed = attempt(&method, host, port, "allowed", "on the allow-list".into());
    allowed.resolved = resolved.iter().map(ToString::to_string).collect();
    let (stream, address) = match connect(shared, &addresses, port).await {
        Ok(connected) => connected,
        Err(reason) => {
            allowed.reason = reason.clone();
            shared.record(allowed).end();
            return answer(StatusCode::BAD_GATEWAY, &reason);
        }
    };
    allowed.address = address.to_string();
    let live = shared.record(allowed);
    let io = TokioIo::new(Metered::new(stream, shared.clone(), Some(live.clone())));
    let (mut sender, upstream) = match hyper::client::conn::http1::handshake(io).await {
        Ok(handshake) => handshake,
        Err(err) => {
            let reason = format!("connecting to {address}: {err}");
            live.update(|a| a.reason = reason.clone());
            live.end();
            return answer(StatusCode::BAD_GATEWAY, &reason);
        }
    };
    if let Ok(mut upstreams) = upstreams.lock() {
        while upstreams.try_join_next().is_some() {}
        let live = live.clone();
        upstreams.spawn(async move {
            let _ = upstream.await;
            live.end();
        });
    }
    match sender.send_request(target.origin_request(request)).await {
        Ok(response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let reason = "the server switched protocols, which the proxy does not forward";
            live.update(|a| a.reason = reason.into());
            answer(StatusCode::BAD_GATEWAY, reason)
        }
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.extensions = Default::default();
            Response::from_parts(parts, Either::Left(body))
        }
        Err(err) => {
            let reason = format!("forwarding to {address}: {err}");
            live.update(|a| a.reason = reason.clone());
            answer(StatusCode::BAD_GATEWAY, &reason)
        }
    }
}

/// The destination of a plain HTTP request: its absolute-form target.
struct HttpTarget {
    /// As in the URL (an IPv6 address in brackets).
    host: String,
    port: u16,
    path: PathAndQuery,
}

impl HttpTarget {
    fn of(uri: &Uri) -> Result<HttpTarget, String> {
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => {
                return Err(format!(
                    "{uri}: only http:// URLs are forwarded; use CONNECT for TLS"
                ))
            }
            None => {
                return Err(format!(
                    "{uri}: not a proxy request (the target must be an absolute http:// URL)"
                ))
            }
        }
        let authority = uri.authority().ok_or_else(|| format!("{uri}: no host"))?;
        if authority.as_str().contains('@') {
            return Err("credentials in proxy URLs are not forwarded".into());
        }
        let port = authority.port_u16().unwrap_or(80);
        if authority.host().is_empty() || port == 0 {
            return Err(format!("{uri}: not HOST:PORT"));
        }
        let path = match uri.path_and_query() {
            Some(p) if p.as_str().starts_with('/') => p.clone(),
            Some(p) => format!("/{}", p.as_str())
                .parse()
                .map_err(|_| format!("{uri}: bad path"))?,
            None => PathAndQuery::from_static("/"),
        };
        Ok(HttpTarget {
            host: authority.host().to_string(),
            port,
            path,
        })
    }

    /// The Host header the origin gets: the checked authority, nothing the client said.
    fn host_header(&self) -> Result<HeaderValue, String> {
        let text = if self.port == 80 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        HeaderValue::from_str(&text).map_err(|_| format!("{text:?} is not a Host value"))
    }

    /// The request in origin form, without hop-by-hop and proxy headers; hyper frames
    /// the body again (so no framing header of the client reaches the origin).
    fn origin_request(&self, request: Request<Incoming>) -> Request<Incoming> {
        let (mut parts, body) = request.into_parts();
        let mut uri = hyper::http::uri::Parts::default();
        uri.path_and_query = Some(self.path.clone());
        parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = Version::HTTP_11;
        parts.extensions = Default::default();
        strip_hop_by_hop(&mut parts.headers);
        for name in [header::HOST, header::CONTENT_LENGTH, header::EXPECT] {
            parts.headers.remove(name);
        }
        // `of` parsed the host from a URI; the header value is valid.
        if let Ok(host) = self.host_header() {
            parts.headers.insert(header::HOST, host);
        }
        // One request per upstream connection.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        Request::from_parts(parts, body)
    }
}

/// The Host header may be absent (the proxy sets it) or name the request's own
/// authority; two Host headers, or one naming anything else, are refused.
fn check_host_header(headers: &HeaderMap, host: &str, port: u16) -> Result<(), String> {
    let mut values = headers.get_all(header::HOST).iter();
    let Some(value) = values.next() else {
        return Ok(());
    };
    if values.next().is_some() {
        return Err("more than one Host header".into());
    }
    let named = value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<Authority>().ok())
        .filter(|a| !a.as_str().contains('@'));
    match named {
        Some(a) if a.host().eq_ignore_ascii_case(host) && a.port_u16().unwrap_or(80) == port => {
            Ok(())
        }
        _ => Err(format!(
            "the Host header {:?} does not name the request's target {host}:{port}",
            String::from_utf8_lossy(value.as_bytes())
        )),
    }
}

/// Removes the headers that concern only one hop: those `Connection` lists, and the
/// standard ones. A response with `Transfer-Encoding` loses its `Content-Length` too:
/// hyper frames the body again.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests;
