//! The counters every served request adds to per tenant: requests, tokens,
//! cost, settlements and estimated usage. They are kept in one block of
//! atomic cells per tenant and model and rendered as Prometheus counters
//! when scraped.
//!
//! The `prometheus` crate's labelled vectors keep, in every series, a copy
//! of the metric's description (name, help text, label names) and of its
//! label pairs: about a kilobyte a series, five or more series per tenant.
//! Here a tenant that sent traffic costs one small map entry and one block
//! of cells per model it used, and counting a request hashes its tenant and
//! model once instead of once per series.

use crate::outcome::Endpoint;
use crate::quota::Settlement;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, LabelPair, Metric, MetricFamily, MetricType};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Status classes of `collie_requests_total`, in cell order.
const CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "none"];
/// Endpoints, in cell order.
const ENDPOINTS: [Endpoint; 6] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Models,
    Endpoint::Quota,
];
const KINDS: [&str; 2] = ["input", "output"];
/// Where a request's usage came from: the provider, or Collie's estimate.
const SOURCES: [&str; 2] = ["reported", "estimated"];
const SETTLEMENTS: [Settlement; 4] = [
    Settlement::Reported,
    Settlement::Estimated,
    Settlement::Failed,
    Settlement::Refunded,
];

/// Where each family is in `FAMILIES`.
const REQUESTS: usize = 0;
const TOKENS: usize = 1;
const COST: usize = 2;
const SETTLED: usize = 3;
const ESTIMATED: usize = 4;

/// The families: name, help, label names.
const FAMILIES: [(&str, &str, &[&str]); 5] = [
    (
        "collie_requests_total",
        "Requests by tenant, requested model, endpoint and status class",
        &["tenant", "model", "endpoint", "status_class"],
    ),
    (
        "collie_tokens_total",
        "Tokens of served requests; usage=reported (by the upstream) or estimated (by Collie, the upstream reported none)",
        &["tenant", "model", "type", "usage"],
    ),
    (
        "collie_cost_usd_total",
        "Cost of served requests in USD, from the pricing table; usage=reported or estimated as for collie_tokens_total",
        &["tenant", "model", "usage"],
    ),
    (
        "collie_quota_settlements_total",
        "Reservations settled, by outcome: reported (provider usage), estimated (Collie's count), failed (provider error: one request, no tokens), refunded (nothing reached a provider)",
        &["tenant", "outcome"],
    ),
    (
        "collie_usage_estimated_total",
        "Requests settled on Collie's estimate because the upstream reported no usage",
        &["tenant"],
    ),
];

/// One tenant's counters of one requested model.
#[derive(Default)]
pub(crate) struct ModelCells {
    /// Per endpoint and status class.
    requests: [[AtomicU64; CLASSES.len()]; ENDPOINTS.len()],
    /// Per kind (input, output) and source.
    tokens: [[AtomicU64; SOURCES.len()]; KINDS.len()],
    /// Nanodollars, per source (whole numbers, so sums are exact).
    cost_nano: [AtomicU64; SOURCES.len()],
    /// Which token and cost cells were added to (even zero): a series
    /// exists once something was counted in it. Bits: tokens by
    /// kind × source, then cost by source.
    touched: AtomicU8,
}

/// One tenant's counters.
#[derive(Default)]
pub(crate) struct TenantCells {
    settlements: [AtomicU64; SETTLEMENTS.len()],
    estimated: AtomicU64,
    models: RwLock<HashMap<Box<str>, Arc<ModelCells>>>,
}

/// Every tenant's counters; registered once, shared by the recorder.
pub(crate) struct TenantCounters {
    descs: Vec<Desc>,
    tenants: RwLock<HashMap<Box<str>, Arc<TenantCells>>>,
}

/// The entry of `name` in `map`, made on first use.
fn entry<T: Default>(map: &RwLock<HashMap<Box<str>, Arc<T>>>, name: &str) -> Arc<T> {
    if let Some(found) = map.read().unwrap_or_else(|e| e.into_inner()).get(name) {
        return Arc::clone(found);
    }
    let mut map = map.write().unwrap_or_else(|e| e.into_inner());
    Arc::clone(map.entry(Box::from(name)).or_default())
}

