//! The admin listener: `/metrics` for Prometheus, `/healthz` and `/readyz`
//! for probes, and the operator's pages — every tenant's quota (`/quota`),
//! deployment health, routing and alerts (`/status`, pushed live by
//! `/status/events`), a forced health check (`POST /status/check`) and the
//! live status page (`/`).
//!
//! Probes and scrapers reach it from outside the pod, so what it shows is
//! split: `/metrics`, `/healthz`, `/readyz` and the page itself (which holds
//! no data) are open; the pages with tenants' usage and deployments'
//! state, and the actions, need `Authorization: Bearer <admin token>`
//! (`admin_token_env`), or, when no token is configured, a client on
//! loopback.
//!
//! The listener answers each request whole, except `/status/events`: a
//! Server-Sent Events stream that stays open (see [`events`]). Each
//! connection runs in a task of its own, so a stream open on one holds up
//! no request on another, even on the listener's single thread.

mod events;
pub(crate) mod status;

use crate::alerts::Alerts;
use crate::metrics::Metrics;
use crate::state::State;
use async_trait::async_trait;
use http::Response;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use std::sync::Arc;

impl AdminApp {
    /// Every tenant's quota (loans included) and every pool's queue.
    fn quota_status(&self) -> Vec<u8> {
        let snap = self.state.load();
        let tenants: Vec<_> = snap
            .quota
            .ledgers()
            .iter()
            .map(|l| l.report(snap.quota.calendar()))
            .collect();
        let pools: Vec<_> = snap
            .router
            .pools
            .iter()
            .map(|p| {
                let load = p.gate.load_now();
                serde_json::json!({"pool": p.id, "inflight": load.inflight, "limit": load.limit, "waiting": load.waiting})
            })
            .collect();
        serde_json::to_vec_pretty(&serde_json::json!({"tenants": tenants, "pools": pools}))
            .unwrap_or_default()
    }
}

/// The admin listener's routes.
/// Whether a request may read a protected page: with a token configured,
/// only one presenting it (compared in constant time; 401 otherwise);
/// without one, only a loopback client (403 otherwise: the listener is
/// reachable from outside and nothing proves who asks).
fn allowed(
    token: Option<&crate::config::Secret>,
    client: Option<std::net::IpAddr>,
    authorization: Option<&[u8]>,
) -> Result<(), u16> {
    use subtle::ConstantTimeEq;
    match token {
        Some(token) => {
            let presented = authorization
                .and_then(|v| {
                    v.get(..7)
                        .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
                        .map(|_| &v[7..])
                })
                .map(<[u8]>::trim_ascii)
                .unwrap_or_default();
            let expected = token.expose().as_bytes();
            // Equal lengths first (a length is not a secret worth hiding),
            // then every byte, without stopping early.
            if presented.len() == expected.len() && bool::from(presented.ct_eq(expected)) {
                Ok(())
            } else {
                Err(401)
            }
        }
        None if client.is_some_and(|ip| ip.is_loopback()) => Ok(()),
        None => Err(403),
    }
}

fn refusal_text(status: u16) -> &'static [u8] {
    match status {
        401 => b"this page needs Authorization: Bearer <the admin token>\n",
        _ => b"this page is served to loopback clients only; set admin_token_env to read it from elsewhere\n",
    }
}

pub(crate) struct AdminApp {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) state: Arc<State>,
    /// Cancelled when a graceful stop begins: `/readyz` fails from then on.
    pub(crate) draining: tokio_util::sync::CancellationToken,
    /// Set once the gateway listener has accepted a connection: the admin
    /// listener may be up before it, or without it (its port taken).
    pub(crate) gateway_accepting: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) bodies: Arc<crate::gateway::BodyBudget>,
    /// The alert feed, and the signal that something on the page changed.
    pub(crate) alerts: Arc<Alerts>,
    /// Event streams open now (bounded: [`events::MAX_SUBSCRIBERS`]).
    pub(crate) subscribers: Arc<std::sync::atomic::AtomicUsize>,
}

