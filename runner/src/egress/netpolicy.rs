//! Network allow-lists of steps and the operator's ceilings over them: parsing and
//! matching. The address classes a name may not resolve to unless the list names the
//! address itself are in `special.rs`.
//!
//! Entries: `host:port`, `*.domain:port` (subdomains only, not the apex),
//! `IP:port`, `[IPv6]:port`, `CIDR:port`, `[IPv6 CIDR]:port`; the port is a
//! number or an explicit `*`.

use std::fmt;
use std::net::IpAddr;

use super::special::{cidr_contains, mask, special_class, HostAddresses};

/// A port or any port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMatch {
    Any,
    Exact(u16),
}

const PORT_RULE: &str = "the port must be 1-65535 or *";

impl PortMatch {
    fn parse(text: &str) -> Option<PortMatch> {
        match text {
            "*" => Some(PortMatch::Any),
            p => match p.parse::<u16>() {
                Ok(n) if n > 0 && !p.starts_with('+') => Some(PortMatch::Exact(n)),
                _ => None,
            },
        }
    }

    fn matches(self, port: u16) -> bool {
        match self {
            PortMatch::Any => true,
            PortMatch::Exact(p) => p == port,
        }
    }
}

/// What an entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An exact DNS name, lower-case.
    Host(String),
    /// Every strict subdomain of this name (lower-case, without the `*.`).
    Subdomains(String),
    /// A literal address or range.
    Cidr { network: IpAddr, prefix: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub target: Target,
    pub port: PortMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub entry: String,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.entry, self.reason)
    }
}

impl std::error::Error for ParseError {}

impl Entry {
    pub fn parse(text: &str) -> Result<Entry, ParseError> {
        let bad = |reason: &str| ParseError {
            entry: text.to_string(),
            reason: reason.to_string(),
        };
        if text.len() > 300 || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "too long, or contains whitespace or control characters",
            ));
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| bad("unclosed '[' around an IPv6 address"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| bad("a port is required: [ADDRESS]:PORT"))?;
            (inside, port)
        } else {
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| bad("a port is required: HOST:PORT (or HOST:* for any port)"))?;
            if host.contains(':') {
                return Err(bad("an IPv6 address needs brackets: [ADDRESS]:PORT"));
            }
            (host, port)
        };
        let port = PortMatch::parse(port).ok_or_else(|| bad(PORT_RULE))?;
        let target = if let Some((addr, prefix)) = host.split_once('/') {
            let network: IpAddr = addr
                .parse()
                .map_err(|_| bad("a range must be an IP address with /PREFIX"))?;
            let max = if network.is_ipv4() { 32 } else { 128 };
            let prefix = prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad("the prefix length is out of range"))?;
            if mask(network, prefix) != network {
                return Err(bad("the range has bits set below its prefix length"));
            }
            Target::Cidr { network, prefix }
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            Target::Cidr {
                network: ip,
                prefix,
            }
        } else if let Some(domain) = host.strip_prefix("*.") {
            check_dns_name(domain).map_err(|r| bad(&r))?;
            Target::Subdomains(domain.to_ascii_lowercase())
        } else {
            check_dns_name(host).map_err(|r| bad(&r))?;
            Target::Host(host.to_ascii_lowercase())
        };
        Ok(Entry { target, port })
    }
}

/// A plain ASCII DNS name: labels of letters, digits and '-', no wildcard elsewhere.
fn check_dns_name(name: &str) -> Result<(), String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err("not a host name".into());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(format!(
                "{label:?} is not a host name label (ASCII letters, digits, '-'; '*' only as a leading '*.')"
            ));
        }
    }
    Ok(())
}

/// A step's parsed allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    pub entries: Vec<Entry>,
}

/// The verdict on one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

