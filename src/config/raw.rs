//! The configuration file exactly as written: serde types with no meaning
//! attached yet. Every struct denies unknown fields so a typo is an error, not
//! a silently ignored setting. Numbers that must be positive are read as signed
//! integers so that `-1` gets a "must be > 0" message with its path instead of
//! a type error.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;

/// A duration field as written: text for `humantime` (`30s`), or a bare
/// number kept as its text, so that validation can say which unit to add
/// (`5` → "write `5s`") instead of serde's "expected a string".
fn duration_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration such as `30s` or `2m`")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(Text)
        }
    }
    d.deserialize_any(Text)
}

/// Top level. The list sections stay untyped here so that each item can be
/// checked on its own and every broken item reported, not only the first.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) listen: Option<String>,
    #[serde(default)]
    pub(crate) admin_listen: Option<String>,
    #[serde(default)]
    pub(crate) admin_token_env: Option<String>,
    #[serde(default)]
    pub(crate) threads: Option<i64>,
    #[serde(default)]
    pub(crate) max_body_bytes: Option<RawSize>,
    #[serde(default)]
    pub(crate) max_json_depth: Option<i64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) client_timeout: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) head_timeout: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) keepalive_timeout: Option<String>,
    #[serde(default)]
    pub(crate) max_header_bytes: Option<RawSize>,
    #[serde(default)]
    pub(crate) max_headers: Option<i64>,
    #[serde(default)]
    pub(crate) max_inflight_body_bytes: Option<RawSize>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) drain_timeout: Option<String>,
    #[serde(default)]
    pub(crate) upstream_keepalive_pool: Option<i64>,
    #[serde(default)]
    pub(crate) upstream_tls: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub(crate) tenants: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub(crate) models: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub(crate) pools: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub(crate) deployments: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub(crate) pricing: BTreeMap<String, serde_yaml_ng::Value>,
    #[serde(default)]
    pub(crate) quota: Option<serde_yaml_ng::Value>,
    /// Backoff between retries inside a pool.
    #[serde(default)]
    pub(crate) retry: Option<RawRetry>,
    /// Longest a request may take in all (attempts, waits and backoff).
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) request_deadline: Option<String>,
    /// Most requests held at once (`hold_when_down`), all models together.
    #[serde(default)]
    pub(crate) max_held_requests: Option<i64>,
    #[serde(default)]
    pub(crate) audit: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub(crate) fleet: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAudit {
    /// sqlite (default), postgres or off.
    #[serde(default)]
    pub(crate) sink: Option<String>,
    #[serde(default)]
    pub(crate) sqlite_path: Option<String>,
    /// Environment variable holding the PostgreSQL URL (it may hold a password).
    #[serde(default)]
    pub(crate) postgres_url_env: Option<String>,
    #[serde(default)]
    pub(crate) postgres_schema: Option<String>,
    #[serde(default)]
    pub(crate) sidecar_id: Option<String>,
    #[serde(default)]
    pub(crate) queue: Option<i64>,
    #[serde(default)]
    pub(crate) queue_bytes: Option<RawSize>,
    #[serde(default)]
    pub(crate) batch: Option<i64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) flush_interval: Option<String>,
    /// drop (default) or block.
    #[serde(default)]
    pub(crate) when_full: Option<String>,
    #[serde(default)]
    pub(crate) preview_bytes: Option<i64>,
    #[serde(default)]
    pub(crate) retention: Option<RawRetention>,
    #[serde(default)]
    pub(crate) anomalies: Option<RawAnomalies>,
    /// How end-user ids are kept: plain (default) or hashed.
    #[serde(default)]
    pub(crate) user_ids: Option<String>,
    /// SQLite only: keep the request-hash index (default true).
    #[serde(default)]
    pub(crate) request_hash_index: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetention {
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) max_age: Option<String>,
    #[serde(default)]
    pub(crate) max_rows: Option<i64>,
    /// SQLite only: the largest the file may grow.
    #[serde(default)]
    pub(crate) max_bytes: Option<RawSize>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) every: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAnomalies {
    /// `standard`: every rule on at its documented default; `none` (the
    /// default) leaves the limits unset. Each field overrides its rule.
    #[serde(default)]
    pub(crate) preset: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) cooldown: Option<String>,
    #[serde(default)]
    pub(crate) health_alerts: Option<bool>,
    #[serde(default)]
    pub(crate) user_requests: Option<i64>,
    #[serde(default)]
    pub(crate) user_cost_per_hour_usd: Option<f64>,
    #[serde(default)]
    pub(crate) max_tracked_users: Option<i64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) window: Option<String>,
    #[serde(default)]
    pub(crate) tenant_requests: Option<i64>,
    #[serde(default)]
    pub(crate) global_requests: Option<i64>,
    #[serde(default)]
    pub(crate) failure_ratio: Option<f64>,
    #[serde(default)]
    pub(crate) failure_min_requests: Option<i64>,
    #[serde(default)]
    pub(crate) tenant_cost_per_hour_usd: Option<f64>,
    #[serde(default)]
    pub(crate) global_cost_per_hour_usd: Option<f64>,
    #[serde(default)]
    pub(crate) tokens_per_request: Option<i64>,
    #[serde(default)]
    pub(crate) repeats: Option<i64>,
    #[serde(default)]
    pub(crate) global_repeats: Option<i64>,
    #[serde(default)]
    pub(crate) zscore: Option<f64>,
    /// The baseline's period (default 1m) and how many periods it learns
    /// before it judges (default 10).
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) baseline_interval: Option<String>,
    #[serde(default)]
    pub(crate) baseline_min_history: Option<i64>,
    #[serde(default)]
    pub(crate) webhook: Option<RawWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWebhook {
    pub(crate) url: String,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) timeout: Option<String>,
    #[serde(default)]
    pub(crate) retries: Option<i64>,
    /// The first retry's delay; each next one doubles it.
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) backoff: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) backoff: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) max_backoff: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    /// models (default), connect, completion or off.
    #[serde(default)]
    pub(crate) probe: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) interval: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) timeout: Option<String>,
    #[serde(default)]
    pub(crate) healthy_after: Option<i64>,
    #[serde(default)]
    pub(crate) unhealthy_after: Option<i64>,
    #[serde(default)]
    pub(crate) failures_to_open: Option<i64>,
    #[serde(default)]
    pub(crate) error_ratio: Option<f64>,
    #[serde(default)]
    pub(crate) min_samples: Option<i64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) window: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) cooldown: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) max_cooldown: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) slow_after: Option<String>,
    #[serde(default)]
    pub(crate) degraded_error_ratio: Option<f64>,
}

