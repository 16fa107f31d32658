//! Fleet mode: the sidecars of one application share their tenants' limits
//! through Redis, the authority, without a round trip per request.
//!
//! Each sidecar's ledger admits locally against its *share*: for a day or
//! month budget, a lease carved out of what the fleet has not used or
//! leased (so reservations never take a budget past its limit); for a
//! per-minute rate, a part of the rate (the shares committed never add up
//! to more than it). Once per `lease.interval` a sidecar reports what it
//! used in the window (a running total: the authority counts only what goes
//! beyond the total it counted, so a call repeated after a lost answer
//! counts nothing twice) and asks for what its recent demand wants
//! (`lease.lua`, one atomic step per tenant). A sidecar that runs out asks
//! at once (a top-up), waiting at most `lease.top_up_wait`. A lease lives
//! `lease.ttl`: one not refreshed by then (a sidecar killed, cut off) is
//! counted as used by the authority, and given up by the sidecar.
//!
//! When Redis does not answer (every call has a deadline), `local` keeps
//! admitting from the leases and then from `limit / expected_replicas` of
//! what was free at the last answer; `closed` admits from the leases while
//! they last and refuses the rest (503 `quota_unavailable`). The use
//! counted while Redis was away is reported when it answers again.

use super::{Amount, Budget, Calendar, Limits, Rate, ScopeUse, Share, TenantLedger, TopUp};
use crate::config::{FleetSettings, RedisDown};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

const SCRIPT: &str = include_str!("fleet/lease.lua");
const HOLDS: &str = include_str!("fleet/holds.lua");

/// Lua numbers are doubles: figures above 2^53 are sent as 2^53.
const MAX_FIGURE: u64 = 1 << 53;

/// How many demand intervals a budget lease is sized for.
const LEASE_INTERVALS: u64 = 4;

/// Top-ups waiting for the fleet service, at most.
const TOP_UP_QUEUE: usize = 1024;

/// Why a call to the authority failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FleetError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis answered {0} figures, expected {1}")]
    Shape(usize, usize),
    #[error("redis did not answer the last call")]
    Down,
}

/// One tenant's request for more, queued for the fleet service.
pub(crate) struct TopUpRequest {
    ledger: Arc<TenantLedger>,
    /// The scopes the refused request touches: the tenant's, and the
    /// model's when it has one.
    model: String,
    amount: Amount,
    reply: oneshot::Sender<Verdict>,
}

/// A provider key's limits and demand, for [`Fleet::sync_providers`].
#[derive(Debug, Clone)]
pub(crate) struct ProviderAsk {
    /// The deployment that holds the key (its id names it in Redis).
    pub(crate) deployment: String,
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    /// Asked since the last call.
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
}

/// A sidecar's share of a provider key's rates: (held, of it new to this
/// sidecar) per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProviderShare {
    pub(crate) rpm: Option<(u64, u64)>,
    pub(crate) tpm: Option<(u64, u64)>,
}

/// Top-ups of one tenant and model, answered by one call.
struct Batch {
    ledger: Arc<TenantLedger>,
    model: String,
    amount: Amount,
    replies: Vec<oneshot::Sender<Verdict>>,
}

/// What a call gave a top-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The shares cover what was asked (or it was a rate: ask the ledger).
    Grown,
    /// Not yet: other sidecars hold leases they may give back at their
    /// next refresh.
    Later,
    /// The fleet has no more.
    Spent,
    /// Redis did not answer and the fleet is `closed`.
    Unavailable,
}

/// Counters and gauges of the fleet protocol, per sidecar (Prometheus
/// adds them up across the fleet).
pub(crate) struct FleetMetrics {
    redis_up: IntGauge,
    calls: IntCounterVec,
    top_ups: IntCounterVec,
    /// Per tenant, model scope and window: the lease this sidecar holds.
    lease: prometheus::GaugeVec,
    /// Per tenant, model scope and window: the fleet's use, as the
    /// authority last said.
    fleet_used: prometheus::GaugeVec,
    /// The most this sidecar may admit beyond the fleet's limit.
    overshoot: prometheus::GaugeVec,
}

const LABELS: &[&str] = &["tenant", "model", "window"];

