//! What the prompt estimate costs next to a real BPE encoder, on the
//! calibration prompts: nanoseconds per request body byte, single thread.
//! Usage: estimate-cost [ROUNDS]

use collie::quota::estimate::{Family, prompt_tokens};
use std::time::Instant;

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/prompts");
    let mut bodies = Vec::new();
    for entry in std::fs::read_dir(dir).expect("fixtures") {
        let path = entry.expect("entry").path();
        bodies.push(std::fs::read(path).expect("read"));
    }
    let bytes: usize = bodies.iter().map(Vec::len).sum::<usize>() * rounds;

    let start = Instant::now();
    let mut sink = 0u64;
    for _ in 0..rounds {
        for b in &bodies {
            sink = sink.wrapping_add(prompt_tokens(b, Family::O200k));
        }
    }
    let ours = start.elapsed();

    let load = Instant::now();
    let bpe = tiktoken_rs::o200k_base().expect("o200k");
    let load = load.elapsed();
    let texts: Vec<String> = bodies
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    let start = Instant::now();
    for _ in 0..rounds {
        for t in &texts {
            sink = sink.wrapping_add(bpe.encode_ordinary(t).len() as u64);
        }
    }
    let real = start.elapsed();
    let per_byte = |d: std::time::Duration| d.as_nanos() as f64 / bytes as f64;
    println!(
        "bytes encoded: {bytes} ({} bodies x {rounds} rounds)",
        bodies.len()
    );
    println!("estimate:   {:.2} ns/byte", per_byte(ours));
    println!(
        "o200k BPE:  {:.2} ns/byte ({:.0}x), table load {:.0} ms",
        per_byte(real),
        per_byte(real) / per_byte(ours),
        load.as_secs_f64() * 1e3
    );
    println!("(checksum {sink})");
}