/// A rule of a route alias: the first matching one picks the chain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    /// Matches the request's `x-collie-route` header.
    #[serde(default)]
    pub(crate) hint: Option<String>,
    /// Matches the tenant's priority.
    #[serde(default)]
    pub(crate) priorities: Option<Vec<i64>>,
    pub(crate) fallback: Vec<String>,
}

/// A size written either as a byte count or as a string with a unit (`32MiB`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    #[serde(default)]
    pub(crate) ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    pub(crate) id: String,
    /// SHA-256 digests (hex) of the tenant's API keys; `collie hash-key` prints one.
    pub(crate) api_keys: Vec<String>,
    /// Public model names the tenant may call; `"*"` allows every model.
    pub(crate) models: Vec<String>,
    #[serde(default)]
    pub(crate) priority: Option<i64>,
    /// Overrides `quota.defaults` field by field; `models` adds per-model limits.
    #[serde(default)]
    pub(crate) quota: Option<RawLimits>,
}

/// Global quota settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuota {
    /// IANA zone for day and month windows; default UTC.
    #[serde(default)]
    pub(crate) timezone: Option<String>,
    /// Limits for every tenant that does not set its own.
    #[serde(default)]
    pub(crate) defaults: Option<RawLimits>,
    /// Longest a request waits for a saturated pool.
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) max_wait: Option<String>,
    #[serde(default)]
    pub(crate) rebalance: Option<RawRebalance>,
    /// Per-minute rates scaled by the tenant's priority: `{1: 2.0, …, 5: 0.5}`.
    #[serde(default)]
    pub(crate) priority_factors: Option<serde_yaml_ng::Mapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRebalance {
    #[serde(default)]
    pub(crate) enabled: Option<bool>,
    #[serde(default)]
    pub(crate) threshold: Option<f64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) interval: Option<String>,
}

