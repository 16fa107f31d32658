//! What Collie knows about each deployment's health, from its active probes
//! and from live traffic together, and the circuit breaker that keeps
//! traffic off a failing one.
//!
//! States: *unknown* (new: no probe verdict yet. Only a passing probe makes
//! it known: a live success while unknown is recorded — latency, error
//! ratio — but does not promote it, so a deployment that has never passed a
//! probe is not preferred over a proven sibling because one request happened
//! to succeed there. A deployment without probes is never unknown: only
//! live traffic can prove it),
//! *healthy*, *degraded* (slow — time-to-first-byte EWMA over the threshold —
//! or failing more than the allowed share of recent requests, or failing its
//! probes while live traffic still succeeds), *unhealthy* (breaker open or
//! half-open).
//!
//! Breaker: closed → open after N consecutive failures, or when the error
//! ratio of the sliding window passes its threshold; open for a cooldown that
//! doubles on each reopening (capped); then half-open, letting exactly one
//! trial request through: success closes it, failure reopens it. A 429 with
//! `Retry-After` opens it for exactly that long. Probes that fail their
//! threshold open it too; probes that pass close it. Every breaker change,
//! whichever call notices it (an expired cooldown is noticed by the next
//! read), is reported once to the deployment's [`OnTransition`] hook, which
//! logs and counts it.

pub(crate) mod probes;

pub(crate) use probes::{HealthBook, HealthMetrics};

pub(crate) use crate::config::{HealthSettings, ProbeKind};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Called once per breaker change, outside the deployment's lock.
pub(crate) type OnTransition = Arc<dyn Fn(&str, Transition) + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HealthState {
    Unknown,
    Healthy,
    Degraded,
    Unhealthy,
}

impl HealthState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::Unhealthy => "unhealthy",
        }
    }

    /// Selection preference: lower is tried first.
    pub(crate) fn tier(self) -> u8 {
        match self {
            HealthState::Healthy => 0,
            HealthState::Degraded => 1,
            HealthState::Unknown => 2,
            HealthState::Unhealthy => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// How one live attempt went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Outcome {
    /// A response head arrived (any status the client gets) after `ttfb`.
    Success { ttfb: Duration },
    /// Connect error, reset, timeout or 5xx.
    Failure,
    /// 429; with the provider's `Retry-After` when it sent one.
    RateLimited { retry_after: Option<Duration> },
}

/// A breaker or state change worth logging and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) from: BreakerState,
    pub(crate) to: BreakerState,
    /// What moved the breaker (alerts tell a failing probe from failing
    /// traffic, and a provider's `Retry-After` from a fault).
    pub(crate) cause: Cause,
}

/// Why a breaker moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// `failures_to_open` live failures in a row.
    Failures,
    /// The live error ratio over the window reached `error_ratio`.
    ErrorRatio,
    /// A half-open breaker's trial request failed.
    TrialFailed,
    /// A 429 with `Retry-After`: the provider asked for rest.
    RetryAfter,
    /// Probes failed `unhealthy_after` times in a row.
    ProbesFailing,
    /// Probes passed `healthy_after` times in a row.
    ProbesPassing,
    /// A half-open breaker's trial request succeeded.
    TrialSucceeded,
    /// The open breaker's cooldown ended (open → half-open).
    CooldownOver,
}

/// A breaker change of one deployment, as the health book hands it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthEvent {
    pub(crate) deployment: String,
    pub(crate) transition: Transition,
}

/// Minutes of outcomes kept per deployment for its availability: a day.
pub(crate) const HISTORY_MINUTES: usize = 1440;

/// Probe and live outcomes per minute over the last day, in a ring of
/// [`HISTORY_MINUTES`] slots of (minute, succeeded, failed): 16 bytes each,
/// 23 KiB per deployment, allocated on the first outcome.
#[derive(Debug, Default)]
struct History {
    slots: Vec<(u64, u32, u32)>,
    origin: Option<Instant>,
}

impl History {
    fn minute(origin: Instant, now: Instant) -> u64 {
        now.saturating_duration_since(origin).as_secs() / 60
    }

