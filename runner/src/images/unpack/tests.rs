//! Crafted layers: each attack must leave the host untouched (a canary directory outside
//! the tree) and either fail with a clear error or stay inside the tree.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tar::{EntryType, Header};

use super::*;

/// A layer written entry by entry with raw names (the tar crate's own setters refuse `..`
/// and absolute names, which is what the attacks need).
struct Layer(tar::Builder<Vec<u8>>);

fn header(path: &[u8], kind: EntryType, size: u64, mode: u32) -> Header {
    let mut h = Header::new_gnu();
    h.as_mut_bytes()[..path.len()].copy_from_slice(path);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h
}

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
    fn raw(mut self, mut h: Header, data: &[u8]) -> Self {
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn file(self, path: &str, data: &[u8]) -> Self {
        self.file_mode(path, data, 0o644)
    }
    fn file_mode(self, path: &str, data: &[u8], mode: u32) -> Self {
        let h = header(path.as_bytes(), EntryType::Regular, data.len() as u64, mode);
        self.raw(h, data)
    }
    fn dir(self, path: &str) -> Self {
        let h = header(path.as_bytes(), EntryType::Directory, 0, 0o755);
        self.raw(h, b"")
    }
    fn link(self, kind: EntryType, path: &str, target: &str) -> Self {
        let mut h = header(path.as_bytes(), kind, 0, 0o777);
        h.as_mut_bytes()[157..157 + target.len()].copy_from_slice(target.as_bytes());
        self.raw(h, b"")
    }
    fn symlink(self, path: &str, target: &str) -> Self {
        self.link(EntryType::Symlink, path, target)
    }
    fn hardlink(self, path: &str, target: &str) -> Self {
        self.link(EntryType::Link, path, target)
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// A directory outside the tree holding `canary` and `shadow`.
    host: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let host = dir.path().join("host");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&host).unwrap();
        fs::write(host.join("canary"), "canary\n").unwrap();
        fs::write(host.join("shadow"), "root:secret\n").unwrap();
        Fixture {
            _dir: dir,
            root,
            host,
        }
    }

    /// The host directory's path without its leading '/', as a layer names it.
    fn host_rel(&self) -> String {
        self.host
            .to_str()
            .unwrap()
            .trim_start_matches('/')
            .to_string()
    }

    /// Where the tree holds what a layer wrote at the host directory's path.
    fn contained(&self) -> PathBuf {
        self.root.join(self.host_rel())
    }

    fn unpack(&self, layers: &[Vec<u8>]) -> Result<Report, UnpackError> {
        unpack_with(&self.root, layers, Limits::default())
    }

    fn assert_host_untouched(&self) {
        let mut names: Vec<String> = fs::read_dir(&self.host)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["canary", "shadow"], "the host directory changed");
        assert_eq!(
            fs::read_to_string(self.host.join("canary")).unwrap(),
            "canary\n"
        );
        let shadow = fs::metadata(self.host.join("shadow")).unwrap();
        assert_eq!(shadow.nlink(), 1, "a hard link to the host file exists");
        assert_eq!(
            fs::read_to_string(self.host.join("shadow")).unwrap(),
            "root:secret\n"
        );
    }
}

