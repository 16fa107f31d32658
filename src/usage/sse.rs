//! Watches a server-sent-events stream on its way to the client: finds event
//! boundaries, reads usage from the event that carries it, and — only when
//! Collie itself asked the upstream for `include_usage` — removes the
//! usage-only chunk the client never asked for.
//!
//! The bytes the client receives are the upstream's bytes, never re-encoded.
//! In pass-through mode every chunk is forwarded as it arrives; in strip mode
//! bytes are forwarded event by event, so a partial event waits for its end
//! (the client could not use half an event anyway).

use super::{Usage, UsageCarrier};
use bytes::{Bytes, BytesMut};

/// An event larger than this is forwarded but not inspected.
const MAX_EVENT: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct SseObserver {
    strip_usage_chunk: bool,
    /// Bytes of events not yet complete (and, in strip mode, not yet forwarded).
    pending: BytesMut,
    /// Where the search for the next event end resumes inside `pending`.
    scanned: usize,
    /// Inside an event too large to inspect: forward until its end.
    oversized: bool,
    usage: Option<Usage>,
    events: u64,
    done: bool,
    /// Events carrying generated text, and that text's length in bytes.
    content_events: u64,
    content_bytes: u64,
}

impl SseObserver {
    pub(crate) fn new(strip_usage_chunk: bool) -> SseObserver {
        SseObserver {
            strip_usage_chunk,
            pending: BytesMut::new(),
            scanned: 0,
            oversized: false,
            usage: None,
            events: 0,
            done: false,
            content_events: 0,
            content_bytes: 0,
        }
    }

