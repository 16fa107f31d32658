//! The request body: read whole and bounded, inspected for the few fields the
//! gateway acts on, and rewritten per attempt by splicing — every byte outside
//! the replaced values stays as the client sent it.

use super::GatewayError;
use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::value::RawValue;
use smallvec::SmallVec;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Memory held by request bodies in flight, across every request. A body
/// is counted from before it is read (its declared length) or as it arrives
/// (chunked), until its request ends; beyond the limit a request is refused
/// with 503 and `Retry-After` instead of being read, so a burst of large
/// bodies cannot take the process out of memory.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    limit: AtomicUsize,
    held: AtomicUsize,
}

impl BodyBudget {
    pub(crate) fn new(limit: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            limit: AtomicUsize::new(limit),
            held: AtomicUsize::new(0),
        })
    }

    /// A reload may change the limit; holds already granted stay.
    pub(crate) fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes held by bodies now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    /// Hold `n` bytes, if the budget has them.
    pub(crate) fn hold(self: &Arc<Self>, n: usize) -> Option<BodyHold> {
        self.take(n).then(|| BodyHold {
            budget: Arc::clone(self),
            bytes: n,
        })
    }
}

/// Bytes of the budget held by one request's body; given back when dropped.
#[derive(Debug)]
pub(crate) struct BodyHold {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyHold {
    /// Hold at least `total` bytes; `false` when the budget is out.
    fn cover(&mut self, total: usize) -> bool {
        let more = total.saturating_sub(self.bytes);
        if more == 0 {
            return true;
        }
        if !self.budget.take(more) {
            return false;
        }
        self.bytes = total;
        true
    }
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// What the budget answers a body it cannot hold: retry shortly.
const BUSY_RETRY_S: u64 = 1;

/// Read the whole body, refusing more than `limit` bytes, within `timeout`
/// in all (a body trickled a byte at a time does not reset it). A declared
/// `Content-Length` over the limit is refused before anything is read, and
/// so is one the body budget cannot hold. The body is kept in one buffer
/// (or in the single piece it arrived in), counted in `hold`.
pub(crate) async fn read(
    session: &mut Session,
    limit: usize,
    timeout: Duration,
    budget: &Arc<BodyBudget>,
    hold: &mut Option<BodyHold>,
) -> Result<Bytes, GatewayError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        // The unread body makes the connection unusable for another request.
        session.set_keepalive(None);
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let Some(held) = budget.hold(declared.unwrap_or(0)) else {
        session.set_keepalive(None);
        return Err(GatewayError::Overloaded {
            retry_after_s: BUSY_RETRY_S,
        });
    };
    let held = hold.insert(held);
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session.write_continue_response().await.map_err(|e| {
            GatewayError::InvalidBody(format!("cannot continue: {}", e.etype().as_str()))
        })?;
    }
    // One deadline for the whole body instead of one timer per read.
    session.set_read_timeout(None);
    let deadline = tokio::time::Instant::now() + timeout;
    let read = tokio::time::timeout_at(deadline, read_chunks(session, limit, declared, held));
    match read.await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) => {
            session.set_keepalive(None);
            Err(e)
        }
        Err(_elapsed) => {
            session.set_keepalive(None);
            Err(GatewayError::ClientTimeout)
        }
    }
}

