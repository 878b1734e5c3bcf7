//! What the proxy records of a step's network: one attempt per CONNECT or request,
//! its counters kept live while its connection runs, and the step's report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One attempt as it goes into the step's link.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    pub method: String,
    pub host: String,
    pub port: u16,
    /// What the daemon resolved the name to (empty for literal addresses).
    pub resolved: Vec<String>,
    /// The address actually connected to, if any.
    pub address: String,
    /// "allowed" or "denied".
    pub decision: String,
    pub reason: String,
    /// For a tunnel: the server name its TLS ClientHello sent (SNI), if any.
    pub sni: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

impl From<&Attempt> for agent_proto::v1::NetworkAttempt {
    fn from(a: &Attempt) -> Self {
        Self {
            method: a.method.clone(),
            host: a.host.clone(),
            port: u32::from(a.port),
            resolved: a.resolved.clone(),
            address: a.address.clone(),
            decision: a.decision.clone(),
            reason: a.reason.clone(),
            sni: a.sni.clone(),
            bytes_up: a.bytes_up,
            bytes_down: a.bytes_down,
            duration_ms: a.duration_ms,
        }
    }
}

/// Everything the proxy saw during one step.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Report {
    pub attempts: Vec<Attempt>,
    /// Attempts beyond the recorded ones.
    pub unrecorded: u64,
}

/// An attempt whose connection may still be running: its byte counters move while
/// it relays.
pub(super) struct Live {
    attempt: Mutex<Attempt>,
    pub(super) up: AtomicU64,
    pub(super) down: AtomicU64,
    started: Instant,
    ended: Mutex<Option<Duration>>,
}

impl Live {
    pub(super) fn new(attempt: Attempt) -> Live {
        // A refusal is over when it is recorded.
        let ended = (attempt.decision == "denied").then_some(Duration::ZERO);
        Live {
            attempt: Mutex::new(attempt),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            started: Instant::now(),
            ended: Mutex::new(ended),
        }
    }

    pub(super) fn snapshot(&self) -> Attempt {
        let mut a = self
            .attempt
            .lock()
            .map(|a| a.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        a.bytes_up = self.up.load(Ordering::Relaxed);
        a.bytes_down = self.down.load(Ordering::Relaxed);
        let elapsed = self
            .ended
            .lock()
            .ok()
            .and_then(|e| *e)
            .unwrap_or_else(|| self.started.elapsed());
        // Reported to the client; saturates rather than wraps.
        a.duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        a
    }

    pub(super) fn update(&self, change: impl FnOnce(&mut Attempt)) {
        match self.attempt.lock() {
            Ok(mut a) => change(&mut a),
            Err(poisoned) => change(&mut poisoned.into_inner()),
        }
    }

    /// Fixes the duration the first time the attempt's connection ends.
    pub(super) fn end(&self) {
        if let Ok(mut ended) = self.ended.lock() {
            ended.get_or_insert_with(|| self.started.elapsed());
        }
    }
}

pub(super) fn attempt(
    method: &str,
    host: &str,
    port: u16,
    decision: &str,
    reason: String,
) -> Attempt {
    Attempt {
        method: method.to_string(),
        host: host.to_string(),
        port,
        resolved: Vec::new(),
        address: String::new(),
        decision: decision.into(),
        reason,
        sni: String::new(),
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
    }
}

pub(super) fn denied(method: &str, host: &str, port: u16, reason: String) -> Attempt {
    attempt(method, host, port, "denied", reason)
}
