//! The request path's side of the quota ledger: what a request reserves
//! before it is sent, what it settles to when it is done, and the
//! `x-ratelimit-*` headers a tenant sees on every response.
#![deny(clippy::arithmetic_side_effects)]

use super::body::Inspected;
use super::fit::Tokens;
use super::{GatewayError, RequestCtx};
use crate::config::{Model, Price};
use crate::outcome::{Endpoint, Finished};
use crate::quota::estimate;
use crate::quota::{Amount, RateInfo, WindowInfo};
use crate::quota::{Reservation, Settlement};
use crate::state::Snapshot;
use crate::usage::Usage;
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use std::time::Duration;

/// The request's prompt estimate and output allowance (its `max_tokens`,
/// else the tenant's default, capped by the model's `max_output_tokens`;
/// none for embeddings). Also records the prompt estimate settlement uses.
pub(crate) fn tokens(
    ctx: &mut RequestCtx,
    snap: &Snapshot,
    tenant: usize,
    model: &Model,
    body: &[u8],
    inspected: &Inspected,
) -> Tokens {
    let prompt = estimate::prompt_tokens(body, model.family);
    let output = if ctx.caller.endpoint == Endpoint::Embeddings {
        0
    } else {
        let t = &snap.config.tenants[tenant];
        let wanted = inspected.max_tokens.unwrap_or(t.default_max_tokens);
        model
            .max_output_tokens
            .map_or(wanted, |cap| wanted.min(cap))
    };
    ctx.request.prompt_estimate = prompt;
    Tokens { prompt, output }
}

/// Reserve the request in the tenant's ledger. Also fills in the token
/// estimate the provider limits and settlement use.
pub(crate) async fn reserve(
    ctx: &mut RequestCtx,
    snap: &Snapshot,
    tenant: usize,
    model: &Model,
    tokens: Tokens,
) -> Result<(), GatewayError> {
    let prices = model
        .chain
        .iter()
        .filter_map(|&p| snap.config.pool(p))
        .flat_map(|p| p.members.iter())
        .filter_map(|m| snap.router.deployment(m.deployment))
        .map(|u| u.price);
    let amount = reservation(tokens.prompt, tokens.output, prices);
    ctx.request.tokens_estimate = amount.tokens;
    match snap.quota.reserve(tenant, &model.name, amount).await {
        Ok(r) => {
            ctx.reservation = Some(r);
            Ok(())
        }
        Err(refusal) => Err(GatewayError::Quota {
            window: refusal.window,
            kind: refusal.kind,
            retry_after_s: refusal.retry_after.as_secs_f64().ceil().max(1.0) as u64,
        }),
    }
}

/// What a request reserves: one request, its prompt and output allowance,
/// and their cost at the most expensive of `prices` (the deployments that
/// may serve it: the reservation must cover whichever one answers).
/// Monotone in every input and saturating: a `max_tokens` near the integer
/// limit reserves the most there is, never a wrapped small number that a
/// budget admits (the `reservation_is_monotone` property test).
fn reservation(prompt: u64, output: u64, prices: impl Iterator<Item = Option<Price>>) -> Amount {
    let usage = Usage {
        prompt_tokens: Some(prompt),
        completion_tokens: Some(output),
        total_tokens: Some(prompt.saturating_add(output)),
    };
    Amount {
        requests: 1,
        tokens: prompt.saturating_add(output),
        usd_nano: prices
            .filter_map(|p| usage.cost_nano_usd(p))
            .max()
            .unwrap_or(0),
    }
}

