//! The live status view on the admin listener: `GET /status` (JSON: every
//! model, pool, deployment and tenant with its state, and the latest
//! alerts), the same pushed by `GET /status/events`, and `GET /` (a small
//! page, no external assets, that shows it live).

use crate::alerts::{Alert, Alerts};
use crate::config::Model;
use crate::quota::QuotaReport;
use crate::routing::health::{Availability, HealthState};
use crate::routing::{Pick, now_ms};
use crate::state::Snapshot;
use serde::Serialize;

pub(crate) const PAGE: &str = include_str!("status.html");

#[derive(Serialize)]
struct Status<'a> {
    /// When the view was taken (epoch ms), for "how long ago" on the page.
    generated_ms: i64,
    models: Vec<ModelStatus<'a>>,
    pools: Vec<PoolStatus<'a>>,
    deployments: Vec<DeploymentStatus<'a>>,
    /// Rate capacity moved by rebalancing right now: borrowed (positive) or
    /// lent (negative), per minute. Tenants without a loan are left out.
    loans: Vec<LoanStatus<'a>>,
    /// Every tenant's quota: each window's limit, use and reservations.
    quota: Vec<QuotaReport>,
    /// The latest alerts, newest first (each rule and scope once).
    alerts: Vec<Alert>,
}

#[derive(Serialize)]
struct LoanStatus<'a> {
    tenant: &'a str,
    priority: u8,
    rpm: f64,
    tpm: f64,
}

#[derive(Serialize)]
struct ModelStatus<'a> {
    name: &'a str,
    chain: Vec<&'a str>,
    /// The upstream model a request would get now, by the routing rules
    /// themselves (see [`recommended`]).
    recommended: Option<&'a str>,
    routes: Vec<RouteStatus<'a>>,
    /// Every deployment of its chain is unhealthy: its requests get 503.
    panic: bool,
}

#[derive(Serialize)]
struct RouteStatus<'a> {
    hint: Option<&'a str>,
    priorities: Option<&'a [u8]>,
    chain: Vec<&'a str>,
    recommended: Option<&'a str>,
}

#[derive(Serialize)]
struct PoolStatus<'a> {
    id: &'a str,
    policy: &'static str,
    retries: u32,
    members: Vec<&'a str>,
    inflight: u32,
    concurrency_limit: Option<f64>,
    waiting: usize,
}

#[derive(Serialize)]
struct DeploymentStatus<'a> {
    id: &'a str,
    model: &'a str,
    state: &'static str,
    breaker: &'static str,
    breaker_open_for_ms: Option<u128>,
    ttfb_ewma_ms: Option<f64>,
    ttfb_p95_ms: Option<f64>,
    /// Whole-request latency of served requests, smoothed.
    latency_ewma_ms: Option<f64>,
    /// The failed share of the live outcomes in the health window, with
    /// the counts it is over: a ratio of one failure in one request is
    /// 100 %, and `error_samples` says so.
    error_ratio: Option<f64>,
    errors: u32,
    error_samples: u32,
    /// Outcomes the breaker needs before it judges by the ratio.
    min_samples: u32,
    served: u64,
    /// The probe kind (`off`: only live traffic judges it).
    probe: &'static str,
    last_probe: Option<ProbeStatus>,
    /// Consecutive failed probes.
    probe_failures: u32,
    /// Share of probe and live outcomes that succeeded, over the last hour
    /// and day, with their counts.
    availability_1h: AvailabilityStatus,
    availability_24h: AvailabilityStatus,
}

#[derive(Serialize)]
struct AvailabilityStatus {
    ratio: Option<f64>,
    succeeded: u64,
    failed: u64,
}

impl From<Availability> for AvailabilityStatus {
    fn from(a: Availability) -> Self {
        AvailabilityStatus {
            ratio: a.ratio(),
            succeeded: a.succeeded,
            failed: a.failed,
        }
    }
}

#[derive(Serialize)]
struct ProbeStatus {
    ok: bool,
    latency_ms: f64,
    detail: String,
    /// When it ran (epoch ms).
    at_ms: Option<i64>,
}

/// The model a chain would use now: what routing's own look-ahead offers in
/// the first pool that offers something — the pool's policy, health tiers,
/// `Retry-After` blocks and provider limits all applied (for a one-token
/// request). A half-open breaker's trial is not a recommendation.
fn recommended<'a>(snap: &'a Snapshot, chain: &[crate::config::PoolIx]) -> Option<&'a str> {
    let now = now_ms();
    chain
        .iter()
        .filter_map(|&p| snap.router.pool(p))
        .find_map(
            |pool| match pool.peek(&snap.router.deployments, &[], now, 1) {
                Pick::Deployment {
                    index,
                    trial: false,
                } => snap.router.deployment(index).map(|u| u.model.as_str()),
                _ => None,
            },
        )
}

