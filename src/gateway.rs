//! The request path: Pingora's `ProxyHttp` implementation. Every request is
//! answered from `request_filter` — admit, read, inspect, then the exchange
//! loop in [`exchange`] — and `logging` settles it (metrics) whatever happened.

pub(crate) mod admission;
pub mod body;
mod error;
pub(crate) mod exchange;
mod fit;
mod hold;
mod spend;

pub use admission::key_digest_hex;
pub(crate) use body::BodyBudget;
pub(crate) use error::GatewayError;

use crate::config::DeploymentIx;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::outcome::{Attempt, Claimed, Cut, End, Endpoint, Finished};
use crate::quota::Reservation;
use crate::state::{Snapshot, State};
use crate::usage::Usage;
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::connectors::http::Connector;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

pub(crate) const X_COLLIE_MODEL: http::HeaderName = http::HeaderName::from_static("x-collie-model");
pub(crate) const X_COLLIE_ATTEMPTS: http::HeaderName =
    http::HeaderName::from_static("x-collie-attempts");
pub(crate) const X_COLLIE_REQUEST_ID: http::HeaderName =
    http::HeaderName::from_static("x-collie-request-id");
pub(crate) const X_COLLIE_ERROR: http::HeaderName = http::HeaderName::from_static("x-collie-error");
pub(crate) const X_COLLIE_COST_USD: http::HeaderName =
    http::HeaderName::from_static("x-collie-cost-usd");
/// The client's choice among a model's routes (see `Model::chain_for`).
const X_COLLIE_ROUTE: http::HeaderName = http::HeaderName::from_static("x-collie-route");

/// The endpoint a request line names, or why it names none.
fn endpoint_of(method: &http::Method, path: &str) -> Result<Endpoint, GatewayError> {
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

/// What the gateway does to each request besides carrying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Everything: authentication, quotas, metrics, the audit trail.
    Full,
    /// The transport alone, to measure it apart from the policy
    /// (`bench/`): the listener and its guard, the bounded body read, the
    /// inspection that finds `model`, the routing and the exchange with its
    /// relay, as in [`Policy::Full`] — but no authentication (every request
    /// is served, whoever sends it), no quota, no metrics per request, no
    /// audit record. Never for serving: the process serves loopback only.
    TransportOnly,
}

/// One request while it runs, grouped by the phase that fills each part in;
/// [`RequestCtx::finish`] turns it into the [`Finished`] story once.
pub(crate) struct RequestCtx {
    pub(crate) id: String,
    /// The config the request runs under, start to end.
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) started: Instant,
    pub(crate) started_at: SystemTime,
    /// Who is calling (admission).
    pub(crate) caller: Caller,
    /// What was asked (the body and its inspection).
    pub(crate) request: Asked,
    /// The quota held by this request until it ends.
    pub(crate) reservation: Option<Reservation>,
    /// The attempts made (the exchange).
    pub(crate) exchange: Exchanged,
    /// What the client got.
    pub(crate) response: Answer,
    /// Set when Collie answers or refuses the request itself.
    pub(crate) end: Option<End>,
    /// Counts this request as in flight until the context is dropped.
    _in_flight: InFlightGuard,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) client_ip: Option<IpAddr>,
    pub(crate) endpoint: Endpoint,
    /// Index of the proven tenant.
    pub(crate) tenant: Option<usize>,
    /// Refused by authentication: the tenant `X-Tenant-ID` named.
    pub(crate) claimed: Option<Claimed>,
    /// The end user within the proven tenant, as recorded
    /// ([`admission::end_user`]).
    pub(crate) user: Option<String>,
    /// The tenant's priority (1 highest … 5), for queueing.
    pub(crate) priority: u8,
    /// Longest wait for a saturated pool.
    pub(crate) max_wait: Duration,
}

