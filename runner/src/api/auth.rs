//! Who is calling, and what it may see.
//!
//! Every request is authenticated once, by [`Authenticator`] in front of every service,
//! into a [`Principal`] carried in the request's extensions; the services only ask
//! [`principal`] for it. The peer is a Unix socket uid (SO_PEERCRED, taken by the kernel
//! at connect time, so a client cannot claim another) or the SAN URIs and DNS names of a
//! TLS client certificate ([`TlsIdentities`]) verified against the listener's client CA
//! in the handshake; [`Authenticator::resolve`] is the one mapping of both.
//!
//! Without tenants, each uid is a client of its own (owner `uid:N`). With tenants, a
//! caller is its tenant (owner `tenant:NAME`), shared by every member; root on the socket
//! and `admin_uids` stay operators of no tenant; any other caller is refused.
//!
//! The rules: a job, its links, provenance and logs are visible to the owner that
//! submitted it; a blob is readable by an owner that uploaded it or whose job stored it;
//! operators (root, `admin_uids`, members of an admin tenant) see everything. What a
//! caller may not see is answered exactly like what does not exist.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::tenants::{tenant_owner, Tenants};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The owner key under which the caller's jobs, blobs and idempotency keys are kept.
    pub owner: String,
    /// The caller's uid, for a local caller.
    pub uid: Option<u32>,
    /// Sees and may cancel every job, and read every blob.
    pub admin: bool,
    /// The caller's tenant, when tenants are configured and it is a member of one.
    pub tenant: Option<String>,
    /// Owner keys of records the caller's tenant inherits: those its member uids made
    /// before they joined it (`uid:N`). Read only: new records use `owner`.
    pub inherited_owners: Vec<String>,
    /// A TLS caller's certificate identity (its first SAN), for the audit log.
    pub identity: Option<String>,
}

impl Principal {
    /// Who the caller is, for the audit log: its uid on the socket, its certificate's
    /// identity over TLS.
    pub fn name(&self) -> String {
        match (self.uid, &self.identity) {
            (Some(uid), _) => format!("uid:{uid}"),
            (None, Some(identity)) => format!("tls:{identity}"),
            (None, None) => self.owner.clone(),
        }
    }

    /// A local caller on the Unix socket without tenants; uid 0 and `admin_uids` are
    /// operators.
    pub fn unix(uid: u32, admin_uids: &[u32]) -> Self {
        Self {
            owner: unix_owner(uid),
            uid: Some(uid),
            admin: uid == 0 || admin_uids.contains(&uid),
            tenant: None,
            inherited_owners: Vec::new(),
            identity: None,
        }
    }

    /// Whether this caller may see what `owner` owns.
    pub fn may_see(&self, owner: &str) -> bool {
        self.admin || self.owner == owner || self.inherited_owners.iter().any(|o| o == owner)
    }

    /// Every owner key whose records this caller sees (operators see all regardless).
    pub fn owner_keys(&self) -> Vec<&str> {
        std::iter::once(self.owner.as_str())
            .chain(self.inherited_owners.iter().map(String::as_str))
            .collect()
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

/// Who is on the other end of a connection, as the transport proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A Unix socket peer, by its kernel-reported uid.
    Unix { uid: u32 },
    /// A TLS client with a verified certificate: its SAN URIs and `dns:NAME`s.
    Tls { identities: Vec<String> },
}

/// The interceptor that resolves a [`Principal`] for every request, or refuses it.
#[derive(Clone)]
pub struct Authenticator {
    admin_uids: Arc<[u32]>,
    tenants: Arc<Tenants>,
}

impl Authenticator {
    pub fn new(admin_uids: &[u32], tenants: &Tenants) -> Self {
        Self {
            admin_uids: admin_uids.into(),
            tenants: Arc::new(tenants.clone()),
        }
    }

    /// The principal of a peer. Refusals name no tenant, so a caller learns nothing of
    /// the configuration.
    pub fn resolve(&self, peer: Peer) -> Result<Principal, Status> {
        match peer {
            Peer::Unix { uid } => {
                if self.tenants.is_empty() {
                    return Ok(Principal::unix(uid, &self.admin_uids));
                }
                if let Some(name) = self.tenants.of_uid(uid) {
                    return Ok(self.tenant_principal(name, Some(uid)));
                }
                if uid == 0 || self.admin_uids.contains(&uid) {
                    return Ok(Principal::unix(uid, &self.admin_uids));
                }
                Err(Status::permission_denied(format!(
                    "uid {uid} is not a member of any tenant"
                )))
            }
            Peer::Tls { identities } => {
                if identities.is_empty() {
                    return Err(Status::unauthenticated(
                        "the client certificate names no identity (no SAN URI or DNS name)",
                    ));
                }
                let tenants = self.tenants.of_identities(&identities);
                let mut tenants = tenants.into_iter();
                match (tenants.next(), tenants.next()) {
                    (Some(name), None) => Ok(Principal {
                        identity: identities.first().cloned(),
                        ..self.tenant_principal(name, None)
                    }),
                    (Some(_), Some(_)) => Err(Status::unauthenticated(
                        "the client certificate's identities belong to more than one tenant",
                    )),
                    (None, _) => Err(Status::unauthenticated(
                        "the client certificate's identities are not a member of any tenant",
                    )),
                }
            }
        }
    }