async fn read_chunks(
    session: &mut Session,
    limit: usize,
    declared: Option<usize>,
    hold: &mut BodyHold,
) -> Result<Bytes, GatewayError> {
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut total = 0usize;
    loop {
        let chunk = match session.read_request_body().await {
            Err(e) if e.etype() == &pingora::ErrorType::ReadTimedout => {
                return Err(GatewayError::ClientTimeout);
            }
            Err(e) => {
                return Err(GatewayError::InvalidBody(format!(
                    "cannot read the request body: {}",
                    e.etype().as_str()
                )));
            }
            Ok(None) => break,
            Ok(Some(chunk)) => chunk,
        };
        total = total.saturating_add(chunk.len());
        if total > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        if !hold.cover(total) {
            return Err(GatewayError::Overloaded {
                retry_after_s: BUSY_RETRY_S,
            });
        }
        // A body that arrives in one piece is kept as it is, without a copy.
        match (&mut first, &mut rest) {
            (None, _) => first = Some(chunk),
            (Some(f), None) => {
                let mut buf =
                    BytesMut::with_capacity(declared.unwrap_or(total).min(limit).max(total));
                buf.extend_from_slice(f);
                buf.extend_from_slice(&chunk);
                rest = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&chunk),
        }
    }
    Ok(match (first, rest) {
        (_, Some(buf)) => buf.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

/// The fields of a request the gateway acts on, with where they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// The `model` the client asked for, unescaped.
    pub model: String,
    /// Byte range of the `model` value (the JSON string, quotes included).
    model_span: Range<usize>,
    pub(crate) stream: bool,
    /// Where `stream_options` is, when present.
    stream_options: Option<StreamOptionsAt>,
    /// The client asked for the usage chunk at the end of its stream.
    pub(crate) include_usage: bool,
    pub(crate) max_tokens: Option<u64>,
    /// The body's `user` (OpenAI's end-user id), when it is a string.
    pub(crate) user: Option<String>,
}

/// Only the fields Collie touches; everything else is skipped unparsed.
/// Serde's derive rejects a field that appears twice, which is what stops a
/// body with two `model` keys (one for Collie, one for the provider).
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    /// `null` is kept as a value (not read as absent): a rewrite that adds
    /// `include_usage` must replace it, or the client's `null` — later in
    /// the body than an added field — would win.
    #[serde(borrow, default, deserialize_with = "present_even_if_null")]
    stream_options: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    /// Any JSON value: a `user` that is not a string is the provider's to
    /// refuse, and is not recorded.
    #[serde(borrow, default)]
    user: Option<&'a RawValue>,
}

fn present_even_if_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct StreamOptions<'a> {
    #[serde(borrow, default, deserialize_with = "present_even_if_null")]
    include_usage: Option<&'a RawValue>,
}

/// Where `stream_options` is in the body, so `include_usage` can be set by
/// splicing: the client's other options stay byte for byte as sent (a
/// number re-serialised could change).
#[derive(Debug, Clone, PartialEq, Eq)]
enum StreamOptionsAt {
    /// `null`: replaced whole.
    Null(Range<usize>),
    /// An object: its `include_usage` value is replaced, or the field is
    /// added just after its `{`.
    Object {
        open: usize,
        empty: bool,
        include_usage: Option<Range<usize>>,
    },
}

