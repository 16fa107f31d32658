//! How far the tokenizer-free prompt estimate is from the real encoders, on
//! the prompts in `tests/fixtures/prompts`. Run with `--nocapture` to see the
//! table (`cargo test --test quota estimate -- --nocapture`).

use collie::quota::estimate::{Family, prompt_tokens};
use tiktoken_rs::CoreBPE;

/// Prompt tokens as OpenAI counts a chat request: each message costs its
/// content plus a few framing tokens, tools their JSON.
fn truth(bpe: &CoreBPE, body: &serde_json::Value) -> usize {
    let mut n = 3;
    for m in body["messages"].as_array().unwrap() {
        n += 4 + bpe.encode_ordinary(m["content"].as_str().unwrap()).len();
    }
    if let Some(tools) = body.get("tools") {
        n += bpe.encode_ordinary(&tools.to_string()).len();
    }
    n
}

#[test]
fn estimate_error_on_real_prompts() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/prompts");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for (family, bpe) in [
        (Family::O200k, tiktoken_rs::o200k_base().unwrap()),
        (Family::Cl100k, tiktoken_rs::cl100k_base().unwrap()),
    ] {
        let mut abs_err = Vec::new();
        let mut worst = Vec::new();
        println!(
            "{family:?}\n{:<24} {:>7} {:>9} {:>7}",
            "prompt", "real", "estimate", "error"
        );
        for f in &files {
            let raw = std::fs::read(f).unwrap();
            let body: serde_json::Value = serde_json::from_slice(&raw).unwrap();
            let real = truth(&bpe, &body) as f64;
            let est = prompt_tokens(&raw, family) as f64;
            let err = (est - real) / real;
            abs_err.push(err.abs());
            let name = f.file_stem().unwrap().to_string_lossy();
            println!("{name:<24} {real:>7} {est:>9} {:>6.1}%", err * 100.0);
            worst.push((err.abs(), name.to_string()));
        }
        let mean = abs_err.iter().sum::<f64>() / abs_err.len() as f64;
        println!("mean absolute error {:.1}%\n", mean * 100.0);
        for (e, name) in worst {
            assert!(e <= 0.35, "{family:?} {name}: error {e:.3}");
        }
        assert!(mean <= 0.15, "{family:?}: mean absolute error {mean:.3}");
    }
}
