//! An OpenAI-compatible mock provider for Collie's tests, its demo and
//! benchmarks (`collie mock`): chat, completions, embeddings and responses,
//! streamed or not, scriptable per request (status, delay, `Retry-After`,
//! hang, mid-stream break), with recording and counters for assertions. It
//! lives outside the gateway's library: nothing here ships in the request
//! path.
//!
//! Usage is deterministic so tests can predict it: `prompt_tokens =
//! ceil(request body bytes / 4)`, `completion_tokens = chunks` (the number of
//! content words), `total = prompt + completion`. Ids and timestamps are
//! fixed, so the same request gets the same bytes back.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::rustls;

const CREATED: u64 = 1_700_000_000;

/// How the mock answers one request.
#[derive(Clone, Debug)]
pub struct Behavior {
    /// 200 by default; anything else answers with an OpenAI error body.
    pub status: u16,
    /// Wait before the response head.
    pub delay: Duration,
    /// A `Retry-After` header value to send.
    pub retry_after: Option<String>,
    /// Read the request and never answer.
    pub hang: bool,
    /// Read the request, then close the connection without an answer.
    pub reset: bool,
    /// Content words (streamed: content events).
    pub chunks: usize,
    /// Gap between streamed content events.
    pub chunk_interval: Duration,
    /// Streaming: abort the connection after this many content events.
    pub break_after: Option<usize>,
    /// Replaces the whole response body.
    pub body: Option<Bytes>,
    /// Extra response headers (name, value).
    pub headers: Vec<(String, String)>,
    /// A body that never ends: after the head (and, with a 2xx, the whole
    /// answer), one space per interval.
    pub trickle: Option<Duration>,
    /// Send `body` as an SSE stream, cut into pieces of this many bytes
    /// (boundaries fall anywhere, as on a real network).
    pub sse_pieces: Option<usize>,
    /// Report no usage, even when the request asks for it.
    pub no_usage: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            status: 200,
            delay: Duration::ZERO,
            retry_after: None,
            hang: false,
            reset: false,
            chunks: 5,
            chunk_interval: Duration::ZERO,
            break_after: None,
            body: None,
            headers: Vec::new(),
            trickle: None,
            sse_pieces: None,
            no_usage: false,
        }
    }
}

impl Behavior {
    /// 200 with five content words: the default answer.
    pub fn ok() -> Self {
        Behavior::default()
    }
    /// Answer with `status`; anything but 2xx sends an OpenAI error body.
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
    /// Send `Retry-After: v`.
    pub fn retry_after(mut self, v: &str) -> Self {
        self.retry_after = Some(v.to_string());
        self
    }
    /// Wait `d` before the response head.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    /// Read the request and never answer.
    pub fn hang(mut self) -> Self {
        self.hang = true;
        self
    }
    /// Read the request, then close the connection without an answer.
    pub fn reset(mut self) -> Self {
        self.reset = true;
        self
    }
    /// Answer with `n` content words (streamed: `n` content events), which
    /// is also the completion tokens reported.
    pub fn chunks(mut self, n: usize) -> Self {
        self.chunks = n;
        self
    }
    /// Wait `d` between streamed content events.
    pub fn interval(mut self, d: Duration) -> Self {
        self.chunk_interval = d;
        self
    }
    /// Streaming: abort the connection after `n` content events.
    pub fn break_after(mut self, n: usize) -> Self {
        self.break_after = Some(n);
        self
    }
    /// Send `b` as the response body instead of the generated answer or error.
    pub fn body(mut self, b: impl Into<Bytes>) -> Self {
        self.body = Some(b.into());
        self
    }
    /// Add the response header `k: v`.
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    /// Stream `body` (an SSE transcript) in pieces of `piece` bytes.
    pub fn sse(mut self, body: impl Into<Bytes>, piece: usize) -> Self {
        self.body = Some(body.into());
        self.sse_pieces = Some(piece.max(1));
        self
    }
    /// Send the head (with a 2xx, the whole JSON answer too), then one space
    /// per `every`, never ending: JSON that is complete, a response that is not.
    pub fn trickle(mut self, every: Duration) -> Self {
        self.trickle = Some(every);
        self
    }
    /// Report no usage, even when the request asks for it.
    pub fn no_usage(mut self) -> Self {
        self.no_usage = true;
        self
    }
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `GET`, `POST`, …
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The request body as received.
    pub body: Bytes,
}

