//! The relay: the committed response passed to the client as it arrives,
//! with usage observed and the deployment's key masked on the way, and a
//! response cut short ended so the client can tell.

use super::super::error::stream_error_event;
use super::super::{Gateway, RequestCtx};
use super::attempt::{Upstream, release};
use super::headers::client_response_head;
use super::{Interrupt, until_interrupted};
use crate::outcome::Cut;
use crate::redact::{KeyMask, Redactor};
use crate::routing::Deployment;
use crate::usage::sse::SseObserver;
use crate::usage::{DocumentEnd, JsonUsage, Usage};
use bytes::Bytes;
use futures::FutureExt;
use http::header;
use pingora::protocols::http::HttpTask;
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};
use std::time::Instant;

/// What watches the response body for usage on its way to the client.
enum Observer {
    Sse(SseObserver),
    Json(JsonUsage),
    /// A JSON document read whole before its head went out: its usage, as
    /// read then and named in `x-collie-cost-usd` (whatever follows it is
    /// passed on unread, so the charge stays what the head said).
    Read(Option<Usage>),
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
            Observer::Read(_) | Observer::Off => chunk,
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
    /// The relay is over (a write to the client failed).
    Stop,
}

/// Wait for the next chunk of the upstream body, unless the client leaves
/// or the gateway's stop cuts in first.
async fn next_chunk(gw: &Gateway, session: &mut Session, http: &mut HttpSession) -> Next {
    let read = std::pin::pin!(http.read_response_body());
    match until_interrupted(session, &gw.lifecycle.cut, read).await {
        Ok(r) => Next::Upstream(r),
        Err(Interrupt::ClientGone) => Next::ClientGone,
        Err(Interrupt::Cut) => Next::Cut,
    }
}

/// A non-streamed 2xx body is held back whole, up to this size, so that
/// its cost can go in the head (`x-collie-cost-usd`); a larger one is
/// passed on as it comes, without the header. The chunks held are the ones
/// the usage observer keeps anyway (shared, not copied), so holding them
/// adds no memory unless the key mask rewrote one.
const COST_HOLD_BYTES: usize = 4 << 20;

/// Read ahead of the head: a non-streamed 2xx body until its JSON
/// document is complete (then its usage is read and kept, see
/// [`Observer::Read`]), up to [`COST_HOLD_BYTES`]. Returns what was read
/// (already passed through usage and key mask) and what ended the reading
/// other than a complete document or the limit — the body's end, a
/// failure, the client leaving — for the relay to handle next. Nothing for
/// any other response: a stream's usage comes after its head by nature.
async fn hold_for_cost(
    gw: &Gateway,
    session: &mut Session,
    http: &mut HttpSession,
    passage: &mut Passage,
) -> (Vec<Bytes>, Option<Next>) {
    let mut held = Vec::new();
    if !matches!(passage.observer, Observer::Json(_)) {
        return (held, None);
    }
    let mut end = DocumentEnd::default();
    let mut size = 0usize;
    let mut pending = None;
    while size <= COST_HOLD_BYTES {
        match next_chunk(gw, session, http).await {
            Next::Upstream(Ok(Some(chunk))) => {
                size = size.saturating_add(chunk.len());
                let complete = end.feed(&chunk);
                held.push(passage.pass(chunk));
                if complete {
                    break;
                }
            }
            other => {
                pending = Some(other);
                break;
            }
        }
    }
    let read_whole = end.complete() || matches!(pending, Some(Next::Upstream(Ok(None))));
    if let (true, Observer::Json(j)) = (read_whole, &passage.observer) {
        passage.observer = Observer::Read(j.finish());
    }
    (held, pending)
}

/// Write pieces of the response body to the client: the first byte's time
/// and the audit preview are taken on the way.
async fn deliver(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    mut batch: Vec<Bytes>,
) -> pingora::Result<()> {
    batch.retain(|b| !b.is_empty());
    if batch.is_empty() {
        return Ok(());
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
    write_burst(session, batch).await
}

/// Pass the committed response to the client, observing usage on the side.
pub(super) async fn relay(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    up: &Deployment,
    mut http: Upstream,
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
    let mut resp = match client_response_head(head, ctx, up, strip_usage, downstream_h2) {
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
    http.set_read_timeout(Some(up.timeouts.idle));
    // What was read before the head goes out, and how that reading ended.
    let (held, mut pending) = hold_for_cost(gw, session, &mut http, &mut passage).await;
    // Only a document read whole has its usage, and so its cost, known.
    if let Observer::Read(usage) = passage.observer {
        if let Some(nano) = super::super::spend::billed_nano_usd(usage, up.price) {
            // Digits and a dot: always a valid header value.
            if let Ok(v) = http::HeaderValue::try_from(super::super::spend::usd_text(nano)) {
                resp = super::headers::edit_response(resp, |h| {
                    h.insert(super::super::X_COLLIE_COST_USD, v);
                });
            }
        }
    }
    if session
        .write_response_header(Box::new(resp), false)
        .await
        .is_err()
    {
        ctx.response.client_gone = true;
        http.shutdown().await;
        // Usage read ahead was reported all the same.
        ctx.response.usage = observed(ctx, passage.observer);
        return;
    }
    if let Err(e) = deliver(session, ctx, status, held).await {
        http.shutdown().await;
        client_write_failed(session, ctx, &e).await;
        pending = Some(Next::Stop);
    }
    loop {
        let next = match pending.take() {
            Some(n) => n,
            None => next_chunk(gw, session, &mut http).await,
        };
        match next {
            Next::Stop => break,
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
                            pending = Some(Next::Upstream(other));
                            break;
                        }
                        None => break,
                    }
                }
                if let Err(e) = deliver(session, ctx, status, batch).await {
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
    ctx.response.usage = observed(ctx, passage.observer);
}

/// The usage the provider reported in what was read of its response.
/// Usage the provider reported counts even when the client left or the
/// body broke after it: what was read is what was reported (a body cut
/// short before its usage parses to none).
fn observed(ctx: &mut RequestCtx, observer: Observer) -> Option<Usage> {
    match observer {
        Observer::Sse(o) => {
            ctx.response.delivered_estimate = o.delivered_tokens();
            o.usage()
        }
        Observer::Json(j) => j.finish(),
        Observer::Read(usage) => usage,
        Observer::Off => None,
    }
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
