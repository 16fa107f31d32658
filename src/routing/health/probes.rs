//! Active health probes, run through `pingora-load-balancing`'s shared
//! health registry: every pool's backends join one registry (a deployment in
//! two pools is probed once), a pass over the registry calls [`Prober`] for
//! each, and the prober starts a probe of a deployment when its own interval
//! is due. Each probe runs as a task of its own: one that waits out its
//! timeout never holds up another deployment's probe, and the pass itself
//! returns at once. Thresholds and breaker effects are per deployment, in
//! [`DeploymentHealth`].

use super::super::Deployment;
use super::{
    BreakerState, DeploymentHealth, HealthEvent, HealthSettings, HealthState, OnTransition,
    ProbeKind, ProbeResult, Transition,
};
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::TransportConnector;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::lb::health_check::HealthCheck;
use pingora::lb::{Backend, HealthRegistry};
use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A deployment's id in a backend's `ext`: stable across reloads, unlike its index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DeploymentKey(pub(crate) Arc<str>);

/// The health machinery's series, all labelled by deployment id.
#[derive(Clone)]
pub(crate) struct HealthMetrics {
    pub(crate) transitions: IntCounterVec,
    pub(crate) probe_seconds: HistogramVec,
    /// 0 unknown, 1 healthy, 2 degraded, 3 unhealthy.
    pub(crate) deployment_state: IntGaugeVec,
    /// 0 closed, 1 half-open, 2 open.
    pub(crate) breaker_state: IntGaugeVec,
}

impl HealthMetrics {
    pub(crate) fn new(r: &prometheus::Registry) -> prometheus::Result<HealthMetrics> {
        let transitions = IntCounterVec::new(
            prometheus::Opts::new(
                "collie_breaker_transitions_total",
                "Circuit breaker changes by deployment and new state",
            ),
            &["deployment", "to"],
        )?;
        let probe_seconds = HistogramVec::new(
            prometheus::HistogramOpts::new(
                "collie_probe_duration_seconds",
                "Active probe latency by deployment",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["deployment"],
        )?;
        let deployment_state = IntGaugeVec::new(
            prometheus::Opts::new(
                "collie_deployment_health",
                "Deployment health: 0 unknown, 1 healthy, 2 degraded, 3 unhealthy",
            ),
            &["deployment"],
        )?;
        let breaker_state = IntGaugeVec::new(
            prometheus::Opts::new(
                "collie_breaker_state",
                "Circuit breaker: 0 closed, 1 half-open, 2 open",
            ),
            &["deployment"],
        )?;
        r.register(Box::new(transitions.clone()))?;
        r.register(Box::new(probe_seconds.clone()))?;
        r.register(Box::new(deployment_state.clone()))?;
        r.register(Box::new(breaker_state.clone()))?;
        Ok(HealthMetrics {
            transitions,
            probe_seconds,
            deployment_state,
            breaker_state,
        })
    }

    /// Drop every series of a deployment that left the config.
    fn forget(&self, id: &str) {
        let _ = self.probe_seconds.remove_label_values(&[id]);
        let _ = self.deployment_state.remove_label_values(&[id]);
        let _ = self.breaker_state.remove_label_values(&[id]);
        for to in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            let _ = self.transitions.remove_label_values(&[id, to.as_str()]);
        }
    }
}

struct Entry {
    health: Arc<DeploymentHealth>,
    /// What to probe: the deployment as the current config has it.
    target: ArcSwapOption<Deployment>,
    /// A probe of this deployment is running (at most one at a time).
    probing: AtomicBool,
}

/// Clears [`Entry::probing`] however the probe task ends.
struct Probing(Arc<Entry>);

impl Drop for Probing {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}

/// Every deployment's health, kept across reloads by deployment id.
pub struct HealthBook {
    pub(crate) registry: Arc<HealthRegistry>,
    entries: Arc<Mutex<HashMap<Arc<str>, Arc<Entry>>>>,
    /// For `/models` and completion probes; keeps their connections alive.
    connector: Connector,
    /// For connect probes: always a new connection, never a pooled one.
    transport: TransportConnector,
    metrics: HealthMetrics,
    /// Wakes the probe loop: a probe finished or the deployments changed.
    pub(crate) wake: tokio::sync::Notify,
    /// Every breaker change, for the alert pipeline (taken once by it).
    events: tokio::sync::mpsc::Sender<HealthEvent>,
    events_rx: Mutex<Option<tokio::sync::mpsc::Receiver<HealthEvent>>>,
}

/// Breaker changes waiting for the alert pipeline, at most. They are rare
/// (a change per deployment per cooldown at worst); past this many unread
/// ones the newest are dropped and logged.
const EVENTS_QUEUED: usize = 1024;