/// Serve HTTPS with this certificate.
pub struct MockTls {
    /// The certificate chain, PEM.
    pub cert_chain_pem: String,
    /// The certificate's private key, PEM.
    pub key_pem: String,
    /// Offer `h2` in ALPN besides `http/1.1`.
    pub alpn_h2: bool,
}

/// How to start a [`MockServer`].
pub struct MockConfig {
    /// Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Serve HTTPS; `None`: plain HTTP.
    pub tls: Option<MockTls>,
    /// Accept HTTP/2 with prior knowledge on plain TCP.
    pub h2c: bool,
    /// How to answer a request nothing else scripts (see
    /// [`MockServer::push`] and [`MockServer::set_model_behavior`]).
    pub default: Behavior,
    /// Keep every request for [`MockServer::requests`]; counters are always on.
    pub record: bool,
    /// Embedding dimensions.
    pub dims: usize,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            h2c: true,
            default: Behavior::default(),
            record: true,
            dims: 8,
        }
    }
}

#[derive(Default)]
struct Shared {
    default: Mutex<Behavior>,
    queue: Mutex<VecDeque<Behavior>>,
    per_model: Mutex<HashMap<String, Behavior>>,
    recorded: Mutex<Vec<Recorded>>,
    record: bool,
    dims: usize,
    requests: AtomicUsize,
    completions: AtomicUsize,
    cancellations: AtomicUsize,
    finished: AtomicUsize,
    /// Endless error bodies still being sent.
    trickling: AtomicUsize,
    /// Requests whose client went away while the mock was still waiting to
    /// answer (a delay or a hang).
    abandoned: AtomicUsize,
    /// The server name (SNI) each TLS client asked for.
    server_names: Mutex<Vec<String>>,
}