/// The entries of `map` now (rendering does not hold its lock).
fn listed<T>(map: &RwLock<HashMap<Box<str>, Arc<T>>>) -> Vec<(Box<str>, Arc<T>)> {
    map.read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), Arc::clone(v)))
        .collect()
}

fn source(estimated: bool) -> usize {
    usize::from(estimated)
}

impl ModelCells {
    /// One request that ended with `status` (counted last: a request seen
    /// here has its other series counted already).
    pub(crate) fn request(&self, endpoint: Endpoint, status: u16) {
        let class = match status {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            500..=599 => 3,
            _ => 4,
        };
        let e = ENDPOINTS.iter().position(|&x| x == endpoint).unwrap_or(0);
        if let Some(cell) = self.requests.get(e).and_then(|row| row.get(class)) {
            cell.fetch_add(1, Ordering::Release);
        }
    }

    /// Tokens of one kind (0: input, 1: output).
    pub(crate) fn tokens(&self, kind: usize, estimated: bool, n: u64) {
        let s = source(estimated);
        if let Some(cell) = self.tokens.get(kind).and_then(|row| row.get(s)) {
            cell.fetch_add(n, Ordering::Relaxed);
            self.touch(kind * SOURCES.len() + s);
        }
    }

    pub(crate) fn cost(&self, estimated: bool, nano: u64) {
        let s = source(estimated);
        if let Some(cell) = self.cost_nano.get(s) {
            cell.fetch_add(nano, Ordering::Relaxed);
            self.touch(KINDS.len() * SOURCES.len() + s);
        }
    }

    fn touch(&self, bit: usize) {
        let mask = 1u8 << bit;
        if self.touched.load(Ordering::Relaxed) & mask == 0 {
            self.touched.fetch_or(mask, Ordering::Relaxed);
        }
    }

    fn touched(&self, bit: usize) -> bool {
        self.touched.load(Ordering::Relaxed) & (1u8 << bit) != 0
    }
}

