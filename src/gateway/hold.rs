//! Riding out an outage. A request for a model whose every deployment is
//! down (panic mode) waits here, when the model has `hold_when_down`,
//! instead of getting 503 at once. One task watches the waiting requests'
//! chains while any wait, and releases them in priority order (1 first,
//! then by arrival) as soon as a chain offers a deployment again: every one
//! whose chain has a healthy member (a probe brought it back), but only one
//! per half-open breaker's trial — the trial decides for the rest, who are
//! released on the next look if it closed the breaker. A released request
//! that finds nothing after all (another took what was offered) waits again
//! for what is left of its hold. A request leaves by itself when its hold
//! ends, its client goes or the gateway stops.
//!
//! At most `max_held_requests` wait at once, all models together; beyond
//! it a request gets the 503 it would have had.

use crate::config::{DeploymentIx, PoolIx};
use crate::routing::{Pick, now_ms};
use crate::state::Snapshot;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// How often the waiting requests' chains are looked at.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// Requests waiting for a deployment of their model to come back.
pub(crate) struct Hold {
    inner: Mutex<Inner>,
    /// `collie_held_requests`.
    gauge: prometheus::IntGauge,
}

#[derive(Default)]
struct Inner {
    waiting: Vec<Waiting>,
    /// Arrival order, for requests of one priority.
    arrivals: u64,
    /// The watching task runs (it ends when nobody waits).
    watching: bool,
}

/// What is needed to tell whether a request's chain offers something.
pub(crate) struct Waiter {
    pub(crate) priority: u8,
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) chain: Vec<PoolIx>,
    /// Deployments the request cannot use (see `fit`).
    pub(crate) unfit: Vec<DeploymentIx>,
    /// Tokens the request takes from provider limits.
    pub(crate) tokens: u64,
}

struct Waiting {
    waiter: Waiter,
    arrival: u64,
    release: oneshot::Sender<()>,
}

impl Hold {
    pub(crate) fn new(gauge: prometheus::IntGauge) -> Arc<Hold> {
        Arc::new(Hold {
            inner: Mutex::new(Inner::default()),
            gauge,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait in line: the receiver fires when the request is released, and
    /// dropping it leaves the line. `None` when `cap` requests wait already.
    pub(crate) fn park(
        self: &Arc<Self>,
        cap: usize,
        waiter: Waiter,
    ) -> Option<oneshot::Receiver<()>> {
        let (release, released) = oneshot::channel();
        let mut i = self.lock();
        i.waiting.retain(|w| !w.release.is_closed());
        if i.waiting.len() >= cap {
            return None;
        }
        i.arrivals = i.arrivals.wrapping_add(1);
        let arrival = i.arrivals;
        i.waiting.push(Waiting {
            waiter,
            arrival,
            release,
        });
        self.count(&i);
        if !i.watching {
            i.watching = true;
            tokio::spawn(Arc::clone(self).watch());
        }
        Some(released)
    }

    fn count(&self, i: &Inner) {
        self.gauge
            .set(i64::try_from(i.waiting.len()).unwrap_or(i64::MAX));
    }

    async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(LOOK_EVERY).await;
            if !self.release_ready() {
                return;
            }
        }
    }

    /// Release, in priority order, the requests whose chain offers a
    /// deployment now. Whether anyone is still waiting (else the watch ends,
    /// under the same lock a new arrival takes to start another).
    fn release_ready(&self) -> bool {
        let mut i = self.lock();
        i.waiting.retain(|w| !w.release.is_closed());
        if i.waiting.is_empty() {
            i.watching = false;
            self.count(&i);
            return false;
        }
        i.waiting.sort_by_key(|w| (w.waiter.priority, w.arrival));
        // Trials handed out in this look: one request each.
        let mut trials: Vec<DeploymentIx> = Vec::new();
        let mut k = 0;
        while k < i.waiting.len() {
            let go = match i.waiting.get(k).and_then(|w| offer(&w.waiter)) {
                Some((_, false)) => true,
                Some((d, true)) if !trials.contains(&d) => {
                    trials.push(d);
                    true
                }
                _ => false,
            };
            if go {
                let w = i.waiting.remove(k);
                // A request that left meanwhile just is not there to go.
                let _ = w.release.send(());
            } else {
                k = k.saturating_add(1);
            }
        }
        self.count(&i);
        true
    }
}

/// What the chain would give the request now: the first pool's offer (a
/// deployment, and whether it is a half-open breaker's trial).
fn offer(w: &Waiter) -> Option<(DeploymentIx, bool)> {
    let router = &w.snapshot.router;
    let now = now_ms();
    w.chain
        .iter()
        .filter_map(|&p| router.pool(p))
        .find_map(
            |pool| match pool.peek(&router.deployments, &w.unfit, now, w.tokens) {
                Pick::Deployment { index, trial } => Some((index, trial)),
                _ => None,
            },
        )
}