    /// Take upstream bytes; return what goes to the client now (may be empty).
    pub(crate) fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.oversized {
            return self.feed_oversized(chunk);
        }
        self.pending.extend_from_slice(&chunk);
        let mut ends = Vec::new();
        let mut from = self.scanned;
        while let Some(end) = event_end(&self.pending, from) {
            ends.push(end);
            from = end;
        }
        let complete = ends.last().copied().unwrap_or(0);
        let events = self.pending.split_to(complete).freeze();
        // A line break at the very end may be the first half of a boundary.
        self.scanned = self.pending.len().saturating_sub(2);
        let mut kept: Option<BytesMut> = None;
        let mut start = 0;
        for end in ends {
            let drop = self.observe(&events[start..end]);
            match (&mut kept, drop) {
                (None, true) => {
                    let mut k = BytesMut::with_capacity(events.len());
                    k.extend_from_slice(&events[..start]);
                    kept = Some(k);
                }
                (Some(k), false) => k.extend_from_slice(&events[start..end]),
                _ => {}
            }
            start = end;
        }
        let oversized = self.pending.len() > MAX_EVENT;
        if !self.strip_usage_chunk {
            if oversized {
                self.oversized = true;
                self.pending.clear();
                self.scanned = 0;
            }
            return chunk;
        }
        let out = kept.map_or(events, BytesMut::freeze);
        if !oversized {
            return out;
        }
        // Too big to hold: stop inspecting this event and let it through.
        self.oversized = true;
        self.scanned = 0;
        let held = self.pending.split();
        let mut joined = BytesMut::with_capacity(out.len().saturating_add(held.len()));
        joined.extend_from_slice(&out);
        joined.extend_from_slice(&held);
        joined.freeze()
    }

    /// Inside an event too large to inspect. A boundary split across two
    /// chunks is missed here, which only merges the giant event with the next
    /// one for inspection; the bytes forwarded are unaffected.
    fn feed_oversized(&mut self, chunk: Bytes) -> Bytes {
        let Some(end) = event_end(&chunk, 0) else {
            return chunk;
        };
        self.oversized = false;
        let tail = self.feed(chunk.slice(end..));
        if !self.strip_usage_chunk {
            return chunk;
        }
        let mut out = BytesMut::with_capacity(end.saturating_add(tail.len()));
        out.extend_from_slice(&chunk[..end]);
        out.extend_from_slice(&tail);
        out.freeze()
    }

    /// Look at one complete event; `true` when it must not reach the client.
    fn observe(&mut self, event: &[u8]) -> bool {
        self.events = self.events.saturating_add(1);
        let data = event_data(event);
        if data.as_ref() == b"[DONE]" {
            self.done = true;
            return false;
        }
        let text = generated_text_len(&data);
        if text > 0 {
            self.content_events = self.content_events.saturating_add(1);
            self.content_bytes = self
                .content_bytes
                .saturating_add(u64::try_from(text).unwrap_or(u64::MAX));
        }
        // Most chunks carry no usage (or `"usage":null`); skip parsing those.
        let Some(at) = memchr::memmem::find(&data, b"\"usage\"") else {
            return false;
        };
        if data[at.saturating_add(7)..]
            .trim_ascii_start()
            .strip_prefix(b":")
            .is_some_and(|v| v.trim_ascii_start().starts_with(b"null"))
        {
            return false;
        }
        let Some(carrier) = UsageCarrier::parse(&data) else {
            return false;
        };
        let usage_only = carrier.is_usage_only_chunk();
        if let Some(u) = carrier.usage() {
            self.usage = Some(u);
        }
        usage_only && self.strip_usage_chunk
    }

    /// At the end of the upstream stream: bytes still held back (an event
    /// without its terminating blank line), to forward as they are.
    pub(crate) fn finish(&mut self) -> Bytes {
        if !self.strip_usage_chunk {
            self.pending.clear();
            return Bytes::new();
        }
        self.scanned = 0;
        self.pending.split().freeze()
    }

    /// Whether the client has received part of an event that has not ended,
    /// so anything appended must first close it.
    pub(crate) fn client_mid_event(&self) -> bool {
        self.oversized || (!self.strip_usage_chunk && !self.pending.is_empty())
    }

    /// Drop held bytes after a failure (strip mode holds, never forwarded them).
    pub(crate) fn abandon(&mut self) {
        if self.strip_usage_chunk {
            self.pending.clear();
        }
    }

    pub(crate) fn usage(&self) -> Option<Usage> {
        self.usage
    }

    #[cfg(test)]
    pub(crate) fn saw_done(&self) -> bool {
        self.done
    }

    /// Completion tokens delivered so far, estimated from the text events:
    /// at least one per event (providers send about a token each), more for
    /// long ones.
    pub(crate) fn delivered_tokens(&self) -> u64 {
        self.content_events.max(self.content_bytes.div_ceil(4))
    }
}

/// The field whose value a string follows, as far as counting text goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    /// Generated text in a chat or completions chunk: `content`, `text`,
    /// `refusal`, a tool call's `arguments`, reasoning.
    Text,
    /// A Responses API delta event's `delta`.
    Delta,
    /// `type`, which names a Responses API event.
    Type,
    Other,
}

impl Field {
    fn of(key: &[u8]) -> Field {
        match key {
            b"content" | b"text" | b"refusal" | b"arguments" | b"reasoning_content"
            | b"reasoning" => Field::Text,
            b"delta" => Field::Delta,
            b"type" => Field::Type,
            _ => Field::Other,
        }
    }
}

