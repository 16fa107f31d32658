//! The quota ledger: per tenant (and optionally per tenant × model), one
//! atomic reservation across every window — per-minute request and token
//! buckets with bursts, daily and monthly request/token/USD budgets — then
//! settlement to what the upstream really used, or a full refund.
//!
//! Invariants:
//! - A reservation either takes from every window or from none.
//! - A reservation is settled or refunded exactly once; dropping it unsettled
//!   (a panic, a cancelled task) refunds it.
//! - Counters never go below zero; a bucket may owe tokens after a request
//!   used more than it reserved, and that debt is repaid before more is admitted.
//! - Usage a request reserves counts against the limits while it is in flight,
//!   so concurrent requests cannot slip past a budget; the only overshoot is a
//!   request using more than it reserved.
//!
//! Priority admission to saturated pools is in [`admission`]; lending of
//! spare rate capacity in [`rebalance`].

pub mod admission;
pub mod estimate;
pub mod rebalance;
pub mod window;

use jiff::Timestamp;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
pub use window::{Amount, Budget, Calendar, Limits, Rate, Windows};
use window::{Bucket, Counter};

/// Every window name, as used in refusals and reports.
pub const WINDOWS: [&str; 8] = [
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
pub struct Refusal {
    /// `minute.requests`, `minute.tokens`, `day.tokens`, `month.usd`, … prefixed
    /// with `model:<name>.` for a per-model scope.
    pub window: String,
    pub kind: RefusalKind,
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// A per-minute rate: waiting helps soon.
    RateLimited,
    /// A daily or monthly budget: spent until the window ends.
    QuotaExceeded,
}

/// Rate-limit state for the `x-ratelimit-*` response headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateInfo {
    pub requests: Option<WindowInfo>,
    pub tokens: Option<WindowInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowInfo {
    pub limit: u64,
    pub remaining: u64,
    /// Until the window is whole again.
    pub reset: Duration,
}

/// One scope's windows.
#[derive(Debug)]
struct Scope {
    limits: Limits,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    day: Counter,
    month: Counter,
}

impl Scope {
    fn new(limits: Limits, now: Instant) -> Scope {
        Scope {
            limits,
            rpm: limits.rpm.map(|r| Bucket::full(r, now)),
            tpm: limits.tpm.map(|r| Bucket::full(r, now)),
            day: Counter::default(),
            month: Counter::default(),
        }
    }

    /// New limits from a reload; what was counted stays.
    fn set_limits(&mut self, limits: Limits, now: Instant) {
        if self.rpm.is_none() {
            self.rpm = limits.rpm.map(|r| Bucket::full(r, now));
        }
        if self.tpm.is_none() {
            self.tpm = limits.tpm.map(|r| Bucket::full(r, now));
        }
        if limits.rpm.is_none() {
            self.rpm = None;
        }
        if limits.tpm.is_none() {
            self.tpm = None;
        }
        self.limits = limits;
    }

    fn refresh(&mut self, now: Instant, w: &Windows, loan: Loan) {
        if let (Some(b), Some(r)) = (&mut self.rpm, self.limits.rpm) {
            b.refill(r, loan.rpm, now);
        }
        if let (Some(b), Some(r)) = (&mut self.tpm, self.limits.tpm) {
            b.refill(r, loan.tpm, now);
        }
        self.day.roll(w.day);
        self.month.roll(w.month);
    }

    /// Check every window; nothing is taken here.
    fn check(
        &self,
        amount: Amount,
        w: &Windows,
        now: Timestamp,
        loan: Loan,
    ) -> Result<(), (&'static str, RefusalKind, Duration)> {
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
            // A request larger than the whole burst is admitted from a full
            // bucket (and leaves it in debt) rather than never.
            let ceiling = (r.burst as f64 + loan.tpm).max(1.0);
            let need = (amount.tokens as f64).min(ceiling).ceil() as u64;
            if !b.can_take(need) {
                return Err((
                    "minute.tokens",
                    RefusalKind::RateLimited,
                    b.wait_for(need, r, loan.tpm),
                ));
            }
        }
        let until =
            |end: Timestamp| Duration::try_from(end.duration_since(now)).unwrap_or(Duration::ZERO);
        if let Some(dim) = self.day.exceeds(&self.limits.day, amount) {
            return Err((
                day_window(dim),
                RefusalKind::QuotaExceeded,
                until(w.day_end),
            ));
        }
        if let Some(dim) = self.month.exceeds(&self.limits.month, amount) {
            return Err((
                month_window(dim),
                RefusalKind::QuotaExceeded,
                until(w.month_end),
            ));
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
pub struct Loan {
    pub rpm: f64,
    pub tpm: f64,
}

/// Traffic seen since the rebalancer last looked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Activity {
    pub requests: u64,
    pub tokens: u64,
    /// Refused by a per-minute rate.
    pub rate_refusals: u64,
}

#[derive(Debug)]
struct TenantState {
    priority: u8,
    tenant: Scope,
    models: HashMap<String, Scope>,
    loan: Loan,
    activity: Activity,
}

/// One tenant's ledger. Lives across reloads: a reload changes its limits and
/// keeps what it counted.
#[derive(Debug)]
pub struct TenantLedger {
    pub id: String,
    state: Mutex<TenantState>,
}

/// The limits of one tenant as configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantLimits {
    pub priority: u8,
    pub limits: Limits,
    pub models: HashMap<String, Limits>,
}

impl TenantLedger {
    pub fn new(id: &str, limits: &TenantLimits) -> TenantLedger {
        let now = Instant::now();
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
                activity: Activity::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TenantState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_limits(&self, limits: &TenantLimits) {
        let now = Instant::now();
        let mut s = self.lock();
        s.priority = limits.priority;
        s.tenant.set_limits(limits.limits, now);
        s.models.retain(|m, _| limits.models.contains_key(m));
        for (m, l) in &limits.models {
            match s.models.get_mut(m) {
                Some(scope) => scope.set_limits(*l, now),
                None => {
                    s.models.insert(m.clone(), Scope::new(*l, now));
                }
            }
        }
    }

    /// Reserve `amount` in every window of the tenant and of its scope for
    /// `model`, or in none.
    pub fn reserve(
        self: &Arc<Self>,
        model: &str,
        amount: Amount,
        calendar: &Calendar,
    ) -> Result<Reservation, Refusal> {
        let now = Instant::now();
        let ts = Timestamp::now();
        let w = calendar.windows(ts);
        let mut s = self.lock();
        let loan = s.loan;
        s.tenant.refresh(now, &w, loan);
        let has_model_scope = s.models.contains_key(model);
        if let Some(m) = s.models.get_mut(model) {
            m.refresh(now, &w, Loan::default());
        }
        let checked = s
            .tenant
            .check(amount, &w, ts, loan)
            .map_err(|(win, kind, wait)| (win.to_string(), kind, wait));
        let checked = checked.and_then(|()| match s.models.get(model) {
            Some(m) => m
                .check(amount, &w, ts, Loan::default())
                .map_err(|(win, kind, wait)| (format!("model:{model}.{win}"), kind, wait)),
            None => Ok(()),
        });
        if let Err((window, kind, retry_after)) = checked {
            if kind == RefusalKind::RateLimited {
                s.activity.rate_refusals += 1;
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
        s.activity.requests += amount.requests;
        s.activity.tokens += amount.tokens;
        drop(s);
        Ok(Reservation {
            ledger: Arc::clone(self),
            model: has_model_scope.then(|| model.to_string()),
            amount,
            done: false,
        })
    }

    fn settle(&self, model: Option<&str>, reserved: Amount, actual: Amount) {
        let mut s = self.lock();
        let loan = s.loan;
        s.tenant.settle(reserved, actual, loan);
        if let Some(m) = model.and_then(|m| s.models.get_mut(m)) {
            m.settle(reserved, actual, Loan::default());
        }
        // Activity follows real use.
        s.activity.tokens = s
            .activity
            .tokens
            .saturating_sub(reserved.tokens)
            .saturating_add(actual.tokens);
    }

    /// The minute windows for the `x-ratelimit-*` headers.
    pub fn rate_info(&self) -> RateInfo {
        let now = Instant::now();
        let mut s = self.lock();
        let loan = s.loan;
        let info = |b: &mut Bucket, r: Rate, extra: f64| {
            b.refill(r, extra, now);
            let ceiling = (r.burst as f64 + extra).max(0.0);
            WindowInfo {
                limit: ceiling as u64,
                remaining: b.level().max(0.0) as u64,
                reset: b.wait_for(ceiling.ceil() as u64, r, extra),
            }
        };
        let rpm = s.tenant.limits.rpm;
        let tpm = s.tenant.limits.tpm;
        RateInfo {
            requests: s
                .tenant
                .rpm
                .as_mut()
                .zip(rpm)
                .map(|(b, r)| info(b, r, loan.rpm)),
            tokens: s
                .tenant
                .tpm
                .as_mut()
                .zip(tpm)
                .map(|(b, r)| info(b, r, loan.tpm)),
        }
    }

    /// Take the activity counters (for the rebalancer) and start anew.
    pub fn take_activity(&self) -> Activity {
        std::mem::take(&mut self.lock().activity)
    }

    pub fn priority(&self) -> u8 {
        self.lock().priority
    }

    pub fn limits(&self) -> Limits {
        self.lock().tenant.limits
    }

    pub fn loan(&self) -> Loan {
        self.lock().loan
    }

    pub fn set_loan(&self, loan: Loan) {
        self.lock().loan = loan;
    }

    /// Everything a tenant may know about its own quota.
    pub fn report(&self, calendar: &Calendar) -> QuotaReport {
        let now = Instant::now();
        let ts = Timestamp::now();
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
pub struct QuotaReport {
    pub tenant: String,
    pub priority: u8,
    /// Rate capacity currently borrowed (positive) or lent (negative).
    pub loan_rpm: f64,
    pub loan_tpm: f64,
    pub scopes: Vec<ScopeReport>,
}

#[derive(Debug, Serialize)]
pub struct ScopeReport {
    /// `null` for the tenant as a whole.
    pub model: Option<String>,
    pub windows: Vec<WindowReport>,
}

#[derive(Debug, Serialize)]
pub struct WindowReport {
    pub window: &'static str,
    pub limit: f64,
    pub used: f64,
    pub reserved: f64,
    pub remaining: f64,
    pub resets_at: Option<String>,
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
                limit: ceiling,
                used: (ceiling - b.level()).max(0.0),
                reserved: 0.0,
                remaining: b.level().max(0.0),
                resets_at: None,
            });
        }
    }
    for (prefix, budget, counter, end) in [
        ("day", &s.limits.day, &s.day, w.day_end),
        ("month", &s.limits.month, &s.month, w.month_end),
    ] {
        for (dim, limit, used, reserved, scale) in [
            (
                "requests",
                budget.requests,
                counter.used.requests,
                counter.reserved.requests,
                1.0,
            ),
            (
                "tokens",
                budget.tokens,
                counter.used.tokens,
                counter.reserved.tokens,
                1.0,
            ),
            (
                "usd",
                budget.usd_nano,
                counter.used.usd_nano,
                counter.reserved.usd_nano,
                1e9,
            ),
        ] {
            if let Some(limit) = limit {
                windows.push(WindowReport {
                    window: match (prefix, dim) {
                        ("day", d) => day_window(d),
                        (_, d) => month_window(d),
                    },
                    limit: limit as f64 / scale,
                    used: used as f64 / scale,
                    reserved: reserved as f64 / scale,
                    remaining: limit.saturating_sub(used + reserved) as f64 / scale,
                    resets_at: Some(end.to_string()),
                });
            }
        }
    }
    ScopeReport {
        model: model.map(str::to_string),
        windows,
    }
}

/// A reservation held by one request. Settle it with what was used, refund
/// it, or drop it (which refunds).
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<TenantLedger>,
    model: Option<String>,
    amount: Amount,
    done: bool,
}

impl Reservation {
    pub fn amount(&self) -> Amount {
        self.amount
    }

    /// Replace the reservation by what was really used (more or less).
    pub fn settle(mut self, actual: Amount) {
        self.done = true;
        self.ledger
            .settle(self.model.as_deref(), self.amount, actual);
    }

    /// Nothing was used: give everything back.
    pub fn refund(self) {
        self.settle(Amount::default());
    }

    pub fn ledger(&self) -> &Arc<TenantLedger> {
        &self.ledger
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            self.ledger
                .settle(self.model.as_deref(), self.amount, Amount::default());
        }
    }
}