/// Why a forced check did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckRefused {
    /// No such deployment, or one no pool uses (nothing to probe).
    Unknown,
    /// Its probes are off: a probe verdict would change how it is judged.
    ProbesOff,
    /// A probe of it is running now.
    Busy,
}

impl HealthBook {
    pub(crate) fn new(metrics: HealthMetrics, keepalive: usize) -> Arc<HealthBook> {
        let registry = Arc::new(HealthRegistry::with_equivalence(|b: &Backend| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            b.ext.get::<DeploymentKey>().hash(&mut h);
            h.finish()
        }));
        let (events, events_rx) = tokio::sync::mpsc::channel(EVENTS_QUEUED);
        let book = Arc::new(HealthBook {
            events,
            events_rx: Mutex::new(Some(events_rx)),
            registry: Arc::clone(&registry),
            entries: Arc::new(Mutex::new(HashMap::new())),
            connector: Connector::new(Some(pingora::connectors::ConnectorOptions::new(keepalive))),
            transport: TransportConnector::new(None),
            metrics,
            wake: tokio::sync::Notify::new(),
        });
        registry.set_health_check(Box::new(Prober {
            book: Arc::downgrade(&book),
        }));
        book
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The health of a deployment (created unknown on first sight), with
    /// settings from the current config.
    pub(crate) fn health(&self, id: &str, settings: HealthSettings) -> Arc<DeploymentHealth> {
        let mut map = self.entries();
        let e = map.entry(Arc::from(id)).or_insert_with(|| {
            Arc::new(Entry {
                health: Arc::new(DeploymentHealth::with_hook(
                    id,
                    settings,
                    self.on_transition(),
                )),
                target: ArcSwapOption::empty(),
                probing: AtomicBool::new(false),
            })
        });
        e.health.set_settings(settings);
        Arc::clone(&e.health)
    }

    /// Log and count a breaker change (the deployment reports each once).
    /// A request still running on an old config may report a change of a
    /// deployment that has left it: logged, but its series stay removed.
    fn on_transition(&self) -> OnTransition {
        let metrics = self.metrics.clone();
        let entries = Arc::downgrade(&self.entries);
        let events = self.events.clone();
        Arc::new(move |id: &str, t: Transition| {
            log::warn!(
                "deployment {id}: breaker {} → {}",
                t.from.as_str(),
                t.to.as_str()
            );
            let event = HealthEvent {
                deployment: id.to_string(),
                transition: t,
            };
            if events.try_send(event).is_err() {
                log::warn!("deployment {id}: breaker change not passed to the alerts (queue full)");
            }
            let current = entries
                .upgrade()
                .is_some_and(|m| m.lock().unwrap_or_else(|e| e.into_inner()).contains_key(id));
            if current {
                metrics
                    .transitions
                    .with_label_values(&[id, t.to.as_str()])
                    .inc();
                metrics
                    .breaker_state
                    .with_label_values(&[id])
                    .set(breaker_gauge(t.to));
            }
        })
    }

    /// Point the probes at the deployments of a new config that some pool
    /// uses (no traffic can reach the others, so they are not probed);
    /// forget the deployments that left, their metric series included.
    pub(crate) fn retarget(&self, deployments: &[Arc<Deployment>], pooled: &dyn Fn(usize) -> bool) {
        let mut gone = Vec::new();
        {
            let mut map = self.entries();
            map.retain(|id, _| {
                let keep = deployments.iter().any(|u| *u.id == **id);
                if !keep {
                    gone.push(Arc::clone(id));
                }
                keep
            });
            for u in deployments {
                if let Some(e) = map.get(u.id.as_str()) {
                    e.target.store(pooled(u.index.0).then(|| Arc::clone(u)));
                }
            }
        }
        for id in gone {
            self.metrics.forget(&id);
        }
        // New deployments are probed at once, not at the next wake-up.
        self.wake.notify_one();
    }

    /// Set the health and breaker gauges from the deployments' state now
    /// (called when metrics are scraped, so they are never stale).
    pub(crate) fn publish(&self, deployments: &[Arc<Deployment>]) {
        for u in deployments {
            let h = u.health.snapshot();
            let state = match h.state {
                HealthState::Unknown => 0,
                HealthState::Healthy => 1,
                HealthState::Degraded => 2,
                HealthState::Unhealthy => 3,
            };
            self.metrics
                .deployment_state
                .with_label_values(&[&u.id])
                .set(state);
            self.metrics
                .breaker_state
                .with_label_values(&[&u.id])
                .set(breaker_gauge(h.breaker));
        }
    }