/// Replace the reservation by what the request really used, as its
/// [`Finished`] story says:
/// - no upstream answered (refused, every attempt failed, the client left
///   while queued): full refund;
/// - an upstream answered with an error status: one request, no tokens;
/// - usage reported: exactly that, priced at the deployment that served —
///   also when the client left or the upstream broke after it was read;
/// - a stream without usage (finished, cut off by the client or broken by
///   the upstream): the prompt estimate plus the completion tokens counted
///   from its deltas, marked estimated;
/// - any other response without usage: the reservation stands, marked
///   estimated.
///
/// Provider per-minute limits are corrected the same way.
pub(crate) fn settle(finished: &Finished, reservation: Option<Reservation>) -> Option<Settlement> {
    let snap = &finished.snapshot;
    let served = finished.served.and_then(|i| snap.router.deployment(i));
    // What the reservation settles to: usage reported in full, or Collie's
    // estimate (already made when the story was closed).
    let usage = finished.usage.filter(|u| u.total().is_some());
    for a in &finished.attempts {
        let Some(limiter) = snap
            .router
            .deployment(a.deployment)
            .and_then(|u| u.limiter.as_ref())
        else {
            continue;
        };
        let used = match (&a.outcome, Some(a.deployment) == finished.served) {
            (Ok(_), true) => usage.and_then(|u| u.total()).unwrap_or(a.tokens_taken),
            _ => 0,
        };
        limiter.settle_tokens(a.tokens_taken, used);
    }
    let reservation = reservation?;
    let Some(up) = served else {
        reservation.refund();
        return Some(Settlement::Refunded);
    };
    if !(200..300).contains(&finished.status) {
        reservation.settle(Amount {
            requests: 1,
            tokens: 0,
            usd_nano: 0,
        });
        return Some(Settlement::Failed);
    }
    let usage = usage.unwrap_or_default();
    reservation.settle(Amount {
        requests: 1,
        tokens: usage.total().unwrap_or(0),
        usd_nano: usage.cost_nano_usd(up.price).unwrap_or(0),
    });
    Some(if finished.usage_estimated {
        Settlement::Estimated
    } else {
        Settlement::Reported
    })
}

/// What a non-streamed answer costs its tenant, for `x-collie-cost-usd`:
/// exactly what [`settle`] charges a 2xx answer whose usage the provider
/// reported — that usage priced at the deployment that served, by the same
/// integer arithmetic. `None` where settlement would not price reported
/// usage: no usage with a total (the charge is then an estimate), or no
/// price for the deployment.
pub(crate) fn billed_nano_usd(usage: Option<Usage>, price: Option<Price>) -> Option<u64> {
    usage.filter(|u| u.total().is_some())?.cost_nano_usd(price)
}

/// Nanodollars as a decimal USD amount with all nine places (`0.000156000`):
/// exact, never a float's rounding.
pub(crate) fn usd_text(nano: u64) -> String {
    const NANO_PER_USD: u64 = 1_000_000_000;
    let mut text = String::with_capacity(21);
    text.push_str(itoa::Buffer::new().format(nano / NANO_PER_USD));
    text.push('.');
    let mut buf = itoa::Buffer::new();
    let frac = buf.format(nano % NANO_PER_USD);
    text.extend(std::iter::repeat_n('0', 9usize.saturating_sub(frac.len())));
    text.push_str(frac);
    text
}

/// The longest a request may wait for a saturated pool: the configured
/// maximum, or less when the client says it gives up sooner
/// (`x-collie-max-wait` in seconds or `30s` form, or the OpenAI SDK's
/// `x-stainless-timeout`).
pub(crate) fn max_wait(req: &RequestHeader, configured: Duration) -> Duration {
    static MAX_WAIT: HeaderName = HeaderName::from_static("x-collie-max-wait");
    static SDK_TIMEOUT: HeaderName = HeaderName::from_static("x-stainless-timeout");
    let header = |name: &HeaderName| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let parse = |v: &str| {
        v.parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .or_else(|| humantime::parse_duration(v).ok())
    };
    [header(&MAX_WAIT), header(&SDK_TIMEOUT)]
        .into_iter()
        .flatten()
        .filter_map(parse)
        .fold(configured, Duration::min)
}

/// OpenAI-style rate headers on every response to an identified tenant:
/// for requests and for tokens, the tightest window that applies — the
/// per-minute bucket, the day or the month, the tenant's or the requested
/// model's — with its configured limit, what is left, and when it is whole
/// again. A kind no window limits gets no headers.
pub(crate) fn rate_headers(ctx: &RequestCtx, headers: &mut http::HeaderMap) {
    let quota = &ctx.snapshot.quota;
    let Some(ledger) = ctx.caller.tenant.and_then(|t| quota.ledger(t)) else {
        return;
    };
    const NAMES: [[HeaderName; 3]; 2] = [
        [
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderName::from_static("x-ratelimit-reset-requests"),
        ],
        [
            HeaderName::from_static("x-ratelimit-limit-tokens"),
            HeaderName::from_static("x-ratelimit-remaining-tokens"),
            HeaderName::from_static("x-ratelimit-reset-tokens"),
        ],
    ];
    let RateInfo { requests, tokens } =
        ledger.rate_info(ctx.request.model.as_deref(), quota.calendar());
    for ([limit_name, remaining_name, reset_name], w) in NAMES.into_iter().zip([requests, tokens]) {
        let Some(WindowInfo {
            limit,
            remaining,
            reset,
        }) = w
        else {
            continue;
        };
        headers.insert(limit_name, HeaderValue::from(limit));
        headers.insert(remaining_name, HeaderValue::from(remaining));
        if let Ok(v) = HeaderValue::try_from(reset_text(reset)) {
            headers.insert(reset_name, v);
        }
    }
}

