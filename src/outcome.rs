//! A request's story once it has ended, as one typed value: who asked, for
//! what, which attempts were made and how it ended. The gateway produces a
//! [`Finished`] once, when the request ends; quota settlement, metrics and
//! the audit trail consume it in turn. Settlement adds its verdict to it;
//! nothing else is rewritten, so what metrics count and what the trail
//! records is the same story.

use crate::config::DeploymentIx;
use crate::quota::Settlement;
use crate::state::Snapshot;
use crate::usage::Usage;
use bytes::Bytes;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The OpenAI endpoints Collie serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Models,
    /// `GET /v1/collie/quota`: the tenant's own quota.
    Quota,
}

impl Endpoint {
    /// The path after the deployment's base URL.
    pub(crate) fn upstream_suffix(self) -> &'static str {
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
    pub(crate) fn supports_stream_options(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }

    /// The label in metrics and audit records.
    pub(crate) fn label(self) -> &'static str {
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

/// The tenant a request named, as the audit records it for a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claimed {
    /// A configured tenant (its index).
    Tenant(usize),
    /// A name no tenant has (its text is not kept: it may hold a secret).
    Unknown,
}

/// How one attempt ended without being passed to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    Connect(String),
    Timeout,
    Broken(String),
    Status(u16),
    /// The client left before the response head arrived.
    Abandoned,
    /// The request's deadline passed while the attempt waited.
    Deadline,
    /// A graceful stop cut the attempt off.
    Shutdown,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect failed ({e})"),
            Failure::Timeout => f.write_str("no response head before the first-byte timeout"),
            Failure::Broken(e) => write!(f, "connection failed ({e})"),
            Failure::Status(s) => write!(f, "HTTP {s}"),
            Failure::Abandoned => f.write_str("the client left before the response"),
            Failure::Deadline => f.write_str("cut off by the request deadline"),
            Failure::Shutdown => f.write_str("cut off by the gateway's shutdown"),
        }
    }
}

impl Failure {
    /// Label for the attempts metric.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "connect_error",
            Failure::Timeout => "timeout",
            Failure::Broken(_) => "broken",
            Failure::Status(429) => "status_429",
            Failure::Status(_) => "status_5xx",
            Failure::Abandoned => "client_gone",
            Failure::Deadline => "deadline",
            Failure::Shutdown => "shutdown",
        }
    }
}

/// One attempt as recorded on the request.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    /// The deployment it was made to.
    pub(crate) deployment: DeploymentIx,
    pub(crate) outcome: Result<u16, Failure>,
    /// Tokens taken from the deployment's own per-minute limit.
    pub(crate) tokens_taken: u64,
    /// Position in the fallback chain of the pool it was made in.
    pub(crate) position: usize,
}

/// Every reason Collie itself refuses or fails a request: the `code` of its
/// OpenAI-style error body, the `x-collie-error` header, and the label in
/// metrics and audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    AmbiguousIdentity,
    HeaderTooLarge,
    Overloaded,
    ShuttingDown,
    MissingTenant,
    MissingApiKey,
    InvalidApiKey,
    TenantMismatch,
    ModelNotAllowed,
    ModelNotFound,
    RequestTooLarge,
    InvalidBody,
    ClientTimeout,
    UnknownUrl,
    MethodNotAllowed,
    UpstreamRateLimited,
    UpstreamFailed,
    NoUpstream,
    NoHealthyUpstream,
    DeadlineExceeded,
    RateLimited,
    QuotaExceeded,
    QuotaUnavailable,
    QueueTimeout,
    ClientClosed,
    InternalError,
    InvalidHeader,
    ContextLengthExceeded,
    CostCeilingExceeded,
    LatencyBudgetExceeded,
}

impl ErrorCode {
    pub(crate) fn label(self) -> &'static str {
        use ErrorCode::*;
        match self {
            AmbiguousIdentity => "ambiguous_identity",
            HeaderTooLarge => "header_too_large",
            Overloaded => "overloaded",
            ShuttingDown => "shutting_down",
            MissingTenant => "missing_tenant",
            MissingApiKey => "missing_api_key",
            InvalidApiKey => "invalid_api_key",
            TenantMismatch => "tenant_mismatch",
            ModelNotAllowed => "model_not_allowed",
            ModelNotFound => "model_not_found",
            RequestTooLarge => "request_too_large",
            InvalidBody => "invalid_body",
            ClientTimeout => "client_timeout",
            UnknownUrl => "unknown_url",
            MethodNotAllowed => "method_not_allowed",
            UpstreamRateLimited => "upstream_rate_limited",
            UpstreamFailed => "upstream_failed",
            NoUpstream => "no_upstream",
            NoHealthyUpstream => "no_healthy_upstream",
            DeadlineExceeded => "deadline_exceeded",
            RateLimited => "rate_limited",
            QuotaExceeded => "quota_exceeded",
            QuotaUnavailable => "quota_unavailable",
            QueueTimeout => "queue_timeout",
            ClientClosed => "client_closed",
            InternalError => "internal_error",
            InvalidHeader => "invalid_header",
            ContextLengthExceeded => "context_length_exceeded",
            CostCeilingExceeded => "cost_ceiling_exceeded",
            LatencyBudgetExceeded => "latency_budget_exceeded",
        }
    }
}

