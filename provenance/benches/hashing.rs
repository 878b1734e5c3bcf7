//! Tree hashing benchmark (plain timing, medians; `harness = false`).
//!
//!     cargo bench -p provenance --bench hashing -- [--files N] [--big-mib N] [--runs N] [--dir PATH]
//!
//! Builds, in a temporary directory (under --dir, default the system temp
//! dir), a tree of N files (default 10,000) of 4-64 KiB random bytes and one
//! file of --big-mib MiB (default 1024), then measures in the same run:
//! - the single-thread sha2 ceiling (hashing an in-memory buffer);
//! - `hash_tree` cold (page cache dropped, when running as root) and warm;
//! - `TreeHasher` re-hashing the unchanged tree (cache warm);
//! - `sha256sum` (the tree through `xargs -P <cores>`; the big file alone).
//!
//! Throughput is in GB/s (10^9 bytes per second).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use provenance::hash::{hash_tree, TreeHasher};
use sha2::{Digest, Sha256};

struct Args {
    files: usize,
    big_mib: usize,
    runs: usize,
    dir: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        files: 10_000,
        big_mib: 1024,
        runs: 5,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let num = |it: &mut dyn Iterator<Item = String>| -> usize {
            it.next().and_then(|v| v.parse().ok()).expect("a number")
        };
        match arg.as_str() {
            "--files" => a.files = num(&mut it),
            "--big-mib" => a.big_mib = num(&mut it),
            "--runs" => a.runs = num(&mut it).max(1),
            "--dir" => a.dir = it.next().map(PathBuf::from),
            // cargo bench passes --bench; ignore anything else.
            _ => {}
        }
    }
    a
}

/// xorshift64*: fast deterministic incompressible bytes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Drop the page cache; false if not permitted.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    fs::write("/proc/sys/vm/drop_caches", b"3").is_ok()
}

fn time<F: FnMut()>(runs: usize, mut before: impl FnMut(), mut f: F) -> Duration {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        before();
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    median(v)
}

fn make_tree(root: &Path, files: usize) -> u64 {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i % 100));
        if i < 100 {
            fs::create_dir_all(&dir).unwrap();
        }
        let size = 4096 + (rng.next() % (60 * 1024 + 1)) as usize;
        rng.fill(&mut buf[..size]);
        fs::write(dir.join(format!("f{i:05}")), &buf[..size]).unwrap();
        total += size as u64;
    }
    total
}

fn make_big(path: &Path, mib: usize) -> u64 {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut f = fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill(&mut buf);
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    (mib as u64) << 20
}

fn sha256sum_tree(root: &Path, threads: usize) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . -type f -print0 | xargs -0 -P {threads} -n 256 sha256sum > /dev/null"
        ))
        .current_dir(root)
        .status()
        .unwrap();
    assert!(st.success());
}

