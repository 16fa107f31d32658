//! The quota ledger: per tenant (and optionally per tenant × model), one
//! atomic reservation across every window — per-minute request and token
//! buckets with bursts, daily and monthly request/token/USD budgets — then
//! settlement to what the upstream really used, or a full refund.
//!
//! Invariants (checked by the `ledger_conserves_totals` property test):
//! - A reservation either takes from every window or from none. Day and
//!   month budgets are checked before per-minute rates, so a spent budget is
//!   reported as such.
//! - A reservation is settled or refunded exactly once; dropping it unsettled
//!   (a panic, a cancelled task) refunds it. It settles into the windows
//!   current when it ends.
//! - Day and month counters hold settled use and reservations in flight,
//!   both unsigned; a reservation is admitted only if use + reservations +
//!   it fit the budget, so reservations alone never pass a limit. The only
//!   overshoot is a request that used more than it reserved.
//! - A per-minute bucket holds its burst less what is reserved and used and
//!   not yet refilled. It is never above its burst (plus a loan). It goes
//!   below zero — into debt — only when a request used more than it
//!   reserved, when one request was larger than the whole burst, or when a
//!   reload lowered the limit below what was already used; the debt is
//!   repaid by refill before anything more is admitted.
//!
//! Priority admission to saturated pools is routing's (`routing::gate`); lending of
//! spare rate capacity in [`rebalance`].
#![deny(clippy::arithmetic_side_effects)]

pub mod estimate;
pub(crate) mod fleet;
pub(crate) mod rebalance;
pub(crate) mod window;

pub(crate) use crate::config::{Budget, Limits, Rate, TenantLimits};
use jiff::Timestamp;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
pub(crate) use window::{Amount, Calendar, Clock, Windows};
use window::{Bucket, Counter};

/// Every window name, as used in refusals and reports.
pub(crate) const WINDOWS: [&str; 8] = [
    "minute.requests",
    "minute.tokens",
    "day.requests",
    "day.tokens",
    "day.usd",
    "month.requests",
    "month.tokens",
    "month.usd",
];

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refusal {
    /// `minute.requests`, `minute.tokens`, `day.tokens`, `month.usd`, … prefixed
    /// with `model:<name>.` for a per-model scope.
    pub(crate) window: String,
    pub(crate) kind: RefusalKind,
    pub(crate) retry_after: Duration,
}

/// Which kind of window refused a request: it decides the error type a
/// client sees (`rate_limited` or `quota_exceeded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// A per-minute rate: waiting helps soon.
    RateLimited,
    /// A daily or monthly budget: spent until the window ends.
    QuotaExceeded,
    /// A limit shared by a fleet whose authority cannot be reached, and the
    /// fleet is configured to refuse rather than guess (`on_redis_down:
    /// closed`).
    Unavailable,
}

/// Rate-limit state for the `x-ratelimit-*` response headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateInfo {
    pub(crate) requests: Option<WindowInfo>,
    pub(crate) tokens: Option<WindowInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct WindowInfo {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    /// Until the window is whole again.
    pub(crate) reset: Duration,
}

/// One scope's windows.
#[derive(Debug)]
struct Scope {
    /// The limits as configured.
    configured: Limits,
    /// This sidecar's share of them, when a fleet shares them.
    /// Boxed: only a fleet sets it, and inline it would be a third of
    /// every tenant's ledger.
    share: Option<Box<Share>>,
    /// The per-minute rates in force: configured, or this sidecar's share.
    limits: Limits,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    day: Counter,
    month: Counter,
    /// Asked of this scope (admitted or refused) since the fleet last took
    /// it: what the sidecar's next lease is sized from.
    demand: Amount,
}

/// A sidecar's share of a scope's limits where a fleet of sidecars shares
/// them ([`fleet`]): for the day and month windows it names, the total this
/// sidecar may have used in each (its use already reported plus the lease
/// it holds), and the per-minute rates it holds. A dimension the config
/// does not limit stays unlimited; an allowance for a window other than the
/// current one counts as none (the lease for the new window is not in yet).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Share {
    pub(crate) day: Budget,
    pub(crate) day_window: i64,
    pub(crate) month: Budget,
    pub(crate) month_window: i64,
    /// Requests and tokens per minute held (the burst scales with them).
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    /// Of what is held, what is new to this sidecar (per minute): its burst
    /// is credited to the bucket. `None`: whatever the share grew by.
    pub(crate) rpm_fresh: Option<u64>,
    pub(crate) tpm_fresh: Option<u64>,
    /// What the whole fleet used in the day and month windows named, as
    /// the authority last said (for reports).
    pub(crate) fleet_day_used: Option<Amount>,
    pub(crate) fleet_month_used: Option<Amount>,
}

impl Share {
    /// Nothing at all: what a sidecar holds before the fleet first answers.
    pub(crate) fn none() -> Share {
        Share {
            rpm: Some(0),
            tpm: Some(0),
            ..Share::default()
        }
    }
}

/// A rate scaled to the share of it that is held: the burst in the same
/// proportion, rounded down (the fleet's shares never add up to more).
fn held_rate(configured: Rate, held: u64) -> Rate {
    let held = held.min(configured.per_minute);
    let burst = u128::from(configured.burst)
        .saturating_mul(u128::from(held))
        .checked_div(u128::from(configured.per_minute))
        .unwrap_or(0);
    Rate {
        per_minute: held,
        burst: u64::try_from(burst).unwrap_or(u64::MAX),
    }
}

/// The per-minute limits in force for these configured limits and share.
fn effective(configured: Limits, share: Option<&Share>) -> Limits {
    let Some(s) = share else {
        return configured;
    };
    Limits {
        rpm: configured.rpm.map(|r| s.rpm.map_or(r, |h| held_rate(r, h))),
        tpm: configured.tpm.map(|r| s.tpm.map_or(r, |h| held_rate(r, h))),
        ..configured
    }
}

/// A budget as allowed by a share for `window`: each configured dimension
/// limited to the allowance, none at all for another window.
fn allowed_budget(configured: Budget, share: &Budget, share_window: i64, window: i64) -> Budget {
    let current = share_window == window;
    let dim =
        |c: Option<u64>, s: Option<u64>| c.map(|c| if current { s.unwrap_or(c).min(c) } else { 0 });
    Budget {
        requests: dim(configured.requests, share.requests),
        tokens: dim(configured.tokens, share.tokens),
        usd_nano: dim(configured.usd_nano, share.usd_nano),
    }
}

/// One scope's use, for the fleet: what it counted in the current windows
/// and what was asked of it lately.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ScopeUse {
    /// `None` for the tenant as a whole.
    pub(crate) model: Option<String>,
    pub(crate) configured: Limits,
    pub(crate) day_window: i64,
    pub(crate) month_window: i64,
    /// Settled use and reservations in flight in the current windows.
    pub(crate) day_used: Amount,
    pub(crate) day_reserved: Amount,
    pub(crate) month_used: Amount,
    pub(crate) month_reserved: Amount,
    /// Asked since the last time it was taken.
    pub(crate) demand: Amount,
}

