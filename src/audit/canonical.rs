//! The request hash: SHA-256 of a JSON body's canonical form (object keys
//! sorted, no insignificant whitespace, strings and numbers written the one
//! way `serde_json` writes them), so two requests that differ only in layout
//! or key order hash alike.
//!
//! The canonical bytes are never built as one buffer: the body is parsed
//! into a tree of borrowed spans and the spans are fed to the hasher in
//! canonical order. A string without escapes is already canonical, so a long
//! prompt is hashed straight from the request body, without being decoded,
//! re-escaped or copied.

use sha2::{Digest, Sha256};

/// Deeper documents are hashed as they came (the gateway refuses them long
/// before this, at `max_json_depth`).
const MAX_DEPTH: usize = 512;

/// Hex SHA-256 of the canonical form of `body`; a body that is not JSON is
/// hashed as it is.
pub fn request_hash(body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    match parse_document(body) {
        Some(node) => feed(&node, &mut hasher),
        None => hasher.update(body),
    }
    crate::audit::record::lower_hex(&hasher.finalize())
}

enum Node<'a> {
    /// Bytes already in canonical form: a string without escapes (quotes
    /// included), `true`, `false`, `null`.
    Raw(&'a [u8]),
    /// Canonical text made for a string with escapes or a number.
    Owned(Vec<u8>),
    Array(Vec<Node<'a>>),
    /// Members sorted by decoded key, one per key (the last wins, as when
    /// the body is read into a map).
    Object(Vec<(Key<'a>, Node<'a>)>),
}

struct Key<'a> {
    /// The key as text, for ordering.
    text: std::borrow::Cow<'a, [u8]>,
    /// The key in canonical form, quotes included.
    canonical: Node<'a>,
}

fn feed(node: &Node<'_>, h: &mut Sha256) {
    match node {
        Node::Raw(b) => h.update(b),
        Node::Owned(b) => h.update(b),
        Node::Array(items) => {
            h.update(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                feed(item, h);
            }
            h.update(b"]");
        }
        Node::Object(members) => {
            h.update(b"{");
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                feed(&k.canonical, h);
                h.update(b":");
                feed(v, h);
            }
            h.update(b"}");
        }
    }
}

/// Whether any byte is below 0x20. Written without an early exit so that it
/// compiles to vector instructions: a long prompt is scanned at memory speed.
fn has_control(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    for chunk in &mut chunks {
        if chunk.iter().fold(false, |acc, &c| acc | (c < 0x20)) {
            return true;
        }
    }
    chunks.remainder().iter().any(|&c| c < 0x20)
}

