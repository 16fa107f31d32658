//! Where a request may go: public model (or route alias) → ordered fallback
//! chain of pools → deployments chosen by the pool's policy, skipping those
//! waiting out a provider's `Retry-After`, those whose breaker is open, and
//! those whose own provider limits are spent. Health and probes are in
//! [`health`] and [`probe`].

pub(crate) mod gate;
pub(crate) mod health;
pub(crate) mod limits;

pub(crate) use crate::config::Policy;
use crate::config::{Config, DeploymentIx, PoolIx, Price, Timeouts};
use arc_swap::ArcSwap;
use gate::PoolGate;
use health::probes::{DeploymentKey, HealthBook};
use health::{DeploymentHealth, HealthState};
use http::{HeaderName, HeaderValue};
use limits::ProviderLimiter;
use pingora::lb::discovery::Static;
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Milliseconds on a monotonic clock private to this process (never 0).
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// One deployment ready to be called: a provider endpoint, its key and the
/// model name it expects.
pub(crate) struct Deployment {
    pub(crate) index: DeploymentIx,
    pub(crate) id: String,
    /// The endpoint; its address is refreshed from DNS in the background
    /// (see [`Deployment::refresh_address`]), so it is swapped, never edited.
    peer: ArcSwap<HttpPeer>,
    /// The host name to resolve, when the base URL names one (not an IP).
    dns_name: Option<(String, u16)>,
    /// The host name did not resolve yet (at start or reload): `peer` holds
    /// a placeholder that is never connected to, and attempts and probes
    /// fail at once until the background refresh resolves it.
    unresolved: AtomicBool,
    /// The model name written into the body sent to this deployment.
    pub(crate) model: String,
    /// The same, ready for the `x-collie-model` response header.
    pub(crate) model_header: HeaderValue,
    pub(crate) host: HeaderValue,
    pub(crate) path_prefix: String,
    /// Header carrying the provider key, marked sensitive so HPACK never
    /// indexes it. `None` for deployments that take no key.
    pub(crate) auth: Option<(HeaderName, HeaderValue)>,
    /// Finds the provider key in what the deployment sends back.
    pub(crate) key_mask: Option<crate::redact::KeyMask>,
    pub(crate) timeouts: Timeouts,
    pub(crate) price: Option<Price>,
    /// Until when (see [`now_ms`]) the provider asked us to stay away; 0 = open.
    blocked_until_ms: AtomicU64,
    /// The provider's per-minute limits for this key, as configured.
    limits: (Option<u64>, Option<u64>),
    pub(crate) limiter: Option<Arc<ProviderLimiter>>,
    /// Probes, live outcomes and the breaker; kept across reloads.
    pub(crate) health: Arc<DeploymentHealth>,
}

impl Deployment {
    /// The endpoint to connect to now.
    pub(crate) fn peer(&self) -> Arc<HttpPeer> {
        self.peer.load_full()
    }

