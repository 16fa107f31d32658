//! The `audit` section: where records go, how the writer batches, what it
//! keeps, and the anomaly rules.

use super::Validator;
use super::raw::{RawAnomalies, RawAudit};
use std::path::PathBuf;
use std::time::Duration;

/// How to reach a sink (parsed from config or `--sink`).
#[derive(Clone, PartialEq, Eq)]
pub enum SinkSpec {
    /// A SQLite file at this path.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres {
        /// The connection URL (it may carry a password).
        url: String,
        /// The schema to use, created when missing; `None`: the server's
        /// search path.
        schema: Option<String>,
    },
}

/// The PostgreSQL URL may carry a password: it is never printed.
impl std::fmt::Debug for SinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkSpec::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            SinkSpec::Postgres { schema, .. } => f
                .debug_struct("Postgres")
                .field("url", &"(redacted)")
                .field("schema", schema)
                .finish(),
        }
    }
}

/// Why `--sink` names no sink.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkSpecError {
    /// Neither `sqlite:PATH` nor a `postgres://` URL.
    #[error("`{0}` is not a sink: use sqlite:PATH or postgres://…")]
    NotASink(String),
    /// The schema after `#` is not a plain name (it is written into SQL).
    #[error("postgres: schema `{0}` must be letters, digits and _")]
    SchemaName(String),
}

impl SinkSpec {
    /// `sqlite:PATH` or `postgres://…` (optionally `#schema`).
    pub(crate) fn parse(text: &str) -> Result<SinkSpec, SinkSpecError> {
        if let Some(path) = text.strip_prefix("sqlite:") {
            return Ok(SinkSpec::Sqlite(PathBuf::from(path)));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            let (url, schema) = match text.split_once('#') {
                Some((u, s)) => (u.to_string(), Some(s.to_string())),
                None => (text.to_string(), None),
            };
            if let Some(s) = schema.as_deref().filter(|s| !is_schema_name(s)) {
                return Err(SinkSpecError::SchemaName(s.to_string()));
            }
            return Ok(SinkSpec::Postgres { url, schema });
        }
        Err(SinkSpecError::NotASink(text.to_string()))
    }
}

/// A PostgreSQL schema name Collie accepts: it is written into SQL, so
/// letters, digits and `_` only.
pub fn is_schema_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The validated `audit` section.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSettings {
    /// `None`: auditing is off.
    pub(crate) sink: Option<SinkSpec>,
    /// The name of this sidecar's hash chain. `None`: the host name and a
    /// random suffix, new on every start (see `audit::sidecar_id`).
    pub(crate) sidecar_id: Option<String>,
    pub(crate) queue: usize,
    /// Request bodies waiting to be hashed, at most.
    pub(crate) queue_bytes: usize,
    pub(crate) batch: usize,
    pub(crate) flush_interval: Duration,
    /// Wait for room instead of dropping when the queue is full.
    pub(crate) block_when_full: bool,
    pub(crate) preview_bytes: usize,
    pub(crate) max_age: Option<Duration>,
    pub(crate) max_rows: Option<u64>,
    /// SQLite only: the largest the file may grow (pages in use).
    pub(crate) max_bytes: Option<u64>,
    pub(crate) prune_every: Duration,
    pub(crate) anomalies: AnomalySettings,
    /// Keep end-user ids as a digest (`user_ids: hashed`) instead of as sent.
    pub(crate) hash_user_ids: bool,
    /// SQLite only: keep the index on the request hash's first 16 hex
    /// digits. Off, it is dropped when the writer opens the trail.
    pub(crate) request_hash_index: bool,
}

/// The validated `audit.anomalies` section: the rules' thresholds (a limit
/// left `None` turns its rule off; hourly costs in nanodollars) and how
/// alerts are delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalySettings {
    pub(crate) window: Duration,
    pub(crate) tenant_requests: Option<u64>,
    pub(crate) global_requests: Option<u64>,
    /// Requests per window of one end user (`user` / `X-User-ID`) of a tenant.
    pub(crate) user_requests: Option<u64>,
    pub(crate) user_cost_per_hour_nano: Option<u64>,
    /// End users whose windows are kept at most; the least recently seen
    /// are forgotten past it.
    pub(crate) max_tracked_users: usize,
    /// After an alert is delivered, the same rule for the same scope is
    /// only counted (not delivered again) for this long.
    pub(crate) cooldown: Duration,
    /// Breaker changes and panic mode raise alerts.
    pub(crate) health_alerts: bool,
    pub(crate) failure_ratio: f64,
    pub(crate) failure_min_requests: u64,
    pub(crate) tenant_cost_per_hour_nano: Option<u64>,
    pub(crate) global_cost_per_hour_nano: Option<u64>,
    pub(crate) tokens_per_request: Option<u64>,
    pub(crate) repeats: Option<u64>,
    pub(crate) global_repeats: Option<u64>,
    pub(crate) zscore: f64,
    /// The baseline's period and how many periods it learns before it judges.
    pub(crate) baseline_interval: Duration,
    pub(crate) baseline_min_history: u32,
    pub(crate) webhook: Option<Webhook>,
}