/// Read the fields Collie acts on from a request body. Refused as 400
/// `invalid_body`: not a JSON object, not UTF-8, nested deeper than
/// `max_depth`, a field Collie reads given twice, `model` missing, empty or
/// not a string, or a mistyped `stream_options`.
pub fn inspect(body: &[u8], max_depth: usize) -> Result<Inspected, GatewayError> {
    let invalid = |m: String| GatewayError::InvalidBody(m);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(invalid(
            "the request body is empty; send a JSON object".into(),
        ));
    }
    // A request is a JSON object: the derive below would also take an
    // array for the fields, and the rewrite splices into an object.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(invalid("the request body must be a JSON object".into()));
    }
    // JSON text is UTF-8 (RFC 8259 §8.1). The parser below skips the fields
    // Collie does not read without looking inside their strings, so the
    // whole body is checked here: nothing malformed is forwarded.
    if let Err(e) = std::str::from_utf8(body) {
        return Err(invalid(format!(
            "the request body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        )));
    }
    if nesting_exceeds(body, max_depth) {
        return Err(invalid(format!(
            "JSON nested deeper than {max_depth} levels"
        )));
    }
    let probe: Probe<'_> =
        serde_json::from_slice(body).map_err(|e| invalid(describe_json_error(&e)))?;
    let raw_model = probe
        .model
        .ok_or_else(|| invalid("missing required field `model`".into()))?;
    let model: String = serde_json::from_str(raw_model.get())
        .map_err(|_| invalid("`model` must be a string".into()))?;
    if model.is_empty() {
        return Err(invalid("`model` must not be empty".into()));
    }
    let (stream_options, include_usage) = match probe.stream_options {
        None => (None, false),
        Some(raw) if raw.get() == "null" => {
            (Some(StreamOptionsAt::Null(span_of(body, raw))), false)
        }
        Some(raw) => {
            let not_an_object = || invalid("`stream_options` must be an object".into());
            if !raw.get().starts_with('{') {
                return Err(not_an_object());
            }
            let opts: StreamOptions<'_> =
                serde_json::from_str(raw.get()).map_err(|_| not_an_object())?;
            let include_usage = match opts.include_usage.map(RawValue::get) {
                None | Some("null") | Some("false") => false,
                Some("true") => true,
                Some(_) => {
                    return Err(invalid(
                        "`stream_options.include_usage` must be a boolean".into(),
                    ));
                }
            };
            let text = raw.get();
            let inner = text
                .get(1..text.len().saturating_sub(1))
                .unwrap_or_default();
            let at = StreamOptionsAt::Object {
                open: span_of(body, raw).start,
                empty: inner.trim().is_empty(),
                include_usage: opts.include_usage.map(|v| span_of(body, v)),
            };
            (Some(at), include_usage)
        }
    };
    Ok(Inspected {
        model,
        model_span: span_of(body, raw_model),
        stream: probe.stream.unwrap_or(false),
        stream_options,
        include_usage,
        max_tokens: probe
            .max_completion_tokens
            .or(probe.max_tokens)
            .or(probe.max_output_tokens),
        user: probe
            .user
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok()),
    })
}

/// Where a borrowed raw value sits inside the body it was parsed from.
fn span_of(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

fn describe_json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.starts_with("duplicate field") {
        format!("{text}; each field may appear once")
    } else {
        format!("the request body is not valid JSON: {text}")
    }
}

/// Whether arrays/objects nest deeper than `limit`. Unknown fields are skipped
/// by the parser without a depth limit, so this bound is checked separately.
fn nesting_exceeds(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Skip the string: jump from quote or backslash to the next.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &body[i.min(body.len())..]) {
                        None => return false,
                        Some(off) if body[i + off] == b'\\' => i += off + 2,
                        Some(off) => {
                            i += off + 1;
                            break;
                        }
                    }
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

impl Inspected {
    /// Whether Collie must ask the upstream for usage the client did not
    /// request (and later hide that chunk from the client).
    pub(crate) fn needs_usage_injection(&self, supports_stream_options: bool) -> bool {
        supports_stream_options && self.stream && !self.include_usage
    }

    /// The body for one attempt: `model` replaced by the deployment's model
    /// name and, when `inject_usage`, `stream_options.include_usage` set.
    /// Made of slices of the client's body around the replaced values, so a
    /// large body is never copied for an attempt.
    pub fn body_for(
        &self,
        body: &Bytes,
        upstream_model: &str,
        inject_usage: bool,
    ) -> Result<AttemptBody, GatewayError> {
        let same_model = body
            .get(self.model_span.clone())
            .is_some_and(|v| serde_json::from_slice::<&str>(v).is_ok_and(|m| m == upstream_model));
        if same_model && !inject_usage {
            return Ok(AttemptBody::whole(body.clone()));
        }
        let model_json = serde_json::to_string(upstream_model)
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        let mut edits: SmallVec<[(Range<usize>, String); 2]> =
            SmallVec::from_elem((self.model_span.clone(), model_json), 1);
        if inject_usage {
            match &self.stream_options {
                Some(StreamOptionsAt::Null(span)) => {
                    edits.push((span.clone(), "{\"include_usage\":true}".into()));
                }
                Some(StreamOptionsAt::Object {
                    include_usage: Some(span),
                    ..
                }) => edits.push((span.clone(), "true".into())),
                Some(StreamOptionsAt::Object {
                    open,
                    empty,
                    include_usage: None,
                }) => {
                    let at = open.saturating_add(1);
                    let field = if *empty {
                        "\"include_usage\":true"
                    } else {
                        "\"include_usage\":true,"
                    };
                    edits.push((at..at, field.into()));
                }
                None => {
                    let open = body
                        .iter()
                        .position(|&b| b == b'{')
                        .ok_or_else(|| GatewayError::Internal("body is not an object".into()))?;
                    let at = open.saturating_add(1);
                    edits.push((
                        at..at,
                        "\"stream_options\":{\"include_usage\":true},".into(),
                    ));
                }
            }
        }
        edits.sort_by_key(|(r, _)| r.start);
        let mut out = AttemptBody::default();
        let mut at = 0;
        for (range, text) in edits {
            out.push(body.slice(at..range.start));
            out.push(Bytes::from(text));
            at = range.end;
        }
        out.push(body.slice(at..));
        Ok(out)
    }
}

/// Neighbouring pieces of an attempt's body up to this size in all are
/// copied into one buffer and written together.
pub(crate) const WRITE_COALESCE: usize = 64 << 10;

/// One write for the pieces of a run (`len` bytes in all): the piece
/// itself when it is alone.
fn flush_run(out: &mut SmallVec<[Bytes; 3]>, run: &mut SmallVec<[&Bytes; 3]>, len: usize) {
    match run.as_slice() {
        [] => {}
        [one] => out.push((*one).clone()),
        many => {
            let mut joined = BytesMut::with_capacity(len);
            for p in many {
                joined.extend_from_slice(p);
            }
            out.push(joined.freeze());
        }
    }
    run.clear();
}

/// A request body as sent on one attempt: pieces written one after the
/// other. Cloning it clones handles, not bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptBody {
    pieces: SmallVec<[Bytes; 3]>,
    len: usize,
}

