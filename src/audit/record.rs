//! One audit record per request, built from the request's [`Finished`]
//! story in the logging phase; its request hash and chain hash are computed
//! later, off the hot path, by the writer.

use crate::outcome::{Claimed, Finished};
use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::time::UNIX_EPOCH;

/// The claimed tenant of a refused request that named no configured tenant.
/// The header's text is not kept: it is free text, and may hold a secret.
pub(crate) const UNKNOWN_TENANT: &str = "(unknown)";

/// A request as recorded. Never holds a key, an `Authorization` value or a
/// provider's error body: none of them is ever put into the context.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// When the request started, in milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// The request's id, also sent to the client as `x-collie-request-id`.
    pub request_id: String,
    /// The tenant the request proved it is; `None` until one is proven.
    pub tenant: Option<String>,
    /// Refused by authentication: the configured tenant the request named
    /// in `X-Tenant-ID` but did not prove (`(unknown)` when it named none).
    /// Claimed, never proven; never billed.
    pub claimed_tenant: Option<String>,
    /// The end user the request named (`X-User-ID`, else the body's
    /// `user`), as recorded: within the length and characters allowed,
    /// plain or hashed (`audit.user_ids`); `None` when it named none.
    /// Client-provided text: it proves nothing and bills no one.
    pub user: Option<String>,
    /// The client's IP address, when the connection had one.
    pub client_ip: Option<String>,
    /// `chat`, `completions`, `embeddings`, `responses`, `models` or `quota`.
    pub endpoint: String,
    /// The model the client asked for: a configured name, or
    /// `unknown:<fingerprint>` for one that is not (it may be a key sent by
    /// mistake, so its text is not kept).
    pub requested_model: Option<String>,
    /// The provider's model name of the deployment whose answer the client got.
    pub served_model: Option<String>,
    /// The id of the deployment whose answer the client got.
    pub deployment: Option<String>,
    /// JSON: `[{"deployment":…,"outcome":…}]`.
    pub attempts: String,
    /// The HTTP status the client got; 0 when it got none.
    pub status: i64,
    /// `admitted` or `refused`.
    pub decision: String,
    /// What refused it (an error code or a quota window), if anything.
    pub rule: Option<String>,
    /// Prompt tokens; `None` when neither the provider nor Collie counted them.
    pub prompt_tokens: Option<i64>,
    /// Completion tokens; `None` when neither the provider nor Collie counted them.
    pub completion_tokens: Option<i64>,
    /// The provider's total, else prompt plus completion when both are known.
    pub total_tokens: Option<i64>,
    /// The token counts are Collie's estimate, not the provider's report.
    pub usage_estimated: bool,
    /// Cost in nanodollars (USD × 10⁹) at the served model's price; `None`
    /// when the price or a needed token count is unknown.
    pub cost_nano: Option<i64>,
    /// From the request's start to its end, in milliseconds.
    pub latency_ms: f64,
    /// From the request's start to the first response byte from a provider
    /// sent on to the client, in milliseconds; `None` when none came.
    pub ttft_ms: Option<f64>,
    /// The provider answered with an SSE stream.
    pub streamed: bool,
    /// The response was cut off before its end (by the provider, a client
    /// that stopped reading, or a stop past its drain timeout).
    pub truncated: bool,
    /// The client went away before its answer was complete.
    pub client_gone: bool,
    /// SHA-256 of the canonical JSON of the request body (set by the writer).
    pub request_hash: Option<String>,
    /// The first `audit.preview_bytes` of a 2xx response body, when kept.
    pub response_preview: Option<String>,
    /// Collie's own short reason for a failure or a cut (never a provider's
    /// error body, which may echo a key); `None` for a success.
    pub error: Option<String>,
}

/// A finished request on its way to the writer; its request hash is set
/// here when it was taken on the request path (queue over its byte budget).
pub(crate) struct Pending {
    pub(crate) finished: Finished,
    pub(crate) request_hash: Option<String>,
}

#[derive(Serialize)]
struct AttemptJson<'a> {
    deployment: &'a str,
    outcome: String,
}

