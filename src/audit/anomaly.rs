//! Anomaly rules over the stream of records, per tenant, per end user and
//! globally: request rate, failure ratio, hourly cost, one request's
//! tokens, the same request repeated, and a per-tenant baseline (EWMA of
//! tokens and cost per minute) flagging z-score spikes. What they find goes
//! to the alert pipeline ([`crate::alerts`]) as [`Raised`] findings, each
//! with its severity and recommendation. Time is the records' own, so the rules
//! are deterministic for a given sequence; only the baseline is also judged
//! on the writer's clock ([`Detector::tick`]), so a spike followed by
//! silence is not left waiting for a next record.
//!
//! State is in memory, per sidecar: in a fleet each sidecar judges its own
//! traffic, and a restart starts every window and baseline afresh.

use super::record::Record;
use crate::alerts::{Raised, Scope, Severity};
use crate::config::AnomalySettings;
use std::collections::HashMap;

/// Counts of one scope in `W` slices of the window, and in `H` slices of
/// the last hour.
struct Counts<const W: usize, const H: usize> {
    window: [(i64, u64, u64); W],
    hour: [(i64, u64); H],
}

/// A tenant's or all tenants' counts: the window in 60 slices, the hour by
/// the minute.
type Wide = Counts<60, 60>;
/// An end user's: 12 slices each (the hour in 5-minute slices), about 500
/// bytes a user.
type Narrow = Counts<12, 12>;

impl<const W: usize, const H: usize> Default for Counts<W, H> {
    fn default() -> Self {
        Counts {
            window: [(i64::MIN, 0, 0); W],
            hour: [(i64::MIN, 0); H],
        }
    }
}

impl<const W: usize, const H: usize> Counts<W, H> {
    fn slices(now: i64, window_ms: i64) -> (i64, i64) {
        let slice_ms = (window_ms / W as i64).max(1);
        let hour_ms = (3_600_000 / H as i64).max(1);
        (now / slice_ms, now / hour_ms)
    }

    /// Count a record at `now`; returns the window's (requests, failures)
    /// and the hour's cost after it.
    fn add(&mut self, now: i64, window_ms: i64, failed: bool, cost: u64) -> ((u64, u64), u64) {
        let (slice, part) = Self::slices(now, window_ms);
        let w = &mut self.window[(slice.rem_euclid(W as i64)) as usize];
        if w.0 != slice {
            *w = (slice, 0, 0);
        }
        w.1 += 1;
        w.2 += u64::from(failed);
        let h = &mut self.hour[(part.rem_euclid(H as i64)) as usize];
        if h.0 != part {
            *h = (part, 0);
        }
        h.1 += cost;
        let window = self
            .window
            .iter()
            .filter(|(s, _, _)| slice.saturating_sub(*s) < W as i64)
            .fold((0, 0), |(r, f), (_, br, bf)| (r + br, f + bf));
        let hour = self
            .hour
            .iter()
            .filter(|(m, _)| part.saturating_sub(*m) < H as i64)
            .map(|(_, c)| c)
            .sum();
        (window, hour)
    }
}

/// One end user of a tenant: counts, when each rule last fired, when the
/// user was last seen (the least recently seen are forgotten first).
#[derive(Default)]
struct User {
    counts: Narrow,
    fired: HashMap<&'static str, i64>,
    seen: i64,
}

/// Who a rule judged.
#[derive(Clone, Copy)]
enum Who<'a> {
    All,
    Tenant(&'a str),
    User(&'a str, &'a str),
}

impl Who<'_> {
    fn scope(self) -> Scope {
        match self {
            Who::All => Scope::Global,
            Who::Tenant(t) => Scope::Tenant { tenant: t.into() },
            Who::User(t, u) => Scope::User {
                tenant: t.into(),
                user: u.into(),
            },
        }
    }

    fn name(self) -> String {
        match self {
            Who::All => "all tenants".into(),
            Who::Tenant(t) => t.into(),
            Who::User(t, u) => format!("user {u} of {t}"),
        }
    }
}

