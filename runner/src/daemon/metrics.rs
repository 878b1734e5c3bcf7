//! Prometheus metrics: the engine's events counted as they happen (an observer of the
//! bus), what is cheaper to read at scrape time (the audit log, the content store, TLS
//! handshake failures), and the endpoint `GET /metrics` on `metrics_listen`.
//!
//! The endpoint is unauthenticated, so it answers nothing but `GET /metrics`, reads at
//! most a small request head within a deadline, closes every connection after one
//! answer, and serves a few connections at once (others are closed at accept).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_proto::v1::JobState;
use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::engine::bus::{state_label, EngineEvent, Observer};
use crate::store::audit::AuditLog;

/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 8;
/// Time a connection has to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may take in all.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Content store figures are recounted at most this often ...
const CAS_RECOUNT: Duration = Duration::from_secs(30);
/// ... from at most this many files (a bigger store is reported as far as counted).
const CAS_MAX_SCAN: u64 = 1_000_000;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    state: String,
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabels {
    layer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: String,
}

/// A function answering a counter kept elsewhere.
pub type CountSource = Box<dyn Fn() -> u64 + Send + Sync>;

/// What is read at scrape time.
#[derive(Default)]
struct Sources {
    audit: Option<Arc<AuditLog>>,
    cas_root: Option<PathBuf>,
    tls_handshake_failures: Option<CountSource>,
    /// The last count of the content store, and when it was taken.
    cas_counted: Option<(Instant, u64, u64)>,
}

pub struct Metrics {
    registry: Registry,
    jobs: Family<JobLabels, Gauge>,
    queue_depth: Family<TenantLabels, Gauge>,
    step_duration: Histogram,
    step_start_latency: Histogram,
    setup_failures: Family<LayerLabels, Counter>,
    seccomp_denials: Counter,
    proxy_decisions: Family<DecisionLabels, Counter>,
    proxy_bytes: Family<DirectionLabels, Counter>,
    cas_objects: Gauge,
    cas_bytes: Gauge,
    audit_entries: Counter,
    audit_last_checkpoint: Gauge,
    tls_handshake_failures: Counter,
    sources: Mutex<Sources>,
}

