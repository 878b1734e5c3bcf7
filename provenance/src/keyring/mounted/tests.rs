//! Attacks on a read-only ring laid out as a Kubernetes Secret volume. Ownership is
//! checked against root, so the tests that need files of root (or of another uid) say
//! so when they cannot run.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::keyfile::effective_uid;
use crate::keyring::{KeyRing, KEYRING_FILE};
use crate::ProvenanceError;

fn is_root() -> bool {
    effective_uid().unwrap() == 0
}

/// The fixture for a test that needs root (a read-only ring must be root's): without
/// root it is skipped, saying so, outside CI; with CI=true that fails the test.
fn root_fixture(test: &str) -> Option<Fixture> {
    if is_root() {
        return Some(fixture());
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root (CI=true)"
    );
    eprintln!("SKIPPED {test}: needs root");
    None
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The names a Secret shows, as the kubelet's atomic writer updates a volume: the files
/// in a new timestamped directory (0755, each file with `mode`), a `..data_tmp` link to
/// it renamed over `..data`, a visible link `NAME -> ..data/NAME` for each new name, the
/// visible links of names gone removed, then the old timestamped directory.
fn kubelet_write(volume: &Path, files: &[(String, Vec<u8>)], mode: u32, serial: u32) {
    let data = volume.join("..data");
    let old = fs::read_link(&data).ok();
    let ts_name = format!("..2026_11_27_22_19_53.{serial:010}");
    let ts = volume.join(&ts_name);
    fs::create_dir(&ts).unwrap();
    chmod(&ts, 0o755);
    for (name, bytes) in files {
        let path = ts.join(name);
        fs::write(&path, bytes).unwrap();
        chmod(&path, mode);
    }
    let tmp = volume.join("..data_tmp");
    symlink(&ts_name, &tmp).unwrap();
    fs::rename(&tmp, &data).unwrap();
    for (name, _) in files {
        let visible = volume.join(name);
        if fs::symlink_metadata(&visible).is_err() {
            symlink(Path::new("..data").join(name), &visible).unwrap();
        }
    }
    for entry in fs::read_dir(volume).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !files.iter().any(|(n, _)| *n == name) {
            fs::remove_file(entry.path()).unwrap();
        }
    }
    if let Some(old) = old {
        fs::remove_dir_all(volume.join(old)).unwrap();
    }
}

/// The files of a ring made by `kiln keys generate` in `dir`.
fn ring_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// An operator's ring (in `made`) and a Secret volume holding it (0755 here: not a
/// read-only mount).
struct Fixture {
    _tmp: tempfile::TempDir,
    made: PathBuf,
    volume: PathBuf,
    outside: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let made = tmp.path().join("pool-a");
    KeyRing::generate(&made).unwrap();
    let volume = tmp.path().join("secret");
    fs::create_dir(&volume).unwrap();
    chmod(&volume, 0o755);
    kubelet_write(&volume, &ring_files(&made), 0o400, 1);
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    Fixture {
        _tmp: tmp,
        made,
        volume,
        outside,
    }
}

fn current(dir: &Path) -> String {
    KeyRing::open(dir).unwrap().public().current.clone()
}

fn refused(volume: &Path) -> String {
    match KeyRing::open_read_only(volume) {
        Ok((ring, _)) => panic!("opened: current key {}", ring.public().current),
        Err(e) => e.to_string(),
    }
}

/// The timestamped directory `..data` points to now.
fn ts_dir(volume: &Path) -> PathBuf {
    volume.join(fs::read_link(volume.join("..data")).unwrap())
}

#[test]
fn a_secret_volume_is_read_through_its_links_and_never_written() {
    let Some(f) = root_fixture("a_secret_volume_is_read_through_its_links_and_never_written")
    else {
        return;
    };
    let before = fs::read_dir(&f.volume).unwrap().count();
    let (mut ring, bytes) = KeyRing::open_read_only(&f.volume).unwrap();
    assert_eq!(ring.public().current, current(&f.made));
    assert_eq!(bytes, fs::read(f.made.join(KEYRING_FILE)).unwrap());
    assert_eq!(
        KeyRing::read_only_ring_file(&f.volume).unwrap(),
        bytes,
        "the same bytes through the cheap read"
    );
    // Never rotated, and nothing written by trying.
    let e = ring.rotate().unwrap_err().to_string();
    assert!(e.contains("read-only"), "{e}");
    assert_eq!(fs::read_dir(&f.volume).unwrap().count(), before);
    assert_eq!(ring.public().current, current(&f.made));
}

