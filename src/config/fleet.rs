//! The `fleet` section: sidecars sharing their tenants' quotas through
//! Redis. Absent, every sidecar keeps its own ledger.

use super::{Secret, Validator};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    #[serde(default)]
    redis_url: Option<String>,
    /// A variable holding the URL, for one that carries a password.
    #[serde(default)]
    redis_url_env: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    lease: Option<RawLease>,
    #[serde(default)]
    on_redis_down: Option<String>,
    #[serde(default)]
    expected_replicas: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLease {
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    call_timeout: Option<String>,
    #[serde(default)]
    top_up_wait: Option<String>,
}

/// What a sidecar does when Redis does not answer and its leases ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RedisDown {
    /// Keep admitting: from its leases, then from its part of the limit
    /// (`limit / expected_replicas` of what was not leased).
    Local,
    /// Refuse what its leases do not cover: 503 `quota_unavailable`.
    Closed,
}

/// Validated `fleet` settings.
#[derive(Clone)]
pub(crate) struct FleetSettings {
    /// `redis://…` (may carry a password: never printed).
    pub(crate) redis_url: Secret,
    /// Prefix of every key, so several fleets can share one Redis.
    pub(crate) namespace: String,
    /// How often a sidecar refreshes its leases and reports its use.
    pub(crate) interval: Duration,
    /// A lease not refreshed for this long expires (at the authority, and
    /// at the sidecar that holds it).
    pub(crate) ttl: Duration,
    /// The deadline of every Redis call.
    pub(crate) call_timeout: Duration,
    /// Longest a request waits for more lease when its sidecar ran out.
    pub(crate) top_up_wait: Duration,
    pub(crate) on_redis_down: RedisDown,
    /// How many sidecars share the limits, for the fallback when Redis is
    /// down (`local`).
    pub(crate) expected_replicas: u32,
}

impl FleetSettings {
    /// Everything the settings say, for telling whether a reload changed
    /// them (never printed: it holds the URL).
    pub(crate) fn identity(&self) -> String {
        format!("{} {self:?}", self.redis_url.expose())
    }
}

impl std::fmt::Debug for FleetSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSettings")
            .field("namespace", &self.namespace)
            .field("interval", &self.interval)
            .field("ttl", &self.ttl)
            .field("on_redis_down", &self.on_redis_down)
            .field("expected_replicas", &self.expected_replicas)
            .field("call_timeout", &self.call_timeout)
            .field("top_up_wait", &self.top_up_wait)
            .finish_non_exhaustive()
    }
}

impl Validator<'_> {
    pub(super) fn fleet(&mut self, raw: Option<serde_yaml_ng::Value>) -> Option<FleetSettings> {
        let f: RawFleet = self.item("fleet", raw?)?;
        let url = match (&f.redis_url, &f.redis_url_env) {
            (Some(_), Some(_)) => {
                self.error(
                    "fleet.redis_url",
                    "give `redis_url` or `redis_url_env`, not both",
                );
                None
            }
            (Some(u), None) => Some(u.trim().to_string()),
            (None, Some(name)) => match (self.env)(name) {
                Some(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
                _ => {
                    self.error(
                        "fleet.redis_url_env",
                        format!("environment variable `{name}` is not set"),
                    );
                    None
                }
            },
            (None, None) => {
                self.error("fleet", "needs `redis_url` (or `redis_url_env`)");
                None
            }
        };
        if let Some(u) = &url {
            if !(u.starts_with("redis://")
                || u.starts_with("rediss://")
                || u.starts_with("unix://"))
            {
                // The URL may carry a password: not quoted.
                self.error(
                    if f.redis_url.is_some() {
                        "fleet.redis_url"
                    } else {
                        "fleet.redis_url_env"
                    },
                    "not a Redis URL: write redis://host:port/db",
                );
            }
        }
        let lease = f.lease.unwrap_or_default();
        let interval = self.duration(
            "fleet.lease.interval",
            &lease.interval,
            Duration::from_secs(1),
        );
        let ttl = self.duration("fleet.lease.ttl", &lease.ttl, interval.saturating_mul(10));
        if ttl < interval.saturating_mul(2) {
            self.error("fleet.lease.ttl", "must be at least twice `interval`");
        }
        let call_timeout = self.duration(
            "fleet.lease.call_timeout",
            &lease.call_timeout,
            Duration::from_millis(250),
        );
        let top_up_wait = self.duration(
            "fleet.lease.top_up_wait",
            &lease.top_up_wait,
            Duration::from_millis(500),
        );
        let on_redis_down = match f.on_redis_down.as_deref() {
            None | Some("local") => RedisDown::Local,
            Some("closed") => RedisDown::Closed,
            Some(other) => {
                self.error(
                    "fleet.on_redis_down",
                    format!("`{other}` is not a choice: use local or closed"),
                );
                RedisDown::Local
            }
        };
        let expected_replicas = match f.expected_replicas {
            None => 1,
            Some(n) if n > 0 => u32::try_from(n).unwrap_or(u32::MAX),
            Some(_) => {
                self.error("fleet.expected_replicas", "must be > 0");
                1
            }
        };
        let namespace = f.namespace.unwrap_or_else(|| "collie".into());
        if namespace.is_empty() || namespace.contains(char::is_whitespace) {
            self.error("fleet.namespace", "must be a word without spaces");
        }
        Some(FleetSettings {
            redis_url: Secret::new(url?),
            namespace,
            interval,
            ttl,
            call_timeout,
            top_up_wait,
            on_redis_down,
            expected_replicas,
        })
    }
}
