//! Special-purpose addresses: the IANA registries' blocks (loopback, private, link-local,
//! cloud metadata, translation and tunnel blocks, ...) and the host's own interface
//! addresses, which a name may not resolve to unless the allow-list names the address
//! itself; and the prefix arithmetic both rest on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `ip` with every bit below `prefix` cleared.
pub(super) fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
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

/// Whether `ip` is inside `network/prefix`, IPv4-mapped addresses judged as IPv4.
pub(super) fn cidr_contains(network: IpAddr, prefix: u8, ip: IpAddr) -> bool {
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

#[cfg(test)]
mod tests;
