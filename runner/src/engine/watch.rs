//! Job events for Watch, in bounded memory whatever a step writes or a client reads.
//!
//! A job in the daemon's hands keeps its events in an [`EventRing`]: every event but
//! step output (few and small), and the most recent step output up to a cap in bytes.
//! Output is never lost from disk: each step's stdout and stderr are stored in the
//! content store (`StepResult.stdout_digest` / `stderr_digest`). A subscriber that falls
//! behind the ring skips the rest of that step's live output and sends it from the
//! stored log when the step finishes, so every stream still arrives whole and in order.
//! A finished job holds no output in memory: it is replayed from its record and the store.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use agent_proto::v1::{
    job_event, Job, JobEvent, JobState, OutputDropped, OutputStream, StepOutput, StepResult,
    StepStarted, StepState,
};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::store::cas::ContentStore;

/// Events handed to a subscriber per look at the ring: it never copies a whole backlog.
const BATCH: usize = 16;
/// Events buffered per Watch stream between the daemon and a slow client.
pub const STREAM_BUFFER: usize = 16;
/// What an output event costs beyond its data (its step name, the event, the Arc).
const EVENT_OVERHEAD: usize = 128;
/// Output read back from a stored log, per event: a stalled stream buffers at most
/// [`STREAM_BUFFER`] of these.
const STORED_CHUNK: usize = 32 * 1024;

/// The events of one job still in the daemon's hands.
pub struct EventRing {
    state: Mutex<RingState>,
    version: watch::Sender<u64>,
}

struct RingState {
    next_sequence: u64,
    skeleton: Vec<Arc<JobEvent>>,
    output: VecDeque<Arc<JobEvent>>,
    output_bytes: usize,
    cap: usize,
    finished: bool,
}