/// Bytes of generated text in an event, in JSON source bytes (escapes as
/// written): the string values of the text fields, whatever their order,
/// spacing or nesting. A Responses API event (it has a top-level `type`)
/// counts only when it is a `*.delta` event, and only its `delta`: its
/// `*.done` and `response.completed` events repeat the whole text. A
/// tokenizer-level walk, not a parse: strings are skipped whole (so text
/// that looks like a key inside a value is not taken for one), nothing is
/// allocated, and the event is read once.
#[expect(
    clippy::arithmetic_side_effects,
    reason = "positions in the event: each stays within its length plus one"
)]
fn generated_text_len(data: &[u8]) -> usize {
    let (mut text, mut delta) = (0usize, 0usize);
    let mut event_type: Option<&[u8]> = None;
    let mut depth = 0usize;
    // The field named by the last key, while its value may still follow.
    let mut field: Option<Field> = None;
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'"' => {
                let end = super::json_string_end(data, i + 1);
                let string = &data[i + 1..end];
                i = end + 1;
                let rest = data.get(i..).unwrap_or_default().trim_ascii_start();
                if rest.first() == Some(&b':') {
                    field = Some(Field::of(string));
                    i = data.len() - rest.len() + 1;
                    continue;
                }
                match field.take() {
                    Some(Field::Text) => text = text.saturating_add(string.len()),
                    Some(Field::Delta) => delta = delta.saturating_add(string.len()),
                    Some(Field::Type) if depth == 1 => event_type = Some(string),
                    _ => {}
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                field = None;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                field = None;
            }
            b',' => field = None,
            _ => {}
        }
        i += 1;
    }
    match event_type {
        Some(t) if t.ends_with(b".delta") => delta,
        Some(_) => 0,
        None => text,
    }
}