    /// Resolve the host name again and move to a new address when the old
    /// one is no longer among the answers (a provider behind a CDN changes
    /// addresses; pinning the first answer forever would fail every connect
    /// after such a change). Connections pooled to the old address are left
    /// to their idle timeout. Returns the new address when it changed.
    pub(crate) async fn refresh_address(&self) -> Result<Option<SocketAddr>, DnsError> {
        let Some((host, port)) = &self.dns_name else {
            return Ok(None);
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
            .await
            .map_err(|source| DnsError::Lookup {
                host: host.clone(),
                source,
            })?
            .collect();
        if addrs.is_empty() {
            return Err(DnsError::NoAddress { host: host.clone() });
        }
        let current = self.peer.load();
        let unresolved = self.unresolved.load(Ordering::Acquire);
        let known = (!unresolved).then(|| current._address.as_inet()).flatten();
        let Some(next) = moved_address(known, &addrs) else {
            return Ok(None);
        };
        let mut peer = HttpPeer::clone(&current);
        peer._address = pingora::protocols::l4::socket::SocketAddr::Inet(next);
        self.peer.store(Arc::new(peer));
        self.unresolved.store(false, Ordering::Release);
        Ok(Some(next))
    }

    /// Whether the deployment has an address to connect to; the error names
    /// the host that did not resolve.
    pub(crate) fn resolved(&self) -> Result<(), String> {
        match (&self.dns_name, self.unresolved.load(Ordering::Acquire)) {
            (Some((host, _)), true) => Err(format!("{host} does not resolve")),
            _ => Ok(()),
        }
    }

    /// Remember a provider's `Retry-After`; a later, longer one wins.
    pub(crate) fn block_for(&self, wait: Duration) {
        let until = now_ms().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        self.blocked_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// Milliseconds left before this deployment may be tried again.
    pub(crate) fn blocked_for_ms(&self, now: u64) -> Option<u64> {
        let until = self.blocked_until_ms.load(Ordering::Relaxed);
        (until > now).then(|| until - now)
    }

    fn price_per_token(&self) -> u64 {
        self.price.map_or(u64::MAX, |p| {
            p.input_pico_per_token
                .saturating_add(p.output_pico_per_token)
        })
    }
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The auth header is deliberately left out.
        f.debug_struct("Deployment")
            .field("id", &self.id)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

pub(crate) struct PoolRuntime {
    pub(crate) id: String,
    members: Vec<usize>,
    /// Each member's weight, in `members` order.
    weights: Vec<u32>,
    lb: LoadBalancer<RoundRobin>,
    pub(crate) policy: Policy,
    pub(crate) retries: u32,
    /// Concurrency budget and priority queue; kept across reloads.
    pub(crate) gate: Arc<PoolGate>,
    picks: AtomicU64,
}

/// What a pool offers for the next attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pick {
    /// A deployment, and whether it is the half-open breaker's single trial.
    Deployment { index: DeploymentIx, trial: bool },
    /// Every untried member is waiting out a provider's `Retry-After` (or
    /// its own per-minute limit); the shortest wait.
    Blocked { retry_in_ms: u64 },
    /// Every untried member is unhealthy (breaker open, trial taken); the
    /// shortest wait until one may be tried.
    Unhealthy { retry_in_ms: u64 },
    /// Every member was already tried for this request.
    Exhausted,
}

/// Whether a selection takes what it chooses (a request: provider-limit
/// tokens, the half-open trial, a round-robin turn) or only looks (the
/// status view; the checks before queueing and before a backoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Take,
    Peek,
}

impl PoolRuntime {
    /// The pool's first member (what a fallback is counted from when the
    /// pool had nothing to offer).
    pub(crate) fn first_member(&self) -> Option<DeploymentIx> {
        self.member_ixs().next()
    }

    /// The pool's members, in the config's order.
    pub(crate) fn member_ixs(&self) -> impl Iterator<Item = DeploymentIx> + '_ {
        self.members.iter().map(|&i| DeploymentIx(i))
    }

    /// Choose a member not yet tried: healthy ones first, then degraded,
    /// then unknown (not preferred until proven), by the pool's policy; else
    /// the single trial of a half-open breaker. The member's provider limits
    /// must take one request of `tokens` (taken on success; see [`Lease`]).
    pub(crate) fn pick(
        &self,
        deployments: &[Arc<Deployment>],
        tried: &[DeploymentIx],
        now: u64,
        tokens: u64,
    ) -> Pick {
        self.select(deployments, tried, now, tokens, Mode::Take)
    }

    /// What [`Self::pick`] would offer now, by the same rules, taking
    /// nothing. Where `pick` goes by weighted round robin, this names the
    /// heaviest candidate instead: the round robin's next turn is not a
    /// recommendation.
    pub(crate) fn peek(
        &self,
        deployments: &[Arc<Deployment>],
        tried: &[DeploymentIx],
        now: u64,
        tokens: u64,
    ) -> Pick {
        self.select(deployments, tried, now, tokens, Mode::Peek)
    }

