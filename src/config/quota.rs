//! The `quota` section and each tenant's `quota`: validated into the
//! ledger's limits, with defaults applied field by field.

use super::raw::{RawLimits, RawQuota, RawRebalance};
use super::{Deployment, Model, Pool, Price, Tenant, Validator};
use jiff::tz::TimeZone;
use std::collections::HashMap;
use std::time::Duration;

pub(crate) const DEFAULT_MAX_TOKENS: u64 = 1024;

#[derive(Debug, Clone)]
pub(crate) struct QuotaSettings {
    pub(crate) timezone: TimeZone,
    pub(crate) max_wait: Duration,
    pub(crate) rebalance: RebalanceSettings,
    /// `quota.rebalance.enabled: true` was written out (not the default).
    rebalance_requested: bool,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        QuotaSettings {
            timezone: TimeZone::UTC,
            max_wait: Duration::from_secs(30),
            rebalance: RebalanceSettings::default(),
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
        models: &[Model],
    ) -> (TenantLimits, u64) {
        let merged = match own {
            Some(o) => merge(o, defaults),
            None => defaults.clone(),
        };
        // Errors in inherited fields were already reported under quota.defaults.
        let before = self.errors.len();
        let limits = self.limits(path, &merged);
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
                per_model.insert(model.clone(), self.limits(&mpath, raw));
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