/// The pages and actions that show or touch tenants' usage and
/// deployments' state.
fn is_protected(path: &str) -> bool {
    matches!(
        path,
        "/quota" | "/status" | "/status/events" | "/status/check"
    )
}

/// An action (it changes something) asked from another origin: a page on
/// another site may make a browser send a form POST here, with no way for
/// it to read the answer, but enough to act. Actions need their own origin
/// (or none: curl sends no `Origin`).
fn cross_origin(req: &pingora::http::RequestHeader) -> bool {
    let Some(origin) = req.headers.get(http::header::ORIGIN) else {
        return false;
    };
    let host = req
        .headers
        .get(http::header::HOST)
        .map(http::HeaderValue::as_bytes)
        .unwrap_or_default();
    let origin = origin.as_bytes();
    let origin = origin
        .strip_prefix(b"http://")
        .or_else(|| origin.strip_prefix(b"https://"))
        .unwrap_or(origin);
    !origin.eq_ignore_ascii_case(host)
}

impl AdminApp {
    /// Whether this request may read or act on a protected page: `Err`
    /// with the status of the refusal.
    fn check_access(&self, session: &ServerSession) -> Result<(), u16> {
        let req = session.req_header();
        if !is_protected(req.uri.path()) {
            return Ok(());
        }
        let snap = self.state.load();
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let presented = req
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        allowed(snap.config.admin_token.as_ref(), client, presented)?;
        if req.method == http::Method::POST && cross_origin(req) {
            return Err(403);
        }
        Ok(())
    }

    /// `POST /status/check?deployment=ID`: probe it now.
    async fn force_check(&self, session: &ServerSession) -> (u16, &'static str, Vec<u8>) {
        let req = session.req_header();
        if req.method != http::Method::POST {
            return (405, "text/plain", b"use POST\n".to_vec());
        }
        let id = req.uri.query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "deployment")
                .map(|(_, v)| v.to_string())
        });
        let Some(id) = id else {
            return (
                400,
                "text/plain",
                b"name the deployment: POST /status/check?deployment=ID\n".to_vec(),
            );
        };
        use crate::routing::health::probes::CheckRefused;
        let json = |status, v: serde_json::Value| {
            (
                status,
                "application/json",
                serde_json::to_vec(&v).unwrap_or_default(),
            )
        };
        let answer = match self.state.health.check_now(&id).await {
            Ok(r) => json(
                200,
                serde_json::json!({"deployment": id, "ok": r.ok,
                    "latency_ms": r.latency.as_secs_f64() * 1e3, "detail": r.detail}),
            ),
            Err(CheckRefused::Unknown) => json(
                404,
                serde_json::json!({"error": "no deployment of that id is in a pool"}),
            ),
            Err(CheckRefused::ProbesOff) => json(
                409,
                serde_json::json!({"error": "its probes are off (probe: off); only live traffic judges it"}),
            ),
            Err(CheckRefused::Busy) => json(
                409,
                serde_json::json!({"error": "a probe of it is running; its result shows shortly"}),
            ),
        };
        // The page shows the result (and any breaker change) at once.
        self.alerts.touch();
        answer
    }

    async fn respond(&self, session: &ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let refused = self.check_access(session).err();
        let (status, content_type, body) = match (path.as_str(), refused) {
            (_, Some(status)) => (status, "text/plain", refusal_text(status).to_vec()),
            ("/status/check", None) => self.force_check(session).await,
            (path, None) => match path {
                "/metrics" => (
                    200,
                    "text/plain; version=0.0.4",
                    self.metrics
                        .scrape(&self.state.load(), &self.state.health, self.bodies.held()),
                ),
                "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
                "/quota" => (200, "application/json", self.quota_status()),
                "/status" => (
                    200,
                    "application/json",
                    status::json(&self.state.load(), &self.alerts),
                ),
                "/" => (
                    200,
                    "text/html; charset=utf-8",
                    status::PAGE.as_bytes().to_vec(),
                ),
                "/readyz" => {
                    // Ready once the gateway accepts connections and a config
                    // with at least one routable model is loaded, until a
                    // graceful stop begins.
                    let snap = self.state.load();
                    if self.draining.is_cancelled() {
                        (503, "text/plain", b"draining\n".to_vec())
                    } else if !self
                        .gateway_accepting
                        .load(std::sync::atomic::Ordering::Acquire)
                    {
                        (503, "text/plain", b"gateway not listening yet\n".to_vec())
                    } else if snap.config.models.is_empty() {
                        (503, "text/plain", b"no models configured\n".to_vec())
                    } else {
                        (200, "text/plain", b"ready\n".to_vec())
                    }
                }
                _ => (404, "text/plain", b"not found\n".to_vec()),
            },
        };
        let length = body.len();
        let mut resp = Response::new(body);
        resp.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(length),
        );
        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
        if let Ok(v) = http::HeaderValue::from_str(content_type) {
            resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        if status == 401 {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"collie admin\""),
            );
        }
        resp
    }
}