/// Every limit; all optional (absent = unlimited, or inherited from defaults).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    #[serde(default)]
    pub(crate) rpm: Option<i64>,
    #[serde(default)]
    pub(crate) rpm_burst: Option<i64>,
    #[serde(default)]
    pub(crate) tpm: Option<i64>,
    #[serde(default)]
    pub(crate) tpm_burst: Option<i64>,
    #[serde(default)]
    pub(crate) requests_per_day: Option<i64>,
    #[serde(default)]
    pub(crate) tokens_per_day: Option<i64>,
    #[serde(default)]
    pub(crate) usd_per_day: Option<f64>,
    #[serde(default)]
    pub(crate) requests_per_month: Option<i64>,
    #[serde(default)]
    pub(crate) tokens_per_month: Option<i64>,
    #[serde(default)]
    pub(crate) usd_per_month: Option<f64>,
    /// Output tokens reserved when a request sets no `max_tokens`.
    #[serde(default)]
    pub(crate) default_max_tokens: Option<i64>,
    /// Only in a tenant's quota: limits for one model, on top of the tenant's.
    #[serde(default)]
    pub(crate) models: Option<BTreeMap<String, RawLimits>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub(crate) name: String,
    /// Pools tried in this order until one answers.
    pub(crate) fallback: Vec<String>,
    /// Most output tokens the model can produce; caps the reservation.
    #[serde(default)]
    pub(crate) max_output_tokens: Option<i64>,
    /// Token estimate family: o200k, cl100k or generic (default: from the name).
    #[serde(default)]
    pub(crate) tokenizer: Option<String>,
    /// Tokens (prompt + output) the model's deployments hold, for those
    /// that do not say themselves.
    #[serde(default)]
    pub(crate) context_window: Option<i64>,
    /// How long a request waits while every deployment of the model is
    /// down, for one to come back.
    #[serde(default)]
    pub(crate) hold_when_down: Option<String>,
    /// Makes the model a route alias: rules choosing another chain.
    #[serde(default)]
    pub(crate) routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub(crate) id: String,
    pub(crate) deployments: Vec<RawPoolMember>,
    /// Requests in flight at once; beyond it requests queue by priority.
    #[serde(default)]
    pub(crate) max_concurrency: Option<i64>,
    /// Learn the budget from the provider's 429s (below `max_concurrency`).
    #[serde(default)]
    pub(crate) adaptive_concurrency: Option<bool>,
    /// weighted (default), least_latency or cost.
    #[serde(default)]
    pub(crate) policy: Option<String>,
    /// Other deployments of this pool tried before the next pool.
    #[serde(default)]
    pub(crate) retries: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPoolMember {
    pub(crate) deployment: String,
    #[serde(default)]
    pub(crate) weight: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeployment {
    pub(crate) id: String,
    pub(crate) base_url: String,
    /// Name of the environment variable holding the provider key. Absent for
    /// upstreams that take no key (a local model server).
    #[serde(default)]
    pub(crate) api_key_env: Option<String>,
    #[serde(default)]
    pub(crate) auth: Option<String>,
    /// The model name the provider expects.
    pub(crate) model: String,
    #[serde(default)]
    pub(crate) ca_file: Option<String>,
    #[serde(default)]
    pub(crate) http2: Option<bool>,
    #[serde(default)]
    pub(crate) timeouts: Option<RawTimeouts>,
    /// The provider's request limit for this key, per minute.
    #[serde(default)]
    pub(crate) rpm: Option<i64>,
    /// The provider's token limit for this key, per minute.
    #[serde(default)]
    pub(crate) tpm: Option<i64>,
    /// Tokens (prompt + output) the deployment's model holds.
    #[serde(default)]
    pub(crate) context_window: Option<i64>,
    #[serde(default)]
    pub(crate) health: Option<RawHealth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) connect: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) first_byte: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(crate) idle: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrice {
    /// USD per million prompt tokens.
    pub(crate) input_per_mtok: f64,
    /// USD per million completion tokens.
    pub(crate) output_per_mtok: f64,
}