    fn add(&mut self, ok: bool, now: Instant) {
        let origin = *self.origin.get_or_insert(now);
        if self.slots.is_empty() {
            self.slots = vec![(u64::MAX, 0, 0); HISTORY_MINUTES];
        }
        let m = Self::minute(origin, now);
        let slot = &mut self.slots[(m % HISTORY_MINUTES as u64) as usize];
        if slot.0 != m {
            *slot = (m, 0, 0);
        }
        if ok {
            slot.1 = slot.1.saturating_add(1);
        } else {
            slot.2 = slot.2.saturating_add(1);
        }
    }

    /// (succeeded, failed) over the last `minutes` minutes (this one included).
    fn totals(&self, minutes: u64, now: Instant) -> (u64, u64) {
        let Some(origin) = self.origin else {
            return (0, 0);
        };
        let m = Self::minute(origin, now);
        self.slots
            .iter()
            .filter(|(at, _, _)| *at != u64::MAX && m.saturating_sub(*at) < minutes)
            .fold((0, 0), |(o, f), (_, so, sf)| {
                (o + u64::from(*so), f + u64::from(*sf))
            })
    }
}

/// The share of outcomes that succeeded over a period, with how many there were.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Availability {
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
}

impl Availability {
    /// `None` without a single outcome.
    pub(crate) fn ratio(&self) -> Option<f64> {
        let n = self.succeeded + self.failed;
        (n > 0).then(|| self.succeeded as f64 / n as f64)
    }
}

#[derive(Debug)]
struct Inner {
    settings: HealthSettings,
    breaker: BreakerState,
    open_until: Option<Instant>,
    /// Openings since the breaker last closed after a successful trial.
    openings: u32,
    trial_in_flight: bool,
    consecutive_failures: u32,
    outcomes: Window,
    ttfb_ewma_ms: Option<f64>,
    ttfb_recent_ms: VecDeque<f64>,
    served: u64,
    probe_ok_run: u32,
    probe_fail_run: u32,
    /// `None` until the first verdict.
    probe_up: Option<bool>,
    last_probe: Option<ProbeResult>,
    last_probe_at: Option<Instant>,
    /// The same, on the wall clock (for status pages).
    last_probe_wall: Option<std::time::SystemTime>,
    /// Whole request latency of served requests, smoothed.
    latency_ewma_ms: Option<f64>,
    history: History,
}

/// Outcomes of the last `window` in twelve buckets: constant time to add
/// and to read, whatever the traffic.
#[derive(Debug, Default)]
struct Window {
    buckets: [(u32, u32); 12],
    /// Bucket number (time since `origin` ÷ bucket length) of each slot.
    epochs: [u64; 12],
    origin: Option<Instant>,
}

/// The bucket `now` falls in: time since `origin` ÷ a twelfth of `window`
/// (at least 1 ms). In 64 bits: 2^64 ns is 584 years.
fn bucket_number(origin: Instant, window: Duration, now: Instant) -> u64 {
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let bucket = nanos(window / 12).max(1_000_000);
    nanos(now.duration_since(origin)) / bucket
}

impl Window {
    fn epoch(&mut self, window: Duration, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        bucket_number(origin, window, now)
    }

    fn add(&mut self, ok: bool, window: Duration, now: Instant) {
        let e = self.epoch(window, now);
        let slot = (e % 12) as usize;
        if self.epochs[slot] != e {
            self.epochs[slot] = e;
            self.buckets[slot] = (0, 0);
        }
        if ok {
            self.buckets[slot].0 += 1;
        } else {
            self.buckets[slot].1 += 1;
        }
    }