impl AllowList {
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, ParseError> {
        Ok(AllowList {
            entries: entries
                .iter()
                .map(|e| Entry::parse(e.as_ref()))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether a host name (as the client sent it) on this port is listed.
    pub fn allows_name(&self, host: &str, port: u16) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        self.entries.iter().any(|e| {
            e.port.matches(port)
                && match &e.target {
                    Target::Host(h) => *h == host,
                    Target::Subdomains(d) => is_strict_subdomain(&host, d),
                    Target::Cidr { .. } => false,
                }
        })
    }

    /// Whether an address on this port is named by a literal address or range.
    pub fn names_address(&self, ip: IpAddr, port: u16) -> bool {
        self.entries.iter().any(|e| {
            e.port.matches(port)
                && matches!(e.target, Target::Cidr { network, prefix } if cidr_contains(network, prefix, ip))
        })
    }

    /// A literal-address destination: listed, or refused.
    pub fn decide_address(&self, ip: IpAddr, port: u16) -> Decision {
        if self.names_address(ip, port) {
            Decision::Allow
        } else {
            Decision::Deny(format!("{ip} port {port} is not on the step's allow-list"))
        }
    }

    /// An address a listed name resolved to: ordinary addresses pass; special
    /// ones and the host's own only when the list names them as literals (so a
    /// name cannot be pointed at the host, the LAN or a metadata service).
    pub fn decide_resolved(
        &self,
        host: &str,
        ip: IpAddr,
        port: u16,
        own: &HostAddresses,
    ) -> Decision {
        let class = special_class(ip).or_else(|| {
            own.contains(ip)
                .then(|| "one of this host's own".to_string())
        });
        match class {
            None => Decision::Allow,
            Some(_) if self.names_address(ip, port) => Decision::Allow,
            Some(class) => Decision::Deny(format!(
                "{host} resolved to {ip} ({class} address), which the allow-list does not name"
            )),
        }
    }
}

/// The operator's ceiling for a client's allow-lists: every entry of a step must fall
/// within one of its entries. Same syntax as allow-list entries, plus `*:PORT` and `*:*`
/// for any destination (on that port).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ceiling {
    /// (None = any destination, port)
    entries: Vec<(Option<Target>, PortMatch)>,
}

impl Ceiling {
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Ceiling, ParseError> {
        let mut out = Vec::new();
        for text in entries {
            let text = text.as_ref();
            if let Some(port) = text.strip_prefix("*:") {
                let port = PortMatch::parse(port).ok_or_else(|| ParseError {
                    entry: text.to_string(),
                    reason: PORT_RULE.to_string(),
                })?;
                out.push((None, port));
            } else {
                let entry = Entry::parse(text)?;
                out.push((Some(entry.target), entry.port));
            }
        }
        Ok(Ceiling { entries: out })
    }

    /// Whether everything `entry` allows is also allowed by one ceiling entry.
    pub fn covers(&self, entry: &Entry) -> bool {
        self.entries.iter().any(|(target, port)| {
            let port_ok = match (port, entry.port) {
                (PortMatch::Any, _) => true,
                (PortMatch::Exact(c), PortMatch::Exact(e)) => *c == e,
                (PortMatch::Exact(_), PortMatch::Any) => false,
            };
            port_ok
                && match (target, &entry.target) {
                    (None, _) => true,
                    (Some(Target::Host(c)), Target::Host(e)) => c == e,
                    (Some(Target::Subdomains(c)), Target::Host(e) | Target::Subdomains(e)) => {
                        is_strict_subdomain(e, c)
                            || matches!(entry.target, Target::Subdomains(_)) && e == c
                    }
                    (
                        Some(Target::Cidr { network, prefix }),
                        Target::Cidr {
                            network: e_net,
                            prefix: e_prefix,
                        },
                    ) => {
                        network.is_ipv4() == e_net.is_ipv4()
                            && e_prefix >= prefix
                            && cidr_contains(*network, *prefix, *e_net)
                    }
                    _ => false,
                }
        })
    }
}

/// `name` is below `domain` by at least one label.
fn is_strict_subdomain(name: &str, domain: &str) -> bool {
    name.strip_suffix(domain)
        .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.'))
}

#[cfg(test)]
mod tests;
