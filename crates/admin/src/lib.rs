//! What both binaries share to be operable: the serve loop every listener runs through and the
//! signal handling (`serve`), the admin HTTP server (`/healthz`, `/ready`, `/metrics`, debug and
//! management endpoints) on it, response helpers, and logging set-up. Each binary supplies its
//! own routes.

pub mod serve;

pub mod backoff;

use std::future::Future;
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
/// is coloured only on a terminal: `docker logs`, files and journald get no escape codes.
pub fn init_logging(format: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
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

/// The admin listener of both binaries: 256 connections (more wait in the kernel's listen
/// queue), 10 s to send a request's head. It closes at once on shutdown, without a drain.
pub fn admin_policy() -> ListenerPolicy {
    ListenerPolicy {
        request_header_timeout: Some(Duration::from_secs(10)),
        ..ListenerPolicy::new("admin", 256, AtCap::Wait)
    }
}

/// Serves HTTP/1 on `listener` with `handler` until `cancel` fires.
pub fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    serve::serve(
        listener,
        admin_policy(),
        &Drain::immediate(tracker, &cancel),
        Arc::new(NoMetrics),
        Plain,
        move |conn| serve::serve_http1(conn, handler.clone()),
    );
}
