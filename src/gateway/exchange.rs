//! The upstream exchange: one loop over the fallback chain. Each attempt
//! sends the body rewritten for its deployment and reads the response head;
//! a connect failure, a reset, a first-byte timeout, a 429 or a 5xx moves on
//! to the next attempt. The first response passed to the client commits the
//! request: after that there is no retry, and a stream that breaks ends with
//! an SSE error event.
//!
//! The gateway owns this exchange instead of using Pingora's proxy phases
//! because Pingora can only re-send a body it buffered for retries (64 KiB at
//! most), and the OpenAI SDK writes `model` after `messages`.
//!
//! Here: the chain loop (pools in order, retries inside a pool, queueing,
//! the deadline, the answer when everything failed). One attempt is in
//! [`attempt`], the relay of the committed response in [`relay`], the
//! header rules in [`headers`].

use super::body::Inspected;
use super::{Gateway, GatewayError, RequestCtx};
use crate::config::{DeploymentIx, PoolIx, RetrySettings};
use crate::outcome::{Attempt, Failure};
use crate::routing::gate::{Pressure, provider_pressure};
use crate::routing::health::Outcome;
use crate::routing::{Lease, Pick, now_ms};
use crate::state::Snapshot;
use bytes::Bytes;
use pingora::proxy::Session;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

mod attempt;
mod headers;
mod relay;

pub(crate) use headers::{MAX_RETRY_AFTER, edit_response, retry_after};

/// Why no attempt was made in a pool, kept for the final answer.
#[derive(Default)]
struct Skipped {
    /// Shortest wait of a deployment resting after a provider's 429.
    rate_limited_ms: Option<u64>,
    /// Shortest wait of a deployment whose breaker is open.
    unhealthy_ms: Option<u64>,
}

fn shortest(slot: &mut Option<u64>, ms: u64) {
    *slot = Some(slot.map_or(ms, |s| s.min(ms)));
}

/// Run the chain for an admitted, inspected request and answer the client.
/// Within a pool, up to `retries` other members are tried (with exponential
/// backoff and jitter) before the next pool. The request's deadline bounds
/// everything up to the response head: queueing, backoff, and each attempt's
/// connect and first-byte waits; no attempt starts after it. `unfit`
/// deployments are never picked. An `Err` means nothing was sent to the
/// client yet.
#[expect(
    clippy::too_many_arguments,
    reason = "the request's parts, each owned by a different phase"
)]
pub(crate) async fn run(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    snap: &Arc<Snapshot>,
    chain: &[PoolIx],
    unfit: Vec<DeploymentIx>,
    body: Bytes,
    inspected: &Inspected,
) -> Result<(), GatewayError> {
    // Nothing tried because every deployment is down: wait for one to come
    // back, when the model holds requests (see `hold`), then go again.
    let mut hold = HoldState::default();
    let result = loop {
        let result = attempts(
            gw,
            session,
            ctx,
            snap,
            chain,
            unfit.clone(),
            body.clone(),
            inspected,
        )
        .await;
        let panic_mode = matches!(result, Err(GatewayError::NoHealthyUpstream { .. }))
            && ctx.exchange.attempts.is_empty();
        if !panic_mode || hold.ended {
            break result;
        }
        match held(gw, session, ctx, snap, chain, &unfit, &mut hold).await {
            Held::Released => {}
            // Once more, for a fresh answer (or a deployment just back).
            Held::Ended => hold.ended = true,
            Held::Refused => break result,
            Held::ClientGone => break Ok(()),
            Held::Cut => break Err(GatewayError::ShuttingDown),
        }
    };
    let first_member = chain
        .first()
        .and_then(|&p| snap.router.pool(p))
        .and_then(|p| p.first_member());
    ctx.exchange.fallback = fallback(&ctx.exchange.attempts, ctx.exchange.served, first_member);
    result
}

/// A request's hold across its waits: when it ends, and whether it did.
#[derive(Default)]
struct HoldState {
    until: Option<Instant>,
    ended: bool,
}

