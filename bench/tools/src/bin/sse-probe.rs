//! A streaming client for benchmarks: sends N streamed chat requests, C at a
//! time, over HTTP/1.1 keep-alive connections and records per stream the time
//! to the first content event, every gap between events, the event count,
//! whether `[DONE]` arrived, and any usage seen. Load tools time whole
//! responses; this times the frames.
//!
//! Usage: sse-probe --url http://127.0.0.1:8183/v1/chat/completions -n 200 -c 8 \
//!            [-H 'X-Tenant-ID: bench'] [--body '{…}'] [--json]

use clap::Parser;
use collie_bench::{percentile_us, split_url};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(short = 'n', default_value_t = 100)]
    requests: usize,
    #[arg(short = 'c', default_value_t = 1)]
    concurrency: usize,
    #[arg(short = 'H')]
    headers: Vec<String>,
    #[arg(
        long,
        default_value = r#"{"messages":[{"role":"user","content":"stream please"}],"stream":true,"model":"bench"}"#
    )]
    body: String,
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Stream {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    events: usize,
    done: bool,
    usage: bool,
    error: Option<String>,
}

async fn one(
    conn: &mut Option<TcpStream>,
    host: &str,
    path: &str,
    headers: &[String],
    body: &str,
) -> Stream {
    let mut s = Stream::default();
    if conn.is_none() {
        match TcpStream::connect(host).await {
            Ok(c) => {
                let _ = c.set_nodelay(true);
                *conn = Some(c);
            }
            Err(e) => {
                s.error = Some(e.to_string());
                return s;
            }
        }
    }
    let Some(c) = conn.as_mut() else {
        return s;
    };
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    let start = Instant::now();
    if let Err(e) = c.write_all(req.as_bytes()).await {
        s.error = Some(e.to_string());
        *conn = None;
        return s;
    }
    // Read the head, then the chunked body, timing each SSE event as it completes.
    let mut buf = Vec::with_capacity(16 << 10);
    let mut chunk = [0u8; 16 << 10];
    let mut head_end = None;
    let mut scanned = 0;
    let mut last = start;
    loop {
        let n = match c.read(&mut chunk).await {
            Ok(0) => {
                s.error = Some("connection closed".into());
                *conn = None;
                return s;
            }
            Ok(n) => n,
            Err(e) => {
                s.error = Some(e.to_string());
                *conn = None;
                return s;
            }
        };
        let now = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        if head_end.is_none() {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..p]).to_string();
                if !head.starts_with("HTTP/1.1 200") {
                    s.error = Some(head.lines().next().unwrap_or("").to_string());
                    *conn = None;
                    return s;
                }
                head_end = Some(p + 4);
                scanned = p + 4;
            } else {
                continue;
            }
        }
        // Events are separated by a blank line inside the chunk payloads.
        while let Some(off) = buf[scanned..].windows(2).position(|w| w == b"\n\n") {
            let event = String::from_utf8_lossy(&buf[scanned..scanned + off]).to_string();
            scanned += off + 2;
            let data = event
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("");
            if data == "[DONE]" {
                s.done = true;
                continue;
            }
            s.events += 1;
            if data.contains("\"usage\":{") {
                s.usage = true;
            }
            if data.contains("\"content\":\"") && !data.contains("\"content\":\"\"") {
                if s.ttft.is_none() {
                    s.ttft = Some(now - start);
                } else {
                    s.gaps.push(now - last);
                }
                last = now;
            }
        }
        if buf.ends_with(b"\r\n0\r\n\r\n") {
            return s;
        }
    }
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let (host, path) = split_url(&a.url);
    let per = a.requests.div_ceil(a.concurrency);
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (host, path, headers, body) = (
            host.clone(),
            path.clone(),
            a.headers.clone(),
            a.body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn = None;
            let mut out = Vec::new();
            for _ in 0..per {
                out.push(one(&mut conn, &host, &path, &headers, &body).await);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let mut ttft: Vec<Duration> = all.iter().filter_map(|s| s.ttft).collect();
    let mut gaps: Vec<Duration> = all.iter().flat_map(|s| s.gaps.iter().copied()).collect();
    ttft.sort();
    gaps.sort();
    let errors = all.iter().filter(|s| s.error.is_some()).count();
    let incomplete = all.iter().filter(|s| s.error.is_none() && !s.done).count();
    let events: usize = all.iter().map(|s| s.events).sum();
    let with_usage = all.iter().filter(|s| s.usage).count();
    let (t50, t99, g50, g99) = (
        percentile_us(&ttft, 0.5),
        percentile_us(&ttft, 0.99),
        percentile_us(&gaps, 0.5),
        percentile_us(&gaps, 0.99),
    );
    if a.json {
        println!(
            "{{\"streams\":{},\"errors\":{errors},\"incomplete\":{incomplete},\"events\":{events},\"with_usage\":{with_usage},\"ttft_p50_us\":{t50:.0},\"ttft_p99_us\":{t99:.0},\"gap_p50_us\":{g50:.0},\"gap_p99_us\":{g99:.0}}}",
            all.len()
        );
    } else {
        println!(
            "streams {} errors {errors} incomplete {incomplete} events {events} with usage {with_usage}",
            all.len()
        );
        println!("ttft p50 {t50:.0} µs p99 {t99:.0} µs; gap p50 {g50:.0} µs p99 {g99:.0} µs");
        if let Some(e) = all.iter().find_map(|s| s.error.clone()) {
            println!("first error: {e}");
        }
    }
}
