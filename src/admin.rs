//! The admin listener: `/metrics` for Prometheus, `/healthz` and `/readyz`
//! for probes, and the operator's pages — every tenant's quota (`/quota`),
//! deployment health and routing (`/status`) and the live status page (`/`).

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
        let (status, content_type, body) = match path.as_str() {
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
        resp
    }
}
