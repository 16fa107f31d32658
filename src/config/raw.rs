//! The configuration file exactly as written: serde types with no meaning
//! attached yet. Every struct denies unknown fields so a typo is an error, not
//! a silently ignored setting. Numbers that must be positive are read as signed
//! integers so that `-1` gets a "must be > 0" message with its path instead of
//! a type error.

use serde::Deserialize;
use std::collections::BTreeMap;

/// Top level. The list sections stay untyped here so that each item can be
/// checked on its own and every broken item reported, not only the first.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listen: Option<String>,
    #[serde(default)]
    pub admin_listen: Option<String>,
    #[serde(default)]
    pub threads: Option<i64>,
    #[serde(default)]
    pub max_body_bytes: Option<RawSize>,
    #[serde(default)]
    pub max_json_depth: Option<i64>,
    #[serde(default)]
    pub client_timeout: Option<String>,
    #[serde(default)]
    pub head_timeout: Option<String>,
    #[serde(default)]
    pub keepalive_timeout: Option<String>,
    #[serde(default)]
    pub max_header_bytes: Option<RawSize>,
    #[serde(default)]
    pub max_headers: Option<i64>,
    #[serde(default)]
    pub max_inflight_body_bytes: Option<RawSize>,
    #[serde(default)]
    pub drain_timeout: Option<String>,
    #[serde(default)]
    pub upstream_keepalive_pool: Option<i64>,
    #[serde(default)]
    pub upstream_tls: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub tenants: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub models: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub pools: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub deployments: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub pricing: BTreeMap<String, serde_yaml_ng::Value>,
    #[serde(default)]
    pub quota: Option<serde_yaml_ng::Value>,
    /// Backoff between retries inside a pool.
    #[serde(default)]
    pub retry: Option<RawRetry>,
    /// Longest a request may take in all (attempts, waits and backoff).
    #[serde(default)]
    pub request_deadline: Option<String>,
    #[serde(default)]
    pub audit: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// sqlite (default), postgres or off.
    #[serde(default)]
    pub sink: Option<String>,
    #[serde(default)]
    pub sqlite_path: Option<String>,
    /// Environment variable holding the PostgreSQL URL (it may hold a password).
    #[serde(default)]
    pub postgres_url_env: Option<String>,
    #[serde(default)]
    pub postgres_schema: Option<String>,
    #[serde(default)]
    pub sidecar_id: Option<String>,
    #[serde(default)]
    pub queue: Option<i64>,
    #[serde(default)]
    pub queue_bytes: Option<RawSize>,
    #[serde(default)]
    pub batch: Option<i64>,
    #[serde(default)]
    pub flush_interval: Option<String>,
    /// drop (default) or block.
    #[serde(default)]
    pub when_full: Option<String>,
    #[serde(default)]
    pub preview_bytes: Option<i64>,
    #[serde(default)]
    pub retention: Option<RawRetention>,
    #[serde(default)]
    pub anomalies: Option<RawAnomalies>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    #[serde(default)]
    pub max_age: Option<String>,
    #[serde(default)]
    pub max_rows: Option<i64>,
    /// SQLite only: the largest the file may grow.
    #[serde(default)]
    pub max_bytes: Option<RawSize>,
    #[serde(default)]
    pub every: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAnomalies {
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub tenant_requests: Option<i64>,
    #[serde(default)]
    pub global_requests: Option<i64>,
    #[serde(default)]
    pub failure_ratio: Option<f64>,
    #[serde(default)]
    pub failure_min_requests: Option<i64>,
    #[serde(default)]
    pub tenant_cost_per_hour_usd: Option<f64>,
    #[serde(default)]
    pub global_cost_per_hour_usd: Option<f64>,
    #[serde(default)]
    pub tokens_per_request: Option<i64>,
    #[serde(default)]
    pub repeats: Option<i64>,
    #[serde(default)]
    pub global_repeats: Option<i64>,
    #[serde(default)]
    pub zscore: Option<f64>,
    /// The baseline's period (default 1m) and how many periods it learns
    /// before it judges (default 10).
    #[serde(default)]
    pub baseline_interval: Option<String>,
    #[serde(default)]
    pub baseline_min_history: Option<i64>,
    #[serde(default)]
    pub webhook: Option<RawWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: String,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<i64>,
    /// The first retry's delay; each next one doubles it.
    #[serde(default)]
    pub backoff: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    #[serde(default)]
    pub backoff: Option<String>,
    #[serde(default)]
    pub max_backoff: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// models (default), connect, completion or off.
    #[serde(default)]
    pub probe: Option<String>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub healthy_after: Option<i64>,
    #[serde(default)]
    pub unhealthy_after: Option<i64>,
    #[serde(default)]
    pub failures_to_open: Option<i64>,
    #[serde(default)]
    pub error_ratio: Option<f64>,
    #[serde(default)]
    pub min_samples: Option<i64>,
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub cooldown: Option<String>,
    #[serde(default)]
    pub max_cooldown: Option<String>,
    #[serde(default)]
    pub slow_after: Option<String>,
    #[serde(default)]
    pub degraded_error_ratio: Option<f64>,
}