/// A refusal found by a check, before it is named for its scope.
type Refused = (&'static str, RefusalKind, Duration);

impl Scope {
    fn new(limits: Limits, now: Instant) -> Scope {
        Scope {
            configured: limits,
            share: None,
            limits,
            rpm: limits.rpm.map(|r| Bucket::full(r, now)),
            tpm: limits.tpm.map(|r| Bucket::full(r, now)),
            day: Counter::default(),
            month: Counter::default(),
            demand: Amount::default(),
        }
    }

    /// New configured limits (a reload); the share, if any, still applies.
    fn configure(&mut self, configured: Limits, now: Instant, loan: Loan) {
        self.configured = configured;
        self.set_limits(effective(configured, self.share.as_deref()), now, loan);
    }

    /// A new share from the fleet (`None`: the configured limits alone).
    /// A per-minute share that grows is credited to its bucket at once; one
    /// that shrinks only caps the bucket at its new burst. What was drawn
    /// is not drawn twice: the authority keeps a share given up from every
    /// other sidecar for as long as a bucket takes to refill.
    fn set_share(&mut self, share: Option<Share>, now: Instant, loan: Loan) {
        match (self.share.as_mut(), share) {
            (Some(held), Some(new)) => **held = new,
            (_, new) => self.share = new.map(Box::new),
        }
        let new = effective(self.configured, self.share.as_deref());
        let fresh = |configured: Option<Rate>, fresh: Option<u64>| {
            configured.zip(fresh).map(|(c, f)| held_rate(c, f).burst)
        };
        let (rpm_fresh, tpm_fresh) = match &self.share {
            Some(s) => (
                fresh(self.configured.rpm, s.rpm_fresh),
                fresh(self.configured.tpm, s.tpm_fresh),
            ),
            None => (None, None),
        };
        let moved = |bucket: &mut Option<Bucket>,
                     old: Option<Rate>,
                     new: Option<Rate>,
                     fresh: Option<u64>,
                     extra| {
            match (bucket.as_mut(), old, new) {
                (Some(b), Some(o), Some(n)) => {
                    b.refill(o, extra, now);
                    let grown = n.burst.saturating_sub(o.burst);
                    b.credit(fresh.unwrap_or(grown).min(grown) as f64);
                    // No time passes: this only caps the level.
                    b.refill(n, extra, now);
                }
                (_, _, n) => *bucket = n.map(|r| Bucket::full(r, now)),
            }
        };
        moved(&mut self.rpm, self.limits.rpm, new.rpm, rpm_fresh, loan.rpm);
        moved(&mut self.tpm, self.limits.tpm, new.tpm, tpm_fresh, loan.tpm);
        self.limits = new;
    }

    /// The fleet's use of the current day and month windows, where a fleet
    /// shares them and the authority said it for these windows.
    fn fleet_used(&self) -> (Option<Amount>, Option<Amount>) {
        let Some(sh) = &self.share else {
            return (None, None);
        };
        let current = |used: Option<Amount>, window: i64, now: i64| used.filter(|_| window == now);
        (
            current(sh.fleet_day_used, sh.day_window, self.day.window),
            current(sh.fleet_month_used, sh.month_window, self.month.window),
        )
    }

    fn day_budget(&self) -> Budget {
        match &self.share {
            Some(s) => allowed_budget(self.configured.day, &s.day, s.day_window, self.day.window),
            None => self.configured.day,
        }
    }

    fn month_budget(&self) -> Budget {
        match &self.share {
            Some(s) => allowed_budget(
                self.configured.month,
                &s.month,
                s.month_window,
                self.month.window,
            ),
            None => self.configured.month,
        }
    }

    /// New limits from a reload; what was counted stays counted, in the
    /// buckets as well as the calendar windows (see [`Bucket::rebase`]).
    fn set_limits(&mut self, limits: Limits, now: Instant, loan: Loan) {
        let rebuilt = |bucket: &mut Option<Bucket>, old: Option<Rate>, new: Option<Rate>, extra| {
            match (bucket.as_mut(), old, new) {
                (Some(b), Some(o), Some(n)) => {
                    // Refill at the old rate up to now, then move the level.
                    b.refill(o, extra, now);
                    b.rebase(o, n);
                }
                (_, _, n) => *bucket = n.map(|r| Bucket::full(r, now)),
            }
        };
        rebuilt(&mut self.rpm, self.limits.rpm, limits.rpm, loan.rpm);
        rebuilt(&mut self.tpm, self.limits.tpm, limits.tpm, loan.tpm);
        self.limits = limits;
    }

    fn refresh(&mut self, now: Instant, w: &Windows, loan: Loan) {
        if let (Some(b), Some(r)) = (&mut self.rpm, self.limits.rpm) {
            b.refill(r, loan.rpm, now);
        }
        if let (Some(b), Some(r)) = (&mut self.tpm, self.limits.tpm) {
            b.refill(r, loan.tpm, now);
        }
        self.roll(w);
    }

    fn roll(&mut self, w: &Windows) {
        self.day.roll(w.day);
        self.month.roll(w.month);
    }

    /// The day and month budgets; nothing is taken here. Checked before the
    /// per-minute rates (see [`TenantLedger::reserve_at`]).
    fn check_budgets(&self, amount: Amount, w: &Windows, now: Timestamp) -> Result<(), Refused> {
        let until =
            |end: Timestamp| Duration::try_from(end.duration_since(now)).unwrap_or(Duration::ZERO);
        if let Some(dim) = self.day.exceeds(&self.day_budget(), amount) {
            return Err((
                day_window(dim),
                RefusalKind::QuotaExceeded,
                until(w.day_end),
            ));
        }
        if let Some(dim) = self.month.exceeds(&self.month_budget(), amount) {
            return Err((
                month_window(dim),
                RefusalKind::QuotaExceeded,
                until(w.month_end),
            ));
        }
        Ok(())
    }

    /// The per-minute buckets; nothing is taken here.
    fn check_rates(&self, amount: Amount, loan: Loan) -> Result<(), Refused> {
        if let (Some(b), Some(r)) = (&self.rpm, self.limits.rpm) {
            if !b.can_take(amount.requests) {
                return Err((
                    "minute.requests",
                    RefusalKind::RateLimited,
                    b.wait_for(amount.requests, r, loan.rpm),
                ));
            }
        }
        if let (Some(b), Some(r)) = (&self.tpm, self.limits.tpm) {
            let need = tokens_needed(amount.tokens, r, loan.tpm);
            if !b.can_take(need) {
                return Err((
                    "minute.tokens",
                    RefusalKind::RateLimited,
                    b.wait_for(need, r, loan.tpm),
                ));
            }
        }
        Ok(())
    }

    fn take(&mut self, amount: Amount) {
        if let Some(b) = &mut self.rpm {
            b.take(amount.requests);
        }
        if let Some(b) = &mut self.tpm {
            b.take(amount.tokens);
        }
        self.day.reserved = self.day.reserved.saturating_add(amount);
        self.month.reserved = self.month.reserved.saturating_add(amount);
    }

    /// Replace a reservation by what was really used (zero for a refund).
    /// The counters must have been rolled to the current windows first.
    fn settle(&mut self, reserved: Amount, actual: Amount, loan: Loan) {
        for c in [&mut self.day, &mut self.month] {
            c.reserved = c.reserved.saturating_sub(reserved);
            c.used = c.used.saturating_add(actual);
        }
        if let (Some(b), Some(r)) = (&mut self.rpm, self.limits.rpm) {
            b.adjust(
                reserved.requests as f64 - actual.requests as f64,
                r.burst as f64 + loan.rpm,
            );
        }
        if let (Some(b), Some(r)) = (&mut self.tpm, self.limits.tpm) {
            b.adjust(
                reserved.tokens as f64 - actual.tokens as f64,
                r.burst as f64 + loan.tpm,
            );
        }
    }

    /// The tightest window of each kind, for the `x-ratelimit-*` headers.
    fn tightest(&self, w: &Windows, now: Timestamp, loan: Loan, into: &mut RateInfo) {
        let until =
            |end: Timestamp| Duration::try_from(end.duration_since(now)).unwrap_or(Duration::ZERO);
        let bucket = |b: &Option<Bucket>, r: Option<Rate>, configured: Option<Rate>, extra: f64| {
            let (b, r) = (b.as_ref()?, r?);
            let ceiling = r.burst as f64 + extra;
            Some(WindowInfo {
                // The configured rate, as OpenAI reports it: not the burst,
                // not a loan, not a fleet's share of it (`remaining` is what
                // this sidecar holds). With a burst above the rate, or a
                // loan, `remaining` may exceed it.
                limit: configured.map_or(r.per_minute, |c| c.per_minute),
                remaining: b.level().max(0.0) as u64,
                reset: b.wait_for(ceiling.max(0.0).ceil() as u64, r, extra),
            })
        };
        // Where a fleet shares the budget, what the whole fleet used (as the
        // authority last said) when it is more than this sidecar's own.
        let budget =
            |limit: Option<u64>, fleet: Option<u64>, used: u64, reserved: u64, end: Timestamp| {
                limit.map(|l| WindowInfo {
                    limit: l,
                    remaining: l
                        .saturating_sub(fleet.unwrap_or(0).max(used).saturating_add(reserved)),
                    reset: until(end),
                })
            };
        let (d, m) = (&self.day, &self.month);
        let (day, month) = self.fleet_used();
        for c in [
            bucket(&self.rpm, self.limits.rpm, self.configured.rpm, loan.rpm),
            budget(
                self.configured.day.requests,
                day.map(|f| f.requests),
                d.used.requests,
                d.reserved.requests,
                w.day_end,
            ),
            budget(
                self.configured.month.requests,
                month.map(|f| f.requests),
                m.used.requests,
                m.reserved.requests,
                w.month_end,
            ),
        ]
        .into_iter()
        .flatten()
        {
            into.requests = Some(tighter(into.requests, c));
        }
        for c in [
            bucket(&self.tpm, self.limits.tpm, self.configured.tpm, loan.tpm),
            budget(
                self.configured.day.tokens,
                day.map(|f| f.tokens),
                d.used.tokens,
                d.reserved.tokens,
                w.day_end,
            ),
            budget(
                self.configured.month.tokens,
                month.map(|f| f.tokens),
                m.used.tokens,
                m.reserved.tokens,
                w.month_end,
            ),
        ]
        .into_iter()
        .flatten()
        {
            into.tokens = Some(tighter(into.tokens, c));
        }
    }
}

/// What a request of `tokens` must find in a token bucket. A request larger
/// than the whole burst is admitted from a full bucket (and leaves it in
/// debt) rather than never.
pub(crate) fn tokens_needed(tokens: u64, r: Rate, extra: f64) -> u64 {
    let ceiling = (r.burst as f64 + extra).max(1.0);
    (tokens as f64).min(ceiling).ceil() as u64
}

fn scope_use(model: Option<String>, s: &mut Scope) -> ScopeUse {
    ScopeUse {
        model,
        configured: s.configured,
        day_window: s.day.window,
        month_window: s.month.window,
        day_used: s.day.used,
        day_reserved: s.day.reserved,
        month_used: s.month.used,
        month_reserved: s.month.reserved,
        demand: std::mem::take(&mut s.demand),
    }
}

/// The window with less left; on a tie, the one that resets sooner.
fn tighter(a: Option<WindowInfo>, b: WindowInfo) -> WindowInfo {
    match a {
        Some(a) if (a.remaining, a.reset) <= (b.remaining, b.reset) => a,
        _ => b,
    }
}

fn day_window(dim: &'static str) -> &'static str {
    match dim {
        "requests" => "day.requests",
        "tokens" => "day.tokens",
        _ => "day.usd",
    }
}

fn month_window(dim: &'static str) -> &'static str {
    match dim {
        "requests" => "month.requests",
        "tokens" => "month.tokens",
        _ => "month.usd",
    }
}

/// Rate capacity lent (negative) or borrowed (positive), per minute.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Loan {
    pub(crate) rpm: f64,
    pub(crate) tpm: f64,
}

/// Traffic seen since the rebalancer last looked.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Activity {
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
    /// Refused by a per-minute rate.
    pub(crate) rate_refusals: u64,
}

/// Activity as it accumulates. Tokens count when reserved (demand shows at
/// once) and are corrected when settled; a correction can arrive after the
/// rebalancer took the interval its reservation was counted in, so the
/// running count is signed and a negative rest carries into the next
/// interval instead of being lost.
#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    tokens: i64,
    rate_refusals: u64,
}

