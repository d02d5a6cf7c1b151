//! The one admin HTTP client of the tests, bench and demo: a raw HTTP/1.0 request per
//! connection to latch-control's or latch-proxy's admin endpoint (async or blocking), answering
//! (status, body); plus reading a sample from /metrics text and waiting for /ready. Used by
//! `harness`, `processes`, `loopback_mesh`, the end-to-end and control-plane tests, the demo.

use std::fmt::Display;
use std::io::{Error, ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The request text: `method path` with `Authorization: Bearer <bearer>` when given.
fn request_text(addr: &str, method: &str, path: &str, bearer: Option<&str>, body: &str) -> String {
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    let kind = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}{kind}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// (status, body) of an HTTP/1.0 response.
fn parse_response(response: &str) -> std::io::Result<(u16, String)> {
    let bad = || Error::new(ErrorKind::InvalidData, format!("not HTTP: {response:?}"));
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let body = response.split_once("\r\n\r\n").ok_or_else(bad)?.1;
    Ok((status, body.to_string()))
}

/// Sends `method path` (bearer credential and JSON `body` optional) to `addr`.
pub async fn request(
    addr: impl Display,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let addr = addr.to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await?;
    tcp.write_all(request_text(&addr, method, path, bearer, body).as_bytes())
        .await?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).await?;
    parse_response(&response)
}

/// GET `path` from the admin endpoint at `addr`.
pub async fn get(addr: impl Display, path: &str) -> std::io::Result<(u16, String)> {
    request(addr, "GET", path, None, "").await
}

/// `request`, blocking, with a 2 s connect and 10 s read timeout.
pub fn request_blocking(
    addr: impl Display,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let addr = addr.to_string();
    let socket = addr
        .parse()
        .map_err(|e| Error::new(ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let mut tcp = std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.write_all(request_text(&addr, method, path, bearer, body).as_bytes())?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    parse_response(&response)
}

/// GET `path`, blocking; `None` when nothing answers.
pub fn get_blocking(addr: impl Display, path: &str) -> Option<(u16, String)> {
    request_blocking(addr, "GET", path, None, "").ok()
}

/// Whether `/ready` answers 200 (blocking).
pub fn is_ready(addr: impl Display) -> bool {
    get_blocking(addr, "/ready").is_some_and(|(status, _)| status == 200)
}

/// Waits until `/ready` at `admin` answers 200, panicking after `timeout`.
pub async fn wait_ready(admin: impl Display, timeout: Duration) {
    let admin = admin.to_string();
    let deadline = Instant::now() + timeout;
    loop {
        match get(&admin, "/ready").await {
            Ok((200, _)) => return,
            other if Instant::now() > deadline => panic!("{admin} not ready: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The sum of a metric's samples in /metrics `text`: lines starting with `name` that contain
/// every one of `labels`; 0 when there are none.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the sample `series` (name and labels exactly as exported); 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap_or(0.0))
}

/// `metric_sum` of the admin endpoint at `admin`'s /metrics (async).
pub async fn metric(admin: impl Display, name: &str, labels: &[&str]) -> f64 {
    let (_, text) = get(admin, "/metrics").await.expect("metrics");
    metric_sum(&text, name, labels)
}

/// `metric_sum` of the admin endpoint at `admin`'s /metrics (blocking; 0 when it is down).
pub fn metric_blocking(admin: impl Display, name: &str, labels: &[&str]) -> f64 {
    let text = get_blocking(admin, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    metric_sum(&text, name, labels)
}
