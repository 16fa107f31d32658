//! Masking the provider key out of response bodies the client receives
//! unchanged otherwise. A provider that rejects a request may quote the key
//! it was given in its error body; that body goes to the tenant, who must
//! never learn the deployment's key. The mask has the key's length, so a
//! `Content-Length` stays true and the framing is untouched.

use bytes::Bytes;
use memchr::memmem;

/// A streaming mask for one secret. Bytes that could be the start of the
/// secret split across two chunks are held back until the next chunk (or
/// the end) decides.
pub struct Redactor {
    finder: memmem::Finder<'static>,
    held: Vec<u8>,
}

const MASK: u8 = b'*';

impl Redactor {
    /// `None` for a secret too short to mask without mangling ordinary text.
    pub fn new(secret: &[u8]) -> Option<Redactor> {
        (secret.len() >= 8).then(|| Redactor {
            finder: memmem::Finder::new(secret).into_owned(),
            held: Vec::new(),
        })
    }

    /// The masked bytes that can be released now.
    pub fn feed(&mut self, chunk: &[u8]) -> Bytes {
        self.held.extend_from_slice(chunk);
        let n = self.finder.needle().len();
        let mut at = 0;
        while let Some(i) = self.finder.find(&self.held[at..]) {
            self.held[at + i..at + i + n].fill(MASK);
            at += i + n;
        }
        // Keep the longest tail that could still grow into the secret.
        let keep = n - 1;
        let release = self.held.len().saturating_sub(keep);
        let out = Bytes::copy_from_slice(&self.held[..release]);
        self.held.drain(..release);
        out
    }

    /// What was held back, at the end of the body.
    pub fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secret: &str, chunks: &[&str]) -> String {
        let mut r = Redactor::new(secret.as_bytes()).unwrap();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&r.feed(c.as_bytes()));
        }
        out.extend_from_slice(&r.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn masks_every_occurrence_at_the_same_length() {
        let body = r#"{"error":{"message":"bad key sk-canary-123 (sk-canary-123)"}}"#;
        let out = run("sk-canary-123", &[body]);
        assert_eq!(out.len(), body.len());
        assert!(!out.contains("sk-canary-123"));
        assert_eq!(out.matches("*************").count(), 2);
    }

    #[test]
    fn masks_a_secret_split_across_chunks() {
        let out = run("sk-canary-123", &["{\"m\":\"sk-can", "ary", "-123\"}"]);
        assert_eq!(out, "{\"m\":\"*************\"}");
    }

    #[test]
    fn leaves_other_bodies_alone() {
        let body = "nothing to see here, sk-other-key";
        assert_eq!(run("sk-canary-123", &[body, body]), format!("{body}{body}"));
        assert!(Redactor::new(b"short").is_none());
    }
}