fn unpack_with(root: &Path, layers: &[Vec<u8>], limits: Limits) -> Result<Report, UnpackError> {
    let mut unpacker = Unpacker::new(root, limits)?;
    for layer in layers {
        let mut metered = unpacker.meter(layer.as_slice());
        unpacker.apply_layer(&mut metered)?;
    }
    Ok(unpacker.report().clone())
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_directories() {
    let f = Fixture::new();
    let lower = Layer::new()
        .dir("etc")
        .file("etc/keep", b"keep")
        .file("etc/gone", b"gone")
        .dir("opt/old")
        .file("opt/old/file", b"old")
        .file("opt/lower", b"lower")
        .file("bin/tool", b"v1")
        .bytes();
    let upper = Layer::new()
        .file("etc/.wh.gone", b"")
        .file("opt/new", b"new")
        .file("opt/.wh..wh..opq", b"")
        .file("bin/tool", b"v2")
        .bytes();
    let report = f.unpack(&[lower, upper]).unwrap();
    assert!(f.root.join("etc/keep").is_file());
    assert!(!f.root.join("etc/gone").exists());
    assert!(!f.root.join("etc/.wh.gone").exists());
    // The opaque marker hides the lower layer's entries, not this layer's own.
    assert!(!f.root.join("opt/old").exists());
    assert!(!f.root.join("opt/lower").exists());
    assert_eq!(fs::read(f.root.join("opt/new")).unwrap(), b"new");
    assert_eq!(fs::read(f.root.join("bin/tool")).unwrap(), b"v2");
    assert_eq!(report.bytes, 4 + 4 + 3 + 5 + 2 + 3 + 2);
}

#[test]
fn special_bits_are_dropped_and_devices_and_fifos_skipped_and_reported() {
    let f = Fixture::new();
    let layer = Layer::new()
        .file_mode("bin/su", b"su", 0o4755)
        .file_mode("bin/wall", b"wall", 0o2755)
        .dir("tmp2")
        .raw(header(b"dev/sda", EntryType::Block, 0, 0o660), b"")
        .raw(header(b"dev/mem", EntryType::Char, 0, 0o660), b"")
        .raw(header(b"run/fifo", EntryType::Fifo, 0, 0o644), b"")
        .bytes();
    let report = f.unpack(&[layer]).unwrap();
    let mode = |p: &str| fs::metadata(f.root.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("bin/su"), 0o755);
    assert_eq!(mode("bin/wall"), 0o755);
    assert!(!f.root.join("dev/sda").exists() && !f.root.join("dev/mem").exists());
    assert!(!f.root.join("run/fifo").exists());
    assert_eq!(report.skipped_count, 3);
    assert_eq!(
        report.skipped,
        [
            "dev/sda (block device)",
            "dev/mem (character device)",
            "run/fifo (FIFO)"
        ]
    );
}

#[test]
fn a_symlink_to_the_root_then_a_file_through_it_stays_inside() {
    let f = Fixture::new();
    let through = format!("evil/{}/pwned", f.host_rel());
    let layer = Layer::new()
        .symlink("evil", "/")
        .file(&through, b"owned")
        .bytes();
    f.unpack(&[layer]).unwrap();
    f.assert_host_untouched();
    assert_eq!(fs::read(f.contained().join("pwned")).unwrap(), b"owned");
}

#[test]
fn dot_dot_and_absolute_names_stay_inside() {
    let f = Fixture::new();
    let host = f.host_rel();
    let layer = Layer::new()
        .file(&format!("../../../../../../{host}/pwned"), b"1")
        .file(&format!("a/../../../{host}/pwned2"), b"2")
        .file(&format!("/{host}/pwned3"), b"3")
        .file(&format!("./{host}/../host/canary"), b"replaced")
        .bytes();
    f.unpack(&[layer]).unwrap();
    f.assert_host_untouched();
    for name in ["pwned", "pwned2", "pwned3"] {
        assert!(f.contained().join(name).is_file(), "{name}");
    }
    assert_eq!(fs::read(f.contained().join("canary")).unwrap(), b"replaced");
}

#[test]
fn a_hard_link_to_a_host_file_is_refused() {
    for target in [
        "HOST/shadow".to_string(),
        "../../../../../../HOST/shadow".to_string(),
        "evil/HOST/shadow".to_string(),
    ] {
        let f = Fixture::new();
        let target = target.replace("HOST", &f.host_rel());
        let target = if target.starts_with("evil") || target.starts_with("..") {
            target
        } else {
            format!("/{target}")
        };
        let layer = Layer::new()
            .symlink("evil", "/")
            .hardlink("stolen", &target)
            .bytes();
        let err = f.unpack(&[layer]).unwrap_err().to_string();
        assert!(
            err.contains("is not an entry of the image"),
            "{target}: {err}"
        );
        assert!(err.contains("stolen"), "{err}");
        f.assert_host_untouched();
        assert!(!f.root.join("stolen").exists());
    }
}

#[test]
fn a_hard_link_inside_the_tree_works() {
    let f = Fixture::new();
    let layer = Layer::new()
        .file("usr/bin/gcc", b"compiler")
        .hardlink("usr/bin/cc", "/usr/bin/gcc")
        .bytes();
    f.unpack(&[layer]).unwrap();
    let (a, b) = (
        fs::metadata(f.root.join("usr/bin/gcc")).unwrap(),
        fs::metadata(f.root.join("usr/bin/cc")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
}

#[test]
fn whiteouts_cannot_remove_outside_the_tree() {
    let f = Fixture::new();
    let host = f.host_rel();
    let lower = Layer::new()
        .file("canary", b"inside")
        .symlink("link", f.host.to_str().unwrap())
        .bytes();
    let upper = Layer::new()
        .file(&format!("../../../../../{host}/.wh.canary"), b"")
        .file("link/.wh.canary", b"")
        .file(&format!("/{host}/.wh..wh..opq"), b"")
        .file("link/.wh..wh..opq", b"")
        .bytes();
    f.unpack(&[lower, upper]).unwrap();
    f.assert_host_untouched();
    // `../x` cleans to the tree's own root.
    assert!(f.root.join("canary").is_file());

    let f = Fixture::new();
    let dots = Layer::new().file("etc/.wh...", b"").bytes();
    let err = f.unpack(&[dots]).unwrap_err().to_string();
    assert!(err.contains("not a whiteout of an entry"), "{err}");
    f.assert_host_untouched();
}

#[test]
fn an_absolute_symlink_then_a_directory_through_it_stays_inside() {
    // The link's target does not exist in the tree: refused, never created on the host.
    let f = Fixture::new();
    let layer = Layer::new()
        .symlink("usr", f.host.to_str().unwrap())
        .dir("usr/newdir")
        .bytes();
    let err = f.unpack(&[layer]).unwrap_err().to_string();
    assert!(
        err.contains("usr/newdir") && err.contains("No such file"),
        "{err}"
    );
    f.assert_host_untouched();

    // It does: the directory lands there, inside the tree.
    let f = Fixture::new();
    let layer = Layer::new()
        .dir(&f.host_rel())
        .symlink("usr", f.host.to_str().unwrap())
        .dir("usr/newdir")
        .file("usr/newdir/file", b"x")
        .file("usr/canary", b"replaced")
        .bytes();
    f.unpack(&[layer]).unwrap();
    f.assert_host_untouched();
    assert!(f.contained().join("newdir/file").is_file());
    assert_eq!(fs::read(f.contained().join("canary")).unwrap(), b"replaced");

    // A symlink with `..` replacing a directory through which the next entry goes.
    let f = Fixture::new();
    let layer = Layer::new()
        .dir("lib")
        .symlink("lib", "../../../../..")
        .file(&format!("lib/{}/pwned", f.host_rel()), b"x")
        .bytes();
    f.unpack(&[layer]).unwrap();
    f.assert_host_untouched();
    assert!(f.contained().join("pwned").is_file());
}

#[test]
fn a_huge_sparse_entry_fails_on_the_size_limit_before_writing() {
    let f = Fixture::new();
    let real_size: u64 = 1 << 40;
    let mut h = header(b"huge", EntryType::GNUSparse, 512, 0o644);
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.set_real_size(real_size);
        gnu.sparse[0].set_offset(real_size - 512);
        gnu.sparse[0].set_length(512);
    }
    let layer = Layer::new().raw(h, &[7u8; 512]).bytes();
    let err = f.unpack(&[layer]).unwrap_err();
    assert!(
        matches!(err, UnpackError::TooLarge { ref path, .. } if path == "huge"),
        "{err}"
    );
    assert!(err.to_string().contains("size limit"), "{err}");
    assert!(!f.root.join("huge").exists());
    f.assert_host_untouched();
}

#[test]
fn a_file_larger_than_the_limit_fails_even_when_its_header_lies() {
    let f = Fixture::new();
    let layer = Layer::new().file("big", &vec![1u8; 64 << 10]).bytes();
    let limits = Limits {
        max_bytes: 32 << 10,
        max_entries: 10,
    };
    let err = unpack_with(&f.root, &[layer], limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
}

/// A layer of `total` empty files, made as it is read (512 bytes each, never stored).
struct ManyEntries {
    next: u64,
    total: u64,
    block: Vec<u8>,
    at: usize,
    produced: Rc<Cell<u64>>,
}

impl Read for ManyEntries {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.block.len() {
            if self.next == self.total {
                return Ok(0);
            }
            let mut h = header(
                format!("f{}", self.next).as_bytes(),
                EntryType::Regular,
                0,
                0o644,
            );
            h.set_cksum();
            self.block = h.as_bytes().to_vec();
            self.at = 0;
            self.next += 1;
        }
        let n = buf.len().min(self.block.len() - self.at);
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        self.produced.set(self.produced.get() + n as u64);
        Ok(n)
    }
}

#[test]
fn a_million_tiny_entries_stop_at_the_entry_limit() {
    let f = Fixture::new();
    let produced = Rc::new(Cell::new(0));
    let layer = ManyEntries {
        next: 0,
        total: 1_000_000,
        block: Vec::new(),
        at: 0,
        produced: produced.clone(),
    };
    let limits = Limits {
        max_bytes: 1 << 30,
        max_entries: 2_000,
    };
    let mut unpacker = Unpacker::new(&f.root, limits).unwrap();
    let mut metered = unpacker.meter(layer);
    let err = unpacker.apply_layer(&mut metered).unwrap_err();
    assert!(matches!(err, UnpackError::TooManyEntries(2_000)), "{err}");
    assert!(err.to_string().contains("entry limit"), "{err}");
    // It stopped right at the limit, not after reading the layer.
    assert!(produced.get() <= 2_001 * 512 + 10_240, "{}", produced.get());
    f.assert_host_untouched();
}

#[test]
fn an_oversized_long_name_fails_before_it_is_buffered() {
    let f = Fixture::new();
    let long = vec![b'a'; 4 << 20];
    assert!(long.len() as u64 > MAX_ENTRY_METADATA_BYTES);
    let layer = Layer::new()
        .raw(
            header(
                b"././@LongLink",
                EntryType::GNULongName,
                long.len() as u64,
                0o644,
            ),
            &long,
        )
        .file("x", b"x")
        .bytes();
    let err = f.unpack(&[layer]).unwrap_err();
    assert!(matches!(err, UnpackError::MetadataTooLarge), "{err}");
}

#[test]
fn names_clean_inside_the_root() {
    let clean_str = |p: &str| -> Vec<String> {
        clean(p.as_bytes())
            .iter()
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect()
    };
    assert_eq!(clean_str("../../etc/passwd"), ["etc", "passwd"]);
    assert_eq!(clean_str("/a/./b/../c//"), ["a", "c"]);
    assert!(clean_str("./").is_empty());
    assert!(clean_str("..").is_empty());
}

/// A layer of entries with long names (GNU long-name records): symlinks where a target
/// is given, else directories (names ending in '/') and empty files.
fn long_names(entries: &[(String, Option<String>)]) -> Vec<u8> {
    let mut layer = tar::Builder::new(Vec::new());
    for (name, target) in entries {
        let mut h = Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o755);
        match target {
            Some(target) => {
                h.set_entry_type(EntryType::Symlink);
                layer.append_link(&mut h, name, target).unwrap();
            }
            None => {
                h.set_entry_type(if name.ends_with('/') {
                    EntryType::Directory
                } else {
                    EntryType::Regular
                });
                layer.append_data(&mut h, name, io::empty()).unwrap();
            }
        }
    }
    layer.into_inner().unwrap()
}

/// Each name is at most 4096 bytes, but a name through a symlink to a deep directory
/// goes on from there: repeated, a layer builds paths far longer than any name (a tree
/// too deep for whatever walks it recursively, removing it for one, and paths too large
/// for the per-job re-hash, which holds them all). Where an entry lies in the tree, its
/// path stays within MAX_PATH_BYTES, however its name reached it.
#[test]
fn entries_whose_path_in_the_tree_is_too_long_are_refused_through_symlinks_too() {
    // "d/d/.../d": `levels` components, 2 * levels - 1 bytes.
    let deep = |levels: usize| vec!["d"; levels].join("/");
    let half = MAX_PATH_BYTES / 4 + 1;
    for leaf in [None, Some("file"), Some("symlink")] {
        let f = Fixture::new();
        let mut entries = vec![
            (format!("{}/", deep(half)), None),
            ("s".into(), Some(deep(half))),
        ];
        let through = format!("s/{}", deep(half));
        match leaf {
            None => entries.push((format!("{through}/"), None)),
            // Its directory fits; the entry in it does not.
            Some(kind) => {
                let dir = deep(half - 2);
                entries.push((format!("s/{dir}/"), None));
                let name = format!("s/{dir}/{}", "x".repeat(8));
                entries.push((name, (kind == "symlink").then(|| "y".to_string())));
            }
        }
        let layer = long_names(&entries);
        let err = f.unpack(&[layer]).unwrap_err().to_string();
        assert!(err.contains("longer than"), "{leaf:?}: {err}");
        f.assert_host_untouched();
    }

    // Up to the limit, it unpacks: this directory's path in the tree is 4096 bytes.
    let f = Fixture::new();
    let rest = format!("{}/dd", deep(half - 3));
    assert_eq!(deep(half).len() + 1 + rest.len(), MAX_PATH_BYTES);
    let layer = long_names(&[
        (format!("{}/", deep(half)), None),
        ("s".into(), Some(deep(half))),
        (format!("s/{rest}/"), None),
    ]);
    f.unpack(&[layer]).unwrap();
}

/// The stored tree is reachable by every host user (steps read it through its "other"
/// bits, from a path any uid may traverse): a world-writable directory of an image (a
/// 1777 /var/tmp once its sticky bit is dropped, or any 0777 directory) would let a
/// local user change the image on the host between its per-job re-hash and the step,
/// or make every job using it fail. Group and other never get write permission; the
/// tree is mounted read-only in the sandbox, so steps lose nothing.
#[test]
fn no_entry_of_the_tree_is_writable_by_group_or_other() {
    let f = Fixture::new();
    let mut sticky = header(b"var/tmp/", EntryType::Directory, 0, 0o1777);
    sticky.set_mode(0o1777);
    let layer = Layer::new()
        .raw(sticky, b"")
        .raw(header(b"opt/tool/", EntryType::Directory, 0, 0o777), b"")
        .file_mode("opt/tool/bin", b"tool", 0o777)
        .file_mode("etc/shared", b"x", 0o664)
        .file_mode("implied/dir/file", b"x", 0o644)
        .bytes();
    f.unpack(&[layer]).unwrap();
    let mode = |p: &str| {
        fs::symlink_metadata(f.root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("var/tmp"), 0o755);
    assert_eq!(mode("opt/tool"), 0o755);
    assert_eq!(mode("opt/tool/bin"), 0o755);
    assert_eq!(mode("etc/shared"), 0o644);
    assert_eq!(mode("implied/dir"), 0o755);
}

/// Paths of up to 4096 bytes each, as many as the entry limit allows, would have the
/// per-job re-hash hold gigabytes: the paths of all entries together are bounded too.
#[test]
fn the_paths_of_all_entries_together_stop_at_their_limit() {
    let f = Fixture::new();
    let limits = Limits {
        max_bytes: 1 << 20,
        max_entries: 64,
    };
    // 16 components of 250 bytes: a 4015-byte directory, then files in it.
    let dir: String = (0..16)
        .map(|i| format!("{i:x}").repeat(250))
        .collect::<Vec<_>>()
        .join("/");
    let mut entries = vec![(format!("{dir}/"), None)];
    entries.extend((0..20).map(|i| (format!("{dir}/f{i}"), None)));
    let err = unpack_with(&f.root, &[long_names(&entries)], limits)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("add up to more than {}", limits.max_path_bytes())),
        "{err}"
    );
    // The same entries with short paths fit.
    let f = Fixture::new();
    let short: Vec<(String, Option<String>)> = (0..60).map(|i| (format!("d/f{i}"), None)).collect();
    unpack_with(&f.root, &[long_names(&short)], limits).unwrap();
}

