//! `GET /status/events`: the status view pushed as Server-Sent Events, so
//! the page changes the moment a deployment does, without polling.
//!
//! Why SSE and not a WebSocket: the push goes one way (the page's one
//! action, the forced check, is a plain POST); SSE is an ordinary HTTP/1.1
//! response that the listener's HTTP stack writes as a chunked body — no
//! upgrade, no frame codec, nothing a proxy in between must understand —
//! and its text (`event: status`, `data: {…}`) reads with `curl -N`.
//!
//! Authentication is the same as `/status`'s: `Authorization: Bearer` with
//! the admin token, or a loopback client without one. Browsers' EventSource
//! cannot send that header, and a token in the URL (or a ticket) would end
//! up in proxies' and browsers' logs and history; so the page reads this
//! stream with `fetch` and a stream reader, sending the header like every
//! other request for data.
//!
//! Each event holds the whole view (it is small: one entry per model,
//! pool, deployment, tenant and alert in the feed): `status` events, sent
//! at once when something changed (an alert, a breaker change, a forced
//! check; changes are coalesced to one event per [`MIN_GAP`]) and at least
//! every [`PERIOD`] (latencies, counters and quota use move without an
//! event). A client gone away is noticed by the next write failing, so
//! within two periods; a client that stops reading is cut off after
//! [`WRITE_TIMEOUT`].
//!
//! The stream does not hand its connection back: the connection guard's
//! head and idle deadlines (which start when a request is answered) never
//! start for it, so a stream is not cut by them, however long it lasts. It
//! ends when the client leaves, and when a graceful stop begins.

use super::AdminApp;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Streams open at once, at most; one more gets 503 with `Retry-After`.
pub(crate) const MAX_SUBSCRIBERS: usize = 8;
/// The longest a stream goes without an event.
const PERIOD: Duration = Duration::from_secs(2);
/// Changes closer together than this are sent as one event.
const MIN_GAP: Duration = Duration::from_millis(200);
/// The longest one write may wait for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A subscriber's place, given back however the stream ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn head(status: u16, content_type: &'static str) -> Option<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(6)).ok()?;
    h.insert_header(http::header::CONTENT_TYPE, content_type)
        .ok()?;
    h.insert_header(http::header::CACHE_CONTROL, "no-store")
        .ok()?;
    Some(h)
}

/// Serve one event stream on `http` until the client leaves or the process
/// stops. The caller checked the request's access.
pub(super) async fn stream(app: &Arc<AdminApp>, mut http: ServerSession, shutdown: &ShutdownWatch) {
    http.set_keepalive(None);
    let taken = app.subscribers.fetch_add(1, Ordering::AcqRel);
    let _slot = Slot(Arc::clone(&app.subscribers));
    if taken >= MAX_SUBSCRIBERS {
        let body =
            format!("at most {MAX_SUBSCRIBERS} event streams are served at once; retry later\n");
        if let Some(mut h) = head(503, "text/plain") {
            let _ = h.insert_header(http::header::RETRY_AFTER, "5");
            let _ = h.insert_header(http::header::CONTENT_LENGTH, body.len());
            if http.write_response_header(Box::new(h)).await.is_ok() {
                let _ = http.write_response_body(Bytes::from(body), true).await;
            }
        }
        let _ = http.finish().await;
        return;
    }
    let Some(mut h) = head(200, "text/event-stream") else {
        return;
    };
    // A chunked body: the events are written as they come.
    let _ = h.insert_header(http::header::TRANSFER_ENCODING, "chunked");
    // Tells a buffering reverse proxy (nginx) to pass events on at once.
    let _ = h.insert_header("x-accel-buffering", "no");
    http.set_write_timeout(Some(WRITE_TIMEOUT));
    if http.write_response_header(Box::new(h)).await.is_err() {
        return;
    }
    let mut changes = app.alerts.subscribe();
    let mut shutdown = shutdown.clone();
    let draining = app.draining.clone();
    let mut id = 0u64;
    loop {
        changes.mark_unchanged();
        id += 1;
        let view = super::status::compact(&app.state.load(), &app.alerts);
        let mut event = format!("id: {id}\nevent: status\ndata: ").into_bytes();
        event.extend_from_slice(&view);
        event.extend_from_slice(b"\n\n");
        if http
            .write_response_body(Bytes::from(event), false)
            .await
            .is_err()
        {
            return;
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                tokio::time::sleep(MIN_GAP).await;
            }
            _ = tokio::time::sleep(PERIOD) => {}
            _ = draining.cancelled() => break,
            _ = shutdown.changed() => break,
        }
    }
    // The process is stopping: end the body properly; the client's
    // EventSource-style reconnect finds the next process.
    let _ = http.write_response_body(Bytes::new(), true).await;
    let _ = http.finish().await;
}