/// How a wait for a deployment to come back ended.
enum Held {
    /// The chain offers a deployment again.
    Released,
    /// The hold's time is up.
    Ended,
    /// Not held: the model holds no requests, or the hold is full.
    Refused,
    /// The client left while it waited (not a refusal: nobody to answer).
    ClientGone,
    /// A graceful stop cut it off.
    Cut,
}

/// Wait while every deployment of the request's chain is down, for at most
/// the model's `hold_when_down` (less when the client's wait headers say
/// so, never past the request deadline) in all.
async fn held(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    snap: &Arc<Snapshot>,
    chain: &[PoolIx],
    unfit: &[DeploymentIx],
    hold: &mut HoldState,
) -> Held {
    let Some(longest) = ctx
        .request
        .model
        .as_deref()
        .and_then(|m| snap.model(m))
        .and_then(|m| m.hold_when_down)
    else {
        return Held::Refused;
    };
    let deadline = ctx.started + snap.config.request_deadline;
    let until = *hold.until.get_or_insert_with(|| {
        let wait = super::spend::max_wait(session.req_header(), longest);
        Instant::now()
            .checked_add(wait)
            .unwrap_or(deadline)
            .min(deadline)
    });
    if Instant::now() >= until {
        return Held::Ended;
    }
    let waiter = super::hold::Waiter {
        priority: ctx.caller.priority,
        snapshot: Arc::clone(snap),
        chain: chain.to_vec(),
        unfit: unfit.to_vec(),
        tokens: ctx.request.tokens_estimate,
    };
    let Some(released) = gw.hold.park(snap.config.max_held_requests, waiter) else {
        log::info!(
            "request {}: every deployment is down and {} requests are held already",
            ctx.id,
            snap.config.max_held_requests
        );
        return Held::Refused;
    };
    let parked = Instant::now();
    let waited = until_interrupted(
        session,
        &gw.lifecycle.cut,
        std::pin::pin!(tokio::time::timeout_at(until.into(), released)),
    )
    .await;
    ctx.exchange.held = ctx.exchange.held.saturating_add(parked.elapsed());
    match waited {
        Ok(Ok(Ok(()))) => Held::Released,
        Ok(Ok(Err(_))) | Ok(Err(_)) => Held::Ended,
        Err(Interrupt::ClientGone) => {
            ctx.response.client_gone = true;
            // Nobody to answer; the connection is not reused.
            session.set_keepalive(None);
            Held::ClientGone
        }
        Err(Interrupt::Cut) => Held::Cut,
    }
}

/// A request fell back when it made an attempt in a pool after the first of
/// its chain (retries inside a pool are not fallbacks). From: the first
/// attempt's deployment, or the first pool's first member when that pool
/// had nothing to offer; to: the one that served, else the last tried.
fn fallback(
    attempts: &[Attempt],
    served: Option<DeploymentIx>,
    first_member: Option<DeploymentIx>,
) -> Option<(DeploymentIx, DeploymentIx)> {
    let last = attempts.last().filter(|a| a.position > 0)?;
    let from = match attempts.first() {
        Some(a) if a.position == 0 => a.deployment,
        _ => first_member?,
    };
    Some((from, served.unwrap_or(last.deployment)))
}

