//! Entry points for the fuzz targets in `fuzz/` and for replaying their
//! corpora in `cargo test` (`tests/fuzz_corpus.rs`). Each takes arbitrary
//! bytes, drives one parser of hostile input the way the gateway does, and
//! asserts what must hold for every input. Not part of the gateway's
//! interface: hidden from its documentation.
#![expect(
    clippy::panic,
    clippy::expect_used,
    clippy::arithmetic_side_effects,
    reason = "a fuzz check fails loudly, on small numbers"
)]

use crate::gateway::body;
use crate::listener::{HeadLimits, HeadScan};
use crate::redact::KeyMask;
use crate::usage::sse::SseObserver;
use bytes::Bytes;
use std::time::Duration;

/// Chunk sizes for feeding `data` in pieces, chosen by `seed`.
fn pieces(data: &[u8], seed: u8) -> impl Iterator<Item = &[u8]> {
    let size = usize::from(seed % 64) + 1;
    data.chunks(size)
}

/// The first byte steers the check (split sizes, flags); the rest is input.
fn split(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&seed, rest)) => (seed, rest),
        None => (0, data),
    }
}

/// A request body: inspected as the gateway does, and when accepted,
/// rewritten for an attempt. The rewrite must be valid JSON that differs
/// from the client's only in `model` (and `stream_options.include_usage`
/// when asked for).
pub fn request_body(data: &[u8]) {
    let (seed, input) = split(data);
    let body = Bytes::copy_from_slice(input);
    let Ok(inspected) = body::inspect(&body, 32) else {
        return;
    };
    assert!(!inspected.model.is_empty());
    assert!(std::str::from_utf8(input).is_ok(), "accepted invalid UTF-8");
    let inject = seed & 1 == 1;
    let upstream = "fuzz-\"model\"-\u{e9}";
    let rewritten = inspected
        .body_for(&body, upstream, inject)
        .expect("an inspected body can be rewritten");
    // The comparison below needs both documents as values; a number no
    // f64 holds (valid JSON, forwarded as sent) has none.
    let Ok(mut expected) = serde_json::from_slice::<serde_json::Value>(input) else {
        return;
    };
    let got: serde_json::Value = serde_json::from_slice(&rewritten.to_vec())
        .unwrap_or_else(|e| panic!("the rewrite is not JSON ({e})"));
    expected["model"] = serde_json::Value::from(upstream);
    if inject {
        let opts = &mut expected["stream_options"];
        if !opts.is_object() {
            *opts = serde_json::json!({});
        }
        opts["include_usage"] = serde_json::Value::Bool(true);
    }
    assert_eq!(got, expected, "the rewrite changed more than it should");
}

/// A server-sent-events stream fed in pieces: passed through byte for byte
/// (or, stripping, only whole events removed), whatever the pieces.
pub fn sse_stream(data: &[u8]) {
    let (seed, input) = split(data);
    let strip = seed & 0x80 != 0;
    let mut observer = SseObserver::new(strip);
    let mut out = Vec::with_capacity(input.len());
    for p in pieces(input, seed) {
        out.extend_from_slice(&observer.feed(Bytes::copy_from_slice(p)));
    }
    out.extend_from_slice(&observer.finish());
    if strip {
        assert!(out.len() <= input.len());
    } else {
        assert_eq!(out, input, "pass-through changed the stream");
    }
    assert!(observer.delivered_tokens() <= input.len() as u64 + 1);
}

/// Identity headers from arbitrary lines (`name: value`): the checks the
/// gateway runs before anything else never panic, and a request they let
/// through carries at most one of each identity header.
pub fn identity_headers(data: &[u8]) {
    let mut req = pingora::http::RequestHeader::build("POST", b"/v1/chat/completions", None)
        .expect("a fixed request line");
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        let _ = req.append_header(name, value);
    }
    let single = crate::gateway::admission::single_identity(&req).is_ok();
    let key = crate::gateway::admission::presented_key(&req);
    if single {
        for name in ["x-tenant-id", "authorization", "api-key"] {
            assert!(req.headers.get_all(name).iter().count() <= 1);
        }
    }
    if let Some(k) = key {
        assert!(!k.is_empty());
    }
}

/// A config file: validated without a panic, whatever it says.
pub fn config_file(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::config::Config::from_yaml(&text, &|_| Some("fuzz-key-value".into()));
}

/// `Retry-After` and `retry-after-ms` values: a wait, when there is one,
/// is above zero and capped.
pub fn retry_after(data: &[u8]) {
    let (seed, input) = split(data);
    let mut head = pingora::http::ResponseHeader::build(429, None).expect("a status");
    let mid = usize::from(seed) % (input.len() + 1);
    for (name, value) in [
        ("retry-after", &input[..mid]),
        ("retry-after-ms", &input[mid..]),
    ] {
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            let _ = head.insert_header(name, v);
        }
    }
    if let Some(wait) = crate::gateway::exchange::retry_after(&head) {
        assert!(!wait.is_zero());
        assert!(wait <= crate::gateway::exchange::MAX_RETRY_AFTER);
    }
}

/// A body carrying a key, in pieces: the key never comes out, every other
/// byte does, at the same length.
pub fn key_mask(data: &[u8]) {
    let (seed, input) = split(data);
    let key_len = usize::from(seed % 24) + 8;
    if input.len() < key_len {
        return;
    }
    let (key, body) = input.split_at(key_len);
    // Masking writes `*`: a key made partly of `*` could be rebuilt from
    // the mask itself. Provider keys are letters, digits, `-` and `_`.
    if key.contains(&b'*') {
        return;
    }
    let Some(mask) = KeyMask::new(key) else {
        return;
    };
    // Plant the key in the body, split across pieces.
    let mut planted = body.to_vec();
    let at = usize::from(seed) % (planted.len() + 1);
    planted.splice(at..at, key.iter().copied());
    let mut r = mask.redactor();
    let mut out = Vec::with_capacity(planted.len());
    for p in pieces(&planted, seed.rotate_left(3)) {
        out.extend_from_slice(&r.feed(Bytes::copy_from_slice(p)));
    }
    out.extend_from_slice(&r.finish());
    assert_eq!(out.len(), planted.len(), "the length changed");
    assert!(!mask.found_in(&out), "the key came out");
    for (o, i) in out.iter().zip(&planted) {
        assert!(o == i || *o == b'*', "a byte changed that was not masked");
    }
}

/// A request head arriving in pieces: counted without a panic; a head
/// found whole has a request line, and no more bytes counted than read.
pub fn request_head(data: &[u8]) {
    let (seed, input) = split(data);
    let limits = HeadLimits {
        head_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        max_bytes: 1 << 12,
        max_headers: usize::from(seed % 32) + 1,
    };
    let mut scan = HeadScan::default();
    for p in pieces(input, seed) {
        if scan.feed(p, &limits).is_err() {
            return;
        }
    }
    assert!(scan.bytes() <= input.len());
    if scan.is_complete() {
        assert!(scan.lines() >= 1);
        assert!(scan.lines() <= limits.max_headers + 1);
    }
}
