#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

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

#[test]
fn the_hosts_own_addresses_are_special_unless_listed() {
    let own = HostAddresses::new(vec!["93.184.216.34".parse().unwrap()]);
    let l = list(&["example.org:443"]);
    let decision = l.decide_resolved("example.org", "93.184.216.34".parse().unwrap(), 443, &own);
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
        Ceiling::parse(&["*.example.org:443", "pypi.org:*", "10.0.0.0/8:80", "*:8080"]).unwrap();
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
