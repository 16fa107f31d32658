//! Priority admission to a pool whose concurrency is short.
//!
//! Each pool has a concurrency budget: configured (`max_concurrency`), or
//! learned from the provider (a 429 or `x-ratelimit-remaining-requests: 0`
//! cuts it to three quarters of what was in flight; every success grows it
//! by one over the current budget, up to the configured ceiling). While the
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

/// A pool's concurrency gate.
#[derive(Debug)]
pub struct PoolGate {
    /// Upper bound on the budget; `None` with `adaptive` = learn from scratch.
    ceiling: Option<u32>,
    adaptive: bool,
    state: Mutex<GateState>,
}

#[derive(Debug)]
struct GateState {
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

#[derive(Debug)]
struct Waiter {
    id: u64,
    tx: oneshot::Sender<()>,
}

/// Why a request did not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueTimeout {
    pub retry_after: Duration,
}

/// A slot in a pool, released on drop.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<PoolGate>,
    since: Instant,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release(self.since.elapsed());
    }
}

fn class(priority: u8) -> usize {
    usize::from(priority.clamp(1, 5) - 1)
}

impl PoolGate {
    pub fn new(ceiling: Option<u32>, adaptive: bool) -> PoolGate {
        PoolGate {
            ceiling,
            adaptive,
            state: Mutex::new(GateState {
                inflight: 0,
                limit: ceiling.map(f64::from),
                queues: Default::default(),
                pass: [0.0; 5],
                vtime: 0.0,
                service_s: 1.0,
                next_id: 0,
                peak: 0,
            }),
        }
    }

    /// (ceiling, adaptive) as configured.
    pub fn settings(&self) -> (Option<u32>, bool) {
        (self.ceiling, self.adaptive)
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_room(s: &GateState) -> bool {
        s.limit
            .is_none_or(|l| f64::from(s.inflight) < l.floor().max(1.0))
    }

    fn grant(self: &Arc<Self>, s: &mut GateState) -> Permit {
        s.inflight += 1;
        s.peak = s.peak.max(s.inflight);
        Permit {
            gate: Arc::clone(self),
            since: Instant::now(),
        }
    }

    /// A slot now, or `None` without waiting.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut s = self.lock();
        let idle_queue = s.queues.iter().all(VecDeque::is_empty);
        (idle_queue && Self::has_room(&s)).then(|| self.grant(&mut s))
    }

    /// A slot, waiting in the priority queue for at most `max_wait`.
    pub async fn acquire(
        self: &Arc<Self>,
        priority: u8,
        max_wait: Duration,
    ) -> Result<Permit, QueueTimeout> {
        let c = class(priority);
        let (id, rx) = {
            let mut s = self.lock();
            if s.queues.iter().all(VecDeque::is_empty) && Self::has_room(&s) {
                return Ok(self.grant(&mut s));
            }
            let (tx, rx) = oneshot::channel();
            let id = s.next_id;
            s.next_id += 1;
            if s.queues[c].is_empty() {
                // A class that starts waiting earns its first slot like any
                // other, and gets no credit for the time it had nobody waiting.
                s.pass[c] = s.pass[c].max(s.vtime + 1.0 / WEIGHTS[c]);
            }
            s.queues[c].push_back(Waiter { id, tx });
            (id, rx)
        };
        match tokio::time::timeout(max_wait, rx).await {
            Ok(Ok(())) => Ok(Permit {
                gate: Arc::clone(self),
                since: Instant::now(),
            }),
            // The sender is never dropped unsent while the waiter is queued;
            // treat it like a timeout.
            Ok(Err(_)) | Err(_) => {
                let mut s = self.lock();
                let position = s.queues[c].iter().position(|w| w.id == id);
                match position {
                    Some(pos) => {
                        s.queues[c].remove(pos);
                        Err(QueueTimeout {
                            retry_after: Self::wait_estimate(&s, c, pos),
                        })
                    }
                    // Granted just as the wait ran out: the slot is ours.
                    None => Ok(Permit {
                        gate: Arc::clone(self),
                        since: Instant::now(),
                    }),
                }
            }
        }
    }

    /// How long the request at `pos` in class `c` would still wait: those
    /// ahead of it (its own class and every higher one) times the time a slot
    /// is held, spread over the slots.
    fn wait_estimate(s: &GateState, c: usize, pos: usize) -> Duration {
        let ahead = pos + 1 + s.queues[..c].iter().map(VecDeque::len).sum::<usize>();
        let slots = s.limit.unwrap_or(1.0).max(1.0);
        let secs = (ahead as f64 * s.service_s / slots).ceil().max(1.0);
        Duration::from_secs_f64(secs)
    }

    fn release(&self, held: Duration) {
        let mut s = self.lock();
        s.inflight = s.inflight.saturating_sub(1);
        s.service_s = 0.8 * s.service_s + 0.2 * held.as_secs_f64();
        while Self::has_room(&s) {
            let Some(c) = Self::next_class(&s) else {
                break;
            };
            let Some(w) = s.queues[c].pop_front() else {
                break;
            };
            s.vtime = s.pass[c];
            s.pass[c] += 1.0 / WEIGHTS[c];
            // The waiter may have just timed out and gone.
            if w.tx.send(()).is_ok() {
                s.inflight += 1;
                s.peak = s.peak.max(s.inflight);
            }
        }
    }

    /// The waiting class with the smallest pass; ties go to higher priority.
    fn next_class(s: &GateState) -> Option<usize> {
        (0..5)
            .filter(|&c| !s.queues[c].is_empty())
            .min_by(|&a, &b| s.pass[a].total_cmp(&s.pass[b]).then(a.cmp(&b)))
    }

    /// The provider pushed back (429, or no requests left in its window).
    pub fn saturated(&self) {
        if !self.adaptive {
            return;
        }
        let mut s = self.lock();
        let cut = (f64::from(s.inflight) * 0.75).max(1.0);
        s.limit = Some(s.limit.map_or(cut, |l| l.min(cut)));
    }

    /// A request went through: an adaptive budget grows again.
    pub fn succeeded(&self) {
        if !self.adaptive {
            return;
        }
        let mut s = self.lock();
        if let Some(l) = s.limit {
            let grown = l + 1.0 / l.max(1.0);
            s.limit = Some(match self.ceiling {
                Some(c) => grown.min(f64::from(c)),
                None => grown,
            });
        }
    }

    /// Like [`PoolGate::load`] without resetting the peak (for status pages).
    pub fn load_now(&self) -> GateLoad {
        let s = self.lock();
        GateLoad {
            inflight: s.inflight,
            peak: s.peak,
            limit: s.limit,
            waiting: s.queues.iter().map(VecDeque::len).sum(),
        }
    }

    /// (in flight now, the budget, waiting) for status and rebalancing.
    pub fn load(&self) -> GateLoad {
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

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateLoad {
    pub inflight: u32,
    /// Highest in flight since the previous call.
    pub peak: u32,
    pub limit: Option<f64>,
    pub waiting: usize,
}

impl GateLoad {
    /// Fraction of the budget in use (waiting requests count as demand).
    pub fn utilisation(&self) -> Option<f64> {
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