impl AttemptBody {
    fn whole(body: Bytes) -> AttemptBody {
        let mut b = AttemptBody::default();
        b.push(body);
        b
    }

    fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.len = self.len.saturating_add(piece.len());
            self.pieces.push(piece);
        }
    }

    /// Bytes in all the pieces together.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No bytes to send.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces as they are written to the provider: neighbours merged
    /// into one buffer while it stays within [`WRITE_COALESCE`] bytes, so
    /// a body rewritten into three slices leaves in one write (each write
    /// is a system call here and a wake-up at the provider); a piece larger
    /// than that is written as it is, never copied.
    pub(crate) fn writes(&self) -> SmallVec<[Bytes; 3]> {
        let mut out = SmallVec::new();
        let mut run: SmallVec<[&Bytes; 3]> = SmallVec::new();
        let mut run_len = 0usize;
        for piece in &self.pieces {
            if run_len.saturating_add(piece.len()) > WRITE_COALESCE {
                flush_run(&mut out, &mut run, run_len);
                run_len = 0;
            }
            if piece.len() > WRITE_COALESCE {
                out.push(piece.clone());
            } else {
                run.push(piece);
                run_len = run_len.saturating_add(piece.len());
            }
        }
        flush_run(&mut out, &mut run, run_len);
        out
    }

    /// The bytes in one buffer (tests and fuzzing; the exchange writes
    /// [`AttemptBody::writes`]).
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        self.pieces.iter().flat_map(|p| p.iter().copied()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(body: &str, model: &str, inject: bool) -> String {
        let b = Bytes::copy_from_slice(body.as_bytes());
        let i = inspect(&b, 64).unwrap();
        String::from_utf8(i.body_for(&b, model, inject).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn rewrites_only_the_model_value() {
        let body = r#"{"messages":[{"role":"user","content":"say \"model\": x"}],  "model" : "gpt-4o" ,"n":1}"#;
        assert_eq!(
            rewrite(body, "gpt-4o-2024", false),
            r#"{"messages":[{"role":"user","content":"say \"model\": x"}],  "model" : "gpt-4o-2024" ,"n":1}"#
        );
        // Unchanged model: the very same bytes.
        assert_eq!(rewrite(body, "gpt-4o", false), body);
    }

    #[test]
    fn a_small_rewritten_body_is_one_write() {
        let b = Bytes::from_static(br#"{"messages":[],"model":"m","n":1}"#);
        let i = inspect(&b, 64).unwrap();
        let body = i.body_for(&b, "upstream-m", false).unwrap();
        assert_eq!(body.pieces.len(), 3);
        let writes = body.writes();
        assert_eq!(writes.len(), 1);
        assert_eq!(&writes[0][..], &body.to_vec()[..]);
        // Unchanged: the client's own buffer, not a copy.
        let same = i.body_for(&b, "m", false).unwrap().writes();
        assert_eq!(same.len(), 1);
        assert_eq!(same[0].as_ptr(), b.as_ptr());
        assert!(AttemptBody::default().writes().is_empty());
    }

    #[test]
    fn a_large_piece_is_written_as_it_is_and_small_neighbours_together() {
        let content = "x".repeat(WRITE_COALESCE);
        let text =
            format!(r#"{{"messages":[{{"role":"user","content":"{content}"}}],"model":"m"}}"#);
        let b = Bytes::from(text);
        let i = inspect(&b, 64).unwrap();
        let body = i.body_for(&b, "upstream-m", false).unwrap();
        let writes = body.writes();
        assert_eq!(writes.len(), 2);
        // The large prefix is the client's buffer; the model and the
        // closing brace leave together.
        assert_eq!(writes[0].as_ptr(), b.as_ptr());
        assert_eq!(&writes[1][..], br#""upstream-m"}"#);
        let joined: Vec<u8> = writes.iter().flat_map(|w| w.iter().copied()).collect();
        assert_eq!(joined, body.to_vec());
    }

    #[test]
    fn model_at_the_end_of_a_large_body() {
        let content = "x".repeat(2 << 20);
        let body =
            format!(r#"{{"messages":[{{"role":"user","content":"{content}"}}],"model":"m"}}"#);
        let out = rewrite(&body, "upstream-m", false);
        assert!(out.ends_with(r#""model":"upstream-m"}"#));
        assert_eq!(out.len(), body.len() + "upstream-".len());
    }

    #[test]
    fn injects_include_usage() {
        let out = rewrite(r#"{"model":"m","stream":true}"#, "u", true);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "u");
        let out = rewrite(
            r#"{"stream":true,"stream_options":{"include_usage":false,"x":1},"model":"m"}"#,
            "u",
            true,
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        // The client's other options stay as written, numbers included.
        assert_eq!(
            rewrite(
                r#"{"model":"m","stream":true,"stream_options":{"x":18446744073709544677440736}}"#,
                "u",
                true
            ),
            r#"{"model":"u","stream":true,"stream_options":{"include_usage":true,"x":18446744073709544677440736}}"#
        );
        assert_eq!(
            rewrite(
                r#"{"model":"m","stream_options":{ },"stream":true}"#,
                "u",
                true
            ),
            r#"{"model":"u","stream_options":{"include_usage":true },"stream":true}"#
        );
        assert_eq!(
            rewrite(
                r#"{"model":"m","stream_options":{"include_usage" : null}}"#,
                "u",
                true
            ),
            r#"{"model":"u","stream_options":{"include_usage" : true}}"#
        );
    }

    #[test]
    fn a_null_stream_options_is_replaced_not_shadowed() {
        let out = rewrite(
            r#"{"model":"m","stream":true,"stream_options":null}"#,
            "u",
            true,
        );
        assert_eq!(
            out,
            r#"{"model":"u","stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn reads_stream_flags() {
        let i = inspect(br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":9}"#, 64).unwrap();
        assert!(i.stream && i.include_usage);
        assert_eq!(i.max_tokens, Some(9));
        assert!(!i.needs_usage_injection(true));
        let i = inspect(br#"{"model":"m","stream":true}"#, 64).unwrap();
        assert!(i.needs_usage_injection(true));
        assert!(!i.needs_usage_injection(false));
    }

    #[test]
    fn rejects_bad_bodies_with_clear_messages() {
        let msg = |b: &str| match inspect(b.as_bytes(), 8) {
            Err(GatewayError::InvalidBody(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(msg("").contains("empty"));
        assert!(msg("{\"model\":").contains("not valid JSON"));
        assert!(msg("[1,2]").contains("must be a JSON object"));
        // The fields as an array: also taken by the derive, refused here.
        assert!(msg(r#"["m", true]"#).contains("must be a JSON object"));
        assert!(msg(r#"{"messages":[]}"#).contains("missing required field `model`"));
        assert!(msg(r#"{"model":42}"#).contains("must be a string"));
        assert!(msg(r#"{"model":"a","model":"b"}"#).contains("duplicate field `model`"));
        assert!(
            msg(&format!(
                "{{\"model\":\"m\",\"x\":{}{}}}",
                "[".repeat(9),
                "]".repeat(9)
            ))
            .contains("nested deeper")
        );
        // Brackets inside strings do not count.
        assert!(
            inspect(
                format!("{{\"model\":\"m\",\"x\":\"{}\"}}", "[".repeat(50)).as_bytes(),
                8
            )
            .is_ok()
        );
    }
}
