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

use super::body::{AttemptBody, Inspected};
use super::error::stream_error_event;
use super::redact::{KeyMask, Redactor};
use super::{Gateway, GatewayError, RequestCtx};
use crate::config::RetrySettings;
use crate::outcome::{Attempt, Cut, Endpoint, Failure};
use crate::quota::admission::{Pressure, provider_pressure};
use crate::routing::health::Outcome;
use crate::routing::{Lease, Pick, Router, Upstream, now_ms};
use crate::state::Snapshot;
use crate::usage::JsonUsage;
use crate::usage::sse::SseObserver;
use bytes::Bytes;
use futures::FutureExt;
use http::header;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::HttpTask;
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest `Retry-After` honoured; a larger value is capped, not ignored.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// A failed attempt's body is read (to keep the connection) only this far.
const DISCARD_LIMIT: usize = 64 << 10;
/// … or takes longer than this in all.
const DISCARD_TIME: Duration = Duration::from_secs(2);

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
/// connect and first-byte waits; no attempt starts after it. An `Err` means
/// nothing was sent to the client yet.
pub async fn run(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    snap: &Arc<Snapshot>,
    chain: &[usize],
    body: Bytes,
    inspected: &Inspected,
) -> Result<(), GatewayError> {
    let result = attempts(gw, session, ctx, snap, chain, body, inspected).await;
    ctx.exchange.fallback = fallback(
        &ctx.exchange.attempts,
        ctx.exchange.served,
        chain,
        &snap.router,
    );
    result
}

/// A request fell back when it made an attempt in a pool after the first of
/// its chain (retries inside a pool are not fallbacks). From: the first
/// attempt's deployment, or the first pool's first member when that pool
/// had nothing to offer; to: the one that served, else the last tried.
fn fallback(
    attempts: &[Attempt],
    served: Option<usize>,
    chain: &[usize],
    router: &Router,
) -> Option<(usize, usize)> {
    let last = attempts.last().filter(|a| a.position > 0)?;
    let from = match attempts.first() {
        Some(a) if a.position == 0 => a.upstream,
        _ => *router.pools.get(*chain.first()?)?.members.first()?,
    };
    Some((from, served.unwrap_or(last.upstream)))
}

