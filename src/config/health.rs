//! The health, retry and routing-rule parts of a config: per-deployment
//! probe and breaker settings, per-pool policy and retries, route aliases.

use super::raw::{RawHealth, RawRetry, RawRoute};
use super::{Named, Pool, Resolved, Validator};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RetrySettings {
    /// First backoff; doubles per retry, with full jitter.
    pub(crate) backoff: Duration,
    pub(crate) max_backoff: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Per-deployment tunables (config `health:` of a deployment).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HealthSettings {
    pub(crate) probe: ProbeKind,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    /// Consecutive probe results that flip the probe verdict.
    pub(crate) healthy_after: u32,
    pub(crate) unhealthy_after: u32,
    /// Consecutive live failures that open the breaker.
    pub(crate) failures_to_open: u32,
    /// Error share of the sliding window that opens the breaker (with at
    /// least `min_samples` in it).
    pub(crate) error_ratio: f64,
    pub(crate) min_samples: u32,
    pub(crate) window: Duration,
    pub(crate) cooldown: Duration,
    pub(crate) max_cooldown: Duration,
    /// Time-to-first-byte EWMA above which the deployment is degraded.
    pub(crate) slow_after: Duration,
    /// Error share above which the deployment is degraded.
    pub(crate) degraded_error_ratio: f64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            probe: ProbeKind::Models,
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(5),
            healthy_after: 1,
            unhealthy_after: 2,
            failures_to_open: 5,
            error_ratio: 0.5,
            min_samples: 20,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(300),
            slow_after: Duration::from_secs(10),
            degraded_error_ratio: 0.1,
        }
    }
}

/// What an active probe does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeKind {
    /// `GET …/models` with the deployment's key: free.
    Models,
    /// A TCP (and TLS) connect only.
    Connect,
    /// A one-token completion: for providers whose model list says nothing
    /// about serving. Costs a token per probe.
    Completion,
    /// No active probes; live traffic only.
    Off,
}

impl ProbeKind {
    /// As written in the config.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Models => "models",
            ProbeKind::Connect => "connect",
            ProbeKind::Completion => "completion",
            ProbeKind::Off => "off",
        }
    }
}

/// How a pool chooses among its healthy members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// By weight, round robin (`pingora-load-balancing`).
    Weighted,
    /// The lowest time-to-first-byte EWMA; one request in twenty goes by
    /// weight so that the others' figures stay fresh.
    LeastLatency,
    /// The cheapest by price (input + output per token); ties by weight.
    Cost,
}

impl Policy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Policy::Weighted => "weighted",
            Policy::LeastLatency => "least_latency",
            Policy::Cost => "cost",
        }
    }
}

/// One rule of a route alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) hint: Option<String>,
    pub(crate) priorities: Option<Vec<u8>>,
    pub(crate) chain: Vec<super::PoolIx>,
}

impl Validator<'_> {
    pub(super) fn retry(&mut self, raw: Option<&RawRetry>) -> RetrySettings {
        let d = RetrySettings::default();
        let Some(r) = raw else {
            return d;
        };
        let s = RetrySettings {
            backoff: self.duration("retry.backoff", &r.backoff, d.backoff),
            max_backoff: self.duration("retry.max_backoff", &r.max_backoff, d.max_backoff),
        };
        if s.max_backoff < s.backoff {
            self.error("retry.max_backoff", "must be at least `backoff`");
        }
        s
    }

    pub(super) fn health(&mut self, path: &str, raw: Option<&RawHealth>) -> HealthSettings {
        let d = HealthSettings::default();
        let Some(h) = raw else {
            return d;
        };
        let probe = match h.probe.as_deref() {
            None => d.probe,
            Some("models") => ProbeKind::Models,
            Some("connect") => ProbeKind::Connect,
            Some("completion") => ProbeKind::Completion,
            Some("off") => ProbeKind::Off,
            Some(other) => {
                self.error(
                    format!("{path}.probe"),
                    format!("unknown probe `{other}`; use models, connect, completion or off"),
                );
                d.probe
            }
        };
        let count = |v: &mut Self, name: &str, value: Option<i64>, default: u32| {
            v.optional_positive(&format!("{path}.{name}"), value)
                .map_or(default, |n| u32::try_from(n).unwrap_or(u32::MAX))
        };
        let mut ratio = |name: &str, value: Option<f64>, default: f64| match value {
            None => default,
            Some(r) if r > 0.0 && r <= 1.0 => r,
            Some(_) => {
                self.error(format!("{path}.{name}"), "must be a fraction in (0, 1]");
                default
            }
        };
        let error_ratio = ratio("error_ratio", h.error_ratio, d.error_ratio);
        let degraded_error_ratio = ratio(
            "degraded_error_ratio",
            h.degraded_error_ratio,
            d.degraded_error_ratio,
        );
        let s = HealthSettings {
            probe,
            interval: self.duration(&format!("{path}.interval"), &h.interval, d.interval),
            timeout: self.duration(&format!("{path}.timeout"), &h.timeout, d.timeout),
            healthy_after: count(self, "healthy_after", h.healthy_after, d.healthy_after),
            unhealthy_after: count(
                self,
                "unhealthy_after",
                h.unhealthy_after,
                d.unhealthy_after,
            ),
            failures_to_open: count(
                self,
                "failures_to_open",
                h.failures_to_open,
                d.failures_to_open,
            ),
            error_ratio,
            min_samples: count(self, "min_samples", h.min_samples, d.min_samples),
            window: self.duration(&format!("{path}.window"), &h.window, d.window),
            cooldown: self.duration(&format!("{path}.cooldown"), &h.cooldown, d.cooldown),
            max_cooldown: self.duration(
                &format!("{path}.max_cooldown"),
                &h.max_cooldown,
                d.max_cooldown,
            ),
            slow_after: self.duration(&format!("{path}.slow_after"), &h.slow_after, d.slow_after),
            degraded_error_ratio,
        };
        if s.max_cooldown < s.cooldown {
            self.error(
                format!("{path}.max_cooldown"),
                "must be at least `cooldown`",
            );
        }
        s
    }

    pub(super) fn chain(
        &mut self,
        path: &str,
        names: &[String],
        pools: &Named<Pool>,
    ) -> Vec<super::PoolIx> {
        if names.is_empty() {
            self.error(path, "must list at least one pool");
        }
        let mut chain = Vec::new();
        for (j, pool) in names.iter().enumerate() {
            match pools.resolve(pool) {
                Resolved::Found(idx) => chain.push(super::PoolIx(idx)),
                Resolved::Broken => {}
                Resolved::Missing => {
                    self.error(format!("{path}[{j}]"), format!("unknown pool `{pool}`"))
                }
            }
        }
        chain
    }

    pub(super) fn routes(
        &mut self,
        path: &str,
        raw: &[RawRoute],
        pools: &Named<Pool>,
    ) -> Vec<Route> {
        let mut out = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let rpath = format!("{path}.routes[{i}]");
            if r.hint.is_none() && r.priorities.is_none() {
                self.error(&rpath, "needs `hint`, `priorities` or both");
            }
            let priorities = r.priorities.as_ref().map(|ps| {
                ps.iter()
                    .filter_map(|&p| match u8::try_from(p) {
                        Ok(p @ 1..=5) => Some(p),
                        _ => {
                            self.error(format!("{rpath}.priorities"), "priorities are 1 to 5");
                            None
                        }
                    })
                    .collect()
            });
            let chain = self.chain(&format!("{rpath}.fallback"), &r.fallback, pools);
            out.push(Route {
                hint: r.hint.clone(),
                priorities,
                chain,
            });
        }
        out
    }
}