/// Why a relayed response was cut short after its head went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// The provider broke it off (a short, fixed reason; never the
    /// provider's words).
    Upstream(&'static str),
    /// Collie cut it: the client did not read for longer than a write may wait.
    SlowClient,
    /// Collie cut it: a graceful stop's drain timeout passed.
    Shutdown,
}

impl Cut {
    /// The reason as recorded.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Cut::Upstream(why) => why,
            Cut::SlowClient => "the client did not read in time",
            Cut::Shutdown => "the gateway shut down",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Collie answered it itself (`/v1/models`, `/v1/collie/quota`).
    Answered,
    /// Collie refused or failed it (before relaying any provider answer);
    /// `window` names the quota window that refused it, when one did.
    Failed {
        code: ErrorCode,
        window: Option<String>,
    },
    /// A provider's answer was relayed (whatever its status), whole or cut.
    Relayed { cut: Option<Cut> },
    /// No answer at all: the client left while it waited for a pool slot.
    Unanswered,
}

/// A finished request: everything settlement, metrics and the audit trail
/// need, decided once.
pub(crate) struct Finished {
    pub(crate) id: String,
    /// The config the request ran under, start to end.
    pub(crate) snapshot: Arc<Snapshot>,
    /// Wall-clock start, for records.
    pub(crate) started_at: SystemTime,
    pub(crate) latency: Duration,
    /// Until the first response byte reached the client.
    pub(crate) ttft: Option<Duration>,
    /// Time spent waiting for a pool slot, if any.
    pub(crate) queued: Option<Duration>,
    pub(crate) client_ip: Option<IpAddr>,
    pub(crate) endpoint: Endpoint,
    /// Index of the proven tenant.
    pub(crate) tenant: Option<usize>,
    /// Refused by authentication: the tenant `X-Tenant-ID` named (for the
    /// audit's security view; never billed).
    pub(crate) claimed: Option<Claimed>,
    /// The end user the request named, within its proven tenant, as it is
    /// recorded (the gateway's admission decides the form).
    pub(crate) user: Option<String>,
    /// The tenant's priority (1 highest … 5).
    pub(crate) priority: u8,
    /// A configured model name, or `unknown:<fingerprint>` for one that
    /// does not exist (the text may be a key sent by mistake).
    pub(crate) requested_model: Option<String>,
    pub(crate) attempts: Vec<Attempt>,
    /// The deployment whose response the client got.
    pub(crate) served: Option<DeploymentIx>,
    /// (from, to) deployments when the request fell back along its chain.
    pub(crate) fallback: Option<(DeploymentIx, DeploymentIx)>,
    /// The status the client got (0: none).
    pub(crate) status: u16,
    pub(crate) end: End,
    /// The client went away before its answer was complete.
    pub(crate) client_gone: bool,
    pub(crate) streamed: bool,
    /// What the provider reported or, marked estimated, Collie counted.
    pub(crate) usage: Option<Usage>,
    pub(crate) usage_estimated: bool,
    /// How the quota reservation was settled (set by settlement).
    pub(crate) settlement: Option<Settlement>,
    /// The first bytes of the response, when the audit keeps a preview.
    pub(crate) preview: Option<Vec<u8>>,
    /// The request body as the client sent it, for the audit's request hash.
    pub(crate) body: Option<Bytes>,
}

impl Finished {
    /// Admitted: it reached a provider, or Collie answered it without
    /// refusing it (its own endpoints), or it was let in and then left by
    /// its client.
    pub(crate) fn admitted(&self) -> bool {
        !self.attempts.is_empty() || !matches!(self.end, End::Failed { .. })
    }

    /// Collie's reason, when Collie refused or failed the request.
    pub(crate) fn error_code(&self) -> Option<ErrorCode> {
        match self.end {
            End::Failed { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The quota window that refused the request (`day.tokens`,
    /// `model:gpt.minute.requests`, …).
    pub(crate) fn refused_by(&self) -> Option<&str> {
        match &self.end {
            End::Failed { window, .. } => window.as_deref(),
            _ => None,
        }
    }

    /// Why the relayed response was cut short, if it was.
    pub(crate) fn cut(&self) -> Option<Cut> {
        match self.end {
            End::Relayed { cut } => cut,
            _ => None,
        }
    }
}