/// A lock that survives a panicking test thread.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running mock provider; stops serving when dropped.
pub struct MockServer {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl MockServer {
    /// Bind and start serving; returns once the port is bound.
    pub async fn start(cfg: MockConfig) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let acceptor = match &cfg.tls {
            Some(t) => Some(tls_acceptor(t)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            default: Mutex::new(cfg.default),
            record: cfg.record,
            dims: cfg.dims.max(1),
            ..Shared::default()
        });
        let h2c = cfg.h2c;
        let state = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) drops every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (tcp, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        log::warn!("mock accept failed: {e}");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let state = Arc::clone(&state);
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    match acceptor {
                        Some(a) => match a.accept(tcp).await {
                            Ok(s) => {
                                let sni = s.get_ref().1.server_name().unwrap_or("").to_string();
                                lock(&state.server_names).push(sni);
                                serve(s, state, true).await
                            }
                            Err(e) => log::debug!("mock TLS handshake failed: {e}"),
                        },
                        None => serve(tcp, state, h2c).await,
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(MockServer {
            addr,
            tls: cfg.tls.is_some(),
            shared,
            accept: Some(accept),
        })
    }

    /// The address it listens on (the port picked, when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Endless error bodies (`Behavior::trickle`) still being sent.
    pub fn trickling(&self) -> usize {
        self.shared.trickling.load(Ordering::SeqCst)
    }

    /// The server name (SNI) of each TLS connection, in order; empty when a
    /// client sent none.
    pub fn tls_server_names(&self) -> Vec<String> {
        lock(&self.shared.server_names).clone()
    }

    /// `http://127.0.0.1:PORT/v1`, or `https://localhost:PORT/v1` with TLS.
    pub fn base_url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}/v1", self.addr.port())
        } else {
            format!("http://{}/v1", self.addr)
        }
    }

    /// Answer every request nothing else scripts this way from now on.
    pub fn set_default(&self, b: Behavior) {
        *lock(&self.shared.default) = b;
    }

    /// Answer the next request this way (first in, first out).
    pub fn push(&self, b: Behavior) {
        lock(&self.shared.queue).push_back(b);
    }

    /// Answer requests for `model` this way, unless a pushed behaviour is
    /// waiting.
    pub fn set_model_behavior(&self, model: &str, b: Behavior) {
        lock(&self.shared.per_model).insert(model.to_string(), b);
    }

    /// The requests received so far, oldest first (kept only when
    /// [`MockConfig::record`] is set, as it is by default).
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.recorded).clone()
    }

    /// Requests received, on any path.
    pub fn request_count(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// POSTs to chat, completions, embeddings or responses.
    pub fn completion_calls(&self) -> usize {
        self.shared.completions.load(Ordering::SeqCst)
    }

    /// Streams whose client went away before the mock finished sending.
    pub fn stream_cancellations(&self) -> usize {
        self.shared.cancellations.load(Ordering::SeqCst)
    }

    /// Requests whose client left before the response head was sent.
    pub fn abandoned(&self) -> usize {
        self.shared.abandoned.load(Ordering::SeqCst)
    }

    /// Streams sent to their end.
    pub fn streams_finished(&self) -> usize {
        self.shared.finished.load(Ordering::SeqCst)
    }

    /// Forget the recorded requests and pushed behaviours and zero the
    /// counters; the default and per-model behaviours, [`Self::trickling`]
    /// and the TLS server names stay.
    pub fn clear(&self) {
        lock(&self.shared.recorded).clear();
        lock(&self.shared.queue).clear();
        for c in [
            &self.shared.requests,
            &self.shared.completions,
            &self.shared.cancellations,
            &self.shared.finished,
            &self.shared.abandoned,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }

    /// Stop accepting and close every connection; returns once the accept
    /// loop has ended.
    pub async fn shutdown(mut self) {
        if let Some(t) = self.accept.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(t) = self.accept.take() {
            t.abort();
        }
    }
}

fn tls_acceptor(t: &MockTls) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let certs =
        rustls_pemfile::certs(&mut t.cert_chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut t.key_pem.as_bytes())?
        .ok_or_else(|| bad("no private key in PEM".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(e.to_string()))?;
    config.alpn_protocols = if t.alpn_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn serve<S>(stream: S, shared: Arc<Shared>, allow_h2: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(req, Arc::clone(&shared)));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if !allow_h2 {
        builder = builder.http1_only();
    }
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
        log::debug!("mock connection ended: {e}");
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Models,
}

fn kind(method: &http::Method, path: &str) -> Option<Kind> {
    let p = path.trim_end_matches('/');
    let k = if p.ends_with("/v1/chat/completions") {
        Kind::Chat
    } else if p.ends_with("/v1/completions") {
        Kind::Completions
    } else if p.ends_with("/v1/embeddings") {
        Kind::Embeddings
    } else if p.ends_with("/v1/responses") {
        Kind::Responses
    } else if p.ends_with("/v1/models") {
        Kind::Models
    } else {
        return None;
    };
    let expected = if k == Kind::Models {
        http::Method::GET
    } else {
        http::Method::POST
    };
    (method == expected).then_some(k)
}

/// `Err` closes the connection without a response (the `reset` behaviour).
async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(plain(400, "unreadable body")),
    };
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if shared.record {
        lock(&shared.recorded).push(Recorded {
            method: parts.method.to_string(),
            path: path.clone(),
            version: format!("{:?}", parts.version),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        });
    }
    let Some(kind) = kind(&parts.method, parts.uri.path()) else {
        return Ok(error_response(
            404,
            "unknown endpoint",
            &Behavior::default(),
        ));
    };
    let request: Value = if kind == Kind::Models {
        Value::Null
    } else {
        shared.completions.fetch_add(1, Ordering::SeqCst);
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    let model = request["model"]
        .as_str()
        .unwrap_or("mock-model")
        .to_string();
    let mut b = if kind == Kind::Models {
        lock(&shared.default).clone()
    } else {
        let queued = lock(&shared.queue).pop_front();
        match queued {
            Some(b) => b,
            None => {
                let per_model = lock(&shared.per_model).get(&model).cloned();
                per_model.unwrap_or_else(|| lock(&shared.default).clone())
            }
        }
    };
    apply_overrides(&mut b, &parts.headers);

    // The server drops this handler when its client goes away; the guard
    // counts a wait that never finished.
    let waiting = Waiting(Some(Arc::clone(&shared)));
    if !b.delay.is_zero() {
        tokio::time::sleep(b.delay).await;
    }
    if b.hang {
        std::future::pending::<()>().await;
    }
    waiting.done();
    if b.reset {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "mock: reset before the response head",
        ));
    }
    if let (Some(every), false) = (b.trickle, (200..300).contains(&b.status)) {
        return Ok(trickle_response(&b, every, Bytes::new(), shared));
    }
    if !(200..300).contains(&b.status) {
        return Ok(error_response(b.status, "mock error", &b));
    }
    if let (Some(body), Some(piece)) = (&b.body, b.sse_pieces) {
        let pieces = body
            .chunks(piece)
            .map(|c| (true, Bytes::copy_from_slice(c)))
            .collect();
        return Ok(stream_response(&b, pieces, shared));
    }
    if let Some(body) = &b.body {
        return Ok(finish(
            Response::builder().status(b.status),
            &b,
            "application/json",
            full(body.clone()),
        ));
    }
    let prompt = (body.len() as u64).div_ceil(4);
    let stream = request["stream"].as_bool().unwrap_or(false);
    let include_usage = request["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false)
        && !b.no_usage;
    let answer = Gen {
        model,
        prompt,
        completion: b.chunks as u64,
        no_usage: b.no_usage,
    };
    let answers = matches!(kind, Kind::Chat | Kind::Completions | Kind::Responses);
    if let (Some(every), false, true) = (b.trickle, stream, answers) {
        let whole = serde_json::to_vec(&answer.whole(kind)).unwrap_or_default();
        return Ok(trickle_response(&b, every, Bytes::from(whole), shared));
    }
    let resp = match (kind, stream) {
        (Kind::Models, _) => json_response(
            &b,
            &json!({"object": "list", "data": [
            {"id": "mock-model", "object": "model", "created": CREATED, "owned_by": "mock"}]}),
        ),
        (Kind::Embeddings, _) => {
            json_response(&b, &answer.embeddings(&request["input"], shared.dims))
        }
        (Kind::Chat | Kind::Completions | Kind::Responses, false) => {
            json_response(&b, &answer.whole(kind))
        }
        (_, true) => {
            let events = answer.events(kind, include_usage);
            stream_response(&b, events, shared)
        }
    };
    Ok(resp)
}

