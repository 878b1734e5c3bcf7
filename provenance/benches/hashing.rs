//! Tree hashing benchmark (plain timing, medians; `harness = false`).
//!
//!     cargo bench -p provenance --bench hashing -- [--files N] [--big-mib N]
//!         [--runs N] [--big-runs N] [--dir PATH] [--no-sha256sum]
//!
//! Builds, in a temporary directory (under --dir, default the system temp
//! dir), a tree of N files (default 10,000) of 4-64 KiB random bytes and one
//! file of --big-mib MiB (default 1024), then measures in the same run:
//! - two single-thread sha2 ceilings, sampled before every measured run, best
//!   sample kept: "in cache" hashes a 256 KiB buffer over and over (the speed
//!   of sha2 itself), "from memory" one 64 MiB buffer (bytes coming from RAM,
//!   as a file's do from the page cache);
//! - `hash_tree` cold (page cache dropped before each run, when running as
//!   root) and warm, --runs times (default 30) for the tree and --big-runs
//!   times (default 10) for the big file;
//! - `TreeHasher` re-hashing the unchanged tree (cache warm);
//! - `sha256sum` (the tree through `xargs -P <cores>`; the big file alone).
//!
//! Each hash_tree figure is the median of its runs, in GB/s (10^9 bytes per
//! second), and as a share of the ceiling two ways:
//! - per thread: bytes / (wall time x threads used) against the ceiling by
//!   wall time (the tree uses every hashing thread, the big file one);
//! - per CPU-second: bytes / CPU time of the process (every thread, kernel
//!   time included) against the ceiling per CPU-second of its thread. On a
//!   machine shared with other work this one does not count the time the
//!   threads waited for a core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::time::{clock_gettime, ClockId};
use provenance::hash::{hash_tree, TreeHasher};
use sha2::{Digest, Sha256};

struct Args {
    files: usize,
    big_mib: usize,
    runs: usize,
    big_runs: usize,
    dir: Option<PathBuf>,
    peer: bool,
}

