//! Prometheus metrics and the admin listener (`/metrics`, `/healthz`,
//! `/readyz`). Label values come only from configuration (tenant ids, model
//! names, deployment ids) or small fixed sets; anything else is `other`, so a
//! client cannot grow the series count.

use crate::gateway::RequestCtx;
use crate::state::State;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use std::sync::Arc;

pub const OTHER: &str = "other";
const PRIORITIES: [&str; 5] = ["1", "2", "3", "4", "5"];

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    tokens: IntCounterVec,
    token_usage: HistogramVec,
    usage_unknown: IntCounterVec,
    cost: CounterVec,
    duration: HistogramVec,
    ttft: HistogramVec,
    attempts: IntCounterVec,
    fallbacks: IntCounterVec,
    pub quota: QuotaMetrics,
    /// Probes, breakers and the health gauges (set when scraped).
    pub health: crate::routing::probe::HealthMetrics,
}

/// The quota ledger, queues and rebalancing as seen from outside.
pub struct QuotaMetrics {
    refusals: IntCounterVec,
    queue_wait: HistogramVec,
    estimated: IntCounterVec,
    pub loan_rpm: prometheus::GaugeVec,
    pub loan_tpm: prometheus::GaugeVec,
    pub loan_events: IntCounterVec,
    pub pool_inflight: prometheus::IntGaugeVec,
    pub pool_limit: prometheus::GaugeVec,
    pub pool_waiting: prometheus::IntGaugeVec,
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<prometheus::GaugeVec> {
    let g = prometheus::GaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn int_gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<prometheus::IntGaugeVec> {
    let g = prometheus::IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl QuotaMetrics {
    fn new(r: &Registry) -> prometheus::Result<QuotaMetrics> {
        Ok(QuotaMetrics {
            refusals: counter(
                r,
                "collie_quota_refusals_total",
                "Requests refused by the tenant's quota, by window (queue = no pool slot in time)",
                &["tenant", "window"],
            )?,
            queue_wait: histogram(
                r,
                "collie_queue_wait_seconds",
                "Time spent waiting for a saturated pool, by tenant priority",
                &["priority"],
                latency_buckets(),
            )?,
            estimated: counter(
                r,
                "collie_usage_estimated_total",
                "Requests settled on Collie's estimate because the upstream reported no usage",
                &["tenant"],
            )?,
            loan_rpm: gauge(
                r,
                "collie_quota_loan_rpm",
                "Requests per minute borrowed (positive) or lent (negative) by rebalancing",
                &["tenant"],
            )?,
            loan_tpm: gauge(
                r,
                "collie_quota_loan_tpm",
                "Tokens per minute borrowed (positive) or lent (negative) by rebalancing",
                &["tenant"],
            )?,
            loan_events: counter(
                r,
                "collie_quota_loan_events_total",
                "Rebalancing loans started (borrow, lend) and ended (reclaim)",
                &["tenant", "event"],
            )?,
            pool_inflight: int_gauge(
                r,
                "collie_pool_inflight",
                "Requests in flight per pool",
                &["pool"],
            )?,
            pool_limit: gauge(
                r,
                "collie_pool_concurrency_limit",
                "Concurrency budget per pool (absent: unlimited)",
                &["pool"],
            )?,
            pool_waiting: int_gauge(
                r,
                "collie_pool_waiting",
                "Requests queued for a pool slot",
                &["pool"],
            )?,
        })
    }
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Seconds; from 5 ms to 5 minutes, LLM calls span that whole range.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
        300.0,
    ]
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let r = &registry;
        let cost = CounterVec::new(
            Opts::new(
                "collie_cost_usd_total",
                "Cost of served requests in USD, from the pricing table",
            ),
            &["tenant", "model"],
        )?;
        registry.register(Box::new(cost.clone()))?;
        Ok(Metrics {
            requests: counter(
                r,
                "collie_requests_total",
                "Requests by tenant, requested model, endpoint and status class",
                &["tenant", "model", "endpoint", "status_class"],
            )?,
            tokens: counter(
                r,
                "collie_tokens_total",
                "Tokens reported by upstreams",
                &["tenant", "model", "type"],
            )?,
            token_usage: histogram(
                r,
                "gen_ai_client_token_usage",
                "Tokens per request (OpenTelemetry GenAI)",
                &["gen_ai_request_model", "gen_ai_token_type"],
                vec![
                    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
                    1048576.0,
                ],
            )?,
            usage_unknown: counter(
                r,
                "collie_usage_unknown_total",
                "Served requests whose upstream reported no usage",
                &["model"],
            )?,
            cost,
            duration: histogram(
                r,
                "gen_ai_server_request_duration_seconds",
                "Time from request start to the end of the response",
                &["gen_ai_request_model"],
                latency_buckets(),
            )?,
            ttft: histogram(
                r,
                "gen_ai_server_time_to_first_token_seconds",
                "Time from request start to the first response byte sent to the client",
                &["gen_ai_request_model"],
                latency_buckets(),
            )?,
            attempts: counter(
                r,
                "collie_upstream_attempts_total",
                "Upstream attempts by deployment and outcome",
                &["deployment", "outcome"],
            )?,
            fallbacks: counter(
                r,
                "collie_fallbacks_total",
                "Requests that fell back to a later pool of their chain, by upstream model and whether one served them",
                &["from", "to", "outcome"],
            )?,
            quota: QuotaMetrics::new(r)?,
            health: crate::routing::probe::HealthMetrics::new(r)?,
            registry,
        })
    }

    /// Account one finished request. Runs in the logging phase for every request.
    pub fn record(&self, ctx: &RequestCtx) {
        let snap = &ctx.snapshot;
        let tenant = ctx
            .tenant
            .and_then(|t| snap.config.tenants.get(t))
            .map_or(OTHER, |t| t.id.as_str());
        let model = ctx
            .requested_model
            .as_deref()
            .filter(|m| snap.model(m).is_some())
            .unwrap_or(OTHER);
        let class = match ctx.status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        self.requests
            .with_label_values(&[tenant, model, ctx.endpoint.label(), class])
            .inc();
        if let Some(window) = &ctx.refused_by {
            // Per-model windows carry the model's name; fold it away to keep
            // the label set to the fixed window names.
            let w = crate::quota::WINDOWS
                .iter()
                .find(|w| window.ends_with(*w))
                .copied()
                .unwrap_or(OTHER);
            self.quota.refusals.with_label_values(&[tenant, w]).inc();
        } else if ctx.error == Some("queue_timeout") {
            self.quota
                .refusals
                .with_label_values(&[tenant, "queue"])
                .inc();
        }
        if let Some(waited) = ctx.queued {
            self.quota
                .queue_wait
                .with_label_values(&[PRIORITIES[usize::from(ctx.priority.clamp(1, 5) - 1)]])
                .observe(waited.as_secs_f64());
        }
        if ctx.usage_estimated {
            self.quota.estimated.with_label_values(&[tenant]).inc();
        }
        for a in &ctx.attempts {
            let deployment = snap
                .router
                .upstreams
                .get(a.upstream)
                .map_or(OTHER, |u| u.id.as_str());
            let outcome = match &a.outcome {
                Ok(_) => "served",
                Err(f) => f.label(),
            };
            self.attempts
                .with_label_values(&[deployment, outcome])
                .inc();
        }
        if let Some((from, to)) = ctx.fallback {
            // Upstream model names: from the config.
            let model = |i: usize| {
                snap.router
                    .upstreams
                    .get(i)
                    .map_or(OTHER, |u| u.model.as_str())
            };
            let outcome = if ctx.served.is_some() {
                "served"
            } else {
                "failed"
            };
            self.fallbacks
                .with_label_values(&[model(from), model(to), outcome])
                .inc();
        }
        let Some(served) = ctx.served.and_then(|i| snap.router.upstreams.get(i)) else {
            return;
        };
        let elapsed = ctx.started.elapsed().as_secs_f64();
        self.duration.with_label_values(&[model]).observe(elapsed);
        if let Some(first) = ctx.first_byte {
            self.ttft
                .with_label_values(&[model])
                .observe(first.duration_since(ctx.started).as_secs_f64());
        }
        match ctx.usage {
            Some(u) => {
                for (kind, n) in [("input", u.prompt_tokens), ("output", u.completion_tokens)] {
                    if let Some(n) = n {
                        self.tokens
                            .with_label_values(&[tenant, model, kind])
                            .inc_by(n);
                        self.token_usage
                            .with_label_values(&[model, kind])
                            .observe(n as f64);
                    }
                }
                if let Some(nano) = u.cost_nano_usd(served.price) {
                    self.cost
                        .with_label_values(&[tenant, model])
                        .inc_by(nano as f64 / 1e9);
                }
            }
            None if !(200..300).contains(&ctx.status) => {}
            None => self.usage_unknown.with_label_values(&[model]).inc(),
        }
    }

    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 << 10);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            log::warn!("cannot encode metrics: {e}");
        }
        buf
    }
}

