//! Prometheus metrics (served by the admin listener, [`crate::admin`]).
//! Label values come only from configuration (tenant ids, model
//! names, deployment ids) or small fixed sets; anything else is `other`, so a
//! client cannot grow the series count.

use crate::outcome::{ErrorCode, Finished};
use crate::state::Snapshot;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use std::sync::Arc;

mod tenants;

pub(crate) const OTHER: &str = "other";
const PRIORITIES: [&str; 5] = ["1", "2", "3", "4", "5"];

pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    /// One scrape at a time: the quota window gauges are reset and set
    /// again for each.
    scrape: std::sync::Mutex<()>,
    /// Requests, tokens, cost, settlements and estimated usage per tenant.
    tenants: Arc<tenants::TenantCounters>,
    token_usage: HistogramVec,
    usage_unknown: IntCounterVec,
    duration: HistogramVec,
    ttft: HistogramVec,
    attempts: IntCounterVec,
    fallbacks: IntCounterVec,
    /// Connections refused before their request head was read, by reason.
    pub(crate) connection_refusals: IntCounterVec,
    /// Memory held by request bodies in flight (set when scraped).
    inflight_body_bytes: prometheus::IntGauge,
    /// Requests held while every deployment of their model is down.
    pub(crate) held_requests: prometheus::IntGauge,
    pub(crate) quota: QuotaMetrics,
    /// Probes, breakers and the health gauges (set when scraped).
    pub(crate) health: crate::routing::health::HealthMetrics,
    /// Config reloads (SIGHUP or a watched file).
    pub(crate) config: ConfigMetrics,
}

/// Whether config reloads take: a reload that fails keeps the running
/// config, so without these a bad ConfigMap or edit goes unnoticed.
pub(crate) struct ConfigMetrics {
    reloads: IntCounterVec,
    last_success: prometheus::Gauge,
    last_successful: prometheus::IntGauge,
}

impl ConfigMetrics {
    fn new(r: &Registry) -> prometheus::Result<ConfigMetrics> {
        let reloads = counter(
            r,
            "collie_config_reloads_total",
            "Config reloads (SIGHUP or a changed file) by result: success (swapped in) or failure (invalid or unusable; the running config stays)",
            &["result"],
        )?;
        // Both series exist from the start, so a first failure is an
        // increase a rule can see.
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        let last_success = prometheus::Gauge::new(
            "collie_config_last_reload_success_timestamp_seconds",
            "When the running config was loaded (at start or by the last successful reload), Unix time",
        )?;
        r.register(Box::new(last_success.clone()))?;
        let last_successful = prometheus::IntGauge::new(
            "collie_config_last_reload_successful",
            "1 if the last reload attempt (or the start) loaded its config, 0 if it failed and an older config runs",
        )?;
        r.register(Box::new(last_successful.clone()))?;
        let m = ConfigMetrics {
            reloads,
            last_success,
            last_successful,
        };
        m.loaded_now();
        Ok(m)
    }

    fn loaded_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_success.set(now);
        self.last_successful.set(1);
    }

    /// A reload swapped in a new config.
    pub(crate) fn reloaded(&self) {
        self.reloads.with_label_values(&["success"]).inc();
        self.loaded_now();
    }

    /// A reload was refused; the running config stays.
    pub(crate) fn reload_failed(&self) {
        self.reloads.with_label_values(&["failure"]).inc();
        self.last_successful.set(0);
    }
}

/// The quota ledger, queues and rebalancing as seen from outside.
pub(crate) struct QuotaMetrics {
    refusals: IntCounterVec,
    /// Per tenant (and tenant × model) window: limit, used, reserved,
    /// remaining. Set from the ledgers when `/metrics` is scraped.
    window_limit: prometheus::GaugeVec,
    window_used: prometheus::GaugeVec,
    window_reserved: prometheus::GaugeVec,
    window_remaining: prometheus::GaugeVec,
    queue_wait: HistogramVec,
    pub(crate) loan_rpm: prometheus::GaugeVec,
    pub(crate) loan_tpm: prometheus::GaugeVec,
    pub(crate) loan_events: IntCounterVec,
    pub(crate) pool_inflight: prometheus::IntGaugeVec,
    pub(crate) pool_limit: prometheus::GaugeVec,
    pub(crate) pool_waiting: prometheus::IntGaugeVec,
}

