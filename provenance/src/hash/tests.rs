#![allow(clippy::unwrap_used)]
use super::*;
use std::os::unix::fs::symlink;

const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[test]
fn bytes_and_file() {
    assert_eq!(sha256_bytes(b""), EMPTY);
    assert_eq!(
        sha256_bytes(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("big");
    // Larger than one buffer, to exercise streaming.
    let data: Vec<u8> = (0..=250u8).cycle().take(BUF_SIZE * 3 + 17).collect();
    fs::write(&p, &data).unwrap();
    assert_eq!(sha256_file(&p).unwrap(), sha256_bytes(&data));
}

#[test]
fn tree_nested_symlinks_empty() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path().join("ws");
    fs::create_dir_all(r.join("a/b/c")).unwrap();
    fs::create_dir(r.join("emptydir")).unwrap();
    fs::write(r.join("top.txt"), b"top").unwrap();
    fs::write(r.join("a/b/c/deep"), b"deep").unwrap();
    fs::write(r.join("empty"), b"").unwrap();
    fs::write(d.path().join("outside"), b"secret").unwrap();
    symlink("../outside", r.join("out-link")).unwrap();
    symlink("/nonexistent/dangling", r.join("a/dangling")).unwrap();
    symlink("b", r.join("a/dirlink")).unwrap();
    let t = hash_tree(&r).unwrap();
    let keys: Vec<&str> = t.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "a/b/c/deep",
            "a/dangling",
            "a/dirlink",
            "empty",
            "out-link",
            "top.txt"
        ]
    );
    assert_eq!(t["top.txt"], sha256_bytes(b"top"));
    assert_eq!(t["a/b/c/deep"], sha256_bytes(b"deep"));
    assert_eq!(t["empty"], EMPTY);
    // Symlinks: digest of the target path, never of the target's content.
    assert_eq!(t["out-link"], sha256_bytes(b"../outside"));
    assert_eq!(t["a/dangling"], sha256_bytes(b"/nonexistent/dangling"));
    assert_eq!(t["a/dirlink"], sha256_bytes(b"b"));
}

#[test]
fn file_sizes_around_the_buffer_hash_like_sha256sum() {
    let dir = tempfile::tempdir().unwrap();
    for size in [
        0,
        1,
        4095,
        BUF_SIZE - 1,
        BUF_SIZE,
        BUF_SIZE + 1,
        2 * BUF_SIZE + 7,
    ] {
        let data: Vec<u8> = (0..size)
            .map(|i| u8::try_from(i * 31 % 251).unwrap())
            .collect();
        let path = dir.path().join(format!("f{size}"));
        fs::write(&path, &data).unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            sha256_bytes(&data),
            "size {size}"
        );
        // A file longer than the size it was opened with is read to its end.
        let (mut f, _) = open_regular(&path).unwrap();
        let mut buf = vec![0u8; BUF_SIZE];
        let stale = (size as u64).saturating_sub(3);
        let digest = hash_open_file(&mut f, stale, &path, &mut buf).unwrap();
        assert_eq!(hex::encode(digest), sha256_bytes(&data), "size {size}");
    }
}

#[test]
fn tree_many_files_parallel() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..300 {
        let sub = d.path().join(format!("d{}", i % 7));
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(format!("f{i}")), format!("content {i}")).unwrap();
    }
    let t = hash_tree(d.path()).unwrap();
    assert_eq!(t.len(), 300);
    assert_eq!(t["d3/f10"], sha256_bytes(b"content 10"));
}

#[test]
fn fifo_is_an_error_naming_the_path() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("sub")).unwrap();
    fs::write(d.path().join("ok"), b"x").unwrap();
    let fifo = d.path().join("sub/pipe");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let e = hash_tree(d.path()).unwrap_err();
    assert!(
        matches!(
            &e,
            ProvenanceError::Walk(w)
                if matches!(w.problem, walk::Problem::SpecialFile { kind: "fifo" })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("sub/pipe"), "{e}");
    // sha256_file refuses it without blocking.
    assert!(sha256_file(&fifo).is_err());
}

#[test]
fn socket_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let _l = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
    let e = hash_tree(d.path()).unwrap_err();
    assert!(e.to_string().contains("socket"), "{e}");
}