#[async_trait]
impl HttpServerApp for AdminApp {
    /// One request: an answer written whole (the connection may carry the
    /// next), or an event stream that ends the connection when it ends.
    async fn process_new_http(
        self: &Arc<Self>,
        mut http: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match http.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                log::debug!("admin listener: cannot read a request: {e}");
                return None;
            }
        }
        if *shutdown.borrow() {
            http.set_keepalive(None);
        } else {
            http.set_keepalive(Some(60));
        }
        let req = http.req_header();
        if req.uri.path() == "/status/events"
            && req.method == http::Method::GET
            && self.check_access(&http).is_ok()
        {
            // The connection is the stream's until it ends, and is closed
            // then: the head deadlines of the connection guard never start
            // (see `events`).
            events::stream(self, http, shutdown).await;
            return None;
        }
        // The connection waits for its next head once this answer is out.
        crate::listener::request_finished();
        let (parts, body) = self.respond(&http).await.into_parts();
        let head: ResponseHeader = parts.into();
        if let Err(e) = http.write_response_header(Box::new(head)).await {
            log::debug!("admin listener: cannot answer: {e}");
            return None;
        }
        if !body.is_empty() {
            if let Err(e) = http.write_response_body(body.into(), true).await {
                log::debug!("admin listener: cannot answer: {e}");
                return None;
            }
        }
        let persistent = HttpPersistentSettings::for_session(&http);
        match http.finish().await {
            Ok(reusable) => reusable.map(|s| ReusedHttpStream::from_reusable_stream(s, persistent)),
            Err(e) => {
                log::debug!("admin listener: cannot finish an answer: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn protected_pages_need_the_token_or_loopback() {
        let token = Secret::new("s3cret-admin-token-0123".into());
        let outside: Option<std::net::IpAddr> = Some("10.1.2.3".parse().unwrap());
        let local: Option<std::net::IpAddr> = Some("127.0.0.1".parse().unwrap());
        let right = Some(&b"Bearer s3cret-admin-token-0123"[..]);
        assert_eq!(allowed(Some(&token), outside, right), Ok(()));
        assert_eq!(
            allowed(
                Some(&token),
                local,
                Some(b"bearer  s3cret-admin-token-0123 ")
            ),
            Ok(())
        );
        for wrong in [
            None,
            Some(&b"Bearer s3cret-admin-token-012"[..]),
            Some(b"Bearer s3cret-admin-token-01234"),
            Some(b"Basic s3cret-admin-token-0123"),
            Some(b"s3cret-admin-token-0123"),
        ] {
            assert_eq!(allowed(Some(&token), local, wrong), Err(401), "{wrong:?}");
        }
        // No token configured: loopback only.
        assert_eq!(allowed(None, local, None), Ok(()));
        assert_eq!(allowed(None, Some("::1".parse().unwrap()), None), Ok(()));
        assert_eq!(allowed(None, outside, right), Err(403));
        assert_eq!(allowed(None, None, None), Err(403));
    }
}
