//! A provider key's own per-minute limits (a deployment's `rpm` and
//! `tpm`): token buckets that selection consults, so Collie does not drive a
//! key into the provider's 429s.
#![deny(clippy::arithmetic_side_effects)]

use crate::config::Rate;
use crate::quota::tokens_needed;
use crate::quota::window::Bucket;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A provider key's own per-minute limits: selection skips a deployment
/// whose bucket cannot take the request, so Collie does not drive a key into
/// the provider's 429s. Shared across reloads; a reload that changes the
/// limits changes them in place and keeps what was counted.
#[derive(Debug)]
pub(crate) struct ProviderLimiter {
    state: Mutex<ProviderBuckets>,
}

#[derive(Debug)]
struct ProviderBuckets {
    rpm: Option<(Rate, Bucket)>,
    tpm: Option<(Rate, Bucket)>,
    /// The limits as configured; the buckets hold a fleet's share of them
    /// when `shared`.
    configured: (Option<u64>, Option<u64>),
    shared: bool,
    /// Requests and tokens asked of the key since the fleet last looked.
    demand: (u64, u64),
}

/// A provider key's limits as the fleet sees them: the configured rates
/// and what was asked since the last look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProviderUse {
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
}

/// A refusal's wait; a bucket that never refills (a fleet share of nothing)
/// says "soon" rather than zero, which would read as no refusal at all.
fn refill_wait(wait: Duration) -> Duration {
    wait.max(Duration::from_millis(1))
}

/// A provider's limit is a plain per-minute window: its burst is its rate.
fn provider_rate(n: u64) -> Rate {
    Rate {
        per_minute: n,
        burst: n,
    }
}

impl ProviderLimiter {
    /// `None` when the deployment has no limits.
    pub(crate) fn new(rpm: Option<u64>, tpm: Option<u64>) -> Option<ProviderLimiter> {
        let now = Instant::now();
        let bucket = |n: u64| (provider_rate(n), Bucket::full(provider_rate(n), now));
        (rpm.is_some() || tpm.is_some()).then(|| ProviderLimiter {
            state: Mutex::new(ProviderBuckets {
                rpm: rpm.map(bucket),
                tpm: tpm.map(bucket),
                configured: (rpm, tpm),
                shared: false,
                demand: (0, 0),
            }),
        })
    }

    /// A key whose limits a fleet of sidecars shares: it holds nothing
    /// until the fleet grants a share.
    pub(crate) fn new_shared(rpm: Option<u64>, tpm: Option<u64>) -> Option<ProviderLimiter> {
        let l = ProviderLimiter::new(rpm, tpm)?;
        {
            let mut guard = l.lock();
            let s = &mut *guard;
            s.shared = true;
            let now = Instant::now();
            for slot in [&mut s.rpm, &mut s.tpm].into_iter().flatten() {
                *slot = (provider_rate(0), Bucket::full(provider_rate(0), now));
            }
        }
        Some(l)
    }

    /// For the fleet: the configured limits and the demand since the last
    /// call, which starts anew.
    pub(crate) fn take_use(&self) -> ProviderUse {
        let mut s = self.lock();
        let (requests, tokens) = std::mem::take(&mut s.demand);
        ProviderUse {
            rpm: s.configured.0,
            tpm: s.configured.1,
            requests,
            tokens,
        }
    }

    /// For the fleet: this sidecar's share of each limit, per minute —
    /// (held, of it new to this sidecar). A share that grows credits its
    /// bucket with the new part only; one that shrinks caps the bucket.
    pub(crate) fn set_share(&self, rpm: Option<(u64, u64)>, tpm: Option<(u64, u64)>) {
        let now = Instant::now();
        let mut s = self.lock();
        let apply =
            |slot: &mut Option<(Rate, Bucket)>, share: Option<(u64, u64)>, cap: Option<u64>| {
                if let (Some((old, b)), Some((held, fresh))) = (slot.as_mut(), share) {
                    let new = provider_rate(held.min(cap.unwrap_or(held)));
                    b.refill(*old, 0.0, now);
                    b.credit(fresh.min(new.burst.saturating_sub(old.burst)) as f64);
                    b.refill(new, 0.0, now);
                    *old = new;
                }
            };
        let (crpm, ctpm) = s.configured;
        apply(&mut s.rpm, rpm, crpm);
        apply(&mut s.tpm, tpm, ctpm);
    }

