#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::symlink;

use super::*;

const TWO_PACKAGES: &str = "Package: busybox
Status: install ok installed
Priority: optional
Architecture: amd64
Version: 1:1.36.1-9
Description: Tiny utilities
 for small and embedded systems.
 .
 More text.

Package: removed
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u7
";

#[test]
fn dpkg_status_lists_installed_packages_only() {
    let packages = parse_dpkg_status("status", TWO_PACKAGES.as_bytes()).unwrap();
    let names: Vec<_> = packages.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["busybox", "libc6"]);
    assert_eq!(packages[0].version, "1:1.36.1-9");
    assert_eq!(packages[1].arch, "amd64");
    // The purl keeps the epoch's colon (unambiguous after the @) and encodes the plus.
    assert_eq!(
        packages[0].purl(None).unwrap(),
        "pkg:deb/debian/busybox@1:1.36.1-9?arch=amd64"
    );
    assert_eq!(
        packages[1].purl(Some("ubuntu")).unwrap(),
        "pkg:deb/ubuntu/libc6@2.36-9%2Bdeb12u7?arch=amd64"
    );
}

#[test]
fn malformed_dpkg_status_is_refused() {
    let cases: &[(&str, &str)] = &[
        (
            " leading continuation\n",
            "continuation line outside a field",
        ),
        (
            "Package: a\nnot a field\n",
            "neither a field nor a continuation",
        ),
        ("Package: a\nPackage: b\n", "appears twice"),
        ("Package: a\npackage: b\n", "appears twice"),
        ("Version: 1\nArchitecture: all\n", "without a Package field"),
        (
            "Package: a\nStatus: installed\nVersion: 1\nArchitecture: all\n",
            "not three words",
        ),
        ("Package: a\nArchitecture: all\n", "has no Version"),
        (
            "Package: a b\nVersion: 1\nArchitecture: all\n",
            "not a plain token",
        ),
        (
            "Package: ../a\nVersion: 1\nArchitecture: all\n",
            "not a plain token",
        ),
        (
            "Package: a\nVersion: 1\nArchitecture: all\n#comment: x\n",
            "malformed field name",
        ),
        (": empty\n", "malformed field name"),
    ];
    for (text, expected) in cases {
        let err = parse_dpkg_status("status", text.as_bytes()).unwrap_err();
        assert!(err.to_string().contains(expected), "{text:?}: {err}");
    }
}

#[test]
fn apk_installed_lists_packages_with_their_sha1() {
    let db = "C:Q1ZJ0+q5D6bt5u8rUZSxhGbpH6nO4=\nP:musl\nV:1.2.4-r2\nA:x86_64\nL:MIT\nF:lib\nR:libc.musl-x86_64.so.1\nR:ld-musl-x86_64.so.1\n\nP:busybox\nV:1.36.1-r15\nA:x86_64\nC:Q1AAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n";
    let packages = parse_apk_installed("installed", db.as_bytes()).unwrap();
    assert_eq!(packages.len(), 2);
    assert_eq!(packages[0].name, "musl");
    let musl_sha1 = base64::engine::general_purpose::STANDARD
        .decode("ZJ0+q5D6bt5u8rUZSxhGbpH6nO4=")
        .unwrap();
    assert_eq!(packages[0].sha1, Some(hex::encode(musl_sha1)));
    assert_eq!(packages[1].sha1.as_deref(), Some("0".repeat(40).as_str()));
    assert_eq!(
        packages[0].purl(None).unwrap(),
        "pkg:apk/alpine/musl@1.2.4-r2?arch=x86_64"
    );
}

#[test]
fn malformed_apk_installed_is_refused() {
    let cases: &[(&str, &str)] = &[
        ("P:a\nV:1\n\n", "no A:"),
        ("P:a\nP:b\nV:1\nA:x\n", "appears twice"),
        ("P:a\nV:1\nA:x\nC:Q1notbase64!\n", "not Q1 + base64"),
        ("P:a\nV:1\nA:x\nC:Q1AAAA\n", "not Q1 + base64"),
        ("Pa\n", "not a K:value line"),
        ("P:a b\nV:1\nA:x\n", "not a plain token"),
    ];
    for (text, expected) in cases {
        let err = parse_apk_installed("installed", text.as_bytes()).unwrap_err();
        assert!(err.to_string().contains(expected), "{text:?}: {err}");
    }
}

fn tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir_all(d.path().join("var/lib/dpkg")).unwrap();
    d
}