#[derive(Debug)]
struct TenantState {
    priority: u8,
    tenant: Scope,
    models: HashMap<String, Scope>,
    loan: Loan,
    activity: Tally,
    /// A fleet shares the limits: a model scope added by a reload starts
    /// with no share.
    shared: bool,
}

/// One tenant's ledger. Lives across reloads: a reload changes its limits and
/// keeps what it counted.
#[derive(Debug)]
pub(crate) struct TenantLedger {
    pub(crate) id: String,
    state: Mutex<TenantState>,
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl TenantLedger {
    pub(crate) fn new(id: &str, limits: &TenantLimits) -> TenantLedger {
        TenantLedger::new_at(id, limits, Instant::now())
    }

    fn new_at(id: &str, limits: &TenantLimits, now: Instant) -> TenantLedger {
        TenantLedger {
            id: id.to_string(),
            state: Mutex::new(TenantState {
                priority: limits.priority,
                tenant: Scope::new(limits.limits, now),
                models: limits
                    .models
                    .iter()
                    .map(|(m, l)| (m.clone(), Scope::new(*l, now)))
                    .collect(),
                loan: Loan::default(),
                activity: Tally::default(),
                shared: false,
            }),
        }
    }

    /// A ledger whose limits a fleet shares: every scope starts with no
    /// share at all, and admits nothing until the fleet grants one.
    fn new_shared(id: &str, limits: &TenantLimits) -> TenantLedger {
        let now = Instant::now();
        let t = TenantLedger::new_at(id, limits, now);
        {
            let mut s = t.lock();
            s.shared = true;
            let loan = s.loan;
            s.tenant.set_share(Some(Share::none()), now, loan);
            for m in s.models.values_mut() {
                m.set_share(Some(Share::none()), now, Loan::default());
            }
        }
        t
    }

    fn lock(&self) -> MutexGuard<'_, TenantState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_limits(&self, limits: &TenantLimits) {
        self.set_limits_at(limits, Instant::now());
    }

    fn set_limits_at(&self, limits: &TenantLimits, now: Instant) {
        let mut s = self.lock();
        s.priority = limits.priority;
        let loan = s.loan;
        s.tenant.configure(limits.limits, now, loan);
        s.models.retain(|m, _| limits.models.contains_key(m));
        for (m, l) in &limits.models {
            match s.models.get_mut(m) {
                Some(scope) => scope.configure(*l, now, Loan::default()),
                None => {
                    let mut scope = Scope::new(*l, now);
                    if s.shared {
                        scope.set_share(Some(Share::none()), now, Loan::default());
                    }
                    s.models.insert(m.clone(), scope);
                }
            }
        }
    }

