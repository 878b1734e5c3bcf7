//! Who is calling, and what it may see.
//!
//! Every request is authenticated once, by [`Authenticator`] in front of every service,
//! into a [`Principal`] carried in the request's extensions; the services only ask
//! [`principal`] for it. On the Unix socket the identity is the peer's credentials
//! (SO_PEERCRED, taken by the kernel at connect time, so a client cannot claim another);
//! on a TLS listener it is the client certificate's SAN URIs and DNS names
//! ([`TlsIdentities`]), verified against the listener's client CA in the handshake.
//!
//! The rules: a job, its links, provenance and logs are visible to the principal that
//! submitted it; a blob is readable by a principal that uploaded it or whose job stored
//! it; operators (root and the configured `admin_uids`) see everything. What a caller
//! may not see is answered exactly like what does not exist.

use std::sync::Arc;

use tonic::{Request, Status};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The owner key under which the caller's jobs, blobs and idempotency keys are kept.
    pub owner: String,
    /// The caller's uid, for a local caller.
    pub uid: Option<u32>,
    /// Sees and may cancel every job, and read every blob.
    pub admin: bool,
}

impl Principal {
    /// A local caller on the Unix socket; uid 0 and `admin_uids` are operators.
    pub fn unix(uid: u32, admin_uids: &[u32]) -> Self {
        Self {
            owner: unix_owner(uid),
            uid: Some(uid),
            admin: uid == 0 || admin_uids.contains(&uid),
        }
    }

    /// Whether this caller may see what `owner` owns.
    pub fn may_see(&self, owner: &str) -> bool {
        self.admin || self.owner == owner
    }
}

/// The identities of a TLS client, taken from its verified leaf certificate: each SAN
/// URI as written (`spiffe://example.org/ci`) and each SAN DNS name as `dns:NAME`, in
/// the certificate's order. Put into every request's extensions by the TLS listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsIdentities(pub Vec<String>);

/// The owner key of a local uid.
pub fn unix_owner(uid: u32) -> String {
    format!("uid:{uid}")
}

/// The interceptor that resolves a [`Principal`] for every request, or refuses it.
#[derive(Clone)]
pub struct Authenticator {
    admin_uids: Arc<[u32]>,
}

impl Authenticator {
    pub fn new(admin_uids: &[u32]) -> Self {
        Self {
            admin_uids: admin_uids.into(),
        }
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(identities) = request.extensions().get::<TlsIdentities>() {
            let principal = tls_principal(identities)?;
            request.extensions_mut().insert(principal);
            return Ok(request);
        }
        let uid = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        let Some(uid) = uid else {
            return Err(Status::unauthenticated(
                "the caller's identity is unknown (no peer credentials)",
            ));
        };
        request
            .extensions_mut()
            .insert(Principal::unix(uid, &self.admin_uids));
        Ok(request)
    }
}

/// The principal of a TLS client: its first identity. A certificate that names none
/// (no SAN URI or DNS name) identifies nobody.
fn tls_principal(identities: &TlsIdentities) -> Result<Principal, Status> {
    let Some(first) = identities.0.first() else {
        return Err(Status::unauthenticated(
            "the client certificate names no identity (no SAN URI or DNS name)",
        ));
    };
    Ok(Principal {
        owner: format!("tls:{first}"),
        uid: None,
        admin: false,
    })
}

/// The caller of a request that passed the [`Authenticator`].
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        // Only reachable if a service were served without the authenticator: refuse.
        .ok_or_else(|| Status::unauthenticated("the caller was not authenticated"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn operators_see_everything_others_only_their_own() {
        let admins = [1500];
        let alice = Principal::unix(1000, &admins);
        let bob = Principal::unix(1001, &admins);
        assert!(alice.may_see(&alice.owner));
        assert!(!alice.may_see(&bob.owner));
        assert!(!bob.may_see(&alice.owner));
        assert!(Principal::unix(0, &admins).may_see(&alice.owner));
        assert!(Principal::unix(1500, &admins).may_see(&bob.owner));
    }

    #[test]
    fn a_request_without_peer_credentials_is_refused() {
        let mut auth = Authenticator::new(&[]);
        let err = auth.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(principal(&Request::new(())).is_err());
    }

    #[test]
    fn a_tls_client_is_its_first_identity_and_never_an_operator() {
        let mut auth = Authenticator::new(&[0]);
        let mut request = Request::new(());
        request.extensions_mut().insert(TlsIdentities(vec![
            "spiffe://example.org/ci".into(),
            "dns:ci.example.org".into(),
        ]));
        let request = auth.call(request).unwrap();
        let caller = principal(&request).unwrap();
        assert_eq!(caller.owner, "tls:spiffe://example.org/ci");
        assert_eq!(caller.uid, None);
        assert!(!caller.admin);

        let mut nameless = Request::new(());
        nameless.extensions_mut().insert(TlsIdentities(Vec::new()));
        let err = auth.call(nameless).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}