fn args() -> Args {
    let mut a = Args {
        files: 10_000,
        big_mib: 1024,
        runs: 30,
        big_runs: 10,
        dir: None,
        peer: true,
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
            "--big-runs" => a.big_runs = num(&mut it).max(1),
            "--no-sha256sum" => a.peer = false,
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

/// One measured run: wall time and CPU time of the whole process.
#[derive(Clone, Copy)]
struct Sample {
    wall: f64,
    cpu: f64,
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median of bytes / (wall x threads) over the runs: throughput per thread,
/// counting the time a thread waited for a core.
fn per_thread(bytes: u64, threads: usize, samples: &[Sample]) -> f64 {
    median_f64(
        samples
            .iter()
            .map(|s| bytes as f64 / (s.wall * threads as f64))
            .collect(),
    )
}

/// Median of bytes / CPU seconds over the runs: throughput per CPU-second,
/// not counting the time a thread waited for a core another process held.
fn per_cpu(bytes: u64, samples: &[Sample]) -> f64 {
    median_f64(samples.iter().map(|s| bytes as f64 / s.cpu).collect())
}

/// A single-thread sha2 ceiling in bytes per second: one thread hashing
/// memory (no I/O, no copies), sampled before every measured run so that
/// load on a shared machine skews both alike. It is a maximum, so the best
/// sample is kept, by wall time and by the thread's CPU time.
#[derive(Default)]
struct Ceiling {
    wall: f64,
    cpu: f64,
}

/// The two ceilings: `cache` hashes a 256 KiB buffer over and over (data in
/// the core's cache: the speed of sha2 itself, the strict one); `memory`
/// hashes one 64 MiB buffer (data from RAM, as a file in the page cache).
#[derive(Default)]
struct Ceilings {
    cache: Ceiling,
    memory: Ceiling,
}

const CACHE_BUF: usize = 256 << 10;

fn ceiling_sample(mem: &[u8], best: &mut Ceilings) {
    let sample = |best: &mut Ceiling, f: &dyn Fn()| {
        let c = thread_cpu_seconds();
        let t = Instant::now();
        f();
        let wall = t.elapsed().as_secs_f64();
        let cpu = thread_cpu_seconds() - c;
        let b = mem.len() as f64;
        best.wall = best.wall.max(b / wall);
        best.cpu = best.cpu.max(b / cpu);
    };
    sample(&mut best.memory, &|| {
        std::hint::black_box(Sha256::digest(std::hint::black_box(mem)));
    });
    sample(&mut best.cache, &|| {
        let mut h = Sha256::new();
        for _ in 0..mem.len() / CACHE_BUF {
            h.update(std::hint::black_box(&mem[..CACHE_BUF]));
        }
        std::hint::black_box(h.finalize());
    });
}

fn measure(before: impl FnOnce(), f: impl FnOnce()) -> Sample {
    before();
    let c = process_cpu_seconds();
    let t = Instant::now();
    f();
    let wall = t.elapsed().as_secs_f64();
    Sample {
        wall,
        cpu: process_cpu_seconds() - c,
    }
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
    let have_sha256sum = a.peer && Command::new("sha256sum").arg("--version").output().is_ok();
    let root = is_root();

    println!(
        "tree: {} files of 4-64 KiB, {} runs; big: {} MiB, {} runs; medians; {} hashing threads; dir {}",
        a.files,
        a.runs,
        a.big_mib,
        a.big_runs,
        threads,
        base.path().display()
    );
    let tree_bytes = make_tree(&tree, a.files);
    let big_bytes = make_big(&bigdir.join("big.bin"), a.big_mib);
    // Let every file age past the cache's racy margin.
    std::thread::sleep(Duration::from_millis(50));

    println!("load average at start: {}", loadavg());
    let mut mem = vec![0u8; 64 << 20];
    Rng(7).fill(&mut mem);
    let mut ceiling = Ceilings::default();
    ceiling_sample(&mem, &mut ceiling);

    let mut table = Vec::new();
    for (label, dir, bytes, used, runs) in [
        ("tree", tree.as_path(), tree_bytes, threads, a.runs),
        ("big file", bigdir.as_path(), big_bytes, 1, a.big_runs),
    ] {
        println!("-- {label}: {:.1} MB", bytes as f64 / 1e6);
        // Cold: page cache dropped before each run (root only).
        let mut cold = Vec::new();
        if root {
            for _ in 0..runs {
                ceiling_sample(&mem, &mut ceiling);
                cold.push(measure(
                    || assert!(drop_caches()),
                    || {
                        hash_tree(dir).unwrap();
                    },
                ));
            }
        } else {
            println!("hash_tree cold: not root, cannot drop the page cache (warm figures only)");
        }
        let mut hasher = TreeHasher::new();
        hasher.hash_tree(dir).unwrap();
        let (mut warm, mut cached, mut peer) = (vec![], vec![], vec![]);
        for _ in 0..runs {
            ceiling_sample(&mem, &mut ceiling);
            warm.push(measure(
                || {},
                || {
                    hash_tree(dir).unwrap();
                },
            ));
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
        let cached = median(cached).as_secs_f64();
        let warm_wall = median_f64(warm.iter().map(|s| s.wall).collect());
        let cold_wall =
            (!cold.is_empty()).then(|| median_f64(cold.iter().map(|s| s.wall).collect()));
        table.push((label, "warm", bytes, used, warm));
        if !cold.is_empty() {
            table.push((label, "cold", bytes, used, cold));
        }
        let st = hasher.last_stats();
        println!(
            "TreeHasher re-hash, unchanged   {:8.2} ms  (hits {}, misses {}) = {:.1}% of warm{}",
            cached * 1e3,
            st.hits,
            st.misses,
            100.0 * cached / warm_wall,
            cold_wall
                .map(|c| format!(", {:.1}% of cold", 100.0 * cached / c))
                .unwrap_or_default()
        );
        if have_sha256sum {
            let t = median(peer);
            println!(
                "sha256sum{}  {:6.2} GB/s  {:8.1} ms  (hash_tree warm is {:.2}x faster)",
                if label == "tree" {
                    format!(" (xargs -P {threads})")
                } else {
                    String::new()
                },
                gbps(bytes, t),
                t.as_secs_f64() * 1e3,
                t.as_secs_f64() / warm_wall,
            );
        }
    }
    let (cache, memory) = (&ceiling.cache, &ceiling.memory);
    println!(
        "sha2 ceiling, 1 thread, best sample: in cache {:.2} GB/s by wall time, {:.2} GB/s per CPU-second;",
        cache.wall / 1e9,
        cache.cpu / 1e9
    );
    println!(
        "                                     from memory {:.2} GB/s by wall time, {:.2} GB/s per CPU-second",
        memory.wall / 1e9,
        memory.cpu / 1e9
    );
    println!(
        "per thread: bytes / (wall x threads), against the ceiling by wall time; per CPU-s: bytes / CPU time of the process"
    );
    println!(
        "{:<14} {:>4} {:>9} {:>6} | {:>18} | {:>18} | {:>19}",
        "", "", "", "", "per thread", "per CPU-second", "vs memory ceiling"
    );
    println!(
        "{:<14} {:>4} {:>9} {:>6} | {:>7} {:>10} | {:>7} {:>10} | {:>9} {:>9}",
        "page cache",
        "runs",
        "median ms",
        "GB/s",
        "GB/s",
        "% ceiling",
        "GB/s",
        "% ceiling",
        "thread",
        "CPU-s"
    );
    for (label, cache_state, bytes, used, samples) in &table {
        let wall = median_f64(samples.iter().map(|s| s.wall).collect());
        let thread = per_thread(*bytes, *used, samples);
        let cpu = per_cpu(*bytes, samples);
        println!(
            "{:<14} {:>4} {:>9.1} {:>6.2} | {:>7.2} {:>9.1}% | {:>7.2} {:>9.1}% | {:>8.1}% {:>8.1}%",
            format!("{label} {cache_state}"),
            samples.len(),
            wall * 1e3,
            *bytes as f64 / wall / 1e9,
            thread / 1e9,
            100.0 * thread / cache.wall,
            cpu / 1e9,
            100.0 * cpu / cache.cpu,
            100.0 * thread / memory.wall,
            100.0 * cpu / memory.cpu,
        );
    }
    println!("load average at end: {}", loadavg());
}

/// CPU time of this process, all threads, in seconds.
fn process_cpu_seconds() -> f64 {
    cpu_clock(ClockId::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    cpu_clock(ClockId::CLOCK_THREAD_CPUTIME_ID)
}

fn cpu_clock(id: ClockId) -> f64 {
    let t = clock_gettime(id).unwrap();
    t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