/// Counts a request abandoned while the mock waited to answer it.
struct Waiting(Option<Arc<Shared>>);

impl Waiting {
    fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(shared) = &self.0 {
            shared.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The `x-mock-*` request headers, for `collie mock --help` (kept next to
/// [`apply_overrides`], which reads them).
pub const HEADERS_HELP: &str = "\
Request headers that change one answer (for tests and benchmarks):
  x-mock-status: N          answer with status N (not 2xx: an OpenAI error body)
  x-mock-delay-ms: MS       wait MS milliseconds before the response head
  x-mock-chunks: N          N content words (streamed: N content events)
  x-mock-interval-ms: MS    MS milliseconds between streamed content events
  x-mock-no-usage: 1        report no usage, even when the request asks for it
  x-mock-break-after: N     streaming: abort the connection after N content events
  x-mock-retry-after: V     send `Retry-After: V`
  x-mock-hang: 1            read the request and never answer
  x-mock-reset: 1           read the request, then close the connection without an answer
  x-mock-trickle-ms: MS     send the head (a 2xx: the whole answer too), then one space
                            every MS milliseconds, never ending";

/// Per-request scripting through `x-mock-*` headers, so the mock run as a
/// command can produce every failure the in-process API can.
fn apply_overrides(b: &mut Behavior, h: &http::HeaderMap) {
    let num = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(s) = num("x-mock-status").and_then(|s| u16::try_from(s).ok()) {
        b.status = s;
    }
    if let Some(ms) = num("x-mock-delay-ms") {
        b.delay = Duration::from_millis(ms);
    }
    if let Some(n) = num("x-mock-chunks") {
        b.chunks = usize::try_from(n).unwrap_or(b.chunks);
    }
    if num("x-mock-no-usage").is_some_and(|n| n > 0) {
        b.no_usage = true;
    }
    if let Some(ms) = num("x-mock-interval-ms") {
        b.chunk_interval = Duration::from_millis(ms);
    }
    if let Some(n) = num("x-mock-break-after") {
        b.break_after = usize::try_from(n).ok();
    }
    if let Some(v) = h.get("x-mock-retry-after").and_then(|v| v.to_str().ok()) {
        b.retry_after = Some(v.to_string());
    }
    if h.contains_key("x-mock-hang") {
        b.hang = true;
    }
    if h.contains_key("x-mock-reset") {
        b.reset = true;
    }
    if let Some(ms) = num("x-mock-trickle-ms") {
        b.trickle = Some(Duration::from_millis(ms.max(1)));
    }
}

/// Response generator for one request.
struct Gen {
    model: String,
    prompt: u64,
    completion: u64,
    no_usage: bool,
}

impl Gen {
    fn usage(&self) -> Value {
        if self.no_usage {
            return Value::Null;
        }
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.completion,
               "total_tokens": self.prompt + self.completion})
    }

    fn responses_usage(&self) -> Value {
        if self.no_usage {
            return Value::Null;
        }
        json!({"input_tokens": self.prompt, "output_tokens": self.completion,
               "total_tokens": self.prompt + self.completion})
    }

    fn text(&self) -> String {
        (0..self.completion).map(|i| format!("tok{i} ")).collect()
    }

    fn whole(&self, kind: Kind) -> Value {
        match kind {
            Kind::Chat => json!({
                "id": "chatcmpl-mock", "object": "chat.completion", "created": CREATED, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text()},
                             "logprobs": null, "finish_reason": "stop"}],
                "usage": self.usage()}),
            Kind::Completions => json!({
                "id": "cmpl-mock", "object": "text_completion", "created": CREATED, "model": self.model,
                "choices": [{"index": 0, "text": self.text(), "logprobs": null, "finish_reason": "stop"}],
                "usage": self.usage()}),
            _ => self.response_object("completed"),
        }
    }

    fn response_object(&self, status: &str) -> Value {
        let done = status == "completed";
        json!({
            "id": "resp_mock", "object": "response", "created_at": CREATED, "model": self.model, "status": status,
            "output": if done { json!([{"type": "message", "id": "msg_mock", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": self.text(), "annotations": []}]}]) } else { json!([]) },
            "usage": if done { self.responses_usage() } else { Value::Null }})
    }

    fn embeddings(&self, input: &Value, dims: usize) -> Value {
        let n = match input {
            Value::Array(items) => items.len().max(1),
            _ => 1,
        };
        let data: Vec<Value> = (0..n)
            .map(|i| {
                let v: Vec<f64> = (0..dims)
                    .map(|d| ((i * dims + d) % 97) as f64 / 100.0)
                    .collect();
                json!({"object": "embedding", "index": i, "embedding": v})
            })
            .collect();
        json!({"object": "list", "data": data, "model": self.model,
               "usage": {"prompt_tokens": self.prompt, "total_tokens": self.prompt}})
    }

    /// The SSE events of a stream; content events are marked for pacing.
    fn events(&self, kind: Kind, include_usage: bool) -> Vec<(bool, Bytes)> {
        let mut out = Vec::new();
        let data = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
        match kind {
            Kind::Responses => {
                let ev =
                    |name: &str, v: Value| Bytes::from(format!("event: {name}\ndata: {v}\n\n"));
                out.push((false, ev("response.created", json!({"type": "response.created", "response": self.response_object("in_progress")}))));
                for i in 0..self.completion {
                    out.push((true, ev("response.output_text.delta",
                        json!({"type": "response.output_text.delta", "item_id": "msg_mock", "output_index": 0,
                               "content_index": 0, "delta": format!("tok{i} ")}))));
                }
                out.push((false, ev("response.completed", json!({"type": "response.completed", "response": self.response_object("completed")}))));
                return out;
            }
            Kind::Chat => {
                let chunk = |choice: Value| {
                    let mut v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED,
                                       "model": self.model, "choices": [choice]});
                    if include_usage {
                        v["usage"] = Value::Null;
                    }
                    v
                };
                out.push((false, data(&chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null})))));
                for i in 0..self.completion {
                    out.push((true, data(&chunk(json!({"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null})))));
                }
                out.push((
                    false,
                    data(&chunk(
                        json!({"index": 0, "delta": {}, "finish_reason": "stop"}),
                    )),
                ));
                if include_usage {
                    out.push((false, data(&json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED,
                                                  "model": self.model, "choices": [], "usage": self.usage()}))));
                }
            }
            _ => {
                let chunk = |text: String, finish: Value| {
                    let mut v = json!({"id": "cmpl-mock", "object": "text_completion", "created": CREATED, "model": self.model,
                                       "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]});
                    if include_usage {
                        v["usage"] = Value::Null;
                    }
                    v
                };
                for i in 0..self.completion {
                    out.push((true, data(&chunk(format!("tok{i} "), Value::Null))));
                }
                out.push((false, data(&chunk(String::new(), json!("stop")))));
                if include_usage {
                    out.push((false, data(&json!({"id": "cmpl-mock", "object": "text_completion", "created": CREATED,
                                                  "model": self.model, "choices": [], "usage": self.usage()}))));
                }
            }
        }
        out.push((false, Bytes::from_static(b"data: [DONE]\n\n")));
        out
    }
}

/// Counts a stream that was dropped before its end as cancelled.
struct StreamGuard {
    shared: Arc<Shared>,
    done: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.done {
            self.shared.cancellations.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn stream_response(
    b: &Behavior,
    events: Vec<(bool, Bytes)>,
    shared: Arc<Shared>,
) -> Response<Body> {
    struct St {
        events: std::vec::IntoIter<(bool, Bytes)>,
        sent_content: usize,
        interval: Duration,
        break_after: Option<usize>,
        guard: StreamGuard,
    }
    let st = St {
        events: events.into_iter(),
        sent_content: 0,
        interval: b.chunk_interval,
        break_after: b.break_after,
        guard: StreamGuard {
            shared,
            done: false,
        },
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        if st.guard.done {
            return None;
        }
        let Some((content, bytes)) = st.events.next() else {
            st.guard.done = true;
            st.guard.shared.finished.fetch_add(1, Ordering::SeqCst);
            return None;
        };
        if content {
            if st.break_after == Some(st.sent_content) {
                // A broken stream, not a cancelled one. Pause first so that
                // what was sent so far reaches the client before the cut.
                st.guard.done = true;
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Some((
                    Err(std::io::Error::other("mock: stream broken on purpose")),
                    st,
                ));
            }
            if st.sent_content > 0 && !st.interval.is_zero() {
                tokio::time::sleep(st.interval).await;
            }
            st.sent_content += 1;
        }
        Some((Ok(Frame::data(bytes)), st))
    });
    let body = BodyExt::boxed(StreamBody::new(stream));
    finish(
        Response::builder()
            .status(b.status)
            .header("cache-control", "no-cache"),
        b,
        "text/event-stream",
        body,
    )
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

fn json_response(b: &Behavior, v: &Value) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(v).unwrap_or_default());
    finish(
        Response::builder().status(b.status),
        b,
        "application/json",
        full(bytes),
    )
}

/// Counts an endless error body while its connection is open.
struct Trickling(Arc<Shared>);

impl Drop for Trickling {
    fn drop(&mut self) {
        self.0.trickling.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The head and `first`, then one byte per `every` until the client goes away.
fn trickle_response(
    b: &Behavior,
    every: Duration,
    first: Bytes,
    shared: Arc<Shared>,
) -> Response<Body> {
    shared.trickling.fetch_add(1, Ordering::SeqCst);
    let guard = Trickling(shared);
    let first = (!first.is_empty()).then_some(first);
    let stream = futures::stream::unfold((guard, first), move |(guard, first)| async move {
        if let Some(f) = first {
            return Some((Ok(Frame::data(f)), (guard, None)));
        }
        tokio::time::sleep(every).await;
        Some((Ok(Frame::data(Bytes::from_static(b" "))), (guard, None)))
    });
    finish(
        Response::builder().status(b.status),
        b,
        "application/json",
        BodyExt::boxed(StreamBody::new(stream)),
    )
}

fn error_response(status: u16, message: &str, b: &Behavior) -> Response<Body> {
    let (kind, code) = match status {
        429 => ("rate_limit_error", "rate_limit_exceeded"),
        400..=499 => ("invalid_request_error", "bad_request"),
        _ => ("server_error", "server_error"),
    };
    let v = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let bytes = match &b.body {
        Some(scripted) => scripted.clone(),
        None => Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
    };
    finish(
        Response::builder().status(status),
        b,
        "application/json",
        full(bytes),
    )
}

fn finish(
    builder: http::response::Builder,
    b: &Behavior,
    content_type: &str,
    body: Body,
) -> Response<Body> {
    let mut builder = builder.header("content-type", content_type);
    if let Some(ra) = &b.retry_after {
        builder = builder.header("retry-after", ra.as_str());
    }
    for (k, v) in &b.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    builder
        .body(body)
        .unwrap_or_else(|_| plain(500, "bad mock response"))
}

fn plain(status: u16, text: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// `collie mock`: run a mock provider from the command line.
#[derive(clap::Args, Debug)]
pub struct MockArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9101")]
    pub listen: SocketAddr,
    /// Status of every answer.
    #[arg(long, default_value_t = 200)]
    pub status: u16,
    /// Delay before the response head, in milliseconds (a provider's latency).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Content words per answer (streamed: content events).
    #[arg(long, default_value_t = 5)]
    pub chunks: usize,
    /// Milliseconds between streamed content events.
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// `Retry-After` value sent with every answer.
    #[arg(long)]
    pub retry_after: Option<String>,
    /// Dimensions of each embedding vector.
    #[arg(long, default_value_t = 8)]
    pub dims: usize,
    /// PEM certificate chain: serve HTTPS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Refuse cleartext HTTP/2.
    #[arg(long)]
    pub no_h2c: bool,
    /// Keep every request in memory (for debugging).
    #[arg(long)]
    pub record: bool,
}

/// Serve as `args` says until Ctrl-C.
pub async fn run(args: MockArgs) -> std::io::Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(MockTls {
            cert_chain_pem: std::fs::read_to_string(c)?,
            key_pem: std::fs::read_to_string(k)?,
            alpn_h2: !args.no_h2c,
        }),
        _ => None,
    };
    let mut default = Behavior::default()
        .status(args.status)
        .delay(Duration::from_millis(args.delay_ms))
        .chunks(args.chunks)
        .interval(Duration::from_millis(args.interval_ms));
    default.retry_after = args.retry_after.clone();
    let server = MockServer::start(MockConfig {
        listen: args.listen,
        tls,
        h2c: !args.no_h2c,
        default,
        record: args.record,
        dims: args.dims,
    })
    .await?;
    log::info!("mock provider listening on {}", server.base_url());
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start(b: Behavior) -> MockServer {
        MockServer::start(MockConfig {
            default: b,
            ..MockConfig::default()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn chat_echoes_model_with_predictable_usage() {
        let m = start(Behavior::default().chunks(3)).await;
        let body = r#"{"model":"x-1","messages":[]}"#;
        let v: Value = reqwest::Client::new()
            .post(format!("{}/chat/completions", m.base_url()))
            .body(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["model"], "x-1");
        assert_eq!(v["usage"]["prompt_tokens"], (body.len() as u64).div_ceil(4));
        assert_eq!(v["usage"]["completion_tokens"], 3);
        assert_eq!(m.completion_calls(), 1);
    }

    #[tokio::test]
    async fn scripted_answers_then_default() {
        let m = start(Behavior::default()).await;
        m.push(Behavior::default().status(429).retry_after("2"));
        let c = reqwest::Client::new();
        let url = format!("{}/chat/completions", m.base_url());
        let r = c.post(&url).body("{}").send().await.unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(c.post(&url).body("{}").send().await.unwrap().status(), 200);
        m.set_model_behavior("bad", Behavior::default().status(503));
        let r = c
            .post(&url)
            .body(r#"{"model":"bad"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }

    #[tokio::test]
    async fn streams_with_and_without_usage() {
        let m = start(Behavior::default().chunks(2)).await;
        let c = reqwest::Client::new();
        let url = format!("{}/chat/completions", m.base_url());
        let text = |b: &'static str| {
            let c = c.clone();
            let url = url.clone();
            async move {
                c.post(&url)
                    .body(b)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
            }
        };
        let plain = text(r#"{"model":"m","stream":true}"#).await;
        assert_eq!(plain.matches("data: ").count(), 5);
        assert!(!plain.contains("usage"));
        let with =
            text(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#).await;
        assert_eq!(with.matches("data: ").count(), 6);
        assert!(
            with.contains(r#""choices":[],"#) && with.contains(r#""usage":{"completion_tokens":2"#)
        );
        assert!(with.ends_with("data: [DONE]\n\n"));
        assert_eq!(m.streams_finished(), 2);
    }

    #[tokio::test]
    async fn broken_stream_is_an_error_for_the_client() {
        let m = start(Behavior::default().chunks(5).break_after(2)).await;
        let r = reqwest::Client::new()
            .post(format!("{}/chat/completions", m.base_url()))
            .body(r#"{"model":"m","stream":true}"#)
            .send()
            .await
            .unwrap();
        assert!(r.bytes().await.is_err());
        assert_eq!(m.stream_cancellations(), 0);
    }
}