/// What was asked.
#[derive(Debug, Default)]
pub(crate) struct Asked {
    /// The request body as the client sent it (shared, not copied).
    pub(crate) body: Option<Bytes>,
    /// The body's share of the in-flight body budget.
    pub(crate) body_hold: Option<body::BodyHold>,
    /// A configured model, or the fingerprint of one that does not exist.
    pub(crate) model: Option<String>,
    /// Estimated prompt tokens, and prompt + output allowance.
    pub(crate) prompt_estimate: u64,
    pub(crate) tokens_estimate: u64,
}

/// The attempts made.
#[derive(Debug, Default)]
pub(crate) struct Exchanged {
    pub(crate) attempts: Vec<Attempt>,
    /// The deployment whose response the client got.
    pub(crate) served: Option<DeploymentIx>,
    /// (from, to) deployments when the request fell back along its chain.
    pub(crate) fallback: Option<(DeploymentIx, DeploymentIx)>,
    /// Time spent waiting for a pool slot, if any.
    pub(crate) queued: Option<Duration>,
    /// Time spent held while every deployment was down (`hold_when_down`).
    pub(crate) held: Duration,
}

/// What the client got.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) streamed: bool,
    pub(crate) first_byte: Option<Instant>,
    /// As the provider reported it.
    pub(crate) usage: Option<Usage>,
    /// Completion tokens delivered, counted from the stream (used only when
    /// the provider reported no usage).
    pub(crate) delivered_estimate: u64,
    /// The first bytes of the response, when the audit keeps a preview.
    pub(crate) preview: Option<Vec<u8>>,
    /// Why the relayed response was cut short, if it was.
    pub(crate) cut: Option<Cut>,
    pub(crate) client_gone: bool,
}

impl RequestCtx {
    /// Record that Collie refused or failed the request itself.
    pub(crate) fn fail(&mut self, e: &GatewayError) {
        self.end = Some(End::Failed {
            code: e.code(),
            window: match e {
                GatewayError::Quota { window, .. } => Some(window.clone()),
                _ => None,
            },
        });
    }

    /// Close the story: how the request ended and what it used, decided
    /// once. A served 2xx without reported usage is estimated here (a
    /// stream: the prompt estimate and the text delivered; anything else:
    /// the reservation stands). The reservation is handed back to be
    /// settled against it.
    fn finish(&mut self) -> (Finished, Option<Reservation>) {
        let exchange = std::mem::take(&mut self.exchange);
        let response = std::mem::take(&mut self.response);
        let request = std::mem::take(&mut self.request);
        let reservation = self.reservation.take();
        let end = self.end.take().unwrap_or(match exchange.served {
            Some(_) => End::Relayed { cut: response.cut },
            None => End::Unanswered,
        });
        let reported = response.usage.filter(|u| u.total().is_some());
        let estimate = match (reported, exchange.served, reservation.as_ref()) {
            (None, Some(_), Some(r)) if (200..300).contains(&response.status) => {
                let completion = if response.streamed {
                    response.delivered_estimate
                } else {
                    r.amount().tokens.saturating_sub(request.prompt_estimate)
                };
                Some(Usage {
                    prompt_tokens: Some(request.prompt_estimate),
                    completion_tokens: Some(completion),
                    total_tokens: Some(request.prompt_estimate.saturating_add(completion)),
                })
            }
            _ => None,
        };
        let finished = Finished {
            id: std::mem::take(&mut self.id),
            snapshot: Arc::clone(&self.snapshot),
            started_at: self.started_at,
            latency: self.started.elapsed(),
            ttft: response
                .first_byte
                .map(|t| t.saturating_duration_since(self.started)),
            queued: exchange.queued,
            client_ip: self.caller.client_ip,
            endpoint: self.caller.endpoint,
            tenant: self.caller.tenant,
            claimed: self.caller.claimed,
            user: self.caller.user.take(),
            priority: self.caller.priority,
            requested_model: request.model,
            attempts: exchange.attempts,
            served: exchange.served,
            fallback: exchange.fallback,
            status: response.status,
            end,
            client_gone: response.client_gone,
            streamed: response.streamed,
            usage_estimated: estimate.is_some(),
            usage: estimate.or(response.usage),
            settlement: None,
            preview: response.preview,
            body: request.body,
        };
        (finished, reservation)
    }
}