/// A provider key's own per-minute limits: selection skips a deployment
/// whose bucket cannot take the request, so Collie does not drive a key into
/// the provider's 429s.
#[derive(Debug)]
pub struct ProviderLimiter {
    rpm: Option<(Rate, Mutex<Bucket>)>,
    tpm: Option<(Rate, Mutex<Bucket>)>,
}

impl ProviderLimiter {
    /// `None` when the deployment has no limits.
    pub fn new(rpm: Option<u64>, tpm: Option<u64>) -> Option<ProviderLimiter> {
        let now = Instant::now();
        let bucket = |n: u64| {
            let r = Rate {
                per_minute: n,
                burst: n,
            };
            (r, Mutex::new(Bucket::full(r, now)))
        };
        (rpm.is_some() || tpm.is_some()).then(|| ProviderLimiter {
            rpm: rpm.map(bucket),
            tpm: tpm.map(bucket),
        })
    }

    /// Take one request and `tokens` if both fit; else how long until they do.
    pub fn try_take(&self, tokens: u64) -> Result<(), Duration> {
        self.admit(tokens, true)
    }

    /// What [`Self::try_take`] would answer, taking nothing (routing's
    /// look-ahead and the status view).
    pub fn check(&self, tokens: u64) -> Result<(), Duration> {
        self.admit(tokens, false)
    }