    fn lock(&self) -> MutexGuard<'_, ProviderBuckets> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New limits from a reload. What was taken this minute stays taken (see
    /// [`Bucket::rebase`]); a limit that is new starts full.
    pub(crate) fn reconfigure(&self, rpm: Option<u64>, tpm: Option<u64>) {
        let now = Instant::now();
        let mut guard = self.lock();
        let s = &mut *guard;
        s.configured = (rpm, tpm);
        if s.shared {
            // The fleet's next answer sizes the share to the new limits; a
            // share above a lowered limit is capped now.
            for (slot, n) in [(&mut s.rpm, rpm), (&mut s.tpm, tpm)] {
                match (slot.as_mut(), n) {
                    (Some((r, b)), Some(n)) if r.per_minute > n => {
                        b.refill(*r, 0.0, now);
                        *r = provider_rate(n);
                        b.refill(*r, 0.0, now);
                    }
                    (None, Some(_)) => {
                        *slot = Some((provider_rate(0), Bucket::full(provider_rate(0), now)));
                    }
                    (_, None) => *slot = None,
                    _ => {}
                }
            }
            return;
        }
        let change = |slot: &mut Option<(Rate, Bucket)>, n: Option<u64>| {
            *slot = match (slot.take(), n) {
                (_, None) => None,
                (None, Some(n)) => Some((provider_rate(n), Bucket::full(provider_rate(n), now))),
                (Some((old, mut b)), Some(n)) => {
                    let new = provider_rate(n);
                    b.refill(old, 0.0, now);
                    b.rebase(old, new);
                    Some((new, b))
                }
            };
        };
        change(&mut s.rpm, rpm);
        change(&mut s.tpm, tpm);
    }

    /// Take one request and `tokens` if both fit; else how long until they do.
    pub(crate) fn try_take(&self, tokens: u64) -> Result<(), Duration> {
        self.admit(tokens, true)
    }

    /// What [`Self::try_take`] would answer, taking nothing (routing's
    /// look-ahead and the status view).
    pub(crate) fn check(&self, tokens: u64) -> Result<(), Duration> {
        self.admit(tokens, false)
    }

    fn admit(&self, tokens: u64, take: bool) -> Result<(), Duration> {
        let now = Instant::now();
        let mut s = self.lock();
        // A look-ahead counts too: a key that refuses everything is asked
        // only that way, and its fleet share is sized from the asking.
        s.demand = (
            s.demand.0.saturating_add(1),
            s.demand.1.saturating_add(tokens),
        );
        let mut wait = Duration::ZERO;
        if let Some((r, b)) = &mut s.rpm {
            b.refill(*r, 0.0, now);
            if !b.can_take(1) {
                wait = wait.max(refill_wait(b.wait_for(1, *r, 0.0)));
            }
        }
        // As for tenants: a request bigger than the burst goes from a full bucket.
        if let Some((r, b)) = &mut s.tpm {
            b.refill(*r, 0.0, now);
            let need = tokens_needed(tokens, *r, 0.0);
            if !b.can_take(need) {
                wait = wait.max(refill_wait(b.wait_for(need, *r, 0.0)));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if !take {
            return Ok(());
        }
        if let Some((_, b)) = &mut s.rpm {
            b.take(1);
        }
        if let Some((_, b)) = &mut s.tpm {
            b.take(tokens);
        }
        Ok(())
    }

    /// Correct a take of `taken` tokens to what was used.
    pub(crate) fn settle_tokens(&self, taken: u64, used: u64) {
        if let Some((r, b)) = &mut self.lock().tpm {
            b.adjust(taken as f64 - used as f64, r.burst as f64);
        }
    }

    /// (requests, tokens) left in the buckets now.
    #[cfg(test)]
    pub(crate) fn remaining(&self) -> (Option<f64>, Option<f64>) {
        let now = Instant::now();
        let mut s = self.lock();
        let level = |slot: &mut Option<(Rate, Bucket)>| {
            slot.as_mut().map(|(r, b)| {
                b.refill(*r, 0.0, now);
                b.level()
            })
        };
        let rpm = level(&mut s.rpm);
        (rpm, level(&mut s.tpm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_limits_change_in_place_and_keep_their_count() {
        let l = ProviderLimiter::new(Some(3), Some(1000)).unwrap();
        for _ in 0..2 {
            l.try_take(100).unwrap();
        }
        l.reconfigure(Some(4), Some(500));
        let (rpm, tpm) = l.remaining();
        assert!((2.0..2.1).contains(&rpm.unwrap()), "{rpm:?}");
        assert!((300.0..301.0).contains(&tpm.unwrap()), "{tpm:?}");
        l.reconfigure(None, Some(500));
        assert_eq!(l.remaining().0, None);
    }
}
