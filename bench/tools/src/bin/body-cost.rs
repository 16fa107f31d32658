//! What the request path does to a body before it is sent, per step, single
//! thread: JSON inspection (model, stream flags, depth bound), the prompt
//! estimate, the per-attempt rewrite of `model`, and the audit trail's
//! request hash (which the audit writer computes off the request path).
//! Bodies are chat requests shaped like the OpenAI SDK's (`model` last).
//! Each figure is the best of seven repetitions. Usage: body-cost [ROUNDS]

use bytes::Bytes;
use collie::audit::record::request_hash;
use collie::gateway::body::inspect;
use collie::quota::estimate::{Family, prompt_tokens};
use std::time::Instant;

fn chat_body(size: usize) -> Bytes {
    let filler = size.saturating_sub(120);
    let content: String = "lorem ipsum dolor sit amet "
        .repeat(filler / 27 + 1)
        .chars()
        .take(filler)
        .collect();
    Bytes::from(format!(
        r#"{{"messages":[{{"role":"user","content":"{content}"}}],"max_tokens":16,"model":"bench"}}"#
    ))
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    println!(
        "{:>9} {:>10} {:>10} {:>10} {:>10}",
        "body", "inspect", "estimate", "rewrite", "hash"
    );
    for size in [1 << 10, 32 << 10, 200 << 10, 2 << 20] {
        let body = chat_body(size);
        let n = (rounds * (32 << 10) / size).clamp(20, rounds);
        // The best of several repetitions: on a shared machine the minimum
        // is the figure least disturbed by neighbours.
        let time = |f: &mut dyn FnMut() -> usize| {
            (0..7)
                .map(|_| {
                    let start = Instant::now();
                    let mut sink = 0usize;
                    for _ in 0..n {
                        sink = sink.wrapping_add(f());
                    }
                    std::hint::black_box(sink);
                    start.elapsed().as_nanos() as f64 / n as f64 / 1000.0
                })
                .fold(f64::INFINITY, f64::min)
        };
        let inspected = inspect(&body, 64).expect("a valid body");
        let t_inspect = time(&mut || inspect(&body, 64).map_or(0, |i| i.model.len()));
        let t_estimate = time(&mut || prompt_tokens(&body, Family::O200k) as usize);
        let t_rewrite = time(&mut || {
            inspected
                .body_for(&body, "bench-upstream-model", false)
                .map_or(0, |b| b.len())
        });
        let t_hash = time(&mut || request_hash(&body).len());
        println!(
            "{:>7}KiB {:>8.1}µs {:>8.1}µs {:>8.1}µs {:>8.1}µs",
            size >> 10,
            t_inspect,
            t_estimate,
            t_rewrite,
            t_hash
        );
    }
}