    fn select(
        &self,
        deployments: &[Arc<Deployment>],
        tried: &[DeploymentIx],
        now: u64,
        tokens: u64,
        mode: Mode,
    ) -> Pick {
        let get = |i: usize| {
            deployments
                .get(i)
                .filter(|_| !tried.contains(&DeploymentIx(i)))
        };
        let limited_wait = std::cell::Cell::new(None::<u64>);
        let note_wait =
            |ms: u64| limited_wait.set(Some(limited_wait.get().map_or(ms, |w| w.min(ms))));
        let fits = |u: &Deployment| {
            let answer = match (u.limiter.as_ref(), mode) {
                (None, _) => Ok(()),
                (Some(l), Mode::Take) => l.try_take(tokens),
                (Some(l), Mode::Peek) => l.check(tokens),
            };
            match answer {
                Ok(()) => true,
                Err(wait) => {
                    note_wait(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1));
                    false
                }
            }
        };
        // On the stack for pools of up to eight members; one clock read.
        let at = std::time::Instant::now();
        let states: smallvec::SmallVec<[(usize, Option<HealthState>); 8]> = self
            .members
            .iter()
            .map(|&i| {
                let s = get(i)
                    .filter(|u| u.blocked_for_ms(now).is_none())
                    .map(|u| u.health.state_at(at));
                (i, s)
            })
            .collect();
        for tier in 0..=2u8 {
            let eligible = |i: usize| {
                states
                    .iter()
                    .any(|&(m, s)| m == i && s.is_some_and(|s| s.tier() == tier))
            };
            if !states
                .iter()
                .any(|&(_, s)| s.is_some_and(|s| s.tier() == tier))
            {
                continue;
            }
            if let Some(i) = self.choose(deployments, &eligible, &fits, mode) {
                return Pick::Deployment {
                    index: DeploymentIx(i),
                    trial: false,
                };
            }
        }
        // Nothing healthy enough: a half-open breaker's one trial, if free.
        for &(i, s) in &states {
            if s != Some(HealthState::Unhealthy) {
                continue;
            }
            let Some(u) = get(i) else { continue };
            match mode {
                Mode::Take => {
                    if u.health.admit().is_ok() {
                        if fits(u) {
                            return Pick::Deployment {
                                index: DeploymentIx(i),
                                trial: true,
                            };
                        }
                        u.health.release_trial();
                    }
                }
                Mode::Peek => {
                    if u.health.would_admit().is_ok() && fits(u) {
                        return Pick::Deployment {
                            index: DeploymentIx(i),
                            trial: true,
                        };
                    }
                }
            }
        }
        let blocked = self
            .members
            .iter()
            .filter_map(|&i| get(i).and_then(|u| u.blocked_for_ms(now)))
            .chain(limited_wait.get())
            .min();
        if let Some(retry_in_ms) = blocked {
            return Pick::Blocked { retry_in_ms };
        }
        let unhealthy = self
            .members
            .iter()
            .filter_map(|&i| get(i))
            .map(|u| match u.health.would_admit() {
                Err(wait) => u64::try_from(wait.unwrap_or_default().as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
                // Became admissible since the states were read.
                Ok(_) => 1,
            })
            .min();
        match unhealthy {
            Some(retry_in_ms) => Pick::Unhealthy { retry_in_ms },
            None => Pick::Exhausted,
        }
    }

    fn weight_of(&self, index: usize) -> u32 {
        self.members
            .iter()
            .position(|&m| m == index)
            .and_then(|p| self.weights.get(p))
            .copied()
            .unwrap_or(1)
    }

