//! Token usage and its price: what the upstream reported in a JSON body or in
//! its SSE stream, turned into cost with the configured pricing table.
//!
//! Usage is never a silent zero: a field the upstream did not report stays
//! `None`.
#![deny(clippy::arithmetic_side_effects)]

pub(crate) mod sse;

use crate::config::Price;
use bytes::Bytes;
use memchr::memmem;
use serde::Deserialize;
use std::sync::LazyLock;

/// Tokens of one request as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) completion_tokens: Option<u64>,
    pub(crate) total_tokens: Option<u64>,
}

impl Usage {
    /// The total the provider gave, else the sum of the parts when both are known.
    pub(crate) fn total(&self) -> Option<u64> {
        self.total_tokens.or_else(|| {
            self.prompt_tokens
                .zip(self.completion_tokens)
                .map(|(p, c)| p.saturating_add(c))
        })
    }

    /// Cost in nanodollars, rounded up so that a request is never billed below
    /// what it cost. `None` when the price or any needed count is unknown.
    pub(crate) fn cost_nano_usd(&self, price: Option<Price>) -> Option<u64> {
        let price = price?;
        let prompt = self.prompt_tokens?;
        // Embeddings report no completion tokens; that is a real zero only
        // when the provider also gave a total equal to the prompt.
        let completion = match self.completion_tokens {
            Some(c) => c,
            None if self.total_tokens == Some(prompt) => 0,
            None => return None,
        };
        // Saturating, not wrapping or failing: a cost beyond what the
        // integers hold is the largest cost there is, which every budget
        // refuses (a cost that overflowed to nothing would pass them all).
        let pico = u128::from(prompt)
            .saturating_mul(u128::from(price.input_pico_per_token))
            .saturating_add(
                u128::from(completion).saturating_mul(u128::from(price.output_pico_per_token)),
            );
        Some(u64::try_from(pico.div_ceil(1000)).unwrap_or(u64::MAX))
    }
}

/// The shapes providers use for usage: chat/completions/embeddings
/// (`prompt_tokens`…) and the Responses API (`input_tokens`…).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl From<RawUsage> for Usage {
    fn from(r: RawUsage) -> Usage {
        Usage {
            prompt_tokens: r.prompt_tokens.or(r.input_tokens),
            completion_tokens: r.completion_tokens.or(r.output_tokens),
            total_tokens: r.total_tokens,
        }
    }
}

/// Fields of a response document (JSON body or SSE event) that can carry usage.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct UsageCarrier {
    #[serde(default)]
    usage: Option<RawUsage>,
    /// The Responses API nests it: `{"type":"response.completed","response":{"usage":…}}`.
    #[serde(default)]
    response: Option<NestedResponse>,
    /// Only the count matters: a chunk with no choices and a usage is the
    /// usage-only chunk that `include_usage` adds at the end of a stream.
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(Debug, Default, Deserialize)]
struct NestedResponse {
    #[serde(default)]
    usage: Option<RawUsage>,
}

impl UsageCarrier {
    pub(crate) fn parse(json: &[u8]) -> Option<UsageCarrier> {
        serde_json::from_slice(json).ok()
    }

    pub(crate) fn usage(self) -> Option<Usage> {
        self.usage
            .or(self.response.and_then(|r| r.usage))
            .map(Usage::from)
    }

    pub(crate) fn is_usage_only_chunk(&self) -> bool {
        self.usage.is_some() && self.choices.as_ref().is_some_and(|c| c.is_empty())
    }
}

/// Largest non-streamed body that is parsed whole for its usage. Beyond it
/// only the tail is kept: providers put `usage` last, and a key cannot be
/// faked inside a JSON string (its quotes would be escaped).
const JSON_WHOLE_LIMIT: usize = 8 << 20;
const JSON_TAIL: usize = 64 << 10;

/// Keeps a non-streamed JSON response on the side (the chunks themselves,
/// shared, not copied) to read its usage at the end.
#[derive(Debug, Default)]
pub(crate) struct JsonUsage {
    first: Option<Bytes>,
    more: Vec<Bytes>,
    kept: usize,
    overflowed: bool,
}

