//! The windows a quota is counted in: token buckets for per-minute rates
//! (with bursts) and calendar counters for days and months.

pub(crate) use crate::config::{Budget, Rate};
use arc_swap::ArcSwapOption;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// What one request takes from a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Amount {
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
    /// Nanodollars.
    pub(crate) usd_nano: u64,
}

impl Amount {
    pub(crate) fn saturating_sub(self, o: Amount) -> Amount {
        Amount {
            requests: self.requests.saturating_sub(o.requests),
            tokens: self.tokens.saturating_sub(o.tokens),
            usd_nano: self.usd_nano.saturating_sub(o.usd_nano),
        }
    }

    pub(crate) fn saturating_add(self, o: Amount) -> Amount {
        Amount {
            requests: self.requests.saturating_add(o.requests),
            tokens: self.tokens.saturating_add(o.tokens),
            usd_nano: self.usd_nano.saturating_add(o.usd_nano),
        }
    }
}

/// A token bucket. The level may go below zero when a request used more
/// than it reserved: that debt is repaid by refill before anything else is
/// admitted, so nothing used is forgiven.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    level: f64,
    updated: Instant,
}

impl Bucket {
    /// A new bucket starts full: an idle tenant may spend its burst at once.
    pub(crate) fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            level: rate.burst as f64,
            updated: now,
        }
    }

    /// Bring the level up to `now`. `extra_per_minute` is lent capacity
    /// (refill and ceiling both grow by it while the loan lasts).
    pub(crate) fn refill(&mut self, rate: Rate, extra_per_minute: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        // Instants are read before the ledger's lock is taken, so one may
        // arrive after a later one: time never runs backwards here, or the
        // span between them would be refilled twice.
        self.updated = self.updated.max(now);
        let per_sec = (rate.per_minute as f64 + extra_per_minute) / 60.0;
        let ceiling = rate.burst as f64 + extra_per_minute;
        if self.level < ceiling {
            self.level = (self.level + elapsed * per_sec).min(ceiling);
        } else {
            // A limit lowered by reload (or a loan ended) caps the level.
            self.level = ceiling;
        }
    }

    pub(crate) fn level(&self) -> f64 {
        self.level
    }

    pub(crate) fn can_take(&self, n: u64) -> bool {
        self.level >= n as f64
    }

    pub(crate) fn take(&mut self, n: u64) {
        self.level -= n as f64;
    }

    /// Give back (negative: take more), never above `ceiling`.
    pub(crate) fn adjust(&mut self, delta: f64, ceiling: f64) {
        self.level = (self.level + delta).min(ceiling);
    }

    /// The burst changed (a reload): what was drawn from the bucket stays
    /// drawn, so the level moves by the change. A lowered limit can leave the
    /// bucket in debt, repaid at the new rate like any other debt.
    pub(crate) fn rebase(&mut self, old: Rate, new: Rate) {
        self.level += new.burst as f64 - old.burst as f64;
    }

    /// Add lent capacity at once (a loan that starts or grows).
    pub(crate) fn credit(&mut self, n: f64) {
        self.level += n;
    }

    /// How long until `n` can be taken at `per_minute`.
    pub(crate) fn wait_for(&self, n: u64, rate: Rate, extra_per_minute: f64) -> Duration {
        let missing = n as f64 - self.level;
        let per_sec = (rate.per_minute as f64 + extra_per_minute) / 60.0;
        if missing <= 0.0 || per_sec <= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(missing / per_sec).unwrap_or(Duration::MAX)
    }
}

/// Use of one calendar window: settled use and reservations in flight.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counter {
    /// Which day or month (see [`Calendar`]) this counts.
    pub(crate) window: i64,
    pub(crate) used: Amount,
    pub(crate) reserved: Amount,
}

impl Counter {
    /// Start counting a new window: settled use resets, reservations in
    /// flight carry over (they will be settled into the new window).
    pub(crate) fn roll(&mut self, window: i64) {
        if self.window != window {
            self.window = window;
            self.used = Amount::default();
        }
    }

