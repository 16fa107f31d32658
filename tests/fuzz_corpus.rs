//! Replays the fuzz corpora kept under `tests/fuzz/<target>/` through the
//! same checks the fuzz targets in `fuzz/` run (`collie::fuzzing`), so an
//! input fuzzing once found, and every seed, stays checked by `cargo test`.
//! Grow a corpus with `deploy/fuzz.sh` (see the README).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus for {target}");
    for f in files {
        let data = std::fs::read(&f).unwrap();
        let name = f.display().to_string();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{name} fails its check");
    }
}

#[test]
fn request_body() {
    replay("request_body", collie::fuzzing::request_body);
}

#[test]
fn sse_stream() {
    replay("sse_stream", collie::fuzzing::sse_stream);
}

#[test]
fn identity_headers() {
    replay("identity_headers", collie::fuzzing::identity_headers);
}

#[test]
fn config_file() {
    replay("config_file", collie::fuzzing::config_file);
}

#[test]
fn retry_after() {
    replay("retry_after", collie::fuzzing::retry_after);
}

#[test]
fn key_mask() {
    replay("key_mask", collie::fuzzing::key_mask);
}

#[test]
fn request_head() {
    replay("request_head", collie::fuzzing::request_head);
}