impl JsonUsage {
    pub(crate) fn feed(&mut self, chunk: &Bytes) {
        self.kept = self.kept.saturating_add(chunk.len());
        if self.first.is_none() {
            self.first = Some(chunk.clone());
            return;
        }
        self.more.push(chunk.clone());
        // Past the limit keep only enough chunks to cover the tail.
        while self.kept > JSON_WHOLE_LIMIT.saturating_add(JSON_TAIL) {
            let Some(oldest) = self.first.as_ref().map(Bytes::len) else {
                break;
            };
            if self.kept.saturating_sub(oldest) < JSON_TAIL {
                break;
            }
            self.kept = self.kept.saturating_sub(oldest);
            self.overflowed = true;
            self.first = (!self.more.is_empty()).then(|| self.more.remove(0));
        }
    }

    /// The usage in the body: found from the end first (where providers put
    /// it, and cheap), else by parsing the whole body when it was kept whole.
    pub(crate) fn finish(&self) -> Option<Usage> {
        let joined;
        let body: &[u8] = match (&self.first, self.more.is_empty()) {
            (None, _) => return None,
            (Some(only), true) => only,
            (Some(f), false) => {
                let mut v = Vec::with_capacity(self.kept);
                v.extend_from_slice(f);
                for c in &self.more {
                    v.extend_from_slice(c);
                }
                joined = v;
                &joined
            }
        };
        usage_from_tail(body).or_else(|| {
            (!self.overflowed)
                .then(|| UsageCarrier::parse(body))
                .flatten()
                .and_then(UsageCarrier::usage)
        })
    }
}

/// Tells where a JSON document read piece by piece ends: the depth of
/// objects and arrays outside strings. Complete when the first object or
/// array closes (a bare scalar document never is; its body's end says it).
#[derive(Debug, Default)]
pub(crate) struct DocumentEnd {
    depth: u32,
    in_string: bool,
    escaped: bool,
    complete: bool,
}

impl DocumentEnd {
    /// Read the next piece; whether the document is complete. A string's
    /// text (most of a response) is skipped to its next quote or
    /// backslash at once; the bytes between strings are read one by one.
    #[expect(
        clippy::arithmetic_side_effects,
        reason = "positions in the chunk: each stays within its length"
    )]
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> bool {
        let mut i = 0;
        while i < chunk.len() && !self.complete {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                let Some(off) = memchr::memchr2(b'"', b'\\', &chunk[i..]) else {
                    break;
                };
                i += off;
                match chunk[i] {
                    b'"' => self.in_string = false,
                    _ => self.escaped = true,
                }
                i += 1;
                continue;
            }
            match chunk[i] {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    self.complete = self.depth == 0;
                }
                _ => {}
            }
            i += 1;
        }
        self.complete
    }

    pub(crate) fn complete(&self) -> bool {
        self.complete
    }
}

/// Index of the quote that closes a JSON string whose text starts at `from`
/// (the data's length when it does not close): the scanners of raw JSON
/// (the prompt estimate, the SSE text count) skip strings with it.
#[expect(
    clippy::arithmetic_side_effects,
    reason = "positions in the data: each stays within its length plus two"
)]
pub(crate) fn json_string_end(data: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < data.len() {
        match memchr::memchr2(b'"', b'\\', &data[i..]) {
            None => break,
            Some(off) if data[i + off] == b'\\' => i += off + 2,
            Some(off) => return i + off,
        }
    }
    data.len()
}