    /// (succeeded, failed) within the window.
    fn totals(&self, window: Duration, now: Instant) -> (u32, u32) {
        let Some(origin) = self.origin else {
            return (0, 0);
        };
        let e = bucket_number(origin, window, now);
        self.epochs
            .iter()
            .zip(&self.buckets)
            .filter(|(epoch, _)| e.saturating_sub(**epoch) < 12)
            .fold((0, 0), |(o, f), (_, (bo, bf))| (o + bo, f + bf))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    pub ok: bool,
    pub(crate) latency: Duration,
    pub(crate) detail: String,
}

/// One deployment's health, shared across config reloads (by deployment id).
pub(crate) struct DeploymentHealth {
    pub(crate) id: String,
    /// The settings live in `Inner`, under the one lock every read of the
    /// state takes anyway.
    inner: Mutex<Inner>,
    on_transition: OnTransition,
}

impl std::fmt::Debug for DeploymentHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeploymentHealth")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A point-in-time view for status pages and metrics.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HealthSnapshot {
    pub(crate) state: HealthState,
    pub(crate) breaker: BreakerState,
    pub(crate) ttfb_ewma_ms: Option<f64>,
    pub(crate) ttfb_p95_ms: Option<f64>,
    pub(crate) error_ratio: Option<f64>,
    /// Live outcomes the error ratio is over, and how many of them failed.
    pub(crate) error_samples: u32,
    pub(crate) errors: u32,
    pub(crate) latency_ewma_ms: Option<f64>,
    /// When the last probe ran (wall clock).
    pub(crate) last_probe_at: Option<std::time::SystemTime>,
    /// Probe and live outcomes over the last hour and the last day.
    pub(crate) availability_1h: Availability,
    pub(crate) availability_24h: Availability,
    pub(crate) served: u64,
    pub(crate) last_probe: Option<ProbeResult>,
    /// Consecutive failed probes (0 after a pass).
    pub(crate) probe_failures: u32,
    pub(crate) open_for: Option<Duration>,
}

impl DeploymentHealth {
    /// Without a hook: breaker changes are only returned (tests).
    #[cfg(test)]
    pub(crate) fn new(id: &str, settings: HealthSettings) -> DeploymentHealth {
        Self::with_hook(id, settings, Arc::new(|_, _| {}))
    }

