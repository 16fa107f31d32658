//! Keeping a deployment's provider key out of everything the client gets
//! back from that deployment: one mechanism for the response head and the
//! body, on every status, streamed or not. A provider may quote the key it
//! was given — in an error message, a debugging header, an echo of the
//! request — and the tenant must never learn it.
//!
//! A response header whose value carries the key is dropped. In a body each
//! occurrence is masked with `*` at the key's length (provider keys are
//! letters, digits, `-` and `_`: a mask cannot rebuild one), so a `Content-Length`
//! stays true and the framing is untouched; a key split across chunks is
//! found too. Only bytes that could still become the key are held back
//! between chunks — the longest tail that is a prefix of it — so a stream's
//! events are not delayed: an event's end is never the start of a key.

use bytes::Bytes;
use memchr::memmem;
use std::sync::Arc;

const MASK: u8 = b'*';

/// A key shorter than this is not searched for: masking it would mangle
/// ordinary text.
const MIN_KEY_LEN: usize = 8;

/// The searcher for one deployment's key, built once per config.
#[derive(Clone)]
pub(crate) struct KeyMask(Arc<memmem::Finder<'static>>);

impl std::fmt::Debug for KeyMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("KeyMask")
    }
}

impl KeyMask {
    /// `None` for a key too short to mask without mangling ordinary text.
    pub(crate) fn new(key: &[u8]) -> Option<KeyMask> {
        (key.len() >= MIN_KEY_LEN).then(|| KeyMask(Arc::new(memmem::Finder::new(key).into_owned())))
    }

    /// Whether `bytes` (a header value, say) carry the key.
    pub(crate) fn found_in(&self, bytes: &[u8]) -> bool {
        self.0.find(bytes).is_some()
    }

    /// A masker for one response body.
    pub(crate) fn redactor(&self) -> Redactor {
        Redactor {
            mask: self.clone(),
            held: Vec::new(),
        }
    }
}

/// Masks the key in one body as it passes.
pub(crate) struct Redactor {
    mask: KeyMask,
    /// Bytes that could be the start of the key, waiting for the next chunk.
    held: Vec<u8>,
}

impl Redactor {
    /// The masked bytes that can be released now. A chunk without the key
    /// and without a tail that could start it is passed on as it is.
    pub(crate) fn feed(&mut self, chunk: Bytes) -> Bytes {
        let finder = &self.mask.0;
        let key = finder.needle();
        if self.held.is_empty() && finder.find(&chunk).is_none() {
            let keep = partial_key_tail(&chunk, key);
            if keep == 0 {
                return chunk;
            }
            let release = chunk.len() - keep;
            self.held.extend_from_slice(&chunk[release..]);
            return chunk.slice(..release);
        }
        self.held.extend_from_slice(&chunk);
        let mut at = 0;
        while let Some(i) = finder.find(&self.held[at..]) {
            let start = at + i;
            self.held[start..start + key.len()].fill(MASK);
            at = start + key.len();
        }
        let release = self.held.len() - partial_key_tail(&self.held[at..], key);
        let out = Bytes::copy_from_slice(&self.held[..release]);
        self.held.drain(..release);
        out
    }

    /// What was held back, at the end of the body. It did not become the
    /// key, but it is the start of it: a start as long as a key could be is
    /// masked too (a provider may quote a key cut short); a shorter one
    /// (`sk-`, a lone `s`) is ordinary text and released as it is.
    pub(crate) fn finish(&mut self) -> Bytes {
        if self.held.len() >= MIN_KEY_LEN {
            self.held.fill(MASK);
        }
        Bytes::from(std::mem::take(&mut self.held))
    }
}

/// The length of the longest tail of `data` that is a proper prefix of
/// `key`: the bytes that must wait for the next chunk.
fn partial_key_tail(data: &[u8], key: &[u8]) -> usize {
    let Some((&first, _)) = key.split_first() else {
        return 0;
    };
    let window = key.len().saturating_sub(1).min(data.len());
    let tail = &data[data.len() - window..];
    // Candidates start where the key's first byte is; the longest first.
    memchr::memchr_iter(first, tail)
        .map(|i| &tail[i..])
        .find(|t| key.starts_with(t))
        .map_or(0, <[u8]>::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secret: &str, chunks: &[&str]) -> (String, Vec<usize>) {
        let mut r = KeyMask::new(secret.as_bytes()).unwrap().redactor();
        let mut out = Vec::new();
        let mut released = Vec::new();
        for c in chunks {
            let b = r.feed(Bytes::copy_from_slice(c.as_bytes()));
            released.push(b.len());
            out.extend_from_slice(&b);
        }
        out.extend_from_slice(&r.finish());
        (String::from_utf8(out).unwrap(), released)
    }

    #[test]
    fn masks_every_occurrence_at_the_same_length() {
        let body = r#"{"error":{"message":"bad key sk-canary-123 (sk-canary-123)"}}"#;
        let (out, _) = run("sk-canary-123", &[body]);
        assert_eq!(out.len(), body.len());
        assert!(!out.contains("sk-canary-123"));
        assert_eq!(out.matches("*************").count(), 2);
    }

    #[test]
    fn masks_a_secret_split_across_chunks() {
        let (out, _) = run("sk-canary-123", &["{\"m\":\"sk-can", "ary", "-123\"}"]);
        assert_eq!(out, "{\"m\":\"*************\"}");
        // Split at every point, in three pieces.
        let body = "data: {\"x\":\"sk-canary-123\"}\n\n";
        for a in 0..body.len() {
            for b in a..body.len() {
                let (out, _) = run("sk-canary-123", &[&body[..a], &body[a..b], &body[b..]]);
                assert_eq!(out, body.replace("sk-canary-123", "*************"));
            }
        }
    }

    #[test]
    fn holds_back_only_what_could_become_the_key() {
        // An event's end is released at once: nothing there starts the key.
        let (out, released) = run("sk-canary-123", &["data: {\"a\":1}\n\n", "data: sk-ca"]);
        assert_eq!(released, vec![15, 6]);
        assert_eq!(out, "data: {\"a\":1}\n\ndata: sk-ca");
        // A near miss is released once it can no longer be the key.
        let (out, released) = run("sk-canary-123", &["x sk-canary-12", "4 y"]);
        assert_eq!(released[0], 2);
        assert_eq!(out, "x sk-canary-124 y");
        // A body that ends in a long start of the key: masked; a short one: kept.
        let (out, _) = run("sk-canary-123", &["x sk-canary-12"]);
        assert_eq!(out, "x ************");
        let (out, _) = run("sk-canary-123", &["x sk-"]);
        assert_eq!(out, "x sk-");
    }

    #[test]
    fn leaves_other_bodies_alone() {
        let body = "nothing to see here, sk-other-key";
        let (out, _) = run("sk-canary-123", &[body, body]);
        assert_eq!(out, format!("{body}{body}"));
        assert!(KeyMask::new(b"short").is_none());
        let m = KeyMask::new(b"sk-canary-123").unwrap();
        assert!(m.found_in(b"Bearer sk-canary-123"));
        assert!(!m.found_in(b"Bearer sk-canary-12"));
    }
}