/// Each rule's severity and what to do when it fires.
pub(crate) fn rule_meta(rule: &str) -> (Severity, &'static str) {
    match rule {
        "request_rate" => (
            Severity::Warning,
            "Look for a loop or a retry storm in the caller; lower its rpm quota if the traffic is unwanted.",
        ),
        "failure_ratio" => (
            Severity::Critical,
            "See the top errors (collie audit report --since 1h) and the deployments on the status page.",
        ),
        "hourly_cost" => (
            Severity::Critical,
            "Review who spends (collie audit report --since 1h); cap it with usd_per_day in the tenant's quota.",
        ),
        "large_request" => (
            Severity::Warning,
            "Check where the request came from; cap max_tokens with the model's max_output_tokens or default_max_tokens.",
        ),
        "repeated_request" => (
            Severity::Warning,
            "A client sends the same request again and again: look for a retry loop or a missing cache.",
        ),
        _ => (
            Severity::Warning,
            "Compare with the tenant's usual traffic (collie audit report); a new workload or a runaway job?",
        ),
    }
}

/// A tenant's usual tokens and cost per period (a minute by default).
#[derive(Default)]
struct Baseline {
    /// The open period (epoch ms / period length).
    period: i64,
    tokens: f64,
    cost: f64,
    history: u32,
    mean_tokens: f64,
    var_tokens: f64,
    mean_cost: f64,
    var_cost: f64,
}

const BASELINE_ALPHA: f64 = 0.1;
/// The least deviation a baseline judges against, as a share of its mean.
const BASELINE_SD_FLOOR: f64 = 0.25;

/// How often a request (by its hash) was seen in the current window, and
/// when that window started.
type Repeats = HashMap<[u8; 32], (u64, i64)>;

/// Per-record work allocates nothing for a tenant already seen: maps are
/// keyed so that a `&str` finds the entry, and request hashes are kept as
/// their 32 bytes.
pub struct Detector {
    s: AnomalySettings,
    tenants: HashMap<String, Wide>,
    global: Wide,
    /// Tenant → user → state; at most `max_tracked_users` users in all.
    users: HashMap<String, HashMap<String, User>>,
    tracked_users: usize,
    tenant_repeats: HashMap<String, Repeats>,
    global_repeats: Repeats,
    baselines: HashMap<String, Baseline>,
    /// When a rule last fired, per tenant and for all tenants: it fires
    /// again only after a window.
    fired_tenants: HashMap<String, HashMap<&'static str, i64>>,
    fired_global: HashMap<&'static str, i64>,
    /// The latest record time seen. Records arrive in completion order, so a
    /// long request started earlier may come after shorter later ones; it is
    /// counted at this time, never moving the windows back.
    clock: i64,
}

/// Past this many distinct requests in one scope, those whose window is
/// over are forgotten (bounded memory).
const REPEATS_KEPT: usize = 200_000;

