//! Every way the gateway itself can refuse or fail a request, mapped to an
//! HTTP status, an OpenAI-style error body and a short reason label for
//! metrics and logs. The mapping is exhaustive on purpose: a new variant
//! must decide its status here.

use crate::outcome::ErrorCode;
use crate::quota::RefusalKind;
use bytes::Bytes;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("missing X-Tenant-ID header")]
    MissingTenant,
    #[error("missing API key: send `Authorization: Bearer <key>` or `api-key: <key>`")]
    MissingKey,
    /// Two headers that each name a tenant or present a key.
    #[error("the request carries more than one `{0}` header; send exactly one identity")]
    AmbiguousIdentity(&'static str),
    #[error("the request head is larger than the gateway accepts")]
    HeaderTooLarge,
    /// Request bodies in flight hold all the memory set aside for them.
    #[error("the gateway is holding as many request bodies as it may; retry in {retry_after_s}s")]
    Overloaded { retry_after_s: u64 },
    /// A graceful stop cut the request off before an upstream answered.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("unknown tenant or invalid API key")]
    BadCredentials,
    #[error("this API key does not belong to the tenant named in X-Tenant-ID")]
    ForeignKey,
    #[error("model `{0}` is not allowed for this tenant")]
    ModelForbidden(String),
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{0}")]
    InvalidBody(String),
    #[error("timed out reading the request body")]
    ClientTimeout,
    #[error("unknown endpoint {0}")]
    UnknownEndpoint(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// Every deployment that could serve the model asked us to wait.
    #[error(
        "every deployment for this model is rate limited by its provider; retry in {retry_after_s}s"
    )]
    UpstreamsBusy { retry_after_s: u64 },
    /// Every attempt failed; `status` is the last upstream status (or 502/504
    /// for transport failures).
    #[error("all upstream attempts failed: {attempts}")]
    UpstreamsFailed {
        status: u16,
        attempts: String,
        retry_after_s: Option<u64>,
    },
    #[error("no upstream is available for this model")]
    NoUpstream,
    /// Every deployment of the chain is unhealthy and none is due a trial.
    #[error("every deployment for this model is unhealthy; retry in {retry_after_s}s")]
    NoHealthyUpstream { retry_after_s: u64 },
    #[error("the request deadline passed before an upstream answered")]
    DeadlineExceeded,
    /// The tenant's own quota refused the request.
    #[error("{}: the {window} limit is reached; retry in {retry_after_s}s", match kind { RefusalKind::RateLimited => "rate limited", RefusalKind::QuotaExceeded => "quota exceeded", RefusalKind::Unavailable => "quota unavailable (the fleet's quota authority cannot be reached)" })]
    Quota {
        window: String,
        kind: RefusalKind,
        retry_after_s: u64,
    },
    /// The pool stayed saturated for longer than the request may wait.
    #[error(
        "the model's capacity is saturated; no slot freed within the maximum wait, retry in {retry_after_s}s"
    )]
    QueueTimeout { retry_after_s: u64 },
    /// The client closed its connection before any response; nobody reads
    /// the answer, but the logs, metrics and audit trail say what happened.
    #[error("the client closed the connection before the response")]
    ClientClosed,
    #[error("internal error: {0}")]
    Internal(String),
    /// A request header Collie reads holds something it cannot use.
    #[error("header `{name}`: {reason}")]
    InvalidHeader { name: &'static str, reason: String },
    /// No deployment of the chain has room for the prompt and the output
    /// allowance (OpenAI's wording, with Collie's estimate).
    #[error(
        "This model's maximum context length is {largest} tokens. However, you requested about {needed} tokens ({prompt} estimated in the messages, {output} for the completion). Please reduce the length of the messages or completion."
    )]
    ContextLengthExceeded {
        largest: u64,
        needed: u64,
        prompt: u64,
        output: u64,
    },
    /// Every deployment that fits would cost more than the client's ceiling
    /// at worst (or has no price).
    #[error(
        "no deployment for this model can serve the request for at most {ceiling} USD (x-collie-max-cost-usd); {cheapest}"
    )]
    CostCeilingExceeded { ceiling: String, cheapest: String },
    /// Every deployment that fits is slower on average than the client's
    /// latency budget.
    #[error(
        "no deployment for this model answers within {budget_ms} ms on average (x-collie-latency-budget-ms); the fastest takes {fastest_ms} ms"
    )]
    LatencyBudgetExceeded { budget_ms: u64, fastest_ms: u64 },
}

