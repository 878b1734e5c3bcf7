#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

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