/// Whether a pool's look-ahead offers a member; if not, remember why.
fn offers(pick: Pick, skipped: &mut Skipped) -> bool {
    match pick {
        Pick::Upstream { .. } => true,
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

async fn attempts(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    snap: &Arc<Snapshot>,
    chain: &[usize],
    body: Bytes,
    inspected: &Inspected,
) -> Result<(), GatewayError> {
    let inject_usage =
        inspected.needs_usage_injection(ctx.caller.endpoint.supports_stream_options());
    let mut tried: Vec<usize> = Vec::with_capacity(chain.len());
    let mut skipped = Skipped::default();
    let mut last_retry_after: Option<u64> = None;
    let router = &snap.router;
    let tokens = ctx.request.tokens_estimate;
    let deadline = ctx.started + snap.config.request_deadline;
    let mut out_of_time = false;
    'chain: for (position, &pool) in chain.iter().enumerate() {
        let Some(pool_rt) = router.pools.get(pool) else {
            continue;
        };
        // A pool with nothing to offer now (every member unhealthy with no
        // trial due, or resting after a 429) is passed at once, before its
        // concurrency gate: panic mode answers without queueing.
        if !offers(
            pool_rt.peek(&router.upstreams, &tried, now_ms(), tokens),
            &mut skipped,
        ) {
            continue;
        }
        // A saturated pool is skipped while a later one may have room; the
        // last one is waited for, in priority order.
        let is_last = position + 1 == chain.len();
        let permit = match pool_rt.gate.try_acquire() {
            Some(p) => p,
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
                    pool_rt.gate.acquire(ctx.caller.priority, wait),
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
                    pool_rt.peek(&router.upstreams, &tried, now_ms(), tokens),
                    &mut skipped,
                ) {
                    break;
                }
                let slept = backoff(&snap.config.retry, try_in_pool - 1, deadline);
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
            let mut lease = match pool_rt.pick(&router.upstreams, &tried, now_ms(), tokens) {
                Pick::Upstream { index, trial } => match router.upstreams.get(index) {
                    Some(u) => Lease::new(Arc::clone(u), trial, tokens),
                    None => break,
                },
                other => {
                    offers(other, &mut skipped);
                    break;
                }
            };
            // From here every way out gives back or accounts what the pick
            // took: `lease` is finished with an outcome or dropped.
            let upstream = Arc::clone(lease.upstream());
            tried.push(upstream.index);
            let attempt_body = inspected.body_for(&body, &upstream.model, inject_usage)?;
            let header = upstream_request(session.req_header(), &upstream, ctx.caller.endpoint)?;
            let sent = Instant::now();
            // The deployment's connect and first-byte timeouts apply inside;
            // the deadline caps the attempt as a whole.
            let record = |ctx: &mut RequestCtx, outcome| {
                ctx.exchange.attempts.push(Attempt {
                    upstream: upstream.index,
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
                tokio::time::timeout_at(
                    deadline.into(),
                    attempt(gw, &upstream, header, attempt_body),
                ),
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
                    relay(gw, session, ctx, &upstream, http, inject_usage).await;
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
    Err(all_failed(
        snap,
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
/// safe to drop midway.
async fn until_interrupted<T>(
    session: &mut Session,
    cut: &CancellationToken,
    work: impl std::future::Future<Output = T>,
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

fn all_failed(
    snap: &Snapshot,
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
        let name = snap
            .router
            .upstreams
            .get(a.upstream)
            .map_or("?", |u| u.id.as_str());
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

/// Headers that describe one hop, never forwarded in either direction.
fn hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Fields a peer named in its `Connection` header: hop-by-hop too (RFC 9110
/// §7.6.1). Usually none, so usually no allocation.
fn connection_nominated(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect()
}

/// Client headers that must not reach a provider: credentials, routing
/// headers meant for Collie, and framing that Collie sets itself.
/// `accept-encoding` is dropped so the provider answers uncompressed and the
/// usage in the response can be read.
fn withheld_from_upstream(name: &header::HeaderName) -> bool {
    hop_by_hop(name)
        || matches!(
            name.as_str(),
            "host"
                | "content-length"
                | "authorization"
                | "api-key"
                | "x-tenant-id"
                | "accept-encoding"
                | "expect"
                | "cookie"
        )
        || name.as_str().starts_with("x-collie-")
}

fn upstream_request(
    client: &RequestHeader,
    upstream: &Upstream,
    endpoint: Endpoint,
) -> Result<RequestHeader, GatewayError> {
    let internal = |e: Box<Error>| GatewayError::Internal(e.to_string());
    let mut path = String::with_capacity(upstream.path_prefix.len() + 32);
    path.push_str(&upstream.path_prefix);
    path.push_str(endpoint.upstream_suffix());
    if let Some(q) = client.uri.query() {
        path.push('?');
        path.push_str(q);
    }
    // Header names go out in lower case: no case map to keep per request.
    let mut req =
        RequestHeader::build_no_case("POST", path.as_bytes(), Some(client.headers.len() + 3))
            .map_err(internal)?;
    let nominated = connection_nominated(&client.headers);
    for (name, value) in client.headers.iter() {
        if withheld_from_upstream(name) || nominated.iter().any(|n| n == name.as_str()) {
            continue;
        }
        req.append_header(name.clone(), value.clone())
            .map_err(internal)?;
    }
    req.insert_header(header::HOST, upstream.host.clone())
        .map_err(internal)?;
    if let Some((name, value)) = &upstream.auth {
        req.insert_header(name.clone(), value.clone())
            .map_err(internal)?;
    }
    Ok(req)
}

type AttemptError = (Failure, Option<Duration>);

/// Send one request and read its response head. `Ok` holds a session whose
/// response the client should get; `Err` says why the next attempt should run.
async fn attempt(
    gw: &Gateway,
    up: &Upstream,
    mut header: RequestHeader,
    body: AttemptBody,
) -> Result<HttpSession, AttemptError> {
    header
        .insert_header(header::CONTENT_LENGTH, body.len())
        .map_err(|e| (Failure::Broken(e.etype().as_str().to_string()), None))?;
    // A pooled connection the provider already closed fails while the
    // request is written, before the provider can have acted on it; such a
    // failure is retried on another connection and does not count as an
    // attempt. A failure while reading the response head is not retried
    // here: the provider may have received the request and be generating
    // (and billing) it, so it is an attempt that failed.
    up.resolved().map_err(|e| (Failure::Connect(e), None))?;
    let mut stale_retries = 2;
    let mut header = Some(header);
    loop {
        let (mut http, reused) = gw
            .connector
            .get_http_session(&*up.peer())
            .await
            .map_err(|e| (classify_connect(&e), None))?;
        http.set_write_timeout(Some(up.timeouts.idle));
        http.set_read_timeout(Some(up.timeouts.first_byte));
        // Keep a copy only while a stale-connection retry may need it.
        let this_try = match header.as_ref() {
            Some(h) if reused && stale_retries > 0 => h.clone(),
            _ => header
                .take()
                .ok_or_else(|| (Failure::Broken("request head already sent".into()), None))?,
        };
        match send_request(&mut http, this_try, &body).await {
            Ok(()) => {}
            Err(e) if reused && stale_retries > 0 && is_stale_connection(&e) => {
                stale_retries -= 1;
                continue;
            }
            Err(e) => return Err((classify_exchange(&e), None)),
        }
        if let Err(e) = http.read_response_header().await {
            return Err((classify_exchange(&e), None));
        }
        let Some(head) = http.response_header() else {
            return Err((Failure::Broken("no response head".into()), None));
        };
        let status = head.status.as_u16();
        if status == 429 || status >= 500 {
            let retry_after = (status == 429 || status == 503)
                .then(|| retry_after(head))
                .flatten();
            // The next attempt does not wait for this one's error body.
            tokio::spawn(discard(Arc::clone(&gw.connector), up.peer(), http));
            return Err((Failure::Status(status), retry_after));
        }
        return Ok(http);
    }
}

async fn send_request(
    http: &mut HttpSession,
    header: RequestHeader,
    body: &AttemptBody,
) -> pingora::Result<()> {
    http.write_request_header(Box::new(header)).await?;
    let pieces = body.pieces();
    for (i, piece) in pieces.iter().enumerate() {
        http.write_request_body(piece.clone(), i + 1 == pieces.len())
            .await?;
    }
    http.finish_request_body().await
}

fn classify_connect(e: &Error) -> Failure {
    match e.etype() {
        ErrorType::ConnectTimedout => Failure::Connect("timed out".into()),
        ErrorType::ConnectRefused => Failure::Connect("refused".into()),
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError => {
            Failure::Connect("TLS handshake failed".into())
        }
        other => Failure::Connect(other.as_str().to_string()),
    }
}

fn classify_exchange(e: &Error) -> Failure {
    match e.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
        other => Failure::Broken(other.as_str().to_string()),
    }
}

fn is_stale_connection(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed
            | ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::H2Error
    )
}

/// `retry-after-ms` (OpenAI, Azure) wins over `retry-after`, which is either
/// seconds or an HTTP date.
pub(crate) fn retry_after(head: &ResponseHeader) -> Option<Duration> {
    let text = |name: &str| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let wait = if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Duration::try_from_secs_f64(ms / 1000.0).ok()?
    } else {
        let v = text("retry-after")?;
        match v.parse::<f64>() {
            Ok(s) => Duration::try_from_secs_f64(s).ok()?,
            Err(_) => httpdate::parse_http_date(v)
                .ok()?
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO),
        }
    };
    (!wait.is_zero()).then_some(wait.min(MAX_RETRY_AFTER))
}

/// Read and drop a failed attempt's (small) body so its connection can be
/// reused; a large or slow one is closed instead. Runs beside the request.
async fn discard(connector: Arc<Connector>, peer: Arc<HttpPeer>, mut http: HttpSession) {
    let started = Instant::now();
    http.set_read_timeout(Some(Duration::from_secs(1)));
    let mut read = 0usize;
    loop {
        match http.read_response_body().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                if read > DISCARD_LIMIT || started.elapsed() > DISCARD_TIME {
                    http.shutdown().await;
                    return;
                }
            }
            Ok(None) => break,
            Err(_) => {
                http.shutdown().await;
                return;
            }
        }
    }
    connector
        .release_http_session(http, &*peer, peer.options.idle_timeout)
        .await;
}

/// Return a connection whose exchange completed to the pool.
async fn release(gw: &Gateway, up: &Upstream, http: HttpSession) {
    let peer = up.peer();
    gw.connector
        .release_http_session(http, &*peer, peer.options.idle_timeout)
        .await;
}

/// What watches the response body for usage on its way to the client.
enum Observer {
    Sse(SseObserver),
    Json(JsonUsage),
    /// A refusal passed through: no usage to read.
    Off,
}

/// What happens to each chunk of the response on its way to the client:
/// usage is read from it, then the deployment's key is masked out of it.
struct Passage {
    observer: Observer,
    mask: Option<Redactor>,
}

impl Passage {
    /// What the client gets of one upstream chunk (may be empty).
    fn pass(&mut self, chunk: Bytes) -> Bytes {
        let out = match &mut self.observer {
            Observer::Sse(o) => o.feed(chunk),
            Observer::Json(j) => {
                j.feed(&chunk);
                chunk
            }
            Observer::Off => chunk,
        };
        match &mut self.mask {
            Some(m) if !out.is_empty() => m.feed(out),
            _ => out,
        }
    }

    /// What is still held back when the upstream body ends.
    fn finish(&mut self) -> Vec<Bytes> {
        let tail = match &mut self.observer {
            Observer::Sse(o) => o.finish(),
            _ => Bytes::new(),
        };
        let mut out = vec![self.pass_tail(tail)];
        if let Some(m) = &mut self.mask {
            out.push(m.finish());
        }
        out.retain(|b| !b.is_empty());
        out
    }

    fn pass_tail(&mut self, tail: Bytes) -> Bytes {
        match &mut self.mask {
            Some(m) if !tail.is_empty() => m.feed(tail),
            _ => tail,
        }
    }
}

/// How the relay loop's wait for the next chunk ended.
enum Next {
    Upstream(pingora::Result<Option<Bytes>>),
    ClientGone,
    Cut,
}

/// Pass the committed response to the client, observing usage on the side.
async fn relay(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    up: &Upstream,
    mut http: HttpSession,
    strip_usage: bool,
) {
    let Some(head) = http.response_header() else {
        return;
    };
    let status = head.status.as_u16();
    let is_sse = head
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let strip_usage = strip_usage && is_sse;
    let mut passage = Passage {
        observer: match (status, is_sse) {
            (200..=299, true) => Observer::Sse(SseObserver::new(strip_usage)),
            (200..=299, false) => Observer::Json(JsonUsage::default()),
            _ => Observer::Off,
        },
        mask: up.key_mask.as_ref().map(KeyMask::redactor),
    };
    let downstream_h2 = session.as_downstream().is_http2();
    let resp = match client_response_head(head, ctx, up, strip_usage, downstream_h2) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("request {}: cannot build response head: {e}", ctx.id);
            http.shutdown().await;
            return;
        }
    };
    ctx.response.status = status;
    ctx.exchange.served = Some(up.index);
    ctx.response.streamed = is_sse;
    if session
        .write_response_header(Box::new(resp), false)
        .await
        .is_err()
    {
        ctx.response.client_gone = true;
        http.shutdown().await;
        return;
    }
    http.set_read_timeout(Some(up.timeouts.idle));
    // An outcome read while draining a burst, handled before reading again.
    let mut pending: Option<pingora::Result<Option<Bytes>>> = None;
    loop {
        let next = match pending.take() {
            Some(r) => Next::Upstream(r),
            None => {
                match until_interrupted(session, &gw.lifecycle.cut, http.read_response_body()).await
                {
                    Ok(r) => Next::Upstream(r),
                    Err(Interrupt::ClientGone) => Next::ClientGone,
                    Err(Interrupt::Cut) => Next::Cut,
                }
            }
        };
        match next {
            Next::Upstream(Ok(Some(chunk))) => {
                // What the provider has already sent besides this chunk goes
                // out in the same write: one write for a burst of SSE events,
                // not one each. Nothing waits for more than is already here,
                // so no latency is added. (Pingora's body reader keeps its
                // state across a dropped read, so polling once is safe.)
                let mut batch = vec![passage.pass(chunk)];
                let mut size = batch[0].len();
                while size < BURST_BYTES {
                    match tokio::task::unconstrained(http.read_response_body()).now_or_never() {
                        Some(Ok(Some(more))) => {
                            let out = passage.pass(more);
                            size += out.len();
                            batch.push(out);
                        }
                        Some(other) => {
                            pending = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                batch.retain(|b| !b.is_empty());
                if batch.is_empty() {
                    continue;
                }
                if ctx.response.first_byte.is_none() {
                    ctx.response.first_byte = Some(Instant::now());
                }
                let keep = ctx.snapshot.config.audit.preview_bytes;
                if keep > 0 && (200..300).contains(&status) {
                    let p = ctx.response.preview.get_or_insert_with(Vec::new);
                    for out in &batch {
                        let room = keep.saturating_sub(p.len());
                        p.extend_from_slice(&out[..room.min(out.len())]);
                    }
                }
                if let Err(e) = write_burst(session, batch).await {
                    http.shutdown().await;
                    client_write_failed(session, ctx, &e).await;
                    break;
                }
            }
            Next::Upstream(Ok(None)) => {
                let mut tail = passage.finish();
                let last = tail.pop();
                let written = match write_burst(session, tail).await {
                    Ok(()) => session.write_response_body(last, true).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = written {
                    client_write_failed(session, ctx, &e).await;
                    http.shutdown().await;
                    break;
                }
                release(gw, up, http).await;
                break;
            }
            Next::Upstream(Err(e)) => {
                let detail = match e.etype() {
                    ErrorType::ReadTimedout => "no data within the idle timeout",
                    other => other.as_str(),
                };
                ctx.response.cut = Some(Cut::Upstream(detail));
                log::info!(
                    "request {}: upstream {} broke mid-response: {detail}",
                    ctx.id,
                    up.id
                );
                http.shutdown().await;
                let message = format!("upstream stream interrupted: {detail}");
                end_cut_response(session, ctx, &mut passage, &message).await;
                break;
            }
            Next::ClientGone => {
                ctx.response.client_gone = true;
                // Dropping the connection is what tells the provider to stop generating.
                http.shutdown().await;
                session.set_keepalive(None);
                break;
            }
            Next::Cut => {
                ctx.response.cut = Some(Cut::Shutdown);
                log::info!("request {}: cut off by the graceful stop", ctx.id);
                http.shutdown().await;
                let message = format!("stream cut off by the gateway: {}", Cut::Shutdown.reason());
                end_cut_response(session, ctx, &mut passage, &message).await;
                break;
            }
        }
    }
    ctx.response.usage = match passage.observer {
        Observer::Sse(o) => {
            ctx.response.delivered_estimate = o.delivered_tokens();
            o.usage()
        }
        // Usage the provider reported counts even when the client left or
        // the body broke after it: what was read is what was reported (a
        // body cut short before its usage parses to none).
        Observer::Json(j) => j.finish(),
        Observer::Off => None,
    };
}

/// A write to the client failed. A client that is gone is recorded as such;
/// one that stopped reading for longer than `client_timeout` had its
/// response cut off by Collie, which is recorded as truncated. Either way
/// the connection is closed without the end-of-body marker (a chunk half
/// written leaves nothing that can follow it), so the client's HTTP library
/// sees a response cut short, never a complete one.
async fn client_write_failed(session: &mut Session, ctx: &mut RequestCtx, e: &Error) {
    if e.etype() == &ErrorType::WriteTimedout {
        ctx.response.cut = Some(Cut::SlowClient);
        log::info!("request {}: cut off: {}", ctx.id, Cut::SlowClient.reason());
    } else {
        ctx.response.client_gone = true;
    }
    session.set_keepalive(None);
    session.downstream_session.shutdown().await;
}

/// A burst of response bytes already received is written at once up to this
/// size; beyond it the rest waits for the next round.
const BURST_BYTES: usize = 64 << 10;

/// Write response pieces to the client in one write when there are several.
async fn write_burst(session: &mut Session, mut batch: Vec<Bytes>) -> pingora::Result<()> {
    match batch.len() {
        0 => Ok(()),
        1 => session.write_response_body(batch.pop(), false).await,
        _ => {
            let tasks = batch
                .into_iter()
                .map(|b| HttpTask::Body(Some(b), false))
                .collect();
            session.write_response_tasks(tasks).await.map(|_| ())
        }
    }
}

/// A response cut short after its head went out. A stream ends with an SSE
/// error event the client can read (what was held back is released first,
/// and a half-sent event closed); any other body is cut off so the client
/// sees a truncated response, not a complete one.
async fn end_cut_response(
    session: &mut Session,
    ctx: &mut RequestCtx,
    passage: &mut Passage,
    message: &str,
) {
    if let Observer::Sse(o) = &mut passage.observer {
        o.abandon();
        let mid_event = o.client_mid_event();
        let mut bytes = Vec::new();
        if let Some(m) = &mut passage.mask {
            bytes.extend_from_slice(&m.finish());
        }
        if mid_event || !bytes.is_empty() {
            // Close the half-sent event so the error event parses on its own.
            bytes.extend_from_slice(b"\n\n");
        }
        bytes.extend_from_slice(&stream_error_event(message));
        if session
            .write_response_body(Some(Bytes::from(bytes)), true)
            .await
            .is_err()
        {
            ctx.response.client_gone = true;
            session.set_keepalive(None);
        }
        return;
    }
    session.set_keepalive(None);
    session.downstream_session.shutdown().await;
}

fn client_response_head(
    upstream: &ResponseHeader,
    ctx: &RequestCtx,
    up: &Upstream,
    body_changes: bool,
    downstream_h2: bool,
) -> pingora::Result<ResponseHeader> {
    let mut resp =
        ResponseHeader::build_no_case(upstream.status, Some(upstream.headers.len() + 8))?;
    let mut has_length = false;
    let nominated = connection_nominated(&upstream.headers);
    for (name, value) in upstream.headers.iter() {
        // The provider's limits for its key are not the tenant's business;
        // the tenant's own `x-ratelimit-*` are added below.
        if hop_by_hop(name)
            || name.as_str().starts_with("x-ratelimit-")
            || nominated.iter().any(|n| n == name.as_str())
        {
            continue;
        }
        if up
            .key_mask
            .as_ref()
            .is_some_and(|m| m.found_in(value.as_bytes()))
        {
            log::warn!(
                "request {}: dropped response header `{name}` from {}: it carried the deployment's key",
                ctx.id,
                up.id
            );
            continue;
        }
        if name == header::CONTENT_LENGTH {
            if body_changes {
                continue;
            }
            has_length = true;
        }
        resp.append_header(name.clone(), value.clone())?;
    }
    // A response that has no body by definition gets no framing either.
    let bodiless = matches!(upstream.status.as_u16(), 100..=199 | 204 | 304);
    if !has_length && !downstream_h2 && !bodiless {
        resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    resp.insert_header(super::X_COLLIE_MODEL, up.model_header.clone())?;
    resp.insert_header(super::X_COLLIE_ATTEMPTS, ctx.exchange.attempts.len())?;
    resp.insert_header(super::X_COLLIE_REQUEST_ID, ctx.id.as_str())?;
    super::spend::rate_headers(ctx, &mut resp);
    Ok(resp)
}