/// A hard link to an entry a later layer replaces by a symlink to a host file, then
/// files written at both names, and a directory replaced by a symlink to the host then
/// written through: every write stays inside the tree, and the hard link keeps its own
/// inode (the replaced entry is unlinked, never written through).
#[test]
fn hard_links_and_directories_replaced_by_symlinks_are_never_written_through() {
    let f = Fixture::new();
    let host_file = format!("/{}/canary", f.host_rel());
    let lower = Layer::new()
        .file("etc/f", b"lower")
        .hardlink("etc/h", "etc/f")
        .dir("usr/lib/")
        .bytes();
    // The tree has a directory at the host directory's path: the symlink resolves to it.
    let host_dir = long_names(&[(format!("{}/", f.host_rel()), None)]);
    let middle = Layer::new()
        .symlink("etc/f", &host_file)
        .symlink("usr/lib", &format!("/{}", f.host_rel()))
        .hardlink("etc/h2", "etc/f")
        .bytes();
    let upper = Layer::new()
        .file("etc/f", b"upper f")
        .file("etc/h2", b"upper h2")
        .file("usr/lib/canary", b"through")
        .file("usr/lib/new", b"new")
        .bytes();
    f.unpack(&[lower, host_dir, middle, upper]).unwrap();
    f.assert_host_untouched();
    assert_eq!(fs::read(f.root.join("etc/h")).unwrap(), b"lower");
    assert_eq!(fs::read(f.root.join("etc/f")).unwrap(), b"upper f");
    assert_eq!(fs::read(f.root.join("etc/h2")).unwrap(), b"upper h2");
    assert!(f.root.join("etc/h").symlink_metadata().unwrap().is_file());
    assert_eq!(fs::read(f.contained().join("canary")).unwrap(), b"through");
    assert_eq!(fs::read(f.contained().join("new")).unwrap(), b"new");
}