    /// The first dimension `amount` would push past `budget`, if any.
    pub(crate) fn exceeds(&self, budget: &Budget, amount: Amount) -> Option<&'static str> {
        let total = self
            .used
            .saturating_add(self.reserved)
            .saturating_add(amount);
        if budget.requests.is_some_and(|l| total.requests > l) {
            Some("requests")
        } else if budget.tokens.is_some_and(|l| total.tokens > l) {
            Some("tokens")
        } else if budget.usd_nano.is_some_and(|l| total.usd_nano > l) {
            Some("usd")
        } else {
            None
        }
    }
}

/// The wall clock calendar windows are read from: the system clock, unless
/// pinned. Tests (and simulations) pin it to cross a day or month boundary
/// without waiting for one; per-minute buckets always use the monotonic
/// clock and are not affected.
#[derive(Debug, Clone)]
pub struct Clock(Arc<AtomicI64>);

/// Stored in a [`Clock`] that follows the system clock.
const UNPINNED: i64 = i64::MIN;

impl Default for Clock {
    fn default() -> Self {
        Clock(Arc::new(AtomicI64::new(UNPINNED)))
    }
}

impl Clock {
    pub(crate) fn now(&self) -> Timestamp {
        match self.0.load(Ordering::Relaxed) {
            UNPINNED => Timestamp::now(),
            ms => Timestamp::from_millisecond(ms).unwrap_or_else(|_| Timestamp::now()),
        }
    }

