//! One attempt: send the request to one deployment (on a pooled connection,
//! retried once more on a fresh one when the pooled one turns out stale)
//! and read the response head; a failed attempt's body is drained aside so
//! its connection can be reused.

use super::super::Gateway;
use super::super::body::AttemptBody;
use super::headers::retry_after;
use crate::outcome::Failure;
use crate::routing::Deployment;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A failed attempt's body is read (to keep the connection) only this far.
const DISCARD_LIMIT: usize = 64 << 10;
/// … or takes longer than this in all.
const DISCARD_TIME: Duration = Duration::from_secs(2);

pub(super) type AttemptError = (Failure, Option<Duration>);

/// An upstream connection while a request uses it. Boxed: a session is
/// 472 bytes, and it passes through the attempt, the race with the client's
/// hang-up and the relay, each of whose futures would otherwise keep room
/// for it (some twice) for as long as the response streams.
pub(super) type Upstream = Box<HttpSession>;

/// Send one request and read its response head. `Ok` holds a session whose
/// response the client should get; `Err` says why the next attempt should run.
pub(super) async fn attempt(
    gw: &Gateway,
    up: &Deployment,
    header: Box<RequestHeader>,
    body: AttemptBody,
) -> Result<Upstream, AttemptError> {
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
        // Boxed: the connector's future holds a whole connect and TLS
        // handshake (~8 KB); inline, it would make every future around
        // it — up to the one the request runs in — that much larger, and
        // each of them is moved (copied) when it starts. Built in a box
        // allocated first: `Box::pin(future)`, or a helper taking the
        // future by value, builds it on the stack and copies all of it
        // into the box, for every request (a helper marked
        // `#[inline(always)]` cost 9k instructions per request).
        let (http, reused) = Box::into_pin(Box::write(
            Box::new_uninit(),
            gw.connector.get_http_session(&*up.peer()),
        ))
        .await
        .map_err(|e| (classify_connect(&e), None))?;
        let mut http = Box::new(http);
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
    header: Box<RequestHeader>,
    body: &AttemptBody,
) -> pingora::Result<()> {
    http.write_request_header(header).await?;
    let writes = body.writes();
    let last = writes.len().saturating_sub(1);
    for (i, piece) in writes.into_iter().enumerate() {
        http.write_request_body(piece, i == last).await?;
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

/// Read and drop a failed attempt's (small) body so its connection can be
/// reused; a large or slow one is closed instead. Runs beside the request.
async fn discard(connector: Arc<Connector>, peer: Arc<HttpPeer>, mut http: Upstream) {
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
    give_back(&connector, &peer, http).await;
}

/// Return a connection whose exchange completed to the pool.
pub(super) async fn release(gw: &Gateway, up: &Deployment, http: Upstream) {
    give_back(&gw.connector, &up.peer(), http).await;
}

/// Hand a connection to the connector's pool. The connector's future
/// (~3 KB) is boxed, written in place as in [`attempt`]: it runs once, at
/// the end, but inline it would make the relay's future, held for a whole
/// stream, that much larger.
async fn give_back(connector: &Connector, peer: &HttpPeer, http: Upstream) {
    Box::into_pin(Box::write(
        Box::new_uninit(),
        connector.release_http_session(*http, peer, peer.options.idle_timeout),
    ))
    .await;
}
