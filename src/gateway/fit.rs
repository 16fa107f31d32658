//! What a request needs of a deployment beyond health and capacity: room in
//! its context window for the prompt estimate and the output allowance, a
//! worst-case cost within the client's `x-collie-max-cost-usd`, an average
//! latency within its `x-collie-latency-budget-ms`. The deployments of the
//! request's chain that cannot give it are left out of the exchange; when
//! none can, the request is refused before it reserves anything.
#![deny(clippy::arithmetic_side_effects)]

use super::GatewayError;
use super::spend::usd_text;
use crate::config::{DeploymentIx, Model, PoolIx};
use crate::state::Snapshot;
use crate::usage::Usage;
use http::HeaderName;
use pingora::http::RequestHeader;

// `HeaderName`s: a lookup by `&str` parses the name again each time.
static MAX_COST: HeaderName = HeaderName::from_static("x-collie-max-cost-usd");
static LATENCY_BUDGET: HeaderName = HeaderName::from_static("x-collie-latency-budget-ms");

/// The longest latency budget accepted: an hour.
const MAX_LATENCY_BUDGET_MS: u64 = 3_600_000;

/// The largest cost ceiling accepted, in USD.
const MAX_COST_USD: u64 = 1_000_000_000;

/// What the client asked of the deployments, beyond the request itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    /// `x-collie-max-cost-usd`, in nanodollars.
    pub(crate) max_cost_nano: Option<u64>,
    /// `x-collie-latency-budget-ms`.
    pub(crate) latency_budget_ms: Option<u64>,
}

/// The request's tokens: the prompt estimate and the output allowance (what
/// its reservation holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tokens {
    pub(crate) prompt: u64,
    pub(crate) output: u64,
}

impl Tokens {
    fn total(self) -> u64 {
        self.prompt.saturating_add(self.output)
    }
}

/// Read the client's limits from the request head; a header given twice or
/// holding anything but its number is a 400.
pub(crate) fn limits(req: &RequestHeader) -> Result<Limits, GatewayError> {
    let one = |name: &'static HeaderName| -> Result<Option<&str>, GatewayError> {
        let mut values = req.headers.get_all(name).iter();
        let Some(v) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(invalid(name, "given more than once; send it once"));
        }
        v.to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| invalid(name, "must be plain ASCII"))
    };
    let max_cost_nano = one(&MAX_COST)?
        .map(|v| {
            parse_usd_nano(v).ok_or_else(|| {
                invalid(
                    &MAX_COST,
                    "must be a USD amount such as `0.05` (digits, at most 9 decimals, at most 1000000000)",
                )
            })
        })
        .transpose()?;
    let latency_budget_ms = one(&LATENCY_BUDGET)?
        .map(|v| {
            v.parse::<u64>()
                .ok()
                .filter(|ms| (1..=MAX_LATENCY_BUDGET_MS).contains(ms))
                .ok_or_else(|| {
                    invalid(
                        &LATENCY_BUDGET,
                        "must be a whole number of milliseconds from 1 to 3600000",
                    )
                })
        })
        .transpose()?;
    Ok(Limits {
        max_cost_nano,
        latency_budget_ms,
    })
}

fn invalid(name: &'static HeaderName, reason: &str) -> GatewayError {
    GatewayError::InvalidHeader {
        name: name.as_str(),
        reason: reason.to_string(),
    }
}

/// `12`, `0.05`, `.5`, `3.` → nanodollars, exactly; anything else (signs,
/// exponents, more than nine decimals, more than [`MAX_COST_USD`]) → `None`.
fn parse_usd_nano(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 24 {
        return None;
    }
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) || frac.len() > 9 {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    if whole > MAX_COST_USD {
        return None;
    }
    let frac_nano = if frac.is_empty() {
        0
    } else {
        // Nine places at most: scaled up to nanodollars.
        let scale = 10u64.checked_pow(u32::try_from(9usize.checked_sub(frac.len())?).ok()?)?;
        frac.parse::<u64>().ok()?.checked_mul(scale)?
    };
    let nano = whole.checked_mul(1_000_000_000)?.checked_add(frac_nano)?;
    (nano <= MAX_COST_USD.checked_mul(1_000_000_000)?).then_some(nano)
}