#[test]
fn a_missing_ring_is_an_error_naming_the_directory_and_nothing_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let absent = tmp.path().join("keys");
    let e = KeyRing::open_read_only(&absent).err().unwrap().to_string();
    assert!(e.contains(&absent.display().to_string()), "{e}");
    assert!(!absent.exists());
    // An empty directory: the ring's file is named, no key is made.
    fs::create_dir(&absent).unwrap();
    chmod(&absent, 0o755);
    if is_root() {
        let e = refused(&absent);
        assert!(
            e.contains(&absent.join(KEYRING_FILE).display().to_string()),
            "{e}"
        );
    }
    assert_eq!(fs::read_dir(&absent).unwrap().count(), 0);
}

#[test]
fn a_link_to_a_file_outside_the_directory_is_refused() {
    let Some(f) = root_fixture("a_link_to_a_file_outside_the_directory_is_refused") else {
        return;
    };
    // The ring's own files, planted outside, reached by an absolute and a relative link.
    for (name, bytes) in ring_files(&f.made) {
        fs::write(f.outside.join(&name), bytes).unwrap();
    }
    let visible = f.volume.join(KEYRING_FILE);
    fs::remove_file(&visible).unwrap();
    symlink(f.outside.join(KEYRING_FILE), &visible).unwrap();
    let e = refused(&f.volume);
    assert!(e.contains("absolute"), "{e}");
    fs::remove_file(&visible).unwrap();
    symlink(Path::new("../outside").join(KEYRING_FILE), &visible).unwrap();
    let e = refused(&f.volume);
    assert!(e.contains("above"), "{e}");
    // Inside the timestamped directory too: the key a link there leads out to.
    fs::remove_file(&visible).unwrap();
    symlink(Path::new("..data").join(KEYRING_FILE), &visible).unwrap();
    KeyRing::open_read_only(&f.volume).unwrap();
    let key = ts_dir(&f.volume).join(format!("{}.pem", current(&f.made)));
    fs::remove_file(&key).unwrap();
    symlink(
        Path::new("../../outside").join(key.file_name().unwrap()),
        &key,
    )
    .unwrap();
    let e = refused(&f.volume);
    assert!(e.contains("above"), "{e}");
}

#[test]
fn a_data_link_pointing_outside_is_refused() {
    let Some(f) = root_fixture("a_data_link_pointing_outside_is_refused") else {
        return;
    };
    // A whole Secret's layout outside, as good as the real one.
    let copy = f.outside.join("..2026_01_01_00_00_00.1");
    fs::create_dir(&copy).unwrap();
    chmod(&copy, 0o755);
    for (name, bytes) in ring_files(&f.made) {
        fs::write(copy.join(&name), bytes).unwrap();
        chmod(&copy.join(name), 0o400);
    }
    let data = f.volume.join("..data");
    for target in [
        copy.clone(),
        Path::new("../outside").join(copy.file_name().unwrap()),
    ] {
        fs::remove_file(&data).unwrap();
        symlink(&target, &data).unwrap();
        let e = refused(&f.volume);
        assert!(e.contains("absolute") || e.contains("above"), "{e}");
    }
    // A loop of links ends with an error, not a hang.
    fs::remove_file(&data).unwrap();
    symlink("..data", &data).unwrap();
    let e = refused(&f.volume);
    assert!(e.contains("symlinks"), "{e}");
}

#[test]
fn a_private_key_others_can_read_is_refused() {
    let Some(f) = root_fixture("a_private_key_others_can_read_is_refused") else {
        return;
    };
    let key = ts_dir(&f.volume).join(format!("{}.pem", current(&f.made)));
    // What a pod with an fsGroup gets: group-readable.
    for mode in [0o440, 0o404, 0o600 | 0o004] {
        chmod(&key, mode);
        let e = refused(&f.volume);
        assert!(
            e.contains(&key.display().to_string()) && e.contains(&format!("{mode:04o}")),
            "{e}"
        );
    }
    chmod(&key, 0o600);
    KeyRing::open_read_only(&f.volume).unwrap();
    // The public ring may be read by anyone, but written by nobody else.
    let ring = ts_dir(&f.volume).join(KEYRING_FILE);
    chmod(&ring, 0o644);
    KeyRing::open_read_only(&f.volume).unwrap();
    chmod(&ring, 0o664);
    let e = refused(&f.volume);
    assert!(e.contains("0664"), "{e}");
}

