//! Where a request may go: public model → ordered fallback chain of pools →
//! weighted deployments, plus the per-deployment state the exchange consults
//! (a provider's `Retry-After`). Selection within a pool uses
//! `pingora-load-balancing`'s weighted round robin.

pub mod tls;

use crate::config::{AuthStyle, Config, Price, Timeouts};
use crate::quota::ProviderLimiter;
use crate::quota::admission::PoolGate;
use http::{HeaderName, HeaderValue};
use pingora::lb::discovery::Static;
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Milliseconds on a monotonic clock private to this process (never 0).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// One deployment ready to be called: a provider endpoint, its key and the
/// model name it expects.
pub struct Upstream {
    pub index: usize,
    pub id: String,
    pub peer: HttpPeer,
    /// The model name written into the body sent to this deployment.
    pub model: String,
    pub host: HeaderValue,
    pub path_prefix: String,
    /// Header carrying the provider key, marked sensitive so HPACK never
    /// indexes it. `None` for upstreams that take no key.
    pub auth: Option<(HeaderName, HeaderValue)>,
    pub timeouts: Timeouts,
    pub price: Option<Price>,
    /// Until when (see [`now_ms`]) the provider asked us to stay away; 0 = open.
    blocked_until_ms: AtomicU64,
    /// The provider's per-minute limits for this key, as configured.
    limits: (Option<u64>, Option<u64>),
    pub limiter: Option<Arc<ProviderLimiter>>,
}

