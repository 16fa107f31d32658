//! Sends each delivered alert to the configured webhook as a JSON POST,
//! retried with exponential backoff, on a thread of its own so a slow
//! receiver never delays the records or the request path. Every attempt for
//! one alert carries the same body, whose `id` lets a receiver drop a
//! duplicate (an attempt that was in fact accepted but whose answer was
//! lost is sent again).

use super::Alert;
use crate::config::Webhook;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use prometheus::IntCounter;
use std::net::ToSocketAddrs;
use std::time::Duration;
use tokio::sync::mpsc;

/// Alerts waiting for the webhook, at most.
const QUEUED: usize = 1024;

/// Start the sender. Drop the returned sender and join the thread to let
/// pending alerts go out.
pub(super) fn start(
    hook: Webhook,
    failures: IntCounter,
) -> (mpsc::Sender<Alert>, std::thread::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Alert>(QUEUED);
    let run = async move {
        let connector = Connector::new(None);
        while let Some(a) = rx.recv().await {
            let body = body(&a);
            let mut delivered = false;
            for attempt in 0..=hook.retries {
                match tokio::time::timeout(
                    hook.timeout,
                    post(&connector, &hook.url, Bytes::from(body.clone())),
                )
                .await
                {
                    Ok(Ok(status)) if (200..300).contains(&status) => {
                        delivered = true;
                        break;
                    }
                    Ok(Ok(status)) => {
                        log::warn!("alert webhook answered {status} (attempt {})", attempt + 1)
                    }
                    Ok(Err(e)) => {
                        log::warn!("alert webhook failed: {e} (attempt {})", attempt + 1)
                    }
                    Err(_) => log::warn!("alert webhook timed out (attempt {})", attempt + 1),
                }
                if attempt < hook.retries {
                    tokio::time::sleep(hook.backoff.saturating_mul(1 << attempt.min(8))).await;
                }
            }
            if !delivered {
                log::error!(
                    "alert webhook never accepted the {} alert after {} attempts (it is in the trail)",
                    a.rule,
                    hook.retries + 1
                );
                failures.inc();
            }
        }
    };
    let thread = std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(run),
            Err(e) => log::error!("alert webhook cannot start: {e}"),
        }
    });
    (tx, thread)
}

/// The JSON a receiver gets. The fields of the first release (`id`,
/// `source`, `rule`, `tenant`, `detail`, `ts_ms`, `sidecar`) keep their
/// meaning; `detail` and `message` are the same text.
fn body(a: &Alert) -> String {
    serde_json::json!({
        "id": a.id,
        "source": "collie",
        "rule": a.rule,
        "severity": a.severity.as_str(),
        "scope": a.scope,
        "tenant": a.scope.tenant(),
        "detail": a.message,
        "message": a.message,
        "recommendation": a.recommendation,
        "ts_ms": a.last_seen_ms,
        "first_seen_ms": a.first_seen_ms,
        "last_seen_ms": a.last_seen_ms,
        "count": a.count,
        "sidecar": a.sidecar,
    })
    .to_string()
}

async fn post(connector: &Connector, url: &str, body: Bytes) -> Result<u16, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let tls = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("URL without a host")?.to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or("no address")?;
    let peer = HttpPeer::new(addr, tls, host.clone());
    let (mut http, _) = connector
        .get_http_session(&peer)
        .await
        .map_err(|e| format!("connect: {}", e.etype().as_str()))?;
    let e = |e: Box<pingora::Error>| e.etype().as_str().to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = RequestHeader::build("POST", path.as_bytes(), Some(4)).map_err(e)?;
    let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
    req.insert_header(http::header::HOST, authority)
        .map_err(e)?;
    req.insert_header(http::header::CONTENT_TYPE, "application/json")
        .map_err(e)?;
    req.insert_header(http::header::CONTENT_LENGTH, body.len())
        .map_err(e)?;
    http.write_request_header(Box::new(req)).await.map_err(e)?;
    http.write_request_body(body, true).await.map_err(e)?;
    http.finish_request_body().await.map_err(e)?;
    http.read_response_header().await.map_err(e)?;
    let status = http.response_header().map_or(0, |h| h.status.as_u16());
    while let Ok(Some(_)) = http.read_response_body().await {}
    connector
        .release_http_session(http, &peer, Some(Duration::from_secs(30)))
        .await;
    Ok(status)
}
