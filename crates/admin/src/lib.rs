//! What both binaries share to be operable: the serve loop every listener runs through and the
//! signal handling (`serve`), the admin HTTP server (`/healthz`, `/ready`, `/metrics`, debug and
//! management endpoints) on it, response helpers, and logging set-up. Each binary supplies its
//! own routes.

pub mod serve;

pub mod backoff;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::serve::{AtCap, Drain, ListenerPolicy, NoMetrics, Plain};

pub use hyper::{Method, StatusCode as Status};

/// Logs to stderr as text or JSON (`--log-format`), filtered by RUST_LOG (default info). Text
/// is coloured only on a terminal: `docker logs`, files and journald get no escape codes. Text
/// is one line per event whatever a message holds (`OneLine`); JSON escapes by itself.
pub fn init_logging(format: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    if format == "json" {
        builder.json().with_writer(std::io::stderr).init();
    } else {
        builder
            .with_writer(move || OneLine {
                out: std::io::stderr(),
                keep_ansi: ansi,
            })
            .init();
    }
}

/// A text log writer that keeps every event on one line: a newline, carriage return or other
/// control character inside an event (a string from the network in a message or a field, say a
/// CSR's URI or a NACK's error text) is written escaped (`\n`, `\u{1b}`), so nobody can forge a
/// log line or rewrite the terminal. Only the event's final newline stays. tracing-subscriber
/// formats an event completely and hands it over in one `write_all`, so one `write` is one
/// event. `keep_ansi`: the escape character is left alone for the colours of a terminal.
pub struct OneLine<W> {
    pub out: W,
    pub keep_ansi: bool,
}

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let body = text.strip_suffix('\n').unwrap_or(&text);
        let mut line = String::with_capacity(body.len() + 1);
        for c in body.chars() {
            if c.is_control() && c != '\t' && !(self.keep_ansi && c == '\x1b') {
                line.extend(c.escape_default());
            } else {
                line.push(c);
            }
        }
        line.push('\n');
        self.out.write_all(line.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// `s` for a log line or an error message when it came from the network: quoted and escaped
/// (Rust's `{:?}`), and cut to `max` characters with the full length said, so a peer controls
/// neither the shape nor the size of what is written.
pub fn untrusted(s: &str, max: usize) -> String {
    let chars = s.chars().count();
    if chars <= max {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(max).collect();
        format!("{head:?}... ({} bytes in all)", s.len())
    }
}

/// What handlers return.
pub type HttpResponse = Response<Full<Bytes>>;

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response
}

/// A JSON response.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A JSON `{"error": message}` response.
pub fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// The registry's metrics as OpenMetrics text.
pub fn metrics(registry: &prometheus_client::registry::Registry) -> HttpResponse {
    let mut body = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut body, registry);
    let mut response = text(StatusCode::OK, body);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}