impl Upstream {
    /// Remember a provider's `Retry-After`; a later, longer one wins.
    pub fn block_for(&self, wait: Duration) {
        let until = now_ms().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        self.blocked_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// Milliseconds left before this deployment may be tried again.
    pub fn blocked_for_ms(&self, now: u64) -> Option<u64> {
        let until = self.blocked_until_ms.load(Ordering::Relaxed);
        (until > now).then(|| until - now)
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The auth header is deliberately left out.
        f.debug_struct("Upstream")
            .field("id", &self.id)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

pub struct PoolRuntime {
    pub id: String,
    members: Vec<usize>,
    lb: LoadBalancer<RoundRobin>,
    /// Concurrency budget and priority queue; kept across reloads.
    pub gate: Arc<PoolGate>,
}

/// What a pool offers for the next attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick {
    Upstream(usize),
    /// Every untried member is waiting out a `Retry-After`; the shortest wait.
    Blocked {
        retry_in_ms: u64,
    },
    /// Every member was already tried for this request.
    Exhausted,
}

impl PoolRuntime {
    /// Weighted choice among members not yet tried and not blocked.
    /// Weighted choice among members not yet tried, not blocked, and whose
    /// provider limits can take one request of `tokens` (taken on success).
    pub fn pick(
        &self,
        upstreams: &[Arc<Upstream>],
        tried: &[usize],
        now: u64,
        tokens: u64,
    ) -> Pick {
        let limited_wait = std::cell::Cell::new(None::<u64>);
        let usable = |idx: usize| {
            let Some(u) = upstreams.get(idx) else {
                return false;
            };
            if tried.contains(&idx) || u.blocked_for_ms(now).is_some() {
                return false;
            }
            match u.limiter.as_ref().map(|l| l.try_take(tokens)) {
                None | Some(Ok(())) => true,
                Some(Err(wait)) => {
                    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
                    limited_wait.set(Some(limited_wait.get().map_or(ms, |w| w.min(ms))));
                    false
                }
            }
        };
        // Bounded: the round robin walks every unique member within
        // `members.len()` steps after its weighted first choice.
        let max_iterations = self.members.len() * 2 + 1;
        let chosen = self.lb.select_with(b"", max_iterations, |b, healthy| {
            healthy && b.ext.get::<usize>().is_some_and(|&i| usable(i))
        });
        if let Some(idx) = chosen.and_then(|b| b.ext.get::<usize>().copied()) {
            return Pick::Upstream(idx);
        }
        let waits = self
            .members
            .iter()
            .filter(|i| !tried.contains(i))
            .filter_map(|&i| upstreams.get(i).and_then(|u| u.blocked_for_ms(now)))
            .chain(limited_wait.get());
        match waits.min() {
            Some(retry_in_ms) => Pick::Blocked { retry_in_ms },
            None => Pick::Exhausted,
        }
    }
}

/// Everything routing needs for one snapshot of the config.
pub struct Router {
    chains: HashMap<String, Vec<usize>>,
    pub pools: Vec<PoolRuntime>,
    pub upstreams: Vec<Arc<Upstream>>,
}

impl Router {
    /// Build from a validated config. Provider state (`Retry-After` blocks) of
    /// deployments that keep their id is carried over from `previous`.
    pub fn build(config: &Config, previous: Option<&Router>) -> Result<Router, String> {
        let mut upstreams = Vec::with_capacity(config.deployments.len());
        let mut errors = Vec::new();
        for (index, d) in config.deployments.iter().enumerate() {
            match build_upstream(config, index) {
                Ok(mut u) => {
                    if let Some(old) = previous.and_then(|p| p.upstream_by_id(&d.id)) {
                        u.blocked_until_ms.store(
                            old.blocked_until_ms.load(Ordering::Relaxed),
                            Ordering::Relaxed,
                        );
                        if old.limits == u.limits {
                            u.limiter = old.limiter.clone();
                        }
                    }
                    upstreams.push(Arc::new(u));
                }
                Err(e) => errors.push(format!("deployments[{index}] ({}): {e}", d.id)),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("\n"));
        }
        let mut pools = Vec::with_capacity(config.pools.len());
        for p in &config.pools {
            let mut set = BTreeSet::new();
            for m in &p.members {
                set.insert(identity_backend(m.deployment, m.weight)?);
            }
            let lb = LoadBalancer::<RoundRobin>::from_backends(Backends::new(Static::new(set)));
            // A static discovery never blocks, so this completes at once.
            futures::executor::block_on(lb.update()).map_err(|e| format!("pool {}: {e}", p.id))?;
            // The gate (and the requests queued at it) survives a reload
            // unless the pool's budget changed.
            let gate = previous
                .and_then(|r| r.pools.iter().find(|o| o.id == p.id))
                .filter(|o| o.gate.settings() == (p.max_concurrency, p.adaptive_concurrency))
                .map_or_else(
                    || Arc::new(PoolGate::new(p.max_concurrency, p.adaptive_concurrency)),
                    |o| Arc::clone(&o.gate),
                );
            pools.push(PoolRuntime {
                id: p.id.clone(),
                members: p.members.iter().map(|m| m.deployment).collect(),
                lb,
                gate,
            });
        }
        let chains = config
            .models
            .iter()
            .map(|m| (m.name.clone(), m.chain.clone()))
            .collect();
        Ok(Router {
            chains,
            pools,
            upstreams,
        })
    }

    /// The pools to try for a public model, in order.
    pub fn chain(&self, model: &str) -> Option<&[usize]> {
        self.chains.get(model).map(Vec::as_slice)
    }

    pub fn upstream_by_id(&self, id: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.id == id)
    }
}

/// `pingora-load-balancing` identifies a backend by (address, weight), so two
/// deployments on one endpoint (two keys for the same provider) would collapse
/// into one. Each deployment therefore gets a synthetic identity address; the
/// real peer lives in [`Upstream`], found through `ext`.
fn identity_backend(index: usize, weight: u32) -> Result<Backend, String> {
    let port = u16::try_from(index + 1).map_err(|_| "too many deployments".to_string())?;
    let mut b = Backend::new_with_weight(&format!("0.0.0.0:{port}"), weight as usize)
        .map_err(|e| e.to_string())?;
    b.ext.insert(index);
    Ok(b)
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolved to no address"))
}

fn build_upstream(config: &Config, index: usize) -> Result<Upstream, String> {
    let d = &config.deployments[index];
    let url = &d.base_url;
    let addr = resolve(&url.host, url.port)?;
    let mut peer = HttpPeer::new(addr, url.tls, url.host.clone());
    let o = &mut peer.options;
    o.connection_timeout = Some(d.timeouts.connect);
    // TCP connect plus the TLS handshake.
    o.total_connection_timeout = Some(d.timeouts.connect * 2);
    o.idle_timeout = Some(Duration::from_secs(60));
    o.alpn = if d.http2 { ALPN::H2H1 } else { ALPN::H1 };
    o.verify_cert = true;
    o.verify_hostname = true;
    let ca = d.ca_file.as_ref().or(config.upstream_ca_file.as_ref());
    if let (true, Some(file)) = (url.tls, ca) {
        o.ca = Some(Arc::from(tls::load_ca_file(file)?));
    }
    let auth = match (&d.auth, &d.api_key) {
        (AuthStyle::None, _) | (_, None) => None,
        (style, Some(key)) => {
            let (name, text) = match style {
                AuthStyle::Bearer => (
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", key.expose()),
                ),
                _ => (HeaderName::from_static("api-key"), key.expose().to_string()),
            };
            let mut value = HeaderValue::from_str(&text)
                .map_err(|_| format!("the key in {} is not a valid header value", d.id))?;
            value.set_sensitive(true);
            Some((name, value))
        }
    };
    Ok(Upstream {
        index,
        id: d.id.clone(),
        peer,
        model: d.model.clone(),
        host: HeaderValue::from_str(&url.authority()).map_err(|e| e.to_string())?,
        path_prefix: url.path_prefix.clone(),
        auth,
        timeouts: d.timeouts,
        price: config.pricing.get(&d.model).copied(),
        blocked_until_ms: AtomicU64::new(0),
        limits: (d.rpm, d.tpm),
        limiter: ProviderLimiter::new(d.rpm, d.tpm).map(Arc::new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(weights: &[u32]) -> Config {
        let mut deployments = String::new();
        let mut members = String::new();
        for (i, w) in weights.iter().enumerate() {
            deployments.push_str(&format!(
                "  - {{id: d{i}, base_url: \"http://127.0.0.1:{}/v1\", model: m}}\n",
                10_000 + i
            ));
            members.push_str(&format!("      - {{deployment: d{i}, weight: {w}}}\n"));
        }
        let text = format!(
            "models:\n  - {{name: m, fallback: [p]}}\npools:\n  - id: p\n    deployments:\n{members}deployments:\n{deployments}"
        );
        Config::from_yaml(&text, &|_| None).unwrap()
    }

    #[test]
    fn weighted_split_is_exact_over_full_cycles() {
        let r = Router::build(&config(&[3, 1]), None).unwrap();
        let mut counts = [0usize; 2];
        for _ in 0..400 {
            match r.pools[0].pick(&r.upstreams, &[], now_ms(), 1) {
                Pick::Upstream(i) => counts[i] += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn skips_tried_and_blocked_members() {
        let r = Router::build(&config(&[1, 1, 1]), None).unwrap();
        let now = now_ms();
        r.upstreams[1].block_for(Duration::from_secs(30));
        for _ in 0..20 {
            assert_eq!(
                r.pools[0].pick(&r.upstreams, &[0], now, 1),
                Pick::Upstream(2)
            );
        }
        match r.pools[0].pick(&r.upstreams, &[0, 2], now, 1) {
            Pick::Blocked { retry_in_ms } => assert!(retry_in_ms > 29_000 && retry_in_ms <= 30_000),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            r.pools[0].pick(&r.upstreams, &[0, 1, 2], now, 1),
            Pick::Exhausted
        );
    }

    #[test]
    fn same_endpoint_twice_stays_two_deployments() {
        let text = "models:\n  - {name: m, fallback: [p]}\npools:\n  - id: p\n    deployments: [{deployment: a}, {deployment: b}]\ndeployments:\n  - {id: a, base_url: \"http://127.0.0.1:9/v1\", model: m}\n  - {id: b, base_url: \"http://127.0.0.1:9/v1\", model: m}\n";
        let c = Config::from_yaml(text, &|_| None).unwrap();
        let r = Router::build(&c, None).unwrap();
        let mut seen = BTreeSet::new();
        for _ in 0..4 {
            if let Pick::Upstream(i) = r.pools[0].pick(&r.upstreams, &[], now_ms(), 1) {
                seen.insert(i);
            }
        }
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn reload_keeps_retry_after_blocks() {
        let c = config(&[1]);
        let old = Router::build(&c, None).unwrap();
        old.upstreams[0].block_for(Duration::from_secs(60));
        let new = Router::build(&c, Some(&old)).unwrap();
        assert!(new.upstreams[0].blocked_for_ms(now_ms()).is_some());
    }
}