    /// Reserve `amount` in every window of the tenant and of its scope for
    /// `model`, or in none.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        model: &str,
        amount: Amount,
        calendar: &Arc<Calendar>,
    ) -> Result<Reservation, Refusal> {
        self.reserve_at(model, amount, calendar, Instant::now(), calendar.now())
    }

    /// [`TenantLedger::reserve`] at a given time. Budgets are checked before
    /// rates, in both scopes: a tenant out of its day or month budget is told
    /// so (`quota_exceeded`, retry when the window ends), not sent back every
    /// second by a per-minute window that happens to be empty too.
    fn reserve_at(
        self: &Arc<Self>,
        model: &str,
        amount: Amount,
        calendar: &Arc<Calendar>,
        now: Instant,
        ts: Timestamp,
    ) -> Result<Reservation, Refusal> {
        let w = calendar.windows(ts);
        let mut s = self.lock();
        let loan = s.loan;
        s.tenant.refresh(now, &w, loan);
        let has_model_scope = s.models.contains_key(model);
        if let Some(m) = s.models.get_mut(model) {
            m.refresh(now, &w, Loan::default());
        }
        s.tenant.demand = s.tenant.demand.saturating_add(amount);
        if let Some(m) = s.models.get_mut(model) {
            m.demand = m.demand.saturating_add(amount);
        }
        let scoped = |r: Refused| (format!("model:{model}.{}", r.0), r.1, r.2);
        let named = |r: Refused| (r.0.to_string(), r.1, r.2);
        let model_scope = s.models.get(model);
        let checked = s
            .tenant
            .check_budgets(amount, &w, ts)
            .map_err(named)
            .and_then(|()| {
                model_scope.map_or(Ok(()), |m| m.check_budgets(amount, &w, ts).map_err(scoped))
            })
            .and_then(|()| s.tenant.check_rates(amount, loan).map_err(named))
            .and_then(|()| {
                model_scope.map_or(Ok(()), |m| {
                    m.check_rates(amount, Loan::default()).map_err(scoped)
                })
            });
        if let Err((window, kind, retry_after)) = checked {
            if kind == RefusalKind::RateLimited {
                s.activity.rate_refusals = s.activity.rate_refusals.saturating_add(1);
            }
            return Err(Refusal {
                window,
                kind,
                retry_after,
            });
        }
        s.tenant.take(amount);
        if let Some(m) = s.models.get_mut(model) {
            m.take(amount);
        }
        s.activity.requests = s.activity.requests.saturating_add(amount.requests);
        s.activity.tokens = s.activity.tokens.saturating_add(signed(amount.tokens));
        drop(s);
        Ok(Reservation {
            ledger: Arc::clone(self),
            calendar: Arc::clone(calendar),
            model: has_model_scope.then(|| model.to_string()),
            amount,
            done: false,
        })
    }

    /// Replace a reservation by what was used, in the windows current at
    /// `ts`. The counters roll first: a request reserved before midnight and
    /// settled after it is counted in the new day. That is the only place it
    /// can count — an ended window is no longer enforced, so use settled into
    /// it would be forgiven — and it is where its reservation already is, as
    /// reservations in flight carry over when a window rolls.
    fn settle_at(
        &self,
        model: Option<&str>,
        reserved: Amount,
        actual: Amount,
        w: &Windows,
        now: Instant,
    ) {
        let mut s = self.lock();
        let loan = s.loan;
        s.tenant.refresh(now, w, loan);
        s.tenant.settle(reserved, actual, loan);
        if let Some(m) = model.and_then(|m| s.models.get_mut(m)) {
            m.refresh(now, w, Loan::default());
            m.settle(reserved, actual, Loan::default());
        }
        s.activity.tokens = s
            .activity
            .tokens
            .saturating_add(signed(actual.tokens))
            .saturating_sub(signed(reserved.tokens));
    }

    /// For the `x-ratelimit-*` headers: of the windows that limit requests
    /// (per minute, day, month; the tenant's and the model's), the one with
    /// the least left, and the same for tokens. `None` where no window of
    /// that kind applies.
    pub(crate) fn rate_info(&self, model: Option<&str>, calendar: &Calendar) -> RateInfo {
        self.rate_info_at(model, calendar, Instant::now(), calendar.now())
    }

    fn rate_info_at(
        &self,
        model: Option<&str>,
        calendar: &Calendar,
        now: Instant,
        ts: Timestamp,
    ) -> RateInfo {
        let w = calendar.windows(ts);
        let mut s = self.lock();
        let loan = s.loan;
        let mut info = RateInfo {
            requests: None,
            tokens: None,
        };
        s.tenant.refresh(now, &w, loan);
        s.tenant.tightest(&w, ts, loan, &mut info);
        if let Some(m) = model.and_then(|m| s.models.get_mut(m)) {
            m.refresh(now, &w, Loan::default());
            m.tightest(&w, ts, Loan::default(), &mut info);
        }
        info
    }

    /// For the fleet: every scope's use in the current windows (the tenant's
    /// first, then its models'), and what was asked of each since the last
    /// call, which starts anew.
    pub(crate) fn take_use(&self, calendar: &Calendar) -> Vec<ScopeUse> {
        let w = calendar.windows(calendar.now());
        let now = Instant::now();
        let mut s = self.lock();
        let loan = s.loan;
        s.tenant.refresh(now, &w, loan);
        let mut out = vec![scope_use(None, &mut s.tenant)];
        let mut names: Vec<String> = s.models.keys().cloned().collect();
        names.sort();
        for m in names {
            if let Some(scope) = s.models.get_mut(&m) {
                scope.refresh(now, &w, Loan::default());
                out.push(scope_use(Some(m), scope));
            }
        }
        out
    }

    /// For the fleet: this sidecar's share of each scope (`None` for the
    /// tenant as a whole, else a model); a share of `None` lifts the share
    /// (the configured limits apply). Scopes not named are left as they are.
    pub(crate) fn set_shares(&self, shares: &[(Option<String>, Option<Share>)]) {
        let now = Instant::now();
        let mut s = self.lock();
        let loan = s.loan;
        for (model, share) in shares {
            match model {
                None => s.tenant.set_share(*share, now, loan),
                Some(m) => {
                    if let Some(scope) = s.models.get_mut(m) {
                        scope.set_share(*share, now, Loan::default());
                    }
                }
            }
        }
    }

    /// Take the activity counters (for the rebalancer) and start anew.
    pub(crate) fn take_activity(&self) -> Activity {
        let mut s = self.lock();
        let a = std::mem::take(&mut s.activity);
        // A negative rest (settlements below their reservations) carries on.
        s.activity.tokens = a.tokens.min(0);
        Activity {
            requests: a.requests,
            tokens: u64::try_from(a.tokens).unwrap_or(0),
            rate_refusals: a.rate_refusals,
        }
    }

    pub(crate) fn priority(&self) -> u8 {
        self.lock().priority
    }

    pub(crate) fn limits(&self) -> Limits {
        self.lock().tenant.limits
    }

    pub(crate) fn loan(&self) -> Loan {
        self.lock().loan
    }

    /// Start, change or end a loan. Capacity that becomes available — a loan
    /// that starts or grows, or lent capacity coming back to its owner — is
    /// credited to the bucket at once: a loan is a burst allowance, and a
    /// lender that returns has its capacity back, not only its refill rate.
    /// Capacity that goes away is capped off at the next refill.
    pub(crate) fn set_loan(&self, loan: Loan) {
        self.set_loan_at(loan, Instant::now());
    }

    fn set_loan_at(&self, loan: Loan, now: Instant) {
        let mut s = self.lock();
        let old = s.loan;
        let t = &mut s.tenant;
        if let (Some(b), Some(r)) = (&mut t.rpm, t.limits.rpm) {
            b.refill(r, old.rpm, now);
            b.credit((loan.rpm - old.rpm).max(0.0));
        }
        if let (Some(b), Some(r)) = (&mut t.tpm, t.limits.tpm) {
            b.refill(r, old.tpm, now);
            b.credit((loan.tpm - old.tpm).max(0.0));
        }
        s.loan = loan;
    }

    /// Everything a tenant may know about its own quota.
    pub(crate) fn report(&self, calendar: &Calendar) -> QuotaReport {
        let now = Instant::now();
        let ts = calendar.now();
        let w = calendar.windows(ts);
        let mut s = self.lock();
        let loan = s.loan;
        s.tenant.refresh(now, &w, loan);
        let mut scopes = vec![scope_report(None, &s.tenant, &w, loan)];
        let mut models: Vec<&String> = s.models.keys().collect();
        models.sort();
        let models: Vec<String> = models.into_iter().cloned().collect();
        for m in models {
            if let Some(scope) = s.models.get_mut(&m) {
                scope.refresh(now, &w, Loan::default());
                scopes.push(scope_report(Some(&m), scope, &w, Loan::default()));
            }
        }
        QuotaReport {
            tenant: self.id.clone(),
            priority: s.priority,
            loan_rpm: loan.rpm,
            loan_tpm: loan.tpm,
            scopes,
        }
    }
}

/// `GET /v1/collie/quota`.
#[derive(Debug, Serialize)]
pub(crate) struct QuotaReport {
    pub(crate) tenant: String,
    pub(crate) priority: u8,
    /// Rate capacity currently borrowed (positive) or lent (negative).
    pub(crate) loan_rpm: f64,
    pub(crate) loan_tpm: f64,
    pub(crate) scopes: Vec<ScopeReport>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ScopeReport {
    /// `null` for the tenant as a whole.
    pub(crate) model: Option<String>,
    pub(crate) windows: Vec<WindowReport>,
}

#[derive(Debug, Serialize)]
pub(crate) struct WindowReport {
    pub(crate) window: &'static str,
    /// Per-minute windows: the configured rate.
    pub(crate) limit: f64,
    /// Per-minute windows: what the bucket holds when full (burst plus any
    /// loan).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) burst: Option<f64>,
    pub(crate) used: f64,
    pub(crate) reserved: f64,
    pub(crate) remaining: f64,
    pub(crate) resets_at: Option<String>,
    /// Day and month windows shared by a fleet: what every sidecar used,
    /// as the authority last said (`used` and `reserved` are this
    /// sidecar's own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fleet_used: Option<f64>,
}

fn scope_report(model: Option<&str>, s: &Scope, w: &Windows, loan: Loan) -> ScopeReport {
    let mut windows = Vec::new();
    for (name, bucket, rate, extra) in [
        ("minute.requests", &s.rpm, s.limits.rpm, loan.rpm),
        ("minute.tokens", &s.tpm, s.limits.tpm, loan.tpm),
    ] {
        if let (Some(b), Some(r)) = (bucket, rate) {
            let ceiling = r.burst as f64 + extra;
            windows.push(WindowReport {
                window: name,
                limit: r.per_minute as f64,
                burst: Some(ceiling),
                // Drawn from the bucket and not yet refilled; more than the
                // burst while the bucket is in debt.
                used: ceiling - b.level(),
                reserved: 0.0,
                remaining: b.level().max(0.0),
                resets_at: None,
                fleet_used: None,
            });
        }
    }
    let (fleet_day, fleet_month) = s.fleet_used();
    for (prefix, budget, counter, end, fleet) in [
        ("day", &s.configured.day, &s.day, w.day_end, fleet_day),
        (
            "month",
            &s.configured.month,
            &s.month,
            w.month_end,
            fleet_month,
        ),
    ] {
        for (dim, limit, used, reserved, scale, fleet_used) in [
            (
                "requests",
                budget.requests,
                counter.used.requests,
                counter.reserved.requests,
                1.0,
                fleet.map(|f| f.requests),
            ),
            (
                "tokens",
                budget.tokens,
                counter.used.tokens,
                counter.reserved.tokens,
                1.0,
                fleet.map(|f| f.tokens),
            ),
            (
                "usd",
                budget.usd_nano,
                counter.used.usd_nano,
                counter.reserved.usd_nano,
                1e9,
                fleet.map(|f| f.usd_nano),
            ),
        ] {
            if let Some(limit) = limit {
                windows.push(WindowReport {
                    window: match (prefix, dim) {
                        ("day", d) => day_window(d),
                        (_, d) => month_window(d),
                    },
                    limit: limit as f64 / scale,
                    burst: None,
                    used: used as f64 / scale,
                    reserved: reserved as f64 / scale,
                    remaining: limit
                        .saturating_sub(fleet_used.unwrap_or(used).saturating_add(reserved))
                        as f64
                        / scale,
                    resets_at: Some(end.to_string()),
                    fleet_used: fleet_used.map(|u| u as f64 / scale),
                });
            }
        }
    }
    ScopeReport {
        model: model.map(str::to_string),
        windows,
    }
}

/// How a reservation ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Settled to the usage the provider reported.
    Reported,
    /// Settled to Collie's estimate: the provider reported none.
    Estimated,
    /// The provider answered with an error: one request, no tokens.
    Failed,
    /// Nothing reached a provider: everything given back.
    Refunded,
}