/// `1m30s`, `2s`, `250ms` — the format OpenAI uses. (Written by hand:
/// `format!` was most of the cost of the `x-ratelimit-*` headers.)
fn reset_text(d: Duration) -> String {
    let mut text = String::with_capacity(16);
    let mut part = |n: u64, unit: &str| {
        text.push_str(itoa::Buffer::new().format(n));
        text.push_str(unit);
    };
    let ms = d.as_millis();
    if ms < 1000 {
        part(ms as u64, "ms");
    } else {
        let s = d.as_secs_f64().ceil() as u64;
        let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
        if h > 0 {
            part(h, "h");
        }
        if h > 0 || m > 0 {
            part(m, "m");
        }
        part(sec, "s");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Budget, Limits, TenantLimits};
    use crate::quota::{Calendar, TenantLedger};
    use proptest::prelude::*;
    use std::sync::Arc;

    /// Counts from every part of the range, the ends most of all.
    fn extreme() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(u64::MAX),
            Just(u64::MAX - 1),
            Just(1 << 63),
            (u64::MAX - 4096)..=u64::MAX,
            0u64..4096,
            any::<u64>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// A larger output allowance never reserves less, in tokens or in
        /// USD, so a budget that refuses a request refuses every larger one.
        #[test]
        fn reservation_is_monotone(
            prompt in extreme(),
            a in extreme(),
            b in extreme(),
            input in extreme(),
            output in extreme(),
            tokens_budget in extreme(),
            usd_budget in extreme(),
        ) {
            let (small, large) = (a.min(b), a.max(b));
            let price = Some(Price { input_pico_per_token: input, output_pico_per_token: output });
            let x = reservation(prompt, small, [price, None].into_iter());
            let y = reservation(prompt, large, [price, None].into_iter());
            prop_assert!(x.tokens <= y.tokens && x.usd_nano <= y.usd_nano);
            prop_assert!(y.tokens >= large && y.tokens >= prompt);
            let limits = TenantLimits {
                priority: 3,
                limits: Limits {
                    day: Budget { requests: None, tokens: Some(tokens_budget), usd_nano: Some(usd_budget) },
                    ..Limits::default()
                },
                models: Default::default(),
            };
            let calendar = Arc::new(Calendar::new(jiff::tz::TimeZone::UTC));
            let ledger = Arc::new(TenantLedger::new("t", &limits));
            let small_fits = ledger.reserve("m", x, &calendar).map(|r| r.refund()).is_ok();
            let large_fits = ledger.reserve("m", y, &calendar).map(|r| r.refund()).is_ok();
            prop_assert!(small_fits || !large_fits, "admitted {y:?} after refusing {x:?}");
        }
    }

    #[test]
    fn usd_text_is_exact() {
        assert_eq!(usd_text(0), "0.000000000");
        assert_eq!(usd_text(156_000), "0.000156000");
        assert_eq!(usd_text(1_000_000_001), "1.000000001");
        assert_eq!(usd_text(u64::MAX), "18446744073.709551615");
    }

    #[test]
    fn reset_formats() {
        assert_eq!(reset_text(Duration::from_millis(250)), "250ms");
        assert_eq!(reset_text(Duration::from_secs(2)), "2s");
        assert_eq!(reset_text(Duration::from_secs(90)), "1m30s");
        assert_eq!(reset_text(Duration::from_secs(3700)), "1h1m40s");
        assert_eq!(reset_text(Duration::from_secs(3605)), "1h0m5s");
        assert_eq!(reset_text(Duration::from_millis(1001)), "2s");
        assert_eq!(reset_text(Duration::ZERO), "0ms");
    }

    #[test]
    fn client_timeout_bounds_the_wait() {
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        assert_eq!(
            max_wait(&req, Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        req.insert_header("x-stainless-timeout", "5").unwrap();
        assert_eq!(
            max_wait(&req, Duration::from_secs(30)),
            Duration::from_secs(5)
        );
        req.insert_header("x-collie-max-wait", "500ms").unwrap();
        assert_eq!(
            max_wait(&req, Duration::from_secs(30)),
            Duration::from_millis(500)
        );
    }
}