/// `/ready`: 200 "ready" or 503 with the reason.
pub fn readiness(state: Result<(), String>) -> HttpResponse {
    match state {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Connections one source address may hold open on an admin listener at a time.
pub const ADMIN_CONNECTIONS_PER_SOURCE: usize = 16;

/// The admin listener of both binaries: 256 connections (more wait in the kernel's listen
/// queue), at most `ADMIN_CONNECTIONS_PER_SOURCE` of them from one address (more are closed at
/// once), 10 s to send a request's head (the first too: an idle connection is closed then). A
/// client holding thousands of idle connections therefore keeps 16 places, not the listener:
/// the kubelet's probes and Prometheus, from other addresses, are still served. It closes at
/// once on shutdown, without a drain.
pub fn admin_policy() -> ListenerPolicy {
    ListenerPolicy {
        request_header_timeout: Some(Duration::from_secs(10)),
        per_source: Some(ADMIN_CONNECTIONS_PER_SOURCE),
        ..ListenerPolicy::new("admin", 256, AtCap::Wait)
    }
}

/// Serves HTTP/1 on `listener` with `handler` until `cancel` fires. The handler gets the
/// connection's peer address with each request, for endpoints served to loopback only.
pub fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    serve::serve(
        listener,
        admin_policy(),
        &Drain::immediate(tracker, &cancel),
        Arc::new(NoMetrics),
        Plain,
        move |conn: serve::Accepted<_, SocketAddr>| {
            let (peer, handler) = (conn.remote, handler.clone());
            serve::serve_http1(conn, move |request| handler(peer, request))
        },
    );
}

/// Whether `peer` is this host's loopback (127.0.0.0/8, ::1, or 127.0.0.0/8 mapped into IPv6 by
/// a dual-stack listener): the address a process inside the pod's network namespace connects
/// from, and no other pod can.
pub fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::{Accepted, AtCap, serve as serve_loop};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    const FLOOD: usize = 10_000;

    #[test]
    fn a_log_event_stays_on_one_line_whatever_it_holds() {
        use std::io::Write;
        let mut sink = OneLine {
            out: Vec::new(),
            keep_ansi: false,
        };
        // What a CSR URI with a newline made of the refusal line before: a second, forged line.
        let event = "INFO refused certificate request: CSR asks for spiffe://td/x\nINFO issued SVID spiffe_id=spiffe://td/ns/latch-system/sa/latch-control\r\x1b[2K\n";
        let written = sink.write(event.as_bytes()).unwrap();
        assert_eq!(written, event.len());
        let out = String::from_utf8(sink.out).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.ends_with('\n'));
        assert!(
            out.contains("spiffe://td/x\\nINFO issued SVID") && out.contains("\\r\\u{1b}[2K"),
            "{out}"
        );
    }

    #[test]
    fn untrusted_strings_are_quoted_and_bounded() {
        assert_eq!(untrusted("web", 10), "\"web\"");
        assert_eq!(untrusted("a\nb", 10), "\"a\\nb\"");
        let long = "x".repeat(3_000_000);
        let shown = untrusted(&long, 64);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("... (3000000 bytes in all)"), "{shown}");
    }

    /// `GET path` on a new connection from 127.0.0.1; the status line.
    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut response = String::new();
        tcp.read_to_string(&mut response).await?;
        Ok(response.lines().next().unwrap_or_default().to_string())
    }

    /// An echo round trip on a new connection.
    async fn echo_once(addr: SocketAddr) -> std::io::Result<()> {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tcp.read_exact(&mut buf).await?;
        Ok(())
    }

    /// Opens `FLOOD` connections to `addr` from 127.0.0.2, 100 at a time, and holds them all
    /// without sending a byte; returns how many connected.
    async fn flood(addr: SocketAddr) -> (usize, Vec<TcpStream>) {
        let mut held = Vec::with_capacity(FLOOD);
        let mut connected = 0;
        for _ in 0..FLOOD / 100 {
            let mut batch = tokio::task::JoinSet::new();
            for _ in 0..100 {
                batch.spawn(async move {
                    let socket = TcpSocket::new_v4()?;
                    socket.bind(([127, 0, 0, 2], 0).into())?;
                    socket.connect(addr).await
                });
            }
            while let Some(done) = batch.join_next().await {
                if let Ok(Ok(tcp)) = done {
                    connected += 1;
                    held.push(tcp);
                }
            }
        }
        (connected, held)
    }

    /// Threat model "no unauthenticated caller can exhaust what others need": one client opens
    /// and holds 10,000 idle admin connections; /ready from another address and traffic on a
    /// data listener of the same process keep answering within 2 s throughout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_idle_admin_connections_from_one_client_leave_ready_and_traffic_served() {
        let limit = crate::serve::open_files_limit().unwrap_or(0);
        assert!(
            limit > FLOOD as u64 + 1000,
            "RLIMIT_NOFILE {limit} is too low for this test: ulimit -n 20000"
        );
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        serve(
            admin,
            |_peer, request: Request<Incoming>| async move {
                match request.uri().path() {
                    "/ready" => readiness(Ok(())),
                    _ => error(StatusCode::NOT_FOUND, "not found"),
                }
            },
            &tracker,
            cancel.clone(),
        );
        let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let data_addr = data.local_addr().unwrap();
        serve_loop(
            data,
            ListenerPolicy::new("data", 1024, AtCap::Refuse),
            &Drain::immediate(&tracker, &cancel),
            Arc::new(NoMetrics),
            Plain,
            |conn: Accepted<TcpStream, SocketAddr>| async move {
                let (mut stream, _slot) = (conn.stream, conn.slot);
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            },
        );

        let within = Duration::from_secs(2);
        let check = || async move {
            let started = Instant::now();
            let ready = tokio::time::timeout(within, get(admin_addr, "/ready")).await;
            assert!(
                matches!(&ready, Ok(Ok(line)) if line.contains("200")),
                "/ready during the flood: {ready:?}"
            );
            let echoed = tokio::time::timeout(within, echo_once(data_addr)).await;
            assert!(
                matches!(echoed, Ok(Ok(()))),
                "traffic during the flood: {echoed:?}"
            );
            started.elapsed()
        };
        let flooding = tokio::spawn(flood(admin_addr));
        let (mut checks, mut slowest) = (0, Duration::ZERO);
        let flood_started = Instant::now();
        while !flooding.is_finished() {
            slowest = slowest.max(check().await);
            checks += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (connected, held) = flooding.await.unwrap();
        let flood_took = flood_started.elapsed();
        assert_eq!(connected, FLOOD, "every flood connection was opened");
        // All 10,000 are held now: still served.
        for _ in 0..5 {
            slowest = slowest.max(check().await);
        }
        eprintln!(
            "{connected} connections opened in {flood_took:?}; {checks} checks during the flood \
             and 5 after, the slowest /ready + echo took {slowest:?}"
        );
        assert!(checks > 0, "checked while the flood was under way");
        drop(held);
        cancel.cancel();
    }
}
