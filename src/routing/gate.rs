//! A pool's concurrency gate: priority admission to a pool whose
//! concurrency is short.
//!
//! Each pool has a concurrency budget: configured (`max_concurrency`), or
//! learned from the provider (a 429, no requests left, or fewer tokens left
//! than the request reserved — the provider's `x-ratelimit-remaining-*`
//! headers — cuts it to three quarters of what was in flight; less than a
//! tenth of a provider window left holds it; every other success grows it by
//! one over the current budget, up to the configured ceiling). While the
//! pool is saturated, requests wait in one queue per priority. A freed slot
//! goes to the class with the smallest virtual pass (stride scheduling with
//! weights 16, 8, 4, 2, 1 for priorities 1 … 5): priority 1 is served first
//! almost always, and priority 5 still gets one slot in 31 when every class
//! waits, so it is delayed, never starved. A request that waits longer than
//! its maximum gets 429 with a `Retry-After` computed from its position.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const WEIGHTS: [f64; 5] = [16.0, 8.0, 4.0, 2.0, 1.0];

/// What the queue assumes a request holds its slot for until one has been
/// released: `Retry-After` for a queue that has not moved yet follows from
/// the configuration alone (position × this ÷ slots).
pub(crate) const INITIAL_SERVICE_TIME: Duration = Duration::from_secs(1);

/// A pool's concurrency gate. One per pool id, kept across reloads: a reload
/// changes its settings in place, so the requests in flight and in the queue
/// stay counted.
#[derive(Debug)]
pub(crate) struct PoolGate {
    state: Mutex<GateState>,
}

#[derive(Debug)]
struct GateState {
    /// Upper bound on the budget; `None` with `adaptive` = learn from scratch.
    ceiling: Option<u32>,
    adaptive: bool,
    inflight: u32,
    /// `None`: no budget known, nothing queues.
    limit: Option<f64>,
    queues: [VecDeque<Waiter>; 5],
    pass: [f64; 5],
    vtime: f64,
    /// Seconds a request holds a slot, smoothed.
    service_s: f64,
    next_id: u64,
    /// Highest in-flight count since the last look (for load).
    peak: u32,
}

/// A queued request. The slot is handed over as a [`Permit`] that exists
/// before it is sent: if the request is gone by then, the send fails and the
/// slot is taken back; if it goes after the send but before it looked, the
/// permit is dropped with the channel and releases the slot. Either way
/// nothing leaks.
#[derive(Debug)]
struct Waiter {
    id: u64,
    tx: oneshot::Sender<Permit>,
}

/// Why a request did not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueTimeout {
    pub(crate) retry_after: Duration,
}

/// A slot in a pool, released on drop.
#[derive(Debug)]
pub(crate) struct Permit {
    gate: Arc<PoolGate>,
    since: Instant,
    /// False only for a permit whose hand-off failed (its slot was already
    /// taken back).
    armed: bool,
}

impl Permit {
    /// Give the slot back with no attempt made on it (the pool had nothing
    /// to offer once the slot was taken): the next waiting request gets
    /// it, and no service time is sampled — none was given.
    pub(crate) fn unused(mut self) {
        self.armed = false;
        self.gate.release(None);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.armed {
            self.gate.release(Some(self.since.elapsed()));
        }
    }
}

/// A request's place in the queue while it waits. Dropped — the wait timed
/// out, or the future waiting was cancelled because the client went away —
/// it leaves the queue at once, so it neither holds up nor inflates the
/// `Retry-After` of those behind it. A permit already handed to it is
/// released when `rx` drops.
struct Ticket {
    gate: Arc<PoolGate>,
    class: usize,
    id: u64,
    rx: oneshot::Receiver<Permit>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        if let Some(pos) = s.queues[self.class].iter().position(|w| w.id == self.id) {
            s.queues[self.class].remove(pos);
        }
        // The lock is released before `rx` (and any permit in it) drops.
    }
}

fn class(priority: u8) -> usize {
    usize::from(priority.clamp(1, 5).saturating_sub(1))
}

