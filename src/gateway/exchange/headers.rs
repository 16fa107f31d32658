//! Header rules of the exchange: what never crosses a hop, what of the
//! client's request a provider gets, what of a provider's response head the
//! client gets, and how a provider's `Retry-After` is read.

use super::super::{Endpoint, GatewayError, RequestCtx};
use crate::routing::Deployment;
use http::header;
use http::{HeaderMap, HeaderValue};
use pingora::Error;
use pingora::http::{RequestHeader, ResponseHeader};
use std::time::Duration;

/// Longest `Retry-After` honoured; a larger value is capped, not ignored.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Headers that describe one hop, never forwarded in either direction.
pub(super) fn hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Fields a peer named in its `Connection` header: hop-by-hop too (RFC 9110
/// §7.6.1). Usually none, so usually no allocation.
fn connection_nominated(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect()
}

/// Client headers that must not reach a provider: credentials, routing
/// headers meant for Collie, and framing that Collie sets itself.
/// `accept-encoding` is dropped so the provider answers uncompressed and the
/// usage in the response can be read.
fn withheld_from_upstream(name: &header::HeaderName) -> bool {
    hop_by_hop(name)
        || matches!(
            name.as_str(),
            "host"
                | "content-length"
                | "authorization"
                | "api-key"
                | "x-tenant-id"
                | "accept-encoding"
                | "expect"
                | "cookie"
        )
        || name.as_str().starts_with("x-collie-")
}

pub(super) fn upstream_request(
    client: &RequestHeader,
    upstream: &Deployment,
    endpoint: Endpoint,
    content_length: usize,
) -> Result<RequestHeader, GatewayError> {
    let internal = |e: Box<Error>| GatewayError::Internal(e.to_string());
    let mut path = String::with_capacity(upstream.path_prefix.len() + 32);
    path.push_str(&upstream.path_prefix);
    path.push_str(endpoint.upstream_suffix());
    if let Some(q) = client.uri.query() {
        path.push('?');
        path.push_str(q);
    }
    // Header names go out in lower case: no case map to keep per request.
    let req = RequestHeader::build_no_case("POST", path.as_bytes(), Some(client.headers.len() + 4))
        .map_err(internal)?;
    let nominated = connection_nominated(&client.headers);
    Ok(edit_request(req, |headers| {
        for (name, value) in client.headers.iter() {
            if withheld_from_upstream(name) || nominated.iter().any(|n| n == name.as_str()) {
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        headers.insert(header::HOST, upstream.host.clone());
        if let Some((name, value)) = &upstream.auth {
            headers.insert(name.clone(), value.clone());
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(content_length));
    }))
}

/// Change the headers of a head built without a case map
/// (`build_no_case`) on its `http` parts. Pingora's own `insert_header` and
/// `append_header` copy each name and parse it again to keep its case —
/// two allocations and a parse per header, most of the cost of building a
/// head — which a head whose names go out in lower case does not need.
pub(crate) fn edit_response(
    head: ResponseHeader,
    edit: impl FnOnce(&mut HeaderMap),
) -> ResponseHeader {
    let mut parts = http::response::Parts::from(head);
    edit(&mut parts.headers);
    ResponseHeader::from(parts)
}

/// [`edit_response`] for a request head: its target is its URI.
fn edit_request(head: RequestHeader, edit: impl FnOnce(&mut HeaderMap)) -> RequestHeader {
    let mut parts = http::request::Parts::from(head);
    edit(&mut parts.headers);
    RequestHeader::from(parts)
}

/// `retry-after-ms` (OpenAI, Azure) wins over `retry-after`, which is either
/// seconds or an HTTP date.
pub(crate) fn retry_after(head: &ResponseHeader) -> Option<Duration> {
    let text = |name: &str| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let wait = if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Duration::try_from_secs_f64(ms / 1000.0).ok()?
    } else {
        let v = text("retry-after")?;
        match v.parse::<f64>() {
            Ok(s) => Duration::try_from_secs_f64(s).ok()?,
            Err(_) => httpdate::parse_http_date(v)
                .ok()?
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO),
        }
    };
    (!wait.is_zero()).then_some(wait.min(MAX_RETRY_AFTER))
}

pub(super) fn client_response_head(
    upstream: &ResponseHeader,
    ctx: &RequestCtx,
    up: &Deployment,
    body_changes: bool,
    downstream_h2: bool,
) -> pingora::Result<ResponseHeader> {
    // Room for what is added below: framing, three `x-collie-*`, six
    // `x-ratelimit-*`.
    let resp = ResponseHeader::build_no_case(upstream.status, Some(upstream.headers.len() + 12))?;
    Ok(edit_response(resp, |headers| {
        let mut has_length = false;
        let nominated = connection_nominated(&upstream.headers);
        for (name, value) in upstream.headers.iter() {
            // The provider's limits for its key are not the tenant's
            // business; the tenant's own `x-ratelimit-*` are added below.
            if hop_by_hop(name)
                || name.as_str().starts_with("x-ratelimit-")
                || nominated.iter().any(|n| n == name.as_str())
            {
                continue;
            }
            if up
                .key_mask
                .as_ref()
                .is_some_and(|m| m.found_in(value.as_bytes()))
            {
                log::warn!(
                    "request {}: dropped response header `{name}` from {}: it carried the deployment's key",
                    ctx.id,
                    up.id
                );
                continue;
            }
            if name == header::CONTENT_LENGTH {
                if body_changes {
                    continue;
                }
                has_length = true;
            }
            headers.append(name.clone(), value.clone());
        }
        // A response that has no body by definition gets no framing either.
        let bodiless = matches!(upstream.status.as_u16(), 100..=199 | 204 | 304);
        if !has_length && !downstream_h2 && !bodiless {
            headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        headers.insert(super::super::X_COLLIE_MODEL, up.model_header.clone());
        headers.insert(
            super::super::X_COLLIE_ATTEMPTS,
            HeaderValue::from(ctx.exchange.attempts.len()),
        );
        if let Ok(id) = HeaderValue::from_str(&ctx.id) {
            headers.insert(super::super::X_COLLIE_REQUEST_ID, id);
        }
        super::super::spend::rate_headers(ctx, headers);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&str, &str)]) -> ResponseHeader {
        let mut h = ResponseHeader::build(429, None).unwrap();
        for (k, v) in pairs {
            h.append_header(k.to_string(), *v).unwrap();
        }
        h
    }

    #[test]
    fn retry_after_in_every_form() {
        let wait = |pairs: &[(&str, &str)]| retry_after(&head(pairs));
        assert_eq!(wait(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(
            wait(&[("retry-after", " 1.5 ")]),
            Some(Duration::from_millis(1500))
        );
        // Milliseconds win over seconds.
        assert_eq!(
            wait(&[("retry-after", "7"), ("retry-after-ms", "250")]),
            Some(Duration::from_millis(250))
        );
        // An HTTP date: the time until then; a past one is no wait.
        let later =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        let got = wait(&[("retry-after", &later)]).unwrap();
        assert!(
            got > Duration::from_secs(100) && got <= Duration::from_secs(120),
            "{got:?}"
        );
        assert_eq!(
            wait(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]),
            None
        );
        // Capped, not ignored; zero, negative and garbage are no wait.
        assert_eq!(wait(&[("retry-after", "99999999")]), Some(MAX_RETRY_AFTER));
        for v in ["0", "-5", "soon", "NaN", "inf", "1e400"] {
            assert_eq!(wait(&[("retry-after", v)]), None, "{v}");
        }
        assert_eq!(wait(&[]), None);
    }

    #[test]
    fn hop_by_hop_rules() {
        for n in [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
        ] {
            assert!(hop_by_hop(&header::HeaderName::from_static(n)), "{n}");
        }
        assert!(!hop_by_hop(&header::CONTENT_TYPE));
        let mut h = http::HeaderMap::new();
        h.append(header::CONNECTION, "close, X-Debug".parse().unwrap());
        h.append(header::CONNECTION, "keep-alive , x-trace".parse().unwrap());
        assert_eq!(connection_nominated(&h), ["x-debug", "x-trace"]);
        // What a provider never gets from the client.
        for n in [
            "authorization",
            "api-key",
            "x-tenant-id",
            "cookie",
            "host",
            "content-length",
            "accept-encoding",
            "expect",
            "x-collie-route",
            "x-collie-max-wait",
        ] {
            assert!(
                withheld_from_upstream(&header::HeaderName::from_bytes(n.as_bytes()).unwrap()),
                "{n}"
            );
        }
        for n in [
            "content-type",
            "openai-organization",
            "x-stainless-timeout",
            "user-agent",
        ] {
            assert!(
                !withheld_from_upstream(&header::HeaderName::from_bytes(n.as_bytes()).unwrap()),
                "{n}"
            );
        }
    }
}
