//! What the benchmark clients share.

use std::time::Duration;

/// `http://host:port/path` → (`host:port`, `/path`). Panics on anything
/// else: a benchmark with a wrong URL should stop at once.
pub fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("http:// URL");
    rest.split_once('/')
        .map(|(h, p)| (h.to_string(), format!("/{p}")))
        .expect("URL with a path")
}

/// The `p` quantile (0..=1) of sorted durations, in microseconds; 0 when empty.
pub fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}