    /// How long until the next probe of any deployment is due (`None`: no
    /// deployment is probed). Deployments being probed now are left out:
    /// the end of their probe wakes the loop.
    pub(crate) fn next_due(&self) -> Option<Duration> {
        self.entries()
            .values()
            .filter(|e| !e.probing.load(Ordering::Acquire) && e.target.load().is_some())
            .filter_map(|e| e.health.next_probe_in())
            .min()
    }

    /// The breaker changes, for the one consumer that turns them into
    /// alerts (`None` once taken).
    pub(crate) fn take_events(&self) -> Option<tokio::sync::mpsc::Receiver<HealthEvent>> {
        self.events_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// An operator's forced check: probe `id` now, whatever its schedule,
    /// unless a probe of it is already running (its result is near). The
    /// result counts like any probe's.
    pub(crate) async fn check_now(&self, id: &str) -> Result<ProbeResult, CheckRefused> {
        let entry = self
            .entries()
            .get(id)
            .cloned()
            .ok_or(CheckRefused::Unknown)?;
        if entry.target.load().is_none() {
            return Err(CheckRefused::Unknown);
        }
        if entry.health.settings().probe == ProbeKind::Off {
            return Err(CheckRefused::ProbesOff);
        }
        if entry.probing.swap(true, Ordering::AcqRel) {
            return Err(CheckRefused::Busy);
        }
        let guard = Probing(Arc::clone(&entry));
        let result = self.probe_now(id).await;
        drop(guard);
        self.wake.notify_one();
        result.ok_or(CheckRefused::Unknown)
    }

    /// Probe one deployment now, whatever its schedule (used by the probe
    /// tasks and by tests).
    pub async fn probe_now(&self, id: &str) -> Option<ProbeResult> {
        let entry = self.entries().get(id).cloned()?;
        let target = entry.target.load_full()?;
        let settings = entry.health.settings();
        let result = probe(&self.connector, &self.transport, &target, &settings).await;
        // A probe that outlived its deployment (dropped by a reload) must
        // not bring its series back.
        let current = self
            .entries()
            .get(id)
            .is_some_and(|e| Arc::ptr_eq(e, &entry));
        if current {
            self.metrics
                .probe_seconds
                .with_label_values(&[id])
                .observe(result.latency.as_secs_f64());
        }
        entry.health.record_probe(result.clone());
        Some(result)
    }

    /// Start a probe of `entry` in a task of its own unless one is running.
    fn start_probe(self: &Arc<Self>, id: &Arc<str>, entry: &Arc<Entry>) {
        if entry.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let guard = Probing(Arc::clone(entry));
        let book = Arc::clone(self);
        let id = Arc::clone(id);
        tokio::spawn(async move {
            // Bounded by the deployment's probe timeout.
            book.probe_now(&id).await;
            drop(guard);
            book.wake.notify_one();
        });
    }
}

fn breaker_gauge(b: BreakerState) -> i64 {
    match b {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

/// The `HealthCheck` the shared registry runs for every backend.
struct Prober {
    book: std::sync::Weak<HealthBook>,
}

#[async_trait]
impl HealthCheck for Prober {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        let fail = |m: &str| {
            Err(pingora::Error::explain(
                pingora::ErrorType::ConnectError,
                m.to_string(),
            ))
        };
        let (Some(book), Some(key)) = (self.book.upgrade(), target.ext.get::<DeploymentKey>())
        else {
            return Ok(());
        };
        let entry = book.entries().get(&key.0).cloned();
        let Some(entry) = entry else {
            return Ok(());
        };
        if entry.health.probe_due() {
            book.start_probe(&key.0, &entry);
        }
        // The verdict so far; the probe just started reports later.
        match entry.health.probe_up() {
            Some(false) => fail("probe failing"),
            _ => Ok(()),
        }
    }

    /// Per-deployment thresholds are applied by `DeploymentHealth`; the
    /// registry's own view follows each verdict at once.
    fn health_threshold(&self, _success: bool) -> usize {
        1
    }
}

/// One probe of one deployment.
async fn probe(
    connector: &Connector,
    transport: &TransportConnector,
    u: &Deployment,
    s: &HealthSettings,
) -> ProbeResult {
    let start = Instant::now();
    let outcome = tokio::time::timeout(s.timeout, async {
        match s.probe {
            ProbeKind::Connect => connect(transport, u).await.map(|()| 0),
            kind => exchange(connector, u, kind).await,
        }
    })
    .await;
    let latency = start.elapsed();
    let (ok, detail) = match outcome {
        Err(_) => (false, format!("no answer within {:?}", s.timeout)),
        Ok(Err(e)) => (false, e),
        Ok(Ok(status)) => match (s.probe, status) {
            (ProbeKind::Connect, _) => (true, "connected".into()),
            // A key the provider refuses is as bad as a dead endpoint.
            (_, 401 | 403) => (
                false,
                format!("HTTP {status}: the provider refuses the key"),
            ),
            (_, 500..) => (false, format!("HTTP {status}")),
            (ProbeKind::Completion, 200..=299) => (true, format!("HTTP {status}")),
            (ProbeKind::Completion, _) => (false, format!("HTTP {status}")),
            // Any other answer to the model list means the endpoint serves.
            _ => (true, format!("HTTP {status}")),
        },
    };
    ProbeResult {
        ok,
        latency,
        detail,
    }
}

/// A TCP connect, and the TLS handshake for `https`, on a new connection:
/// a pooled one would prove nothing about connecting now.
async fn connect(transport: &TransportConnector, u: &Deployment) -> Result<(), String> {
    u.resolved()?;
    let mut stream = transport
        .new_stream(&*u.peer())
        .await
        .map_err(|e| format!("connect failed: {}", e.etype().as_str()))?;
    use tokio::io::AsyncWriteExt as _;
    let _ = stream.shutdown().await;
    Ok(())
}

/// `GET …/models` (or the one-token completion) with the deployment's key.
/// A pooled connection may have been closed by the provider while idle; as
/// in the request path, such a failure is retried on another connection
/// instead of counting against the deployment. The model list is safe to
/// ask again whatever failed; the completion only when the request could
/// not be written, since the provider may otherwise have served (and
/// billed) it.
async fn exchange(connector: &Connector, u: &Deployment, kind: ProbeKind) -> Result<u16, String> {
    u.resolved()?;
    let mut stale_retries = 2;
    loop {
        let (mut http, reused) = connector
            .get_http_session(&*u.peer())
            .await
            .map_err(|e| format!("connect failed: {}", e.etype().as_str()))?;
        match ask(&mut http, u, kind).await {
            Ok(status) => {
                // Read the (small) answer so the connection can be reused.
                let mut read = 0usize;
                while let Ok(Some(chunk)) = http.read_response_body().await {
                    read += chunk.len();
                    if read > 1 << 20 {
                        http.shutdown().await;
                        return Ok(status);
                    }
                }
                connector
                    .release_http_session(http, &*u.peer(), Some(Duration::from_secs(30)))
                    .await;
                return Ok(status);
            }
            Err((e, written))
                if reused && stale_retries > 0 && (kind == ProbeKind::Models || !written) =>
            {
                log::debug!(
                    "probe of {}: pooled connection failed ({e}); retrying",
                    u.id
                );
                stale_retries -= 1;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Send the probe request and read the response head. The error says
/// whether the request was fully written.
async fn ask(
    http: &mut pingora::protocols::http::client::HttpSession,
    u: &Deployment,
    kind: ProbeKind,
) -> Result<u16, (String, bool)> {
    let completion = kind == ProbeKind::Completion;
    let path = format!(
        "{}{}",
        u.path_prefix,
        if completion {
            "/chat/completions"
        } else {
            "/models"
        }
    );
    let method = if completion { "POST" } else { "GET" };
    let body = completion.then(|| {
        Bytes::from(
            serde_json::json!({"model": u.model, "max_tokens": 1,
                "messages": [{"role": "user", "content": "ping"}]})
            .to_string(),
        )
    });
    let e = |e: Box<pingora::Error>| (format!("probe failed: {}", e.etype().as_str()), false);
    let mut req = RequestHeader::build(method, path.as_bytes(), Some(4)).map_err(e)?;
    req.insert_header(http::header::HOST, u.host.clone())
        .map_err(e)?;
    if let Some((name, value)) = &u.auth {
        req.insert_header(name.clone(), value.clone()).map_err(e)?;
    }
    if let Some(b) = &body {
        req.insert_header(http::header::CONTENT_TYPE, "application/json")
            .map_err(e)?;
        req.insert_header(http::header::CONTENT_LENGTH, b.len())
            .map_err(e)?;
    }
    http.write_request_header(Box::new(req)).await.map_err(e)?;
    if let Some(b) = body {
        http.write_request_body(b, true).await.map_err(e)?;
    }
    http.finish_request_body().await.map_err(e)?;
    let read = |e: Box<pingora::Error>| (format!("probe failed: {}", e.etype().as_str()), true);
    http.read_response_header().await.map_err(read)?;
    Ok(http.response_header().map_or(0, |h| h.status.as_u16()))
}