/// The budget a gate starts with, or is set to by a reload.
fn configured_limit(ceiling: Option<u32>) -> Option<f64> {
    ceiling.map(f64::from)
}

impl PoolGate {
    pub(crate) fn new(ceiling: Option<u32>, adaptive: bool) -> PoolGate {
        PoolGate {
            state: Mutex::new(GateState {
                ceiling,
                adaptive,
                inflight: 0,
                limit: configured_limit(ceiling),
                queues: Default::default(),
                pass: [0.0; 5],
                vtime: 0.0,
                service_s: INITIAL_SERVICE_TIME.as_secs_f64(),
                next_id: 0,
                peak: 0,
            }),
        }
    }

    /// (ceiling, adaptive) as configured.
    #[cfg(test)]
    pub(crate) fn settings(&self) -> (Option<u32>, bool) {
        let s = self.lock();
        (s.ceiling, s.adaptive)
    }

    /// New settings from a reload. Requests in flight and queued stay; a
    /// learned budget is kept under the new ceiling; a budget that grew lets
    /// waiting requests in at once.
    pub(crate) fn reconfigure(self: &Arc<Self>, ceiling: Option<u32>, adaptive: bool) {
        let mut s = self.lock();
        if (s.ceiling, s.adaptive) == (ceiling, adaptive) {
            return;
        }
        s.limit = match (adaptive, s.adaptive, s.limit, ceiling) {
            // Still learning: keep what was learned, under the new ceiling.
            (true, true, Some(l), Some(c)) => Some(l.min(f64::from(c))),
            (true, true, Some(l), None) => Some(l),
            _ => configured_limit(ceiling),
        };
        s.ceiling = ceiling;
        s.adaptive = adaptive;
        self.hand_over(&mut s);
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_room(s: &GateState) -> bool {
        s.limit
            .is_none_or(|l| f64::from(s.inflight) < l.floor().max(1.0))
    }

    fn grant(self: &Arc<Self>, s: &mut GateState) -> Permit {
        s.inflight = s.inflight.saturating_add(1);
        s.peak = s.peak.max(s.inflight);
        Permit {
            gate: Arc::clone(self),
            since: Instant::now(),
            armed: true,
        }
    }

    /// A slot now, or `None` without waiting.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut s = self.lock();
        let idle_queue = s.queues.iter().all(VecDeque::is_empty);
        (idle_queue && Self::has_room(&s)).then(|| self.grant(&mut s))
    }