/// The record of a finished request, and its body (for the request hash,
/// set later by the writer unless `request_hash` is given).
pub(crate) fn record_of(f: Finished, request_hash: Option<String>) -> (Record, Option<Bytes>) {
    let snap = &f.snapshot;
    let upstream = |d| snap.router.deployment(d);
    let served = f.served.and_then(upstream);
    let attempts: Vec<AttemptJson<'_>> = f
        .attempts
        .iter()
        .map(|a| AttemptJson {
            deployment: upstream(a.deployment).map_or("?", |u| u.id.as_str()),
            outcome: match &a.outcome {
                Ok(s) => format!("HTTP {s}"),
                Err(e) => e.to_string(),
            },
        })
        .collect();
    let admitted = f.admitted();
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let usage = f.usage;
    let cut = f.cut();
    let code = f.error_code();
    let record = Record {
        ts_ms: f
            .started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        tenant: f
            .tenant
            .and_then(|t| snap.config.tenants.get(t))
            .map(|t| t.id.clone()),
        claimed_tenant: f.claimed.map(|c| match c {
            Claimed::Tenant(i) => snap
                .config
                .tenants
                .get(i)
                .map_or_else(|| UNKNOWN_TENANT.to_string(), |t| t.id.clone()),
            Claimed::Unknown => UNKNOWN_TENANT.to_string(),
        }),
        user: f.user.clone(),
        client_ip: f.client_ip.map(|ip| ip.to_string()),
        endpoint: f.endpoint.label().to_string(),
        served_model: served.map(|u| u.model.clone()),
        deployment: served.map(|u| u.id.clone()),
        attempts: serde_json::to_string(&attempts).unwrap_or_else(|_| "[]".into()),
        status: i64::from(f.status),
        decision: if admitted { "admitted" } else { "refused" }.to_string(),
        rule: if admitted {
            None
        } else {
            f.refused_by()
                .map(str::to_string)
                .or_else(|| code.map(|c| c.label().to_string()))
        },
        prompt_tokens: usage.and_then(|u| u.prompt_tokens).map(as_i64),
        completion_tokens: usage.and_then(|u| u.completion_tokens).map(as_i64),
        total_tokens: usage.and_then(|u| u.total()).map(as_i64),
        usage_estimated: f.usage_estimated,
        cost_nano: usage
            .zip(served)
            .and_then(|(u, s)| u.cost_nano_usd(s.price))
            .map(as_i64),
        latency_ms: f.latency.as_secs_f64() * 1e3,
        ttft_ms: f.ttft.map(|t| t.as_secs_f64() * 1e3),
        streamed: f.streamed,
        truncated: cut.is_some(),
        client_gone: f.client_gone,
        request_hash,
        response_preview: f.preview.map(|p| String::from_utf8_lossy(&p).into_owned()),
        // Only Collie's own short reasons: a provider's error body may
        // echo a key, so it is never kept.
        error: if let Some(cut) = cut {
            Some(format!("stream_interrupted: {}", cut.reason()))
        } else if admitted && (200..400).contains(&f.status) {
            None
        } else {
            code.map(|c| c.label().to_string())
        },
        request_id: f.id,
        requested_model: f.requested_model,
    };
    (record, f.body)
}

impl Record {
    /// Failed: an error status, no answer at all, or a response the provider
    /// broke off mid-way (the client got a 200 head and part of a body).
    pub fn failed(&self) -> bool {
        self.status >= 400 || self.status == 0 || self.truncated
    }

    /// The hash chaining this record to the one before it (same sidecar):
    /// SHA-256 over the previous hash, the position and every field, each
    /// field's text followed by 0x1F (absent: a NUL). The fields are
    /// gathered in one buffer and hashed once.
    pub fn chain_hash(&self, sidecar: &str, seq: i64, prev_hash: &str) -> String {
        let mut h = Fields(Vec::with_capacity(1024));
        h.text(prev_hash);
        h.text(sidecar);
        h.int(seq);
        h.int(self.ts_ms);
        h.text(&self.request_id);
        h.opt(&self.tenant);
        h.opt(&self.client_ip);
        h.text(&self.endpoint);
        h.opt(&self.requested_model);
        h.opt(&self.served_model);
        h.opt(&self.deployment);
        h.text(&self.attempts);
        h.int(self.status);
        h.text(&self.decision);
        h.opt(&self.rule);
        h.opt_int(self.prompt_tokens);
        h.opt_int(self.completion_tokens);
        h.opt_int(self.total_tokens);
        h.flag(self.usage_estimated);
        h.opt_int(self.cost_nano);
        // Floats are hashed as stored (their exact bits).
        h.uint(self.latency_ms.to_bits());
        match self.ttft_ms {
            Some(v) => h.uint(v.to_bits()),
            None => h.text(NONE),
        }
        h.flag(self.streamed);
        h.flag(self.truncated);
        h.flag(self.client_gone);
        h.opt(&self.request_hash);
        h.opt(&self.response_preview);
        h.opt(&self.error);
        // Added in schema v2: hashed only when present, so the records
        // written before it still verify.
        if let Some(c) = &self.claimed_tenant {
            h.text("claimed_tenant");
            h.text(c);
        }
        // Added in schema v4, the same way.
        if let Some(u) = &self.user {
            h.text("user");
            h.text(u);
        }
        lower_hex(&Sha256::digest(&h.0))
    }
}