/// Whether a pool's look-ahead offers a member; if not, remember why.
fn offers(pick: Pick, skipped: &mut Skipped) -> bool {
    match pick {
        Pick::Deployment { .. } => true,
        Pick::Blocked { retry_in_ms } => {
            shortest(&mut skipped.rate_limited_ms, retry_in_ms);
            false
        }
        Pick::Unhealthy { retry_in_ms } => {
            shortest(&mut skipped.unhealthy_ms, retry_in_ms);
            false
        }
        Pick::Exhausted => false,
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "the request's parts, each owned by a different phase"
)]
async fn attempts(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    snap: &Arc<Snapshot>,
    chain: &[PoolIx],
    unfit: Vec<DeploymentIx>,
    body: Bytes,
    inspected: &Inspected,
) -> Result<(), GatewayError> {
    let inject_usage =
        inspected.needs_usage_injection(ctx.caller.endpoint.supports_stream_options());
    // Deployments the request cannot use (see `fit`) count as tried: no
    // pick offers them.
    let mut tried: Vec<DeploymentIx> = unfit;
    let mut skipped = Skipped::default();
    let mut last_retry_after: Option<u64> = None;
    let router = &snap.router;
    let tokens = ctx.request.tokens_estimate;
    let deadline = ctx.started + snap.config.request_deadline;
    let mut out_of_time = false;
    'chain: for (position, &pool) in chain.iter().enumerate() {
        let Some(pool_rt) = router.pool(pool) else {
            continue;
        };
        // A pool with room is picked from at once: the pick says whether it
        // offers anything, and the slot goes back unused when it does not.
        // A full one is looked at first: one with nothing to offer now
        // (every member unhealthy with no trial due, or resting after a
        // 429) is passed without queueing — panic mode answers without
        // waiting — and a saturated pool is skipped while a later one may
        // have room; the last one is waited for, in priority order.
        let is_last = position + 1 == chain.len();
        let permit = match pool_rt.gate.try_acquire() {
            Some(p) => p,
            None if !offers(
                pool_rt.peek(&router.deployments, &tried, now_ms(), tokens),
                &mut skipped,
            ) =>
            {
                continue;
            }
            None if !is_last => continue,
            None => {
                let waited = Instant::now();
                let wait = ctx
                    .caller
                    .max_wait
                    .min(deadline.saturating_duration_since(waited));
                // A client that hangs up while queued leaves the queue at
                // once (dropping the wait gives its place, or a slot just
                // handed to it, back) and nothing is sent upstream.
                let acquired = until_interrupted(
                    session,
                    &gw.lifecycle.cut,
                    std::pin::pin!(pool_rt.gate.acquire(ctx.caller.priority, wait)),
                )
                .await;
                ctx.exchange.queued = Some(waited.elapsed());
                match acquired {
                    Ok(Ok(p)) => p,
                    Ok(Err(t)) => {
                        return Err(GatewayError::QueueTimeout {
                            retry_after_s: t.retry_after.as_secs().max(1),
                        });
                    }
                    Err(Interrupt::Cut) => return Err(GatewayError::ShuttingDown),
                    Err(Interrupt::ClientGone) => {
                        // Not a refusal: admitted, then abandoned by the
                        // client (the audit record says `client_gone`).
                        ctx.response.client_gone = true;
                        // Nobody to answer; the connection is not reused.
                        session.set_keepalive(None);
                        return Ok(());
                    }
                }
            }
        };
        for try_in_pool in 0..=pool_rt.retries {
            if try_in_pool > 0 {
                // Only when the pool still has a member to offer; and before
                // the pick, so nothing it takes (a half-open trial, provider
                // tokens) is held while sleeping. The exponent counts this
                // pool's retries only.
                if !offers(
                    pool_rt.peek(&router.deployments, &tried, now_ms(), tokens),
                    &mut skipped,
                ) {
                    break;
                }
                let slept = std::pin::pin!(backoff(&snap.config.retry, try_in_pool - 1, deadline));
                match until_interrupted(session, &gw.lifecycle.cut, slept).await {
                    Ok(()) => {}
                    Err(Interrupt::Cut) => return Err(GatewayError::ShuttingDown),
                    Err(Interrupt::ClientGone) => {
                        ctx.response.client_gone = true;
                        return Err(GatewayError::ClientClosed);
                    }
                }
            }
            if Instant::now() >= deadline {
                out_of_time = true;
                break 'chain;
            }
            let mut lease = match pool_rt.pick(&router.deployments, &tried, now_ms(), tokens) {
                Pick::Deployment { index, trial } => match router.deployment(index) {
                    Some(u) => Lease::new(Arc::clone(u), trial, tokens),
                    None => break,
                },
                other => {
                    offers(other, &mut skipped);
                    if try_in_pool == 0 {
                        permit.unused();
                    }
                    break;
                }
            };
            // From here every way out gives back or accounts what the pick
            // took: `lease` is finished with an outcome or dropped.
            let upstream = Arc::clone(lease.upstream());
            tried.push(upstream.index);
            let attempt_body = inspected.body_for(&body, &upstream.model, inject_usage)?;
            // Boxed, as Pingora's client takes it: it is 352 bytes, and
            // each future it passes through would keep room for it.
            let header = Box::new(headers::upstream_request(
                session.req_header(),
                &upstream,
                ctx.caller.endpoint,
                attempt_body.len(),
            )?);
            let sent = Instant::now();
            // The deployment's connect and first-byte timeouts apply inside;
            // the deadline caps the attempt as a whole.
            let record = |ctx: &mut RequestCtx, outcome| {
                ctx.exchange.attempts.push(Attempt {
                    deployment: upstream.index,
                    outcome,
                    tokens_taken: tokens,
                    position,
                });
            };
            // A client that leaves before the response head cancels the
            // attempt: dropping it closes the provider connection, which is
            // what stops the provider generating (and billing) the answer.
            let interrupted = until_interrupted(
                session,
                &gw.lifecycle.cut,
                std::pin::pin!(tokio::time::timeout_at(
                    deadline.into(),
                    attempt::attempt(gw, &upstream, header, attempt_body),
                )),
            )
            .await;
            let result = match interrupted {
                Ok(result) => result,
                // Not the deployment's failure: no health outcome; the lease
                // frees a trial slot.
                Err(Interrupt::ClientGone) => {
                    record(ctx, Err(Failure::Abandoned));
                    lease.recorded();
                    ctx.response.client_gone = true;
                    return Err(GatewayError::ClientClosed);
                }
                Err(Interrupt::Cut) => {
                    record(ctx, Err(Failure::Shutdown));
                    lease.recorded();
                    return Err(GatewayError::ShuttingDown);
                }
            };
            match result {
                Err(_deadline) => {
                    // Not the deployment's failure: it may have had less time
                    // than its own timeouts allow. No health outcome; the
                    // lease frees a trial slot.
                    record(ctx, Err(Failure::Deadline));
                    lease.recorded();
                    log::debug!(
                        "request {}: deadline passed during the attempt on {}",
                        ctx.id,
                        upstream.id
                    );
                    out_of_time = true;
                    break 'chain;
                }
                Ok(Ok(http)) => {
                    let status = http.response_header().map_or(0, |h| h.status.as_u16());
                    lease.recorded();
                    lease.finish(Outcome::Success {
                        ttfb: sent.elapsed(),
                    });
                    let pressure = http
                        .response_header()
                        .map_or(Pressure::Clear, |h| provider_pressure(&h.headers, tokens));
                    pool_rt.gate.observe(pressure, (200..300).contains(&status));
                    record(ctx, Ok(status));
                    relay::relay(gw, session, ctx, &upstream, http, inject_usage).await;
                    drop(permit);
                    return Ok(());
                }
                Ok(Err((failure, retry_after))) => {
                    let outcome = match failure {
                        Failure::Status(429) => {
                            pool_rt.gate.saturated();
                            Outcome::RateLimited { retry_after }
                        }
                        _ => Outcome::Failure,
                    };
                    if lease.trial() {
                        log::info!(
                            "request {}: trial request to {} failed: {failure}",
                            ctx.id,
                            upstream.id
                        );
                    }
                    lease.recorded();
                    lease.finish(outcome);
                    if let Some(wait) = retry_after {
                        upstream.block_for(wait);
                        last_retry_after = Some(wait.as_secs().max(1));
                    }
                    log::debug!(
                        "request {} attempt on {} failed: {failure}",
                        ctx.id,
                        upstream.id
                    );
                    record(ctx, Err(failure));
                }
            }
        }
    }
    if out_of_time {
        return Err(GatewayError::DeadlineExceeded);
    }
    let name = |d: DeploymentIx| snap.router.deployment(d).map_or("?", |u| u.id.as_str());
    Err(all_failed(
        name,
        &ctx.exchange.attempts,
        &skipped,
        last_retry_after,
    ))
}