impl Settlement {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Settlement::Reported => "reported",
            Settlement::Estimated => "estimated",
            Settlement::Failed => "failed",
            Settlement::Refunded => "refunded",
        }
    }
}

/// A reservation held by one request. Settle it with what was used, refund
/// it, or drop it (which refunds).
#[derive(Debug)]
pub(crate) struct Reservation {
    ledger: Arc<TenantLedger>,
    /// Settlement rolls the windows to the day it happens in.
    calendar: Arc<Calendar>,
    model: Option<String>,
    amount: Amount,
    done: bool,
}

impl Reservation {
    pub(crate) fn amount(&self) -> Amount {
        self.amount
    }

    /// Replace the reservation by what was really used (more or less).
    pub(crate) fn settle(self, actual: Amount) {
        let ts = self.calendar.now();
        self.settle_at(actual, Instant::now(), ts);
    }

    fn settle_at(mut self, actual: Amount, now: Instant, ts: Timestamp) {
        self.done = true;
        let w = self.calendar.windows(ts);
        self.ledger
            .settle_at(self.model.as_deref(), self.amount, actual, &w, now);
    }

    /// Nothing was used: give everything back.
    pub(crate) fn refund(self) {
        self.settle(Amount::default());
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            let w = self.calendar.windows(self.calendar.now());
            self.ledger.settle_at(
                self.model.as_deref(),
                self.amount,
                Amount::default(),
                &w,
                Instant::now(),
            );
        }
    }
}

/// The quota ledger as the request path sees it, for one config: every
/// tenant's ledger (kept across reloads) and the calendar their day and
/// month windows follow. Admission is local: the ledger reserves or refuses
/// at once. Where a limit is shared by a fleet of sidecars, each one's
/// ledger holds only its share, and a refusal may be an empty share rather
/// than a spent limit: the [`Authority`] that holds the fleet's limit is
/// then asked for more before the refusal stands. Settlement stays local
/// (the reservation settles into the ledger it came from); the authority
/// learns what was used from the ledgers' counters.
pub(crate) struct Quota {
    ledgers: Vec<Arc<TenantLedger>>,
    calendar: Arc<Calendar>,
    authority: Option<Arc<dyn Authority>>,
}

/// How many times one request asks the authority for more.
const TOP_UPS: usize = 4;

/// Who holds a limit shared by more than one sidecar.
#[async_trait::async_trait]
pub(crate) trait Authority: Send + Sync {
    /// The local ledger refused `amount` for `tenant` in `refusal.window`
    /// (of the tenant's scope, or `model`'s): obtain more of that window for
    /// this sidecar, if the fleet has it. Bounded in time by the
    /// implementation.
    async fn top_up(
        &self,
        tenant: &Arc<TenantLedger>,
        model: &str,
        refusal: &Refusal,
        amount: Amount,
    ) -> TopUp;
}

/// What asking the authority for more gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TopUp {
    /// The share grew: ask the ledger again.
    Grown,
    /// Nothing more to be had: the refusal stands.
    Spent,
    /// The authority cannot be reached and the fleet refuses what its
    /// leases do not cover.
    Unavailable,
}

impl Quota {
    pub(crate) fn new(
        ledgers: Vec<Arc<TenantLedger>>,
        calendar: Arc<Calendar>,
        authority: Option<Arc<dyn Authority>>,
    ) -> Quota {
        Quota {
            ledgers,
            calendar,
            authority,
        }
    }

    /// Reserve `amount` for tenant `tenant` (its index in the config) and
    /// `model`, in every window or in none.
    pub(crate) async fn reserve(
        &self,
        tenant: usize,
        model: &str,
        amount: Amount,
    ) -> Result<Reservation, Refusal> {
        let Some(ledger) = self.ledgers.get(tenant) else {
            return Err(Refusal {
                window: "tenant".into(),
                kind: RefusalKind::QuotaExceeded,
                retry_after: Duration::ZERO,
            });
        };
        let refusal = match ledger.reserve(model, amount, &self.calendar) {
            Ok(r) => return Ok(r),
            Err(refusal) => refusal,
        };
        let Some(authority) = &self.authority else {
            return Err(refusal);
        };
        // Requests that ran out together share one answer: a share that grew
        // may be taken by the others first, so ask again (a few times).
        let mut refusal = refusal;
        for _ in 0..TOP_UPS {
            match authority.top_up(ledger, model, &refusal, amount).await {
                TopUp::Grown => match ledger.reserve(model, amount, &self.calendar) {
                    Ok(r) => return Ok(r),
                    Err(again) => refusal = again,
                },
                TopUp::Spent => return Err(refusal),
                TopUp::Unavailable => {
                    return Err(Refusal {
                        kind: RefusalKind::Unavailable,
                        retry_after: Duration::from_secs(1),
                        ..refusal
                    });
                }
            }
        }
        Err(refusal)
    }

    /// A tenant's ledger, by its index in the config.
    pub(crate) fn ledger(&self, tenant: usize) -> Option<&Arc<TenantLedger>> {
        self.ledgers.get(tenant)
    }

    /// Every tenant's ledger, in the config's order.
    pub(crate) fn ledgers(&self) -> &[Arc<TenantLedger>] {
        &self.ledgers
    }

    pub(crate) fn calendar(&self) -> &Arc<Calendar> {
        &self.calendar
    }
}

/// Every tenant's ledger, kept across reloads, and the clock its calendar
/// windows follow.
#[derive(Default)]
pub struct Ledger {
    tenants: Mutex<HashMap<String, Arc<TenantLedger>>>,
    clock: Clock,
    /// A fleet shares every limit: new tenants start with no share.
    shared: bool,
}

impl Ledger {
    /// A ledger whose limits a fleet of sidecars shares ([`fleet`]).
    pub(crate) fn shared() -> Ledger {
        Ledger {
            shared: true,
            ..Ledger::default()
        }
    }

    /// The wall clock every snapshot's calendar reads (pinnable in tests).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The ledger of a tenant with these limits: the existing one (limits
    /// updated, counts kept) or a new one. Tenants gone from the config are
    /// forgotten by [`Ledger::retain`].
    pub(crate) fn tenant(&self, id: &str, limits: &TenantLimits) -> Arc<TenantLedger> {
        let mut map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some(t) => {
                t.set_limits(limits);
                Arc::clone(t)
            }
            None => {
                let t = Arc::new(if self.shared {
                    TenantLedger::new_shared(id, limits)
                } else {
                    TenantLedger::new(id, limits)
                });
                map.insert(id.to_string(), Arc::clone(&t));
                t
            }
        }
    }

    pub(crate) fn retain(&self, ids: &[&str]) {
        let mut map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let keep: std::collections::HashSet<&str> = ids.iter().copied().collect();
        map.retain(|id, _| keep.contains(id.as_str()));
    }
}

#[cfg(test)]
#[expect(clippy::arithmetic_side_effects, reason = "tests on small numbers")]
#[expect(
    clippy::needless_range_loop,
    reason = "the reference model walks parallel per-scope arrays by index"
)]
mod tests {
    use super::*;

    use jiff::tz::TimeZone;
    use proptest::prelude::*;

    fn calendar() -> Arc<Calendar> {
        Arc::new(Calendar::new(TimeZone::UTC))
    }

    fn ledger(limits: Limits) -> (Arc<TenantLedger>, Arc<Calendar>) {
        let l = TenantLimits {
            priority: 3,
            limits,
            models: HashMap::new(),
        };
        (Arc::new(TenantLedger::new("t", &l)), calendar())
    }

