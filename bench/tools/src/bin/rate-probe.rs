//! Fixed-rate (open-loop) latency for benchmarks, with the tenant chosen per
//! request: oha can only send the same headers every time, which would
//! measure 1,000 configured tenants through one tenant's ledger.
//!
//! Request `i` is due at `start + i / rate`. Connection `k` (an OS thread
//! with a blocking socket) sends requests `k, k + c, k + 2c, …`, each when it
//! is due. Latency is counted from when a request was due, not from when it
//! was sent, so a slow response that delays the next one shows in both
//! (coordinated omission corrected). Threads sleep with the kernel's timer
//! slack at 1 ns and spin the last microseconds, so a request leaves within
//! a few microseconds of its time (an async runtime's timer wheel rounds to
//! a millisecond, which would be counted as latency). Responses are read whole: Content-Length or chunked,
//! so streams are timed to their end.
//!
//! Usage: rate-probe --url http://127.0.0.1:8183/v1/chat/completions \
//!            --body-file body.json --rate 1000 --duration 10 -c 32 \
//!            [--tenants 1000 [--zipf]] [-H 'X-Tenant-ID: bench'] [--json]

use clap::Parser;
use collie_bench::{percentile_us, split_url};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Read one HTTP/1.1 response; returns its status.
fn read_response(c: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 16 << 10];
    let closed = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed");
    let head_end = loop {
        let n = c.read(&mut chunk)?;
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
        let n = c.read(&mut chunk)?;
        if n == 0 {
            return Err(closed());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A small deterministic generator: the same tenant sequence every run.
fn next_random(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// How early a thread wakes to wait out the rest of its time spinning: a
/// wake-up from sleep takes tens of microseconds on a VM, which would be
/// counted as latency. At 1,000 requests/s this spins ~5% of a core.
const SPIN: Duration = Duration::from_micros(50);

/// Wait until `due`: sleep, then spin the last few microseconds.
fn sleep_until(due: Instant) {
    let now = Instant::now();
    if due > now + SPIN {
        std::thread::sleep(due - now - SPIN);
    }
    while Instant::now() < due {
        std::hint::spin_loop();
    }
}

struct Outcome {
    latencies: Vec<Duration>,
    errors: usize,
    non2xx: usize,
}

fn main() {
    let a = Args::parse();
    let (host, path) = split_url(&a.url);
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
        bytes
    };
    let requests: Vec<Vec<u8>> = if a.tenants == 0 {
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
    // The whole schedule up front: which request goes out at step i.
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
    let n = usize::try_from(a.rate * a.duration).expect("a count");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let schedule: Vec<u32> = (0..n)
        .map(|_| {
            let r = next_random(&mut seed);
            cdf.partition_point(|&c| c < r).min(requests.len() - 1) as u32
        })
        .collect();
    let (requests, schedule) = (Arc::new(requests), Arc::new(schedule));
    let start = Instant::now() + Duration::from_millis(100);
    let step = Duration::from_nanos(1_000_000_000 / a.rate.max(1));
    let threads: Vec<_> = (0..a.connections)
        .map(|k| {
            let (requests, schedule, host) =
                (Arc::clone(&requests), Arc::clone(&schedule), host.clone());
            let connections = a.connections;
            std::thread::spawn(move || {
                // Timer slack: how late the kernel may wake a sleeping thread
                // (50 µs by default). 1 ns: wake on time.
                // SAFETY: prctl with PR_SET_TIMERSLACK takes one integer
                // argument and touches no memory.
                unsafe {
                    libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64);
                }
                let mut out = Outcome {
                    latencies: Vec::with_capacity(schedule.len() / connections + 1),
                    errors: 0,
                    non2xx: 0,
                };
                let mut conn: Option<TcpStream> = None;
                let mut buf = Vec::with_capacity(64 << 10);
                for i in (k..schedule.len()).step_by(connections) {
                    let due = start + step * u32::try_from(i).unwrap_or(u32::MAX);
                    sleep_until(due);
                    if conn.is_none() {
                        match TcpStream::connect(&host) {
                            Ok(c) => {
                                let _ = c.set_nodelay(true);
                                conn = Some(c);
                            }
                            Err(_) => {
                                out.errors += 1;
                                continue;
                            }
                        }
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    let request = &requests[schedule[i] as usize];
                    match c
                        .write_all(request)
                        .and_then(|()| read_response(c, &mut buf))
                    {
                        Ok(status) => {
                            out.latencies.push(due.elapsed());
                            if !(200..300).contains(&status) {
                                out.non2xx += 1;
                            }
                        }
                        Err(_) => {
                            out.errors += 1;
                            conn = None;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(n);
    let (mut errors, mut non2xx) = (0, 0);
    for t in threads {
        let o = t.join().expect("a connection thread");
        lat.extend(o.latencies);
        errors += o.errors;
        non2xx += o.non2xx;
    }
    lat.sort();
    let elapsed = start.elapsed().as_secs_f64();
    let (p50, p99, p999) = (
        percentile_us(&lat, 0.5),
        percentile_us(&lat, 0.99),
        percentile_us(&lat, 0.999),
    );
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