/// Bytes as lowercase hex digits, a digit at a time into a string of the
/// right size (`hex::encode` collects an iterator of chars: 4.7k
/// instructions per record for the writer's two hashes).
pub(crate) fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// An absent field, as hashed.
const NONE: &str = "\u{0}";

/// The chain hash's encoding of fields, gathered first and hashed in one
/// go: fed to the hasher a piece at a time (two pieces per field), its
/// buffering cost more than the hashing.
struct Fields(Vec<u8>);

impl Fields {
    fn text(&mut self, v: &str) {
        self.0.extend_from_slice(v.as_bytes());
        self.0.push(0x1f);
    }

    fn opt(&mut self, v: &Option<String>) {
        self.text(v.as_deref().unwrap_or(NONE));
    }

    fn flag(&mut self, v: bool) {
        self.text(if v { "1" } else { "0" });
    }

    /// Decimal, as `to_string` writes it.
    fn int(&mut self, v: i64) {
        self.text(itoa::Buffer::new().format(v));
    }

    fn uint(&mut self, v: u64) {
        self.text(itoa::Buffer::new().format(v));
    }

    fn opt_int(&mut self, v: Option<i64>) {
        match v {
            Some(n) => self.int(n),
            None => self.text(NONE),
        }
    }
}

pub use super::canonical::request_hash;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_hex_writes_every_byte_as_hex_encode_does() {
        let every: Vec<u8> = (0..=255).collect();
        assert_eq!(lower_hex(&every), hex::encode(&every));
        assert_eq!(lower_hex(&[]), "");
    }

    fn sample() -> Record {
        Record {
            ts_ms: 1_700_000_000_123,
            request_id: "req_0123".into(),
            tenant: Some("alpha".into()),
            claimed_tenant: None,
            user: None,
            client_ip: Some("127.0.0.1".into()),
            endpoint: "chat".into(),
            requested_model: Some("gpt".into()),
            served_model: Some("gpt-a".into()),
            deployment: Some("a".into()),
            attempts: r#"[{"deployment":"a","outcome":"HTTP 200"}]"#.into(),
            status: 200,
            decision: "admitted".into(),
            rule: None,
            prompt_tokens: Some(12),
            completion_tokens: Some(-9),
            total_tokens: None,
            usage_estimated: true,
            cost_nano: Some(i64::MIN),
            latency_ms: 0.41,
            ttft_ms: Some(0.39),
            streamed: false,
            truncated: true,
            client_gone: false,
            request_hash: Some("ab".repeat(32)),
            response_preview: None,
            error: Some("stream_interrupted: ConnectionClosed".into()),
        }
    }

    /// The chain hash of a record is part of every stored trail: it must
    /// never change for the same fields (pinned values from the first
    /// release's definition; the claimed tenant only when present).
    #[test]
    fn chain_hashes_are_stable() {
        assert_eq!(
            sample().chain_hash("s", 7, "prev"),
            "c56a222d6ef8a9d6d0434bb698dc58bb8f8a090ae42a093e75ddef0b007e5a7c"
        );
        let claimed = Record {
            claimed_tenant: Some("beta".into()),
            ..sample()
        };
        assert_eq!(
            claimed.chain_hash("s", 7, "prev"),
            "13510d0578b35446d5790547efbb64809b1835aaa266d384caecc8d55d53ad8c"
        );
        // A user changes the hash only when present.
        let with_user = Record {
            user: Some("u-1".into()),
            ..claimed.clone()
        };
        assert_ne!(
            with_user.chain_hash("s", 7, "prev"),
            claimed.chain_hash("s", 7, "prev")
        );
        // Every integer as `to_string` writes it.
        for v in [0, 1, -1, 9, 10, 12345, i64::MIN, i64::MAX] {
            let mut a = Fields(Vec::new());
            a.int(v);
            let mut b = Fields(Vec::new());
            b.text(&v.to_string());
            assert_eq!(a.0, b.0, "{v}");
        }
        for v in [0, 7, u64::MAX, 0.41f64.to_bits()] {
            let mut a = Fields(Vec::new());
            a.uint(v);
            let mut b = Fields(Vec::new());
            b.text(&v.to_string());
            assert_eq!(a.0, b.0, "{v}");
        }
    }
}
