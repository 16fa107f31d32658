//! The live status view on the admin listener: `GET /status` (JSON: every
//! model, pool and deployment with its health) and `GET /` (a small page,
//! no external assets, that polls `/status` every 2 s).

use crate::config::Model;
use crate::routing::{Pick, now_ms};
use crate::state::Snapshot;
use serde::Serialize;

pub(crate) const PAGE: &str = include_str!("status.html");

#[derive(Serialize)]
struct Status<'a> {
    models: Vec<ModelStatus<'a>>,
    pools: Vec<PoolStatus<'a>>,
    deployments: Vec<DeploymentStatus<'a>>,
    /// Rate capacity moved by rebalancing right now: borrowed (positive) or
    /// lent (negative), per minute. Tenants without a loan are left out.
    loans: Vec<LoanStatus<'a>>,
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
    error_ratio: Option<f64>,
    served: u64,
    last_probe: Option<ProbeStatus>,
    /// Consecutive failed probes.
    probe_failures: u32,
}

#[derive(Serialize)]
struct ProbeStatus {
    ok: bool,
    latency_ms: f64,
    detail: String,
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

fn model_status<'a>(snap: &'a Snapshot, m: &'a Model) -> ModelStatus<'a> {
    ModelStatus {
        name: &m.name,
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

pub(crate) fn json(snap: &Snapshot) -> Vec<u8> {
    let status = Status {
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
                DeploymentStatus {
                    id: &u.id,
                    model: &u.model,
                    state: h.state.as_str(),
                    breaker: h.breaker.as_str(),
                    breaker_open_for_ms: h.open_for.map(|d| d.as_millis()),
                    ttfb_ewma_ms: h.ttfb_ewma_ms,
                    ttfb_p95_ms: h.ttfb_p95_ms,
                    error_ratio: h.error_ratio,
                    served: h.served,
                    last_probe: h.last_probe.map(|p| ProbeStatus {
                        ok: p.ok,
                        latency_ms: p.latency.as_secs_f64() * 1e3,
                        detail: p.detail,
                    }),
                    probe_failures: h.probe_failures,
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
    };
    serde_json::to_vec_pretty(&status).unwrap_or_default()
}