impl EventRing {
    /// A ring keeping at most `cap` bytes of step output.
    pub fn new(cap: usize) -> Self {
        Self {
            state: Mutex::new(RingState {
                next_sequence: 0,
                skeleton: Vec::new(),
                output: VecDeque::new(),
                output_bytes: 0,
                cap,
                finished: false,
            }),
            version: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, RingState> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn push(&self, job_id: &str, event: job_event::Event) {
        {
            let mut state = self.lock();
            let sequence = state.next_sequence;
            state.next_sequence += 1;
            let output_cost = match &event {
                job_event::Event::Output(o) => Some(o.data.len() + o.step.len() + EVENT_OVERHEAD),
                _ => None,
            };
            let event = Arc::new(JobEvent {
                job_id: job_id.to_string(),
                sequence,
                event: Some(event),
            });
            match output_cost {
                Some(cost) => {
                    state.output.push_back(event);
                    state.output_bytes += cost;
                    while state.output_bytes > state.cap {
                        let Some(old) = state.output.pop_front() else {
                            break;
                        };
                        state.output_bytes -= output_cost_of(&old);
                    }
                }
                None => state.skeleton.push(event),
            }
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Records the job's last event and drops its output from memory: subscribers
    /// still behind send the rest from the stored logs.
    pub fn finish(&self, job_id: &str, job: Job) {
        self.push(job_id, job_event::Event::JobFinished(job));
        {
            let mut state = self.lock();
            state.finished = true;
            state.output = VecDeque::new();
            state.output_bytes = 0;
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Bytes of step output held now.
    #[cfg(test)]
    fn output_bytes(&self) -> usize {
        self.lock().output_bytes
    }

    /// Up to [`BATCH`] events from sequence `from` on, oldest first, and whether the
    /// job has finished (then the events end with JobFinished).
    fn after(&self, from: u64) -> (Vec<Arc<JobEvent>>, bool) {
        let state = self.lock();
        let start = |events: &dyn Fn(usize) -> u64, len: usize| {
            // Both lists are sorted by sequence.
            let (mut lo, mut hi) = (0, len);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if events(mid) < from {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            lo
        };
        let mut s = start(&|i| state.skeleton[i].sequence, state.skeleton.len());
        let mut o = start(&|i| state.output[i].sequence, state.output.len());
        let mut batch = Vec::new();
        while batch.len() < BATCH {
            let next = match (state.skeleton.get(s), state.output.get(o)) {
                (Some(a), Some(b)) if a.sequence < b.sequence => {
                    s += 1;
                    a
                }
                (_, Some(b)) => {
                    o += 1;
                    b
                }
                (Some(a), None) => {
                    s += 1;
                    a
                }
                (None, None) => break,
            };
            batch.push(next.clone());
        }
        (batch, state.finished)
    }
}

fn output_cost_of(event: &JobEvent) -> usize {
    match &event.event {
        Some(job_event::Event::Output(o)) => o.data.len() + o.step.len() + EVENT_OVERHEAD,
        _ => 0,
    }
}

/// The events of one Watch stream, numbered as they are sent.
pub struct Sender {
    tx: mpsc::Sender<Result<JobEvent, Status>>,
    job_id: String,
    sequence: u64,
}

impl Sender {
    pub fn new(tx: mpsc::Sender<Result<JobEvent, Status>>, job_id: String) -> Self {
        Self {
            tx,
            job_id,
            sequence: 0,
        }
    }

    /// Ends the stream with an error status.
    async fn fail(&mut self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }

    /// False once the client is gone.
    async fn send(&mut self, event: job_event::Event) -> bool {
        let event = JobEvent {
            job_id: self.job_id.clone(),
            sequence: self.sequence,
            event: Some(event),
        };
        self.sequence += 1;
        self.tx.send(Ok(event)).await.is_ok()
    }

    /// Sends bytes `from..` of a stored step log as output events; false once the
    /// client is gone. A log that cannot be read is reported in the stream.
    async fn send_stored(
        &mut self,
        cas: &ContentStore,
        step: &str,
        stream: OutputStream,
        digest: &str,
        from: u64,
    ) -> bool {
        // Read through the store's check: the whole blob is hashed (the part before
        // `from` too), and the last piece goes out only once the content matched.
        let read = async {
            let mut reader = {
                let (cas, digest) = (cas.clone(), digest.to_string());
                tokio::task::spawn_blocking(move || cas.reader(&digest))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?
            };
            let mut offset = 0u64;
            let mut held: Option<Vec<u8>> = None;
            loop {
                let (back, next) = tokio::task::spawn_blocking(move || {
                    let next = reader.next_chunk();
                    (reader, next)
                })
                .await
                .map_err(|e| e.to_string())?;
                reader = back;
                let Some(chunk) = next.map_err(|e| e.to_string())? else {
                    if let Some(last) = held.take() {
                        if !self.send_pieces(step, stream, &last).await {
                            return Ok(false);
                        }
                    }
                    return Ok(true);
                };
                let start = offset;
                offset += chunk.len() as u64;
                if offset <= from {
                    continue;
                }
                let skip = usize::try_from(from.saturating_sub(start)).unwrap_or(usize::MAX);
                let data = chunk.get(skip..).unwrap_or_default().to_vec();
                if let Some(previous) = held.replace(data) {
                    if !self.send_pieces(step, stream, &previous).await {
                        return Ok(false);
                    }
                }
            }
        };
        let result: Result<bool, String> = read.await;
        match result {
            Ok(open) => open,
            Err(err) => {
                tracing::warn!(job = %self.job_id, step, error = %err, "reading a stored step log");
                self.send(job_event::Event::OutputDropped(OutputDropped {
                    step: step.to_string(),
                    reason: "the step's stored log could not be read".into(),
                }))
                .await
            }
        }
    }

    /// Stored output as events of at most [`STORED_CHUNK`] bytes; false once the client
    /// is gone.
    async fn send_pieces(&mut self, step: &str, stream: OutputStream, data: &[u8]) -> bool {
        for piece in data.chunks(STORED_CHUNK) {
            let output = StepOutput {
                step: step.to_string(),
                stream: stream as i32,
                data: piece.to_vec(),
            };
            if !self.send(job_event::Event::Output(output)).await {
                return false;
            }
        }
        true
    }

    /// The part of a finished step's logs this stream has not carried yet.
    async fn send_rest_of_logs(
        &mut self,
        cas: &ContentStore,
        result: &StepResult,
        delivered: &HashMap<(String, i32), u64>,
    ) -> bool {
        for (stream, digest, size) in [
            (
                OutputStream::Stdout,
                &result.stdout_digest,
                result.stdout_size,
            ),
            (
                OutputStream::Stderr,
                &result.stderr_digest,
                result.stderr_size,
            ),
        ] {
            let sent = delivered
                .get(&(result.name.clone(), stream as i32))
                .copied()
                .unwrap_or(0);
            if digest.is_empty() || sent >= size {
                continue;
            }
            if !self
                .send_stored(cas, &result.name, stream, digest, sent)
                .await
            {
                return false;
            }
        }
        true
    }
}

/// Follows a job in the daemon's hands until it finishes or the client leaves.
///
/// A job that has not started when the daemon stops starting jobs (`shutdown` turns
/// true) will not run in this daemon's life: its stream ends with UNAVAILABLE then,
/// so that the shutdown does not wait for it.
pub async fn follow(
    ring: Arc<EventRing>,
    cas: ContentStore,
    mut out: Sender,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut started = false;
    let mut changes = ring.version.subscribe();
    let mut next = 0u64;
    // Output bytes carried per (step, stream): always a prefix of the stored log.
    let mut delivered: HashMap<(String, i32), u64> = HashMap::new();
    // Output of the running step was dropped from the ring before this stream carried
    // it: its later live output is skipped and sent from the stored log at its end.
    let mut skipping: Option<String> = None;
    let mut step = String::new();
    loop {
        let (batch, finished) = ring.after(next);
        let empty = batch.is_empty();
        for event in batch {
            if event.sequence > next && skipping.is_none() {
                // Only output is ever dropped from the ring.
                tracing::debug!(job = %out.job_id, step = %step, "a Watch stream fell behind the live window; the rest of the step's output follows from its stored log");
                skipping = Some(step.clone());
            }
            next = event.sequence + 1;
            let Some(kind) = event.event.clone() else {
                continue;
            };
            match &kind {
                job_event::Event::Output(o) => {
                    if skipping.is_some() {
                        continue;
                    }
                    *delivered.entry((o.step.clone(), o.stream)).or_default() +=
                        o.data.len() as u64;
                }
                job_event::Event::Started(_) => started = true,
                job_event::Event::StepStarted(s) => step.clone_from(&s.name),
                job_event::Event::StepFinished(result) => {
                    skipping = None;
                    if !out.send_rest_of_logs(&cas, result, &delivered).await {
                        return;
                    }
                }
                job_event::Event::JobFinished(_) => {
                    if let Some(step) = skipping.take() {
                        let dropped = OutputDropped {
                            step,
                            reason: "the step ended without a stored log".into(),
                        };
                        if !out.send(job_event::Event::OutputDropped(dropped)).await {
                            return;
                        }
                    }
                }
                _ => {}
            }
            let last = matches!(kind, job_event::Event::JobFinished(_));
            if !out.send(kind).await || last {
                return;
            }
        }
        if empty {
            if finished {
                return;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() {
                    return;
                },
                // The guard of the watched value stays inside: it is not Send.
                _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() }, if !started => {
                    out.fail(Status::unavailable(
                        "the daemon is shutting down; the job stays queued and runs after it restarts",
                    ))
                    .await;
                    return;
                }
            }
        }
    }
}

/// Replays a job from its record: what `follow` would have sent, each step's stdout
/// before its stderr.
pub async fn replay(job: Job, cas: ContentStore, mut out: Sender) {
    let state = JobState::try_from(job.state).unwrap_or(JobState::Unspecified);
    if !out.send(job_event::Event::Queued(Default::default())).await {
        return;
    }
    if job.started_unix_ms != 0
        && !out
            .send(job_event::Event::Started(Default::default()))
            .await
    {
        return;
    }
    for result in &job.steps {
        let step_state = StepState::try_from(result.state).unwrap_or(StepState::Unspecified);
        if matches!(step_state, StepState::Pending | StepState::Unspecified) {
            continue;
        }
        let started = StepStarted {
            name: result.name.clone(),
        };
        if !out.send(job_event::Event::StepStarted(started)).await {
            return;
        }
        if step_state == StepState::Running {
            continue;
        }
        if !out.send_rest_of_logs(&cas, result, &HashMap::new()).await
            || !out
                .send(job_event::Event::StepFinished(result.clone()))
                .await
        {
            return;
        }
    }
    if matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Error
    ) {
        out.send(job_event::Event::JobFinished(job)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn output(step: &str, n: usize) -> job_event::Event {
        job_event::Event::Output(StepOutput {
            step: step.into(),
            stream: OutputStream::Stdout as i32,
            data: vec![b'x'; n],
        })
    }

    fn started(step: &str) -> job_event::Event {
        job_event::Event::StepStarted(StepStarted { name: step.into() })
    }

    #[test]
    fn the_ring_drops_old_output_only_and_stays_within_its_cap() {
        let ring = EventRing::new(64 * 1024);
        ring.push("j", job_event::Event::Queued(Default::default()));
        ring.push("j", started("a"));
        for _ in 0..1000 {
            ring.push("j", output("a", 1024));
            assert!(ring.output_bytes() <= 64 * 1024);
        }
        ring.push("j", started("b"));
        // A subscriber from the start sees every non-output event, then output from
        // where the ring still has it, in sequence order.
        let (batch, finished) = ring.after(0);
        assert!(!finished);
        assert_eq!(batch[0].sequence, 0);
        assert_eq!(batch[1].sequence, 1);
        assert!(batch[2].sequence > 2, "old output was dropped");
        assert!(batch.windows(2).all(|w| w[0].sequence < w[1].sequence));
        assert_eq!(batch.len(), BATCH);
        // Reading on from the last event seen never repeats one.
        let (more, _) = ring.after(batch[BATCH - 1].sequence + 1);
        assert_eq!(more[0].sequence, batch[BATCH - 1].sequence + 1);
        let (tail, _) = ring.after(1002);
        assert!(matches!(
            tail.last().unwrap().event,
            Some(job_event::Event::StepStarted(_))
        ));

        ring.finish("j", Job::default());
        assert_eq!(ring.output_bytes(), 0);
        let (rest, finished) = ring.after(3);
        assert!(finished);
        assert_eq!(
            rest.len(),
            2,
            "StepStarted(b) and JobFinished: no output left"
        );
    }

    #[test]
    fn output_larger_than_the_cap_is_not_held() {
        let ring = EventRing::new(1024);
        ring.push("j", output("a", 4096));
        assert_eq!(ring.output_bytes(), 0);
        assert!(ring.after(0).0.is_empty());
    }
}
