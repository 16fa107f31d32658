//! Fixed-rate (open-loop) latency for benchmarks, with the tenant chosen per
//! request: oha can only send the same headers every time, which would
//! measure 1,000 configured tenants through one tenant's ledger.
//!
//! Requests are scheduled at exact times (`--rate` per second); a request
//! that cannot start on time because every connection is busy waits, and
//! its latency is counted from when it was due, not from when it was sent
//! (so a stall is not hidden: coordinated omission corrected). Responses are
//! read whole (Content-Length or chunked, so streams too).
//!
//! Usage: rate-probe --url http://127.0.0.1:8183/v1/chat/completions \
//!            --body-file body.json --rate 1000 --duration 10 -c 32 \
//!            [--tenants 1000 [--zipf]] [-H 'X-Tenant-ID: bench'] [--json]

use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long)]
    body_file: String,
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(short = 'c', default_value_t = 32)]
    connections: usize,
    /// Tenants `t0`..`tN-1` with keys `sk-t0`..; none: only the -H headers.
    #[arg(long, default_value_t = 0)]
    tenants: usize,
    /// Choose tenants Zipf-distributed (s = 1) instead of uniformly.
    #[arg(long)]
    zipf: bool,
    #[arg(short = 'H')]
    headers: Vec<String>,
    #[arg(long)]
    json: bool,
}

struct Job {
    due: Instant,
    request: Arc<Vec<u8>>,
}

/// Read one HTTP/1.1 response; returns its status.
async fn read_response(c: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 16 << 10];
    let closed = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed");
    let head_end = loop {
        let n = c.read(&mut chunk).await?;
        if n == 0 {
            return Err(closed());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &buf[head_end..];
        let complete = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => true,
        };
        if complete {
            return Ok(status);
        }
        let n = c.read(&mut chunk).await?;
        if n == 0 {
            return Err(closed());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

/// A small deterministic generator: the same tenant sequence every run.
fn next_random(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let rest = a.url.strip_prefix("http://").expect("http:// URL");
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h.to_string(), format!("/{p}")))
        .expect("URL with a path");
    let body = std::fs::read(&a.body_file).expect("body file");
    let build = |extra: &[String]| {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for h in a.headers.iter().chain(extra) {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(&body);
        Arc::new(bytes)
    };
    // One pre-built request per tenant, and the cumulative distribution to pick from.
    let requests: Vec<Arc<Vec<u8>>> = if a.tenants == 0 {
        vec![build(&[])]
    } else {
        (0..a.tenants)
            .map(|i| {
                build(&[
                    format!("X-Tenant-ID: t{i}"),
                    format!("Authorization: Bearer sk-t{i}"),
                ])
            })
            .collect()
    };
    let weights: Vec<f64> = (1..=requests.len())
        .map(|i| if a.zipf { 1.0 / i as f64 } else { 1.0 })
        .collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in weights {
        acc += w / total;
        cdf.push(acc);
    }

    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..a.connections {
        let rx = Arc::clone(&rx);
        let host = host.clone();
        workers.push(tokio::spawn(async move {
            let mut conn: Option<TcpStream> = None;
            let mut buf = Vec::with_capacity(64 << 10);
            let mut lat = Vec::new();
            let (mut errors, mut non2xx) = (0usize, 0usize);
            loop {
                let job = { rx.lock().await.recv().await };
                let Some(job) = job else { break };
                if conn.is_none() {
                    match TcpStream::connect(&host).await {
                        Ok(c) => {
                            let _ = c.set_nodelay(true);
                            conn = Some(c);
                        }
                        Err(_) => {
                            errors += 1;
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                let result = match c.write_all(&job.request).await {
                    Ok(()) => read_response(c, &mut buf).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(status) => {
                        lat.push(job.due.elapsed());
                        if !(200..300).contains(&status) {
                            non2xx += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        conn = None;
                    }
                }
            }
            (lat, errors, non2xx)
        }));
    }

    let start = Instant::now() + Duration::from_millis(50);
    let n = a.rate * a.duration;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..n {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / a.rate);
        tokio::time::sleep_until(due.into()).await;
        let r = next_random(&mut seed);
        let t = cdf.partition_point(|&c| c < r).min(requests.len() - 1);
        let request = Arc::clone(&requests[t]);
        if tx.send(Job { due, request }).is_err() {
            break;
        }
    }
    drop(tx);
    let mut lat = Vec::new();
    let (mut errors, mut non2xx) = (0, 0);
    for w in workers {
        let (l, e, s) = w.await.expect("worker");
        lat.extend(l);
        errors += e;
        non2xx += s;
    }
    lat.sort();
    let elapsed = start.elapsed().as_secs_f64();
    let (p50, p99, p999) = (pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 0.999));
    if a.json {
        println!(
            "{{\"requests\":{},\"rps\":{:.1},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"p999_us\":{p999:.1},\"errors\":{errors},\"non2xx\":{non2xx}}}",
            lat.len(),
            lat.len() as f64 / elapsed
        );
    } else {
        println!(
            "{} requests at {:.0}/s: p50 {p50:.0} µs, p99 {p99:.0} µs, p99.9 {p999:.0} µs; errors {errors}, non-2xx {non2xx}",
            lat.len(),
            lat.len() as f64 / elapsed
        );
    }
}
