//! A tokenizer-free estimate of a request's prompt tokens, good enough to
//! reserve with: the reservation is settled to the provider's real count
//! afterwards, so the estimate only decides admission at the margin.
//!
//! It scans the raw request body once (no parsing, no allocation) and counts
//! character classes the way byte-pair encoders tend to merge them: a short
//! word with its leading space is one token, digits go in groups of three,
//! punctuation runs pair up, CJK characters are roughly one token each.
//! Per-family factors are calibrated against the real encoders on the prompts
//! in `tests/fixtures/prompts` (see `tests/quota/estimate.rs` for the measured error).
//! A real BPE encoder was measured too: exact, but about a hundred times
//! slower per byte and several megabytes of tables, so it is only a
//! development dependency used for that calibration.

pub use crate::config::Family;

/// (factor on ASCII text, on words with non-ASCII letters, tokens per
/// CJK character, tokens per other non-ASCII character).
fn factors(family: Family) -> (f64, f64, f64, f64) {
    match family {
        Family::O200k => (1.0, 1.0, 0.72, 0.45),
        Family::Cl100k => (1.0, 2.2, 1.05, 0.75),
        Family::Generic => (1.1, 2.2, 1.1, 0.8),
    }
}

/// Estimated prompt tokens of a request body.
pub fn prompt_tokens(body: &[u8], family: Family) -> u64 {
    let c = classify(body);
    let (ascii_f, foreign_f, cjk, other) = factors(family);
    let ascii = c.words + c.long_word_extra / 4.0 + c.digit_groups + c.punct_pairs + c.newline_runs;
    let est = ascii * ascii_f
        + c.foreign_words * foreign_f
        + c.cjk_chars * cjk
        + c.other_chars * other
        + c.keys;
    est.ceil() as u64
}

#[derive(Debug, Default)]
struct Counts {
    /// Object keys and objects: a token each (`role`, `content`, schema
    /// property names, the framing of each message).
    keys: f64,
    /// Words with accented, Greek or Cyrillic letters (encoders differ most here).
    foreign_words: f64,
    words: f64,
    long_word_extra: f64,
    digit_groups: f64,
    punct_pairs: f64,
    newline_runs: f64,
    cjk_chars: f64,
    other_chars: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    None,
    Word,
    /// A word with at least one two-byte letter.
    Foreign,
    Digits,
    Punct,
}

impl Counts {
    fn close(&mut self, run: Run, len: usize) {
        match run {
            Run::Word => {
                self.words += 1.0;
                // Words longer than a common merge split into pieces.
                if len > 8 {
                    self.long_word_extra += len.saturating_sub(8) as f64;
                }
            }
            Run::Foreign => self.foreign_words += 1.0 + len.saturating_sub(6) as f64 / 4.0,
            Run::Digits => self.digit_groups += len.div_ceil(3) as f64,
            Run::Punct => self.punct_pairs += len.div_ceil(2) as f64,
            Run::None => {}
        }
    }
}

/// A single pass over the JSON text: structure and numbers outside strings
/// are skipped, keys count one token each, string values are classified.
#[expect(
    clippy::arithmetic_side_effects,
    reason = "positions in the body: each stays within its length plus a few bytes"
)]
fn classify(body: &[u8]) -> Counts {
    let mut c = Counts::default();
    // Container kinds by depth (true = object), bounded; deeper levels are
    // treated like the deepest tracked one.
    let mut objects = [false; 64];
    let mut depth = 0usize;
    let mut expect_key = false;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'{' => {
                c.keys += 1.0;
                depth += 1;
                objects[depth.min(63)] = true;
                expect_key = true;
            }
            b'[' => {
                depth += 1;
                objects[depth.min(63)] = false;
                expect_key = false;
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' => expect_key = objects[depth.min(63)],
            b':' => expect_key = false,
            b'"' => {
                let end = crate::usage::json_string_end(body, i + 1);
                if expect_key {
                    c.keys += 1.0;
                } else {
                    classify_long_text(&body[i + 1..end], &mut c);
                }
                i = end + 1;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    c
}

/// Text longer than this is estimated from its first and last parts,
/// scaled to its length: a long prompt is read once, not three times.
const SAMPLE: usize = 4 << 10;

#[expect(
    clippy::arithmetic_side_effects,
    reason = "positions in the body: each stays within its length plus a few bytes"
)]
fn classify_long_text(text: &[u8], c: &mut Counts) {
    if text.len() <= 2 * SAMPLE {
        return classify_text(text, c);
    }
    let mut sample = Counts::default();
    classify_text(&text[..SAMPLE], &mut sample);
    // Start the tail on a character boundary.
    let mut tail = text.len() - SAMPLE;
    while tail < text.len() && (text[tail] & 0xC0) == 0x80 {
        tail += 1;
    }
    classify_text(&text[tail..], &mut sample);
    let scale = text.len() as f64 / (SAMPLE + text.len() - tail) as f64;
    c.add_scaled(&sample, scale);
}

