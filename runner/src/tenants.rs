//! Tenants: the `[tenants.NAME]` tables of the configuration. A tenant groups callers
//! (Unix socket uids, TLS client certificate identities) that share their jobs, blobs
//! and idempotency keys, under their own ceilings. Everything is parsed and checked
//! when the configuration is loaded; requests only look values up.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Deserializer};

use crate::egress::netpolicy::Ceiling;
use crate::units::{Cpus, Size};

/// The owner key of a tenant's jobs, blobs and idempotency keys.
pub fn tenant_owner(name: &str) -> String {
    format!("tenant:{name}")
}

/// The tenant of an owner key, if it is a tenant's.
pub fn tenant_of_owner(owner: &str) -> Option<&str> {
    owner.strip_prefix("tenant:")
}

/// One `[tenants.NAME]` table. Every key but `identities` and `uids` is optional; an
/// absent ceiling is the global one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// TLS client certificate identities: a SAN URI (`spiffe://example.org/ci`) or a SAN
    /// DNS name as `dns:NAME`.
    #[serde(default, deserialize_with = "identities")]
    pub identities: Vec<String>,
    /// Unix socket peers (uids).
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Members are operators: they see and may cancel every job, read every blob.
    #[serde(default)]
    pub admin: bool,
    /// Images its jobs may use: names, `NAME@sha256:HEX` or `sha256:HEX` digests (see
    /// [`ImageAllowList`]); absent: any the global `[images] allowed` admits.
    #[serde(default)]
    pub images: Option<ImageAllowList>,
    /// Replaces the global `network_ceiling` for its jobs.
    #[serde(default, deserialize_with = "ceiling")]
    pub network_ceiling: Option<Ceiling>,
    pub max_memory: Option<Size>,
    pub max_pids: Option<u32>,
    pub max_cpus: Option<Cpus>,
    pub max_disk: Option<Size>,
    pub max_timeout_seconds: Option<u32>,
    /// Its jobs running at the same time (the scheduler's cap).
    pub max_running_jobs: Option<u32>,
    /// Its jobs waiting to run; a Submit beyond it is RESOURCE_EXHAUSTED.
    pub max_queued_jobs: Option<u64>,
    /// Repositories its members may publish to (`REGISTRY/REPO` or `REGISTRY/PREFIX/*`);
    /// none when absent.
    #[serde(default)]
    pub publish: crate::registry::policy::RepositoryPatterns,
    /// Its share of the job slots against other tenants with queued work.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

fn ceiling<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ceiling>, D::Error> {
    let entries = Vec::<String>::deserialize(d)?;
    Ceiling::parse(&entries)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(e.to_string()))
}

/// A TLS identity as configured, checked, with a DNS name in lower case (DNS names
/// compare without case).
fn identities<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Vec::<String>::deserialize(d)?
        .into_iter()
        .map(|identity| normalize_identity(&identity).map_err(serde::de::Error::custom))
        .collect()
}

fn normalize_identity(identity: &str) -> Result<String, String> {
    let bad = |reason: &str| Err(format!("identity {identity:?}: {reason}"));
    if identity.is_empty() || identity.len() > 1024 {
        return bad("must be 1 to 1024 bytes");
    }
    if identity
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return bad("contains white space or a control character");
    }
    if let Some(name) = identity.strip_prefix("dns:") {
        if name.is_empty() || name.contains('*') || name.contains('/') {
            return bad("a DNS identity is dns:NAME with a plain name (no wildcard)");
        }
        return Ok(format!("dns:{}", name.to_ascii_lowercase()));
    }
    match identity.split_once(':') {
        Some((scheme, rest)) if !scheme.is_empty() && !rest.is_empty() => Ok(identity.to_string()),
        _ => bad("must be a SAN URI (scheme:...) or dns:NAME"),
    }
}

pub use crate::images::allow::ImageAllowList;

/// Every tenant, and who belongs to which, checked when the configuration is read: a
/// uid or identity in two tenants is an error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(try_from = "BTreeMap<String, TenantConfig>")]
pub struct Tenants {
    by_name: BTreeMap<String, TenantConfig>,
    by_uid: HashMap<u32, String>,
    by_identity: HashMap<String, String>,
}

impl TryFrom<BTreeMap<String, TenantConfig>> for Tenants {
    type Error = String;

    fn try_from(by_name: BTreeMap<String, TenantConfig>) -> Result<Self, String> {
        let mut by_uid = HashMap::new();
        let mut by_identity = HashMap::new();
        for (name, tenant) in &by_name {
            let key = |k: &str| format!("tenants.{name}.{k}");
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "tenant name {name:?}: must be 1 to 64 of a-z, 0-9, '-', '_'"
                ));
            }
            if tenant.uids.is_empty() && tenant.identities.is_empty() {
                return Err(format!(
                    "tenants.{name}: has no members (give uids or identities)"
                ));
            }
            for &uid in &tenant.uids {
                if uid == 0 {
                    return Err(format!(
                        "{}: root (uid 0) is an operator on the socket, not a tenant member",
                        key("uids")
                    ));
                }
                if let Some(other) = by_uid.insert(uid, name.clone()) {
                    return Err(format!(
                        "uid {uid} is a member of two tenants ({other} and {name})"
                    ));
                }
            }
            for identity in &tenant.identities {
                if let Some(other) = by_identity.insert(identity.clone(), name.clone()) {
                    return Err(format!(
                        "identity {identity:?} is a member of two tenants ({other} and {name})"
                    ));
                }
            }
            if tenant.weight == 0 {
                return Err(format!("{}: must be positive", key("weight")));
            }
            if tenant.max_running_jobs == Some(0) {
                return Err(format!("{}: must be positive", key("max_running_jobs")));
            }
            if tenant.max_queued_jobs == Some(0) {
                return Err(format!("{}: must be positive", key("max_queued_jobs")));
            }
        }
        Ok(Self {
            by_name,
            by_uid,
            by_identity,
        })
    }
}