    fn tenant_principal(&self, name: &str, uid: Option<u32>) -> Principal {
        tenant_principal(&self.tenants, name, uid)
    }
}

fn tenant_principal(tenants: &Tenants, name: &str, uid: Option<u32>) -> Principal {
    let tenant = tenants.get(name);
    Principal {
        owner: tenant_owner(name),
        uid,
        admin: tenant.is_some_and(|t| t.admin),
        tenant: Some(name.to_string()),
        inherited_owners: tenant
            .map(|t| t.uids.iter().map(|&uid| unix_owner(uid)).collect())
            .unwrap_or_default(),
        identity: None,
    }
}

/// Who answers today for a record kept under `owner`, with the tenants configured now:
/// a uid's records go with the uid into its tenant. `None` for a tenant that is no
/// longer configured. A job accepted before a restart is held to this principal's
/// limits when it runs, not to those it was accepted under.
pub fn current_principal(owner: &str, admin_uids: &[u32], tenants: &Tenants) -> Option<Principal> {
    if let Some(name) = crate::tenants::tenant_of_owner(owner) {
        return tenants
            .get(name)
            .map(|_| tenant_principal(tenants, name, None));
    }
    let uid = owner.strip_prefix("uid:").and_then(|uid| uid.parse().ok());
    Some(match uid {
        Some(uid) => match tenants.of_uid(uid) {
            Some(name) => tenant_principal(tenants, name, Some(uid)),
            None => Principal::unix(uid, admin_uids),
        },
        // A record from before owners were kept: the runner's own limits.
        None => Principal {
            owner: owner.to_string(),
            uid: None,
            admin: false,
            tenant: None,
            inherited_owners: Vec::new(),
            identity: None,
        },
    })
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(peer) = peer_of(&request) else {
            return Err(Status::unauthenticated(
                "the caller's identity is unknown (no peer credentials)",
            ));
        };
        let principal = self.resolve(peer)?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// The peer of a request, as its connection's transport proved it: the verified client
/// identities of a TLS connection, or the kernel's peer credentials of a Unix socket
/// connection.
fn peer_of<T>(request: &Request<T>) -> Option<Peer> {
    if let Some(identities) = request.extensions().get::<TlsIdentities>() {
        return Some(Peer::Tls {
            identities: identities.0.clone(),
        });
    }
    request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| Peer::Unix { uid: cred.uid() })
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

    fn tenants() -> Tenants {
        #[derive(serde::Deserialize)]
        struct Wrapper {
            tenants: Tenants,
        }
        toml::from_str::<Wrapper>(
            "[tenants.ci]\nuids = [1001, 1002]\nidentities = [\"spiffe://example.org/ci\", \"dns:ci.example.org\"]\n\
             [tenants.ops]\nidentities = [\"spiffe://example.org/ops\"]\nadmin = true\n\
             [tenants.web]\nuids = [1003]\n",
        )
        .unwrap()
        .tenants
    }

    #[test]
    fn without_tenants_every_uid_is_its_own_client() {
        let auth = Authenticator::new(&[1500], &Tenants::default());
        assert_eq!(
            auth.resolve(Peer::Unix { uid: 1000 }).unwrap(),
            Principal::unix(1000, &[])
        );
        assert!(auth.resolve(Peer::Unix { uid: 0 }).unwrap().admin);
        assert!(auth.resolve(Peer::Unix { uid: 1500 }).unwrap().admin);
        // No tenant can hold a certificate's identities.
        let err = auth
            .resolve(Peer::Tls {
                identities: vec!["spiffe://example.org/ci".into()],
            })
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn socket_peers_map_to_their_tenant_root_and_admin_uids_stay_operators() {
        let auth = Authenticator::new(&[1500], &tenants());
        let one = auth.resolve(Peer::Unix { uid: 1001 }).unwrap();
        let two = auth.resolve(Peer::Unix { uid: 1002 }).unwrap();
        assert_eq!(one.owner, "tenant:ci");
        assert_eq!(one.tenant.as_deref(), Some("ci"));
        assert_eq!(one.uid, Some(1001));
        assert!(!one.admin);
        assert!(
            two.may_see(&one.owner),
            "members share their tenant's records"
        );
        // The records its members made before tenants existed, and no one else's.
        assert!(one.may_see("uid:1002"));
        assert!(!one.may_see("uid:1003"));
        let web = auth.resolve(Peer::Unix { uid: 1003 }).unwrap();
        assert!(!web.may_see(&one.owner) && !one.may_see(&web.owner));
        assert!(!web.may_see("uid:1001"));

        let root = auth.resolve(Peer::Unix { uid: 0 }).unwrap();
        assert_eq!(
            (root.owner.as_str(), root.admin, root.tenant.as_deref()),
            ("uid:0", true, None)
        );
        let operator = auth.resolve(Peer::Unix { uid: 1500 }).unwrap();
        assert!(operator.admin && operator.may_see(&one.owner));

        let err = auth.resolve(Peer::Unix { uid: 1004 }).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(err.message(), "uid 1004 is not a member of any tenant");
    }

    #[test]
    fn a_recorded_owner_answers_to_its_tenant_as_configured_now() {
        let tenants = tenants();
        let of = |owner: &str| current_principal(owner, &[1500], &tenants);
        assert_eq!(of("tenant:ci").unwrap().tenant.as_deref(), Some("ci"));
        // A uid's record from before it joined a tenant: the tenant's now.
        let joined = of("uid:1002").unwrap();
        assert_eq!(
            (joined.owner.as_str(), joined.tenant.as_deref()),
            ("tenant:ci", Some("ci"))
        );
        let outside = of("uid:1500").unwrap();
        assert!(outside.admin && outside.tenant.is_none());
        assert!(of("tenant:gone").is_none());
        assert_eq!(of("unknown").unwrap().tenant, None);
    }

    #[test]
    fn tls_peers_map_by_their_certificate_identities() {
        let auth = Authenticator::new(&[], &tenants());
        let ci = auth
            .resolve(Peer::Tls {
                identities: vec!["dns:other.example.org".into(), "dns:CI.example.org".into()],
            })
            .unwrap();
        assert_eq!(
            (ci.owner.as_str(), ci.uid, ci.admin),
            ("tenant:ci", None, false)
        );
        // A remote member sees what a local member of the same tenant owns.
        let local = auth.resolve(Peer::Unix { uid: 1001 }).unwrap();
        assert!(ci.may_see(&local.owner) && local.may_see(&ci.owner));
        let ops = auth
            .resolve(Peer::Tls {
                identities: vec!["spiffe://example.org/ops".into()],
            })
            .unwrap();
        assert!(ops.admin && ops.may_see(&ci.owner));
        for identities in [
            vec![],
            vec!["spiffe://example.org/nobody".to_string()],
            // URIs compare exactly.
            vec!["spiffe://example.org/CI".to_string()],
            // An identity of two tenants is ambiguous: refused, not the first one.
            vec![
                "spiffe://example.org/ci".to_string(),
                "spiffe://example.org/ops".to_string(),
            ],
        ] {
            let err = auth
                .resolve(Peer::Tls {
                    identities: identities.clone(),
                })
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{identities:?}");
            assert!(!err.message().contains("ci") && !err.message().contains("ops"));
        }
    }

    #[test]
    fn a_request_without_peer_credentials_is_refused() {
        let mut auth = Authenticator::new(&[], &Tenants::default());
        let err = auth.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(principal(&Request::new(())).is_err());
    }

    #[test]
    fn a_tls_client_is_its_certificates_tenant_through_the_interceptor() {
        let mut auth = Authenticator::new(&[0], &tenants());
        let mut request = Request::new(());
        request.extensions_mut().insert(TlsIdentities(vec![
            "spiffe://example.org/ci".into(),
            "dns:ci.example.org".into(),
        ]));
        let request = auth.call(request).unwrap();
        let caller = principal(&request).unwrap();
        assert_eq!(caller.owner, "tenant:ci");
        assert_eq!(caller.uid, None);
        assert!(!caller.admin);
        assert_eq!(caller.name(), "tls:spiffe://example.org/ci");

        let mut nameless = Request::new(());
        nameless.extensions_mut().insert(TlsIdentities(Vec::new()));
        let err = auth.call(nameless).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        // Without tenants, a TLS client belongs to none: refused.
        let mut untenanted = Authenticator::new(&[0], &Tenants::default());
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(TlsIdentities(vec!["spiffe://example.org/ci".into()]));
        let err = untenanted.call(request).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}