    /// From now on, `now()` is `at` (to the millisecond) until pinned again
    /// or [`Clock::unpin`]ned.
    pub fn pin(&self, at: Timestamp) {
        self.0.store(at.as_millisecond(), Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn unpin(&self) {
        self.0.store(UNPINNED, Ordering::Relaxed);
    }
}

/// Calendar days and months in the configured time zone, as window numbers
/// with the instant each one ends. Cached while the clock stays inside the
/// current day.
#[derive(Debug)]
pub(crate) struct Calendar {
    tz: TimeZone,
    clock: Clock,
    /// Read by every reservation, settlement and response head: no lock.
    cached: ArcSwapOption<Windows>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Windows {
    pub(crate) day: i64,
    /// When the current day began (a month never begins inside a day).
    pub(crate) day_start: Timestamp,
    pub(crate) day_end: Timestamp,
    pub(crate) month: i64,
    pub(crate) month_end: Timestamp,
}

impl Calendar {
    /// Following the system clock.
    #[cfg(test)]
    pub(crate) fn new(tz: TimeZone) -> Calendar {
        Calendar::with_clock(tz, Clock::default())
    }

    pub(crate) fn with_clock(tz: TimeZone, clock: Clock) -> Calendar {
        Calendar {
            tz,
            clock,
            cached: ArcSwapOption::empty(),
        }
    }

    /// The calendar's notion of now.
    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub(crate) fn windows(&self, now: Timestamp) -> Windows {
        if let Some(w) = self.cached.load().as_deref() {
            // A pinned clock may also move backwards.
            if w.day_start <= now && now < w.day_end && now < w.month_end {
                return *w;
            }
        }
        // Two threads may both compute the new day; they agree.
        let w = self.compute(now);
        self.cached.store(Some(Arc::new(w)));
        w
    }

    fn compute(&self, now: Timestamp) -> Windows {
        let z: Zoned = now.to_zoned(self.tz.clone());
        let date = z.date();
        let day_start = date.to_zoned(self.tz.clone()).ok();
        let day_end = day_start
            .as_ref()
            .and_then(|d| d.checked_add(1.day()).ok())
            .map_or(now, |d| d.timestamp());
        let day_start = day_start.map_or(now, |d| d.timestamp());
        let first = date.first_of_month();
        let month_end = first
            .checked_add(1.month())
            .ok()
            .and_then(|d| d.to_zoned(self.tz.clone()).ok())
            .map_or(now, |d| d.timestamp());
        // Years are small (jiff: -9999..=9999): these cannot overflow.
        let day = i64::from(date.year())
            .saturating_mul(1000)
            .saturating_add(i64::from(date.day_of_year()));
        let month = i64::from(date.year())
            .saturating_mul(12)
            .saturating_add(i64::from(date.month()));
        Windows {
            day,
            day_start,
            day_end,
            month,
            month_end,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_starts_full_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let rate = Rate {
            per_minute: 60,
            burst: 10,
        };
        let mut b = Bucket::full(rate, t0);
        for _ in 0..10 {
            assert!(b.can_take(1));
            b.take(1);
        }
        assert!(!b.can_take(1));
        assert_eq!(b.wait_for(1, rate, 0.0), Duration::from_secs(1));
        b.refill(rate, 0.0, t0 + Duration::from_millis(2500));
        assert!(b.can_take(2) && !b.can_take(3));
        b.refill(rate, 0.0, t0 + Duration::from_secs(3600));
        assert_eq!(b.level(), 10.0, "never above the burst");
        b.refill(rate, 5.0, t0 + Duration::from_secs(7200));
        assert_eq!(b.level(), 15.0, "a loan raises the ceiling");
    }

    #[test]
    fn calendar_windows_follow_the_time_zone() {
        let cal = Calendar::new(TimeZone::get("America/New_York").unwrap());
        // 2026-03-01 04:30 UTC is still February 28th in New York.
        let t: Timestamp = "2026-03-01T04:30:00Z".parse().unwrap();
        let w = cal.windows(t);
        assert_eq!(w.month_end.to_string(), "2026-03-01T05:00:00Z");
        assert_eq!(w.day_end, w.month_end);
        let after = cal.windows("2026-03-01T05:00:00Z".parse().unwrap());
        assert_ne!(after.day, w.day);
        assert_ne!(after.month, w.month);
        let utc = Calendar::new(TimeZone::UTC).windows(t);
        assert_eq!(utc.day_end.to_string(), "2026-03-02T00:00:00Z");
    }

    #[test]
    fn a_pinned_clock_moves_the_calendar_both_ways() {
        let clock = Clock::default();
        let cal = Calendar::with_clock(TimeZone::get("Asia/Tokyo").unwrap(), clock.clone());
        // 23:30 on March 1st in Tokyo.
        clock.pin("2026-03-01T14:30:00Z".parse().unwrap());
        let before = cal.windows(cal.now());
        assert_eq!(before.day_end.to_string(), "2026-03-01T15:00:00Z");
        clock.pin("2026-03-01T15:00:01Z".parse().unwrap());
        let after = cal.windows(cal.now());
        assert_ne!(after.day, before.day, "a new day in Tokyo, not yet in UTC");
        clock.pin("2026-03-01T14:59:59Z".parse().unwrap());
        assert_eq!(cal.windows(cal.now()), before, "the cache follows it back");
        clock.unpin();
        assert!(cal.now() > "2026-01-01T00:00:00Z".parse().unwrap());
    }

    #[test]
    fn refill_never_runs_time_backwards() {
        let t0 = Instant::now();
        let rate = Rate {
            per_minute: 60,
            burst: 10,
        };
        let mut b = Bucket::full(rate, t0);
        b.take(10);
        b.refill(rate, 0.0, t0 + Duration::from_secs(2));
        // An instant read earlier, arriving late, adds nothing...
        b.refill(rate, 0.0, t0 + Duration::from_secs(1));
        // ...and the next refill does not count the second twice.
        b.refill(rate, 0.0, t0 + Duration::from_secs(3));
        assert_eq!(b.level(), 3.0);
    }

    #[test]
    fn counters_roll_and_check_every_dimension() {
        let mut c = Counter::default();
        let budget = Budget {
            requests: Some(2),
            tokens: Some(100),
            usd_nano: None,
        };
        let one = Amount {
            requests: 1,
            tokens: 40,
            usd_nano: 0,
        };
        assert_eq!(c.exceeds(&budget, one), None);
        c.used = one;
        c.reserved = one;
        assert_eq!(c.exceeds(&budget, one), Some("requests"));
        c.roll(7);
        assert_eq!(c.used, Amount::default());
        assert_eq!(c.reserved, one, "reservations in flight carry over");
    }
}
