//! A fake Kubernetes API server for tests: plain HTTP/1.1 on loopback, each request answered by
//! the test's handler. Helpers build the JSON the real API server sends for errors (v1 Status).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// One request as the handler sees it: method, path, query and body (JSON, or Null).
pub struct Call {
    pub method: Method,
    pub path: String,
    pub body: Value,
}

pub fn respond(code: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// The API server's v1 Status for a failed request, e.g. (404, "NotFound", "pods \"x\" not
/// found").
pub fn status(code: u16, reason: &str, kind: &str, name: &str, message: String) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "kind": kind},
        "code": code
    })
}

/// 404 NotFound as the API server answers it.
pub fn not_found(kind: &str, name: &str) -> Response<Full<Bytes>> {
    respond(
        StatusCode::NOT_FOUND,
        status(
            404,
            "NotFound",
            kind,
            name,
            format!("{kind} \"{name}\" not found"),
        ),
    )
}

/// Serves `handler` on a loopback port until the test ends; returns its address.
pub async fn serve<H, F>(handler: H) -> SocketAddr
where
    H: Fn(Call) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let method = request.method().clone();
                            let path = request.uri().path().to_string();
                            let bytes = request.into_body().collect().await.unwrap().to_bytes();
                            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                            Ok::<_, Infallible>(handler(Call { method, path, body }).await)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}