#[test]
fn files_or_directories_of_another_owner_are_refused() {
    let Some(f) = root_fixture("files_or_directories_of_another_owner_are_refused") else {
        return;
    };
    let ts = ts_dir(&f.volume);
    let key = ts.join(format!("{}.pem", current(&f.made)));
    for path in [&key, &ts.join(KEYRING_FILE), &ts, &f.volume] {
        chown(path, Some(65534), None).unwrap();
        let e = refused(&f.volume);
        assert!(e.contains("uid 65534"), "{}: {e}", path.display());
        chown(path, Some(0), None).unwrap();
    }
    KeyRing::open_read_only(&f.volume).unwrap();
}

#[test]
fn a_directory_others_can_write_is_refused_unless_mounted_read_only() {
    let Some(f) = root_fixture("a_directory_others_can_write_is_refused_unless_mounted_read_only")
    else {
        return;
    };
    // The kubelet's tmpfs is 1777; read-write, anyone could swap `..data`.
    chmod(&f.volume, 0o1777);
    let e = refused(&f.volume);
    assert!(e.contains("1777") && e.contains("read-only"), "{e}");
    // Without the sticky bit others could replace root's entries, read-only or not.
    chmod(&f.volume, 0o777);
    let e = refused(&f.volume);
    assert!(e.contains("0777") && e.contains("sticky"), "{e}");
    chmod(&f.volume, 0o755);
    let ts = ts_dir(&f.volume);
    chmod(&ts, 0o775);
    let e = refused(&f.volume);
    assert!(e.contains("0775"), "{e}");
    chmod(&ts, 0o755);
    // The volume itself must be a directory, not a link to one.
    let link = f.outside.join("keys");
    symlink(&f.volume, &link).unwrap();
    let e = refused(&link);
    assert!(e.contains("not a directory"), "{e}");
}

#[test]
fn a_swapped_data_link_gives_the_new_ring_and_its_key() {
    let Some(f) = root_fixture("a_swapped_data_link_gives_the_new_ring_and_its_key") else {
        return;
    };
    let first = current(&f.made);
    let mut ring = KeyRing::open(&f.made).unwrap();
    ring.rotate().unwrap();
    let second = ring.public().current.clone();
    kubelet_write(&f.volume, &ring_files(&f.made), 0o400, 2);
    let (opened, bytes) = KeyRing::open_read_only(&f.volume).unwrap();
    assert_eq!(opened.public().current, second);
    assert_eq!(opened.signing_key().keyid(), second);
    assert_eq!(bytes, fs::read(f.made.join(KEYRING_FILE)).unwrap());
    // The retired key's visible link went with the update.
    assert!(fs::symlink_metadata(f.volume.join(format!("{first}.pem"))).is_err());
    // A ring whose current key is missing from its version of the Secret is an error,
    // even if another version still has it.
    fs::remove_file(ts_dir(&f.volume).join(format!("{second}.pem"))).unwrap();
    let e = refused(&f.volume);
    assert!(e.contains(&format!("{second}.pem")), "{e}");
    assert!(matches!(
        KeyRing::open_read_only(&f.volume),
        Err(ProvenanceError::Key(_))
    ));
}

#[test]
fn a_directory_or_a_fifo_where_a_file_is_expected_is_refused_without_hanging() {
    let Some(f) =
        root_fixture("a_directory_or_a_fifo_where_a_file_is_expected_is_refused_without_hanging")
    else {
        return;
    };
    let ts = ts_dir(&f.volume);
    let key = ts.join(format!("{}.pem", current(&f.made)));
    // The key's name a directory (of root's, mode 0700: it passes the directory checks).
    fs::remove_file(&key).unwrap();
    fs::create_dir(&key).unwrap();
    chmod(&key, 0o700);
    let e = refused(&f.volume);
    assert!(e.contains("not a regular file"), "{e}");
    fs::remove_dir(&key).unwrap();
    // A fifo: its open must not wait for a writer.
    nix::unistd::mkfifo(&key, nix::sys::stat::Mode::from_bits_truncate(0o400)).unwrap();
    let e = refused(&f.volume);
    assert!(e.contains("not a regular file"), "{e}");
    // The visible name a link to the timestamped directory itself.
    let visible = f.volume.join(KEYRING_FILE);
    fs::remove_file(&visible).unwrap();
    symlink("..data", &visible).unwrap();
    let e = refused(&f.volume);
    assert!(e.contains("not a regular file"), "{e}");
}
