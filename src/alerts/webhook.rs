//! Sends each anomaly to the configured webhook as a JSON POST, retried with
//! exponential backoff; runs beside the writer so a slow receiver never
//! delays the records. Every attempt for one alert carries the same body,
//! whose `id` lets a receiver drop a duplicate (an attempt that was in fact
//! accepted but whose answer was lost is sent again).

use super::AuditMetrics;
use super::sink::AnomalyRow;
use crate::config::Webhook;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use std::net::ToSocketAddrs;
use std::time::Duration;
use tokio::sync::mpsc;

/// Start the sender on a thread of its own (idle without a webhook). Drop
/// the returned sender and join the thread to let pending alerts go out.
pub(super) fn start(
    hook: Option<Webhook>,
    metrics: AuditMetrics,
) -> (mpsc::Sender<AnomalyRow>, std::thread::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<AnomalyRow>(1024);
    let run = async move {
        let connector = Connector::new(None);
        while let Some(a) = rx.recv().await {
            let Some(hook) = &hook else { continue };
            let body = serde_json::json!({
                "id": alert_id(&a),
                "source": "collie",
                "rule": a.rule,
                "tenant": a.tenant,
                "detail": a.detail,
                "ts_ms": a.ts_ms,
                "sidecar": a.sidecar,
            })
            .to_string();
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
                    Ok(Ok(status)) => log::warn!(
                        "anomaly webhook answered {status} (attempt {})",
                        attempt + 1
                    ),
                    Ok(Err(e)) => {
                        log::warn!("anomaly webhook failed: {e} (attempt {})", attempt + 1)
                    }
                    Err(_) => log::warn!("anomaly webhook timed out (attempt {})", attempt + 1),
                }
                if attempt < hook.retries {
                    tokio::time::sleep(hook.backoff.saturating_mul(1 << attempt.min(8))).await;
                }
            }
            if !delivered {
                log::error!(
                    "anomaly webhook never accepted the {} alert after {} attempts (it is in the trail)",
                    a.rule,
                    hook.retries + 1
                );
                metrics.webhook_failures.inc();
            }
        }
    };
    let thread = std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(run),
            Err(e) => log::error!("anomaly webhook cannot start: {e}"),
        }
    });
    (tx, thread)
}

/// The alert's identity: the same for every attempt, different for every
/// alert (an anomaly is stored once per rule, scope and time).
fn alert_id(a: &AnomalyRow) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        a.sidecar.as_str(),
        &a.ts_ms.to_string(),
        &a.rule,
        a.tenant.as_deref().unwrap_or("\u{0}"),
        &a.detail,
    ] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    hex::encode(&h.finalize()[..16])
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