    /// One eligible member by the pool's policy, whose limits take the request.
    fn choose(
        &self,
        deployments: &[Arc<Deployment>],
        eligible: &dyn Fn(usize) -> bool,
        fits: &dyn Fn(&Deployment) -> bool,
        mode: Mode,
    ) -> Option<usize> {
        let n = match mode {
            Mode::Take => self.picks.fetch_add(1, Ordering::Relaxed),
            Mode::Peek => self.picks.load(Ordering::Relaxed),
        };
        let ranked = |key: &dyn Fn(&Deployment) -> (u64, u64)| {
            let mut c: smallvec::SmallVec<[&Arc<Deployment>; 8]> = self
                .members
                .iter()
                .filter(|&&i| eligible(i))
                .filter_map(|&i| deployments.get(i))
                .collect();
            // Stable: equal keys keep the pool's member order.
            c.sort_by_key(|u| key(u));
            c.into_iter().find(|u| fits(u)).map(|u| u.index.0)
        };
        let heaviest = |u: &Deployment| (u64::from(u32::MAX - self.weight_of(u.index.0)), 0);
        match (self.policy, mode) {
            (Policy::LeastLatency, Mode::Peek) => {
                return ranked(&|u| {
                    let (class, micros) = u.health.latency_rank();
                    (u64::from(class), micros)
                });
            }
            (Policy::LeastLatency, Mode::Take) if n % 20 != 19 => {
                return ranked(&|u| {
                    let (class, micros) = u.health.latency_rank();
                    (u64::from(class), micros)
                });
            }
            (Policy::Cost, _) => {
                return ranked(&|u| {
                    (
                        u.price_per_token(),
                        u64::from(u32::MAX - self.weight_of(u.index.0)),
                    )
                });
            }
            (_, Mode::Peek) => return ranked(&heaviest),
            _ => {}
        }
        // The weighted round robin's choice, if it will do.
        let first = self.lb.select_with(b"", 1, |b, _registry_view| {
            // The registry's view lags; `DeploymentHealth` is authoritative.
            b.ext
                .get::<usize>()
                .is_some_and(|&i| eligible(i) && deployments.get(i).is_some_and(|u| fits(u)))
        });
        if let Some(&i) = first.as_ref().and_then(|b| b.ext.get::<usize>()) {
            return Some(i);
        }
        // Else every member once, from a rotating start: the round robin's
        // own fallback walks a counter shared with concurrent requests and
        // may skip the one member that would do.
        let len = self.members.len();
        let start = usize::try_from(n).unwrap_or(0) % len.max(1);
        (0..len)
            .map(|k| self.members[(start + k) % len])
            .find(|&i| eligible(i) && deployments.get(i).is_some_and(|u| fits(u)))
    }
}

/// A deployment picked for one attempt, until the attempt's outcome is
/// known. Dropped without one — an early return, the request deadline
/// cutting the attempt — it gives back what [`PoolRuntime::pick`] took: the
/// half-open breaker's trial slot, and the provider-limit tokens unless an
/// attempt record carries them to settlement. So no path leaks either.
pub(crate) struct Lease {
    upstream: Arc<Deployment>,
    trial: bool,
    tokens: u64,
    /// The tokens are on an attempt record and settle with the request.
    tokens_recorded: bool,
    finished: bool,
}

impl Lease {
    pub(crate) fn new(upstream: Arc<Deployment>, trial: bool, tokens: u64) -> Lease {
        Lease {
            upstream,
            trial,
            tokens,
            tokens_recorded: false,
            finished: false,
        }
    }

    pub(crate) fn upstream(&self) -> &Arc<Deployment> {
        &self.upstream
    }

    pub(crate) fn trial(&self) -> bool {
        self.trial
    }

    /// An attempt record now holds the provider-limit tokens.
    pub(crate) fn recorded(&mut self) {
        self.tokens_recorded = true;
    }

    /// Account the attempt's outcome to the deployment's health, which
    /// frees a trial slot whatever the outcome.
    pub(crate) fn finish(mut self, outcome: health::Outcome) {
        self.finished = true;
        self.upstream.health.record(outcome);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.finished && self.trial {
            self.upstream.health.release_trial();
        }
        if !self.tokens_recorded {
            if let Some(l) = &self.upstream.limiter {
                // The request itself stays counted: it was let through.
                l.settle_tokens(self.tokens, 0);
            }
        }
    }
}

/// Why a router could not be built from a validated config. Validation
/// refuses everything a config can get wrong here, so each of these is a
/// fault of Collie's own, not of the file.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// More deployments than the 16-bit identities routing gives them.
    #[error("more deployments than routing can number")]
    TooManyDeployments,
    /// A deployment's load-balancing backend could not be made.
    #[error("deployment {deployment}: no load-balancing backend: {source}")]
    Backend {
        /// The deployment's id.
        deployment: String,
        /// Pingora's error.
        source: pingora::BError,
    },
    /// A pool's load balancer could not take its backends.
    #[error("pool {pool}: load balancer not updated: {source}")]
    Pool {
        /// The pool's id.
        pool: String,
        /// Pingora's error.
        source: pingora::BError,
    },
}

