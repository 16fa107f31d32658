//! The request path: Pingora's `ProxyHttp` implementation. Every request is
//! answered from `request_filter` — admit, read, inspect, then the exchange
//! loop in [`exchange`] — and `logging` settles it (metrics) whatever happened.

pub(crate) mod admission;
pub mod body;
mod error;
pub mod exchange;
mod redact;
mod spend;

pub use admission::{Claimed, key_digest_hex};
pub use body::BodyBudget;
pub use error::GatewayError;
pub use redact::KeyMask;
pub use spend::Settlement;

use crate::metrics::Metrics;
use crate::server::Lifecycle;
use crate::state::{Snapshot, State};
use crate::usage::Usage;
use async_trait::async_trait;
use bytes::Bytes;
use exchange::Attempt;
use http::header;
use pingora::connectors::http::Connector;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub(crate) const X_COLLIE_MODEL: http::HeaderName = http::HeaderName::from_static("x-collie-model");
pub(crate) const X_COLLIE_ATTEMPTS: http::HeaderName =
    http::HeaderName::from_static("x-collie-attempts");
pub(crate) const X_COLLIE_REQUEST_ID: http::HeaderName =
    http::HeaderName::from_static("x-collie-request-id");
pub(crate) const X_COLLIE_ERROR: http::HeaderName = http::HeaderName::from_static("x-collie-error");

/// The OpenAI endpoints Collie serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Models,
    /// `GET /v1/collie/quota`: the tenant's own quota.
    Quota,
}

impl Endpoint {
    fn from_request(method: &http::Method, path: &str) -> Result<Endpoint, GatewayError> {
        let endpoint = match path.trim_end_matches('/') {
            "/v1/chat/completions" => Endpoint::ChatCompletions,
            "/v1/completions" => Endpoint::Completions,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/responses" => Endpoint::Responses,
            "/v1/models" => Endpoint::Models,
            "/v1/collie/quota" => Endpoint::Quota,
            _ => return Err(GatewayError::UnknownEndpoint(path.to_string())),
        };
        let expected = if matches!(endpoint, Endpoint::Models | Endpoint::Quota) {
            http::Method::GET
        } else {
            http::Method::POST
        };
        if method != expected {
            return Err(GatewayError::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_string(),
            });
        }
        Ok(endpoint)
    }

    /// The path after the deployment's base URL.
    pub fn upstream_suffix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
            Endpoint::Models => "/models",
            Endpoint::Quota => "/collie/quota",
        }
    }

    /// Whether `stream_options.include_usage` exists for this endpoint (the
    /// Responses API always reports usage in its final event).
    pub fn supports_stream_options(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }

    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Models => "models",
            Endpoint::Quota => "quota",
        }
    }
}

