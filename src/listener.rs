//! Client connections below HTTP: what a listener does before a request
//! head is parsed. Every HTTP/1 connection of the gateway and admin
//! listeners is read through a [`Guarded`] stream that bounds the wait for
//! a request head (a whole-head deadline; an idle deadline between
//! requests), its size in bytes and in lines, and closes idle connections
//! when a graceful stop begins. A head over a limit is answered with 431
//! (size) or 408 (time) and the connection closed, before the HTTP stack
//! has buffered more of it.
//!
//! The HTTP stack under Collie reads a request head with a per-read timeout
//! and a 1 MiB cap checked between reads, so a client sending a byte every
//! few seconds held a connection, and up to a megabyte, for as long as it
//! liked. Here the head's end is found by its blank line, and the request
//! path says when a request starts and ends ([`request_started`],
//! [`request_finished`]), so the bytes of a body are never taken for a head.
//!
//! HTTP/2 connections (cleartext, by their preface) are handed over as they
//! are: the HTTP/2 layer has its own header-list limit and idle timeout.

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Limits on a request head, read from the config when a connection starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadLimits {
    /// From a head's first byte (a new connection: from its start) to its end.
    pub(crate) head_timeout: Duration,
    /// Idle between requests, waiting for the next head's first byte.
    pub(crate) idle_timeout: Duration,
    /// Request line and headers, in bytes.
    pub(crate) max_bytes: usize,
    /// Header fields (the request line is not counted).
    pub(crate) max_headers: usize,
}

/// Where a connection's limits come from (the live config) and where its
/// refusals are counted.
pub(crate) trait ListenerPolicy: Send + Sync + 'static {
    fn limits(&self) -> HeadLimits;
    fn refused(&self, why: Refusal);
}

/// Why a connection was closed before its request head was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The head did not arrive whole within `head_timeout` (408).
    HeadTimeout,
    /// The head was larger than `max_header_bytes` or had more than
    /// `max_headers` fields (431).
    HeadTooLarge,
}

impl Refusal {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::HeadTimeout => "head_timeout",
            Refusal::HeadTooLarge => "header_too_large",
        }
    }

    fn response(self) -> &'static [u8] {
        match self {
            Refusal::HeadTimeout => RESPONSE_408,
            Refusal::HeadTooLarge => RESPONSE_431,
        }
    }
}