fn parse_document(body: &[u8]) -> Option<Node<'_>> {
    let mut p = Parser { b: body, i: 0 };
    let node = p.value(0)?;
    p.ws();
    (p.i == body.len()).then_some(node)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Option<Node<'a>> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match *self.b.get(self.i)? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string().map(|(node, _)| node),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Option<Node<'a>> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| {
            self.i = end;
            Node::Raw(word)
        })
    }

    fn number(&mut self) -> Option<Node<'a>> {
        let start = self.i;
        while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.b.get(self.i) {
            self.i += 1;
        }
        // `1.50`, `1e2` and `150e-2` are one number: write it the one way.
        let n: serde_json::Number = serde_json::from_slice(&self.b[start..self.i]).ok()?;
        Some(Node::Owned(n.to_string().into_bytes()))
    }

    /// A string as a canonical node, and its decoded text for key ordering.
    fn string(&mut self) -> Option<(Node<'a>, std::borrow::Cow<'a, [u8]>)> {
        let start = self.i;
        self.i += 1;
        let mut escaped = false;
        loop {
            let rest = self.b.get(self.i..)?;
            let at = memchr::memchr2(b'"', b'\\', rest)?;
            // Raw control characters are not JSON.
            if has_control(&rest[..at]) {
                return None;
            }
            self.i += at;
            if self.b[self.i] == b'"' {
                self.i += 1;
                break;
            }
            escaped = true;
            self.i += 2;
        }
        let raw = &self.b[start..self.i];
        if !escaped {
            std::str::from_utf8(raw).ok()?;
            return Some((
                Node::Raw(raw),
                std::borrow::Cow::Borrowed(&raw[1..raw.len() - 1]),
            ));
        }
        // Escapes have more than one spelling (`\u0041` is `A`): decode and
        // write the text the canonical way.
        let text: String = serde_json::from_slice(raw).ok()?;
        let canonical = serde_json::to_vec(&text).ok()?;
        Some((
            Node::Owned(canonical),
            std::borrow::Cow::Owned(text.into_bytes()),
        ))
    }

    fn array(&mut self, depth: usize) -> Option<Node<'a>> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.b.get(self.i) == Some(&b']') {
            self.i += 1;
            return Some(Node::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            self.ws();
            match self.b.get(self.i)? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(Node::Array(items));
                }
                _ => return None,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<Node<'a>> {
        self.i += 1;
        let mut members: Vec<(Key<'a>, Node<'a>)> = Vec::new();
        self.ws();
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Some(Node::Object(members));
        }
        loop {
            self.ws();
            if self.b.get(self.i) != Some(&b'"') {
                return None;
            }
            let (canonical, text) = self.string()?;
            self.ws();
            if self.b.get(self.i) != Some(&b':') {
                return None;
            }
            self.i += 1;
            let value = self.value(depth + 1)?;
            members.push((Key { text, canonical }, value));
            self.ws();
            match self.b.get(self.i)? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    break;
                }
                _ => return None,
            }
        }
        // Stable sort, then keep the last of equal keys.
        members.sort_by(|a, b| a.0.text.cmp(&b.0.text));
        let mut unique: Vec<(Key<'a>, Node<'a>)> = Vec::with_capacity(members.len());
        for m in members {
            match unique.last_mut() {
                Some(last) if last.0.text == m.0.text => *last = m,
                _ => unique.push(m),
            }
        }
        Some(Node::Object(unique))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The plain definition: read into a map, write keys sorted.
    fn reference(body: &[u8]) -> String {
        fn write(v: &serde_json::Value, out: &mut Vec<u8>) {
            use serde_json::Value;
            match v {
                Value::Object(map) => {
                    let mut keys: Vec<&String> = map.keys().collect();
                    keys.sort();
                    out.push(b'{');
                    for (i, k) in keys.into_iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(&serde_json::to_vec(k).unwrap());
                        out.push(b':');
                        write(&map[k], out);
                    }
                    out.push(b'}');
                }
                Value::Array(items) => {
                    out.push(b'[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        write(item, out);
                    }
                    out.push(b']');
                }
                other => out.extend_from_slice(&serde_json::to_vec(other).unwrap()),
            }
        }
        let canonical = match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => {
                let mut out = Vec::new();
                write(&v, &mut out);
                out
            }
            Err(_) => body.to_vec(),
        };
        hex::encode(Sha256::digest(&canonical))
    }

    #[test]
    fn layout_and_key_order_do_not_matter() {
        let a = request_hash(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let b = request_hash(
            b"{ \"messages\" : [ {\"content\":\"hi\", \"role\":\"user\"} ],\n \"model\":\"m\" }",
        );
        assert_eq!(a, b);
        assert_ne!(a, request_hash(br#"{"model":"m","messages":[]}"#));
        assert_eq!(request_hash(b"not json").len(), 64);
    }

    #[test]
    fn matches_the_plain_definition() {
        let cases: &[&[u8]] = &[
            br#"{"b":1,"a":[true,false,null,-0,1.50,1e2,-3E-2,12345678901234567890]}"#,
            br#"{"k":"caf\u00e9 \"quoted\" \\ \/ \n tab\t","\u0061":"A","a":"dup"}"#,
            "{\"emoji\":\"😀 ünïcödé\",\"z\":{\"y\":{\"x\":[]}},\"e\":{}}".as_bytes(),
            br#"{"a":1,"a":2}"#,
            br#"  [1, "two", {"three": 3}]  "#,
            br#""just a string""#,
            br#"{"unterminated": "#,
            br#"{"a":1}x"#,
            b"{\"raw\":\"control\x01char\"}",
            br#"{"num": 01}"#,
        ];
        for c in cases {
            assert_eq!(
                request_hash(c),
                reference(c),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            (-1e6f64..1e6).prop_map(|f| serde_json::json!(f)),
            "\\PC{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("\\PC{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn agrees_with_the_plain_definition_on_any_document(v in json_value(), pretty in any::<bool>()) {
            let body = if pretty {
                serde_json::to_vec_pretty(&v).unwrap()
            } else {
                serde_json::to_vec(&v).unwrap()
            };
            prop_assert_eq!(request_hash(&body), reference(&body));
        }
    }
}