fn main() {
    let a = args();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let base = match &a.dir {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let tree = base.path().join("tree");
    let bigdir = base.path().join("big");
    fs::create_dir_all(&tree).unwrap();
    fs::create_dir_all(&bigdir).unwrap();
    let have_sha256sum = Command::new("sha256sum").arg("--version").output().is_ok();
    let root = is_root();

    println!(
        "tree: {} files of 4-64 KiB; big: {} MiB; {} runs (medians); {} hashing threads; dir {}",
        a.files,
        a.big_mib,
        a.runs,
        threads,
        base.path().display()
    );
    let tree_bytes = make_tree(&tree, a.files);
    let big_bytes = make_big(&bigdir.join("big.bin"), a.big_mib);
    // Let every file age past the cache's racy margin.
    std::thread::sleep(Duration::from_millis(50));

    println!("load average at start: {}", loadavg());
    // Ceiling: one thread, in-memory buffer (no I/O, no copies). Sampled in
    // every round next to the other measurements, so a busy machine skews
    // the ratios less.
    let mut mem = vec![0u8; 64 << 20];
    Rng(7).fill(&mut mem);

    for (label, dir, bytes, peer_threads) in [
        ("tree", tree.as_path(), tree_bytes, threads),
        ("big file", bigdir.as_path(), big_bytes, 1),
    ] {
        println!("-- {label}: {:.1} MB", bytes as f64 / 1e6);
        // Cold: page cache dropped before each run (root only).
        let cold = if root {
            let t = time(
                a.runs.min(3),
                || assert!(drop_caches()),
                || {
                    hash_tree(dir).unwrap();
                },
            );
            println!(
                "hash_tree cold (page cache dropped)  {:6.2} GB/s  {:8.1} ms",
                gbps(bytes, t),
                t.as_secs_f64() * 1e3
            );
            Some(t)
        } else {
            println!("hash_tree cold: not root, cannot drop the page cache (warm figures only)");
            None
        };
        let mut hasher = TreeHasher::new();
        hasher.hash_tree(dir).unwrap();
        let (mut ceil, mut warm, mut cached, mut peer) = (vec![], vec![], vec![], vec![]);
        let mut warm_cpu = 0.0;
        for _ in 0..a.runs {
            let t = Instant::now();
            std::hint::black_box(Sha256::digest(&mem));
            ceil.push(t.elapsed());
            let c = cpu_seconds();
            let t = Instant::now();
            hash_tree(dir).unwrap();
            warm.push(t.elapsed());
            warm_cpu += cpu_seconds() - c;
            let t = Instant::now();
            hasher.hash_tree(dir).unwrap();
            cached.push(t.elapsed());
            if have_sha256sum {
                let t = Instant::now();
                if label == "tree" {
                    sha256sum_tree(dir, threads);
                } else {
                    let st = Command::new("sha256sum")
                        .arg(dir.join("big.bin"))
                        .stdout(std::process::Stdio::null())
                        .status()
                        .unwrap();
                    assert!(st.success());
                }
                peer.push(t.elapsed());
            }
        }
        // The ceiling is a maximum: take the least-disturbed sample.
        let ceiling = gbps(mem.len() as u64, *ceil.iter().min().unwrap());
        let warm = median(warm);
        let cached = median(cached);
        let used = peer_threads.min(threads);
        println!(
            "sha2 ceiling (1 thread, in memory, best of {})  {ceiling:6.2} GB/s",
            a.runs
        );
        println!(
            "hash_tree warm page cache            {:6.2} GB/s  {:8.1} ms  = {:.0}% of ceiling x {used} thread(s)",
            gbps(bytes, warm),
            warm.as_secs_f64() * 1e3,
            100.0 * gbps(bytes, warm) / (ceiling * used as f64),
        );
        // CPU time, unlike wall time, does not count time the threads
        // waited for a core another process held.
        let per_cpu = (bytes * a.runs as u64) as f64 / warm_cpu / 1e9;
        println!(
            "hash_tree per CPU-second              {per_cpu:6.2} GB/s  = {:.0}% of the 1-thread ceiling (per-core efficiency)",
            100.0 * per_cpu / ceiling
        );
        let st = hasher.last_stats();
        println!(
            "TreeHasher re-hash, unchanged        {:8.2} ms  (hits {}, misses {}) = {:.1}% of warm{}",
            cached.as_secs_f64() * 1e3,
            st.hits,
            st.misses,
            100.0 * cached.as_secs_f64() / warm.as_secs_f64(),
            cold.map(|c| format!(", {:.1}% of cold", 100.0 * cached.as_secs_f64() / c.as_secs_f64()))
                .unwrap_or_default()
        );
        if have_sha256sum {
            let t = median(peer);
            println!(
                "sha256sum{}  {:6.2} GB/s  {:8.1} ms  (hash_tree is {:.2}x faster)",
                if label == "tree" {
                    format!(" (xargs -P {threads})       ")
                } else {
                    "                           ".into()
                },
                gbps(bytes, t),
                t.as_secs_f64() * 1e3,
                t.as_secs_f64() / warm.as_secs_f64()
            );
        } else {
            println!("sha256sum: not installed");
        }
    }
    println!("load average at end: {}", loadavg());
}

/// User + system CPU time of this process (all threads, including exited
/// ones), from /proc/self/stat, in seconds (USER_HZ = 100 ticks).
fn cpu_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime, stime are 14, 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