    fn amt(tokens: u64) -> Amount {
        Amount {
            requests: 1,
            tokens,
            usd_nano: tokens * 10,
        }
    }

    fn rate(per_minute: u64, burst: u64) -> Option<Rate> {
        Some(Rate { per_minute, burst })
    }

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn day_used(t: &TenantLedger) -> (Amount, Amount) {
        let s = t.lock();
        (s.tenant.day.used, s.tenant.day.reserved)
    }

    /// A fleet's share: nothing before the first answer; a budget admits up
    /// to the allowance for its window only; a per-minute share credits the
    /// bucket with what is new to the sidecar, and a shrinking one caps it.
    #[test]
    fn a_fleet_share_bounds_every_window() {
        let l = TenantLimits {
            priority: 3,
            limits: Limits {
                rpm: rate(60, 60),
                day: Budget {
                    requests: Some(100),
                    ..Budget::default()
                },
                ..Limits::default()
            },
            models: HashMap::new(),
        };
        let t = Arc::new(TenantLedger::new_shared("t", &l));
        let cal = calendar();
        assert_eq!(
            t.reserve("m", amt(0), &cal).unwrap_err().window,
            "day.requests"
        );
        let day = cal.windows(cal.now()).day;
        let share = |allowed: u64, held: u64, fresh: u64| Share {
            day: Budget {
                requests: Some(allowed),
                ..Budget::default()
            },
            day_window: day,
            rpm: Some(held),
            rpm_fresh: Some(fresh),
            ..Share::default()
        };
        // 3 allowed, 30 per minute held and all of it new: a burst of 30.
        t.set_shares(&[(None, Some(share(3, 30, 30)))]);
        for _ in 0..3 {
            t.reserve("m", amt(0), &cal).unwrap().settle(amt(0));
        }
        assert_eq!(
            t.reserve("m", amt(0), &cal).unwrap_err().window,
            "day.requests"
        );
        // A large allowance: the rate share limits now (27 left of 30).
        t.set_shares(&[(None, Some(share(1000, 30, 0)))]);
        let mut n = 0;
        while let Ok(r) = t.reserve("m", amt(0), &cal) {
            r.settle(amt(0));
            n += 1;
        }
        assert_eq!(n, 27);
        // The share grows back to 30 from 10 with nothing new: no credit.
        t.set_shares(&[(None, Some(share(1000, 10, 0)))]);
        t.set_shares(&[(None, Some(share(1000, 30, 0)))]);
        assert_eq!(
            t.reserve("m", amt(0), &cal).unwrap_err().window,
            "minute.requests"
        );
        // 20 new to this sidecar: 20 credited.
        t.set_shares(&[(None, Some(share(1000, 50, 20)))]);
        let mut n = 0;
        while let Ok(r) = t.reserve("m", amt(0), &cal) {
            r.settle(amt(0));
            n += 1;
        }
        assert_eq!(n, 20);
        // A share for another day's window allows nothing today.
        t.set_shares(&[(
            None,
            Some(Share {
                day_window: day - 1,
                ..share(1000, 50, 50)
            }),
        )]);
        assert_eq!(
            t.reserve("m", amt(0), &cal).unwrap_err().window,
            "day.requests"
        );
    }

    #[test]
    fn all_or_nothing_and_settlement() {
        let (t, cal) = ledger(Limits {
            day: Budget {
                requests: Some(10),
                tokens: Some(1000),
                usd_nano: None,
            },
            ..Limits::default()
        });
        let r1 = t.reserve("m", amt(600), &cal).unwrap();
        let refused = t.reserve("m", amt(600), &cal).unwrap_err();
        assert_eq!(refused.window, "day.tokens");
        assert_eq!(refused.kind, RefusalKind::QuotaExceeded);
        assert_eq!(
            day_used(&t).1.requests,
            1,
            "the refused one reserved nothing"
        );
        r1.settle(amt(100));
        assert_eq!(day_used(&t), (amt(100), Amount::default()));
        let r2 = t.reserve("m", amt(900), &cal).unwrap();
        drop(r2);
        assert_eq!(
            day_used(&t),
            (amt(100), Amount::default()),
            "a dropped reservation is refunded"
        );
    }

    #[test]
    fn per_model_scope_is_checked_with_the_tenant() {
        let l = TenantLimits {
            priority: 1,
            limits: Limits::default(),
            models: HashMap::from([(
                "big".to_string(),
                Limits {
                    day: Budget {
                        requests: Some(1),
                        ..Budget::default()
                    },
                    ..Limits::default()
                },
            )]),
        };
        let t = Arc::new(TenantLedger::new("t", &l));
        let cal = calendar();
        let _a = t.reserve("big", amt(1), &cal).unwrap();
        assert_eq!(
            t.reserve("big", amt(1), &cal).unwrap_err().window,
            "model:big.day.requests"
        );
        assert!(t.reserve("small", amt(1), &cal).is_ok());
    }

    /// Out of its day budget and, at the same moment, of its per-minute
    /// rate: the tenant is told the budget is spent (until the day ends),
    /// not to come back in a second.
    #[test]
    fn a_spent_budget_wins_over_an_empty_rate_bucket() {
        let (t, cal) = ledger(Limits {
            rpm: rate(60, 1),
            day: Budget {
                requests: Some(1),
                ..Budget::default()
            },
            ..Limits::default()
        });
        t.reserve("m", amt(1), &cal).unwrap().settle(amt(1));
        let refused = t.reserve("m", amt(1), &cal).unwrap_err();
        assert_eq!(refused.window, "day.requests");
        assert_eq!(refused.kind, RefusalKind::QuotaExceeded);
        assert!(refused.retry_after > Duration::from_secs(1) || is_just_before_midnight());
        // Also across scopes: the tenant's rate is empty, the model's budget spent.
        let l = TenantLimits {
            priority: 1,
            limits: Limits {
                rpm: rate(60, 1),
                ..Limits::default()
            },
            models: HashMap::from([(
                "big".to_string(),
                Limits {
                    day: Budget {
                        requests: Some(1),
                        ..Budget::default()
                    },
                    ..Limits::default()
                },
            )]),
        };
        let t = Arc::new(TenantLedger::new("t", &l));
        t.reserve("big", amt(1), &cal).unwrap().settle(amt(1));
        let refused = t.reserve("big", amt(1), &cal).unwrap_err();
        assert_eq!(refused.window, "model:big.day.requests");
        assert_eq!(refused.kind, RefusalKind::QuotaExceeded);
    }

    fn is_just_before_midnight() -> bool {
        let w = Calendar::new(TimeZone::UTC).windows(Timestamp::now());
        w.day_end.duration_since(Timestamp::now()) < jiff::SignedDuration::from_secs(2)
    }

    #[test]
    fn large_request_is_admitted_from_a_full_token_bucket() {
        let (t, cal) = ledger(Limits {
            tpm: rate(100, 100),
            ..Limits::default()
        });
        let r = t.reserve("m", amt(500), &cal).unwrap();
        r.settle(amt(500));
        let refused = t.reserve("m", amt(1), &cal).unwrap_err();
        assert_eq!(refused.kind, RefusalKind::RateLimited);
        assert!(
            refused.retry_after > Duration::from_secs(200),
            "the debt is repaid first"
        );
    }

    /// Reserved at 23:59, settled at 00:01 before the tenant's next request:
    /// the use counts in the new day (where the reservation had carried
    /// over), not in the day that ended, where it would be wiped.
    #[test]
    fn settlement_after_midnight_counts_in_the_new_day() {
        let (t, _) = ledger(Limits {
            day: Budget {
                tokens: Some(1000),
                ..Budget::default()
            },
            month: Budget {
                tokens: Some(5000),
                ..Budget::default()
            },
            ..Limits::default()
        });
        let clock = Clock::default();
        let cal = Arc::new(Calendar::with_clock(TimeZone::UTC, clock.clone()));
        let now = Instant::now();
        let before = ts("2026-01-31T23:59:00Z");
        let after = ts("2026-02-01T00:01:00Z");
        let r = t.reserve_at("m", amt(300), &cal, now, before).unwrap();
        r.settle_at(amt(700), now, after);
        // The next request, in the new day: the 700 already count.
        let refused = t.reserve_at("m", amt(400), &cal, now, after).unwrap_err();
        assert_eq!(refused.window, "day.tokens");
        let (used, reserved) = day_used(&t);
        assert_eq!((used.tokens, reserved.tokens), (700, 0));
        assert_eq!(t.lock().tenant.month.used.tokens, 700, "a new month too");
        // The same through the public path, with the calendar's clock pinned.
        clock.pin(before);
        let r = t.reserve("m", amt(1), &cal).unwrap();
        clock.pin(ts("2026-02-02T00:00:01Z"));
        r.settle(amt(50));
        clock.pin(ts("2026-02-02T00:00:02Z"));
        assert_eq!(t.report(&cal).scopes[0].windows[0].used, 50.0);
    }

