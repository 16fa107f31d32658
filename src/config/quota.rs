//! The `quota` section and each tenant's `quota`: validated into the
//! ledger's limits, with defaults applied field by field.

use super::raw::{RawLimits, RawQuota, RawRebalance};
use super::{Deployment, Model, Pool, Price, Tenant, Validator};
use jiff::tz::TimeZone;
use std::collections::HashMap;
use std::time::Duration;

pub(crate) const DEFAULT_MAX_TOKENS: u64 = 1024;

/// How much of a tenant's configured per-minute rates its priority gives
/// it, per mille, for priorities 1 (first) to 5: ×2.0, ×1.5, ×1.0, ×0.75,
/// ×0.5 unless `quota.priority_factors` says otherwise.
const DEFAULT_PRIORITY_FACTORS: [u32; 5] = [2000, 1500, 1000, 750, 500];

/// The smallest and largest factor accepted, per mille.
const FACTOR_RANGE: std::ops::RangeInclusive<u32> = 10..=100_000;

/// Factors for a tenant's per-minute rates (`rpm`, `tpm` and their bursts,
/// the tenant's and its per-model ones) by priority, applied once when the
/// tenant's limits are built: the ledger, the rate headers and every report
/// see the scaled rates. Day and month budgets are never scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PriorityFactors([u32; 5]);

impl Default for PriorityFactors {
    fn default() -> Self {
        PriorityFactors(DEFAULT_PRIORITY_FACTORS)
    }
}

impl PriorityFactors {
    /// The factor for `priority` (1–5), per mille.
    fn per_mille(&self, priority: u8) -> u32 {
        let i = usize::from(priority.clamp(1, 5)).saturating_sub(1);
        self.0.get(i).copied().unwrap_or(1000)
    }

    /// The factor for `priority`, as written in the config.
    pub(crate) fn factor(&self, priority: u8) -> f64 {
        f64::from(self.per_mille(priority)) / 1000.0
    }

    /// `n` scaled for `priority`, rounded to the nearest whole, never below
    /// 1 (a configured rate never becomes "nothing"), saturating.
    fn scale(&self, priority: u8, n: u64) -> u64 {
        let scaled = u128::from(n)
            .saturating_mul(u128::from(self.per_mille(priority)))
            .saturating_add(500)
            / 1000;
        u64::try_from(scaled).unwrap_or(u64::MAX).max(1)
    }

    fn scale_rate(&self, priority: u8, rate: Option<Rate>) -> Option<Rate> {
        rate.map(|r| Rate {
            per_minute: self.scale(priority, r.per_minute),
            burst: self.scale(priority, r.burst),
        })
    }

    /// `limits` with their per-minute rates scaled for `priority`.
    fn apply(&self, priority: u8, limits: Limits) -> Limits {
        Limits {
            rpm: self.scale_rate(priority, limits.rpm),
            tpm: self.scale_rate(priority, limits.tpm),
            ..limits
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct QuotaSettings {
    pub(crate) timezone: TimeZone,
    pub(crate) max_wait: Duration,
    pub(crate) rebalance: RebalanceSettings,
    pub(crate) priority_factors: PriorityFactors,
    /// `quota.rebalance.enabled: true` was written out (not the default).
    rebalance_requested: bool,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        QuotaSettings {
            timezone: TimeZone::UTC,
            max_wait: Duration::from_secs(30),
            rebalance: RebalanceSettings::default(),
            priority_factors: PriorityFactors::default(),
            rebalance_requested: false,
        }
    }
}

/// A per-minute rate with a burst capacity: the bucket refills at
/// `per_minute / 60` per second up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rate {
    pub(crate) per_minute: u64,
    pub(crate) burst: u64,
}

/// Caps on one calendar window; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Budget {
    pub(crate) requests: Option<u64>,
    pub(crate) tokens: Option<u64>,
    pub(crate) usd_nano: Option<u64>,
}