/// Everything routing needs for one snapshot of the config.
pub(crate) struct Router {
    pub(crate) pools: Vec<PoolRuntime>,
    pub(crate) deployments: Vec<Arc<Deployment>>,
}

impl Router {
    /// Build from a validated config. Provider state (`Retry-After` blocks,
    /// provider limits, health, queues) of deployments and pools that keep
    /// their id is carried over from `previous` and `book`.
    pub(crate) fn build(
        config: &Config,
        previous: Option<&Router>,
        book: &HealthBook,
    ) -> Result<Router, BuildError> {
        let mut deployments = Vec::with_capacity(config.deployments.len());
        // Applied only if the whole router builds: a rejected reload changes
        // nothing.
        let mut limiter_changes = Vec::new();
        let mut gate_changes = Vec::new();
        for (index, d) in config.deployments.iter().enumerate() {
            let mut u = build_deployment(config, index, book);
            if let Some(old) = previous.and_then(|p| p.deployment_by_id(&d.id)) {
                u.blocked_until_ms.store(
                    old.blocked_until_ms.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                // The key's limiter lives on, its limits changed in
                // place (once the whole router is built): what it
                // counted this minute stays counted.
                if let (Some(l), true) = (&old.limiter, u.limiter.is_some()) {
                    u.limiter = Some(Arc::clone(l));
                    if old.limits != u.limits {
                        limiter_changes.push((Arc::clone(l), u.limits));
                    }
                }
            }
            deployments.push(Arc::new(u));
        }
        let mut pools = Vec::with_capacity(config.pools.len());
        for p in &config.pools {
            let mut set = BTreeSet::new();
            for m in &p.members {
                let id = config
                    .deployment(m.deployment)
                    .map_or("?", |d| d.id.as_str());
                set.insert(identity_backend(m.deployment.0, id, m.weight)?);
            }
            let backends =
                Backends::new_with_health_registry(Static::new(set), Arc::clone(&book.registry));
            let lb = LoadBalancer::<RoundRobin>::from_backends(backends);
            // A static discovery never blocks, so this completes at once.
            futures::executor::block_on(lb.update()).map_err(|source| BuildError::Pool {
                pool: p.id.clone(),
                source,
            })?;
            // The gate (with the requests in flight and queued at it)
            // survives a reload; a changed budget is changed in place.
            let gate = match previous.and_then(|r| r.pools.iter().find(|o| o.id == p.id)) {
                Some(o) => {
                    gate_changes.push((
                        Arc::clone(&o.gate),
                        p.max_concurrency,
                        p.adaptive_concurrency,
                    ));
                    Arc::clone(&o.gate)
                }
                None => Arc::new(PoolGate::new(p.max_concurrency, p.adaptive_concurrency)),
            };
            pools.push(PoolRuntime {
                id: p.id.clone(),
                members: p.members.iter().map(|m| m.deployment.0).collect(),
                weights: p.members.iter().map(|m| m.weight).collect(),
                lb,
                policy: p.policy,
                retries: p.retries,
                gate,
                picks: AtomicU64::new(0),
            });
        }
        for (limiter, (rpm, tpm)) in limiter_changes {
            limiter.reconfigure(rpm, tpm);
        }
        for (gate, ceiling, adaptive) in gate_changes {
            gate.reconfigure(ceiling, adaptive);
        }
        // Only once nothing can fail: a config that is refused must not
        // move the probes or drop the running deployments' series.
        book.retarget(&deployments, &|i| {
            pools.iter().any(|p| p.members.contains(&i))
        });
        Ok(Router { pools, deployments })
    }

    pub(crate) fn deployment_by_id(&self, id: &str) -> Option<&Arc<Deployment>> {
        self.deployments.iter().find(|u| u.id == id)
    }

    /// A deployment by its index.
    pub(crate) fn deployment(&self, d: DeploymentIx) -> Option<&Arc<Deployment>> {
        self.deployments.get(d.0)
    }

    /// A pool by its index.
    pub(crate) fn pool(&self, p: PoolIx) -> Option<&PoolRuntime> {
        self.pools.get(p.0)
    }
}

/// `pingora-load-balancing` identifies a backend by (address, weight), so two
/// deployments on one endpoint (two keys for the same provider) would collapse
/// into one. Each deployment therefore gets a synthetic identity address; the
/// real peer lives in [`Deployment`], found through `ext`.
fn identity_backend(index: usize, id: &str, weight: u32) -> Result<Backend, BuildError> {
    // Validation allows at most `u16::MAX` deployments.
    let port = u16::try_from(index + 1).map_err(|_| BuildError::TooManyDeployments)?;
    let mut b = Backend::new_with_weight(&format!("0.0.0.0:{port}"), weight as usize).map_err(
        |source| BuildError::Backend {
            deployment: id.to_string(),
            source,
        },
    )?;
    b.ext.insert(index);
    // Probes find the deployment by id, which survives reloads.
    b.ext.insert(DeploymentKey(Arc::from(id)));
    Ok(b)
}

/// The address to move to, if the current one is no longer answered.
fn moved_address(current: Option<&SocketAddr>, answers: &[SocketAddr]) -> Option<SocketAddr> {
    match current {
        Some(c) if answers.contains(c) => None,
        _ => answers.first().copied(),
    }
}

/// How often deployments' host names are resolved again.
pub(crate) const DNS_REFRESH: Duration = Duration::from_secs(30);

/// Why a deployment's host name gave no address.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DnsError {
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
}