impl Metrics {
    /// Metrics starting from the jobs the database holds: (owner, state, count).
    pub fn new(jobs_by_owner_and_state: &[(String, JobState, u64)]) -> Self {
        let mut registry = Registry::with_prefix("kiln");
        let jobs = Family::<JobLabels, Gauge>::default();
        registry.register(
            "jobs",
            "Jobs by state and tenant (the owner when the job has no tenant)",
            jobs.clone(),
        );
        let queue_depth = Family::<TenantLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Jobs waiting to start, by tenant",
            queue_depth.clone(),
        );
        let step_duration = Histogram::new(exponential_buckets(0.01, 4.0, 10));
        registry.register_with_unit(
            "step_duration",
            "Time a step took, from its start until its sandbox ended",
            Unit::Seconds,
            step_duration.clone(),
        );
        let step_start_latency = Histogram::new(exponential_buckets(0.0005, 3.0, 10));
        registry.register_with_unit(
            "step_start_latency",
            "Time from a step's start to its command's exec in the sandbox",
            Unit::Seconds,
            step_start_latency.clone(),
        );
        let setup_failures = Family::<LayerLabels, Counter>::default();
        registry.register(
            "sandbox_setup_failures",
            "Steps whose sandbox could not be set up, by layer",
            setup_failures.clone(),
        );
        let seccomp_denials = Counter::default();
        registry.register(
            "seccomp_denials",
            "System calls denied by steps' seccomp filters",
            seccomp_denials.clone(),
        );
        let proxy_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "proxy_decisions",
            "Connections steps attempted through their egress proxy, by decision",
            proxy_decisions.clone(),
        );
        let proxy_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register_with_unit(
            "proxy",
            "Bytes relayed by egress proxies, by direction (up: from the step)",
            Unit::Bytes,
            proxy_bytes.clone(),
        );
        let cas_objects = Gauge::default();
        registry.register(
            "cas_objects",
            "Blobs in the content store",
            cas_objects.clone(),
        );
        let cas_bytes = Gauge::default();
        registry.register_with_unit(
            "cas",
            "Size of the blobs in the content store",
            Unit::Bytes,
            cas_bytes.clone(),
        );
        let audit_entries = Counter::default();
        registry.register(
            "audit_entries",
            "Entries in the audit log",
            audit_entries.clone(),
        );
        let audit_last_checkpoint = Gauge::default();
        registry.register_with_unit(
            "audit_last_checkpoint_timestamp",
            "Unix time of the audit log's last signed checkpoint (0: none since the start)",
            Unit::Seconds,
            audit_last_checkpoint.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes of clients that failed",
            tls_handshake_failures.clone(),
        );
        let metrics = Metrics {
            registry,
            jobs,
            queue_depth,
            step_duration,
            step_start_latency,
            setup_failures,
            seccomp_denials,
            proxy_decisions,
            proxy_bytes,
            cas_objects,
            cas_bytes,
            audit_entries,
            audit_last_checkpoint,
            tls_handshake_failures,
            sources: Mutex::new(Sources::default()),
        };
        for (owner, state, count) in jobs_by_owner_and_state {
            let count = i64::try_from(*count).unwrap_or(i64::MAX);
            let tenant = tenant_label(owner);
            metrics.job_gauge(*state, tenant).inc_by(count);
            if *state == JobState::Queued {
                metrics.queue_gauge(tenant).inc_by(count);
            }
        }
        metrics
    }

    fn job_gauge(&self, state: JobState, tenant: &str) -> Gauge {
        self.jobs
            .get_or_create(&JobLabels {
                state: state_label(state).into(),
                tenant: tenant.into(),
            })
            .clone()
    }

    fn queue_gauge(&self, tenant: &str) -> Gauge {
        self.queue_depth
            .get_or_create(&TenantLabels {
                tenant: tenant.into(),
            })
            .clone()
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The audit log whose entries and checkpoints are reported.
    pub fn set_audit_source(&self, audit: Arc<AuditLog>) {
        self.sources().audit = Some(audit);
    }

    /// The content store (its root directory) whose blobs are counted.
    pub fn set_cas_root(&self, root: PathBuf) {
        self.sources().cas_root = Some(root);
    }

    /// The count of failed TLS handshakes, kept by the TLS listeners; read at each scrape.
    pub fn set_tls_handshake_failures_source(&self, source: CountSource) {
        self.sources().tls_handshake_failures = Some(source);
    }

    /// The metrics as OpenMetrics text. Blocking: it may count the content store.
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %err, "could not encode the metrics");
        }
        out
    }

    /// Reads what is kept elsewhere into the metrics.
    fn refresh(&self) {
        let mut sources = self.sources();
        if let Some(audit) = &sources.audit {
            self.audit_entries
                .inner()
                .store(audit.entries(), std::sync::atomic::Ordering::Relaxed);
            self.audit_last_checkpoint.set(audit.last_checkpoint_unix());
        }
        if let Some(failures) = &sources.tls_handshake_failures {
            self.tls_handshake_failures
                .inner()
                .store(failures(), std::sync::atomic::Ordering::Relaxed);
        }
        let stale = sources
            .cas_counted
            .is_none_or(|(at, _, _)| at.elapsed() >= CAS_RECOUNT);
        if stale {
            if let Some(root) = sources.cas_root.clone() {
                let (objects, bytes) = count_blobs(&root);
                sources.cas_counted = Some((Instant::now(), objects, bytes));
            }
        }
        if let Some((_, objects, bytes)) = sources.cas_counted {
            self.cas_objects
                .set(i64::try_from(objects).unwrap_or(i64::MAX));
            self.cas_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }
}

impl Observer for Metrics {
    fn observe(&self, event: &EngineEvent) {
        match event {
            EngineEvent::JobStateChanged {
                owner, from, to, ..
            } => {
                let tenant = tenant_label(owner);
                if let Some(from) = from {
                    self.job_gauge(*from, tenant).dec();
                    if *from == JobState::Queued {
                        self.queue_gauge(tenant).dec();
                    }
                }
                self.job_gauge(*to, tenant).inc();
                if *to == JobState::Queued {
                    self.queue_gauge(tenant).inc();
                }
            }
            EngineEvent::StepFinished {
                duration,
                start_latency,
                ..
            } => {
                self.step_duration.observe(duration.as_secs_f64());
                // A step that never reached its exec has no start latency.
                if !start_latency.is_zero() {
                    self.step_start_latency.observe(start_latency.as_secs_f64());
                }
            }
            EngineEvent::SandboxSetupFailed { layer } => {
                self.setup_failures
                    .get_or_create(&LayerLabels {
                        layer: layer.clone(),
                    })
                    .inc();
            }
            EngineEvent::SeccompDenials { count, .. } => {
                self.seccomp_denials.inc_by(*count);
            }
            EngineEvent::Egress {
                allowed,
                denied,
                bytes_up,
                bytes_down,
                ..
            } => {
                for (decision, n) in [("allowed", allowed), ("denied", denied)] {
                    self.proxy_decisions
                        .get_or_create(&DecisionLabels {
                            decision: decision.into(),
                        })
                        .inc_by(*n);
                }
                for (direction, n) in [("up", bytes_up), ("down", bytes_down)] {
                    self.proxy_bytes
                        .get_or_create(&DirectionLabels {
                            direction: direction.into(),
                        })
                        .inc_by(*n);
                }
            }
        }
    }
}