impl AdminApp {
    /// Every tenant's quota (loans included) and every pool's queue.
    fn quota_status(&self) -> Vec<u8> {
        let snap = self.state.load();
        let tenants: Vec<_> = snap
            .ledgers
            .iter()
            .map(|l| l.report(&snap.calendar))
            .collect();
        let pools: Vec<_> = snap
            .router
            .pools
            .iter()
            .map(|p| {
                let load = p.gate.load_now();
                serde_json::json!({"pool": p.id, "inflight": load.inflight, "limit": load.limit, "waiting": load.waiting})
            })
            .collect();
        serde_json::to_vec_pretty(&serde_json::json!({"tenants": tenants, "pools": pools}))
            .unwrap_or_default()
    }
}

/// The admin listener's routes.
pub struct AdminApp {
    pub metrics: Arc<Metrics>,
    pub state: Arc<State>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let (status, content_type, body) = match path.as_str() {
            "/metrics" => {
                // Health gauges are read from the deployments now, for the
                // deployments of the config now.
                self.state
                    .health
                    .publish(&self.state.load().router.upstreams);
                (200, "text/plain; version=0.0.4", self.metrics.render())
            }
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            "/quota" => (200, "application/json", self.quota_status()),
            "/status" => (
                200,
                "application/json",
                crate::status::json(&self.state.load()),
            ),
            "/" => (
                200,
                "text/html; charset=utf-8",
                crate::status::PAGE.as_bytes().to_vec(),
            ),
            "/readyz" => {
                // Ready once a config with at least one routable model is loaded.
                let snap = self.state.load();
                if snap.config.models.is_empty() {
                    (503, "text/plain", b"no models configured\n".to_vec())
                } else {
                    (200, "text/plain", b"ready\n".to_vec())
                }
            }
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        let length = body.len();
        let mut resp = Response::new(body);
        resp.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(length),
        );
        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
        if let Ok(v) = http::HeaderValue::from_str(content_type) {
            resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        resp
    }
}