    /// A slot, waiting in the priority queue for at most `max_wait`.
    /// Cancel-safe: dropping the future leaves the queue and leaks no slot.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        priority: u8,
        max_wait: Duration,
    ) -> Result<Permit, QueueTimeout> {
        let c = class(priority);
        let mut ticket = {
            let mut s = self.lock();
            if s.queues.iter().all(VecDeque::is_empty) && Self::has_room(&s) {
                return Ok(self.grant(&mut s));
            }
            let (tx, rx) = oneshot::channel();
            let id = s.next_id;
            s.next_id = s.next_id.wrapping_add(1);
            if s.queues[c].is_empty() {
                // A class that starts waiting earns its first slot like any
                // other, and gets no credit for the time it had nobody waiting.
                s.pass[c] = s.pass[c].max(s.vtime + 1.0 / WEIGHTS[c]);
            }
            s.queues[c].push_back(Waiter { id, tx });
            Ticket {
                gate: Arc::clone(self),
                class: c,
                id,
                rx,
            }
        };
        if let Ok(Ok(permit)) = tokio::time::timeout(max_wait, &mut ticket.rx).await {
            return Ok(permit);
        }
        // The wait ran out (the sender is never dropped unsent while the
        // waiter is queued). Leave the queue, unless a slot was handed over
        // just now: it is ours then.
        let retry_after = {
            let mut s = self.lock();
            let pos = s.queues[c].iter().position(|w| w.id == ticket.id);
            pos.map(|pos| {
                s.queues[c].remove(pos);
                Self::wait_estimate(&s, c, pos)
            })
        };
        match retry_after {
            Some(retry_after) => Err(QueueTimeout { retry_after }),
            None => ticket.rx.try_recv().map_err(|_| QueueTimeout {
                retry_after: INITIAL_SERVICE_TIME,
            }),
        }
    }

    /// How long the request at `pos` in class `c` would still wait: those
    /// ahead of it (its own class and every higher one) times the time a slot
    /// is held, spread over the slots. Before any slot was released the time
    /// held is [`INITIAL_SERVICE_TIME`], so the answer follows from the
    /// configuration and the queue alone.
    fn wait_estimate(s: &GateState, c: usize, pos: usize) -> Duration {
        let ahead = s.queues[..c]
            .iter()
            .map(VecDeque::len)
            .fold(pos.saturating_add(1), usize::saturating_add);
        let slots = s.limit.unwrap_or(1.0).max(1.0);
        let secs = (ahead as f64 * s.service_s / slots).ceil().max(1.0);
        Duration::from_secs_f64(secs)
    }

    /// A slot back, to the next waiter; `held` (how long it served a
    /// request) feeds the service-time average, none for a slot unused.
    fn release(self: &Arc<Self>, held: Option<Duration>) {
        let mut s = self.lock();
        s.inflight = s.inflight.saturating_sub(1);
        if let Some(held) = held {
            s.service_s = 0.8 * s.service_s + 0.2 * held.as_secs_f64();
        }
        self.hand_over(&mut s);
    }

    /// Give free slots to waiting requests, by stride order.
    fn hand_over(self: &Arc<Self>, s: &mut GateState) {
        while Self::has_room(s) {
            let Some(c) = Self::next_class(s) else {
                break;
            };
            let Some(w) = s.queues[c].pop_front() else {
                break;
            };
            s.vtime = s.pass[c];
            s.pass[c] += 1.0 / WEIGHTS[c];
            let permit = self.grant(s);
            if let Err(mut unsent) = w.tx.send(permit) {
                // The waiter is gone: take the slot back here (dropping an
                // armed permit would lock the gate again).
                unsent.armed = false;
                s.inflight = s.inflight.saturating_sub(1);
            }
        }
    }

    /// The waiting class with the smallest pass; ties go to higher priority.
    fn next_class(s: &GateState) -> Option<usize> {
        (0..5)
            .filter(|&c| !s.queues[c].is_empty())
            .min_by(|&a, &b| s.pass[a].total_cmp(&s.pass[b]).then(a.cmp(&b)))
    }

    /// React to what a provider's response said about the key's capacity:
    /// exhausted cuts an adaptive budget, low holds it, clear (on a success)
    /// grows it.
    pub(crate) fn observe(&self, pressure: Pressure, success: bool) {
        match pressure {
            Pressure::Exhausted => self.saturated(),
            Pressure::Low => {}
            Pressure::Clear if success => self.succeeded(),
            Pressure::Clear => {}
        }
    }

    /// The provider pushed back (429, or no requests left in its window).
    pub(crate) fn saturated(&self) {
        let mut s = self.lock();
        if !s.adaptive {
            return;
        }
        let cut = (f64::from(s.inflight) * 0.75).max(1.0);
        s.limit = Some(s.limit.map_or(cut, |l| l.min(cut)));
    }

    /// A request went through: an adaptive budget grows again.
    pub(crate) fn succeeded(&self) {
        let mut s = self.lock();
        if !s.adaptive {
            return;
        }
        if let Some(l) = s.limit {
            let grown = l + 1.0 / l.max(1.0);
            s.limit = Some(match s.ceiling {
                Some(c) => grown.min(f64::from(c)),
                None => grown,
            });
        }
    }

    /// Like [`PoolGate::load`] without resetting the peak (for status pages).
    pub(crate) fn load_now(&self) -> GateLoad {
        let s = self.lock();
        GateLoad {
            inflight: s.inflight,
            peak: s.peak,
            limit: s.limit,
            waiting: s.queues.iter().map(VecDeque::len).sum(),
        }
    }

    /// (in flight now, the budget, waiting) for status and rebalancing.
    pub(crate) fn load(&self) -> GateLoad {
        let mut s = self.lock();
        let inflight = s.inflight;
        let peak = std::mem::replace(&mut s.peak, inflight);
        GateLoad {
            inflight: s.inflight,
            peak,
            limit: s.limit,
            waiting: s.queues.iter().map(VecDeque::len).sum(),
        }
    }
}