/// Every limit of one scope (a tenant, or a tenant × model).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Limits {
    pub(crate) rpm: Option<Rate>,
    pub(crate) tpm: Option<Rate>,
    pub(crate) day: Budget,
    pub(crate) month: Budget,
}

/// The limits of one tenant as configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TenantLimits {
    pub(crate) priority: u8,
    pub(crate) limits: Limits,
    pub(crate) models: HashMap<String, Limits>,
}

/// Tunables (config `quota.rebalance`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RebalanceSettings {
    pub(crate) enabled: bool,
    /// Pool utilisation at which lending starts.
    pub(crate) threshold: f64,
    pub(crate) interval: Duration,
}

impl Default for RebalanceSettings {
    fn default() -> Self {
        RebalanceSettings {
            enabled: true,
            threshold: 0.8,
            interval: Duration::from_secs(1),
        }
    }
}

impl Validator<'_> {
    /// The global settings and the default limits (still raw: they are
    /// merged into each tenant's before validation).
    pub(super) fn quota_settings(
        &mut self,
        raw: Option<serde_yaml_ng::Value>,
    ) -> (QuotaSettings, RawLimits) {
        let mut settings = QuotaSettings::default();
        let Some(q) = raw.and_then(|v| self.item::<RawQuota>("quota", v)) else {
            return (settings, RawLimits::default());
        };
        if let Some(name) = &q.timezone {
            match TimeZone::get(name) {
                Ok(tz) => settings.timezone = tz,
                Err(_) => self.error(
                    "quota.timezone",
                    format!("unknown time zone `{name}`; use an IANA name like Europe/Berlin"),
                ),
            }
        }
        settings.max_wait = self.duration("quota.max_wait", &q.max_wait, settings.max_wait);
        if let Some(r) = &q.rebalance {
            settings.rebalance = self.rebalance(r);
            settings.rebalance_requested = r.enabled == Some(true);
        }
        if let Some(m) = &q.priority_factors {
            settings.priority_factors = self.priority_factors(m);
        }
        let defaults = q.defaults.unwrap_or_default();
        if defaults.models.is_some() {
            self.error(
                "quota.defaults.models",
                "per-model limits belong in a tenant's quota",
            );
        }
        // Validate the defaults once here, so their errors carry their own path.
        self.limits("quota.defaults", &defaults);
        (settings, defaults)
    }

    /// `{priority: factor}` for priorities 1–5; a priority left out keeps
    /// its default factor.
    fn priority_factors(&mut self, raw: &serde_yaml_ng::Mapping) -> PriorityFactors {
        let mut out = PriorityFactors::default();
        for (key, value) in raw {
            let name = match key {
                serde_yaml_ng::Value::String(s) => s.clone(),
                serde_yaml_ng::Value::Number(n) => n.to_string(),
                _ => String::from("?"),
            };
            let path = format!("quota.priority_factors.{name}");
            let Some(slot) = name
                .parse::<usize>()
                .ok()
                .filter(|p| (1..=5).contains(p))
                .and_then(|p| out.0.get_mut(p.saturating_sub(1)))
            else {
                self.error(&path, "must be a priority between 1 and 5");
                continue;
            };
            let per_mille = value
                .as_f64()
                .filter(|f| f.is_finite())
                .map(|f| (f * 1000.0).round())
                .filter(|m| {
                    (f64::from(*FACTOR_RANGE.start())..=f64::from(*FACTOR_RANGE.end())).contains(m)
                });
            match per_mille {
                // In range, so the conversion is exact.
                Some(m) => *slot = m as u32,
                None => self.error(&path, "must be a factor between 0.01 and 100"),
            }
        }
        out
    }

    fn rebalance(&mut self, r: &RawRebalance) -> RebalanceSettings {
        let d = RebalanceSettings::default();
        let threshold = match r.threshold {
            None => d.threshold,
            Some(t) if t > 0.0 && t <= 1.0 => t,
            Some(_) => {
                self.error("quota.rebalance.threshold", "must be a fraction in (0, 1]");
                d.threshold
            }
        };
        RebalanceSettings {
            enabled: r.enabled.unwrap_or(d.enabled),
            threshold,
            interval: self.duration("quota.rebalance.interval", &r.interval, d.interval),
        }
    }

    /// A tenant's limits: its own fields, else the defaults'.
    pub(super) fn tenant_limits(
        &mut self,
        path: &str,
        own: Option<&RawLimits>,
        defaults: &RawLimits,
        priority: u8,
        factors: PriorityFactors,
        models: &[Model],
    ) -> (TenantLimits, u64) {
        let merged = match own {
            Some(o) => merge(o, defaults),
            None => defaults.clone(),
        };
        // Errors in inherited fields were already reported under quota.defaults.
        let before = self.errors.len();
        let limits = factors.apply(priority, self.limits(path, &merged));
        if own.is_none() {
            self.errors.truncate(before);
        }
        let default_max_tokens = merged
            .default_max_tokens
            .and_then(|n| u64::try_from(n).ok())
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        let mut per_model = HashMap::new();
        if let Some(map) = own.and_then(|o| o.models.as_ref()) {
            for (model, raw) in map {
                let mpath = format!("{path}.models.{model}");
                if !models.iter().any(|m| &m.name == model) {
                    self.error(&mpath, format!("unknown model `{model}`"));
                    continue;
                }
                if raw.models.is_some() || raw.default_max_tokens.is_some() {
                    self.error(&mpath, "per-model limits take only rates and budgets");
                }
                let limits = factors.apply(priority, self.limits(&mpath, raw));
                per_model.insert(model.clone(), limits);
            }
        }
        (
            TenantLimits {
                priority,
                limits,
                models: per_model,
            },
            default_max_tokens,
        )
    }

    fn limits(&mut self, path: &str, r: &RawLimits) -> Limits {
        let rate = |v: &mut Self,
                    name: &str,
                    per_minute: Option<i64>,
                    burst_name: &str,
                    burst: Option<i64>| {
            let per_minute = v.optional_positive(&format!("{path}.{name}"), per_minute)?;
            let burst = v
                .optional_positive(&format!("{path}.{burst_name}"), burst)
                .unwrap_or(per_minute);
            Some(Rate { per_minute, burst })
        };
        if r.rpm.is_none() && r.rpm_burst.is_some() {
            self.error(format!("{path}.rpm_burst"), "needs `rpm`");
        }
        if r.tpm.is_none() && r.tpm_burst.is_some() {
            self.error(format!("{path}.tpm_burst"), "needs `tpm`");
        }
        if r.default_max_tokens.is_some_and(|n| n <= 0) {
            self.error(format!("{path}.default_max_tokens"), "must be > 0");
        }
        Limits {
            rpm: rate(self, "rpm", r.rpm, "rpm_burst", r.rpm_burst),
            tpm: rate(self, "tpm", r.tpm, "tpm_burst", r.tpm_burst),
            day: Budget {
                requests: self
                    .optional_positive(&format!("{path}.requests_per_day"), r.requests_per_day),
                tokens: self.optional_positive(&format!("{path}.tokens_per_day"), r.tokens_per_day),
                usd_nano: self.usd(&format!("{path}.usd_per_day"), r.usd_per_day),
            },
            month: Budget {
                requests: self
                    .optional_positive(&format!("{path}.requests_per_month"), r.requests_per_month),
                tokens: self
                    .optional_positive(&format!("{path}.tokens_per_month"), r.tokens_per_month),
                usd_nano: self.usd(&format!("{path}.usd_per_month"), r.usd_per_month),
            },
        }
    }

    fn usd(&mut self, path: &str, v: Option<f64>) -> Option<u64> {
        let usd = v?;
        if !usd.is_finite() || usd <= 0.0 || usd > 1e9 {
            self.error(path, "must be a positive amount of USD (at most 1e9)");
            return None;
        }
        // Bounded above, so exact enough in nanodollars.
        Some((usd * 1e9).round() as u64)
    }

    /// Rebalancing lends only while a pool runs above a share of its
    /// concurrency budget; a pool without one (`max_concurrency` or
    /// `adaptive_concurrency`) is never "busy". Asking for rebalancing where
    /// no pool has a budget would silently do nothing, so it is an error.
    /// Lending moves rate capacity between tenants inside one sidecar; in a
    /// fleet a sidecar holds only its share, and lending would add to it.
    pub(super) fn check_rebalance_fleet(&mut self, quota: &QuotaSettings, fleet: bool) {
        if fleet && quota.rebalance_requested {
            self.error(
                "quota.rebalance.enabled",
                "lending is per sidecar and cannot be combined with `fleet` (it is off in fleet mode)",
            );
        }
    }

    pub(super) fn check_rebalance_capacity(&mut self, quota: &QuotaSettings, pools: &[Pool]) {
        let measurable = pools
            .iter()
            .any(|p| p.max_concurrency.is_some() || p.adaptive_concurrency);
        if quota.rebalance_requested && !measurable {
            self.error(
                "quota.rebalance.enabled",
                "rebalancing lends capacity only on pools with `max_concurrency` or `adaptive_concurrency`, and no pool has either",
            );
        }
    }

    /// A USD budget cannot be enforced for a model nobody priced: every
    /// deployment that may serve such a tenant needs a price.
    pub(super) fn check_priced_budgets(
        &mut self,
        tenants: &[Tenant],
        models: &[Model],
        pools: &[Pool],
        deployments: &[Deployment],
        pricing: &HashMap<String, Price>,
    ) {
        for (i, t) in tenants.iter().enumerate() {
            let has_usd = |l: &Limits| l.day.usd_nano.is_some() || l.month.usd_nano.is_some();
            if !has_usd(&t.limits.limits) && !t.limits.models.values().any(has_usd) {
                continue;
            }
            for m in models.iter().filter(|m| t.models.allows(&m.name)) {
                let unpriced = m
                    .chain
                    .iter()
                    .filter_map(|&p| pools.get(p.0))
                    .flat_map(|p| p.members.iter())
                    .filter_map(|mem| deployments.get(mem.deployment.0))
                    .find(|d| !pricing.contains_key(&d.model));
                if let Some(d) = unpriced {
                    self.error(
                        format!("tenants[{i}].quota"),
                        format!(
                            "has a USD budget, but model `{}` may be served by deployment `{}` whose model `{}` has no pricing",
                            m.name, d.id, d.model
                        ),
                    );
                }
            }
        }
    }
}