/// Where anomalies are POSTed as JSON, and how hard to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub(crate) url: String,
    pub(crate) timeout: Duration,
    pub(crate) retries: u32,
    /// Delay before the first retry; doubled for each next one.
    pub(crate) backoff: Duration,
}

impl Default for AnomalySettings {
    fn default() -> Self {
        AnomalySettings {
            window: Duration::from_secs(60),
            tenant_requests: None,
            global_requests: None,
            user_requests: None,
            user_cost_per_hour_nano: None,
            max_tracked_users: 10_000,
            cooldown: Duration::from_secs(600),
            health_alerts: true,
            failure_ratio: 0.5,
            failure_min_requests: 20,
            tenant_cost_per_hour_nano: None,
            global_cost_per_hour_nano: None,
            tokens_per_request: None,
            repeats: None,
            global_repeats: None,
            zscore: 4.0,
            baseline_interval: Duration::from_secs(60),
            baseline_min_history: 10,
            webhook: None,
        }
    }
}

/// The thresholds `preset: standard` sets (each field of the section
/// overrides its own): every seed rule on.
pub(crate) fn standard_preset() -> AnomalySettings {
    AnomalySettings {
        tenant_requests: Some(600),
        global_requests: Some(5000),
        user_requests: Some(120),
        tenant_cost_per_hour_nano: Some(20_000_000_000),
        global_cost_per_hour_nano: Some(200_000_000_000),
        user_cost_per_hour_nano: Some(5_000_000_000),
        tokens_per_request: Some(100_000),
        repeats: Some(20),
        global_repeats: Some(100),
        ..AnomalySettings::default()
    }
}