/// What a provider's `x-ratelimit-*` response headers say about its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pressure {
    /// No request left, or fewer tokens left than this request reserved:
    /// the next one like it would get a 429.
    Exhausted,
    /// Less than [`LOW_SHARE`] of a window left: do not grow.
    Low,
    /// Nothing said, or plenty left.
    Clear,
}

/// Share of a provider's window below which the budget stops growing.
pub(crate) const LOW_SHARE: f64 = 0.1;

/// Read `x-ratelimit-remaining-requests` / `-tokens` and their `limit`
/// counterparts (OpenAI's names, also used by several compatible providers).
/// `tokens` is what this request reserved, the size of the next one like it.
/// A name sent twice counts by its first value. One pass over the head (a
/// prefix test per header), not a lookup per name: this runs on every
/// response.
pub(crate) fn provider_pressure(headers: &http::HeaderMap, tokens: u64) -> Pressure {
    const NAMES: [&str; 4] = [
        "remaining-requests",
        "remaining-tokens",
        "limit-requests",
        "limit-tokens",
    ];
    // Per name: None until seen, then its first value as a number, if it
    // is one.
    let mut read: [Option<Option<f64>>; 4] = [None; 4];
    for (name, value) in headers {
        let Some(rest) = name.as_str().strip_prefix("x-ratelimit-") else {
            continue;
        };
        let Some(slot) = NAMES
            .iter()
            .position(|n| *n == rest)
            .and_then(|i| read.get_mut(i))
        else {
            continue;
        };
        slot.get_or_insert_with(|| {
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|n| n.is_finite())
        });
    }
    let [requests_left, tokens_left, requests_limit, tokens_limit] = read.map(Option::flatten);
    if requests_left.is_some_and(|n| n < 1.0)
        || tokens_left.is_some_and(|n| n < (tokens.max(1)) as f64)
    {
        return Pressure::Exhausted;
    }
    let low = |left: Option<f64>, limit: Option<f64>| {
        left.zip(limit)
            .is_some_and(|(left, limit)| limit > 0.0 && left / limit < LOW_SHARE)
    };
    if low(requests_left, requests_limit) || low(tokens_left, tokens_limit) {
        return Pressure::Low;
    }
    Pressure::Clear
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GateLoad {
    pub(crate) inflight: u32,
    /// Highest in flight since the previous call.
    pub(crate) peak: u32,
    pub(crate) limit: Option<f64>,
    pub(crate) waiting: usize,
}