/// The deployments of `chain` this request cannot use (left out of the
/// exchange), or why it can use none. Checked in order — the context
/// window, then the cost ceiling, then the latency budget — so the error
/// names the first need nothing met.
pub(crate) fn unfit(
    snap: &Snapshot,
    model: &Model,
    chain: &[PoolIx],
    tokens: Tokens,
    limits: Limits,
) -> Result<Vec<DeploymentIx>, GatewayError> {
    let mut candidates: Vec<DeploymentIx> = Vec::new();
    for d in chain
        .iter()
        .filter_map(|&p| snap.config.pool(p))
        .flat_map(|p| p.members.iter().map(|m| m.deployment))
    {
        if !candidates.contains(&d) {
            candidates.push(d);
        }
    }
    if candidates.is_empty() {
        // Nothing to choose from: the exchange says so.
        return Ok(candidates);
    }
    let mut left = candidates.clone();
    // Room for the prompt and the output allowance.
    let window = |d: DeploymentIx| {
        snap.config
            .deployment(d)
            .and_then(|c| c.context_window)
            .or(model.context_window)
    };
    let needed = tokens.total();
    let largest = left.iter().filter_map(|&d| window(d)).max();
    left.retain(|&d| window(d).is_none_or(|w| needed <= w));
    if left.is_empty() {
        return Err(GatewayError::ContextLengthExceeded {
            largest: largest.unwrap_or(0),
            needed,
            prompt: tokens.prompt,
            output: tokens.output,
        });
    }
    // The worst case: the whole prompt estimate and output allowance used,
    // at the deployment's price. No price, no known cost: left out.
    if let Some(ceiling) = limits.max_cost_nano {
        let usage = Usage {
            prompt_tokens: Some(tokens.prompt),
            completion_tokens: Some(tokens.output),
            total_tokens: Some(needed),
        };
        let cost = |d: DeploymentIx| {
            snap.router
                .deployment(d)
                .and_then(|u| usage.cost_nano_usd(u.price))
        };
        let cheapest = left.iter().filter_map(|&d| cost(d)).min();
        left.retain(|&d| cost(d).is_some_and(|c| c <= ceiling));
        if left.is_empty() {
            return Err(GatewayError::CostCeilingExceeded {
                ceiling: usd_text(ceiling),
                cheapest: match cheapest {
                    Some(c) => format!("the cheapest could cost up to {} USD", usd_text(c)),
                    None => "none has a price".to_string(),
                },
            });
        }
    }
    // The average whole-request latency, where there is one yet.
    if let Some(budget) = limits.latency_budget_ms {
        let ewma = |d: DeploymentIx| {
            snap.router
                .deployment(d)
                .and_then(|u| u.health.latency_ewma_ms())
        };
        let fastest = left
            .iter()
            .filter_map(|&d| ewma(d))
            .min_by(f64::total_cmp)
            .unwrap_or(0.0);
        // At most an hour in milliseconds: exact in an f64.
        let budget_f = budget as f64;
        left.retain(|&d| ewma(d).is_none_or(|ms| ms <= budget_f));
        if left.is_empty() {
            return Err(GatewayError::LatencyBudgetExceeded {
                budget_ms: budget,
                // Rounded up, so it reads as over the budget.
                fastest_ms: fastest.ceil() as u64,
            });
        }
    }
    candidates.retain(|d| !left.contains(d));
    Ok(candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_ceilings_parse_exactly_or_not_at_all() {
        assert_eq!(parse_usd_nano("0.05"), Some(50_000_000));
        assert_eq!(parse_usd_nano("12"), Some(12_000_000_000));
        assert_eq!(parse_usd_nano(".000000001"), Some(1));
        assert_eq!(parse_usd_nano("3."), Some(3_000_000_000));
        assert_eq!(parse_usd_nano("0"), Some(0));
        assert_eq!(
            parse_usd_nano("1000000000"),
            Some(1_000_000_000_000_000_000)
        );
        for bad in [
            "",
            ".",
            "-1",
            "+1",
            "1e3",
            "0.0000000001",
            "NaN",
            "inf",
            "1,5",
            "0x10",
            "1000000000.1",
            "99999999999999999999",
            "1 2",
            "١",
        ] {
            assert_eq!(parse_usd_nano(bad), None, "{bad}");
        }
    }

    #[test]
    fn headers_are_read_once_and_strictly() {
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        assert_eq!(limits(&req), Ok(Limits::default()));
        req.insert_header("x-collie-max-cost-usd", " 0.5 ").unwrap();
        req.insert_header("x-collie-latency-budget-ms", "250")
            .unwrap();
        assert_eq!(
            limits(&req),
            Ok(Limits {
                max_cost_nano: Some(500_000_000),
                latency_budget_ms: Some(250)
            })
        );
        for bad in ["0", "-5", "1.5", "3600001", "soon"] {
            req.insert_header("x-collie-latency-budget-ms", bad)
                .unwrap();
            assert!(
                matches!(limits(&req), Err(GatewayError::InvalidHeader { name, .. }) if name == "x-collie-latency-budget-ms"),
                "{bad}"
            );
        }
        req.insert_header("x-collie-latency-budget-ms", "250")
            .unwrap();
        req.append_header("x-collie-max-cost-usd", "0.7").unwrap();
        assert!(
            matches!(limits(&req), Err(GatewayError::InvalidHeader { name, .. }) if name == "x-collie-max-cost-usd")
        );
    }
}