impl Detector {
    /// A detector with empty windows and baselines.
    pub fn new(s: AnomalySettings) -> Detector {
        Detector {
            s,
            tenants: HashMap::new(),
            global: Wide::default(),
            users: HashMap::new(),
            tracked_users: 0,
            tenant_repeats: HashMap::new(),
            global_repeats: HashMap::new(),
            baselines: HashMap::new(),
            fired_tenants: HashMap::new(),
            fired_global: HashMap::new(),
            clock: i64::MIN,
        }
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.s.window.as_millis()).unwrap_or(i64::MAX)
    }

    fn fire(
        &mut self,
        out: &mut Vec<Raised>,
        now: i64,
        rule: &'static str,
        who: Who<'_>,
        detail: impl FnOnce() -> String,
    ) {
        let window = self.window_ms();
        let last = match who {
            Who::All => &mut self.fired_global,
            Who::Tenant(t) => match get_or_insert(&mut self.fired_tenants, t) {
                Some(last) => last,
                None => return,
            },
            Who::User(t, u) => match self.users.get_mut(t).and_then(|m| m.get_mut(u)) {
                Some(user) => &mut user.fired,
                None => return,
            },
        };
        if last.get(rule).is_some_and(|&at| now - at < window) {
            return;
        }
        last.insert(rule, now);
        let (severity, recommendation) = rule_meta(rule);
        out.push(Raised {
            rule,
            scope: who.scope(),
            severity,
            message: detail(),
            recommendation,
            at_ms: now,
        });
    }

    /// The user's state, made the first time (forgetting the least
    /// recently seen tenth of the users when the bound is reached).
    fn user(&mut self, tenant: &str, user: &str, now: i64) -> Option<&mut User> {
        let known = self.users.get(tenant).is_some_and(|m| m.contains_key(user));
        if !known {
            if self.tracked_users >= self.s.max_tracked_users {
                self.forget_users();
            }
            self.tracked_users += 1;
        }
        let u = get_or_insert(&mut self.users, tenant).and_then(|m| get_or_insert(m, user))?;
        u.seen = u.seen.max(now);
        Some(u)
    }

    fn forget_users(&mut self) {
        let mut seen: Vec<i64> = self
            .users
            .values()
            .flat_map(|m| m.values().map(|u| u.seen))
            .collect();
        seen.sort_unstable();
        let Some(&cut) = seen.get(seen.len() / 10) else {
            return;
        };
        for m in self.users.values_mut() {
            m.retain(|_, u| u.seen > cut);
        }
        self.users.retain(|_, m| !m.is_empty());
        self.tracked_users = self.users.values().map(HashMap::len).sum();
    }

    /// Account one record; returns what the rules find in it.
    pub fn observe(&mut self, r: &Record) -> Vec<Raised> {
        let mut out = Vec::new();
        self.clock = self.clock.max(r.ts_ms);
        let now = self.clock;
        let window = self.window_ms();
        let failed = r.failed();
        let cost = r.cost_nano.and_then(|c| u64::try_from(c).ok()).unwrap_or(0);
        // The tenant's scope (when known), its user's, and the global one,
        // each counted once.
        let tenant = r.tenant.as_deref();
        if let Some(t) = tenant {
            if let Some(scope) = get_or_insert(&mut self.tenants, t) {
                let counts = scope.add(now, window, failed, cost);
                self.judge_scope(&mut out, now, Who::Tenant(t), counts);
            }
            let per_user =
                self.s.user_requests.is_some() || self.s.user_cost_per_hour_nano.is_some();
            if let (Some(u), true) = (r.user.as_deref(), per_user) {
                if let Some(user) = self.user(t, u, now) {
                    let counts = user.counts.add(now, window, failed, cost);
                    self.judge_scope(&mut out, now, Who::User(t, u), counts);
                }
            }
        }
        let counts = self.global.add(now, window, failed, cost);
        self.judge_scope(&mut out, now, Who::All, counts);
        if let (Some(limit), Some(tokens)) = (self.s.tokens_per_request, r.total_tokens) {
            if u64::try_from(tokens).is_ok_and(|t| t > limit) {
                let by = r
                    .user
                    .as_deref()
                    .map(|u| format!(" by user {u}"))
                    .unwrap_or_default();
                let detail = format!(
                    "request {}{by} used {tokens} tokens (limit {limit})",
                    r.request_id
                );
                // One per request: not limited per window (the alert
                // pipeline's cool-down still applies).
                let (severity, recommendation) = rule_meta("large_request");
                out.push(Raised {
                    rule: "large_request",
                    scope: tenant.map_or(Scope::Global, |t| Scope::Tenant { tenant: t.into() }),
                    severity,
                    message: detail,
                    recommendation,
                    at_ms: now,
                });
            }
        }
        if let Some(hash) = &r.request_hash {
            self.repeats(&mut out, now, tenant, hash);
        }
        if let Some(t) = tenant {
            let period = now / self.baseline_ms();
            self.baseline(&mut out, t, period, r.total_tokens.unwrap_or(0), cost);
        }
        out
    }

    /// The window rules of one scope, given its (requests, failures) in the
    /// window and its cost over the last hour.
    fn judge_scope(
        &mut self,
        out: &mut Vec<Raised>,
        now: i64,
        scope: Who<'_>,
        ((requests, failures), hour_cost): ((u64, u64), u64),
    ) {
        let (rate_limit, cost_limit) = match scope {
            Who::Tenant(_) => (self.s.tenant_requests, self.s.tenant_cost_per_hour_nano),
            Who::All => (self.s.global_requests, self.s.global_cost_per_hour_nano),
            Who::User(..) => (self.s.user_requests, self.s.user_cost_per_hour_nano),
        };
        let who = scope.name();
        let window = self.s.window;
        if let Some(limit) = rate_limit.filter(|l| requests > *l) {
            self.fire(out, now, "request_rate", scope, || {
                format!("{who}: {requests} requests in {window:?} (limit {limit})")
            });
        }
        let ratio = self.s.failure_ratio;
        // Failures are judged per tenant and for all, not per user.
        let judged = !matches!(scope, Who::User(..));
        if judged
            && requests >= self.s.failure_min_requests
            && failures as f64 / requests as f64 >= ratio
        {
            self.fire(out, now, "failure_ratio", scope, || {
                format!(
                    "{who}: {failures} of {requests} requests failed in {window:?} (threshold {:.0}%)",
                    ratio * 100.0
                )
            });
        }
        if let Some(limit) = cost_limit.filter(|l| hour_cost > *l) {
            self.fire(out, now, "hourly_cost", scope, || {
                format!(
                    "{who}: ${:.4} in the last hour (limit ${:.4})",
                    hour_cost as f64 / 1e9,
                    limit as f64 / 1e9
                )
            });
        }
    }

    /// The same request (by hash) more often than allowed in a window: per
    /// tenant (`repeats`) and for all tenants together (`global_repeats`).
    fn repeats(&mut self, out: &mut Vec<Raised>, now: i64, tenant: Option<&str>, hash: &str) {
        if self.s.repeats.is_none() && self.s.global_repeats.is_none() {
            return;
        }
        let mut key = [0u8; 32];
        if hex::decode_to_slice(hash, &mut key).is_err() {
            return;
        }
        let window = self.window_ms();
        let count = |seen: &mut Repeats| {
            let e = seen.entry(key).or_insert((0, now));
            if now - e.1 >= window {
                *e = (0, now);
            }
            e.0 += 1;
            let n = e.0;
            if seen.len() > REPEATS_KEPT {
                seen.retain(|_, (_, first)| now - *first < window);
            }
            n
        };
        // An anonymous record belongs to the global scope only.
        let tenant_count = match (tenant, self.s.repeats) {
            (Some(t), Some(limit)) => {
                get_or_insert(&mut self.tenant_repeats, t).map(|seen| (t, limit, count(seen)))
            }
            _ => None,
        };
        let global_count = self
            .s
            .global_repeats
            .map(|limit| (limit, count(&mut self.global_repeats)));
        let short = &hash[..12.min(hash.len())];
        let within = self.s.window;
        for (scope, limit, n) in tenant_count
            .map(|(t, l, n)| (Who::Tenant(t), l, n))
            .into_iter()
            .chain(global_count.map(|(l, n)| (Who::All, l, n)))
        {
            if n > limit {
                let who = scope.name();
                self.fire(out, now, "repeated_request", scope, || {
                    format!("{who}: the same request ({short}…) {n} times within {within:?} (limit {limit})")
                });
            }
        }
    }

    fn baseline_ms(&self) -> i64 {
        i64::try_from(self.s.baseline_interval.as_millis())
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// Judge the baseline periods that ended before `now_ms` (wall clock),
    /// so a spike followed by silence is flagged without waiting for the
    /// tenant's next record. A period is judged once it is over by a grace
    /// (a quarter period, at most 5 s) that lets its last records arrive; a
    /// record that comes later still is counted in the open period.
    pub(crate) fn tick(&mut self, now_ms: i64) -> Vec<Raised> {
        let mut out = Vec::new();
        let period_ms = self.baseline_ms();
        let grace = (period_ms / 4).min(5_000);
        let closed = now_ms.saturating_sub(grace) / period_ms;
        let due: Vec<String> = self
            .baselines
            .iter()
            .filter(|(_, b)| b.period < closed)
            .map(|(t, _)| t.clone())
            .collect();
        for tenant in due {
            self.baseline(&mut out, &tenant, closed, 0, 0);
        }
        out
    }

    /// Per-tenant baseline: when a period ends, compare its totals with the
    /// tenant's EWMA mean and deviation so far, then fold it in. `period` is
    /// where `tokens` and `cost` belong; an earlier one (a record that
    /// arrives after its period was judged) is counted in the open period.
    fn baseline(
        &mut self,
        out: &mut Vec<Raised>,
        tenant: &str,
        period: i64,
        tokens: i64,
        cost: u64,
    ) {
        let z_limit = self.s.zscore;
        let min_history = self.s.baseline_min_history;
        let period_ms = self.baseline_ms();
        if !self.baselines.contains_key(tenant) {
            self.baselines.insert(
                tenant.to_string(),
                Baseline {
                    period,
                    ..Baseline::default()
                },
            );
        }
        let Some(b) = self.baselines.get_mut(tenant) else {
            return;
        };
        let period = period.max(b.period);
        let mut spikes = Vec::new();
        if period != b.period {
            // Close the finished period (and count empty ones in between as zero).
            let gaps = (period - b.period).clamp(1, 60);
            for i in 0..gaps {
                let (t, c) = if i == 0 {
                    (b.tokens, b.cost)
                } else {
                    (0.0, 0.0)
                };
                if b.history >= min_history {
                    for (name, x, mean, var) in [
                        ("tokens", t, b.mean_tokens, b.var_tokens),
                        ("cost", c, b.mean_cost, b.var_cost),
                    ] {
                        let z = (x - mean) / deviation(mean, var);
                        if z >= z_limit {
                            spikes.push(format!(
                                "{tenant}: {name} per {:?} {x:.0} is {z:.1} standard deviations above its usual {mean:.0}",
                                self.s.baseline_interval
                            ));
                        }
                    }
                }
                for (x, mean, var) in [
                    (t, &mut b.mean_tokens, &mut b.var_tokens),
                    (c, &mut b.mean_cost, &mut b.var_cost),
                ] {
                    if b.history == 0 {
                        *mean = x;
                    } else {
                        let d = x - *mean;
                        *mean += BASELINE_ALPHA * d;
                        *var = (1.0 - BASELINE_ALPHA) * (*var + BASELINE_ALPHA * d * d);
                    }
                }
                b.history += 1;
            }
            b.period = period;
            b.tokens = 0.0;
            b.cost = 0.0;
        }
        b.tokens += tokens as f64;
        b.cost += cost as f64;
        let now = period * period_ms;
        for detail in spikes {
            self.fire(out, now, "baseline_spike", Who::Tenant(tenant), || detail);
        }
    }
}