#[test]
fn root_must_be_a_real_directory() {
    let d = tempfile::tempdir().unwrap();
    symlink(d.path(), d.path().join("self")).unwrap();
    assert!(hash_tree(&d.path().join("self")).is_err());
    assert!(sha256_file(&d.path().join("self")).is_err());
    assert!(hash_tree(&d.path().join("missing")).is_err());
}
fn cached_hasher() -> TreeHasher {
    let mut h = TreeHasher::new();
    // The test tree may sit on a tmpfs /tmp; the filesystem gate has its
    // own tests.
    h.trust_all_filesystems = true;
    h
}

/// Let files written so far fall outside the racy margin.
fn age(_dir: &Path) {
    std::thread::sleep(std::time::Duration::from_millis(30));
}

#[test]
fn tree_hasher_matches_hash_tree_and_hits_when_unchanged() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..50 {
        let sub = d.path().join(format!("d{}", i % 3));
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(format!("f{i}")), format!("content {i}")).unwrap();
    }
    symlink("d0/f0", d.path().join("link")).unwrap();
    age(d.path());
    let mut h = cached_hasher();
    let first = h.hash_tree(d.path()).unwrap();
    assert_eq!(first, hash_tree(d.path()).unwrap());
    assert_eq!(
        h.last_stats(),
        CacheStats {
            hits: 0,
            misses: 50,
            not_cached: 0
        }
    );
    assert_eq!(h.len(), 50);
    let second = h.hash_tree(d.path()).unwrap();
    assert_eq!(second, first);
    assert_eq!(
        h.last_stats(),
        CacheStats {
            hits: 50,
            misses: 0,
            not_cached: 0
        }
    );
    // A removed file leaves the cache; a new one is hashed.
    fs::remove_file(d.path().join("d1/f1")).unwrap();
    fs::write(d.path().join("new"), b"new").unwrap();
    let third = h.hash_tree(d.path()).unwrap();
    assert_eq!(third, hash_tree(d.path()).unwrap());
    assert_eq!(h.last_stats().hits, 49);
    assert_eq!(h.last_stats().misses, 1);
    // "new" is too recent to be cached (racy margin).
    assert_eq!(h.last_stats().not_cached, 1);
    assert_eq!(h.len(), 49);
}

#[test]
fn edit_with_mtime_reset_is_rehashed() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f");
    fs::write(&p, b"original").unwrap();
    age(d.path());
    let mut h = cached_hasher();
    assert_eq!(
        h.hash_tree(d.path()).unwrap()["f"],
        sha256_bytes(b"original")
    );
    let before = fs::metadata(&p).unwrap();
    // Same size, new content, then put mtime (and atime) back.
    fs::write(&p, b"modified").unwrap();
    let f = fs::File::options().write(true).open(&p).unwrap();
    f.set_times(
        fs::FileTimes::new()
            .set_modified(before.modified().unwrap())
            .set_accessed(before.accessed().unwrap()),
    )
    .unwrap();
    drop(f);
    let after = fs::metadata(&p).unwrap();
    assert_eq!(after.mtime(), before.mtime());
    assert_eq!(after.mtime_nsec(), before.mtime_nsec());
    assert_eq!(after.size(), before.size());
    assert_eq!(after.ino(), before.ino());
    let t = h.hash_tree(d.path()).unwrap();
    assert_eq!(t["f"], sha256_bytes(b"modified"));
    assert_eq!(h.last_stats().hits, 0);
}

#[test]
fn inode_reuse_and_replace_by_rename_are_rehashed() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f");
    fs::write(&p, b"one").unwrap();
    age(d.path());
    let mut h = cached_hasher();
    h.hash_tree(d.path()).unwrap();
    let m = fs::metadata(&p).unwrap();
    fs::remove_file(&p).unwrap();
    fs::write(d.path().join(".tmp"), b"two").unwrap();
    fs::rename(d.path().join(".tmp"), &p).unwrap();
    let f = fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(m.modified().unwrap()).unwrap();
    drop(f);
    assert_eq!(h.hash_tree(d.path()).unwrap()["f"], sha256_bytes(b"two"));
}

#[test]
fn cache_preserves_errors_and_symlink_rules() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("a"), b"a").unwrap();
    age(d.path());
    let mut h = cached_hasher();
    h.hash_tree(d.path()).unwrap();
    // A regular file replaced by a symlink is recorded as a symlink.
    fs::remove_file(d.path().join("a")).unwrap();
    symlink("/etc/passwd", d.path().join("a")).unwrap();
    let t = h.hash_tree(d.path()).unwrap();
    assert_eq!(t["a"], sha256_bytes(b"/etc/passwd"));
    let fifo = d.path().join("pipe");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    assert!(h.hash_tree(d.path()).is_err());
    assert!(h.hash_tree(&d.path().join("a")).is_err());
}