/// Requests the gateway is working on, so a graceful stop can wait for them.
#[derive(Clone, Default)]
pub(crate) struct InFlight(Arc<AtomicU64>);

impl InFlight {
    pub(crate) fn count(&self) -> u64 {
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

pub(crate) struct Gateway {
    pub(crate) state: Arc<State>,
    pub(crate) metrics: Arc<Metrics>,
    /// Shared with the tasks that drain failed attempts' bodies.
    pub(crate) connector: Arc<Connector>,
    /// The audit queue, when auditing is on.
    pub(crate) auditor: Option<crate::audit::Auditor>,
    pub(crate) in_flight: InFlight,
    /// Memory held by request bodies in flight.
    pub(crate) bodies: Arc<BodyBudget>,
    /// Requests waiting for a deployment of their model to come back.
    pub(crate) hold: Arc<hold::Hold>,
    pub(crate) lifecycle: Lifecycle,
    ids: RequestIds,
    /// `TransportOnly` only to measure the transport apart.
    policy: Policy,
}

impl Gateway {
    pub(crate) fn new(
        state: Arc<State>,
        metrics: Arc<Metrics>,
        auditor: Option<crate::audit::Auditor>,
        lifecycle: Lifecycle,
        policy: Policy,
    ) -> Gateway {
        let snap = state.load();
        // Trust roots are not set here: each https peer carries the CA
        // bundle its deployment uses (loaded once, with the config), so a
        // reload that changes a bundle takes effect.
        let options =
            pingora::connectors::ConnectorOptions::new(snap.config.upstream_keepalive_pool);
        let hold = hold::Hold::new(metrics.held_requests.clone());
        Gateway {
            state,
            metrics,
            connector: Arc::new(Connector::new(Some(options))),
            auditor,
            in_flight: InFlight::default(),
            bodies: BodyBudget::new(snap.config.max_inflight_body_bytes),
            hold,
            lifecycle,
            ids: RequestIds::new(),
            policy,
        }
    }

    async fn handle(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        let snap = Arc::clone(&ctx.snapshot);
        if self.policy == Policy::TransportOnly {
            return self.carry(session, ctx, &snap).await;
        }
        ctx.caller.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let req = session.req_header();
        admission::single_identity(req)?;
        check_head_size(req, &snap.config)?;
        ctx.caller.endpoint = endpoint_of(&req.method, req.uri.path())?;
        let tenant = admission::admit(req, &snap).inspect_err(|_| {
            ctx.caller.claimed = admission::claimed(req, &snap);
        })?;
        ctx.caller.tenant = Some(tenant);
        // Named by the header until the body is read (its `user` counts
        // only without the header).
        let hashed = snap.config.audit.hash_user_ids;
        ctx.caller.user = admission::end_user(req, None, hashed);
        ctx.caller.priority = snap.config.tenants[tenant].priority;
        ctx.caller.max_wait = spend::max_wait(req, snap.config.quota.max_wait);
        match ctx.caller.endpoint {
            Endpoint::Models => return respond_models(session, ctx, &snap, tenant).await,
            Endpoint::Quota => return respond_quota(session, ctx, &snap, tenant).await,
            _ => {}
        }
        let config = &snap.config;
        let body = self.read_body(session, ctx, config).await?;
        ctx.request.body = Some(body.clone());
        let inspected = body::inspect(&body, config.max_json_depth)?;
        if ctx.caller.user.is_none() {
            ctx.caller.user = admission::end_user(
                session.req_header(),
                inspected.user.as_deref(),
                config.audit.hash_user_ids,
            );
        }
        let Some(model) = snap.model(&inspected.model) else {
            // The text is the client's, and may be anything — a key sent by
            // mistake: only a fingerprint of it is recorded.
            ctx.request.model = Some(unknown_model_label(&inspected.model));
            return Err(GatewayError::ModelNotFound(inspected.model.clone()));
        };
        ctx.request.model = Some(inspected.model.clone());
        let hint = session
            .req_header()
            .headers
            .get(&X_COLLIE_ROUTE)
            .and_then(|v| v.to_str().ok());
        let chain = model.chain_for(ctx.caller.priority, hint);
        if !config.tenants[tenant].models.allows(&inspected.model) {
            return Err(GatewayError::ModelForbidden(inspected.model.clone()));
        }
        let limits = fit::limits(session.req_header())?;
        let tokens = spend::tokens(ctx, &snap, tenant, model, &body, &inspected);
        let unfit = fit::unfit(&snap, model, chain, tokens, limits)?;
        spend::reserve(ctx, &snap, tenant, model, tokens).await?;
        exchange::run(self, session, ctx, &snap, chain, unfit, body, &inspected).await
    }

    /// The body, read whole within the configured bounds and counted in the
    /// in-flight body budget; answers are written within `client_timeout`.
    async fn read_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        config: &crate::config::Config,
    ) -> Result<Bytes, GatewayError> {
        session.set_write_timeout(Some(config.client_timeout));
        self.bodies.set_limit(config.max_inflight_body_bytes);
        body::read(
            session,
            config.max_body_bytes,
            config.client_timeout,
            &self.bodies,
            &mut ctx.request.body_hold,
        )
        .await
    }

    /// `Policy::TransportOnly`: the body read, the `model` found, and the
    /// exchange for the model's chain as the full policy runs it — nothing
    /// else.
    async fn carry(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: &Arc<Snapshot>,
    ) -> Result<(), GatewayError> {
        let req = session.req_header();
        ctx.caller.endpoint = endpoint_of(&req.method, req.uri.path())?;
        let config = &snap.config;
        let body = self.read_body(session, ctx, config).await?;
        let inspected = body::inspect(&body, config.max_json_depth)?;
        let Some(model) = snap.model(&inspected.model) else {
            return Err(GatewayError::ModelNotFound(inspected.model.clone()));
        };
        let chain = model.chain_for(ctx.caller.priority, None);
        exchange::run(
            self,
            session,
            ctx,
            snap,
            chain,
            Vec::new(),
            body,
            &inspected,
        )
        .await
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora keeps the context in its request's future, which
    /// holds room for it three times over (584 bytes each) for as long as
    /// the request runs, and moves it as it goes.
    type CTX = Box<RequestCtx>;

    fn new_ctx(&self) -> Box<RequestCtx> {
        Box::new(RequestCtx {
            id: self.ids.next(),
            snapshot: self.state.load(),
            started: Instant::now(),
            started_at: SystemTime::now(),
            caller: Caller {
                client_ip: None,
                endpoint: Endpoint::ChatCompletions,
                tenant: None,
                claimed: None,
                user: None,
                priority: crate::config::DEFAULT_PRIORITY,
                max_wait: Duration::ZERO,
            },
            request: Asked::default(),
            reservation: None,
            exchange: Exchanged::default(),
            response: Answer::default(),
            end: None,
            _in_flight: self.in_flight.enter(),
        })
    }

    /// The head is parsed: the connection's head limits stop applying, and
    /// a draining gateway closes the connection after this answer. Pipelined
    /// requests are answered in order (a request sent while another is
    /// answered waits its turn instead of being taken for a departing client).
    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut Box<RequestCtx>,
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
        _ctx: &mut Box<RequestCtx>,
    ) -> pingora::Result<Box<HttpPeer>> {
        Err(Error::explain(
            ErrorType::InternalError,
            "requests are answered by the gateway's own exchange",
        ))
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Box<RequestCtx>,
    ) -> pingora::Result<bool> {
        if let Err(e) = self.handle(session, ctx).await {
            respond_error(session, ctx, &e).await;
        }
        Ok(true)
    }

    /// The request's story is closed once, then settled, counted and
    /// recorded from that one value.
    async fn logging(&self, _session: &mut Session, _e: Option<&Error>, ctx: &mut Box<RequestCtx>) {
        if self.policy == Policy::TransportOnly {
            crate::listener::request_finished();
            return;
        }
        let held = ctx.exchange.held;
        let (mut finished, reservation) = ctx.finish();
        finished.settlement = spend::settle(&finished, reservation);
        self.metrics.record(&finished);
        if let Some(d) = finished
            .served
            .and_then(|d| finished.snapshot.router.deployment(d))
        {
            // Not the time it was held while the deployment was down: that
            // says nothing of how fast it answers.
            d.health
                .record_latency(finished.latency.saturating_sub(held));
        }
        if let Some(a) = &self.auditor {
            a.submit(finished).await;
        }
        crate::listener::request_finished();
    }
}

/// Write an error Collie generated, marked as Collie's own.
async fn respond_error(session: &mut Session, ctx: &mut RequestCtx, e: &GatewayError) {
    let r = e.response();
    ctx.response.status = r.status;
    ctx.fail(e);
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
        if !ctx.exchange.attempts.is_empty() {
            h.insert_header(X_COLLIE_ATTEMPTS, ctx.exchange.attempts.len())?;
        }
        Ok(exchange::edit_response(h, |headers| {
            spend::rate_headers(ctx, headers);
        }))
    })();
    let Ok(head) = head else {
        ctx.response.client_gone = true;
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
        ctx.response.client_gone = true;
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

/// `GET /v1/collie/quota`: every window of the caller's own quota, and the
/// factor its priority applied to the per-minute rates shown.
async fn respond_quota(
    session: &mut Session,
    ctx: &mut RequestCtx,
    snap: &Snapshot,
    tenant: usize,
) -> Result<(), GatewayError> {
    let ledger = snap
        .quota
        .ledger(tenant)
        .ok_or_else(|| GatewayError::Internal("no ledger for tenant".into()))?;
    /// The ledger's report, as it serialises, with one field more.
    #[derive(serde::Serialize)]
    struct WithFactor<T> {
        #[serde(flatten)]
        report: T,
        rate_factor: f64,
    }
    let priority = snap
        .config
        .tenants
        .get(tenant)
        .map_or(crate::config::DEFAULT_PRIORITY, |t| t.priority);
    let report = WithFactor {
        report: ledger.report(snap.quota.calendar()),
        rate_factor: snap.config.quota.priority_factors.factor(priority),
    };
    respond_json(session, ctx, &report).await
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
    let head = exchange::edit_response(head, |headers| spend::rate_headers(ctx, headers));
    ctx.response.status = 200;
    ctx.end = Some(End::Answered);
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
/// prefix and a counter, `req_<16 hex><12 or more hex>`.
struct RequestIds {
    /// `req_` and the prefix, written once.
    prefix: String,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        RequestIds {
            prefix: format!("req_{:016x}", rand::random::<u64>()),
            counter: AtomicU64::new(0),
        }
    }

    /// The next id. Written by hand rather than with `format!`, which took
    /// 1.5k instructions of every request.
    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(self.prefix.len() + 16);
        id.push_str(&self.prefix);
        // As `{:012x}`: at least 12 digits, more when the counter needs them.
        let digits = (u64::BITS - n.leading_zeros()).div_ceil(4).max(12);
        for nibble in (0..digits).rev() {
            let d = (n >> (nibble * 4)) & 0xf;
            id.push(char::from_digit(d as u32, 16).unwrap_or('0'));
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_read_as_the_prefix_and_the_counter_in_hex() {
        let ids = RequestIds::new();
        for n in [0u64, 1, 0xabc, (1 << 48) - 1, 1 << 48, u64::MAX] {
            ids.counter.store(n, Ordering::Relaxed);
            assert_eq!(ids.next(), format!("{}{n:012x}", ids.prefix));
        }
        assert_eq!(ids.prefix.len(), 20);
        assert!(ids.prefix.starts_with("req_"));
    }
}
