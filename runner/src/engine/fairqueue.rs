//! Which queued job starts next: job slots are shared by weight among the owners (tenants)
//! with queued work, so that one owner's hundred jobs cannot hold back another's single
//! one by more than one slot turnover.
//!
//! The next job comes from the owner that holds the fewest slots for its weight
//! (running / weight), among those below their running cap; ties go to the owner served
//! least for its weight (a virtual time that advances by 1/weight per start), then to
//! the job queued first. An owner that becomes active starts where the active owners'
//! last jobs started: before their next ones, but past idleness buys no burst. Pure
//! data: the scheduler holds it.

use std::collections::{HashMap, VecDeque};

/// Virtual time of one start at weight 1.
const SCALE: u128 = 1 << 32;

/// An owner's share of the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Relative share when several owners have work (at least 1).
    pub weight: u32,
    /// Jobs of the owner running at once; `None`: no cap but the slots.
    pub max_running: Option<u32>,
}

impl Default for Share {
    fn default() -> Self {
        Self {
            weight: 1,
            max_running: None,
        }
    }
}

#[derive(Debug)]
struct Owner {
    waiting: VecDeque<(u64, String)>,
    running: u32,
    share: Share,
    vtime: u128,
}

/// The queued jobs of every owner.
#[derive(Debug, Default)]
pub struct FairQueue {
    owners: HashMap<String, Owner>,
    next_seq: u64,
}

impl FairQueue {
    /// Queues `job` of `owner`, whose share is `share` (the latest given counts).
    pub fn push(&mut self, owner: &str, share: Share, job: String) {
        let floor = self.least_active_vtime();
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = self
            .owners
            .entry(owner.to_string())
            .or_insert_with(|| Owner {
                waiting: VecDeque::new(),
                running: 0,
                share,
                vtime: 0,
            });
        if entry.waiting.is_empty() && entry.running == 0 {
            entry.vtime = entry.vtime.max(floor.unwrap_or(0));
        }
        entry.share = Share {
            weight: share.weight.max(1),
            ..share
        };
        entry.waiting.push_back((seq, job));
    }

    /// The job to start now, and its owner; `None` when nothing queued may start.
    /// The owner counts it as running until [`FairQueue::finished`].
    pub fn pop(&mut self) -> Option<(String, String)> {
        let (name, _) = self
            .owners
            .iter()
            .filter(|(_, o)| {
                !o.waiting.is_empty() && o.share.max_running.is_none_or(|cap| o.running < cap)
            })
            .min_by(|(_, a), (_, b)| {
                // running_a / weight_a against running_b / weight_b, without division.
                let load =
                    |o: &Owner, other: &Owner| u64::from(o.running) * u64::from(other.share.weight);
                load(a, b)
                    .cmp(&load(b, a))
                    .then(a.vtime.cmp(&b.vtime))
                    .then(
                        a.waiting
                            .front()
                            .map(|w| w.0)
                            .cmp(&b.waiting.front().map(|w| w.0)),
                    )
            })?;
        let name = name.clone();
        let owner = self.owners.get_mut(&name)?;
        let (_, job) = owner.waiting.pop_front()?;
        owner.running += 1;
        owner.vtime += SCALE / u128::from(owner.share.weight);
        Some((name, job))
    }

    /// A job of `owner` that [`FairQueue::pop`] gave ended.
    pub fn finished(&mut self, owner: &str) {
        if let Some(o) = self.owners.get_mut(owner) {
            o.running = o.running.saturating_sub(1);
        }
        self.forget_idle();
    }

    /// Takes a job that will not start (cancelled while queued) out of `owner`'s queue.
    pub fn remove(&mut self, owner: &str, job: &str) {
        if let Some(o) = self.owners.get_mut(owner) {
            o.waiting.retain(|(_, waiting)| waiting != job);
        }
        self.forget_idle();
    }