#[test]
fn mountinfo_gate() {
    let text = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw\n\
                27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                28 1 259:65536 / /big rw shared:1 - xfs /dev/nvme rw\n";
    let devs = parse_mountinfo(text);
    assert_eq!(devs.get(&makedev(254, 0)), Some(&true));
    assert_eq!(devs.get(&makedev(0, 23)), Some(&false));
    assert_eq!(devs.get(&makedev(259, 65536)), Some(&true));
    assert_eq!(makedev(254, 0), 0xfe00);
    // The real table agrees with stat for the root filesystem.
    let real = cacheable_devices();
    let root_dev = fs::metadata("/").unwrap().dev();
    assert!(
        real.contains_key(&root_dev),
        "/ (dev {root_dev:#x}) not in mountinfo"
    );
}

#[test]
fn tmpfs_is_never_cached() {
    // tmpfs does not update ctime on every mmap write, so it must not be cached.
    let shm = Path::new("/dev/shm");
    let is_tmpfs = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/dev/shm") && l.contains(" - tmpfs "));
    if !is_tmpfs {
        eprintln!("/dev/shm is not a tmpfs here: skipped");
        return;
    }
    let d = tempfile::tempdir_in(shm).unwrap();
    fs::write(d.path().join("f"), b"x").unwrap();
    age(d.path());
    let mut h = TreeHasher::new();
    h.hash_tree(d.path()).unwrap();
    h.hash_tree(d.path()).unwrap();
    assert_eq!(
        h.last_stats(),
        CacheStats {
            hits: 0,
            misses: 1,
            not_cached: 1
        }
    );
    assert!(h.is_empty());
}

#[test]
fn real_filesystem_gate_caches_on_ext4_like_tmp() {
    let d = tempfile::tempdir().unwrap();
    let dev = fs::metadata(d.path()).unwrap().dev();
    let cacheable = cacheable_devices().get(&dev).copied().unwrap_or(false);
    fs::write(d.path().join("f"), b"x").unwrap();
    age(d.path());
    let mut h = TreeHasher::new();
    h.hash_tree(d.path()).unwrap();
    h.hash_tree(d.path()).unwrap();
    assert_eq!(h.last_stats().hits, usize::from(cacheable));
}

/// The format read plainly: every regular file by its content, every
/// symlink by its target path (never followed), directories recursively,
/// empty directories not recorded.
fn plain_reading(root: &Path) -> BTreeMap<String, String> {
    fn read_dir(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let ft = fs::symlink_metadata(&path).unwrap().file_type();
            if ft.is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.insert(rel, sha256_bytes(target.as_os_str().as_bytes()));
            } else if ft.is_dir() {
                read_dir(root, &path, out);
            } else {
                out.insert(rel, sha256_bytes(&fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    read_dir(root, root, &mut out);
    out
}

#[test]
fn mixed_tree_hashes_like_a_plain_reading() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path().join("ws");
    fs::create_dir(&r).unwrap();
    let bytes = |n: usize, seed: usize| -> Vec<u8> {
        (0..n)
            .map(|i| u8::try_from((i * 131 + seed) % 251).unwrap())
            .collect()
    };
    // Sizes around the read buffer and the batch size.
    let batch_bytes = usize::try_from(BATCH_BYTES).unwrap();
    for (i, size) in [
        0,
        1,
        4095,
        4096,
        65_536,
        BUF_SIZE - 1,
        BUF_SIZE,
        BUF_SIZE + 1,
        3 * BUF_SIZE + 5,
        batch_bytes - 1,
        batch_bytes + 1,
    ]
    .into_iter()
    .enumerate()
    {
        fs::write(r.join(format!("size-{size}")), bytes(size, i)).unwrap();
    }
    // More files in one directory than a batch holds.
    fs::create_dir(r.join("many")).unwrap();
    for i in 0..BATCH_FILES * 3 + 1 {
        fs::write(r.join(format!("many/{i:04}")), bytes(i * 7, i)).unwrap();
    }
    // A file in each of a chain of directories: batches close on descriptors.
    let mut deep = r.join("deep");
    for i in 0..BATCH_FDS * 5 {
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("f"), bytes(100 + i, i)).unwrap();
        deep = deep.join("d");
    }
    fs::create_dir(r.join("empty-dir")).unwrap();
    fs::write(r.join("ü ñ name.txt"), b"unicode").unwrap();
    fs::create_dir(d.path().join("outside")).unwrap();
    fs::write(d.path().join("outside/secret"), b"secret").unwrap();
    symlink("size-1", r.join("link-to-file")).unwrap();
    symlink("many", r.join("link-to-dir")).unwrap();
    symlink("../outside", r.join("link-out")).unwrap();
    symlink("/nonexistent", r.join("many/dangling")).unwrap();

    let plain = plain_reading(&r);
    assert!(!plain
        .keys()
        .any(|k| k.contains("secret") || k.starts_with("link-to-dir/")));
    let t = hash_tree(&r).unwrap();
    assert_eq!(t, plain);
    assert_eq!(t["link-out"], sha256_bytes(b"../outside"));
    // The cached hasher agrees, from an empty cache and from a full one.
    age(&r);
    let mut h = cached_hasher();
    assert_eq!(h.hash_tree(&r).unwrap(), plain);
    assert_eq!(h.hash_tree(&r).unwrap(), plain);
    assert_eq!(h.last_stats().misses, 0);
}

/// The walk's view of `rel` under `root`, to hand to a hashing thread.
fn walked_job(root: &Path, rel: &str) -> Job {
    let mut job = None;
    walk::walk(root, WalkOptions::default(), |e: &Entry<'_>| {
        if e.path() == rel {
            job = Some(Job::Walked {
                file: e.file_ref(),
                key: FileKey::from_stat(e.stat()),
            });
        }
        Ok::<_, WalkError>(Flow::Continue)
    })
    .unwrap();
    job.unwrap()
}