/// The entry of `key`, made (with one allocation) the first time only.
/// Always `Some`; an `Option` because the borrow checker cannot yet return
/// the found entry or else insert.
fn get_or_insert<'a, V: Default>(map: &'a mut HashMap<String, V>, key: &str) -> Option<&'a mut V> {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key)
}

/// The deviation a baseline judges against: its EWMA standard deviation,
/// but never less than a quarter of its mean (nor one unit). Perfectly
/// steady usage has no deviation at all, and would otherwise never flag
/// anything; with the floor, at the default z of 4 a steady tenant is
/// flagged when a period's usage reaches twice its usual.
fn deviation(mean: f64, var: f64) -> f64 {
    var.sqrt().max(BASELINE_SD_FLOOR * mean.abs()).max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(ts_ms: i64, tenant: &str, status: i64, tokens: i64) -> Record {
        Record {
            ts_ms,
            request_id: format!("r{ts_ms}"),
            tenant: Some(tenant.into()),
            claimed_tenant: None,
            client_ip: None,
            endpoint: "chat".into(),
            requested_model: Some("m".into()),
            served_model: Some("m".into()),
            deployment: Some("d".into()),
            attempts: "[]".into(),
            status,
            decision: "admitted".into(),
            rule: None,
            prompt_tokens: Some(tokens / 2),
            completion_tokens: Some(tokens / 2),
            total_tokens: Some(tokens),
            usage_estimated: false,
            cost_nano: Some(tokens * 1000),
            latency_ms: 1.0,
            ttft_ms: None,
            streamed: false,
            truncated: false,
            client_gone: false,
            request_hash: Some(format!("{ts_ms:064}")),
            user: None,
            response_preview: None,
            error: None,
        }
    }

    #[test]
    fn baseline_flags_a_spike_after_a_steady_history() {
        let mut d = Detector::new(AnomalySettings {
            zscore: 3.0,
            ..AnomalySettings::default()
        });
        let mut fired = Vec::new();
        // Twenty minutes of 10 requests × ~100 tokens per minute.
        for minute in 0..20i64 {
            for i in 0..10 {
                fired.extend(d.observe(&record(
                    minute * 60_000 + i * 1000,
                    "t",
                    200,
                    100 + (minute % 3) * 5,
                )));
            }
        }
        assert!(fired.is_empty(), "{fired:?}");
        // Then a minute with fifty times the tokens.
        for i in 0..10 {
            d.observe(&record(20 * 60_000 + i * 1000, "t", 200, 5000));
        }
        let spike = d.observe(&record(21 * 60_000, "t", 200, 100));
        assert!(
            spike.iter().any(|a| a.rule == "baseline_spike"),
            "{spike:?}"
        );
    }

    fn steady(zscore: f64) -> (Detector, Vec<Raised>) {
        let mut d = Detector::new(AnomalySettings {
            zscore,
            ..AnomalySettings::default()
        });
        // Twenty minutes of exactly the same usage: no deviation at all.
        let fired = (0..20i64)
            .flat_map(|minute| {
                (0..10)
                    .map(|i| record(minute * 60_000 + i * 1000, "t", 200, 100))
                    .collect::<Vec<_>>()
            })
            .flat_map(|r| d.observe(&r))
            .collect();
        (d, fired)
    }

    #[test]
    fn perfectly_steady_usage_still_flags_a_spike() {
        let (mut d, fired) = steady(4.0);
        assert!(fired.is_empty(), "{fired:?}");
        for i in 0..10 {
            d.observe(&record(20 * 60_000 + i * 1000, "t", 200, 1000));
        }
        let spike = d.observe(&record(21 * 60_000, "t", 200, 100));
        assert!(
            spike.iter().any(|a| a.rule == "baseline_spike"),
            "{spike:?}"
        );
    }

    #[test]
    fn a_steady_baseline_tolerates_less_than_its_floor() {
        // The deviation's floor is a quarter of the mean: at z 5, a minute at
        // twice the usual (z = 4) passes.
        let (mut d, _) = steady(5.0);
        for i in 0..20 {
            d.observe(&record(20 * 60_000 + i * 1000, "t", 200, 100));
        }
        let next = d.observe(&record(21 * 60_000, "t", 200, 100));
        assert!(next.is_empty(), "{next:?}");
    }

    #[test]
    fn a_spike_followed_by_silence_is_flagged_on_the_clock() {
        let (mut d, _) = steady(4.0);
        for i in 0..10 {
            assert!(
                d.observe(&record(20 * 60_000 + i * 1000, "t", 200, 5000))
                    .is_empty()
            );
        }
        // No more records. The minute is judged once it is over by the grace
        // (a quarter of it, at most 5 s), not before.
        assert!(d.tick(21 * 60_000 + 4_000).is_empty());
        let late = d.tick(21 * 60_000 + 5_000);
        assert!(
            late.iter()
                .any(|a| a.rule == "baseline_spike" && a.scope.tenant() == Some("t")),
            "{late:?}"
        );
        // Judged once: the next tick and a late record of that minute add nothing.
        assert!(d.tick(21 * 60_000 + 6_000).is_empty());
        assert!(
            d.observe(&record(20 * 60_000 + 59_000, "t", 200, 100))
                .is_empty()
        );
    }

    #[test]
    fn repeats_count_per_tenant_and_for_all_tenants() {
        let s = AnomalySettings {
            repeats: Some(3),
            global_repeats: Some(4),
            ..AnomalySettings::default()
        };
        let mut d = Detector::new(s);
        let same = |ts, tenant| Record {
            request_hash: Some("ab".repeat(32)),
            ..record(ts, tenant, 200, 10)
        };
        let mut fired = Vec::new();
        for (i, t) in ["a", "a", "b", "b"].iter().enumerate() {
            fired.extend(d.observe(&same(i as i64, t)));
        }
        assert!(fired.is_empty(), "{fired:?}");
        // Five in all: over the global limit, while each tenant is under its own.
        let over = d.observe(&same(4, "b"));
        assert_eq!(over.len(), 1, "{over:?}");
        assert_eq!(
            (over[0].rule, over[0].scope.tenant()),
            ("repeated_request", None)
        );
        // b's fourth is over b's limit.
        let over = d.observe(&same(5, "b"));
        assert_eq!(over.len(), 1, "{over:?}");
        assert_eq!(over[0].scope.tenant(), Some("b"));
    }

    #[test]
    fn each_rule_fires_once_per_window() {
        let s = AnomalySettings {
            window: Duration::from_secs(60),
            tenant_requests: Some(5),
            ..AnomalySettings::default()
        };
        let mut d = Detector::new(s);
        let fired: Vec<Raised> = (0..20)
            .flat_map(|i| d.observe(&record(i * 100, "t", 200, 10)))
            .collect();
        assert_eq!(fired.iter().filter(|a| a.rule == "request_rate").count(), 1);
    }

    #[test]
    fn anonymous_records_count_once_globally() {
        let s = AnomalySettings {
            window: Duration::from_secs(60),
            global_requests: Some(5),
            ..AnomalySettings::default()
        };
        let mut d = Detector::new(s);
        let anonymous = |ts| Record {
            tenant: None,
            ..record(ts, "t", 401, 0)
        };
        // Five requests are at the limit, not over it: counted twice, they fired.
        let quiet: Vec<Raised> = (0..5).flat_map(|i| d.observe(&anonymous(i))).collect();
        assert!(quiet.is_empty(), "{quiet:?}");
        let over = d.observe(&anonymous(5));
        assert!(
            over.iter()
                .any(|a| a.rule == "request_rate" && a.scope == Scope::Global),
            "{over:?}"
        );
    }

    #[test]
    fn a_late_record_does_not_wipe_the_window() {
        let s = AnomalySettings {
            window: Duration::from_secs(60),
            tenant_requests: Some(5),
            ..AnomalySettings::default()
        };
        let mut d = Detector::new(s);
        // Five requests at t = 120 s, then one that started 60 s earlier (a long
        // stream finishing late), whose slice maps to the same bucket.
        for i in 0..5 {
            assert!(d.observe(&record(120_000 + i, "t", 200, 10)).is_empty());
        }
        let late = d.observe(&record(60_000 + 4, "t", 200, 10));
        assert!(late.iter().any(|a| a.rule == "request_rate"), "{late:?}");
    }

    #[test]
    fn tracked_users_stay_within_their_bound() {
        let mut d = Detector::new(AnomalySettings {
            user_requests: Some(1),
            max_tracked_users: 100,
            ..AnomalySettings::default()
        });
        let by = |ts: i64, user: &str| Record {
            user: Some(user.into()),
            ..record(ts, "t", 200, 10)
        };
        for i in 0..1000 {
            d.observe(&by(i, &format!("u{i}")));
        }
        let kept: usize = d.users.values().map(HashMap::len).sum();
        assert!(kept <= 100 && d.tracked_users == kept, "{kept}");
        // The most recent users are still judged: a second request in the
        // window is over the limit of one, for that user only.
        let again = d.observe(&by(1000, "u999"));
        assert!(
            again.iter().any(|a| a.rule == "request_rate"
                && a.scope
                    == Scope::User {
                        tenant: "t".into(),
                        user: "u999".into()
                    }),
            "{again:?}"
        );
    }
}