/// Everything known about one request, filled in as it goes and read by
/// `logging` at the end.
pub struct RequestCtx {
    pub id: String,
    pub started: Instant,
    /// Wall-clock start, for records.
    pub started_at: std::time::SystemTime,
    pub client_ip: Option<std::net::IpAddr>,
    /// The request body as the client sent it (shared, not copied), kept for
    /// the audit record's request hash.
    pub body: Option<Bytes>,
    pub snapshot: Arc<Snapshot>,
    pub endpoint: Endpoint,
    /// Index of the proven tenant.
    pub tenant: Option<usize>,
    /// Refused by authentication: the tenant `X-Tenant-ID` named (for the
    /// audit's security view; never billed).
    pub claimed_tenant: Option<Claimed>,
    pub requested_model: Option<String>,
    /// Index of the deployment whose response the client got.
    pub served: Option<usize>,
    pub attempts: Vec<Attempt>,
    /// (from, to) deployments when the request fell back along its chain.
    pub fallback: Option<(usize, usize)>,
    pub status: u16,
    /// Why Collie refused or failed the request itself.
    pub error: Option<&'static str>,
    pub usage: Option<Usage>,
    /// The usage was counted by Collie (e.g. from stream deltas), not reported.
    pub usage_estimated: bool,
    /// The quota window that refused the request (`day.tokens`, `minute.requests`…).
    pub refused_by: Option<String>,
    pub first_byte: Option<Instant>,
    pub streamed: bool,
    pub truncated: bool,
    /// Why the provider broke the response off mid-way (a short, fixed
    /// reason; never the provider's words).
    pub broken: Option<&'static str>,
    pub client_gone: bool,
    /// The tenant's priority (1 highest … 5), for queueing.
    pub priority: u8,
    /// Longest wait for a saturated pool.
    pub max_wait: std::time::Duration,
    /// Time spent waiting for a pool slot, if any.
    pub queued: Option<std::time::Duration>,
    /// Estimated prompt tokens and prompt + output reservation.
    pub prompt_estimate: u64,
    pub tokens_estimate: u64,
    /// Completion tokens delivered to the client, counted from the stream
    /// (used only when the upstream reported no usage).
    pub delivered_estimate: u64,
    /// The quota held by this request until `logging` settles it.
    pub reservation: Option<crate::quota::Reservation>,
    /// How the reservation was settled, once it was.
    pub settlement: Option<Settlement>,
    /// The first bytes of the response, when the audit keeps a preview.
    pub preview: Option<Vec<u8>>,
    /// The request body's share of the in-flight body budget.
    pub body_hold: Option<body::BodyHold>,
    /// Counts this request as in flight until the context is dropped.
    _in_flight: InFlightGuard,
}

/// Requests the gateway is working on, so a graceful stop can wait for them.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicU64>);

impl InFlight {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(Arc::clone(&self.0))
    }
}