    #[test]
    fn rate_info_reports_the_tightest_window_with_its_configured_limit() {
        let l = TenantLimits {
            priority: 1,
            limits: Limits {
                rpm: rate(60, 5),
                tpm: rate(1000, 2000),
                day: Budget {
                    tokens: Some(10_000),
                    ..Budget::default()
                },
                ..Limits::default()
            },
            models: HashMap::from([(
                "big".to_string(),
                Limits {
                    day: Budget {
                        requests: Some(2),
                        ..Budget::default()
                    },
                    ..Limits::default()
                },
            )]),
        };
        let t = Arc::new(TenantLedger::new("t", &l));
        let cal = calendar();
        let _r = t.reserve("m", amt(100), &cal).unwrap();
        let info = t.rate_info(Some("m"), &cal);
        let req = info.requests.unwrap();
        // The configured rate, not the burst: remaining is the bucket's level.
        assert_eq!((req.limit, req.remaining), (60, 4));
        let tok = info.tokens.unwrap();
        // 1900 left per minute, 9900 in the day: the minute is tighter.
        assert_eq!((tok.limit, tok.remaining), (1000, 1900));
        // For the model with a day budget of 2, that is the tightest.
        let big = t.rate_info(Some("big"), &cal).requests.unwrap();
        assert_eq!((big.limit, big.remaining), (2, 2));
        assert!(big.reset > Duration::from_secs(1) || is_just_before_midnight());
        // Only a day budget: still reported.
        let (d, cal) = ledger(Limits {
            day: Budget {
                requests: Some(7),
                ..Budget::default()
            },
            ..Limits::default()
        });
        let _r = d.reserve("m", amt(1), &cal).unwrap();
        let info = d.rate_info(None, &cal);
        assert_eq!(info.requests.map(|w| (w.limit, w.remaining)), Some((7, 6)));
        assert_eq!(info.tokens, None, "no window limits tokens");
    }

    #[test]
    fn reload_keeps_counts() {
        let limits = |n| TenantLimits {
            priority: 3,
            limits: Limits {
                day: Budget {
                    requests: Some(n),
                    ..Budget::default()
                },
                ..Limits::default()
            },
            models: HashMap::new(),
        };
        let ledger = Ledger::default();
        let cal = calendar();
        let t = ledger.tenant("a", &limits(2));
        t.reserve("m", amt(1), &cal).unwrap().settle(amt(1));
        let again = ledger.tenant("a", &limits(1));
        assert!(Arc::ptr_eq(&t, &again));
        assert!(
            again.reserve("m", amt(1), &cal).is_err(),
            "the request already counted stays counted"
        );
    }

    /// A reload that changes a per-minute limit keeps what was drawn this
    /// minute: raised, the difference is available at once; lowered below
    /// what was used, the bucket owes it.
    #[test]
    fn reload_keeps_what_a_bucket_counted() {
        let with_rpm = |burst| TenantLimits {
            priority: 3,
            limits: Limits {
                rpm: rate(burst, burst),
                ..Limits::default()
            },
            models: HashMap::new(),
        };
        let now = Instant::now();
        let t = Arc::new(TenantLedger::new_at("t", &with_rpm(3), now));
        let cal = calendar();
        let at = Timestamp::now();
        for _ in 0..3 {
            t.reserve_at("m", amt(0), &cal, now, at)
                .unwrap()
                .settle_at(amt(0), now, at);
        }
        assert!(t.reserve_at("m", amt(0), &cal, now, at).is_err());
        t.set_limits_at(&with_rpm(5), now);
        for _ in 0..2 {
            t.reserve_at("m", amt(0), &cal, now, at)
                .unwrap()
                .settle_at(amt(0), now, at);
        }
        assert!(
            t.reserve_at("m", amt(0), &cal, now, at).is_err(),
            "5 in the minute, not 3 + 5"
        );
        t.set_limits_at(&with_rpm(2), now);
        assert_eq!(t.lock().tenant.rpm.as_ref().unwrap().level(), -3.0);
    }

    /// The rebalancer takes activity every interval; a settlement that comes
    /// after its reservation's interval was taken corrects the next one
    /// instead of being lost (or inventing use).
    #[test]
    fn activity_follows_real_use_across_intervals() {
        let (t, cal) = ledger(Limits::default());
        let r = t.reserve("m", amt(1000), &cal).unwrap();
        assert_eq!(t.take_activity().tokens, 1000, "demand shows at once");
        r.settle(amt(100));
        assert_eq!(t.take_activity().tokens, 0);
        let r = t.reserve("m", amt(1000), &cal).unwrap();
        r.settle(amt(1000));
        // 1000 + 1000 reserved, 100 + 1000 used: 1100 over the three intervals.
        assert_eq!(t.take_activity().tokens, 100);
        assert_eq!(t.take_activity().tokens, 0);
    }

    /// A loan is burst allowance at once; capacity coming back to a lender
    /// is there at once too. What goes away is capped off.
    #[test]
    fn loans_credit_capacity_when_they_start_and_when_it_returns() {
        let now = Instant::now();
        let limits = TenantLimits {
            priority: 1,
            limits: Limits {
                rpm: rate(6, 2),
                ..Limits::default()
            },
            models: HashMap::new(),
        };
        let t = Arc::new(TenantLedger::new_at("t", &limits, now));
        let cal = calendar();
        let at = Timestamp::now();
        for _ in 0..2 {
            t.reserve_at("m", amt(0), &cal, now, at)
                .unwrap()
                .settle_at(amt(0), now, at);
        }
        assert!(t.reserve_at("m", amt(0), &cal, now, at).is_err());
        t.set_loan_at(Loan { rpm: 3.0, tpm: 0.0 }, now);
        for _ in 0..3 {
            t.reserve_at("m", amt(0), &cal, now, at)
                .unwrap()
                .settle_at(amt(0), now, at);
        }
        assert!(t.reserve_at("m", amt(0), &cal, now, at).is_err());
        t.set_loan_at(Loan::default(), now);
        // A lender: lending caps it; the end of the loan gives it back.
        let lender = Arc::new(TenantLedger::new_at("l", &limits, now));
        lender.set_loan_at(
            Loan {
                rpm: -1.0,
                tpm: 0.0,
            },
            now,
        );
        lender
            .reserve_at("m", amt(0), &cal, now, at)
            .unwrap()
            .settle_at(amt(0), now, at);
        assert!(lender.reserve_at("m", amt(0), &cal, now, at).is_err());
        lender.set_loan_at(Loan::default(), now);
        lender
            .reserve_at("m", amt(0), &cal, now, at)
            .unwrap()
            .settle_at(amt(0), now, at);
    }

    /// The reference the property test holds the ledger to: counters per
    /// calendar window and buckets, with the refill left out (time jumps far
    /// enough to fill every bucket, or does not move).
    #[derive(Debug, Clone, Default)]
    struct Model {
        day: i64,
        month: i64,
        /// [tenant, model scope] × (day used, month used).
        used: [(Amount, Amount); 2],
        /// [tenant, model scope] × (rpm level, tpm level).
        level: [(f64, f64); 2],
    }

    const SCOPES: [Limits; 2] = [
        Limits {
            rpm: Some(Rate {
                per_minute: 30,
                burst: 20,
            }),
            tpm: Some(Rate {
                per_minute: 600,
                burst: 1500,
            }),
            day: Budget {
                requests: Some(40),
                tokens: Some(3000),
                usd_nano: Some(30_000),
            },
            month: Budget {
                requests: Some(100),
                tokens: Some(8000),
                usd_nano: Some(80_000),
            },
        },
        Limits {
            rpm: Some(Rate {
                per_minute: 10,
                burst: 10,
            }),
            tpm: Some(Rate {
                per_minute: 400,
                burst: 800,
            }),
            day: Budget {
                requests: None,
                tokens: Some(1500),
                usd_nano: None,
            },
            month: Budget {
                requests: None,
                tokens: None,
                usd_nano: Some(40_000),
            },
        },
    ];

    fn full(l: &Limits) -> (f64, f64) {
        (
            l.rpm.map_or(0.0, |r| r.burst as f64),
            l.tpm.map_or(0.0, |r| r.burst as f64),
        )
    }