impl TenantCells {
    pub(crate) fn settlement(&self, s: Settlement) {
        let i = SETTLEMENTS.iter().position(|&x| x == s).unwrap_or(0);
        if let Some(cell) = self.settlements.get(i) {
            cell.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn estimated(&self) {
        self.estimated.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters of `model` (a configured name, or `other`).
    pub(crate) fn model(&self, model: &str) -> Arc<ModelCells> {
        entry(&self.models, model)
    }
}

/// A family being rendered.
struct Family {
    metrics: Vec<Metric>,
}

impl Family {
    fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let mut pairs: Vec<LabelPair> = labels
            .iter()
            .map(|(name, value)| {
                let mut p = LabelPair::default();
                p.set_name((*name).to_string());
                p.set_value((*value).to_string());
                p
            })
            .collect();
        // Sorted by name, as the crate's own vectors render them.
        pairs.sort_by(|a, b| a.name().cmp(b.name()));
        let mut counter = Counter::default();
        counter.set_value(value);
        let mut m = Metric::from_label(pairs);
        m.set_counter(counter);
        self.metrics.push(m);
    }
}

impl TenantCounters {
    pub(crate) fn new() -> prometheus::Result<TenantCounters> {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, labels)| {
                Desc::new(
                    (*name).to_string(),
                    (*help).to_string(),
                    labels.iter().map(|l| (*l).to_string()).collect(),
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<Vec<Desc>>>()?;
        Ok(TenantCounters {
            descs,
            tenants: RwLock::new(HashMap::new()),
        })
    }

    /// The counters of `tenant` (a configured id, or `other`).
    pub(crate) fn tenant(&self, tenant: &str) -> Arc<TenantCells> {
        entry(&self.tenants, tenant)
    }

    fn render(&self) -> Vec<MetricFamily> {
        let mut families: Vec<Family> = FAMILIES
            .iter()
            .map(|_| Family {
                metrics: Vec::new(),
            })
            .collect();
        for (tenant, cells) in &listed(&self.tenants) {
            let tenant = &**tenant;
            for (model, m) in &listed(&cells.models) {
                let model = &**model;
                // Requests first (acquiring what their counting released),
                // so a request seen here has its tokens and cost below.
                for (endpoint, row) in ENDPOINTS.iter().zip(&m.requests) {
                    for (class, cell) in CLASSES.iter().zip(row) {
                        let n = cell.load(Ordering::Acquire);
                        if n > 0 {
                            families[REQUESTS].add(
                                &[
                                    ("tenant", tenant),
                                    ("model", model),
                                    ("endpoint", endpoint.label()),
                                    ("status_class", class),
                                ],
                                n as f64,
                            );
                        }
                    }
                }
                for (k, (kind, row)) in KINDS.iter().zip(&m.tokens).enumerate() {
                    for (s, (usage, cell)) in SOURCES.iter().zip(row).enumerate() {
                        if m.touched(k * SOURCES.len() + s) {
                            families[TOKENS].add(
                                &[
                                    ("tenant", tenant),
                                    ("model", model),
                                    ("type", kind),
                                    ("usage", usage),
                                ],
                                cell.load(Ordering::Relaxed) as f64,
                            );
                        }
                    }
                }
                for (s, (usage, cell)) in SOURCES.iter().zip(&m.cost_nano).enumerate() {
                    if m.touched(KINDS.len() * SOURCES.len() + s) {
                        families[COST].add(
                            &[("tenant", tenant), ("model", model), ("usage", usage)],
                            cell.load(Ordering::Relaxed) as f64 / 1e9,
                        );
                    }
                }
            }
            for (s, cell) in SETTLEMENTS.iter().zip(&cells.settlements) {
                let n = cell.load(Ordering::Relaxed);
                if n > 0 {
                    families[SETTLED].add(&[("tenant", tenant), ("outcome", s.label())], n as f64);
                }
            }
            let n = cells.estimated.load(Ordering::Relaxed);
            if n > 0 {
                families[ESTIMATED].add(&[("tenant", tenant)], n as f64);
            }
        }
        FAMILIES
            .iter()
            .zip(families)
            .filter(|(_, f)| !f.metrics.is_empty())
            .map(|((name, help, _), f)| {
                let mut mf = MetricFamily::default();
                mf.set_name((*name).to_string());
                mf.set_help((*help).to_string());
                mf.set_field_type(MetricType::COUNTER);
                mf.set_metric(f.metrics);
                mf
            })
            .collect()
    }
}

/// The counters as a registered collector.
pub(crate) struct Registered(pub(crate) Arc<TenantCounters>);

impl Collector for Registered {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &Arc<TenantCounters>) -> String {
        let r = prometheus::Registry::new();
        r.register(Box::new(Registered(Arc::clone(c)))).unwrap();
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn counted_series_render_as_the_crate_renders_counters() {
        let c = Arc::new(TenantCounters::new().unwrap());
        assert_eq!(text(&c), "", "nothing counted, nothing rendered");
        let t = c.tenant("acme");
        let m = t.model("gpt");
        m.tokens(0, false, 12);
        m.tokens(1, false, 0);
        m.cost(false, 156_000);
        m.cost(false, 1);
        t.settlement(Settlement::Reported);
        m.request(Endpoint::ChatCompletions, 200);
        m.request(Endpoint::ChatCompletions, 200);
        c.tenant("acme")
            .model("gpt")
            .request(Endpoint::Embeddings, 503);
        c.tenant("other").estimated();
        let out = text(&c);
        for line in [
            r#"collie_requests_total{endpoint="chat",model="gpt",status_class="2xx",tenant="acme"} 2"#,
            r#"collie_requests_total{endpoint="embeddings",model="gpt",status_class="5xx",tenant="acme"} 1"#,
            r#"collie_tokens_total{model="gpt",tenant="acme",type="input",usage="reported"} 12"#,
            // Counted, though zero: the series exists.
            r#"collie_tokens_total{model="gpt",tenant="acme",type="output",usage="reported"} 0"#,
            r#"collie_cost_usd_total{model="gpt",tenant="acme",usage="reported"} 0.000156001"#,
            r#"collie_quota_settlements_total{outcome="reported",tenant="acme"} 1"#,
            r#"collie_usage_estimated_total{tenant="other"} 1"#,
            "# TYPE collie_requests_total counter",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} not in\n{out}");
        }
        assert!(!out.contains("estimated\"} 0"), "{out}");
        assert!(!out.contains("status_class=\"4xx\""), "{out}");
    }
}