fn chain_names<'a>(snap: &'a Snapshot, chain: &[crate::config::PoolIx]) -> Vec<&'a str> {
    chain
        .iter()
        .filter_map(|&p| snap.config.pool(p))
        .map(|p| p.id.as_str())
        .collect()
}

/// Every deployment of the chain is unhealthy (panic mode).
fn in_panic(snap: &Snapshot, chain: &[crate::config::PoolIx]) -> bool {
    let mut members = chain
        .iter()
        .filter_map(|&p| snap.router.pool(p))
        .flat_map(|p| p.member_ixs())
        .filter_map(|d| snap.router.deployment(d))
        .peekable();
    members.peek().is_some() && members.all(|d| d.health.state() == HealthState::Unhealthy)
}

fn model_status<'a>(snap: &'a Snapshot, m: &'a Model) -> ModelStatus<'a> {
    ModelStatus {
        name: &m.name,
        panic: in_panic(snap, &m.chain),
        chain: chain_names(snap, &m.chain),
        recommended: recommended(snap, &m.chain),
        routes: m
            .routes
            .iter()
            .map(|r| RouteStatus {
                hint: r.hint.as_deref(),
                priorities: r.priorities.as_deref(),
                chain: chain_names(snap, &r.chain),
                recommended: recommended(snap, &r.chain),
            })
            .collect(),
    }
}

/// `/status`: the view, indented.
pub(crate) fn json(snap: &Snapshot, alerts: &Alerts) -> Vec<u8> {
    serde_json::to_vec_pretty(&view(snap, alerts)).unwrap_or_default()
}

/// The view on one line (an event's `data:`).
pub(crate) fn compact(snap: &Snapshot, alerts: &Alerts) -> Vec<u8> {
    serde_json::to_vec(&view(snap, alerts)).unwrap_or_default()
}

fn epoch_ms(t: std::time::SystemTime) -> Option<i64> {
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}

fn view<'a>(snap: &'a Snapshot, alerts: &Alerts) -> Status<'a> {
    Status {
        generated_ms: crate::alerts::now_ms(),
        models: snap
            .config
            .models
            .iter()
            .map(|m| model_status(snap, m))
            .collect(),
        pools: snap
            .router
            .pools
            .iter()
            .map(|p| {
                let load = p.gate.load_now();
                PoolStatus {
                    id: &p.id,
                    policy: p.policy.as_str(),
                    retries: p.retries,
                    members: p
                        .member_ixs()
                        .filter_map(|d| snap.router.deployment(d))
                        .map(|u| u.id.as_str())
                        .collect(),
                    inflight: load.inflight,
                    concurrency_limit: load.limit,
                    waiting: load.waiting,
                }
            })
            .collect(),
        deployments: snap
            .router
            .deployments
            .iter()
            .map(|u| {
                let h = u.health.snapshot();
                let settings = u.health.settings();
                let at_ms = h.last_probe_at.and_then(epoch_ms);
                DeploymentStatus {
                    id: &u.id,
                    model: &u.model,
                    state: h.state.as_str(),
                    breaker: h.breaker.as_str(),
                    breaker_open_for_ms: h.open_for.map(|d| d.as_millis()),
                    ttfb_ewma_ms: h.ttfb_ewma_ms,
                    ttfb_p95_ms: h.ttfb_p95_ms,
                    latency_ewma_ms: h.latency_ewma_ms,
                    error_ratio: h.error_ratio,
                    errors: h.errors,
                    error_samples: h.error_samples,
                    min_samples: settings.min_samples,
                    served: h.served,
                    probe: settings.probe.as_str(),
                    last_probe: h.last_probe.map(|p| ProbeStatus {
                        ok: p.ok,
                        latency_ms: p.latency.as_secs_f64() * 1e3,
                        detail: p.detail,
                        at_ms,
                    }),
                    probe_failures: h.probe_failures,
                    availability_1h: h.availability_1h.into(),
                    availability_24h: h.availability_24h.into(),
                }
            })
            .collect(),
        loans: snap
            .quota
            .ledgers()
            .iter()
            .filter_map(|l| {
                let loan = l.loan();
                (loan.rpm != 0.0 || loan.tpm != 0.0).then(|| LoanStatus {
                    tenant: &l.id,
                    priority: l.priority(),
                    rpm: loan.rpm,
                    tpm: loan.tpm,
                })
            })
            .collect(),
        quota: snap
            .quota
            .ledgers()
            .iter()
            .map(|l| l.report(snap.quota.calendar()))
            .collect(),
        alerts: alerts.recent(),
    }
}