    fn admit(&self, tokens: u64, take: bool) -> Result<(), Duration> {
        let now = Instant::now();
        let mut rpm = self.rpm.as_ref().map(|(r, b)| (*r, lock(b)));
        let mut tpm = self.tpm.as_ref().map(|(r, b)| (*r, lock(b)));
        let mut wait = Duration::ZERO;
        if let Some((r, b)) = &mut rpm {
            b.refill(*r, 0.0, now);
            if !b.can_take(1) {
                wait = wait.max(b.wait_for(1, *r, 0.0));
            }
        }
        // As for tenants: a request bigger than the burst goes from a full bucket.
        let need = |r: Rate| tokens.min(r.burst);
        if let Some((r, b)) = &mut tpm {
            b.refill(*r, 0.0, now);
            if !b.can_take(need(*r)) {
                wait = wait.max(b.wait_for(need(*r), *r, 0.0));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if !take {
            return Ok(());
        }
        if let Some((_, b)) = &mut rpm {
            b.take(1);
        }
        if let Some((_, b)) = &mut tpm {
            b.take(tokens);
        }
        Ok(())
    }

    /// Correct a take of `taken` tokens to what was used.
    pub fn settle_tokens(&self, taken: u64, used: u64) {
        if let Some((r, b)) = &self.tpm {
            let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
            b.adjust(taken as f64 - used as f64, r.burst as f64);
        }
    }
}

fn lock(m: &Mutex<Bucket>) -> MutexGuard<'_, Bucket> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every tenant's ledger, kept across reloads.
#[derive(Default)]
pub struct Ledger {
    tenants: Mutex<HashMap<String, Arc<TenantLedger>>>,
}

impl Ledger {
    /// The ledger of a tenant with these limits: the existing one (limits
    /// updated, counts kept) or a new one. Tenants gone from the config are
    /// forgotten by [`Ledger::retain`].
    pub fn tenant(&self, id: &str, limits: &TenantLimits) -> Arc<TenantLedger> {
        let mut map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some(t) => {
                t.set_limits(limits);
                Arc::clone(t)
            }
            None => {
                let t = Arc::new(TenantLedger::new(id, limits));
                map.insert(id.to_string(), Arc::clone(&t));
                t
            }
        }
    }

    pub fn retain(&self, ids: &[&str]) {
        let mut map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let keep: std::collections::HashSet<&str> = ids.iter().copied().collect();
        map.retain(|id, _| keep.contains(id.as_str()));
    }

    pub fn all(&self) -> Vec<Arc<TenantLedger>> {
        let map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        map.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::tz::TimeZone;
    use proptest::prelude::*;

    fn ledger(limits: Limits) -> (Arc<TenantLedger>, Calendar) {
        let l = TenantLimits {
            priority: 3,
            limits,
            models: HashMap::new(),
        };
        (
            Arc::new(TenantLedger::new("t", &l)),
            Calendar::new(TimeZone::UTC),
        )
    }

    fn amt(tokens: u64) -> Amount {
        Amount {
            requests: 1,
            tokens,
            usd_nano: tokens * 10,
        }
    }

    fn day_used(t: &TenantLedger) -> (Amount, Amount) {
        let s = t.lock();
        (s.tenant.day.used, s.tenant.day.reserved)
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
        let cal = Calendar::new(TimeZone::UTC);
        let _a = t.reserve("big", amt(1), &cal).unwrap();
        assert_eq!(
            t.reserve("big", amt(1), &cal).unwrap_err().window,
            "model:big.day.requests"
        );
        assert!(t.reserve("small", amt(1), &cal).is_ok());
    }

    #[test]
    fn large_request_is_admitted_from_a_full_token_bucket() {
        let (t, cal) = ledger(Limits {
            tpm: Some(Rate {
                per_minute: 100,
                burst: 100,
            }),
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
        let cal = Calendar::new(TimeZone::UTC);
        let t = ledger.tenant("a", &limits(2));
        t.reserve("m", amt(1), &cal).unwrap().settle(amt(1));
        let again = ledger.tenant("a", &limits(1));
        assert!(Arc::ptr_eq(&t, &again));
        assert!(
            again.reserve("m", amt(1), &cal).is_err(),
            "the request already counted stays counted"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(u64),
        Settle(usize, u64),
        Refund(usize),
        Drop(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..400).prop_map(Op::Reserve),
            (0usize..8, 0u64..600).prop_map(|(i, n)| Op::Settle(i, n)),
            (0usize..8).prop_map(Op::Refund),
            (0usize..8).prop_map(Op::Drop),
        ]
    }

    proptest! {
        /// Over any sequence: nothing negative, reservations in flight equal
        /// the sum of those held, and settled use equals the sum of what was
        /// settled; admitted reservations never exceed the budget.
        #[test]
        fn ledger_conserves_totals(ops in proptest::collection::vec(op(), 1..200)) {
            let budget = 2000u64;
            let (t, cal) = ledger(Limits {
                day: Budget { requests: Some(50), tokens: Some(budget), usd_nano: None },
                month: Budget { requests: None, tokens: Some(budget * 2), usd_nano: Some(budget * 20) },
                ..Limits::default()
            });
            let mut held: Vec<Reservation> = Vec::new();
            let mut settled = Amount::default();
            for op in ops {
                match op {
                    Op::Reserve(n) => {
                        if let Ok(r) = t.reserve("m", amt(n), &cal) {
                            held.push(r);
                        }
                    }
                    Op::Settle(i, n) if i < held.len() => {
                        let r = held.remove(i);
                        settled = settled.saturating_add(amt(n));
                        r.settle(amt(n));
                    }
                    Op::Refund(i) if i < held.len() => held.remove(i).refund(),
                    Op::Drop(i) if i < held.len() => drop(held.remove(i)),
                    _ => {}
                }
                let in_flight = held.iter().fold(Amount::default(), |a, r| a.saturating_add(r.amount()));
                let (used, reserved) = day_used(&t);
                prop_assert_eq!(reserved, in_flight);
                prop_assert_eq!(used, settled);
                // Reservations alone never pass the budget.
                prop_assert!(in_flight.tokens <= budget);
            }
            held.clear();
            prop_assert_eq!(day_used(&t), (settled, Amount::default()));
        }
    }
}
