//! Network allow-lists of steps: parsing, matching, and the address classes that a
//! name may not resolve to unless the list names the address itself.
//!
//! Entries: `host:port`, `*.domain:port` (subdomains only, not the apex),
//! `IP:port`, `[IPv6]:port`, `CIDR:port`, `[IPv6 CIDR]:port`; the port is a
//! number or an explicit `*`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry, so
/// `::ffff:127.0.0.1` is loopback too.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn cidr_contains(network: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    let ip = canonical(ip);
    let network = canonical(network);
    let prefix = match (network, ip) {
        // A mapped network kept its IPv6 prefix length; convert it.
        (IpAddr::V4(_), IpAddr::V4(_)) if prefix > 32 => prefix.saturating_sub(96),
        _ => prefix,
    };
    network.is_ipv4() == ip.is_ipv4() && mask(ip, prefix) == network
}

/// The IANA IPv4 special-purpose address registry, multicast and the cloud metadata
/// addresses; the first block that contains an address names its class, so the
/// narrower blocks come first.
const SPECIAL_V4: &[([u8; 4], u8, &str)] = &[
    ([169, 254, 169, 254], 32, "cloud metadata"),
    ([100, 100, 100, 200], 32, "cloud metadata"),
    ([0, 0, 0, 0], 8, "\"this network\""),
    ([10, 0, 0, 0], 8, "private"),
    ([100, 64, 0, 0], 10, "shared address space (CGNAT)"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([172, 16, 0, 0], 12, "private"),
    ([192, 0, 0, 0], 24, "IETF protocol assignments"),
    ([192, 0, 2, 0], 24, "documentation"),
    ([192, 31, 196, 0], 24, "AS112"),
    ([192, 52, 193, 0], 24, "AMT"),
    ([192, 88, 99, 0], 24, "6to4 relay anycast"),
    ([192, 168, 0, 0], 16, "private"),
    ([192, 175, 48, 0], 24, "AS112 direct delegation"),
    ([198, 18, 0, 0], 15, "benchmarking"),
    ([198, 51, 100, 0], 24, "documentation"),
    ([203, 0, 113, 0], 24, "documentation"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([255, 255, 255, 255], 32, "limited broadcast"),
    ([240, 0, 0, 0], 4, "reserved"),
];

/// The IANA IPv6 special-purpose address registry, with the deprecated IPv4-compatible
/// and site-local blocks, multicast and the cloud metadata address.
const SPECIAL_V6: &[([u16; 8], u8, &str)] = &[
    ([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified"),
    ([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback"),
    // Deprecated, but a kernel with a `sit` tunnel still sends them to the IPv4
    // address they carry.
    ([0, 0, 0, 0, 0, 0, 0, 0], 96, "IPv4-compatible"),
    ([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, "IPv4-mapped"),
    ([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96, "NAT64"),
    ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "local-use NAT64"),
    ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only"),
    ([0x100, 0, 0, 1, 0, 0, 0, 0], 64, "dummy prefix"),
    ([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo"),
    ([0x2001, 0x2, 0, 0, 0, 0, 0, 0], 48, "benchmarking"),
    ([0x2001, 0x10, 0, 0, 0, 0, 0, 0], 28, "ORCHID"),
    ([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28, "ORCHIDv2"),
    (
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "IETF protocol assignments",
    ),
    ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation"),
    ([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "6to4"),
    (
        [0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0],
        48,
        "AS112 direct delegation",
    ),
    ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation"),
    ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, "SRv6 SIDs"),
    ([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128, "cloud metadata"),
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "private (unique local)"),
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local"),
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
];

fn special_v4(v4: Ipv4Addr) -> Option<&'static str> {
    SPECIAL_V4.iter().find_map(|(network, prefix, class)| {
        cidr_contains(
            IpAddr::V4(Ipv4Addr::from(*network)),
            *prefix,
            IpAddr::V4(v4),
        )
        .then_some(*class)
    })
}

/// The IPv4 address a translation or tunnel block carries, where the block has one
/// (6to4 in bits 16-47, the others in the last 32 bits).
fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let low = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match v6.segments() {
        [0, 0, 0, 0, 0, 0 | 0xffff, ..] => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(low),
        [0x64, 0xff9b, 1, ..] => Some(low),
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

/// Why an address must not be reached through a name: it is special-purpose (it
/// points inside the host, the local network, a cloud metadata service, or is not a
/// unicast destination on the Internet), or it carries such an IPv4 address. `None`
/// for ordinary addresses. The host's own interface addresses are checked by
/// [`HostAddresses`].
pub fn special_class(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4).map(String::from),
        IpAddr::V6(v6) => {
            let class = SPECIAL_V6.iter().find_map(|(network, prefix, class)| {
                let network = IpAddr::V6(Ipv6Addr::from(*network));
                // Compare as IPv6 bits: `cidr_contains` would read ::ffff:0:0/96 as IPv4.
                (mask(IpAddr::V6(v6), *prefix) == network).then_some(*class)
            })?;
            Some(
                match embedded_ipv4(v6).and_then(|v4| Some((v4, special_v4(v4)?))) {
                    Some((v4, inner)) => format!("{class} (of {v4}, {inner})"),
                    None => class.to_string(),
                },
            )
        }
    }
}

/// The addresses of the host's own interfaces, taken when a step's proxy starts: a
/// name that resolves to one of them would reach the host's own services, whatever
/// the address's class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAddresses(Vec<IpAddr>);

impl HostAddresses {
    /// The addresses of every interface of the calling thread's network namespace.
    pub fn of_this_host() -> std::io::Result<HostAddresses> {
        let mut found = Vec::new();
        for interface in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
            let Some(address) = interface.address else {
                continue;
            };
            let ip = if let Some(v4) = address.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = address.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            if !found.contains(&ip) {
                found.push(ip);
            }
        }
        Ok(HostAddresses(found))
    }

    #[cfg(test)]
    pub fn new(addresses: Vec<IpAddr>) -> HostAddresses {
        HostAddresses(addresses)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|own| canonical(*own) == ip)
    }
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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(entries).unwrap()
    }

    #[test]
    fn parses_every_form_and_rejects_bad_entries() {
        for good in [
            "example.org:443",
            "*.example.org:443",
            "example.org:*",
            "10.1.2.3:80",
            "10.0.0.0/8:443",
            "[::1]:8080",
            "[2001:db8::/32]:443",
            "EXAMPLE.org.:443",
        ] {
            Entry::parse(good).unwrap();
        }
        for bad in [
            "example.org",
            "example.org:0",
            "example.org:65536",
            "example.org:+1",
            "ex ample.org:1",
            "*:443",
            "a.*.org:443",
            "10.0.0.1/8:443",
            "10.0.0.0/33:443",
            "[::1:80",
            "::1:80",
            "-a.org:1",
            "a_b.org:1",
            ":443",
        ] {
            assert!(Entry::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn names_match_exactly_and_wildcards_only_subdomains() {
        let l = list(&["example.org:443", "*.cdn.net:443"]);
        assert!(l.allows_name("example.org", 443));
        assert!(l.allows_name("EXAMPLE.ORG.", 443));
        assert!(!l.allows_name("example.org", 80));
        assert!(!l.allows_name("www.example.org", 443));
        assert!(!l.allows_name("evilexample.org", 443));
        assert!(l.allows_name("a.cdn.net", 443));
        assert!(l.allows_name("a.b.cdn.net", 443));
        assert!(!l.allows_name("cdn.net", 443));
        assert!(!l.allows_name("evilcdn.net", 443));
        assert!(!l.allows_name("a.cdn.net.evil.com", 443));
    }

    #[test]
    fn literal_addresses_and_ranges() {
        let l = list(&["127.0.0.1:8080", "10.0.0.0/8:*", "[fd00::/8]:443"]);
        assert_eq!(
            l.decide_address("127.0.0.1".parse().unwrap(), 8080),
            Decision::Allow
        );
        assert!(matches!(
            l.decide_address("127.0.0.1".parse().unwrap(), 8081),
            Decision::Deny(_)
        ));
        assert_eq!(
            l.decide_address("10.9.8.7".parse().unwrap(), 22),
            Decision::Allow
        );
        assert_eq!(
            l.decide_address("::ffff:10.9.8.7".parse().unwrap(), 22),
            Decision::Allow
        );
        assert_eq!(
            l.decide_address("fd12::1".parse().unwrap(), 443),
            Decision::Allow
        );
        assert!(matches!(
            l.decide_address("11.0.0.1".parse().unwrap(), 22),
            Decision::Deny(_)
        ));
        // A name never matches an address entry.
        assert!(!l.allows_name("127.0.0.1", 8080));
    }

    #[test]
    fn names_resolving_to_special_addresses_are_refused_unless_listed() {
        let l = list(&["example.org:443"]);
        let own = HostAddresses::default();
        for special in [
            "127.0.0.1",
            "127.5.5.5",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::8.8.8.8",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
        ] {
            let ip: IpAddr = special.parse().unwrap();
            assert!(
                matches!(
                    l.decide_resolved("example.org", ip, 443, &own),
                    Decision::Deny(_)
                ),
                "{special} allowed"
            );
        }
        assert_eq!(
            l.decide_resolved("example.org", "93.184.216.34".parse().unwrap(), 443, &own),
            Decision::Allow
        );
        let with_literal = list(&["example.org:443", "10.1.0.0/16:443"]);
        assert_eq!(
            with_literal.decide_resolved("example.org", "10.1.2.3".parse().unwrap(), 443, &own),
            Decision::Allow
        );
        assert!(matches!(
            with_literal.decide_resolved("example.org", "10.1.2.3".parse().unwrap(), 80, &own),
            Decision::Deny(_)
        ));
    }

    /// The first and the last address of a block.
    fn ends(block: &str) -> [IpAddr; 2] {
        let (network, prefix) = block.split_once('/').unwrap();
        let network: IpAddr = network.parse().unwrap();
        let prefix: u32 = prefix.parse().unwrap();
        let last = match network {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(
                u32::from(v4) | u32::MAX.checked_shr(prefix).unwrap_or(0),
            )),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) | u128::MAX.checked_shr(prefix).unwrap_or(0),
            )),
        };
        [network, last]
    }

    #[test]
    fn every_block_of_the_special_purpose_registries_is_special() {
        for (block, class) in [
            ("0.0.0.0/8", "this network"),
            ("10.0.0.0/8", "private"),
            ("100.64.0.0/10", "CGNAT"),
            ("127.0.0.0/8", "loopback"),
            ("169.254.0.0/16", "link-local"),
            ("169.254.169.254/32", "cloud metadata"),
            ("172.16.0.0/12", "private"),
            ("192.0.0.0/24", "IETF protocol assignments"),
            ("192.0.2.0/24", "documentation"),
            ("192.31.196.0/24", "AS112"),
            ("192.52.193.0/24", "AMT"),
            ("192.88.99.0/24", "6to4 relay"),
            ("192.168.0.0/16", "private"),
            ("192.175.48.0/24", "AS112"),
            ("198.18.0.0/15", "benchmarking"),
            ("198.51.100.0/24", "documentation"),
            ("203.0.113.0/24", "documentation"),
            ("224.0.0.0/4", "multicast"),
            ("240.0.0.0/5", "reserved"),
            ("255.255.255.254/32", "reserved"),
            ("255.255.255.255/32", "broadcast"),
            ("::/128", "unspecified"),
            ("::1/128", "loopback"),
            ("::2/127", "IPv4-compatible"),
            ("::1.0.0.0/104", "IPv4-compatible"),
            ("::ffff:0:0/96", "IPv4-mapped"),
            ("64:ff9b::/96", "NAT64"),
            ("64:ff9b:1::/48", "local-use NAT64"),
            ("100::/64", "discard-only"),
            ("100:0:0:1::/64", "dummy prefix"),
            ("2001::/32", "Teredo"),
            ("2001:2::/48", "benchmarking"),
            ("2001:10::/28", "ORCHID"),
            ("2001:20::/28", "ORCHIDv2"),
            ("2001:100::/24", "IETF protocol assignments"),
            ("2001:db8::/32", "documentation"),
            ("2002::/16", "6to4"),
            ("2620:4f:8000::/48", "AS112"),
            ("3fff::/20", "documentation"),
            ("5f00::/16", "SRv6"),
            ("fc00::/7", "unique local"),
            ("fd00:ec2::254/128", "cloud metadata"),
            ("fe80::/10", "link-local"),
            ("fec0::/10", "site-local"),
            ("ff00::/8", "multicast"),
        ] {
            for ip in ends(block) {
                let found = special_class(ip);
                assert!(
                    found.as_deref().is_some_and(|c| c.contains(class)),
                    "{ip} (in {block}): {found:?}, expected {class}"
                );
            }
        }
        // Just outside the blocks: ordinary unicast.
        for ordinary in [
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.0.3.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2001:200::1",
            "2001:db7:ffff::1",
            "2003::1",
            "2606:4700::1111",
            "3fff:1000::",
            "fbff:ffff::1",
        ] {
            let ip: IpAddr = ordinary.parse().unwrap();
            assert_eq!(special_class(ip), None, "{ordinary}");
        }
    }

    #[test]
    fn embedded_ipv4_addresses_are_named_in_the_class() {
        for (ip, inner) in [
            ("::ffff:127.0.0.1", "loopback"),
            ("::127.0.0.1", "loopback"),
            ("::169.254.169.254", "cloud metadata"),
            ("64:ff9b::10.0.0.1", "private"),
            ("64:ff9b:1::a9fe:a9fe", "cloud metadata"),
            ("2002:7f00:1::", "loopback"),
            ("2002:c0a8:101::1", "private"),
        ] {
            let class = special_class(ip.parse().unwrap()).unwrap();
            assert!(class.contains(inner), "{ip}: {class}");
        }
        // The whole translation blocks are special, whatever they carry.
        assert_eq!(
            special_class("64:ff9b::808:808".parse().unwrap()).as_deref(),
            Some("NAT64")
        );
        assert_eq!(
            special_class("::ffff:8.8.8.8".parse().unwrap()).as_deref(),
            Some("IPv4-mapped")
        );
    }

    #[test]
    fn the_hosts_own_addresses_are_special_unless_listed() {
        let own = HostAddresses::new(vec!["93.184.216.34".parse().unwrap()]);
        let l = list(&["example.org:443"]);
        let decision =
            l.decide_resolved("example.org", "93.184.216.34".parse().unwrap(), 443, &own);
        assert!(
            matches!(&decision, Decision::Deny(r) if r.contains("this host's own")),
            "{decision:?}"
        );
        assert_eq!(
            l.decide_resolved("example.org", "93.184.216.35".parse().unwrap(), 443, &own),
            Decision::Allow
        );
        let listed = list(&["example.org:443", "93.184.216.34:443"]);
        assert_eq!(
            listed.decide_resolved("example.org", "93.184.216.34".parse().unwrap(), 443, &own),
            Decision::Allow
        );
        // The real interfaces: loopback is always among them.
        let this_host = HostAddresses::of_this_host().unwrap();
        assert!(
            this_host.contains("127.0.0.1".parse().unwrap()),
            "{this_host:?}"
        );
    }

    #[test]
    fn ceilings_cover_only_what_they_name() {
        let ceiling =
            Ceiling::parse(&["*.example.org:443", "pypi.org:*", "10.0.0.0/8:80", "*:8080"])
                .unwrap();
        let covered = |e: &str| ceiling.covers(&Entry::parse(e).unwrap());
        assert!(covered("a.example.org:443"));
        assert!(covered("*.example.org:443"));
        assert!(covered("*.b.example.org:443"));
        assert!(!covered("example.org:443"), "the apex is not a subdomain");
        assert!(!covered("a.example.org:80"));
        assert!(!covered("a.example.org:*"));
        assert!(covered("pypi.org:443"));
        assert!(covered("pypi.org:*"));
        assert!(!covered("files.pypi.org:443"));
        assert!(covered("10.1.2.3:80"));
        assert!(covered("10.1.0.0/16:80"));
        assert!(!covered("10.0.0.0/7:80"));
        assert!(!covered("11.0.0.1:80"));
        assert!(covered("anything.test:8080"));
        assert!(covered("[::1]:8080"));
        assert!(!covered("anything.test:8081"));

        let anything = Ceiling::parse(&["*:*"]).unwrap();
        assert!(anything.covers(&Entry::parse("x.test:*").unwrap()));
        assert!(Ceiling::parse(&["*:0"]).is_err());
        assert!(Ceiling::parse(&["*"]).is_err());
    }
}