/// A rule of a route alias: the first matching one picks the chain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Matches the request's `x-collie-route` header.
    #[serde(default)]
    pub hint: Option<String>,
    /// Matches the tenant's priority.
    #[serde(default)]
    pub priorities: Option<Vec<i64>>,
    pub fallback: Vec<String>,
}

/// A size written either as a byte count or as a string with a unit (`32MiB`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    #[serde(default)]
    pub ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub id: String,
    /// SHA-256 digests (hex) of the tenant's API keys; `collie hash-key` prints one.
    pub api_keys: Vec<String>,
    /// Public model names the tenant may call; `"*"` allows every model.
    pub models: Vec<String>,
    #[serde(default)]
    pub priority: Option<i64>,
    /// Overrides `quota.defaults` field by field; `models` adds per-model limits.
    #[serde(default)]
    pub quota: Option<RawLimits>,
}

/// Global quota settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    /// IANA zone for day and month windows; default UTC.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Limits for every tenant that does not set its own.
    #[serde(default)]
    pub defaults: Option<RawLimits>,
    /// Longest a request waits for a saturated pool.
    #[serde(default)]
    pub max_wait: Option<String>,
    #[serde(default)]
    pub rebalance: Option<RawRebalance>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRebalance {
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub threshold: Option<f64>,
    #[serde(default)]
    pub interval: Option<String>,
}

/// Every limit; all optional (absent = unlimited, or inherited from defaults).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default)]
    pub rpm: Option<i64>,
    #[serde(default)]
    pub rpm_burst: Option<i64>,
    #[serde(default)]
    pub tpm: Option<i64>,
    #[serde(default)]
    pub tpm_burst: Option<i64>,
    #[serde(default)]
    pub requests_per_day: Option<i64>,
    #[serde(default)]
    pub tokens_per_day: Option<i64>,
    #[serde(default)]
    pub usd_per_day: Option<f64>,
    #[serde(default)]
    pub requests_per_month: Option<i64>,
    #[serde(default)]
    pub tokens_per_month: Option<i64>,
    #[serde(default)]
    pub usd_per_month: Option<f64>,
    /// Output tokens reserved when a request sets no `max_tokens`.
    #[serde(default)]
    pub default_max_tokens: Option<i64>,
    /// Only in a tenant's quota: limits for one model, on top of the tenant's.
    #[serde(default)]
    pub models: Option<BTreeMap<String, RawLimits>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    /// Pools tried in this order until one answers.
    pub fallback: Vec<String>,
    /// Most output tokens the model can produce; caps the reservation.
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    /// Token estimate family: o200k, cl100k or generic (default: from the name).
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Makes the model a route alias: rules choosing another chain.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub id: String,
    pub deployments: Vec<RawPoolMember>,
    /// Requests in flight at once; beyond it requests queue by priority.
    #[serde(default)]
    pub max_concurrency: Option<i64>,
    /// Learn the budget from the provider's 429s (below `max_concurrency`).
    #[serde(default)]
    pub adaptive_concurrency: Option<bool>,
    /// weighted (default), least_latency or cost.
    #[serde(default)]
    pub policy: Option<String>,
    /// Other deployments of this pool tried before the next pool.
    #[serde(default)]
    pub retries: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoolMember {
    pub deployment: String,
    #[serde(default)]
    pub weight: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub id: String,
    pub base_url: String,
    /// Name of the environment variable holding the provider key. Absent for
    /// upstreams that take no key (a local model server).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub auth: Option<String>,
    /// The model name the provider expects.
    pub model: String,
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default)]
    pub http2: Option<bool>,
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
    /// The provider's request limit for this key, per minute.
    #[serde(default)]
    pub rpm: Option<i64>,
    /// The provider's token limit for this key, per minute.
    #[serde(default)]
    pub tpm: Option<i64>,
    #[serde(default)]
    pub health: Option<RawHealth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    pub first_byte: Option<String>,
    #[serde(default)]
    pub idle: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// USD per million prompt tokens.
    pub input_per_mtok: f64,
    /// USD per million completion tokens.
    pub output_per_mtok: f64,
}