#[test]
fn inventory_reads_status_and_status_d() {
    let d = tree();
    let root = d.path();
    fs::write(root.join(DPKG_STATUS), TWO_PACKAGES).unwrap();
    fs::create_dir_all(root.join(DPKG_STATUS_D)).unwrap();
    fs::write(
        root.join(DPKG_STATUS_D).join("base-files"),
        "Package: base-files\nVersion: 12.4\nArchitecture: amd64\n",
    )
    .unwrap();
    fs::write(
        root.join(DPKG_STATUS_D).join("base-files.md5sums"),
        "x  y\n",
    )
    .unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/os-release"), "NAME=\"Debian\"\nID=debian\n").unwrap();
    let inventory = inventory(root).unwrap();
    assert_eq!(inventory.packages.len(), 3);
    assert_eq!(
        inventory.databases,
        [DPKG_STATUS, "var/lib/dpkg/status.d/base-files"]
    );
    assert_eq!(inventory.distro.as_deref(), Some("debian"));
    let doc = cyclonedx("deb", &"ab".repeat(32), &inventory).unwrap();
    assert_eq!(doc["specVersion"], "1.5");
    assert_eq!(doc["components"].as_array().unwrap().len(), 3);
    assert_eq!(
        doc["metadata"]["component"]["version"],
        format!("sha256:{}", "ab".repeat(32))
    );
}

#[test]
fn a_tree_without_databases_has_no_packages() {
    let d = tempfile::tempdir().unwrap();
    let inventory = inventory(d.path()).unwrap();
    assert!(inventory.packages.is_empty() && inventory.databases.is_empty());
    let doc = cyclonedx("x", &"cd".repeat(32), &inventory).unwrap();
    assert_eq!(doc["components"], json!([]));
}

#[test]
fn a_symlinked_status_resolves_inside_the_tree_never_on_the_host() {
    // The host's file that the link names: it must never be read.
    let host = tempfile::tempdir().unwrap();
    let secret = host.path().join("status");
    fs::write(
        &secret,
        "Package: host-secret\nVersion: 1\nArchitecture: all\n",
    )
    .unwrap();
    for target in [
        secret.clone(),
        format!("../../../../../../../..{}", secret.display()).into(),
    ] {
        let d = tree();
        symlink(&target, d.path().join(DPKG_STATUS)).unwrap();
        let inventory = inventory(d.path()).unwrap();
        assert!(
            inventory.packages.iter().all(|p| p.name != "host-secret"),
            "{target:?} was followed out of the tree"
        );
        assert!(inventory.packages.is_empty());
    }
    // A link to a file inside the tree is that file.
    let d = tree();
    fs::write(
        d.path().join("real-status"),
        "Package: inside\nVersion: 1\nArchitecture: all\n",
    )
    .unwrap();
    symlink("/real-status", d.path().join(DPKG_STATUS)).unwrap();
    let inventory = inventory(d.path()).unwrap();
    assert_eq!(inventory.packages[0].name, "inside");
}

#[test]
fn a_fifo_or_directory_as_database_is_refused_without_blocking() {
    let d = tree();
    nix::unistd::mkfifo(&d.path().join(DPKG_STATUS), Mode::from_bits_truncate(0o644)).unwrap();
    let err = inventory(d.path()).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let d = tree();
    fs::create_dir_all(d.path().join(APK_INSTALLED)).unwrap();
    let err = inventory(d.path()).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn an_oversized_database_is_refused() {
    let d = tree();
    let file = fs::File::create(d.path().join(DPKG_STATUS)).unwrap();
    // Sparse: the reader stops one byte past the limit.
    file.set_len(MAX_DATABASE_BYTES + 1).unwrap();
    let err = inventory(d.path()).unwrap_err();
    assert_eq!(
        err,
        SbomError::TooLarge {
            path: DPKG_STATUS.into(),
            limit: MAX_DATABASE_BYTES
        }
    );
}

#[test]
fn too_many_packages_are_refused() {
    let mut text = String::new();
    for i in 0..=MAX_PACKAGES {
        text.push_str(&format!("Package: p{i}\nVersion: 1\nArchitecture: all\n\n"));
    }
    let err = parse_dpkg_status("status", text.as_bytes()).unwrap_err();
    assert_eq!(err, SbomError::TooManyPackages);
}

#[test]
fn database_files_share_one_byte_budget() {
    let d = tree();
    fs::write(d.path().join("a"), "123456").unwrap();
    fs::write(d.path().join("b"), "123456").unwrap();
    let mut reader = TreeReader::open(d.path()).unwrap();
    reader.budget = 10;
    assert_eq!(
        reader.read("a", MAX_DATABASE_BYTES).unwrap().unwrap(),
        b"123456"
    );
    // Within its own limit, beyond what the first left of the total.
    assert_eq!(
        reader.read("b", MAX_DATABASE_BYTES).unwrap_err(),
        SbomError::TotalTooLarge
    );
}
