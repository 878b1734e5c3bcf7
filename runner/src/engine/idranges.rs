//! Host uid/gid ranges that no other Kiln daemon on the host uses at the same time.
//!
//! Every sandbox maps its ids onto a range of unprivileged host ids; two sandboxes
//! sharing host ids could signal, ptrace or read each other. Within one daemon the job
//! slots have disjoint ranges; across daemons (two instances, a test beside a production
//! daemon) each range is leased: the host id space is cut in blocks of [`BLOCK`] ids, and
//! a daemon holds an exclusive `flock` on a lock file per block its ranges touch, under
//! [`LOCK_DIR`]. Overlapping ranges always share a block, so they can never both be held;
//! the kernel drops the locks when a daemon dies, so a crash leaves no stale lease.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Result, RunnerError};

/// Where the block locks live: host-wide, cleared at boot.
pub const LOCK_DIR: &str = "/run/kiln/id-blocks";
/// Ids per lock block.
const BLOCK: u64 = 65_536;
/// How many positions past `uid_base` are tried for each slot before giving up.
const MAX_CANDIDATES: u64 = 4096;

/// The leased ranges of one daemon, held until it is dropped.
#[derive(Debug)]
pub struct IdRanges {
    bases: Vec<u32>,
    _locks: HashMap<u64, Flock<File>>,
}

impl IdRanges {
    /// Leases `slots` ranges of `id_range` ids, at `uid_base + k * id_range` for the
    /// smallest free k's. The error names the configured range when none is free.
    pub fn lease(lock_dir: &Path, uid_base: u32, id_range: u32, slots: u32) -> Result<Self> {
        std::fs::create_dir_all(lock_dir).map_err(RunnerError::io_path("creating", lock_dir))?;
        let mut locks: HashMap<u64, Flock<File>> = HashMap::new();
        let mut bases = Vec::new();
        let mut k = 0u64;
        while bases.len() < slots as usize {
            if k >= MAX_CANDIDATES {
                return Err(RunnerError::FailedPrecondition(format!(
                    "no free host id range: the {MAX_CANDIDATES} ranges of {id_range} ids from \
                     uid_base {uid_base} on are held by other Kiln daemons on this host (locks \
                     in {}); give this daemon another uid_base",
                    lock_dir.display()
                )));
            }
            let first = u64::from(uid_base) + k * u64::from(id_range);
            k += 1;
            let end = first + u64::from(id_range);
            // Only ranges within the host's u32 ids (`end` is exclusive, so it may be u32::MAX).
            let (Ok(base), Ok(_)) = (u32::try_from(first), u32::try_from(end)) else {
                continue;
            };
            let blocks: Vec<u64> = (first / BLOCK..end.div_ceil(BLOCK)).collect();
            let mut taken = Vec::new();
            let mut free = true;
            for &block in &blocks {
                if locks.contains_key(&block) {
                    continue;
                }
                match try_lock(&lock_path(lock_dir, block))? {
                    Some(file) => taken.push((block, file)),
                    None => {
                        free = false;
                        break;
                    }
                }
            }
            if free {
                locks.extend(taken);
                bases.push(base);
            }
            // Otherwise the blocks taken for this candidate are unlocked as they drop.
        }
        Ok(Self {
            bases,
            _locks: locks,
        })
    }

    /// The first host id of a job slot's range.
    pub fn base(&self, slot: u32) -> Option<u32> {
        self.bases.get(slot as usize).copied()
    }

    pub fn bases(&self) -> &[u32] {
        &self.bases
    }
}

fn lock_path(dir: &Path, block: u64) -> PathBuf {
    dir.join(format!("{block}.lock"))
}

/// The lock file, locked by us (until dropped); `None` if another process holds it.
fn try_lock(path: &Path) -> Result<Option<Flock<File>>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(RunnerError::io_path("opening", path))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => Ok(Some(locked)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(RunnerError::io_path("locking", path)(errno.into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn two_leases_never_overlap_and_a_dropped_one_frees_its_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let base = 200_000_000;
        let first = IdRanges::lease(dir.path(), base, 65_536, 2).unwrap();
        let second = IdRanges::lease(dir.path(), base, 65_536, 2).unwrap();
        let ranges = |l: &IdRanges| -> Vec<(u64, u64)> {
            l.bases()
                .iter()
                .map(|&b| (u64::from(b), u64::from(b) + 65_536))
                .collect()
        };
        assert_eq!(first.base(0), Some(base));
        for (a0, a1) in ranges(&first) {
            for (b0, b1) in ranges(&second) {
                assert!(a1 <= b0 || b1 <= a0, "{a0}..{a1} overlaps {b0}..{b1}");
            }
        }
        // A range of another size still never overlaps.
        let odd = IdRanges::lease(dir.path(), base + 1000, 100_000, 1).unwrap();
        for (a0, a1) in ranges(&first).into_iter().chain(ranges(&second)) {
            let b0 = u64::from(odd.bases()[0]);
            assert!(a1 <= b0 || b0 + 100_000 <= a0);
        }
        drop(first);
        let again = IdRanges::lease(dir.path(), base, 65_536, 1).unwrap();
        assert_eq!(again.base(0), Some(base));
    }
}
