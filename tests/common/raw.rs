//! HTTP/1.1 on raw sockets, for what a client library would not send:
//! slow, oversized, pipelined or smuggled requests, and clients that leave.

use super::ALPHA_KEY;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 response as read off a raw socket.
#[derive(Debug, Clone)]
pub(crate) struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body was framed to its end (its length, or the last chunk).
    pub complete: bool,
}

impl RawResponse {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The OpenAI-style error code of a response Collie generated.
    pub(crate) fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Every response in `data`, in order, as far as they parse; the last one
/// may be incomplete.
pub(crate) fn parse_responses(mut data: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&data[..end]).into_owned();
        data = &data[end + 4..];
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut r = RawResponse {
            status,
            headers: headers.clone(),
            body: Vec::new(),
            complete: false,
        };
        if (100..200).contains(&status) {
            continue;
        }
        if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let n = len.min(data.len());
            r.body = data[..n].to_vec();
            r.complete = n == len;
            data = &data[n..];
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
                    r.body.extend_from_slice(data);
                    data = &[];
                    break;
                };
                let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16)
                    .unwrap_or(usize::MAX);
                data = &data[eol + 2..];
                if size == 0 {
                    r.complete = data.starts_with(b"\r\n");
                    data = data.get(2..).unwrap_or_default();
                    break;
                }
                if data.len() < size + 2 {
                    r.body.extend_from_slice(&data[..size.min(data.len())]);
                    data = &[];
                    break;
                }
                r.body.extend_from_slice(&data[..size]);
                data = &data[size + 2..];
            }
        } else {
            r.body = data.to_vec();
            data = &[];
        }
        let done = !r.complete;
        out.push(r);
        if done {
            break;
        }
    }
    out
}

/// Send raw bytes on a new connection and read until the gateway closes it
/// (or `limit` passes, which a test treats as "never closed").
pub(crate) async fn raw_exchange(
    addr: SocketAddr,
    request: &[u8],
    limit: Duration,
) -> (Vec<u8>, bool) {
    let mut s = send_raw(addr, request).await;
    read_until_closed(&mut s, limit).await
}

/// Read until the peer closes (`true`) or `limit` passes (`false`).
pub(crate) async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A chat request as raw HTTP/1.1 from tenant alpha.
pub(crate) fn raw_chat(body: &str, extra_headers: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: collie\r\nX-Tenant-ID: alpha\r\nAuthorization: Bearer {ALPHA_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}

/// Connect and send raw bytes, keeping the connection open (to read from
/// it, or to hang up mid-way).
pub(crate) async fn send_raw(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    s
}

/// A provider on raw sockets that answers on kept-alive connections —
/// `GET …/models` with an empty list, a `POST` (its `content-length` body
/// read whole) with a chat completion — except that it closes its first
/// connection, unanswered, when a second request's head arrives on it:
/// what a provider's idle timeout does to a pooled connection at the wrong
/// moment. A body still on its way is left unread, so the close resets the
/// connection. Counts accepted connections.
pub(crate) async fn closing_provider() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(serve_until_second_request(conn, first));
        }
    });
    (addr, accepted)
}

async fn serve_until_second_request(mut conn: TcpStream, close_on_second: bool) {
    let mut buf = Vec::new();
    let mut requests = 0;
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if !read_more(&mut conn, &mut buf).await {
                return;
            }
            continue;
        };
        requests += 1;
        if close_on_second && requests == 2 {
            return;
        }
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        let request = end + 4 + length;
        while buf.len() < request {
            if !read_more(&mut conn, &mut buf).await {
                return;
            }
        }
        buf.drain(..request);
        let body = if head.starts_with("post ") {
            r#"{"id":"c1","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#
        } else {
            r#"{"object":"list","data":[]}"#
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Append what the connection has next to `buf`; `false` once it is closed
/// or broken.
async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 64 << 10];
    match conn.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}
