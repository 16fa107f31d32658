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
                    self.env_missing("fleet.redis_url_env", name);
                    // Allowed missing (a config being checked): a stand-in.
                    self.errors.is_empty().then(|| "redis://unset".to_string())
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

#[cfg(test)]
mod tests {
    use super::RedisDown;
    use crate::config::Config;
    use std::time::Duration;

    fn config(fleet: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let text = format!(
            r#"
fleet: {fleet}
tenants:
  - id: alpha
    api_keys: ["2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"]
    models: ["*"]
models:
  - {{ name: gpt, fallback: [main] }}
pools:
  - {{ id: main, deployments: [{{ deployment: a }}] }}
deployments:
  - {{ id: a, base_url: "http://127.0.0.1:9/v1", model: gpt-x }}
"#
        );
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_yaml(&text, &|name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_settings() {
        let c = config("{ redis_url: redis://127.0.0.1:6379/0 }", &[]).unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.interval, Duration::from_secs(1));
        assert_eq!(f.ttl, Duration::from_secs(10));
        assert_eq!(f.on_redis_down, RedisDown::Local);
        assert_eq!((f.namespace.as_str(), f.expected_replicas), ("collie", 1));
        let c = config(
            "{ redis_url_env: R, on_redis_down: closed, expected_replicas: 4, lease: { interval: 2s, ttl: 4s } }",
            &[("R", "redis://:secret-pw@10.0.0.1:6379/2")],
        )
        .unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(
            (f.on_redis_down, f.expected_replicas),
            (RedisDown::Closed, 4)
        );
        assert_eq!(f.redis_url.expose(), "redis://:secret-pw@10.0.0.1:6379/2");
        assert!(!format!("{f:?}").contains("secret-pw"));
        assert!(config("null", &[]).unwrap().fleet.is_none());
    }

    #[test]
    fn mistakes_are_named_and_urls_never_quoted() {
        for (fleet, path) in [
            ("{}", "fleet"),
            ("{ redis_url: 'http://pw@x' }", "fleet.redis_url"),
            (
                "{ redis_url: redis://x, redis_url_env: R }",
                "fleet.redis_url",
            ),
            ("{ redis_url_env: MISSING }", "fleet.redis_url_env"),
            (
                "{ redis_url: redis://x, lease: { interval: 1s, ttl: 1s } }",
                "fleet.lease.ttl",
            ),
            (
                "{ redis_url: redis://x, on_redis_down: maybe }",
                "fleet.on_redis_down",
            ),
            (
                "{ redis_url: redis://x, expected_replicas: 0 }",
                "fleet.expected_replicas",
            ),
            (
                "{ redis_url: redis://x, namespace: 'a b' }",
                "fleet.namespace",
            ),
            ("{ redis_url: redis://x, lease: { bogus: 1 } }", "fleet"),
        ] {
            let err = config(fleet, &[]).unwrap_err();
            assert!(err.contains(path), "{fleet}: {err}");
            assert!(!err.contains("http://pw@x"), "{err}");
        }
    }

    #[test]
    fn lending_is_refused_in_a_fleet() {
        let text = config("{ redis_url: redis://x }", &[]);
        assert!(text.is_ok());
        let err = Config::from_yaml(
            r#"
quota: { rebalance: { enabled: true } }
fleet: { redis_url: "redis://x" }
tenants:
  - id: alpha
    api_keys: ["2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"]
    models: ["*"]
models:
  - { name: gpt, fallback: [main] }
pools:
  - { id: main, deployments: [{ deployment: a }], max_concurrency: 4 }
deployments:
  - { id: a, base_url: "http://127.0.0.1:9/v1", model: gpt-x }
"#,
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("quota.rebalance.enabled") && err.contains("fleet"),
            "{err}"
        );
    }
}