/// What stopped a piece of work before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupt {
    /// The client closed or reset its connection.
    ClientGone,
    /// A graceful stop's drain timeout passed.
    Cut,
}

/// Run `work` unless the client leaves or the gateway's stop cuts it off
/// first. The request body has been read whole, so the downstream
/// connection has nothing more to say until the answer is done: a close or
/// a reset means the client is gone (a request it pipelined behind this one
/// is kept for later by the HTTP layer and does not count). `work` must be
/// safe to drop midway. It is lent, pinned by the caller: a future passed
/// by value would be held twice (as the argument and in the race) and
/// copied into each, and an attempt's is kilobytes.
async fn until_interrupted<T>(
    session: &mut Session,
    cut: &CancellationToken,
    work: std::pin::Pin<&mut impl std::future::Future<Output = T>>,
) -> Result<T, Interrupt> {
    tokio::select! {
        biased;
        r = work => Ok(r),
        _ = session.downstream_session.read_body_or_idle(true) => Err(Interrupt::ClientGone),
        () = cut.cancelled() => Err(Interrupt::Cut),
    }
}

/// Sleep before the `n`th retry in a pool (from 0): exponential from
/// `retry.backoff`, capped at `retry.max_backoff`, with full jitter, never
/// past the deadline.
async fn backoff(retry: &RetrySettings, n: u32, deadline: Instant) {
    let cap = retry
        .backoff
        .saturating_mul(2u32.saturating_pow(n.min(16)))
        .min(retry.max_backoff);
    let jittered = cap.mul_f64(rand::random::<f64>());
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(jittered.min(left)).await;
}