impl Validator<'_> {
    pub(super) fn audit(&mut self, raw: Option<serde_yaml_ng::Value>) -> AuditSettings {
        let a: RawAudit = raw.and_then(|v| self.item("audit", v)).unwrap_or_default();
        let sink = match a.sink.as_deref() {
            None | Some("sqlite") => Some(SinkSpec::Sqlite(
                a.sqlite_path
                    .clone()
                    .unwrap_or_else(|| "collie-audit.db".into())
                    .into(),
            )),
            Some("postgres") => match &a.postgres_url_env {
                None => {
                    self.error(
                        "audit.postgres_url_env",
                        "needed for the postgres sink: the variable holding its URL",
                    );
                    None
                }
                Some(name) => match (self.env)(name) {
                    Some(url) if !url.trim().is_empty() => Some(SinkSpec::Postgres {
                        url: url.trim().to_string(),
                        schema: a.postgres_schema.clone(),
                    }),
                    // Checked without secrets: a sink without its URL,
                    // which `collie audit` refuses to open (see
                    // `report::open_sink`).
                    None if self.missing == super::MissingEnv::Allow => {
                        self.env_missing("audit.postgres_url_env", name);
                        Some(SinkSpec::Postgres {
                            url: String::new(),
                            schema: a.postgres_schema.clone(),
                        })
                    }
                    _ => {
                        self.error(
                            "audit.postgres_url_env",
                            format!("environment variable `{name}` is not set"),
                        );
                        None
                    }
                },
            },
            Some("off") => None,
            Some(other) => {
                self.error(
                    "audit.sink",
                    format!("unknown sink `{other}`; use sqlite, postgres or off"),
                );
                None
            }
        };
        if let Some(s) = &a.postgres_schema {
            if !is_schema_name(s) {
                self.error("audit.postgres_schema", "letters, digits and _ only");
            }
        }
        let when_full = match a.when_full.as_deref() {
            None | Some("drop") => false,
            Some("block") => true,
            Some(other) => {
                self.error(
                    "audit.when_full",
                    format!("unknown policy `{other}`; use drop or block"),
                );
                false
            }
        };
        let queue_bytes = match &a.queue_bytes {
            None => 64 << 20,
            Some(size) => super::parse_size(size).unwrap_or_else(|e| {
                self.error("audit.queue_bytes", e.to_string());
                64 << 20
            }),
        };
        let (max_age, max_rows, max_bytes, prune_every) = match &a.retention {
            None => (
                Some(Duration::from_secs(30 * 86_400)),
                None,
                None,
                Duration::from_secs(60),
            ),
            Some(r) => (
                r.max_age
                    .as_ref()
                    .map(|_| self.duration("audit.retention.max_age", &r.max_age, Duration::ZERO)),
                self.optional_positive("audit.retention.max_rows", r.max_rows),
                r.max_bytes
                    .as_ref()
                    .and_then(|size| match super::parse_size(size) {
                        Ok(n) if n > 0 => u64::try_from(n).ok(),
                        Ok(_) => {
                            self.error("audit.retention.max_bytes", "must be > 0");
                            None
                        }
                        Err(e) => {
                            self.error("audit.retention.max_bytes", e.to_string());
                            None
                        }
                    }),
                self.duration("audit.retention.every", &r.every, Duration::from_secs(60)),
            ),
        };
        if max_bytes.is_some() && !matches!(sink, Some(SinkSpec::Sqlite(_))) {
            self.error(
                "audit.retention.max_bytes",
                "only the sqlite sink has a file size to bound; use max_rows or max_age",
            );
        }
        if a.request_hash_index.is_some() && !matches!(sink, Some(SinkSpec::Sqlite(_))) {
            self.error(
                "audit.request_hash_index",
                "only the sqlite sink's indexes are Collie's to keep; PostgreSQL's are the database's",
            );
        }
        if let Some(id) = &a.sidecar_id {
            if id.trim().is_empty() {
                self.error("audit.sidecar_id", "must not be empty");
            }
        }
        AuditSettings {
            sink,
            sidecar_id: a.sidecar_id.clone().map(|s| s.trim().to_string()),
            queue: self.positive("audit.queue", a.queue, 10_000),
            queue_bytes,
            batch: self.positive("audit.batch", a.batch, 2048),
            flush_interval: self.duration(
                "audit.flush_interval",
                &a.flush_interval,
                Duration::from_millis(100),
            ),
            block_when_full: when_full,
            preview_bytes: match a.preview_bytes {
                None => 0,
                Some(n) if n >= 0 => usize::try_from(n).unwrap_or(0).min(64 << 10),
                Some(_) => {
                    self.error("audit.preview_bytes", "must be ≥ 0");
                    0
                }
            },
            max_age,
            max_rows,
            max_bytes,
            prune_every,
            anomalies: a
                .anomalies
                .as_ref()
                .map(|r| self.anomalies(r))
                .unwrap_or_default(),
            hash_user_ids: match a.user_ids.as_deref() {
                None | Some("plain") => false,
                Some("hashed") => true,
                Some(other) => {
                    self.error(
                        "audit.user_ids",
                        format!("unknown way `{other}`; use plain or hashed"),
                    );
                    false
                }
            },
            request_hash_index: a.request_hash_index.unwrap_or(true),
        }
    }

    /// A rule's limit: unset takes the preset's, 0 turns the rule off.
    fn limit(&mut self, path: &str, value: Option<i64>, preset: Option<u64>) -> Option<u64> {
        match value {
            None => preset,
            Some(0) => None,
            Some(n) if n > 0 => u64::try_from(n).ok(),
            Some(_) => {
                self.error(path, "must be ≥ 0 (0 turns the rule off)");
                preset
            }
        }
    }

    fn anomalies(&mut self, r: &RawAnomalies) -> AnomalySettings {
        let d = match r.preset.as_deref() {
            None | Some("none") => AnomalySettings::default(),
            Some("standard") => standard_preset(),
            Some(other) => {
                self.error(
                    "audit.anomalies.preset",
                    format!("unknown preset `{other}`; use standard or none"),
                );
                AnomalySettings::default()
            }
        };
        let usd =
            |v: &mut Self, path: &str, usd: Option<f64>, preset: Option<u64>| -> Option<u64> {
                let Some(usd) = usd else { return preset };
                if usd == 0.0 {
                    return None;
                }
                if !usd.is_finite() || usd < 0.0 {
                    v.error(
                        path,
                        "must be a positive amount of USD (0 turns the rule off)",
                    );
                    return None;
                }
                Some((usd * 1e9).round() as u64)
            };
        let failure_ratio = match r.failure_ratio {
            None => d.failure_ratio,
            Some(f) if f > 0.0 && f <= 1.0 => f,
            Some(_) => {
                self.error(
                    "audit.anomalies.failure_ratio",
                    "must be a fraction in (0, 1]",
                );
                d.failure_ratio
            }
        };
        let zscore = match r.zscore {
            None => d.zscore,
            Some(z) if z > 0.0 => z,
            Some(_) => {
                self.error("audit.anomalies.zscore", "must be > 0");
                d.zscore
            }
        };
        let webhook = r.webhook.as_ref().map(|w| {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                self.error(
                    "audit.anomalies.webhook.url",
                    "must be an http or https URL",
                );
            }
            Webhook {
                url: w.url.clone(),
                timeout: self.duration(
                    "audit.anomalies.webhook.timeout",
                    &w.timeout,
                    Duration::from_secs(5),
                ),
                retries: self
                    .optional_positive("audit.anomalies.webhook.retries", w.retries)
                    .map_or(5, |n| u32::try_from(n).unwrap_or(u32::MAX)),
                backoff: self.duration(
                    "audit.anomalies.webhook.backoff",
                    &w.backoff,
                    Duration::from_millis(100),
                ),
            }
        });
        AnomalySettings {
            window: self.duration("audit.anomalies.window", &r.window, d.window),
            tenant_requests: self.limit(
                "audit.anomalies.tenant_requests",
                r.tenant_requests,
                d.tenant_requests,
            ),
            global_requests: self.limit(
                "audit.anomalies.global_requests",
                r.global_requests,
                d.global_requests,
            ),
            user_requests: self.limit(
                "audit.anomalies.user_requests",
                r.user_requests,
                d.user_requests,
            ),
            user_cost_per_hour_nano: usd(
                self,
                "audit.anomalies.user_cost_per_hour_usd",
                r.user_cost_per_hour_usd,
                d.user_cost_per_hour_nano,
            ),
            max_tracked_users: self
                .optional_positive("audit.anomalies.max_tracked_users", r.max_tracked_users)
                .map_or(d.max_tracked_users, |n| {
                    usize::try_from(n).unwrap_or(usize::MAX)
                }),
            // `0s` turns deduplication off: every firing is delivered.
            cooldown: match r.cooldown.as_deref().map(humantime::parse_duration) {
                Some(Ok(d)) => d,
                _ => self.duration("audit.anomalies.cooldown", &r.cooldown, d.cooldown),
            },
            health_alerts: r.health_alerts.unwrap_or(d.health_alerts),
            failure_ratio,
            failure_min_requests: self
                .optional_positive(
                    "audit.anomalies.failure_min_requests",
                    r.failure_min_requests,
                )
                .unwrap_or(d.failure_min_requests),
            tenant_cost_per_hour_nano: usd(
                self,
                "audit.anomalies.tenant_cost_per_hour_usd",
                r.tenant_cost_per_hour_usd,
                d.tenant_cost_per_hour_nano,
            ),
            global_cost_per_hour_nano: usd(
                self,
                "audit.anomalies.global_cost_per_hour_usd",
                r.global_cost_per_hour_usd,
                d.global_cost_per_hour_nano,
            ),
            tokens_per_request: self.limit(
                "audit.anomalies.tokens_per_request",
                r.tokens_per_request,
                d.tokens_per_request,
            ),
            repeats: self.limit("audit.anomalies.repeats", r.repeats, d.repeats),
            global_repeats: self.limit(
                "audit.anomalies.global_repeats",
                r.global_repeats,
                d.global_repeats,
            ),
            zscore,
            baseline_interval: {
                let d = self.duration(
                    "audit.anomalies.baseline_interval",
                    &r.baseline_interval,
                    d.baseline_interval,
                );
                if d.as_millis() < 10 {
                    self.error("audit.anomalies.baseline_interval", "must be at least 10ms");
                }
                d.max(Duration::from_millis(10))
            },
            baseline_min_history: self
                .optional_positive(
                    "audit.anomalies.baseline_min_history",
                    r.baseline_min_history,
                )
                .map_or(d.baseline_min_history, |n| {
                    u32::try_from(n).unwrap_or(u32::MAX)
                }),
            webhook,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_password_is_never_printed() {
        let spec = SinkSpec::parse("postgres://collie:hunter2-secret@db/trail#audit").unwrap();
        let shown = format!("{spec:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("audit"));
    }

    #[test]
    fn the_request_hash_index_is_a_sqlite_setting() {
        let env = |_: &str| Some("postgres://collie@db/trail".to_string());
        let errors = |audit: &str| match crate::config::Config::from_yaml(audit, &env) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        let pg =
            errors("audit: {sink: postgres, postgres_url_env: PG, request_hash_index: false}\n");
        assert!(
            pg.contains("audit.request_hash_index: only the sqlite sink"),
            "{pg}"
        );
        let sqlite = errors("audit: {sink: sqlite, request_hash_index: false}\n");
        assert!(!sqlite.contains("request_hash_index"), "{sqlite}");
    }
}