/// Index just past the blank line that ends the first event at or after `from`.
/// Lines end in `\n` or `\r\n`.
#[expect(
    clippy::arithmetic_side_effects,
    reason = "positions in the buffer: each stays within its length plus three"
)]
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(off) = memchr::memchr(b'\n', buf.get(i..)?) {
        let nl = i + off;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// The `data:` lines of an event joined with `\n`, as the SSE spec reads them.
fn event_data(event: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let mut lines = event
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter_map(|l| l.strip_prefix(b"data:"))
        .map(|d| d.strip_prefix(b" ").unwrap_or(d));
    let Some(first) = lines.next() else {
        return std::borrow::Cow::Borrowed(&[]);
    };
    let Some(second) = lines.next() else {
        return std::borrow::Cow::Borrowed(first);
    };
    let mut joined = first.to_vec();
    for l in std::iter::once(second).chain(lines) {
        joined.push(b'\n');
        joined.extend_from_slice(l);
    }
    std::borrow::Cow::Owned(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_counted_whatever_the_spacing_and_key_order() {
        let compact = br#"{"choices":[{"delta":{"content":"Hello"}}]}"#;
        let spaced = b"{ \"choices\" : [ { \"delta\" : { \"role\" : \"assistant\" ,\n \"content\" :  \"Hello\" } } ] }";
        let reordered = br#"{"choices":[{"index":0,"delta":{"content":"Hello","role":"assistant"},"finish_reason":null}],"id":"x","object":"chat.completion.chunk"}"#;
        for e in [&compact[..], spaced, reordered] {
            assert_eq!(generated_text_len(e), 5, "{}", String::from_utf8_lossy(e));
        }
        // Escapes count as written; a key-like string inside a value is text.
        assert_eq!(
            generated_text_len(br#"{"choices":[{"delta":{"content":"say \"content\": \"x\""}}]}"#),
            22
        );
        assert_eq!(
            generated_text_len(br#"{"choices":[{"delta":{"content":null}}]}"#),
            0
        );
        assert_eq!(
            generated_text_len(br#"{"choices":[{"text":"abc","index":0}]}"#),
            3
        );
        assert_eq!(
            generated_text_len(
                br#"{"choices":[{"delta":{"reasoning_content":"think","content":"ok"}}]}"#
            ),
            7
        );
    }

    #[test]
    fn responses_events_count_their_deltas_only() {
        let delta = br#"{"type":"response.output_text.delta","item_id":"m","delta":"Hi there"}"#;
        assert_eq!(generated_text_len(delta), 8);
        let done = br#"{"type":"response.output_text.done","text":"Hi there"}"#;
        assert_eq!(generated_text_len(done), 0);
        let completed = br#"{"type":"response.completed","response":{"output":[{"type":"message","content":[{"type":"output_text","text":"Hi there"}]}]}}"#;
        assert_eq!(generated_text_len(completed), 0);
    }

    #[test]
    fn cut_streams_are_estimated_from_spaced_json_too() {
        let mut o = SseObserver::new(false);
        for _ in 0..3 {
            o.feed(Bytes::from_static(
                b"data: {\"choices\": [{\"delta\": {\"content\": \"word\"}}]}\n\n",
            ));
        }
        assert_eq!(o.delivered_tokens(), 3);
    }

    #[test]
    fn tool_call_arguments_count_as_delivered() {
        let mut o = SseObserver::new(false);
        let event = "data: {\"choices\":[{\"delta\":{\"content\":null,\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\": \\\"Paris\\\"}\"}}]}}]}\n\n";
        o.feed(Bytes::from(event));
        assert!(o.delivered_tokens() >= 4, "{}", o.delivered_tokens());
    }

    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
        "data: [DONE]\n\n"
    );

    fn run(obs: &mut SseObserver, input: &str, split: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in input.as_bytes().chunks(split) {
            out.extend_from_slice(&obs.feed(Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&obs.finish());
        out
    }

    #[test]
    fn pass_through_is_byte_exact_and_reads_usage() {
        for split in [1, 7, 64, 4096] {
            let mut o = SseObserver::new(false);
            assert_eq!(
                run(&mut o, STREAM, split),
                STREAM.as_bytes(),
                "split {split}"
            );
            assert_eq!(o.usage().and_then(|u| u.total_tokens), Some(7));
            assert!(o.saw_done());
        }
    }

    #[test]
    fn strip_mode_removes_only_the_usage_chunk() {
        let expected = STREAM.replace(
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
            "",
        );
        for split in [1, 5, 33, 4096] {
            let mut o = SseObserver::new(true);
            assert_eq!(
                String::from_utf8(run(&mut o, STREAM, split)).unwrap(),
                expected,
                "split {split}"
            );
            assert_eq!(o.usage().and_then(|u| u.prompt_tokens), Some(5));
        }
    }

    #[test]
    fn crlf_and_multiline_data() {
        let s = "event: response.completed\r\ndata: {\"type\":\"response.completed\",\r\ndata: \"response\":{\"usage\":{\"input_tokens\":1,\"output_tokens\":2,\"total_tokens\":3}}}\r\n\r\n";
        let mut o = SseObserver::new(false);
        assert_eq!(run(&mut o, s, 3), s.as_bytes());
        assert_eq!(o.usage().and_then(|u| u.completion_tokens), Some(2));
    }

    #[test]
    fn a_usage_chunk_with_content_is_kept() {
        let s = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n";
        let mut o = SseObserver::new(true);
        assert_eq!(run(&mut o, s, 10), s.as_bytes());
        assert_eq!(o.usage().and_then(|u| u.completion_tokens), Some(1));
    }

    #[test]
    fn knows_when_the_client_is_mid_event() {
        let mut o = SseObserver::new(false);
        o.feed(Bytes::from_static(b"data: {\"a\":1}\n\ndata: {\"b\""));
        assert!(o.client_mid_event());
        let mut o = SseObserver::new(true);
        let out = o.feed(Bytes::from_static(b"data: {\"a\":1}\n\ndata: {\"b\""));
        assert_eq!(&out[..], b"data: {\"a\":1}\n\n");
        assert!(!o.client_mid_event());
    }

    #[test]
    fn oversized_events_pass_untouched() {
        let big = format!("data: {}\n\n", "x".repeat(MAX_EVENT + 10));
        let s = format!("{big}{STREAM}");
        for strip in [false, true] {
            let mut o = SseObserver::new(strip);
            let out = run(&mut o, &s, 64 << 10);
            assert!(out.starts_with(big.as_bytes()));
            assert_eq!(o.usage().and_then(|u| u.total_tokens), Some(7));
        }
    }
}