    fn over(b: &Budget, a: Amount) -> bool {
        b.requests.is_some_and(|l| a.requests > l)
            || b.tokens.is_some_and(|l| a.tokens > l)
            || b.usd_nano.is_some_and(|l| a.usd_nano > l)
    }

    /// Settle, refund or drop in the reference: use counts in the current
    /// windows, the bucket gets back what was reserved and not used.
    fn give_back(m: &mut Model, reserved: Amount, actual: Amount, scoped: bool) {
        for s in 0..if scoped { 2 } else { 1 } {
            m.used[s].0 = m.used[s].0.saturating_add(actual);
            m.used[s].1 = m.used[s].1.saturating_add(actual);
            let (rpm, tpm) = full(&SCOPES[s]);
            let l = &mut m.level[s];
            l.0 = (l.0 + reserved.requests as f64 - actual.requests as f64).min(rpm);
            l.1 = (l.1 + reserved.tokens as f64 - actual.tokens as f64).min(tpm);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// On the model with its own scope, or on another one.
        Reserve {
            scoped: bool,
            tokens: u64,
        },
        Settle(usize, u64),
        Refund(usize),
        Drop(usize),
        /// Hours: far enough to refill every bucket, often into a new day
        /// or month.
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<bool>(), 1u64..400).prop_map(|(scoped, tokens)| Op::Reserve { scoped, tokens }),
            3 => (0usize..8, 0u64..700).prop_map(|(i, n)| Op::Settle(i, n)),
            1 => (0usize..8).prop_map(Op::Refund),
            1 => (0usize..8).prop_map(Op::Drop),
            1 => (4u64..40).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Over any sequence of reserve / settle / refund / drop and jumps
        /// in time (across days and months), for the tenant and a per-model
        /// scope, in every window (per-minute requests and tokens, day and
        /// month requests, tokens and USD):
        /// - admission is exactly what the limits allow (budgets before rates);
        /// - a day or month counter's `reserved` is the sum of the
        ///   reservations held, its `used` the sum settled since the window
        ///   began, and what was settled in all windows is what was settled;
        /// - a bucket holds its burst less what is held and what was used
        ///   since it was last full (a settlement above the reservation can
        ///   leave it in debt, never over its burst);
        /// - an admitted reservation never takes a budget past its limit.
        #[test]
        fn ledger_conserves_totals(ops in proptest::collection::vec(op(), 1..200)) {
            let limits = TenantLimits {
                priority: 3,
                limits: SCOPES[0],
                models: HashMap::from([("big".to_string(), SCOPES[1])]),
            };
            // Ahead of the real clock: the paths that read it (drop, refund)
            // then see no time pass, and the reference needs no refill.
            let mut now = Instant::now() + Duration::from_secs(10 * 365 * 86_400);
            let t = Arc::new(TenantLedger::new_at("t", &limits, now));
            let clock = Clock::default();
            let cal = Arc::new(Calendar::with_clock(TimeZone::UTC, clock.clone()));
            let mut at = ts("2026-01-30T20:00:00Z");
            clock.pin(at);
            let w0 = cal.windows(at);
            let mut m = Model {
                day: w0.day,
                month: w0.month,
                level: [full(&SCOPES[0]), full(&SCOPES[1])],
                ..Model::default()
            };
            // Held reservations, and whether each is in the model scope.
            let mut held: Vec<(Reservation, bool)> = Vec::new();
            let mut settled_total = Amount::default();
            // Settled into tenant day windows that have ended.
            let mut rolled_away = Amount::default();
            let in_flight = |held: &[(Reservation, bool)], scope: usize| {
                held.iter()
                    .filter(|(_, scoped)| scope == 0 || *scoped)
                    .fold(Amount::default(), |a, (r, _)| a.saturating_add(r.amount()))
            };
            for op in ops {
                match op {
                    Op::Reserve { scoped, tokens } => {
                        let a = amt(tokens);
                        let model = if scoped { "big" } else { "other" };
                        let scopes = if scoped { 2 } else { 1 };
                        let budget_refusal = (0..scopes).any(|s| {
                            let f = in_flight(&held, s).saturating_add(a);
                            over(&SCOPES[s].day, m.used[s].0.saturating_add(f))
                                || over(&SCOPES[s].month, m.used[s].1.saturating_add(f))
                        });
                        let rate_refusal = (0..scopes).any(|s| {
                            let tpm = full(&SCOPES[s]).1;
                            m.level[s].0 < 1.0 || m.level[s].1 < (tokens as f64).min(tpm.max(1.0)).ceil()
                        });
                        match t.reserve_at(model, a, &cal, now, at) {
                            Ok(r) => {
                                prop_assert!(!budget_refusal && !rate_refusal, "admitted past a limit");
                                for s in 0..scopes {
                                    m.level[s].0 -= 1.0;
                                    m.level[s].1 -= tokens as f64;
                                }
                                held.push((r, scoped));
                                // Reservations never take a budget past its limit.
                                for s in 0..scopes {
                                    let f = in_flight(&held, s);
                                    prop_assert!(!over(&SCOPES[s].day, m.used[s].0.saturating_add(f)));
                                    prop_assert!(!over(&SCOPES[s].month, m.used[s].1.saturating_add(f)));
                                }
                            }
                            Err(refusal) => {
                                prop_assert!(budget_refusal || rate_refusal, "refused within limits: {refusal:?}");
                                let kind = if budget_refusal { RefusalKind::QuotaExceeded } else { RefusalKind::RateLimited };
                                prop_assert_eq!(refusal.kind, kind, "budgets are checked before rates");
                            }
                        }
                    }
                    Op::Settle(i, n) if i < held.len() => {
                        let (r, scoped) = held.remove(i);
                        let reserved = r.amount();
                        r.settle_at(amt(n), now, at);
                        give_back(&mut m, reserved, amt(n), scoped);
                        settled_total = settled_total.saturating_add(amt(n));
                    }
                    Op::Refund(i) if i < held.len() => {
                        let (r, scoped) = held.remove(i);
                        let reserved = r.amount();
                        r.refund();
                        give_back(&mut m, reserved, Amount::default(), scoped);
                    }
                    Op::Drop(i) if i < held.len() => {
                        let (r, scoped) = held.remove(i);
                        let reserved = r.amount();
                        drop(r);
                        give_back(&mut m, reserved, Amount::default(), scoped);
                    }
                    Op::Advance(hours) => {
                        now += Duration::from_secs(hours * 3600);
                        at = at.checked_add(jiff::SignedDuration::from_hours(hours as i64)).unwrap();
                        clock.pin(at);
                        m.level = [full(&SCOPES[0]), full(&SCOPES[1])];
                        let w = cal.windows(at);
                        if w.day != m.day {
                            rolled_away = rolled_away.saturating_add(m.used[0].0);
                            m.used[0].0 = Amount::default();
                            m.used[1].0 = Amount::default();
                            m.day = w.day;
                        }
                        if w.month != m.month {
                            m.used[0].1 = Amount::default();
                            m.used[1].1 = Amount::default();
                            m.month = w.month;
                        }
                    }
                    _ => {}
                }
                // The ledger as it stands now: windows rolled and buckets
                // refilled to `now`.
                let w = cal.windows(at);
                let mut s = t.lock();
                s.tenant.refresh(now, &w, Loan::default());
                if let Some(big) = s.models.get_mut("big") {
                    big.refresh(now, &w, Loan::default());
                }
                let model_scope = s.models.get("big").unwrap();
                for (i, scope) in [&s.tenant, model_scope].into_iter().enumerate() {
                    let f = in_flight(&held, i);
                    prop_assert_eq!(scope.day.reserved, f);
                    prop_assert_eq!(scope.month.reserved, f);
                    prop_assert_eq!(scope.day.used, m.used[i].0);
                    prop_assert_eq!(scope.month.used, m.used[i].1);
                    let levels = (scope.rpm.as_ref().unwrap().level(), scope.tpm.as_ref().unwrap().level());
                    prop_assert_eq!(levels, m.level[i]);
                    let (rpm, tpm) = full(&SCOPES[i]);
                    prop_assert!(levels.0 <= rpm && levels.1 <= tpm, "never over the burst");
                }
            }
            // Every reservation let go: nothing in flight, and every token
            // settled is in exactly one day window.
            held.clear();
            let s = t.lock();
            prop_assert_eq!(s.tenant.day.reserved, Amount::default());
            prop_assert_eq!(s.tenant.month.reserved, Amount::default());
            prop_assert_eq!(s.tenant.day.used, m.used[0].0);
            prop_assert_eq!(rolled_away.saturating_add(m.used[0].0), settled_total);
        }
    }
}