/// `model` is empty for a tenant-wide window; `window` is one of
/// [`crate::quota::WINDOWS`].
const WINDOW_LABELS: &[&str] = &["tenant", "model", "window"];

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
    /// A pool's concurrency as the rebalancer saw it.
    pub(crate) fn publish_pool(&self, pool: &str, load: &crate::routing::gate::GateLoad) {
        self.pool_inflight
            .with_label_values(&[pool])
            .set(i64::from(load.inflight));
        self.pool_waiting
            .with_label_values(&[pool])
            .set(i64::try_from(load.waiting).unwrap_or(i64::MAX));
        if let Some(l) = load.limit {
            self.pool_limit.with_label_values(&[pool]).set(l);
        }
    }

    /// A loan that started, changed or ended.
    pub(crate) fn publish_loan(&self, c: &crate::quota::rebalance::LoanChange) {
        self.loan_events
            .with_label_values(&[&c.tenant, c.event()])
            .inc();
        self.loan_rpm
            .with_label_values(&[&c.tenant])
            .set(c.after.rpm);
        self.loan_tpm
            .with_label_values(&[&c.tenant])
            .set(c.after.tpm);
    }

    /// Set the window gauges from every tenant's ledger. Runs when metrics
    /// are scraped, not per request. Tenants and models come from the
    /// config; those removed by a reload disappear.
    pub(crate) fn refresh_windows(&self, snap: &Snapshot) {
        let gauges = [
            &self.window_limit,
            &self.window_used,
            &self.window_reserved,
            &self.window_remaining,
        ];
        for g in gauges {
            g.reset();
        }
        for ledger in snap.quota.ledgers() {
            let report = ledger.report(snap.quota.calendar());
            for scope in &report.scopes {
                let model = scope.model.as_deref().unwrap_or("");
                for w in &scope.windows {
                    let labels = [report.tenant.as_str(), model, w.window];
                    for (g, v) in gauges
                        .iter()
                        .zip([w.limit, w.used, w.reserved, w.remaining])
                    {
                        g.with_label_values(&labels).set(v);
                    }
                }
            }
        }
    }

    fn new(r: &Registry) -> prometheus::Result<QuotaMetrics> {
        Ok(QuotaMetrics {
            refusals: counter(
                r,
                "collie_quota_refusals_total",
                "Requests refused by the tenant's quota, by window (queue = no pool slot in time)",
                &["tenant", "window"],
            )?,
            window_limit: gauge(
                r,
                "collie_quota_limit",
                "Configured limit of each quota window (per-minute windows: the rate); USD windows in USD",
                WINDOW_LABELS,
            )?,
            window_used: gauge(
                r,
                "collie_quota_used",
                "Settled use of each quota window (per-minute windows: drawn from the bucket, above the burst while in debt)",
                WINDOW_LABELS,
            )?,
            window_reserved: gauge(
                r,
                "collie_quota_reserved",
                "Reservations in flight in each day and month window",
                WINDOW_LABELS,
            )?,
            window_remaining: gauge(
                r,
                "collie_quota_remaining",
                "What each quota window still admits: limit - used - reserved (per-minute windows: the bucket's level, never below 0)",
                WINDOW_LABELS,
            )?,
            queue_wait: histogram(
                r,
                "collie_queue_wait_seconds",
                "Time spent waiting for a saturated pool, by tenant priority",
                &["priority"],
                latency_buckets(),
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
    pub(crate) fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let r = &registry;
        let tenants = Arc::new(tenants::TenantCounters::new()?);
        registry.register(Box::new(tenants::Registered(Arc::clone(&tenants))))?;
        Ok(Metrics {
            tenants,
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
                "Served requests whose upstream reported no usage (their tokens count as usage=estimated)",
                &["model"],
            )?,
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
                "Deployment attempts by deployment and outcome",
                &["deployment", "outcome"],
            )?,
            fallbacks: counter(
                r,
                "collie_fallbacks_total",
                "Requests that fell back to a later pool of their chain, by upstream model and whether one served them",
                &["from", "to", "outcome"],
            )?,
            connection_refusals: counter(
                r,
                "collie_connection_refusals_total",
                "Client connections refused before their request head was read: head_timeout (408), header_too_large (431)",
                &["reason"],
            )?,
            inflight_body_bytes: {
                let g = prometheus::IntGauge::new(
                    "collie_inflight_body_bytes",
                    "Memory held by request bodies in flight (limit: max_inflight_body_bytes)",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            held_requests: {
                let g = prometheus::IntGauge::new(
                    "collie_held_requests",
                    "Requests held while every deployment of their model is down (hold_when_down; limit: max_held_requests)",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            quota: QuotaMetrics::new(r)?,
            health: crate::routing::health::HealthMetrics::new(r)?,
            config: ConfigMetrics::new(r)?,
            registry,
            scrape: std::sync::Mutex::new(()),
        })
    }

    /// Account one finished request. Runs in the logging phase for every request.
    pub(crate) fn record(&self, ctx: &Finished) {
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
        let cells = self.tenants.tenant(tenant);
        let model_cells = cells.model(model);
        self.record_details(ctx, tenant, model, &cells, &model_cells);
        // Counted last: a request seen in `collie_requests_total` has every
        // other series of it recorded already (scrapers and tests rely on it).
        model_cells.request(ctx.endpoint, ctx.status);
    }

    fn record_details(
        &self,
        ctx: &Finished,
        tenant: &str,
        model: &str,
        cells: &tenants::TenantCells,
        model_cells: &tenants::ModelCells,
    ) {
        let snap = &ctx.snapshot;
        if let Some(window) = ctx.refused_by() {
            // Per-model windows carry the model's name; fold it away to keep
            // the label set to the fixed window names.
            let w = crate::quota::WINDOWS
                .iter()
                .find(|w| window.ends_with(*w))
                .copied()
                .unwrap_or(OTHER);
            self.quota.refusals.with_label_values(&[tenant, w]).inc();
        } else if ctx.error_code() == Some(ErrorCode::QueueTimeout) {
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
            cells.estimated();
        }
        if let Some(s) = ctx.settlement {
            cells.settlement(s);
        }
        for a in &ctx.attempts {
            let deployment = snap
                .router
                .deployment(a.deployment)
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
            // Deployment model names: from the config.
            let model = |d| {
                snap.router
                    .deployment(d)
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
        let Some(served) = ctx.served.and_then(|i| snap.router.deployment(i)) else {
            return;
        };
        let elapsed = ctx.latency.as_secs_f64();
        self.duration.with_label_values(&[model]).observe(elapsed);
        if let Some(first) = ctx.ttft {
            self.ttft
                .with_label_values(&[model])
                .observe(first.as_secs_f64());
        }
        if let Some(u) = ctx.usage {
            for (i, (kind, n)) in [("input", u.prompt_tokens), ("output", u.completion_tokens)]
                .into_iter()
                .enumerate()
            {
                if let Some(n) = n {
                    model_cells.tokens(i, ctx.usage_estimated, n);
                    // The distribution is of what providers report.
                    if !ctx.usage_estimated {
                        self.token_usage
                            .with_label_values(&[model, kind])
                            .observe(n as f64);
                    }
                }
            }
            if let Some(nano) = u.cost_nano_usd(served.price) {
                model_cells.cost(ctx.usage_estimated, nano);
            }
        }
        if (200..300).contains(&ctx.status) && (ctx.usage_estimated || ctx.usage.is_none()) {
            self.usage_unknown.with_label_values(&[model]).inc();
        }
    }

    /// A scrape: the gauges read from the live state (quota windows,
    /// deployment health, body memory) are set for this config, then every
    /// series is rendered. One scrape at a time.
    pub(crate) fn scrape(
        &self,
        snap: &Snapshot,
        health: &crate::routing::health::HealthBook,
        body_bytes: usize,
    ) -> Vec<u8> {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.quota.refresh_windows(snap);
        // Health gauges are read from the deployments now, for the
        // deployments of the config now.
        health.publish(&snap.router.deployments);
        self.inflight_body_bytes
            .set(i64::try_from(body_bytes).unwrap_or(i64::MAX));
        self.render()
    }

    pub(crate) fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 << 10);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            log::warn!("cannot encode metrics: {e}");
        }
        buf
    }
}