/// Dropped with the request context, whichever way the request ended.
struct InFlightGuard(Arc<AtomicU64>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Gateway {
    pub state: Arc<State>,
    pub metrics: Arc<Metrics>,
    /// Shared with the tasks that drain failed attempts' bodies.
    pub connector: Arc<Connector>,
    /// The audit queue, when auditing is on.
    pub auditor: Option<crate::audit::Auditor>,
    pub in_flight: InFlight,
    /// Memory held by request bodies in flight.
    pub bodies: Arc<BodyBudget>,
    pub(crate) lifecycle: Lifecycle,
    ids: RequestIds,
}

impl Gateway {
    pub fn new(
        state: Arc<State>,
        metrics: Arc<Metrics>,
        auditor: Option<crate::audit::Auditor>,
        lifecycle: Lifecycle,
    ) -> Gateway {
        let snap = state.load();
        let mut options =
            pingora::connectors::ConnectorOptions::new(snap.config.upstream_keepalive_pool);
        options.ca_file = snap
            .config
            .upstream_ca
            .as_ref()
            .map(|ca| ca.path.display().to_string());
        Gateway {
            state,
            metrics,
            connector: Arc::new(Connector::new(Some(options))),
            auditor,
            in_flight: InFlight::default(),
            bodies: BodyBudget::new(snap.config.max_inflight_body_bytes),
            lifecycle,
            ids: RequestIds::new(),
        }
    }

    async fn handle(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        let snap = Arc::clone(&ctx.snapshot);
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let req = session.req_header();
        admission::single_identity(req)?;
        check_head_size(req, &snap.config)?;
        ctx.endpoint = Endpoint::from_request(&req.method, req.uri.path())?;
        let tenant = admission::admit(req, &snap).inspect_err(|_| {
            ctx.claimed_tenant = admission::claimed(req, &snap);
        })?;
        ctx.tenant = Some(tenant);
        ctx.priority = snap.config.tenants[tenant].priority;
        ctx.max_wait = spend::max_wait(req, snap.config.quota.max_wait);
        match ctx.endpoint {
            Endpoint::Models => return respond_models(session, ctx, &snap, tenant).await,
            Endpoint::Quota => return respond_quota(session, ctx, &snap, tenant).await,
            _ => {}
        }
        let config = &snap.config;
        session.set_write_timeout(Some(config.client_timeout));
        self.bodies.set_limit(config.max_inflight_body_bytes);
        let body = body::read(
            session,
            config.max_body_bytes,
            config.client_timeout,
            &self.bodies,
            &mut ctx.body_hold,
        )
        .await?;
        ctx.body = Some(body.clone());
        let inspected = body::inspect(&body, config.max_json_depth)?;
        let Some(model) = snap.model(&inspected.model) else {
            // The text is the client's, and may be anything — a key sent by
            // mistake: only a fingerprint of it is recorded.
            ctx.requested_model = Some(unknown_model_label(&inspected.model));
            return Err(GatewayError::ModelNotFound(inspected.model.clone()));
        };
        ctx.requested_model = Some(inspected.model.clone());
        let hint = session
            .req_header()
            .headers
            .get("x-collie-route")
            .and_then(|v| v.to_str().ok());
        let chain = model.chain_for(ctx.priority, hint);
        if !config.tenants[tenant].models.allows(&inspected.model) {
            return Err(GatewayError::ModelForbidden(inspected.model.clone()));
        }
        spend::reserve(ctx, &snap, tenant, model, &body, &inspected)?;
        exchange::run(self, session, ctx, &snap, chain, body, &inspected).await
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            id: self.ids.next(),
            started: Instant::now(),
            started_at: std::time::SystemTime::now(),
            client_ip: None,
            body: None,
            snapshot: self.state.load(),
            endpoint: Endpoint::ChatCompletions,
            tenant: None,
            claimed_tenant: None,
            requested_model: None,
            served: None,
            attempts: Vec::new(),
            fallback: None,
            status: 0,
            error: None,
            usage: None,
            usage_estimated: false,
            refused_by: None,
            first_byte: None,
            streamed: false,
            truncated: false,
            broken: None,
            client_gone: false,
            priority: crate::config::DEFAULT_PRIORITY,
            max_wait: std::time::Duration::ZERO,
            queued: None,
            prompt_estimate: 0,
            tokens_estimate: 0,
            delivered_estimate: 0,
            reservation: None,
            settlement: None,
            preview: None,
            body_hold: None,
            _in_flight: self.in_flight.enter(),
        }
    }

    /// The head is parsed: the connection's head limits stop applying, and
    /// a draining gateway closes the connection after this answer. Pipelined
    /// requests are answered in order (a request sent while another is
    /// answered waits its turn instead of being taken for a departing client).
    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        crate::listener::request_started();
        session.downstream_session.set_pipelining_enabled(true);
        if self.lifecycle.draining.is_cancelled() {
            session.set_keepalive(None);
        }
        Ok(())
    }

    /// Never reached: `request_filter` answers every request itself.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        Err(Error::explain(
            ErrorType::InternalError,
            "requests are answered by the gateway's own exchange",
        ))
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        if let Err(e) = self.handle(session, ctx).await {
            respond_error(session, ctx, &e).await;
        }
        Ok(true)
    }

    async fn logging(&self, _session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        spend::settle(ctx);
        self.metrics.record(ctx);
        // Last: the record takes what it needs out of the context.
        if let Some(a) = &self.auditor {
            a.submit(ctx).await;
        }
        crate::listener::request_finished();
    }
}

/// Write an error Collie generated, marked as Collie's own.
async fn respond_error(session: &mut Session, ctx: &mut RequestCtx, e: &GatewayError) {
    let r = e.response();
    ctx.status = r.status;
    ctx.error = Some(r.reason);
    if *e == GatewayError::ClientClosed {
        // Nobody is there to read an answer.
        session.set_keepalive(None);
        return;
    }
    if !session.is_body_done() {
        // Do not read (drain) the body of a request that was refused.
        session.set_keepalive(None);
    }
    let head = (|| -> pingora::Result<ResponseHeader> {
        let mut h = ResponseHeader::build_no_case(r.status, Some(12))?;
        h.insert_header(header::CONTENT_TYPE, "application/json")?;
        h.insert_header(header::CONTENT_LENGTH, r.body.len())?;
        h.insert_header(X_COLLIE_ERROR, r.reason)?;
        h.insert_header(X_COLLIE_REQUEST_ID, ctx.id.as_str())?;
        if let Some(s) = r.retry_after_s {
            h.insert_header(header::RETRY_AFTER, s)?;
        }
        if !ctx.attempts.is_empty() {
            h.insert_header(X_COLLIE_ATTEMPTS, ctx.attempts.len())?;
        }
        spend::rate_headers(ctx, &mut h);
        Ok(h)
    })();
    let Ok(head) = head else {
        ctx.client_gone = true;
        return;
    };
    write_whole(session, ctx, head, r.body).await;
}