impl FleetMetrics {
    fn new(registry: &Registry) -> prometheus::Result<FleetMetrics> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<prometheus::GaugeVec> {
            let g = prometheus::GaugeVec::new(Opts::new(name, help), LABELS)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &["result"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let redis_up = IntGauge::new(
            "collie_fleet_redis_up",
            "1 while the fleet's Redis answered the last call in time",
        )?;
        registry.register(Box::new(redis_up.clone()))?;
        Ok(FleetMetrics {
            redis_up,
            calls: counter(
                "collie_fleet_redis_calls_total",
                "Lease calls to the fleet's Redis by result (ok, error, timeout)",
            )?,
            top_ups: counter(
                "collie_fleet_top_ups_total",
                "Requests that found this sidecar's share spent and asked the fleet for more, by result (grown, spent, unavailable)",
            )?,
            lease: gauge(
                "collie_fleet_lease",
                "Lease this sidecar holds, per tenant, model scope (empty: tenant-wide) and window (per-minute windows: the rate held)",
            )?,
            fleet_used: gauge(
                "collie_fleet_used",
                "Fleet figure: what every sidecar used in a day or month window, as the authority last said",
            )?,
            overshoot: gauge(
                "collie_fleet_overshoot_bound",
                "The most this sidecar may admit beyond the fleet's limit in a window (0 while Redis answers; the fallback allowance under on_redis_down: local). Add across sidecars for the fleet's bound",
            )?,
        })
    }

    fn call(&self, result: &str) {
        self.calls.with_label_values(&[result]).inc();
        self.redis_up.set(i64::from(result == "ok"));
    }
}

/// What the last answer said of one budget window of one scope.
#[derive(Debug, Clone, Copy, Default)]
struct BudgetFigures {
    /// The calendar window it was for.
    window: i64,
    lease: Amount,
    used: Amount,
    leased_by_all: Amount,
}

/// One scope's state between calls.
#[derive(Debug, Clone, Default)]
struct ScopeSync {
    /// Use already reported, per calendar window (day, month).
    reported_day: (i64, Amount),
    reported_month: (i64, Amount),
    day: Option<BudgetFigures>,
    month: Option<BudgetFigures>,
    /// The per-minute rates held (requests, tokens) after the last answer.
    held: [u64; 2],
}

/// One tenant's state between calls.
#[derive(Debug, Default)]
struct TenantSync {
    scopes: HashMap<Option<String>, ScopeSync>,
    /// The leases end here (the start of the last call that answered, plus
    /// the ttl); `None` before the first answer.
    valid_until: Option<Instant>,
    /// Redis did not answer the last call.
    down: bool,
    /// When the demand was last taken: demand is scaled to one interval,
    /// however long since (a top-up takes it early).
    last_take: Option<Instant>,
}

/// A sidecar's side of the fleet protocol.
pub(crate) struct Fleet {
    settings: FleetSettings,
    /// This sidecar's name at the authority (random per process: a
    /// restarted sidecar is a new one, and its old leases expire).
    sid: String,
    script: redis::Script,
    holds: redis::Script,
    client: redis::Client,
    /// Made on first use, on the fleet service's runtime (it runs a task).
    conn: Mutex<Option<ConnectionManager>>,
    top_ups: mpsc::Sender<TopUpRequest>,
    inbox: Mutex<Option<mpsc::Receiver<TopUpRequest>>>,
    tenants: Mutex<HashMap<String, TenantSync>>,
    /// Per rate key, the wants of the last intervals (newest last): a
    /// share is asked for by the most of them, so a sidecar whose demand
    /// pauses for an interval does not give its share up and wait a
    /// cool-down to have it back.
    wants: Mutex<HashMap<String, std::collections::VecDeque<u64>>>,
    metrics: FleetMetrics,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("sid", &self.sid)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A name safe inside a Redis key: `%`, `:`, braces and anything not
/// visible ASCII are %-escaped, so two names never map to one key.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_graphic() && !matches!(b, b'%' | b':' | b'{' | b'}') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn figure(n: u64) -> u64 {
    n.min(MAX_FIGURE)
}

/// A configured dimension as the script reads it: -1 for unlimited.
fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(figure(l)).unwrap_or(i64::MAX))
}

fn dims(a: Amount) -> [u64; 3] {
    [a.requests, a.tokens, a.usd_nano]
}

fn budget_dims(b: &Budget) -> [Option<u64>; 3] {
    [b.requests, b.tokens, b.usd_nano]
}

fn amount(d: [u64; 3]) -> Amount {
    Amount {
        requests: d[0],
        tokens: d[1],
        usd_nano: d[2],
    }
}

fn limited(b: &Budget) -> bool {
    budget_dims(b).iter().any(Option::is_some)
}

/// The running total of use the authority last said it counted in
/// `window` (none in a new window).
fn acked(reported: (i64, Amount), window: i64) -> Amount {
    if reported.0 == window {
        reported.1
    } else {
        Amount::default()
    }
}

/// A budget key's arguments to the script: limit, total (this sidecar's
/// use in the window), acked (the total of its last answered call), want
/// and need, each for requests, tokens and nanodollars.
type BudgetArgs = [i64; 15];
const TOTAL: usize = 3;
const ACKED: usize = 6;
const WANT: usize = 9;
const NEED: usize = 12;

/// How long a bucket of this rate takes to refill: capacity a sidecar gives
/// up is not handed on sooner.
fn cooldown(r: Rate, ttl: Duration) -> u64 {
    let ms = u128::from(r.burst)
        .saturating_mul(60_000)
        .checked_div(u128::from(r.per_minute))
        .unwrap_or(60_000);
    u64::try_from(ms).unwrap_or(u64::MAX).clamp(
        u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        3_600_000,
    )
}

