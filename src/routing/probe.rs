//! Active health probes, run through `pingora-load-balancing`'s shared
//! health registry: every pool's backends join one registry (a deployment in
//! two pools is probed once), its `HealthCheckService` calls [`Prober`] for
//! each, and the prober probes a deployment when its own interval is due.
//! Thresholds and breaker effects are per deployment, in [`DeploymentHealth`].

use super::Upstream;
use super::health::{DeploymentHealth, HealthSettings, ProbeKind, ProbeResult, Transition};
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::lb::health_check::HealthCheck;
use pingora::lb::{Backend, HealthRegistry};
use prometheus::{HistogramVec, IntCounterVec};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A deployment's id in a backend's `ext`: stable across reloads, unlike its index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeploymentKey(pub Arc<str>);

/// Counters the health machinery updates.
#[derive(Clone)]
pub struct HealthMetrics {
    pub transitions: IntCounterVec,
    pub probe_seconds: HistogramVec,
}

impl HealthMetrics {
    pub fn new(r: &prometheus::Registry) -> prometheus::Result<HealthMetrics> {
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
        r.register(Box::new(transitions.clone()))?;
        r.register(Box::new(probe_seconds.clone()))?;
        Ok(HealthMetrics {
            transitions,
            probe_seconds,
        })
    }
}

struct Entry {
    health: Arc<DeploymentHealth>,
    /// What to probe: the deployment as the current config has it.
    target: ArcSwapOption<Upstream>,
}

/// Every deployment's health, kept across reloads by deployment id.
pub struct HealthBook {
    pub registry: Arc<HealthRegistry>,
    entries: Mutex<HashMap<Arc<str>, Arc<Entry>>>,
    connector: Connector,
    metrics: HealthMetrics,
}

impl HealthBook {
    pub fn new(metrics: HealthMetrics, keepalive: usize) -> Arc<HealthBook> {
        let registry = Arc::new(HealthRegistry::with_equivalence(|b: &Backend| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            b.ext.get::<DeploymentKey>().hash(&mut h);
            h.finish()
        }));
        let book = Arc::new(HealthBook {
            registry: Arc::clone(&registry),
            entries: Mutex::new(HashMap::new()),
            connector: Connector::new(Some(pingora::connectors::ConnectorOptions::new(keepalive))),
            metrics,
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
    pub fn health(&self, id: &str, settings: HealthSettings) -> Arc<DeploymentHealth> {
        let mut map = self.entries();
        let e = map.entry(Arc::from(id)).or_insert_with(|| {
            Arc::new(Entry {
                health: Arc::new(DeploymentHealth::new(id, settings)),
                target: ArcSwapOption::empty(),
            })
        });
        e.health.set_settings(settings);
        Arc::clone(&e.health)
    }

    /// Point the probes at the deployments of a new config; forget the rest.
    pub fn retarget(&self, upstreams: &[Arc<Upstream>]) {
        let mut map = self.entries();
        map.retain(|id, _| upstreams.iter().any(|u| *u.id == **id));
        for u in upstreams {
            if let Some(e) = map.get(u.id.as_str()) {
                e.target.store(Some(Arc::clone(u)));
            }
        }
    }

    /// Log and count a breaker change once.
    pub fn transition(&self, id: &str, t: Transition) {
        log::warn!(
            "deployment {id}: breaker {} → {}",
            t.from.as_str(),
            t.to.as_str()
        );
        self.metrics
            .transitions
            .with_label_values(&[id, t.to.as_str()])
            .inc();
    }

    /// Probe one deployment now, whatever its schedule (used by the service
    /// and by tests).
    pub async fn probe_now(&self, id: &str) -> Option<ProbeResult> {
        let entry = self.entries().get(id).cloned()?;
        let target = entry.target.load_full()?;
        let settings = entry.health.settings();
        let result = probe(&self.connector, &target, &settings).await;
        self.metrics
            .probe_seconds
            .with_label_values(&[id])
            .observe(result.latency.as_secs_f64());
        if let Some(t) = entry.health.record_probe(result.clone()) {
            self.transition(id, t);
        }
        Some(result)
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
            book.probe_now(&key.0).await;
        }
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
async fn probe(connector: &Connector, u: &Upstream, s: &HealthSettings) -> ProbeResult {
    let start = Instant::now();
    let outcome = tokio::time::timeout(s.timeout, exchange(connector, u, s.probe)).await;
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

async fn exchange(connector: &Connector, u: &Upstream, kind: ProbeKind) -> Result<u16, String> {
    let (mut http, _) = connector
        .get_http_session(&*u.peer())
        .await
        .map_err(|e| format!("connect failed: {}", e.etype().as_str()))?;
    if kind == ProbeKind::Connect {
        connector
            .release_http_session(http, &*u.peer(), Some(Duration::from_secs(30)))
            .await;
        return Ok(0);
    }
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
    let e = |e: Box<pingora::Error>| format!("probe failed: {}", e.etype().as_str());
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
    http.read_response_header().await.map_err(e)?;
    let status = http.response_header().map_or(0, |h| h.status.as_u16());
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
    Ok(status)
}