    /// Jobs waiting, all owners together.
    pub fn len(&self) -> usize {
        self.owners.values().map(|o| o.waiting.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Jobs waiting per owner (for metrics).
    pub fn depths(&self) -> Vec<(String, usize)> {
        self.owners
            .iter()
            .map(|(name, o)| (name.clone(), o.waiting.len()))
            .collect()
    }

    /// Where an owner that becomes active starts: the virtual time at which the active
    /// owners' last jobs started, so that it goes before their next ones.
    fn least_active_vtime(&self) -> Option<u128> {
        self.owners
            .values()
            .filter(|o| !o.waiting.is_empty() || o.running > 0)
            .map(|o| o.vtime.saturating_sub(SCALE / u128::from(o.share.weight)))
            .min()
    }

    /// Idle owners are dropped once none is active: their virtual time would be lifted
    /// to the floor anyway, and the map stays as small as the set of active owners.
    fn forget_idle(&mut self) {
        if self
            .owners
            .values()
            .all(|o| o.waiting.is_empty() && o.running == 0)
        {
            self.owners.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn share(weight: u32) -> Share {
        Share {
            weight,
            max_running: None,
        }
    }

    fn owner_of(q: &mut FairQueue) -> String {
        q.pop().unwrap().0
    }

    #[test]
    fn a_single_job_waits_at_most_one_slot_turnover_behind_a_flood() {
        let mut q = FairQueue::default();
        for i in 0..100 {
            q.push("flood", share(1), format!("f{i}"));
        }
        // Two slots, both taken by the flood.
        assert_eq!(owner_of(&mut q), "flood");
        assert_eq!(owner_of(&mut q), "flood");
        q.push("single", share(1), "s".into());
        // The first slot to free goes to the single job.
        q.finished("flood");
        assert_eq!(q.pop().unwrap(), ("single".into(), "s".into()));
        q.finished("flood");
        assert_eq!(owner_of(&mut q), "flood");
    }

    #[test]
    fn slots_are_shared_by_weight() {
        let mut q = FairQueue::default();
        for i in 0..60 {
            q.push("heavy", share(3), format!("h{i}"));
            q.push("light", share(1), format!("l{i}"));
        }
        // One slot: each start ends before the next.
        let mut starts = HashMap::new();
        for _ in 0..40 {
            let owner = owner_of(&mut q);
            *starts.entry(owner.clone()).or_insert(0) += 1;
            q.finished(&owner);
        }
        assert_eq!(starts["heavy"], 30);
        assert_eq!(starts["light"], 10);
        // Four slots at once: three to the heavy owner, one to the light.
        let mut running = HashMap::new();
        for _ in 0..4 {
            *running.entry(owner_of(&mut q)).or_insert(0) += 1;
        }
        assert_eq!(running["heavy"], 3);
        assert_eq!(running["light"], 1);
    }

    #[test]
    fn the_running_cap_holds_an_owner_back_but_not_others() {
        let mut q = FairQueue::default();
        let capped = Share {
            weight: 1,
            max_running: Some(1),
        };
        q.push("a", capped, "a1".into());
        q.push("a", capped, "a2".into());
        q.push("b", share(1), "b1".into());
        assert_eq!(q.pop().unwrap().1, "a1");
        assert_eq!(q.pop().unwrap().1, "b1");
        assert_eq!(q.pop(), None, "a is at its cap, b has nothing queued");
        q.finished("a");
        assert_eq!(q.pop().unwrap().1, "a2");
        assert!(q.is_empty());
    }

    #[test]
    fn a_removed_job_never_starts() {
        let mut q = FairQueue::default();
        q.push("a", share(1), "a1".into());
        q.push("a", share(1), "a2".into());
        q.remove("a", "a1");
        q.remove("b", "a2");
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop().unwrap().1, "a2");
        q.remove("a", "a2");
        assert!(q.is_empty() && q.pop().is_none());
    }

    #[test]
    fn an_owners_jobs_start_in_the_order_queued() {
        let mut q = FairQueue::default();
        for i in 0..5 {
            q.push("a", share(1), format!("a{i}"));
        }
        let order: Vec<String> = (0..5)
            .map(|_| {
                let (owner, job) = q.pop().unwrap();
                q.finished(&owner);
                job
            })
            .collect();
        assert_eq!(order, ["a0", "a1", "a2", "a3", "a4"]);
    }

    #[test]
    fn past_idleness_buys_no_burst() {
        let mut q = FairQueue::default();
        // `busy` keeps a backlog and is served 50 times while `late` has nothing queued.
        for i in 0..60 {
            q.push("busy", share(1), format!("b{i}"));
        }
        for _ in 0..50 {
            let (owner, _) = q.pop().unwrap();
            q.finished(&owner);
        }
        for i in 0..5 {
            q.push("late", share(1), format!("l{i}"));
        }
        // One slot: from here on the two alternate; `late` gets no 50 starts in a row.
        let mut order = Vec::new();
        for _ in 0..6 {
            let (owner, _) = q.pop().unwrap();
            q.finished(&owner);
            order.push(owner);
        }
        let late = order.iter().filter(|o| *o == "late").count();
        assert_eq!(late, 3, "{order:?}");
        assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
    }
}