/// The parts of an error response.
pub(crate) struct ErrorResponse {
    pub(crate) status: u16,
    pub(crate) retry_after_s: Option<u64>,
    pub(crate) reason: &'static str,
    pub(crate) body: Bytes,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl GatewayError {
    /// (status, OpenAI error type, code — also the reason label).
    fn parts(&self) -> (u16, &'static str, ErrorCode) {
        use ErrorCode as Code;
        use GatewayError::*;
        match self {
            AmbiguousIdentity(_) => (400, "invalid_request_error", Code::AmbiguousIdentity),
            HeaderTooLarge => (431, "invalid_request_error", Code::HeaderTooLarge),
            Overloaded { .. } => (503, "server_error", Code::Overloaded),
            ShuttingDown => (503, "server_error", Code::ShuttingDown),
            MissingTenant => (401, "authentication_error", Code::MissingTenant),
            MissingKey => (401, "authentication_error", Code::MissingApiKey),
            BadCredentials => (401, "authentication_error", Code::InvalidApiKey),
            ForeignKey => (403, "permission_error", Code::TenantMismatch),
            ModelForbidden(_) => (403, "permission_error", Code::ModelNotAllowed),
            ModelNotFound(_) => (404, "invalid_request_error", Code::ModelNotFound),
            BodyTooLarge { .. } => (413, "invalid_request_error", Code::RequestTooLarge),
            InvalidBody(_) => (400, "invalid_request_error", Code::InvalidBody),
            ClientTimeout => (408, "invalid_request_error", Code::ClientTimeout),
            UnknownEndpoint(_) => (404, "invalid_request_error", Code::UnknownUrl),
            MethodNotAllowed { .. } => (405, "invalid_request_error", Code::MethodNotAllowed),
            UpstreamsBusy { .. } => (429, "rate_limit_error", Code::UpstreamRateLimited),
            UpstreamsFailed { status, .. } => (*status, "upstream_error", Code::UpstreamFailed),
            NoUpstream => (503, "upstream_error", Code::NoUpstream),
            NoHealthyUpstream { .. } => (503, "upstream_error", Code::NoHealthyUpstream),
            DeadlineExceeded => (504, "upstream_error", Code::DeadlineExceeded),
            Quota {
                kind: RefusalKind::RateLimited,
                ..
            } => (429, "rate_limited", Code::RateLimited),
            Quota {
                kind: RefusalKind::QuotaExceeded,
                ..
            } => (429, "quota_exceeded", Code::QuotaExceeded),
            Quota {
                kind: RefusalKind::Unavailable,
                ..
            } => (503, "server_error", Code::QuotaUnavailable),
            QueueTimeout { .. } => (429, "rate_limited", Code::QueueTimeout),
            // 499 as the HTTP servers that log it use it: client closed request.
            ClientClosed => (499, "invalid_request_error", Code::ClientClosed),
            Internal(_) => (500, "server_error", Code::InternalError),
            InvalidHeader { .. } => (400, "invalid_request_error", Code::InvalidHeader),
            ContextLengthExceeded { .. } => {
                (400, "invalid_request_error", Code::ContextLengthExceeded)
            }
            CostCeilingExceeded { .. } => (400, "invalid_request_error", Code::CostCeilingExceeded),
            // The request is valid and may fit later: the averages move.
            LatencyBudgetExceeded { .. } => (503, "server_error", Code::LatencyBudgetExceeded),
        }
    }

    /// The reason, as metrics and the audit trail record it.
    pub(crate) fn code(&self) -> ErrorCode {
        self.parts().2
    }

    pub(crate) fn response(&self) -> ErrorResponse {
        let (status, kind, code) = self.parts();
        let message = self.to_string();
        let param = match self {
            GatewayError::ModelNotFound(_) | GatewayError::ModelForbidden(_) => Some("model"),
            GatewayError::ContextLengthExceeded { .. } => Some("messages"),
            GatewayError::InvalidHeader { name, .. } => Some(*name),
            _ => None,
        };
        let body = serde_json::to_vec(&Envelope {
            error: Body {
                message: &message,
                kind,
                param,
                code: code.label(),
            },
        })
        .unwrap_or_default();
        let retry_after_s = match self {
            GatewayError::UpstreamsBusy { retry_after_s }
            | GatewayError::NoHealthyUpstream { retry_after_s } => Some(*retry_after_s),
            GatewayError::UpstreamsFailed { retry_after_s, .. } => *retry_after_s,
            GatewayError::Quota { retry_after_s, .. }
            | GatewayError::QueueTimeout { retry_after_s }
            | GatewayError::Overloaded { retry_after_s } => Some(*retry_after_s),
            GatewayError::ShuttingDown => Some(1),
            _ => None,
        };
        ErrorResponse {
            status,
            retry_after_s,
            reason: code.label(),
            body: Bytes::from(body),
        }
    }
}

/// The SSE event that ends a stream cut short, by the upstream or by Collie
/// itself (the message says which).
pub(crate) fn stream_error_event(message: &str) -> Bytes {
    let body = serde_json::to_string(&Envelope {
        error: Body {
            message,
            kind: "upstream_error",
            param: None,
            code: "stream_interrupted",
        },
    })
    .unwrap_or_default();
    Bytes::from(format!("data: {body}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_shaped() {
        let r = GatewayError::ModelNotFound("gpt-9".into()).response();
        assert_eq!(r.status, 404);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
    }

    #[test]
    fn failed_attempts_keep_the_upstream_status() {
        let e = GatewayError::UpstreamsFailed {
            status: 503,
            attempts: "a: 503".into(),
            retry_after_s: Some(3),
        };
        let r = e.response();
        assert_eq!((r.status, r.retry_after_s), (503, Some(3)));
    }

    #[test]
    fn stream_error_event_is_one_sse_event() {
        let e = stream_error_event("upstream stream interrupted: reset");
        let text = std::str::from_utf8(&e).unwrap();
        assert!(text.starts_with("data: {\"error\":"));
        assert!(text.ends_with("\n\n"));
        assert_eq!(text.matches("\n\n").count(), 1);
    }
}