/// Find the last `"usage"` key in a fragment of JSON and parse the object after it.
fn usage_from_tail(buf: &[u8]) -> Option<Usage> {
    // Built once: `memmem::rfind` prepares its searcher on every call.
    static USAGE_KEY: LazyLock<memmem::FinderRev<'static>> =
        LazyLock::new(|| memmem::FinderRev::new(b"\"usage\""));
    let at = USAGE_KEY.rfind(buf)?;
    let rest = buf.get(at.saturating_add(7)..)?;
    let value = rest.trim_ascii_start().strip_prefix(b":")?;
    let mut stream = serde_json::Deserializer::from_slice(value).into_iter::<RawUsage>();
    stream.next()?.ok().map(Usage::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_up_and_needs_known_counts() {
        let price = Some(Price {
            input_pico_per_token: 150_000,
            output_pico_per_token: 600_000,
        });
        let u = Usage {
            prompt_tokens: Some(1000),
            completion_tokens: Some(10),
            total_tokens: Some(1010),
        };
        // 1000 × 0.15 µ$ + 10 × 0.6 µ$ = 156 µ$ = 156_000 n$
        assert_eq!(u.cost_nano_usd(price), Some(156_000));
        let odd = Usage {
            prompt_tokens: Some(1),
            completion_tokens: Some(0),
            total_tokens: None,
        };
        let cheap = Some(Price {
            input_pico_per_token: 1,
            output_pico_per_token: 1,
        });
        assert_eq!(odd.cost_nano_usd(cheap), Some(1));
        assert_eq!(Usage::default().cost_nano_usd(price), None);
        assert_eq!(u.cost_nano_usd(None), None);
        let embedding = Usage {
            prompt_tokens: Some(8),
            completion_tokens: None,
            total_tokens: Some(8),
        };
        assert_eq!(embedding.cost_nano_usd(price), Some(1200));
    }

    #[test]
    fn reads_usage_from_json_bodies() {
        let mut j = JsonUsage::default();
        j.feed(&Bytes::from_static(
            br#"{"id":"x","choices":[{"message":{"content":"\"usage\": 5"}}],"#,
        ));
        j.feed(&Bytes::from_static(
            br#""usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        ));
        assert_eq!(
            j.finish(),
            Some(Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(4),
                total_tokens: Some(7)
            })
        );
        let mut j = JsonUsage::default();
        j.feed(&Bytes::from_static(br#"{"object":"response","usage":{"input_tokens":2,"output_tokens":5,"total_tokens":7}}"#));
        assert_eq!(j.finish().and_then(|u| u.completion_tokens), Some(5));
        let mut j = JsonUsage::default();
        j.feed(&Bytes::from_static(br#"{"object":"list","data":[]}"#));
        assert_eq!(j.finish(), None);
    }

    #[test]
    fn finds_where_a_document_ends() {
        let mut d = DocumentEnd::default();
        assert!(!d.feed(br#"{"a":"}]\"{","b":[1,{"#));
        assert!(!d.feed(br#"}]"#));
        assert!(d.feed(b"}  "));
        assert!(d.feed(b"{"), "stays complete");
        let mut d = DocumentEnd::default();
        assert!(!d.feed(b"  42 "));
        assert!(!d.complete());
    }

    /// Cut anywhere (inside a string, between a backslash and what it
    /// escapes), a document ends where it ends read whole, and a byte
    /// short of its end it is not complete.
    #[test]
    fn a_document_ends_in_the_same_place_however_it_is_cut() {
        let doc: &[u8] = br#"{"a":"}]\"{\\","b":[1,{"c":"\\\""}],"d":"x\\"}"#;
        let first_complete = |pieces: &[&[u8]]| {
            let mut d = DocumentEnd::default();
            let mut read = 0;
            for p in pieces {
                if d.feed(p) {
                    return Some(read + p.len());
                }
                read += p.len();
            }
            None
        };
        assert_eq!(first_complete(&[doc]), Some(doc.len()));
        assert_eq!(first_complete(&[&doc[..doc.len() - 1]]), None);
        for cut in 0..doc.len() {
            for second in cut..doc.len() {
                let pieces = [&doc[..cut], &doc[cut..second], &doc[second..]];
                assert_eq!(
                    first_complete(&pieces),
                    Some(doc.len()),
                    "cut at {cut} and {second}"
                );
            }
        }
    }

    #[test]
    fn reads_usage_from_the_tail_of_huge_bodies() {
        let mut j = JsonUsage::default();
        j.feed(&Bytes::from_static(b"{\"data\":["));
        let filler = Bytes::from(vec![b'1'; 1 << 20]);
        for _ in 0..10 {
            j.feed(&filler);
        }
        j.feed(&Bytes::from_static(
            br#"],"usage" : {"prompt_tokens":9,"total_tokens":9}}"#,
        ));
        assert_eq!(j.finish().and_then(|u| u.prompt_tokens), Some(9));
    }
}