/// The `tenant` label of an owner's jobs: the tenant's name, or the owner key of an owner
/// outside the tenants. One function for the counts read at start and the changes seen
/// later, so both land on the same series.
fn tenant_label(owner: &str) -> &str {
    crate::tenants::tenant_of_owner(owner).unwrap_or(owner)
}

/// Blobs and their bytes in the content store's shard directories (`<2 hex>/<digest>`),
/// counting at most [`CAS_MAX_SCAN`] files.
fn count_blobs(root: &std::path::Path) -> (u64, u64) {
    let (mut objects, mut bytes) = (0u64, 0u64);
    let Ok(shards) = std::fs::read_dir(root) else {
        return (0, 0);
    };
    for shard in shards.flatten() {
        let name = shard.file_name();
        let is_shard = name.len() == 2
            && name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_hexdigit()));
        if !is_shard {
            continue;
        }
        let Ok(blobs) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        for blob in blobs.flatten() {
            if objects >= CAS_MAX_SCAN {
                return (objects, bytes);
            }
            if let Ok(meta) = blob.metadata() {
                if meta.is_file() {
                    objects += 1;
                    bytes += meta.len();
                }
            }
        }
    }
    (objects, bytes)
}

/// Binds the metrics endpoint (before the daemon reports itself ready).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics_listen {addr}"))
}

/// Serves `GET /metrics` on `listener` for as long as the daemon runs.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the cap: closed at once (dropped), without reading a byte.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request, metrics).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(8192)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
            drop(permit);
        });
    }
}

async fn answer<B>(request: Request<B>, metrics: Arc<Metrics>) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, content_type: &str, body: Bytes| {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    let text = "text/plain; charset=utf-8";
    if request.uri().path() != "/metrics" {
        return respond(
            StatusCode::NOT_FOUND,
            text,
            Bytes::from_static(b"not found\n"),
        );
    }
    if request.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            Bytes::from_static(b"only GET\n"),
        );
    }
    // Prometheus asks for OpenMetrics; other scrapers (and promtool) read the older text.
    let openmetrics = request
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.contains("application/openmetrics-text"))
        });
    match tokio::task::spawn_blocking(move || metrics.render()).await {
        Ok(body) if openmetrics => respond(StatusCode::OK, OPENMETRICS, Bytes::from(body)),
        Ok(body) => respond(
            StatusCode::OK,
            PROMETHEUS_TEXT,
            Bytes::from(prometheus_text(&body)),
        ),
        Err(_) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            text,
            Bytes::from_static(b"error\n"),
        ),
    }
}

/// OpenMetrics text (as encoded above) in the Prometheus text format 0.0.4: counters'
/// HELP and TYPE name the `_total` series, and UNIT and EOF lines go.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(renamed) => out.push_str(&renamed),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn job_gauges_follow_state_changes_from_the_database_counts() {
        let metrics = Metrics::new(&[("uid:1000".into(), JobState::Queued, 2)]);
        metrics.observe(&EngineEvent::JobStateChanged {
            job_id: "a".into(),
            owner: "uid:1000".into(),
            tenant: None,
            from: Some(JobState::Queued),
            to: JobState::Running,
            reason: String::new(),
        });
        metrics.observe(&EngineEvent::SeccompDenials {
            job_id: "a".into(),
            count: 3,
        });
        metrics.set_tls_handshake_failures_source(Box::new(|| 7));
        let text = metrics.render();
        assert!(
            text.contains("kiln_jobs{state=\"queued\",tenant=\"uid:1000\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kiln_jobs{state=\"running\",tenant=\"uid:1000\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kiln_queue_depth{tenant=\"uid:1000\"} 1"),
            "{text}"
        );
        assert!(text.contains("kiln_seccomp_denials_total 3"), "{text}");
        assert!(
            text.contains("kiln_tls_handshake_failures_total 7"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        let classic = prometheus_text(&text);
        assert!(
            classic.contains("# TYPE kiln_seccomp_denials_total counter\n"),
            "{classic}"
        );
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"));
    }

    #[test]
    fn a_tenants_jobs_counted_at_start_and_changed_later_share_one_label() {
        // After a restart, the database names the owner key; the engine's events the tenant.
        let metrics = Metrics::new(&[("tenant:ci".into(), JobState::Queued, 2)]);
        metrics.observe(&EngineEvent::JobStateChanged {
            job_id: "a".into(),
            owner: "tenant:ci".into(),
            tenant: Some("ci".into()),
            from: Some(JobState::Queued),
            to: JobState::Running,
            reason: String::new(),
        });
        let text = metrics.render();
        assert!(
            text.contains("kiln_jobs{state=\"queued\",tenant=\"ci\"} 1"),
            "{text}"
        );
        assert!(text.contains("kiln_queue_depth{tenant=\"ci\"} 1"), "{text}");
        assert!(!text.contains("tenant:ci"), "{text}");
    }
}