impl Tenants {
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&TenantConfig> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &TenantConfig)> {
        self.by_name.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// A tenant's share, by weight, of the runner's `max_queued_jobs` (rounded up): what
    /// it may queue even while other tenants' jobs fill the runner's queue.
    pub fn queue_share(&self, weight: u32, max_queued_jobs: u64) -> u64 {
        let total: u128 = self.by_name.values().map(|t| u128::from(t.weight)).sum();
        if total == 0 {
            return 0;
        }
        let share = (u128::from(max_queued_jobs) * u128::from(weight)).div_ceil(total);
        u64::try_from(share).unwrap_or(max_queued_jobs)
    }

    /// The tenant a Unix socket uid belongs to.
    pub fn of_uid(&self, uid: u32) -> Option<&str> {
        self.by_uid.get(&uid).map(String::as_str)
    }

    /// The tenants a client certificate's identities belong to (more than one means
    /// the certificate is ambiguous).
    pub fn of_identities<S: AsRef<str>>(&self, identities: &[S]) -> BTreeSet<&str> {
        identities
            .iter()
            .filter_map(|identity| normalize_identity(identity.as_ref()).ok())
            .filter_map(|identity| self.by_identity.get(&identity).map(String::as_str))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<Tenants, String> {
        #[derive(Deserialize)]
        struct Wrapper {
            tenants: Tenants,
        }
        toml::from_str::<Wrapper>(text)
            .map(|w| w.tenants)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn members_map_to_their_tenant() {
        let tenants = parse(
            "[tenants.ci]\nuids = [1001, 1002]\nidentities = [\"spiffe://example.org/ci\", \"dns:Orchestrator.Example.org\"]\n\
             images = [\"busybox\", \"sha256:{}\"]\nnetwork_ceiling = [\"*.example.org:443\"]\nmax_memory = \"1G\"\n\
             [tenants.web-2]\nuids = [1003]\nweight = 3\n"
                .replace("{}", &"ab".repeat(32))
                .as_str(),
        )
        .unwrap();
        assert_eq!(tenants.of_uid(1002), Some("ci"));
        assert_eq!(tenants.of_uid(1003), Some("web-2"));
        assert_eq!(tenants.of_uid(1004), None);
        let ci = tenants.get("ci").unwrap();
        assert_eq!(ci.weight, 1);
        assert_eq!(ci.max_memory.unwrap().0, 1 << 30);
        assert!(ci.network_ceiling.is_some());
        let images = ci.images.as_ref().unwrap();
        let image = |name: &str, digest: Option<String>| crate::images::allow::ImageIdentity {
            name: Some(name.into()),
            digests: digest.into_iter().collect(),
        };
        assert!(images.allows(&image("busybox", None)));
        assert!(images.allows(&image("other", Some("ab".repeat(32)))));
        assert!(!images.allows(&image("host", None)));
        assert!(!images.allows(&image("other", Some("cd".repeat(32)))));
        assert_eq!(tenants.get("web-2").unwrap().weight, 3);
        // Shares of a queue of 10 by weight (1 and 3), rounded up.
        assert_eq!(tenants.queue_share(1, 10), 3);
        assert_eq!(tenants.queue_share(3, 10), 8);
        assert!(tenants.get("web-2").unwrap().images.is_none());
        // DNS names compare without case; URIs exactly.
        assert_eq!(
            tenants.of_identities(&["dns:orchestrator.example.ORG"]),
            BTreeSet::from(["ci"])
        );
        assert!(tenants
            .of_identities(&["spiffe://example.org/CI", "dns:other.example.org"])
            .is_empty());
    }

    #[test]
    fn bad_tenant_tables_are_refused_naming_the_problem() {
        for (text, needle) in [
            ("[tenants.CI]\nuids = [1]\n", "tenant name"),
            ("[tenants.\"a b\"]\nuids = [1]\n", "tenant name"),
            ("[tenants.a]\nuids = [1]\n[tenants.b]\nuids = [1]\n", "two tenants"),
            (
                "[tenants.a]\nidentities = [\"dns:x.org\"]\n[tenants.b]\nidentities = [\"dns:X.org\"]\n",
                "two tenants",
            ),
            ("[tenants.a]\nuids = [0]\n", "root"),
            ("[tenants.a]\n", "no members"),
            ("[tenants.a]\nuids = [1]\nweight = 0\n", "tenants.a.weight"),
            ("[tenants.a]\nuids = [1]\nmax_queued_jobs = 0\n", "tenants.a.max_queued_jobs"),
            ("[tenants.a]\nuids = [1]\nmax_running_jobs = 0\n", "tenants.a.max_running_jobs"),
            ("[tenants.a]\nuids = [1]\nimages = [\"../x\"]\n", "image"),
            ("[tenants.a]\nuids = [1]\nimages = [\"sha256:xyz\"]\n", "images"),
            ("[tenants.a]\nuids = [1]\nnetwork_ceiling = [\"no port\"]\n", "network_ceiling"),
            ("[tenants.a]\nuids = [1]\nmax_memory = \"lots\"\n", "max_memory"),
            ("[tenants.a]\nuids = [1]\nquota = 1\n", "unknown field"),
            ("[tenants.a]\nidentities = [\"dns:*.example.org\"]\n", "wildcard"),
            ("[tenants.a]\nidentities = [\"plain\"]\n", "SAN URI"),
        ] {
            let err = parse(text).err().unwrap_or_else(|| panic!("accepted: {text}"));
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
