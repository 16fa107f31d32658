//! Dynamic rebalancing: when a pool runs above its threshold (default 80 %
//! of its concurrency budget), per-minute rate capacity that idle tenants are
//! not using is lent to high-priority tenants that are hitting their own
//! rate limits, as a temporary addition to their buckets (credited at once:
//! see [`TenantLedger::set_loan`]). Every tick starts from scratch, so a
//! loan ends by itself when the pool calms down or the lender's own traffic
//! comes back, and the lender gets its capacity back at once. Only rates
//! move: daily and monthly budgets are never raised.
//!
//! Load is measured against a pool's concurrency budget (configured or
//! learned); a pool without one never counts as busy, so nothing is lent on
//! its account (config validation refuses `rebalance.enabled: true` when no
//! pool has a budget).

use super::{Loan, TenantLedger};
use crate::config::Config;
pub(crate) use crate::config::RebalanceSettings;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A lender uses less than this share of its own rate.
const IDLE: f64 = 0.3;
/// Share of a lender's unused rate that may be lent.
const LEND_SHARE: f64 = 0.5;
/// A borrower uses more than this share of its rate (or was refused).
const BUSY: f64 = 0.8;
/// Highest priority number that may borrow (1 and 2).
const BORROWER_PRIORITY: u8 = 2;
/// A tenant refused by its rate counts as pressed for this long.
const PRESSED_FOR: Duration = Duration::from_secs(5);

/// One tenant as the rebalancer sees it.
pub(crate) struct TenantView {
    pub(crate) ledger: Arc<TenantLedger>,
    /// Whether any pool this tenant's models use is above the threshold.
    pub(crate) pool_busy: bool,
}

/// A change of one tenant's loan, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoanChange {
    pub(crate) tenant: String,
    pub(crate) before: Loan,
    pub(crate) after: Loan,
}

impl LoanChange {
    pub(crate) fn event(&self) -> &'static str {
        let was = self.before.rpm != 0.0 || self.before.tpm != 0.0;
        let is = self.after.rpm != 0.0 || self.after.tpm != 0.0;
        match (was, is) {
            (_, false) => "reclaim",
            _ if self.after.rpm < 0.0 || self.after.tpm < 0.0 => "lend",
            _ => "borrow",
        }
    }
}

/// Smoothed per-minute use of each tenant, and when it was last refused.
#[derive(Default)]
pub(crate) struct Rebalancer {
    rates: Mutex<HashMap<String, Usage>>,
}

#[derive(Default)]
struct Usage {
    rpm: f64,
    tpm: f64,
    refused_at: Option<Instant>,
}

impl Rebalancer {
    /// Look at the last interval and set every tenant's loan.
    /// One lending step over the tenants of `config`: a tenant presses on
    /// capacity when any pool its models may use is busy (`pool_busy`, by
    /// pool index: above the rebalance threshold of its concurrency).
    pub(crate) fn step(
        &self,
        config: &Config,
        ledgers: &[Arc<TenantLedger>],
        pool_busy: &[bool],
        elapsed: Duration,
    ) -> Vec<LoanChange> {
        let views: Vec<TenantView> = config
            .tenants
            .iter()
            .zip(ledgers)
            .map(|(t, ledger)| TenantView {
                ledger: Arc::clone(ledger),
                pool_busy: config
                    .models
                    .iter()
                    .filter(|m| t.models.allows(&m.name))
                    .flat_map(|m| m.chain.iter())
                    .any(|&p| pool_busy.get(p.0).copied().unwrap_or(false)),
            })
            .collect();
        self.tick(&config.quota.rebalance, &views, elapsed)
    }

    pub(crate) fn tick(
        &self,
        settings: &RebalanceSettings,
        tenants: &[TenantView],
        elapsed: Duration,
    ) -> Vec<LoanChange> {
        let per_minute = 60.0 / elapsed.as_secs_f64().max(0.001);
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        struct Seen {
            rpm_use: f64,
            tpm_use: f64,
            refused: bool,
        }
        let seen: Vec<Seen> = tenants
            .iter()
            .map(|t| {
                let a = t.ledger.take_activity();
                let e = rates.entry(t.ledger.id.clone()).or_default();
                e.rpm = 0.5 * e.rpm + 0.5 * a.requests as f64 * per_minute;
                e.tpm = 0.5 * e.tpm + 0.5 * a.tokens as f64 * per_minute;
                if a.rate_refusals > 0 {
                    e.refused_at = Some(Instant::now());
                }
                Seen {
                    rpm_use: e.rpm,
                    tpm_use: e.tpm,
                    refused: e.refused_at.is_some_and(|at| at.elapsed() < PRESSED_FOR),
                }
            })
            .collect();
        let mut next = vec![Loan::default(); tenants.len()];
        if settings.enabled {
            plan(
                tenants,
                &seen
                    .iter()
                    .map(|s| (s.rpm_use, s.tpm_use, s.refused))
                    .collect::<Vec<_>>(),
                &mut next,
            );
        }
        let mut changes = Vec::new();
        for (t, loan) in tenants.iter().zip(next) {
            let before = t.ledger.loan();
            if before != loan {
                t.ledger.set_loan(loan);
                changes.push(LoanChange {
                    tenant: t.ledger.id.clone(),
                    before,
                    after: loan,
                });
            }
        }
        changes
    }
}