    pub(crate) fn with_hook(
        id: &str,
        settings: HealthSettings,
        on_transition: OnTransition,
    ) -> DeploymentHealth {
        DeploymentHealth {
            id: id.to_string(),
            on_transition,
            inner: Mutex::new(Inner {
                settings,
                breaker: BreakerState::Closed,
                open_until: None,
                openings: 0,
                trial_in_flight: false,
                consecutive_failures: 0,
                outcomes: Window::default(),
                ttfb_ewma_ms: None,
                ttfb_recent_ms: VecDeque::new(),
                served: 0,
                probe_ok_run: 0,
                probe_fail_run: 0,
                probe_up: None,
                last_probe: None,
                last_probe_at: None,
                last_probe_wall: None,
                latency_ewma_ms: None,
                history: History::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn settings(&self) -> HealthSettings {
        self.lock().settings
    }

    pub(crate) fn set_settings(&self, s: HealthSettings) {
        self.lock().settings = s;
    }

    /// Hand a breaker change to the hook (the lock is no longer held).
    fn report(&self, t: Option<Transition>) -> Option<Transition> {
        if let Some(t) = t {
            (self.on_transition)(&self.id, t);
        }
        t
    }

    /// The state now, moving an expired open breaker to half-open.
    pub(crate) fn state(&self) -> HealthState {
        self.state_at(Instant::now())
    }

    /// [`Self::state`] as of `now` (one clock read for a whole pool).
    pub(crate) fn state_at(&self, now: Instant) -> HealthState {
        let (state, t) = {
            let mut i = self.lock();
            let t = Self::advance(&mut i, now);
            (Self::derive(&i, now), t)
        };
        self.report(t);
        state
    }

    fn advance(i: &mut Inner, now: Instant) -> Option<Transition> {
        if i.breaker == BreakerState::Open && i.open_until.is_some_and(|u| now >= u) {
            i.breaker = BreakerState::HalfOpen;
            i.trial_in_flight = false;
            return Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen,
                cause: Cause::CooldownOver,
            });
        }
        None
    }

    fn error_ratio(i: &Inner, now: Instant) -> (usize, f64) {
        let (ok, failed) = i.outcomes.totals(i.settings.window, now);
        let n = ok + failed;
        (
            n as usize,
            if n == 0 {
                0.0
            } else {
                failed as f64 / n as f64
            },
        )
    }

    fn derive(i: &Inner, now: Instant) -> HealthState {
        let s = &i.settings;
        if i.breaker != BreakerState::Closed {
            return HealthState::Unhealthy;
        }
        // Only a probe verdict makes a probed deployment known. Without
        // probes only live traffic can prove a deployment; holding it back
        // as unknown would starve it of the traffic that could.
        if i.probe_up.is_none() && s.probe != ProbeKind::Off {
            return HealthState::Unknown;
        }
        let (n, ratio) = Self::error_ratio(i, now);
        let slow = i
            .ttfb_ewma_ms
            .is_some_and(|ms| ms > s.slow_after.as_secs_f64() * 1e3);
        if i.probe_up == Some(false) || slow || (n >= 5 && ratio > s.degraded_error_ratio) {
            return HealthState::Degraded;
        }
        HealthState::Healthy
    }

    /// May a request go to this deployment now? For a half-open breaker this
    /// takes its single trial slot. Returns the state it was admitted in.
    pub(crate) fn admit(&self) -> Result<HealthState, Option<Duration>> {
        self.admission(true)
    }

    /// What [`Self::admit`] would answer, without taking the trial slot.
    pub(crate) fn would_admit(&self) -> Result<HealthState, Option<Duration>> {
        self.admission(false)
    }

    fn admission(&self, take_trial: bool) -> Result<HealthState, Option<Duration>> {
        let now = Instant::now();
        let (answer, t) = {
            let mut i = self.lock();
            let t = Self::advance(&mut i, now);
            let answer = match i.breaker {
                BreakerState::Closed => Ok(Self::derive(&i, now)),
                BreakerState::HalfOpen if !i.trial_in_flight => {
                    i.trial_in_flight = take_trial;
                    Ok(HealthState::Unhealthy)
                }
                BreakerState::HalfOpen => Err(Some(i.settings.cooldown)),
                BreakerState::Open => Err(i.open_until.map(|u| u.saturating_duration_since(now))),
            };
            (answer, t)
        };
        self.report(t);
        answer
    }

    /// Give back a trial slot that was taken but not used.
    pub(crate) fn release_trial(&self) {
        let mut i = self.lock();
        if i.breaker == BreakerState::HalfOpen {
            i.trial_in_flight = false;
        }
    }

    fn open(
        i: &mut Inner,
        now: Instant,
        for_: Option<Duration>,
        cause: Cause,
    ) -> Option<Transition> {
        let from = i.breaker;
        let wait = for_.unwrap_or_else(|| {
            let factor = 2u32.saturating_pow(i.openings.min(16));
            let s = &i.settings;
            s.cooldown.saturating_mul(factor).min(s.max_cooldown)
        });
        if for_.is_none() {
            i.openings += 1;
        }
        let until = now + wait;
        i.open_until = Some(
            i.open_until
                .filter(|u| *u > until && from == BreakerState::Open)
                .unwrap_or(until),
        );
        i.breaker = BreakerState::Open;
        i.trial_in_flight = false;
        (from != BreakerState::Open).then_some(Transition {
            from,
            to: BreakerState::Open,
            cause,
        })
    }

    fn close(i: &mut Inner, cause: Cause) -> Option<Transition> {
        let from = i.breaker;
        i.breaker = BreakerState::Closed;
        i.open_until = None;
        i.trial_in_flight = false;
        i.openings = 0;
        i.consecutive_failures = 0;
        (from != BreakerState::Closed).then_some(Transition {
            from,
            to: BreakerState::Closed,
            cause,
        })
    }

    /// Account a live attempt. Frees a half-open breaker's trial slot
    /// whatever the outcome.
    pub(crate) fn record(&self, outcome: Outcome) -> Option<Transition> {
        let now = Instant::now();
        let t = {
            let mut i = self.lock();
            Self::apply(&mut i, now, outcome)
        };
        self.report(t)
    }

    fn apply(i: &mut Inner, now: Instant, outcome: Outcome) -> Option<Transition> {
        let s = i.settings;
        match outcome {
            Outcome::Success { ttfb } => {
                i.outcomes.add(true, s.window, now);
                i.history.add(true, now);
                i.served += 1;
                i.consecutive_failures = 0;
                let ms = ttfb.as_secs_f64() * 1e3;
                i.ttfb_ewma_ms = Some(i.ttfb_ewma_ms.map_or(ms, |e| 0.8 * e + 0.2 * ms));
                i.ttfb_recent_ms.push_back(ms);
                if i.ttfb_recent_ms.len() > 200 {
                    i.ttfb_recent_ms.pop_front();
                }
                if i.breaker == BreakerState::HalfOpen {
                    return Self::close(i, Cause::TrialSucceeded);
                }
                None
            }
            Outcome::RateLimited {
                retry_after: Some(wait),
            } => {
                // The provider said how long: exactly that, not a guess.
                // Busy is not down: no mark in the availability history.
                i.outcomes.add(true, s.window, now);
                Self::open(i, now, Some(wait), Cause::RetryAfter)
            }
            Outcome::RateLimited { retry_after: None } => {
                // Busy, not broken: no effect on the error ratio or breaker,
                // except that a half-open trial did not prove recovery.
                if i.breaker == BreakerState::HalfOpen {
                    i.trial_in_flight = false;
                }
                None
            }
            Outcome::Failure => {
                i.outcomes.add(false, s.window, now);
                i.history.add(false, now);
                i.consecutive_failures += 1;
                if i.breaker == BreakerState::HalfOpen {
                    return Self::open(i, now, None, Cause::TrialFailed);
                }
                let (n, ratio) = Self::error_ratio(i, now);
                let too_many = i.consecutive_failures >= s.failures_to_open;
                let too_often = n >= s.min_samples as usize && ratio >= s.error_ratio;
                if i.breaker == BreakerState::Closed && (too_many || too_often) {
                    let cause = if too_many {
                        Cause::Failures
                    } else {
                        Cause::ErrorRatio
                    };
                    return Self::open(i, now, None, cause);
                }
                None
            }
        }
    }

    /// Whether an active probe is due.
    pub(crate) fn probe_due(&self) -> bool {
        let i = self.lock();
        i.settings.probe != ProbeKind::Off
            && i.last_probe_at
                .is_none_or(|t| t.elapsed() >= i.settings.interval)
    }

    /// Account an active probe; returns a breaker transition if it caused one.
    pub(crate) fn record_probe(&self, result: ProbeResult) -> Option<Transition> {
        let now = Instant::now();
        let t = {
            let mut i = self.lock();
            Self::apply_probe(&mut i, now, result)
        };
        self.report(t)
    }

    fn apply_probe(i: &mut Inner, now: Instant, result: ProbeResult) -> Option<Transition> {
        let s = i.settings;
        i.last_probe_at = Some(now);
        i.last_probe_wall = Some(std::time::SystemTime::now());
        i.history.add(result.ok, now);
        if result.ok {
            i.probe_ok_run += 1;
            i.probe_fail_run = 0;
        } else {
            i.probe_fail_run += 1;
            i.probe_ok_run = 0;
        }
        let was = i.probe_up;
        if i.probe_ok_run >= s.healthy_after {
            i.probe_up = Some(true);
        } else if i.probe_fail_run >= s.unhealthy_after {
            i.probe_up = Some(false);
        }
        i.last_probe = Some(result);
        match (was, i.probe_up) {
            // Probes came back: traffic may flow again at once.
            (Some(false) | None, Some(true)) if i.breaker != BreakerState::Closed => {
                Self::close(i, Cause::ProbesPassing)
            }
            // Probes started failing: stop sending live traffic there.
            (Some(true) | None, Some(false)) => Self::open(i, now, None, Cause::ProbesFailing),
            _ => None,
        }
    }

    /// Whether the last probe verdict is "up" (`None` before any verdict).
    pub(crate) fn probe_up(&self) -> Option<bool> {
        self.lock().probe_up
    }

    pub(crate) fn snapshot(&self) -> HealthSnapshot {
        let now = Instant::now();
        let (snap, t) = {
            let mut i = self.lock();
            let t = Self::advance(&mut i, now);
            (Self::view(&i, now), t)
        };
        self.report(t);
        snap
    }

    /// The whole-request latency EWMA, in milliseconds (`None` before the
    /// deployment served a request).
    pub(crate) fn latency_ewma_ms(&self) -> Option<f64> {
        self.lock().latency_ewma_ms
    }

    /// Account the whole latency of a request this deployment served.
    pub(crate) fn record_latency(&self, latency: Duration) {
        let ms = latency.as_secs_f64() * 1e3;
        let mut i = self.lock();
        i.latency_ewma_ms = Some(i.latency_ewma_ms.map_or(ms, |e| 0.8 * e + 0.2 * ms));
    }

    fn view(i: &Inner, now: Instant) -> HealthSnapshot {
        let (n, ratio) = Self::error_ratio(i, now);
        let (ok, failed) = i.outcomes.totals(i.settings.window, now);
        let availability = |minutes| {
            let (succeeded, failed) = i.history.totals(minutes, now);
            Availability { succeeded, failed }
        };
        let p95 = {
            let mut v: Vec<f64> = i.ttfb_recent_ms.iter().copied().collect();
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * 0.95).round() as usize])
        };
        HealthSnapshot {
            state: Self::derive(i, now),
            breaker: i.breaker,
            ttfb_ewma_ms: i.ttfb_ewma_ms,
            ttfb_p95_ms: p95,
            error_ratio: (n > 0).then_some(ratio),
            error_samples: ok + failed,
            errors: failed,
            latency_ewma_ms: i.latency_ewma_ms,
            last_probe_at: i.last_probe_wall,
            availability_1h: availability(60),
            availability_24h: availability(HISTORY_MINUTES as u64),
            served: i.served,
            last_probe: i.last_probe.clone(),
            probe_failures: i.probe_fail_run,
            open_for: i
                .open_until
                .filter(|_| i.breaker == BreakerState::Open)
                .map(|u| u.saturating_duration_since(now)),
        }
    }

    /// Sort key for the least-latency policy, lower first: deployments by
    /// their EWMA, unmeasured ones first (so they get measured), and after
    /// all of them those whose last live attempt failed. A failure has no
    /// time to first byte: without this penalty a deployment that only
    /// fails would keep its old figure, or none, and stay first.
    pub(crate) fn latency_rank(&self) -> (u8, u64) {
        let i = self.lock();
        match (i.consecutive_failures > 0, i.ttfb_ewma_ms) {
            (true, _) => (1, 0),
            (false, None) => (0, 0),
            (false, Some(ms)) => (0, (ms * 1000.0) as u64),
        }
    }

    /// When the next probe is due (`None`: probes off). A probe that never
    /// ran is due now.
    pub(crate) fn next_probe_in(&self) -> Option<Duration> {
        let i = self.lock();
        if i.settings.probe == ProbeKind::Off {
            return None;
        }
        let interval = i.settings.interval;
        Some(
            i.last_probe_at
                .map_or(Duration::ZERO, |t| interval.saturating_sub(t.elapsed())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live traffic only, unless a test says otherwise.
    fn quick() -> HealthSettings {
        HealthSettings {
            probe: ProbeKind::Off,
            failures_to_open: 3,
            cooldown: Duration::from_millis(40),
            ..HealthSettings::default()
        }
    }

    fn probe(ok: bool) -> ProbeResult {
        ProbeResult {
            ok,
            latency: Duration::ZERO,
            detail: String::new(),
        }
    }

    #[test]
    fn new_deployments_are_unknown_until_a_probe_passes() {
        let probed = HealthSettings {
            probe: ProbeKind::Models,
            ..quick()
        };
        let h = DeploymentHealth::new("d", probed);
        assert_eq!(h.state(), HealthState::Unknown);
        // A live success is recorded, but only a probe proves the deployment.
        h.record(Outcome::Success {
            ttfb: Duration::from_millis(5),
        });
        assert_eq!(h.state(), HealthState::Unknown);
        assert_eq!(h.snapshot().served, 1);
        h.record_probe(probe(true));
        assert_eq!(h.state(), HealthState::Healthy);
        // Without probes, live traffic is all there is: known from the start.
        assert_eq!(
            DeploymentHealth::new("d", quick()).state(),
            HealthState::Healthy
        );
    }

    /// Every breaker change reaches the hook exactly once, including the
    /// open → half-open one that only a read (state, admit, snapshot) notices.
    #[test]
    fn every_breaker_change_is_reported_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let h = DeploymentHealth::with_hook(
            "d",
            quick(),
            Arc::new(move |id: &str, t: Transition| {
                sink.lock().unwrap().push((id.to_string(), t.to));
            }),
        );
        for _ in 0..3 {
            h.record(Outcome::Failure);
        }
        std::thread::sleep(Duration::from_millis(50));
        // Several readers notice the expired cooldown; one report.
        assert_eq!(h.snapshot().breaker, BreakerState::HalfOpen);
        assert_eq!(h.state(), HealthState::Unhealthy);
        assert!(h.admit().is_ok());
        h.record(Outcome::Success {
            ttfb: Duration::from_millis(5),
        });
        let to: Vec<BreakerState> = seen.lock().unwrap().iter().map(|(_, t)| *t).collect();
        assert_eq!(
            to,
            [
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Closed
            ]
        );
        assert!(seen.lock().unwrap().iter().all(|(id, _)| id == "d"));
    }

    #[test]
    fn would_admit_leaves_the_trial_free() {
        let h = DeploymentHealth::new("d", quick());
        for _ in 0..3 {
            h.record(Outcome::Failure);
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(h.would_admit(), Ok(HealthState::Unhealthy));
        assert_eq!(h.would_admit(), Ok(HealthState::Unhealthy));
        assert_eq!(h.admit(), Ok(HealthState::Unhealthy));
        assert!(h.would_admit().is_err(), "taken now");
        h.release_trial();
        assert!(h.would_admit().is_ok());
    }

    #[test]
    fn failing_more_than_the_degraded_ratio_is_degraded() {
        let h = DeploymentHealth::new(
            "d",
            HealthSettings {
                failures_to_open: 100,
                degraded_error_ratio: 0.2,
                ..quick()
            },
        );
        let ok = Outcome::Success {
            ttfb: Duration::from_millis(5),
        };
        for _ in 0..9 {
            h.record(ok);
        }
        h.record(Outcome::Failure);
        assert_eq!(h.state(), HealthState::Healthy, "1 in 10 is under 0.2");
        for _ in 0..3 {
            h.record(Outcome::Failure);
            h.record(ok);
        }
        // 4 failures in 16: 0.25.
        assert_eq!(h.state(), HealthState::Degraded);
        assert_eq!(h.snapshot().breaker, BreakerState::Closed);
    }

    #[test]
    fn the_error_ratio_opens_the_breaker_without_consecutive_failures() {
        let h = DeploymentHealth::new(
            "d",
            HealthSettings {
                failures_to_open: 100,
                error_ratio: 0.5,
                min_samples: 10,
                ..quick()
            },
        );
        let ok = Outcome::Success {
            ttfb: Duration::from_millis(5),
        };
        // Alternating: never two failures in a row.
        for _ in 0..4 {
            h.record(ok);
            assert_eq!(h.record(Outcome::Failure), None);
        }
        h.record(ok);
        // 10 samples, 5 failed: the ratio reaches 0.5.
        let t = h.record(Outcome::Failure).unwrap();
        assert_eq!(t.to, BreakerState::Open);
        assert_eq!(h.state(), HealthState::Unhealthy);
    }

    #[test]
    fn latency_rank_puts_failing_after_slow_and_unmeasured_first() {
        let s = quick();
        let slow = DeploymentHealth::new("slow", s);
        slow.record(Outcome::Success {
            ttfb: Duration::from_millis(900),
        });
        let fresh = DeploymentHealth::new("fresh", s);
        let failing = DeploymentHealth::new("failing", s);
        failing.record(Outcome::Success {
            ttfb: Duration::from_millis(1),
        });
        failing.record(Outcome::Failure);
        assert!(fresh.latency_rank() < slow.latency_rank());
        assert!(slow.latency_rank() < failing.latency_rank());
        failing.record(Outcome::Success {
            ttfb: Duration::from_millis(1),
        });
        assert!(failing.latency_rank() < slow.latency_rank(), "recovered");
    }

    #[test]
    fn breaker_opens_half_opens_for_one_trial_and_closes() {
        let h = DeploymentHealth::new("d", quick());
        h.record(Outcome::Success {
            ttfb: Duration::from_millis(5),
        });
        assert_eq!(h.record(Outcome::Failure), None);
        assert_eq!(h.record(Outcome::Failure), None);
        let t = h.record(Outcome::Failure).unwrap();
        assert_eq!(t.to, BreakerState::Open);
        assert!(h.admit().is_err());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(h.admit(), Ok(HealthState::Unhealthy), "the one trial");
        assert!(h.admit().is_err(), "exactly one");
        assert_eq!(
            h.record(Outcome::Success {
                ttfb: Duration::from_millis(5)
            })
            .unwrap()
            .to,
            BreakerState::Closed
        );
        // Closed again, but the recent failures still weigh until they age out.
        assert_eq!(h.state(), HealthState::Degraded);
    }

    #[test]
    fn cooldown_backs_off_on_repeated_openings() {
        let h = DeploymentHealth::new("d", quick());
        for _ in 0..3 {
            h.record(Outcome::Failure);
        }
        let first = h.snapshot().open_for.unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(h.admit().is_ok());
        h.record(Outcome::Failure);
        let second = h.snapshot().open_for.unwrap();
        assert!(second > first, "{second:?} after {first:?}");
    }

    #[test]
    fn retry_after_opens_for_exactly_that_long() {
        let h = DeploymentHealth::new("d", quick());
        h.record(Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
        });
        let left = h.snapshot().open_for.unwrap();
        assert!(left > Duration::from_millis(6900) && left <= Duration::from_secs(7));
    }

    #[test]
    fn probes_open_and_close_the_breaker() {
        let h = DeploymentHealth::new("d", quick());
        h.record_probe(probe(true));
        h.record_probe(probe(false));
        assert_eq!(
            h.state(),
            HealthState::Healthy,
            "one failure is below the threshold"
        );
        assert_eq!(h.record_probe(probe(false)).unwrap().to, BreakerState::Open);
        assert_eq!(h.state(), HealthState::Unhealthy);
        assert_eq!(
            h.record_probe(probe(true)).unwrap().to,
            BreakerState::Closed
        );
        assert_eq!(h.state(), HealthState::Healthy);
    }

    #[test]
    fn slow_is_degraded() {
        let h = DeploymentHealth::new(
            "d",
            HealthSettings {
                slow_after: Duration::from_millis(100),
                ..quick()
            },
        );
        h.record(Outcome::Success {
            ttfb: Duration::from_millis(500),
        });
        assert_eq!(h.state(), HealthState::Degraded);
    }

    #[test]
    fn availability_counts_probes_and_live_outcomes_by_the_minute() {
        let h = DeploymentHealth::new("d", quick());
        h.record_probe(probe(true));
        h.record(Outcome::Failure);
        h.record(Outcome::Success {
            ttfb: Duration::from_millis(5),
        });
        // A provider asking for rest is busy, not down: not counted.
        h.record(Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(1)),
        });
        let s = h.snapshot();
        let want = Availability {
            succeeded: 2,
            failed: 1,
        };
        assert_eq!((s.availability_1h, s.availability_24h), (want, want));
        assert!(s.last_probe_at.is_some());
        assert_eq!((s.errors, s.error_samples), (1, 3));
        // Minutes age out of the hour, then of the day.
        let mut hist = History::default();
        let t0 = Instant::now();
        hist.add(true, t0);
        hist.add(false, t0 + Duration::from_secs(61));
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(hist.totals(60, at(61)), (1, 1));
        assert_eq!(hist.totals(60, at(60 * 60)), (0, 1));
        assert_eq!(hist.totals(1440, at(1440 * 60 + 1)), (0, 1));
        // A slot is reused a day later, never added to.
        hist.add(true, at(1440 * 60 + 1));
        assert_eq!(hist.totals(1440, at(1440 * 60 + 1)), (1, 1));
        assert_eq!(hist.slots.len(), HISTORY_MINUTES);
    }
}