impl Counts {
    fn add_scaled(&mut self, o: &Counts, k: f64) {
        self.keys += o.keys * k;
        self.foreign_words += o.foreign_words * k;
        self.words += o.words * k;
        self.long_word_extra += o.long_word_extra * k;
        self.digit_groups += o.digit_groups * k;
        self.punct_pairs += o.punct_pairs * k;
        self.newline_runs += o.newline_runs * k;
        self.cjk_chars += o.cjk_chars * k;
        self.other_chars += o.other_chars * k;
    }
}

#[expect(
    clippy::arithmetic_side_effects,
    reason = "positions in the body: each stays within its length plus a few bytes"
)]
fn classify_text(text: &[u8], c: &mut Counts) {
    let mut run = Run::None;
    let mut run_len = 0usize;
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        // Bytes of the same class taken at once.
        let mut step = 1;
        let class = match b {
            // A run of ASCII letters, taken whole: each letter would keep
            // the class the first one gave (a foreign word stays foreign).
            b'a'..=b'z' | b'A'..=b'Z' => {
                step = text[i..]
                    .iter()
                    .take_while(|b| b.is_ascii_alphabetic())
                    .count();
                if run == Run::Foreign {
                    Run::Foreign
                } else {
                    Run::Word
                }
            }
            b'0'..=b'9' => Run::Digits,
            b' ' | b'\t' => Run::None,
            b'\\' => {
                match text.get(i + 1) {
                    // Runs of escaped line breaks merge like real ones.
                    Some(b'n') | Some(b'r') => {
                        c.close(run, run_len);
                        run = Run::None;
                        run_len = 0;
                        c.newline_runs += 1.0;
                        while text.get(i) == Some(&b'\\')
                            && matches!(text.get(i + 1), Some(b'n') | Some(b'r'))
                        {
                            i += 2;
                        }
                        continue;
                    }
                    Some(b'u') => {
                        c.close(run, run_len);
                        run = Run::None;
                        run_len = 0;
                        c.other_chars += 1.0;
                        i += 6;
                        continue;
                    }
                    Some(b't') => {
                        i += 1;
                        Run::None
                    }
                    // An escaped quote or backslash is punctuation like any other.
                    _ => {
                        i += 1;
                        Run::Punct
                    }
                }
            }
            // Two-byte letters (accented Latin, Greek, Cyrillic) join words.
            0xC0..=0xDF => {
                if run == Run::Word {
                    run = Run::Foreign;
                } else if run != Run::Foreign {
                    c.close(run, run_len);
                    run = Run::Foreign;
                    run_len = 0;
                }
                run_len += 1;
                i += 2;
                continue;
            }
            0x80.. => {
                c.close(run, run_len);
                run = Run::None;
                run_len = 0;
                let len = utf8_len(b);
                // Three-byte sequences led by E3–ED cover CJK, kana and hangul.
                if len == 3 && (0xE3..=0xED).contains(&b) {
                    c.cjk_chars += 1.0;
                } else {
                    c.other_chars += 1.0;
                }
                i += len;
                continue;
            }
            _ => Run::Punct,
        };
        if class != run {
            c.close(run, run_len);
            run = class;
            run_len = 0;
        }
        run_len += step;
        i += step;
    }
    c.close(run, run_len);
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_names() {
        assert_eq!(Family::for_model("gpt-4o-mini"), Family::O200k);
        assert_eq!(Family::for_model("gpt-4-turbo"), Family::Cl100k);
        assert_eq!(Family::for_model("claude-sonnet-4"), Family::Generic);
    }

    #[test]
    fn long_text_is_sampled_in_proportion() {
        let body = |n: usize| {
            let text = "The quarterly figures rose by 4.2% while costs stayed flat; see table 7. "
                .repeat(n);
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{text}"}}]}}"#)
        };
        let small = prompt_tokens(body(400).as_bytes(), Family::O200k) as f64;
        let large = prompt_tokens(body(4000).as_bytes(), Family::O200k) as f64;
        assert!((large / small - 10.0).abs() < 0.3, "{small} → {large}");
    }

    #[test]
    fn grows_with_content() {
        let small = prompt_tokens(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            Family::O200k,
        );
        let big = prompt_tokens(
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
                "hello world ".repeat(1000)
            )
            .as_bytes(),
            Family::O200k,
        );
        assert!(small < 30 && (1900..2300).contains(&big), "{small} {big}");
    }
}