/// The answer when no attempt committed: what was tried (by deployment
/// name) and why it failed, the status of the last failure (502/504 for a
/// transport failure), or when nothing could be tried, why not and when to
/// retry.
fn all_failed<'a>(
    name: impl Fn(DeploymentIx) -> &'a str,
    attempts: &[Attempt],
    skipped: &Skipped,
    retry_after: Option<u64>,
) -> GatewayError {
    let secs = |ms: u64| ms.div_ceil(1000).max(1);
    let Some(last) = attempts.last() else {
        // Nothing was tried: every deployment was resting (the provider's
        // 429) or unhealthy (panic mode) — answer at once with when to retry.
        return match (skipped.rate_limited_ms, skipped.unhealthy_ms) {
            (Some(ms), _) => GatewayError::UpstreamsBusy {
                retry_after_s: secs(ms),
            },
            (None, Some(ms)) => GatewayError::NoHealthyUpstream {
                retry_after_s: secs(ms),
            },
            (None, None) => GatewayError::NoUpstream,
        };
    };
    let status = match &last.outcome {
        Err(Failure::Status(s)) => *s,
        Err(Failure::Timeout | Failure::Deadline) => 504,
        _ => 502,
    };
    let mut text = String::new();
    for (i, a) in attempts.iter().enumerate() {
        let name = name(a.deployment);
        let outcome = match &a.outcome {
            Ok(s) => format!("HTTP {s}"),
            Err(f) => f.to_string(),
        };
        let _ = write!(text, "{}{name}: {outcome}", if i > 0 { "; " } else { "" });
    }
    let waits = skipped.rate_limited_ms.or(skipped.unhealthy_ms);
    let retry_after_s = match (status, retry_after, waits) {
        (429 | 503, Some(s), _) => Some(s),
        (429 | 503, None, Some(ms)) => Some(secs(ms)),
        _ => None,
    };
    GatewayError::UpstreamsFailed {
        status,
        attempts: text,
        retry_after_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(deployment: usize, position: usize, outcome: Result<u16, Failure>) -> Attempt {
        Attempt {
            deployment: DeploymentIx(deployment),
            outcome,
            tokens_taken: 0,
            position,
        }
    }

    fn names(d: DeploymentIx) -> &'static str {
        ["a", "b", "c"].get(d.0).copied().unwrap_or("?")
    }

    fn d(i: usize) -> DeploymentIx {
        DeploymentIx(i)
    }

    #[test]
    fn a_fallback_is_an_attempt_in_a_later_pool() {
        // Retries inside the first pool are not fallbacks.
        let inside = [attempt(0, 0, Err(Failure::Timeout)), attempt(1, 0, Ok(200))];
        assert_eq!(fallback(&inside, Some(d(1)), Some(d(0))), None);
        // From the first attempt to the one that served.
        let chain = [
            attempt(0, 0, Err(Failure::Status(500))),
            attempt(2, 1, Ok(200)),
        ];
        assert_eq!(fallback(&chain, Some(d(2)), Some(d(0))), Some((d(0), d(2))));
        // Nothing served: to the last one tried.
        let failed = [
            attempt(0, 0, Err(Failure::Status(500))),
            attempt(2, 1, Err(Failure::Timeout)),
        ];
        assert_eq!(fallback(&failed, None, Some(d(0))), Some((d(0), d(2))));
        // The first pool offered nothing: from its first member.
        let skipped = [attempt(2, 1, Ok(200))];
        assert_eq!(
            fallback(&skipped, Some(d(2)), Some(d(1))),
            Some((d(1), d(2)))
        );
        assert_eq!(fallback(&[], None, Some(d(0))), None);
    }

    #[test]
    fn the_answer_when_everything_failed() {
        let none = Skipped::default();
        // The last status, the attempts named, a provider's Retry-After.
        let e = all_failed(
            names,
            &[
                attempt(0, 0, Err(Failure::Timeout)),
                attempt(1, 1, Err(Failure::Status(503))),
            ],
            &none,
            Some(7),
        );
        assert_eq!(
            e,
            GatewayError::UpstreamsFailed {
                status: 503,
                attempts: "a: no response head before the first-byte timeout; b: HTTP 503".into(),
                retry_after_s: Some(7),
            }
        );
        // Transport failures: 504 for time, 502 for the rest; no Retry-After.
        for (f, status) in [
            (Failure::Timeout, 504),
            (Failure::Deadline, 504),
            (Failure::Connect("refused".into()), 502),
            (Failure::Broken("reset".into()), 502),
        ] {
            match all_failed(names, &[attempt(0, 0, Err(f))], &none, Some(3)) {
                GatewayError::UpstreamsFailed {
                    status: s,
                    retry_after_s,
                    ..
                } => assert_eq!((s, retry_after_s), (status, None)),
                other => panic!("{other:?}"),
            }
        }
        // A 429 without its own Retry-After takes the shortest rest seen.
        let resting = Skipped {
            rate_limited_ms: Some(1500),
            unhealthy_ms: None,
        };
        match all_failed(
            names,
            &[attempt(0, 0, Err(Failure::Status(429)))],
            &resting,
            None,
        ) {
            GatewayError::UpstreamsFailed { retry_after_s, .. } => {
                assert_eq!(retry_after_s, Some(2))
            }
            other => panic!("{other:?}"),
        }
        // Nothing tried at all.
        assert_eq!(
            all_failed(names, &[], &resting, None),
            GatewayError::UpstreamsBusy { retry_after_s: 2 }
        );
        let sick = Skipped {
            rate_limited_ms: None,
            unhealthy_ms: Some(10),
        };
        assert_eq!(
            all_failed(names, &[], &sick, None),
            GatewayError::NoHealthyUpstream { retry_after_s: 1 }
        );
        assert_eq!(
            all_failed(names, &[], &none, None),
            GatewayError::NoUpstream
        );
    }
}