/// Decide loans: lenders are idle tenants on a busy pool with a rate limit;
/// borrowers are priority 1–2 tenants on a busy pool pressing on theirs.
/// The lent total is split among borrowers by priority weight, each borrowing
/// at most its own limit again.
fn plan(tenants: &[TenantView], seen: &[(f64, f64, bool)], next: &mut [Loan]) {
    let weight = |p: u8| [16.0, 8.0, 4.0, 2.0, 1.0][usize::from(p.clamp(1, 5).saturating_sub(1))];
    for dim in [Dim::Requests, Dim::Tokens] {
        let mut spare = Vec::new();
        let mut demand = Vec::new();
        for (i, t) in tenants.iter().enumerate() {
            if !t.pool_busy {
                continue;
            }
            let Some(limit) = dim.limit(&t.ledger) else {
                continue;
            };
            let used = dim.used(seen[i]);
            let refused = seen[i].2;
            let priority = t.ledger.priority();
            let share = used / limit.max(1.0);
            if share < IDLE {
                spare.push((i, (limit - used).max(0.0) * LEND_SHARE));
            } else if priority <= BORROWER_PRIORITY && (refused || share > BUSY) {
                demand.push((i, weight(priority), limit));
            }
        }
        let total_spare: f64 = spare.iter().map(|(_, s)| s).sum();
        let total_weight: f64 = demand.iter().map(|(_, w, _)| w).sum();
        if total_spare <= 0.0 || total_weight <= 0.0 {
            continue;
        }
        let mut lent = 0.0;
        for &(i, w, limit) in &demand {
            let amount = (total_spare * w / total_weight).min(limit);
            dim.set(&mut next[i], amount);
            lent += amount;
        }
        // Lenders give in proportion to what they had spare.
        for &(i, s) in &spare {
            dim.set(&mut next[i], -(lent * s / total_spare));
        }
    }
}

#[derive(Clone, Copy)]
enum Dim {
    Requests,
    Tokens,
}

impl Dim {
    fn limit(self, l: &TenantLedger) -> Option<f64> {
        let limits = l.limits();
        match self {
            Dim::Requests => limits.rpm.map(|r| r.per_minute as f64),
            Dim::Tokens => limits.tpm.map(|r| r.per_minute as f64),
        }
    }
    fn used(self, seen: (f64, f64, bool)) -> f64 {
        match self {
            Dim::Requests => seen.0,
            Dim::Tokens => seen.1,
        }
    }
    fn set(self, loan: &mut Loan, v: f64) {
        match self {
            Dim::Requests => loan.rpm = v,
            Dim::Tokens => loan.tpm = v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Calendar, Limits, Rate, TenantLimits};
    use super::*;
    use jiff::tz::TimeZone;

    fn tenant(id: &str, priority: u8, rpm: u64) -> Arc<TenantLedger> {
        Arc::new(TenantLedger::new(
            id,
            &TenantLimits {
                priority,
                limits: Limits {
                    rpm: Some(Rate {
                        per_minute: rpm,
                        burst: rpm,
                    }),
                    ..Limits::default()
                },
                models: HashMap::new(),
            },
        ))
    }

    #[test]
    fn lends_idle_capacity_to_a_pressed_high_priority_tenant_and_reclaims() {
        let cal = Arc::new(Calendar::new(TimeZone::UTC));
        let hi = tenant("hi", 1, 60);
        let lo = tenant("lo", 5, 600);
        let r = Rebalancer::default();
        let s = RebalanceSettings::default();
        // hi spends its whole burst and is refused once.
        for _ in 0..60 {
            hi.reserve(
                "m",
                super::super::Amount {
                    requests: 1,
                    tokens: 0,
                    usd_nano: 0,
                },
                &cal,
            )
            .unwrap()
            .settle(super::super::Amount {
                requests: 1,
                tokens: 0,
                usd_nano: 0,
            });
        }
        assert!(
            hi.reserve(
                "m",
                super::super::Amount {
                    requests: 1,
                    tokens: 0,
                    usd_nano: 0
                },
                &cal
            )
            .is_err()
        );
        let views = |busy| {
            vec![
                TenantView {
                    ledger: Arc::clone(&hi),
                    pool_busy: busy,
                },
                TenantView {
                    ledger: Arc::clone(&lo),
                    pool_busy: busy,
                },
            ]
        };
        let changes = r.tick(&s, &views(true), Duration::from_secs(60));
        assert!(hi.loan().rpm > 0.0 && lo.loan().rpm < 0.0, "{changes:?}");
        assert!(
            (hi.loan().rpm + lo.loan().rpm).abs() < 1e-9,
            "what is lent is what is borrowed"
        );
        assert_eq!(
            changes.iter().find(|c| c.tenant == "hi").unwrap().event(),
            "borrow"
        );
        // The pool calms down: every loan is reclaimed.
        let changes = r.tick(&s, &views(false), Duration::from_secs(60));
        assert_eq!(hi.loan(), Loan::default());
        assert_eq!(lo.loan(), Loan::default());
        assert!(changes.iter().all(|c| c.event() == "reclaim"));
    }
}