// Written out whole so that refusing needs nothing from the HTTP stack; the
// `canned_responses_are_well_framed` test checks each length.
const RESPONSE_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nconnection: close\r\nx-collie-error: header_too_large\r\ncontent-length: 145\r\n\r\n{\"error\":{\"message\":\"the request head is larger than the gateway accepts\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"header_too_large\"}}";
const RESPONSE_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\nx-collie-error: head_timeout\r\ncontent-length: 129\r\n\r\n{\"error\":{\"message\":\"the request head did not arrive in time\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"head_timeout\"}}";

/// What the request path tells the connection it runs on.
#[derive(Debug, Default)]
struct ConnState {
    /// Between [`request_started`] and [`request_finished`].
    in_request: AtomicBool,
    /// Requests finished on this connection; a change starts a new head.
    finished: AtomicU64,
}

tokio::task_local! {
    static CONN: Arc<ConnState>;
}

/// The request head was parsed and the request is being handled: reads from
/// here on are its body (or the watch for a departing client).
pub(crate) fn request_started() {
    let _ = CONN.try_with(|c| c.in_request.store(true, Ordering::Release));
}

/// The request was answered: the next read waits for a new head.
pub(crate) fn request_finished() {
    let _ = CONN.try_with(|c| {
        c.in_request.store(false, Ordering::Release);
        c.finished.fetch_add(1, Ordering::AcqRel);
    });
}

/// A [`ServerApp`] that guards the HTTP/1 connections of the app it wraps.
pub(crate) struct Listener<A, P> {
    app: Arc<A>,
    policy: Arc<P>,
    /// Cancelled when a graceful stop begins.
    draining: CancellationToken,
}

impl<A, P> Listener<A, P> {
    pub(crate) fn new(app: A, policy: P, draining: CancellationToken) -> Listener<A, P> {
        Listener {
            app: Arc::new(app),
            policy: Arc::new(policy),
            draining,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static, P: ListenerPolicy> ServerApp for Listener<A, P> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.policy.limits();
        let deadline = Instant::now() + limits.head_timeout;
        // The HTTP stack first peeks for the HTTP/2 preface, waiting for all
        // of its 24 bytes without a deadline; peek here, bounded.
        // A new connection is served during a graceful stop too (its answer
        // says `Connection: close`): in a pod it is the application's last
        // requests. Only connections idle between requests are closed.
        let mut preface = [0u8; 24];
        match tokio::time::timeout_at(deadline, stream.try_peek(&mut preface)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return None,
            Err(_elapsed) => {
                // Part of a request in all that time is a slow head; nothing
                // at all is an idle connection, closed without a word.
                if preface.iter().any(|&b| b != 0) {
                    self.policy.refused(Refusal::HeadTimeout);
                    refuse(&mut stream, Refusal::HeadTimeout).await;
                }
                return None;
            }
        }
        if &preface == H2_PREFACE {
            return self.app.process_new(stream, shutdown).await;
        }
        let conn = Arc::new(ConnState::default());
        let policy: Arc<dyn ListenerPolicy> = self.policy.clone();
        let guarded = Guarded {
            inner: stream,
            conn: Arc::clone(&conn),
            policy,
            limits,
            epoch: 0,
            head: HeadScan::default(),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            draining: self.draining.clone(),
            drain_wait: None,
            refusing: None,
        };
        CONN.scope(conn, self.app.process_new(Box::new(guarded), shutdown))
            .await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// Write a refusal on a connection nothing else has read from yet.
async fn refuse(stream: &mut Stream, why: Refusal) {
    use tokio::io::AsyncWriteExt;
    let write = async {
        stream.write_all(why.response()).await?;
        stream.flush().await
    };
    // A client that does not read its refusal does not hold the connection.
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Counts a head as it arrives: bytes and lines up to its end (the first
/// empty line after the request line).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct HeadScan {
    bytes: usize,
    /// Complete non-empty lines: the request line and the header fields.
    lines: usize,
    /// Bytes of the current line so far.
    line_len: usize,
    /// The current line so far ends in `\r`.
    last_cr: bool,
    complete: bool,
}

impl HeadScan {
    /// Take the next bytes read. Bytes after the head's end are not looked at.
    pub(crate) fn feed(&mut self, data: &[u8], limits: &HeadLimits) -> Result<(), Refusal> {
        if self.complete {
            return Ok(());
        }
        let mut at = 0;
        for nl in memchr::memchr_iter(b'\n', data) {
            let seg = &data[at..nl];
            let cr = seg.last().map_or(self.last_cr, |&b| b == b'\r');
            let len = self.line_len.saturating_add(seg.len());
            at = nl + 1;
            self.line_len = 0;
            self.last_cr = false;
            if len == 0 || (len == 1 && cr) {
                // Empty lines before the request line are ignored, as the
                // HTTP/1 parser does; the first one after it ends the head.
                if self.lines > 0 {
                    self.complete = true;
                    self.bytes = self.bytes.saturating_add(at);
                    return self.check(limits);
                }
                continue;
            }
            self.lines = self.lines.saturating_add(1);
            if self.lines > limits.max_headers.saturating_add(1) {
                return Err(Refusal::HeadTooLarge);
            }
        }
        let rest = &data[at..];
        if let Some(&last) = rest.last() {
            self.line_len = self.line_len.saturating_add(rest.len());
            self.last_cr = last == b'\r';
        }
        self.bytes = self.bytes.saturating_add(data.len());
        self.check(limits)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn lines(&self) -> usize {
        self.lines
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.complete
    }

    fn check(&self, limits: &HeadLimits) -> Result<(), Refusal> {
        if self.bytes > limits.max_bytes {
            Err(Refusal::HeadTooLarge)
        } else {
            Ok(())
        }
    }
}

/// An HTTP/1 client connection with its request heads bounded.
pub(crate) struct Guarded {
    inner: Stream,
    conn: Arc<ConnState>,
    policy: Arc<dyn ListenerPolicy>,
    limits: HeadLimits,
    /// `conn.finished` when the current head began.
    epoch: u64,
    head: HeadScan,
    /// The current head's deadline (before its first byte: the idle one).
    timer: Pin<Box<Sleep>>,
    draining: CancellationToken,
    drain_wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// A refusal being written: why, and how much of it went out.
    refusing: Option<(Refusal, usize)>,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

impl Guarded {
    fn start_refusal(&mut self, why: Refusal) {
        self.policy.refused(why);
        self.refusing = Some((why, 0));
    }

    /// Write the refusal, then end the connection with an error.
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((why, written)) = self.refusing.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let response = why.response();
        while *written < response.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &response[*written..]) {
                Poll::Ready(Ok(n)) if n > 0 => *written += n,
                Poll::Ready(_) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        if Pin::new(&mut self.inner).poll_flush(cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request head refused: {}", why.label()),
        )))
    }

    /// Before a head's first byte: closed when a graceful stop begins.
    fn drain_started(&mut self, cx: &mut Context<'_>) -> bool {
        let draining = &self.draining;
        self.drain_wait
            .get_or_insert_with(|| Box::pin(draining.clone().cancelled_owned()))
            .as_mut()
            .poll(cx)
            .is_ready()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refusing.is_some() {
            return this.poll_refuse(cx);
        }
        if this.conn.in_request.load(Ordering::Acquire) {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let finished = this.conn.finished.load(Ordering::Acquire);
        if finished != this.epoch {
            // A request was answered: wait (idle) for the next head.
            this.epoch = finished;
            this.head = HeadScan::default();
            this.timer
                .as_mut()
                .reset(Instant::now() + this.limits.idle_timeout);
        }
        if this.head.complete {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                if this.head.bytes == 0 && this.epoch > 0 {
                    // The first byte of a head after an idle wait.
                    this.timer
                        .as_mut()
                        .reset(Instant::now() + this.limits.head_timeout);
                }
                if let Err(why) = this.head.feed(new, &this.limits) {
                    // None of it goes to the HTTP stack.
                    buf.set_filled(before);
                    this.start_refusal(why);
                    return this.poll_refuse(cx);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let idle = this.head.bytes == 0;
                if idle && this.drain_started(cx) {
                    return Poll::Ready(Ok(()));
                }
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if idle {
                    // Idle too long between requests: closed, no answer owed.
                    return Poll::Ready(Ok(()));
                }
                this.start_refusal(Refusal::HeadTimeout);
                this.poll_refuse(cx)
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_bytes: usize, max_headers: usize) -> HeadLimits {
        HeadLimits {
            head_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_bytes,
            max_headers,
        }
    }

    fn scan(pieces: &[&[u8]], l: &HeadLimits) -> Result<HeadScan, Refusal> {
        let mut s = HeadScan::default();
        for p in pieces {
            s.feed(p, l)?;
        }
        Ok(s)
    }

    #[test]
    fn finds_the_end_of_a_head_however_it_is_split() {
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        let l = limits(1024, 10);
        for split in 1..head.len() {
            let s = scan(&[&head[..split], &head[split..]], &l).unwrap();
            assert!(s.complete, "split at {split}");
            assert_eq!(s.lines, 3);
            assert_eq!(s.bytes, head.len() - 2, "the body is not counted");
        }
        // Bare line feeds, and empty lines before the request line.
        let s = scan(&[b"\r\n\nGET / HTTP/1.1\nHost: x\n\n"], &l).unwrap();
        assert!(s.complete && s.lines == 2);
    }

    #[test]
    fn counts_bytes_and_lines_against_the_limits() {
        let l = limits(64, 2);
        assert!(scan(&[b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\n\r\n"], &l).is_ok());
        assert_eq!(
            scan(&[b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n"], &l),
            Err(Refusal::HeadTooLarge)
        );
        let long = [b'x'; 65];
        assert_eq!(
            scan(&[b"GET / HTTP/1.1\r\nx: ", &long], &l),
            Err(Refusal::HeadTooLarge)
        );
        // A body full of line breaks after a small head is not a large head.
        let mut req = b"POST / HTTP/1.1\r\nContent-Length: 400\r\n\r\n".to_vec();
        req.extend(std::iter::repeat_n(b'\n', 400));
        assert!(scan(&[&req], &l).unwrap().complete);
    }

    #[test]
    fn canned_responses_are_well_framed() {
        for r in [RESPONSE_408, RESPONSE_431] {
            let text = std::str::from_utf8(r).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(length, body.len(), "{head}");
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert!(v["error"]["code"].is_string());
        }
    }
}