async fn write_whole(
    session: &mut Session,
    ctx: &mut RequestCtx,
    head: ResponseHeader,
    body: Bytes,
) {
    if session
        .write_response_header(Box::new(head), false)
        .await
        .is_err()
        || session.write_response_body(Some(body), true).await.is_err()
    {
        ctx.client_gone = true;
    }
}

/// `GET /v1/models`: the models this tenant may call, answered from config.
async fn respond_models(
    session: &mut Session,
    ctx: &mut RequestCtx,
    snap: &Snapshot,
    tenant: usize,
) -> Result<(), GatewayError> {
    let access = &snap.config.tenants[tenant].models;
    let data: Vec<serde_json::Value> = snap
        .config
        .models
        .iter()
        .filter(|m| access.allows(&m.name))
        .map(|m| serde_json::json!({"id": m.name, "object": "model", "created": 0, "owned_by": "collie"}))
        .collect();
    respond_json(
        session,
        ctx,
        &serde_json::json!({"object": "list", "data": data}),
    )
    .await
}

/// `GET /v1/collie/quota`: every window of the caller's own quota.
async fn respond_quota(
    session: &mut Session,
    ctx: &mut RequestCtx,
    snap: &Snapshot,
    tenant: usize,
) -> Result<(), GatewayError> {
    let ledger = snap
        .ledgers
        .get(tenant)
        .ok_or_else(|| GatewayError::Internal("no ledger for tenant".into()))?;
    respond_json(session, ctx, &ledger.report(&snap.calendar)).await
}

/// A 200 JSON answer Collie gives itself, with its usual headers.
async fn respond_json(
    session: &mut Session,
    ctx: &mut RequestCtx,
    value: &impl serde::Serialize,
) -> Result<(), GatewayError> {
    let body = serde_json::to_vec(value).map_err(|e| GatewayError::Internal(e.to_string()))?;
    let internal = |e: Box<Error>| GatewayError::Internal(e.to_string());
    let mut head = ResponseHeader::build_no_case(200, Some(10)).map_err(internal)?;
    head.insert_header(header::CONTENT_TYPE, "application/json")
        .map_err(internal)?;
    head.insert_header(header::CONTENT_LENGTH, body.len())
        .map_err(internal)?;
    head.insert_header(X_COLLIE_REQUEST_ID, ctx.id.as_str())
        .map_err(internal)?;
    spend::rate_headers(ctx, &mut head);
    ctx.status = 200;
    write_whole(session, ctx, head, Bytes::from(body)).await;
    Ok(())
}

/// Heads over the configured limits get 431. The connection guard refuses
/// an HTTP/1 head before it is parsed; this holds for HTTP/2 too.
fn check_head_size(
    req: &pingora::http::RequestHeader,
    config: &crate::config::Config,
) -> Result<(), GatewayError> {
    if req.headers.len() > config.max_headers {
        return Err(GatewayError::HeaderTooLarge);
    }
    let bytes = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len().saturating_add(v.len()))
        .fold(
            req.uri.path_and_query().map_or(0, |p| p.as_str().len()),
            usize::saturating_add,
        );
    if bytes > config.max_header_bytes {
        return Err(GatewayError::HeaderTooLarge);
    }
    Ok(())
}

/// How an unknown `model` is recorded: a fingerprint, never its text.
fn unknown_model_label(model: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(model.as_bytes());
    format!("unknown:{}", hex::encode(&digest[..6]))
}

/// Request ids unique across restarts and sidecars: a random per-process
/// prefix and a counter.
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        RequestIds {
            prefix: rand::random(),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("req_{:016x}{:012x}", self.prefix, n)
    }
}