/// A per-minute want from the demand of one interval.
fn per_minute(demand: u64, interval: Duration, extra: u64) -> u64 {
    let ms = u64::try_from(interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    // A quarter more than the demand seen, for growth.
    let rate = u128::from(demand)
        .saturating_mul(75_000)
        .checked_div(u128::from(ms))
        .unwrap_or(0);
    u64::try_from(rate)
        .unwrap_or(u64::MAX)
        .saturating_add(extra)
}

/// One scope's part of a call: its keys and arguments, in order.
struct Plan {
    model: Option<String>,
    configured: Limits,
    usage: ScopeUse,
    day: Option<(String, BudgetArgs, Amount)>,
    month: Option<(String, BudgetArgs, Amount)>,
    rpm: Option<(String, [u64; 3])>,
    tpm: Option<(String, [u64; 3])>,
}

impl Fleet {
    pub(crate) fn new(settings: FleetSettings, registry: &Registry) -> Result<Arc<Fleet>, String> {
        let client = redis::Client::open(settings.redis_url.expose())
            .map_err(|e| format!("fleet.redis_url: {:?}", e.kind()))?;
        let metrics = FleetMetrics::new(registry).map_err(|e| format!("fleet metrics: {e}"))?;
        let (tx, rx) = mpsc::channel(TOP_UP_QUEUE);
        Ok(Arc::new(Fleet {
            sid: format!("{:016x}", rand::random::<u64>()),
            settings,
            script: redis::Script::new(SCRIPT),
            holds: redis::Script::new(HOLDS),
            client,
            conn: Mutex::new(None),
            top_ups: tx,
            inbox: Mutex::new(Some(rx)),
            tenants: Mutex::new(HashMap::new()),
            wants: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    pub(crate) fn settings(&self) -> &FleetSettings {
        &self.settings
    }

    /// The queue of top-ups, for the one service that answers them.
    pub(crate) fn take_inbox(&self) -> Option<mpsc::Receiver<TopUpRequest>> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// What a sidecar asks of a per-minute rate: a quarter more than its
    /// demand, and while it has any, at least its even part of the rate
    /// (rate / expected_replicas), so a limit far above the traffic is not
    /// rationed to the last interval's demand. An idle sidecar asks nothing,
    /// unless `keep` (a provider key's share, which has no top-up).
    fn rate_want(&self, demand: u64, asked: u64, capacity: u64, keep: bool) -> u64 {
        let want = per_minute(demand, self.settings.interval, asked);
        if want == 0 && !keep {
            return 0;
        }
        let even = capacity
            .checked_div(u64::from(self.settings.expected_replicas))
            .unwrap_or(capacity);
        want.max(even).min(capacity)
    }

    /// The want to ask for a rate key: the most of this and the last wants
    /// within a lease's ttl.
    fn sticky(&self, key: &str, want: u64) -> u64 {
        let keep = self
            .settings
            .ttl
            .as_millis()
            .checked_div(self.settings.interval.as_millis())
            .map_or(1, |n| usize::try_from(n).unwrap_or(1).clamp(1, 64));
        let mut wants = self.wants.lock().unwrap_or_else(|e| e.into_inner());
        let ring = wants.entry(key.to_string()).or_default();
        ring.push_back(want);
        while ring.len() > keep {
            ring.pop_front();
        }
        ring.iter().copied().max().unwrap_or(want)
    }

    /// The connection to Redis (it reconnects by itself after a failure).
    fn connection(&self) -> Result<ConnectionManager, FleetError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = conn.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.call_timeout))
            .set_response_timeout(Some(self.settings.call_timeout))
            .set_number_of_retries(1)
            .set_max_delay(self.settings.interval);
        let c = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        *conn = Some(c.clone());
        Ok(c)
    }

    fn tenants(&self) -> MutexGuard<'_, HashMap<String, TenantSync>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, tenant: &str, model: Option<&str>, what: &str) -> String {
        let scope = model.map_or_else(|| "*".to_string(), |m| format!("m={}", escape(m)));
        format!(
            "{}:{}:{}:{}",
            escape(&self.settings.namespace),
            escape(tenant),
            scope,
            what
        )
    }

    /// Report `ledger`'s use, ask for its next shares and apply them.
    /// `extra`: a refused request (model, amount) the shares should cover.
    /// `release`: give every lease back (the sidecar is stopping).
    pub(crate) async fn sync(
        &self,
        ledger: &TenantLedger,
        calendar: &Calendar,
        extra: Option<(&str, Amount)>,
        release: bool,
    ) -> Result<Verdict, FleetError> {
        let uses = ledger.take_use(calendar);
        let plans = self.plan(&ledger.id, uses, extra, release);
        // A tenant with nothing to report, nothing wanted and nothing held
        // costs no call: there is no lease to keep alive.
        if plans.is_empty() || (extra.is_none() && !release && self.idle(&ledger.id, &plans)) {
            return Ok(Verdict::Grown);
        }
        let mut call = self.script.prepare_invoke();
        let (mut nb, mut nr) = (0u32, 0u32);
        for p in &plans {
            for (key, _, _) in [&p.day, &p.month].into_iter().flatten() {
                call.key(key);
                nb = nb.saturating_add(1);
            }
        }
        for p in &plans {
            for (key, _) in [&p.rpm, &p.tpm].into_iter().flatten() {
                call.key(key);
                nr = nr.saturating_add(1);
            }
        }
        let ttl_ms = u64::try_from(self.settings.ttl.as_millis()).unwrap_or(u64::MAX);
        // A budget key outlives its month; a rate key, its last lease's
        // cool-down.
        let rate_key_ttl = (ttl_ms / 1000).saturating_add(3_600);
        call.arg(&self.sid)
            .arg(0)
            .arg(ttl_ms)
            .arg(nb)
            .arg(nr)
            .arg(32 * 86_400)
            .arg(rate_key_ttl);
        for p in &plans {
            for (_, args, _) in [&p.day, &p.month].into_iter().flatten() {
                call.arg(&args[..]);
            }
        }
        for p in &plans {
            for (_, args) in [&p.rpm, &p.tpm].into_iter().flatten() {
                call.arg(&args[..]);
            }
        }
        let started = Instant::now();
        let figures = self.invoke(&call).await?;
        let expected = usize::try_from(nb.saturating_mul(9).saturating_add(nr.saturating_mul(3)))
            .unwrap_or(usize::MAX);
        if figures.len() != expected {
            self.metrics.call("error");
            return Err(FleetError::Shape(figures.len(), expected));
        }
        self.metrics.call("ok");
        Ok(self.apply(ledger, plans, &figures, nb, started))
    }

    fn plan(
        &self,
        tenant: &str,
        uses: Vec<ScopeUse>,
        extra: Option<(&str, Amount)>,
        release: bool,
    ) -> Vec<Plan> {
        let mut tenants = self.tenants();
        let interval = self.settings.interval;
        let elapsed = {
            let t = tenants.entry(tenant.to_string()).or_default();
            let now = Instant::now();
            let elapsed = t
                .last_take
                .map_or(interval, |at| now.saturating_duration_since(at));
            t.last_take = Some(now);
            elapsed.max(interval.checked_div(10).unwrap_or(interval))
        };
        // Demand over `elapsed`, as over one interval.
        let per_interval = |d: u64| {
            let scaled = u128::from(d)
                .saturating_mul(interval.as_millis())
                .checked_div(elapsed.as_millis())
                .unwrap_or(u128::from(d));
            u64::try_from(scaled).unwrap_or(u64::MAX)
        };
        let known = tenants.get(tenant);
        let mut plans = Vec::new();
        for usage in uses {
            let c = usage.configured;
            if c.rpm.is_none() && c.tpm.is_none() && !limited(&c.day) && !limited(&c.month) {
                continue;
            }
            let sync = known
                .and_then(|t| t.scopes.get(&usage.model))
                .cloned()
                .unwrap_or_default();
            let demand = amount(dims(usage.demand).map(per_interval));
            // The refused request counts for the tenant's scope and for the
            // scope of its model.
            let ask = extra
                .filter(|(m, _)| usage.model.as_deref().is_none_or(|s| s == *m))
                .map(|(_, a)| a)
                .unwrap_or_default();
            let model = usage.model.clone();
            let budget = |what: &str,
                          b: &Budget,
                          window: i64,
                          used: Amount,
                          reserved: Amount,
                          reported: (i64, Amount)| {
                if !limited(b) {
                    return None;
                }
                let need = reserved.saturating_add(ask);
                let want = if release {
                    reserved
                } else {
                    let mut w = need;
                    for _ in 0..LEASE_INTERVALS {
                        w = w.saturating_add(demand);
                    }
                    w
                };
                let mut args: BudgetArgs = [0; 15];
                let parts = [
                    budget_dims(b).map(limit_arg),
                    dims(used).map(|n| limit_arg(Some(n))),
                    dims(acked(reported, window)).map(|n| limit_arg(Some(n))),
                    dims(want).map(|n| limit_arg(Some(n))),
                    dims(need).map(|n| limit_arg(Some(n))),
                ];
                for (i, v) in parts.iter().flatten().enumerate() {
                    if let Some(slot) = args.get_mut(i) {
                        *slot = *v;
                    }
                }
                let key = self.key(tenant, model.as_deref(), &format!("{what}:{window}"));
                Some((key, args, used))
            };
            let rate = |what: &str, r: Option<Rate>, demand: u64, asked: u64| {
                r.map(|r| {
                    let key = self.key(tenant, model.as_deref(), what);
                    let want = if release {
                        0
                    } else {
                        self.sticky(&key, self.rate_want(demand, asked, r.per_minute, false))
                    };
                    (
                        key,
                        [
                            figure(r.per_minute),
                            figure(want),
                            cooldown(r, self.settings.ttl),
                        ],
                    )
                })
            };
            plans.push(Plan {
                day: budget(
                    "day",
                    &c.day,
                    usage.day_window,
                    usage.day_used,
                    usage.day_reserved,
                    sync.reported_day,
                ),
                month: budget(
                    "month",
                    &c.month,
                    usage.month_window,
                    usage.month_used,
                    usage.month_reserved,
                    sync.reported_month,
                ),
                rpm: rate("rpm", c.rpm, demand.requests, ask.requests),
                tpm: rate("tpm", c.tpm, demand.tokens, ask.tokens),
                model: usage.model.clone(),
                configured: c,
                usage,
            });
        }
        plans
    }

    /// Report the demand on provider keys (per deployment id) and get this
    /// sidecar's share of each key's configured rates: per key, (held, of
    /// it new to this sidecar) per minute for requests and for tokens.
    pub(crate) async fn sync_providers(
        &self,
        keys: &[ProviderAsk],
    ) -> Result<Vec<ProviderShare>, FleetError> {
        let mut call = self.script.prepare_invoke();
        let mut nr = 0u32;
        let mut args = Vec::new();
        for k in keys {
            for (what, limit, demand) in [("rpm", k.rpm, k.requests), ("tpm", k.tpm, k.tokens)] {
                if let Some(limit) = limit {
                    let key = format!(
                        "{}:provider:{}:{what}",
                        escape(&self.settings.namespace),
                        escape(&k.deployment)
                    );
                    // A provider's limit is a plain per-minute window: its
                    // burst is its rate, and a bucket refills in a minute.
                    // A provider key has no top-up (selection cannot wait
                    // for Redis): its even part is held even while idle.
                    let want = self.sticky(&key, self.rate_want(demand, 0, limit, true));
                    call.key(key);
                    nr = nr.saturating_add(1);
                    args.extend([figure(limit), figure(want), 60_000]);
                }
            }
        }
        if nr == 0 {
            return Ok(Vec::new());
        }
        let ttl_ms = u64::try_from(self.settings.ttl.as_millis()).unwrap_or(u64::MAX);
        call.arg(&self.sid)
            .arg(0)
            .arg(ttl_ms)
            .arg(0)
            .arg(nr)
            .arg(0)
            .arg((ttl_ms / 1000).saturating_add(3_600))
            .arg(args);
        let figures = self.invoke(&call).await?;
        let expected = usize::try_from(nr.saturating_mul(3)).unwrap_or(usize::MAX);
        if figures.len() != expected {
            self.metrics.call("error");
            return Err(FleetError::Shape(figures.len(), expected));
        }
        self.metrics.call("ok");
        let num = |i: usize| u64::try_from(figures.get(i).copied().unwrap_or(0)).unwrap_or(0);
        let mut i = 0usize;
        let mut out = Vec::new();
        for k in keys {
            let mut next = |limit: Option<u64>| {
                limit.map(|_| {
                    let r = (num(i), num(i.saturating_add(2)));
                    i = i.saturating_add(3);
                    r
                })
            };
            let rpm = next(k.rpm);
            let tpm = next(k.tpm);
            for (window, held) in [("minute.requests", rpm), ("minute.tokens", tpm)] {
                if let Some((h, _)) = held {
                    self.metrics
                        .lease
                        .with_label_values(&[&format!("provider:{}", k.deployment), "", window])
                        .set(h as f64);
                }
            }
            out.push(ProviderShare { rpm, tpm });
        }
        Ok(out)
    }

    /// Share the holds this sidecar knows of (deployment id, how long to
    /// stay away) and learn the fleet's: every hold still running.
    pub(crate) async fn sync_holds(
        &self,
        mine: &[(String, Duration)],
    ) -> Result<Vec<(String, Duration)>, FleetError> {
        let mut call = self.holds.prepare_invoke();
        call.key(format!("{}:holds", escape(&self.settings.namespace)))
            .arg(86_400);
        for (id, wait) in mine {
            call.arg(id).arg(
                u64::try_from(wait.as_millis())
                    .unwrap_or(u64::MAX)
                    .min(MAX_FIGURE),
            );
        }
        let mut conn = self.connection()?;
        let answer: Result<Result<Vec<String>, redis::RedisError>, _> =
            tokio::time::timeout(self.settings.call_timeout, call.invoke_async(&mut conn)).await;
        let flat = match answer {
            Err(_) => {
                self.metrics.call("timeout");
                return Err(FleetError::Timeout(self.settings.call_timeout));
            }
            Ok(Err(e)) => {
                self.metrics.call("error");
                return Err(FleetError::Redis(e));
            }
            Ok(Ok(f)) => f,
        };
        self.metrics.call("ok");
        Ok(flat
            .chunks(2)
            .filter_map(|p| match p {
                [id, ms] => Some((id.clone(), Duration::from_millis(ms.parse().ok()?))),
                _ => None,
            })
            .collect())
    }

    /// Run a lease call with the deadline; the figures it answered.
    async fn invoke(&self, call: &redis::ScriptInvocation<'_>) -> Result<Vec<i64>, FleetError> {
        let mut conn = self.connection()?;
        let answer: Result<Result<Vec<i64>, redis::RedisError>, _> =
            tokio::time::timeout(self.settings.call_timeout, call.invoke_async(&mut conn)).await;
        match answer {
            Err(_) => {
                self.metrics.call("timeout");
                Err(FleetError::Timeout(self.settings.call_timeout))
            }
            Ok(Err(e)) => {
                self.metrics.call("error");
                Err(FleetError::Redis(e))
            }
            Ok(Ok(f)) => Ok(f),
        }
    }

    /// Whether every scope of a periodic call would report nothing, want
    /// nothing and give nothing back.
    fn idle(&self, tenant: &str, plans: &[Plan]) -> bool {
        let tenants = self.tenants();
        let Some(t) = tenants.get(tenant) else {
            return false;
        };
        plans.iter().all(|p| {
            let Some(sync) = t.scopes.get(&p.model) else {
                return false;
            };
            let budget_idle = |plan: &Option<(String, BudgetArgs, Amount)>,
                               known: &Option<BudgetFigures>| {
                plan.as_ref().is_none_or(|(_, args, _)| {
                    args.get(TOTAL..ACKED) == args.get(ACKED..WANT)
                        && args.iter().skip(WANT).all(|&a| a <= 0)
                        && known.is_some_and(|f| f.lease == Amount::default())
                })
            };
            let rate_idle = |plan: &Option<(String, [u64; 3])>, held: u64| {
                plan.as_ref()
                    .is_none_or(|(_, args)| args[1] == 0 && held == 0)
            };
            budget_idle(&p.day, &sync.day)
                && budget_idle(&p.month, &sync.month)
                && rate_idle(&p.rpm, sync.held[0])
                && rate_idle(&p.tpm, sync.held[1])
        })
    }

    /// Turn an answer into shares.
    fn apply(
        &self,
        ledger: &TenantLedger,
        plans: Vec<Plan>,
        figures: &[i64],
        nb: u32,
        started: Instant,
    ) -> Verdict {
        let mut verdict = Verdict::Grown;
        let num = |i: usize| u64::try_from(figures.get(i).copied().unwrap_or(0)).unwrap_or(0);
        let three = |i: usize| amount([num(i), num(i.saturating_add(1)), num(i.saturating_add(2))]);
        let mut b = 0usize;
        let mut r = usize::try_from(nb).unwrap_or(usize::MAX).saturating_mul(9);
        let mut shares = Vec::new();
        let mut tenants = self.tenants();
        let t = tenants.entry(ledger.id.clone()).or_default();
        t.valid_until = started.checked_add(self.settings.ttl);
        t.down = false;
        for p in plans {
            let sync = t.scopes.entry(p.model.clone()).or_default();
            let mut share = Share {
                day_window: p.usage.day_window,
                month_window: p.usage.month_window,
                ..Share::default()
            };
            let mut budget_answer = |plan: &Option<(String, BudgetArgs, Amount)>, window: i64| {
                plan.as_ref().map(|(_, args, used)| {
                    let f = BudgetFigures {
                        window,
                        lease: three(b),
                        used: three(b.saturating_add(3)),
                        leased_by_all: three(b.saturating_add(6)),
                    };
                    b = b.saturating_add(9);
                    // Did the lease cover what is needed? If not, and other
                    // sidecars hold leases, some may come back soon.
                    for d in 0..3usize {
                        let arg = |i: usize| args.get(i).copied().unwrap_or(-1);
                        let need = u64::try_from(arg(d.saturating_add(NEED))).unwrap_or(0);
                        if arg(d) < 0 || dims(f.lease)[d] >= need {
                            continue;
                        }
                        let elsewhere = dims(f.leased_by_all)[d] > dims(f.lease)[d];
                        verdict = match (verdict, elsewhere) {
                            (Verdict::Spent, _) | (_, false) => Verdict::Spent,
                            _ => Verdict::Later,
                        };
                    }
                    (f, *used)
                })
            };
            if let Some((f, used)) = budget_answer(&p.day, p.usage.day_window) {
                share.day = allowance(&p.configured.day, used, f.lease);
                share.fleet_day_used = Some(f.used);
                sync.reported_day = (f.window, used);
                sync.day = Some(f);
            }
            if let Some((f, used)) = budget_answer(&p.month, p.usage.month_window) {
                share.month = allowance(&p.configured.month, used, f.lease);
                share.fleet_month_used = Some(f.used);
                sync.reported_month = (f.window, used);
                sync.month = Some(f);
            }
            let [held_rpm, held_tpm] = &mut sync.held;
            for (plan, slot, fresh, held) in [
                (&p.rpm, &mut share.rpm, &mut share.rpm_fresh, held_rpm),
                (&p.tpm, &mut share.tpm, &mut share.tpm_fresh, held_tpm),
            ] {
                if plan.is_some() {
                    *slot = Some(num(r));
                    *held = num(r);
                    *fresh = Some(num(r.saturating_add(2)));
                    r = r.saturating_add(3);
                }
            }
            self.publish(&ledger.id, p.model.as_deref(), &share, sync, None);
            shares.push((p.model, Some(share)));
        }
        drop(tenants);
        ledger.set_shares(&shares);
        verdict
    }

    /// Redis did not answer for `ledger`: fall back as configured. While
    /// the leases last nothing changes, unless a request found them spent
    /// (`exhausted`): `local` then adds its part of what was free.
    fn fall_back(&self, ledger: &TenantLedger, calendar: &Calendar, exhausted: bool) {
        let now = Instant::now();
        let uses = ledger.take_use(calendar);
        let mut tenants = self.tenants();
        let t = tenants.entry(ledger.id.clone()).or_default();
        t.down = true;
        let leases_over = t.valid_until.is_none_or(|v| now >= v);
        if !leases_over && !exhausted {
            return;
        }
        let replicas = u64::from(self.settings.expected_replicas.max(1));
        let mut shares = Vec::new();
        for usage in uses {
            let c = usage.configured;
            let sync = t.scopes.entry(usage.model.clone()).or_default();
            let share = match self.settings.on_redis_down {
                RedisDown::Closed if leases_over => Share::none(),
                // Closed with leases left: keep them (nothing changes).
                RedisDown::Closed => continue,
                RedisDown::Local => {
                    // Its own leases (while they last), then its part of what
                    // was free at the last answer.
                    let local =
                        |b: &Budget, f: &Option<BudgetFigures>, window: i64, used: Amount| {
                            let (lease, free) = match f {
                                Some(f) if f.window == window => {
                                    let taken = f.used.saturating_add(f.leased_by_all);
                                    let free = amount([0, 1, 2].map(|i| {
                                        let limit = budget_dims(b)[i].unwrap_or(0);
                                        limit.saturating_sub(dims(taken)[i])
                                    }));
                                    (
                                        if leases_over {
                                            Amount::default()
                                        } else {
                                            f.lease
                                        },
                                        free,
                                    )
                                }
                                // Nothing known of this window: its part of the limit.
                                _ => (
                                    Amount::default(),
                                    amount(budget_dims(b).map(|l| l.unwrap_or(0))),
                                ),
                            };
                            let part =
                                amount(dims(free).map(|n| n.checked_div(replicas).unwrap_or(0)));
                            (allowance(b, used, lease.saturating_add(part)), part)
                        };
                    // From the use reported at the last answer (in this
                    // window): what was used since comes out of the lease
                    // and the part, it does not add to them.
                    let reported = |r: (i64, Amount), window: i64| {
                        if r.0 == window {
                            r.1
                        } else {
                            Amount::default()
                        }
                    };
                    let (day, day_part) = local(
                        &c.day,
                        &sync.day,
                        usage.day_window,
                        reported(sync.reported_day, usage.day_window),
                    );
                    let (month, month_part) = local(
                        &c.month,
                        &sync.month,
                        usage.month_window,
                        reported(sync.reported_month, usage.month_window),
                    );
                    let share = Share {
                        day,
                        day_window: usage.day_window,
                        month,
                        month_window: usage.month_window,
                        rpm: c
                            .rpm
                            .map(|r| r.per_minute.checked_div(replicas).unwrap_or(0)),
                        tpm: c
                            .tpm
                            .map(|r| r.per_minute.checked_div(replicas).unwrap_or(0)),
                        fleet_day_used: sync.day.map(|f| f.used),
                        fleet_month_used: sync.month.map(|f| f.used),
                        // What the bucket holds stays; it refills at the
                        // fallback's rate (others may have spent theirs).
                        rpm_fresh: Some(0),
                        tpm_fresh: Some(0),
                    };
                    self.publish(
                        &ledger.id,
                        usage.model.as_deref(),
                        &share,
                        sync,
                        Some((day_part, month_part)),
                    );
                    shares.push((usage.model, Some(share)));
                    continue;
                }
            };
            shares.push((usage.model, Some(share)));
        }
        drop(tenants);
        ledger.set_shares(&shares);
    }

    fn publish(
        &self,
        tenant: &str,
        model: Option<&str>,
        share: &Share,
        sync: &ScopeSync,
        fallback: Option<(Amount, Amount)>,
    ) {
        let m = &self.metrics;
        let model = model.unwrap_or("");
        let (day_part, month_part) = fallback.unwrap_or_default();
        for (prefix, figures, part) in [
            ("day", &sync.day, day_part),
            ("month", &sync.month, month_part),
        ] {
            let Some(f) = figures else { continue };
            for (i, dim) in ["requests", "tokens", "usd"].into_iter().enumerate() {
                let scale = if dim == "usd" { 1e9 } else { 1.0 };
                let window = format!("{prefix}.{dim}");
                let labels = [tenant, model, window.as_str()];
                let v = |a: Amount| dims(a)[i] as f64 / scale;
                m.lease.with_label_values(&labels).set(v(f.lease));
                m.fleet_used.with_label_values(&labels).set(v(f.used));
                m.overshoot.with_label_values(&labels).set(v(part));
            }
        }
        for (window, held) in [("minute.requests", share.rpm), ("minute.tokens", share.tpm)] {
            if let Some(h) = held {
                let labels = [tenant, model, window];
                m.lease.with_label_values(&labels).set(h as f64);
                m.overshoot.with_label_values(&labels).set(0.0);
            }
        }
    }

    /// Whether Redis did not answer the last call for a tenant: its
    /// shares are the fallback until the periodic refresh reaches Redis.
    fn down(&self, tenant: &str) -> bool {
        self.tenants().get(tenant).is_some_and(|t| t.down)
    }

    /// Answer the top-ups of one tenant and model: one call, the shares
    /// applied.
    async fn answer(&self, req: Batch, calendar: &Calendar) {
        // Redis is known to be away (the periodic refresh finds it back):
        // `local` admits from its part of the limit without asking it again.
        let known_down = self.down(&req.ledger.id);
        let asked = if known_down {
            Err(FleetError::Down)
        } else {
            self.sync(&req.ledger, calendar, Some((&req.model, req.amount)), false)
                .await
        };
        let result = match asked {
            Ok(v) => v,
            Err(e) => {
                if !known_down {
                    log::warn!("fleet: top-up for {}: {e}", req.ledger.id);
                }
                self.fall_back(&req.ledger, calendar, true);
                match self.settings.on_redis_down {
                    // The fallback share may admit it.
                    RedisDown::Local => Verdict::Grown,
                    RedisDown::Closed => Verdict::Unavailable,
                }
            }
        };
        for reply in req.replies {
            // A request may have given up waiting.
            let _ = reply.send(result);
        }
    }

    /// Answer every top-up queued: one call per tenant and model, for the
    /// sum of what they asked.
    pub(crate) async fn answer_all(
        &self,
        first: TopUpRequest,
        inbox: &mut mpsc::Receiver<TopUpRequest>,
        calendar: &Calendar,
    ) {
        let mut groups: Vec<Batch> = Vec::new();
        let mut next = Some(first);
        while let Some(req) = next {
            match groups
                .iter_mut()
                .find(|g| g.ledger.id == req.ledger.id && g.model == req.model)
            {
                Some(g) => {
                    g.amount = g.amount.saturating_add(req.amount);
                    g.replies.push(req.reply);
                }
                None => groups.push(Batch {
                    ledger: req.ledger,
                    model: req.model,
                    amount: req.amount,
                    replies: vec![req.reply],
                }),
            }
            next = inbox.try_recv().ok();
        }
        for g in groups {
            self.answer(g, calendar).await;
        }
    }

    /// The periodic step for every tenant: report, refresh, or fall back.
    /// Once Redis failed in a step, the other tenants fall back without
    /// waiting for it again.
    pub(crate) async fn refresh(
        &self,
        ledgers: &[Arc<TenantLedger>],
        calendar: &Calendar,
        release: bool,
    ) {
        let mut failed = false;
        for l in ledgers {
            if !failed {
                match self.sync(l, calendar, None, release).await {
                    Ok(_) => continue,
                    Err(e) => {
                        log::warn!("fleet: refreshing {}: {e}", l.id);
                        failed = true;
                    }
                }
            }
            if !release {
                self.fall_back(l, calendar, false);
            }
        }
    }

    fn count_top_up(&self, result: TopUp) {
        let label = match result {
            TopUp::Grown => "grown",
            TopUp::Spent => "spent",
            TopUp::Unavailable => "unavailable",
        };
        self.metrics.top_ups.with_label_values(&[label]).inc();
    }
}

/// A share's allowance for one budget: for each configured dimension, the
/// use the sidecar had reported plus the lease it holds now.
fn allowance(configured: &Budget, used: Amount, lease: Amount) -> Budget {
    let total = used.saturating_add(lease);
    let pick = |c: Option<u64>, t: u64| c.map(|_| t);
    Budget {
        requests: pick(configured.requests, total.requests),
        tokens: pick(configured.tokens, total.tokens),
        usd_nano: pick(configured.usd_nano, total.usd_nano),
    }
}

#[async_trait::async_trait]
impl super::Authority for Fleet {
    async fn top_up(
        &self,
        tenant: &Arc<TenantLedger>,
        model: &str,
        _refusal: &super::Refusal,
        amount: Amount,
    ) -> TopUp {
        if self.down(&tenant.id) && self.settings.on_redis_down == RedisDown::Closed {
            self.count_top_up(TopUp::Unavailable);
            return TopUp::Unavailable;
        }
        // Asked again while other sidecars hold leases, until they give
        // some back or the wait is over.
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(self.settings.top_up_wait).unwrap_or(now);
        let result = loop {
            let (reply, answer) = oneshot::channel();
            let req = TopUpRequest {
                ledger: Arc::clone(tenant),
                model: model.to_string(),
                amount,
                reply,
            };
            if self.top_ups.try_send(req).is_err() {
                break TopUp::Spent;
            }
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(Verdict::Grown)) => break TopUp::Grown,
                Ok(Ok(Verdict::Unavailable)) => break TopUp::Unavailable,
                Ok(Ok(Verdict::Later)) => {
                    let pause = self.settings.interval / 2;
                    let now = tokio::time::Instant::now();
                    if now.checked_add(pause).is_none_or(|t| t >= deadline) {
                        break TopUp::Spent;
                    }
                    tokio::time::sleep(pause).await;
                }
                _ => break TopUp::Spent,
            }
        };
        self.count_top_up(result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_names_cannot_collide() {
        assert_eq!(escape("acme"), "acme");
        assert_eq!(escape("a:b"), "a%3Ab");
        assert_ne!(escape("a:b"), escape("a%3Ab"));
        assert_eq!(escape("{x} y"), "%7Bx%7D%20y");
    }

    #[test]
    fn a_lease_is_used_plus_lease_in_configured_dimensions_only() {
        let b = Budget {
            requests: Some(100),
            tokens: None,
            usd_nano: Some(5),
        };
        let used = Amount {
            requests: 7,
            tokens: 9,
            usd_nano: 1,
        };
        let lease = Amount {
            requests: 3,
            tokens: 4,
            usd_nano: 2,
        };
        let a = allowance(&b, used, lease);
        assert_eq!(
            (a.requests, a.tokens, a.usd_nano),
            (Some(10), None, Some(3))
        );
    }

    #[test]
    fn wants_and_cooldowns_are_bounded() {
        let r = Rate {
            per_minute: 60,
            burst: 60,
        };
        assert_eq!(cooldown(r, Duration::from_secs(10)), 60_000);
        let r = Rate {
            per_minute: 0,
            burst: 10,
        };
        assert_eq!(cooldown(r, Duration::from_secs(10)), 60_000);
        assert_eq!(per_minute(10, Duration::from_secs(1), 0), 750);
        assert_eq!(per_minute(u64::MAX, Duration::ZERO, 5), u64::MAX);
    }
}