impl GateLoad {
    /// Fraction of the budget in use (waiting requests count as demand).
    pub(crate) fn utilisation(&self) -> Option<f64> {
        self.limit
            .map(|l| (f64::from(self.peak.max(self.inflight)) + self.waiting as f64) / l.max(1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn higher_priority_first_lower_not_starved() {
        let gate = Arc::new(PoolGate::new(Some(1), false));
        let hold = gate.try_acquire().unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Five priority-5 requests queue first, then forty priority-1 ones.
        for (i, p) in std::iter::repeat_n(5u8, 5)
            .chain(std::iter::repeat_n(1u8, 40))
            .enumerate()
        {
            let g = Arc::clone(&gate);
            let order = Arc::clone(&order);
            tasks.push(tokio::spawn(async move {
                let permit = g.acquire(p, Duration::from_secs(30)).await.unwrap();
                order.lock().unwrap().push((i, p));
                drop(permit);
            }));
            tokio::task::yield_now().await;
        }
        drop(hold);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap();
        let first_low = order.iter().position(|&(_, p)| p == 5).unwrap();
        assert_eq!(
            first_low, 16,
            "sixteen priority-1 slots, then one priority-5: {order:?}"
        );
        assert_eq!(order.len(), 45);
    }

    #[tokio::test]
    async fn timeout_reports_a_retry_after_from_position() {
        let gate = Arc::new(PoolGate::new(Some(1), false));
        let _hold = gate.try_acquire().unwrap();
        let err = gate
            .acquire(3, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(err.retry_after >= Duration::from_secs(1));
        assert_eq!(
            gate.load().waiting,
            0,
            "a timed-out waiter leaves the queue"
        );
    }

    /// The slot is handed to a waiter whose future is then dropped before
    /// it looked: the slot comes back (it used to stay counted forever).
    #[tokio::test]
    async fn a_slot_handed_to_a_cancelled_waiter_is_not_lost() {
        let gate = Arc::new(PoolGate::new(Some(1), false));
        let hold = gate.try_acquire().unwrap();
        let mut waiting = Box::pin(gate.acquire(3, Duration::from_secs(30)));
        assert!(futures::poll!(&mut waiting).is_pending());
        assert_eq!(gate.load_now().waiting, 1);
        drop(hold);
        // Handed over: counted in flight, not yet received.
        assert_eq!(gate.load_now().inflight, 1);
        drop(waiting);
        assert_eq!(gate.load_now().inflight, 0, "the slot came back");
        assert!(gate.try_acquire().is_some());
    }

    /// A waiter that goes away leaves the queue at once: those behind it
    /// move up and are told shorter waits.
    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let gate = Arc::new(PoolGate::new(Some(1), false));
        let _hold = gate.try_acquire().unwrap();
        let mut first = Box::pin(gate.acquire(5, Duration::from_secs(30)));
        assert!(futures::poll!(&mut first).is_pending());
        drop(first);
        assert_eq!(gate.load_now().waiting, 0);
        let err = gate
            .acquire(5, Duration::from_millis(10))
            .await
            .unwrap_err();
        assert_eq!(err.retry_after, Duration::from_secs(1), "first in line");
    }

    /// A slot given back unused (the pool offered nothing once it was
    /// taken) goes to the next waiter like any other, and samples no
    /// service time: the queue's wait estimates stay what they were.
    #[tokio::test]
    async fn a_slot_given_back_unused_goes_on_without_a_service_time() {
        let gate = Arc::new(PoolGate::new(Some(1), false));
        let taken = gate.try_acquire().unwrap();
        let before = gate.lock().service_s;
        let mut waiting = Box::pin(gate.acquire(3, Duration::from_secs(30)));
        assert!(futures::poll!(&mut waiting).is_pending());
        tokio::time::sleep(Duration::from_millis(20)).await;
        taken.unused();
        let handed = waiting.await.expect("the waiter gets the slot");
        assert_eq!(gate.load_now().inflight, 1);
        assert_eq!(gate.lock().service_s, before, "no service time sampled");
        handed.unused();
        assert_eq!(gate.load_now().inflight, 0);
        assert!(gate.try_acquire().is_some());
    }

    /// Before any slot was released the estimate follows from the queue and
    /// the configuration alone: ahead of a request are those of its class
    /// before it and every waiting request of a higher priority.
    #[tokio::test]
    async fn retry_after_follows_the_queue_position() {
        let gate = Arc::new(PoolGate::new(Some(2), false));
        let _hold = (gate.try_acquire().unwrap(), gate.try_acquire().unwrap());
        let mut queued = Vec::new();
        for p in [5, 5, 5, 1] {
            let mut w = Box::pin(gate.acquire(p, Duration::from_secs(30)));
            assert!(futures::poll!(&mut w).is_pending());
            queued.push(w);
        }
        let retry = |p| {
            let gate = Arc::clone(&gate);
            async move {
                gate.acquire(p, Duration::from_millis(5))
                    .await
                    .unwrap_err()
                    .retry_after
            }
        };
        // Priority 5 at position 3 with one priority 1 ahead: 5 × 1 s / 2 slots.
        assert_eq!(retry(5).await, Duration::from_secs(3));
        // Priority 1 at position 1: 2 × 1 s / 2.
        assert_eq!(retry(1).await, Duration::from_secs(1));
        queued.truncate(1);
        assert_eq!(retry(5).await, Duration::from_secs(1));
    }

    #[tokio::test]
    async fn reconfigure_keeps_the_count_and_lets_waiters_in() {
        let gate = Arc::new(PoolGate::new(Some(1), false));
        let hold = gate.try_acquire().unwrap();
        let mut waiting = Box::pin(gate.acquire(3, Duration::from_secs(30)));
        assert!(futures::poll!(&mut waiting).is_pending());
        gate.reconfigure(Some(3), false);
        let second = waiting.await.unwrap();
        assert_eq!(gate.load_now().inflight, 2, "the slot held before counts");
        let third = gate.try_acquire().unwrap();
        assert!(gate.try_acquire().is_none());
        gate.reconfigure(Some(1), true);
        drop((hold, second, third));
        assert_eq!(gate.load_now().inflight, 0);
        assert_eq!(gate.settings(), (Some(1), true));
    }

    #[test]
    fn provider_headers_say_how_pressed_the_key_is() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, http::HeaderValue::from_static(v));
            }
            m
        };
        assert_eq!(provider_pressure(&h(&[]), 100), Pressure::Clear);
        let none_left = h(&[("x-ratelimit-remaining-requests", "0")]);
        assert_eq!(provider_pressure(&none_left, 100), Pressure::Exhausted);
        let few_tokens = h(&[("x-ratelimit-remaining-tokens", "99")]);
        assert_eq!(provider_pressure(&few_tokens, 100), Pressure::Exhausted);
        let low = h(&[
            ("x-ratelimit-remaining-tokens", "900"),
            ("x-ratelimit-limit-tokens", "10000"),
        ]);
        assert_eq!(provider_pressure(&low, 100), Pressure::Low);
        let plenty = h(&[
            ("x-ratelimit-remaining-requests", "4999"),
            ("x-ratelimit-limit-requests", "5000"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-limit-tokens", "150000"),
        ]);
        assert_eq!(provider_pressure(&plenty, 100), Pressure::Clear);
        // A name sent twice counts by its first value, readable or not;
        // other x-ratelimit-* names are not read.
        let mut twice = h(&[("x-ratelimit-reset-requests", "0")]);
        twice.append("x-ratelimit-remaining-requests", "5".parse().unwrap());
        twice.append("x-ratelimit-remaining-requests", "0".parse().unwrap());
        assert_eq!(provider_pressure(&twice, 100), Pressure::Clear);
        let mut unreadable = h(&[]);
        unreadable.append("x-ratelimit-remaining-tokens", "soon".parse().unwrap());
        unreadable.append("x-ratelimit-remaining-tokens", "0".parse().unwrap());
        assert_eq!(provider_pressure(&unreadable, 100), Pressure::Clear);
        let inf = h(&[("x-ratelimit-remaining-requests", "-inf")]);
        assert_eq!(provider_pressure(&inf, 100), Pressure::Clear);
        let gate = Arc::new(PoolGate::new(Some(4), true));
        let _p = gate.try_acquire().unwrap();
        gate.observe(Pressure::Exhausted, true);
        assert_eq!(gate.load_now().limit, Some(1.0));
        gate.observe(Pressure::Low, true);
        assert_eq!(gate.load_now().limit, Some(1.0), "low holds");
        gate.observe(Pressure::Clear, true);
        assert_eq!(gate.load_now().limit, Some(2.0), "clear grows");
    }

    #[test]
    fn adaptive_budget_cuts_and_regrows() {
        let gate = Arc::new(PoolGate::new(Some(8), true));
        let permits: Vec<Permit> = (0..8).map(|_| gate.try_acquire().unwrap()).collect();
        gate.saturated();
        assert_eq!(gate.load().limit, Some(6.0));
        drop(permits);
        for _ in 0..200 {
            gate.succeeded();
        }
        assert_eq!(gate.load().limit, Some(8.0), "never past the ceiling");
    }
}
