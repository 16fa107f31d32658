//! The admin listener: `/metrics` for Prometheus, `/healthz` and `/readyz`
//! for probes, and the operator's pages — every tenant's quota (`/quota`),
//! deployment health and routing (`/status`) and the live status page (`/`).
//!
//! Probes and scrapers reach it from outside the pod, so what it shows is
//! split: `/metrics`, `/healthz`, `/readyz` and the page itself (which holds
//! no data) are open; the pages with tenants' usage and deployments'
//! state need `Authorization: Bearer <admin token>` (`admin_token_env`), or,
//! when no token is configured, a client on loopback.

pub(crate) mod status;

use crate::metrics::Metrics;
use crate::state::State;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
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
    pub(crate) bodies: Arc<crate::gateway::BodyBudget>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // The connection waits for its next head once this answer is out.
        crate::listener::request_finished();
        let path = session.req_header().uri.path().to_string();
        let protected = matches!(path.as_str(), "/quota" | "/status");
        let refused = if protected {
            let snap = self.state.load();
            let client = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            let presented = session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            allowed(snap.config.admin_token.as_ref(), client, presented).err()
        } else {
            None
        };
        let (status, content_type, body) = match (path.as_str(), refused) {
            (_, Some(status)) => (status, "text/plain", refusal_text(status).to_vec()),
            (path, None) => match path {
                "/metrics" => (
                    200,
                    "text/plain; version=0.0.4",
                    self.metrics
                        .scrape(&self.state.load(), &self.state.health, self.bodies.held()),
                ),
                "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
                "/quota" => (200, "application/json", self.quota_status()),
                "/status" => (200, "application/json", status::json(&self.state.load())),
                "/" => (
                    200,
                    "text/html; charset=utf-8",
                    status::PAGE.as_bytes().to_vec(),
                ),
                "/readyz" => {
                    // Ready once a config with at least one routable model is
                    // loaded, until a graceful stop begins.
                    let snap = self.state.load();
                    if self.draining.is_cancelled() {
                        (503, "text/plain", b"draining\n".to_vec())
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