/// `own` where set, else `defaults`.
fn merge(own: &RawLimits, defaults: &RawLimits) -> RawLimits {
    RawLimits {
        rpm: own.rpm.or(defaults.rpm),
        rpm_burst: own.rpm_burst.or(if own.rpm.is_some() {
            None
        } else {
            defaults.rpm_burst
        }),
        tpm: own.tpm.or(defaults.tpm),
        tpm_burst: own.tpm_burst.or(if own.tpm.is_some() {
            None
        } else {
            defaults.tpm_burst
        }),
        requests_per_day: own.requests_per_day.or(defaults.requests_per_day),
        tokens_per_day: own.tokens_per_day.or(defaults.tokens_per_day),
        usd_per_day: own.usd_per_day.or(defaults.usd_per_day),
        requests_per_month: own.requests_per_month.or(defaults.requests_per_month),
        tokens_per_month: own.tokens_per_month.or(defaults.tokens_per_month),
        usd_per_month: own.usd_per_month.or(defaults.usd_per_month),
        default_max_tokens: own.default_max_tokens.or(defaults.default_max_tokens),
        models: None,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn config(rebalance: &str, pool_extra: &str) -> Result<Config, String> {
        let text = format!(
            r#"
quota: {{ rebalance: {rebalance} }}
tenants:
  - id: alpha
    api_keys: ["2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"]
    models: ["*"]
models:
  - {{ name: gpt, fallback: [main] }}
pools:
  - {{ id: main, deployments: [{{ deployment: a }}] {pool_extra} }}
deployments:
  - {{ id: a, base_url: "http://127.0.0.1:9/v1", model: gpt-x }}
"#
        );
        Config::from_yaml(&text, &|_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn priority_scales_rates_only() {
        let text = |factors: &str| {
            format!(
                r#"
quota: {{ priority_factors: {factors}, defaults: {{ rpm: 3, tpm: 1000, tpm_burst: 1500, usd_per_day: 1.0, tokens_per_month: 7 }} }}
tenants:
  - {{ id: a, priority: 1, api_keys: ["2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"], models: ["*"],
       quota: {{ models: {{ gpt: {{ rpm: 1, requests_per_day: 5 }} }} }} }}
  - {{ id: e, priority: 5, api_keys: ["3c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"], models: ["*"] }}
models:
  - {{ name: gpt, fallback: [main] }}
pools:
  - {{ id: main, deployments: [{{ deployment: a }}] }}
deployments:
  - {{ id: a, base_url: "http://127.0.0.1:9/v1", model: gpt-x }}
pricing:
  gpt-x: {{ input_per_mtok: 1.0, output_per_mtok: 1.0 }}
"#
            )
        };
        let c = Config::from_yaml(&text("{}"), &|_| None).unwrap();
        let (a, e) = (&c.tenants[0].limits, &c.tenants[1].limits);
        let rate = |l: &super::Limits| {
            (
                l.rpm.map(|r| (r.per_minute, r.burst)),
                l.tpm.map(|r| (r.per_minute, r.burst)),
            )
        };
        assert_eq!(rate(&a.limits), (Some((6, 6)), Some((2000, 3000))));
        // Rounded to the nearest, never below 1: 3 × 0.5 = 1.5 → 2, 1 × 0.5 → 1.
        assert_eq!(rate(&e.limits), (Some((2, 2)), Some((500, 750))));
        assert_eq!(a.models["gpt"].rpm.map(|r| r.per_minute), Some(2));
        // Budgets as written.
        for l in [&a.limits, &e.limits] {
            assert_eq!(l.day.usd_nano, Some(1_000_000_000));
            assert_eq!(l.month.tokens, Some(7));
        }
        assert_eq!(a.models["gpt"].day.requests, Some(5));
        let c = Config::from_yaml(&text("{ 1: 1.0, \"5\": 3 }"), &|_| None).unwrap();
        assert_eq!(
            c.tenants[0].limits.limits.rpm.map(|r| r.per_minute),
            Some(3)
        );
        assert_eq!(
            c.tenants[1].limits.limits.rpm.map(|r| r.per_minute),
            Some(9)
        );
        assert_eq!(c.quota.priority_factors.factor(5), 3.0);
        let err = Config::from_yaml(&text("{ 0: 1.0, 2: 0, 3: .nan, 4: 1000, six: 1 }"), &|_| {
            None
        })
        .unwrap_err()
        .to_string();
        for e in [
            "quota.priority_factors.0: must be a priority between 1 and 5",
            "quota.priority_factors.2: must be a factor between 0.01 and 100",
            "quota.priority_factors.3: must be a factor",
            "quota.priority_factors.4: must be a factor",
            "quota.priority_factors.six: must be a priority",
        ] {
            assert!(err.contains(e), "missing `{e}` in:\n{err}");
        }
    }

    #[test]
    fn rebalancing_asked_for_needs_a_pool_with_a_budget() {
        let err = config("{ enabled: true }", "").unwrap_err();
        assert!(
            err.contains("quota.rebalance.enabled") && err.contains("max_concurrency"),
            "{err}"
        );
        assert!(config("{ enabled: true }", ", max_concurrency: 4").is_ok());
        assert!(config("{ enabled: true }", ", adaptive_concurrency: true").is_ok());
        // The default (on, not written out) stays quiet: it costs nothing.
        assert!(config("{ threshold: 0.5 }", "").is_ok());
    }
}