/// Blocking: the caller is at start, or a reload off the async workers.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, DnsError> {
    (host, port)
        .to_socket_addrs()
        .map_err(|source| DnsError::Lookup {
            host: host.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| DnsError::NoAddress {
            host: host.to_string(),
        })
}

/// A deployment ready to be called. Nothing here can fail on a validated
/// config: a host that does not resolve is retried in the background.
fn build_deployment(config: &Config, index: usize, book: &HealthBook) -> Deployment {
    let d = &config.deployments[index];
    let url = &d.base_url;
    let dns_name = url
        .host
        .parse::<std::net::IpAddr>()
        .is_err()
        .then(|| (url.host.clone(), url.port));
    // A host that does not resolve now (DNS down at start, a name not yet
    // published) does not stop the gateway: the deployment fails over like
    // a refused connection until the background refresh resolves it.
    let (addr, unresolved) = match resolve(&url.host, url.port) {
        Ok(addr) => (addr, false),
        Err(e) => {
            log::warn!(
                "deployment {}: {e}; retried every {}s, requests fail over meanwhile",
                d.id,
                DNS_REFRESH.as_secs()
            );
            // TEST-NET-1 (RFC 5737): a placeholder that is never dialled.
            (SocketAddr::from(([192, 0, 2, 1], url.port)), true)
        }
    };
    let mut peer = HttpPeer::new(addr, url.tls, url.host.clone());
    let o = &mut peer.options;
    o.connection_timeout = Some(d.timeouts.connect);
    // TCP connect plus the TLS handshake.
    o.total_connection_timeout = Some(d.timeouts.connect * 2);
    o.idle_timeout = Some(Duration::from_secs(60));
    o.alpn = if d.http2 { ALPN::H2H1 } else { ALPN::H1 };
    o.verify_cert = true;
    o.verify_hostname = true;
    let ca = d.ca.as_ref().or(config.upstream_ca.as_ref());
    if let (true, Some(ca)) = (url.tls, ca) {
        o.ca = Some(Arc::clone(&ca.certs));
    }
    Deployment {
        index: DeploymentIx(index),
        id: d.id.clone(),
        peer: ArcSwap::from_pointee(peer),
        dns_name,
        unresolved: AtomicBool::new(unresolved),
        model: d.model.clone(),
        model_header: d.model_header.clone(),
        host: url.host_header.clone(),
        path_prefix: url.path_prefix.clone(),
        auth: d.auth_header.clone(),
        key_mask: d
            .api_key
            .as_ref()
            .and_then(|k| crate::redact::KeyMask::new(k.expose().as_bytes())),
        timeouts: d.timeouts,
        price: config.pricing.get(&d.model).copied(),
        blocked_until_ms: AtomicU64::new(0),
        limits: (d.rpm, d.tpm),
        limiter: if config.fleet.is_some() {
            ProviderLimiter::new_shared(d.rpm, d.tpm)
        } else {
            ProviderLimiter::new(d.rpm, d.tpm)
        }
        .map(Arc::new),
        health: book.health(&d.id, d.health),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ixs(i: &[usize]) -> Vec<DeploymentIx> {
        i.iter().map(|&i| DeploymentIx(i)).collect()
    }

    #[test]
    fn an_address_is_kept_while_dns_still_answers_it() {
        let a: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:443".parse().unwrap();
        assert_eq!(moved_address(Some(&a), &[b, a]), None);
        assert_eq!(moved_address(Some(&a), &[b]), Some(b));
        assert_eq!(moved_address(None, &[b]), Some(b));
    }

    #[tokio::test]
    async fn a_deployment_named_by_host_is_resolved_again() {
        let text = "models:\n  - {name: m, fallback: [p]}\npools:\n  - {id: p, deployments: [{deployment: d}]}\ndeployments:\n  - {id: d, base_url: \"http://localhost:10000/v1\", model: m}\n";
        let c = Config::from_yaml(text, &|_| None).unwrap();
        let router = Router::build(&c, None, &book()).unwrap();
        let up = &router.deployments[0];
        // Point it somewhere DNS will not answer for `localhost`.
        let mut stale = HttpPeer::clone(&up.peer());
        stale._address =
            pingora::protocols::l4::socket::SocketAddr::Inet("192.0.2.7:80".parse().unwrap());
        up.peer.store(Arc::new(stale));
        let moved = up.refresh_address().await.unwrap().unwrap();
        assert!(moved.ip().is_loopback());
        assert_eq!(up.peer()._address.as_inet(), Some(&moved));
        assert_eq!(
            up.refresh_address().await.unwrap(),
            None,
            "stable once moved"
        );
    }

    #[test]
    fn peers_take_the_ca_certificates_validation_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, params.self_signed(&key).unwrap().pem()).unwrap();
        let text = format!(
            "upstream_tls: {{ca_file: \"{}\"}}\nmodels:\n  - {{name: m, fallback: [p]}}\npools:\n  - {{id: p, deployments: [{{deployment: d}}]}}\ndeployments:\n  - {{id: d, base_url: \"https://127.0.0.1:9/v1\", model: m}}\n",
            file.display()
        );
        let c = Config::from_yaml(&text, &|_| None).unwrap();
        // Nothing reads the file after validation.
        std::fs::remove_file(&file).unwrap();
        let r = Router::build(&c, None, &book()).unwrap();
        let ca = r.deployments[0].peer().options.ca.clone().unwrap();
        assert_eq!(ca.len(), 1);
    }

    fn book() -> Arc<HealthBook> {
        HealthBook::new(
            health::HealthMetrics::new(&prometheus::Registry::new()).unwrap(),
            8,
        )
    }

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
        let r = Router::build(&config(&[3, 1]), None, &book()).unwrap();
        let mut counts = [0usize; 2];
        for _ in 0..400 {
            match r.pools[0].pick(&r.deployments, &[], now_ms(), 1) {
                Pick::Deployment { index, .. } => counts[index.0] += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn skips_tried_and_blocked_members() {
        let r = Router::build(&config(&[1, 1, 1]), None, &book()).unwrap();
        let now = now_ms();
        r.deployments[1].block_for(Duration::from_secs(30));
        for _ in 0..20 {
            assert_eq!(
                r.pools[0].pick(&r.deployments, &ixs(&[0]), now, 1),
                Pick::Deployment {
                    index: DeploymentIx(2),
                    trial: false
                }
            );
        }
        match r.pools[0].pick(&r.deployments, &ixs(&[0, 2]), now, 1) {
            Pick::Blocked { retry_in_ms } => assert!(retry_in_ms > 29_000 && retry_in_ms <= 30_000),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            r.pools[0].pick(&r.deployments, &ixs(&[0, 1, 2]), now, 1),
            Pick::Exhausted
        );
    }

    #[test]
    fn same_endpoint_twice_stays_two_deployments() {
        let text = "models:\n  - {name: m, fallback: [p]}\npools:\n  - id: p\n    deployments: [{deployment: a}, {deployment: b}]\ndeployments:\n  - {id: a, base_url: \"http://127.0.0.1:9/v1\", model: m}\n  - {id: b, base_url: \"http://127.0.0.1:9/v1\", model: m}\n";
        let c = Config::from_yaml(text, &|_| None).unwrap();
        let r = Router::build(&c, None, &book()).unwrap();
        let mut seen = BTreeSet::new();
        for _ in 0..4 {
            if let Pick::Deployment { index, .. } =
                r.pools[0].pick(&r.deployments, &[], now_ms(), 1)
            {
                seen.insert(index);
            }
        }
        assert_eq!(seen.len(), 2);
    }

    /// Under concurrent picks, a pool whose one remaining member is
    /// eligible always offers it: the fallback after the round robin's
    /// choice visits every member, whatever other requests do meanwhile.
    #[test]
    fn concurrent_picks_always_find_the_one_eligible_member() {
        let r = Arc::new(Router::build(&config(&[1, 1, 1, 1, 1, 1, 1]), None, &book()).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let r = Arc::clone(&r);
                std::thread::spawn(move || {
                    let tried = ixs(&[0, 1, 2, 3, 4, 5]);
                    (0..20_000)
                        .filter(|_| {
                            r.pools[0].pick(&r.deployments, &tried, now_ms(), 1)
                                != Pick::Deployment {
                                    index: DeploymentIx(6),
                                    trial: false,
                                }
                        })
                        .count()
                })
            })
            .collect();
        let misses: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(misses, 0, "picks that missed the eligible member");
    }

    #[test]
    fn peek_takes_nothing_and_names_the_heaviest() {
        let r = Router::build(&config(&[1, 3, 2]), None, &book()).unwrap();
        for _ in 0..5 {
            assert_eq!(
                r.pools[0].peek(&r.deployments, &[], now_ms(), 1),
                Pick::Deployment {
                    index: DeploymentIx(1),
                    trial: false
                }
            );
        }
        // The round robin was not moved: a full cycle is still exact.
        let mut counts = [0usize; 3];
        for _ in 0..6 {
            if let Pick::Deployment { index, .. } =
                r.pools[0].pick(&r.deployments, &[], now_ms(), 1)
            {
                counts[index.0] += 1;
            }
        }
        assert_eq!(counts, [1, 3, 2]);
    }

    #[test]
    fn a_dropped_lease_gives_back_the_trial() {
        let r = Router::build(&config(&[1]), None, &book()).unwrap();
        let h = &r.deployments[0].health;
        h.set_settings(health::HealthSettings {
            probe: health::ProbeKind::Off,
            failures_to_open: 1,
            cooldown: Duration::from_millis(1),
            ..health::HealthSettings::default()
        });
        h.record(health::Outcome::Failure);
        std::thread::sleep(Duration::from_millis(5));
        let Pick::Deployment { index, trial: true } =
            r.pools[0].pick(&r.deployments, &[], now_ms(), 1)
        else {
            panic!("expected the trial");
        };
        let lease = Lease::new(Arc::clone(&r.deployments[index.0]), true, 1);
        assert!(h.would_admit().is_err(), "the trial is taken");
        drop(lease);
        assert!(h.would_admit().is_ok(), "and given back");
    }

    #[test]
    fn reload_keeps_retry_after_blocks() {
        let c = config(&[1]);
        let b = book();
        let old = Router::build(&c, None, &b).unwrap();
        old.deployments[0].block_for(Duration::from_secs(60));
        let new = Router::build(&c, Some(&old), &b).unwrap();
        assert!(new.deployments[0].blocked_for_ms(now_ms()).is_some());
    }
}