#[test]
fn file_swapped_after_the_walk_saw_it_fails_cleanly() {
    for swap in ["fifo", "directory", "symlink", "other file", "removed"] {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        let f = d.path().join("sub/f");
        fs::write(&f, b"seen").unwrap();
        fs::write(d.path().join("secret"), b"secret").unwrap();
        let job = walked_job(d.path(), "sub/f");
        // The old inode stays linked, so its number cannot be reused.
        fs::hard_link(&f, d.path().join("keep")).unwrap();
        fs::remove_file(&f).unwrap();
        match swap {
            "fifo" => {
                nix::unistd::mkfifo(&f, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap()
            }
            "directory" => fs::create_dir(&f).unwrap(),
            "symlink" => symlink("../secret", &f).unwrap(),
            "other file" => fs::write(&f, b"other").unwrap(),
            _ => {}
        }
        // A fifo would block a blocking open or read: this returns.
        let mut buf = vec![0u8; BUF_SIZE];
        let e = hash_job(job, &mut buf, None).unwrap_err();
        let ProvenanceError::Walk(w) = &e else {
            panic!("{swap}: {e}");
        };
        assert_eq!(w.path, "sub/f", "{swap}");
        match swap {
            "symlink" => assert!(
                matches!(w.problem, walk::Problem::Io(nix::errno::Errno::ELOOP)),
                "{e}"
            ),
            "removed" => assert!(
                matches!(w.problem, walk::Problem::Io(nix::errno::Errno::ENOENT)),
                "{e}"
            ),
            _ => assert!(matches!(w.problem, walk::Problem::Changed), "{swap}: {e}"),
        }
    }
}

#[test]
fn hashing_a_wide_tree_holds_few_descriptors() {
    let d = tempfile::tempdir().unwrap();
    // One file per directory: a batch that held a descriptor per file's
    // directory for every queued file would hold thousands.
    for i in 0..3000 {
        let sub = d.path().join(format!("d{i:04}"));
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("f"), format!("{i}")).unwrap();
    }
    let done = AtomicBool::new(false);
    let most = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(fs::read_dir("/proc/self/fd").unwrap().count());
            }
            most
        });
        let t = hash_tree(d.path()).unwrap();
        done.store(true, Ordering::Relaxed);
        assert_eq!(t.len(), 3000);
        assert_eq!(t["d1234/f"], sha256_bytes(b"1234"));
        watcher.join().unwrap()
    });
    // Queued and in-flight batches hold at most BATCH_FDS each, hashing
    // threads one file each; other test threads open files too.
    let bound = (3 * MAX_THREADS + 1) * BATCH_FDS + MAX_THREADS + 100;
    assert!(most < bound, "{most} descriptors open while hashing");
}
