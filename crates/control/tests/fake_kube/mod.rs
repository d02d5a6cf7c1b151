//! A fake Kubernetes API server for tests: plain HTTP/1.1 on loopback, each request answered by
//! the test's handler. Helpers build the JSON the real API server sends for errors (v1 Status)
//! and watch responses (a chunked body of newline-delimited watch events, kept open).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// One request as the handler sees it: method, path, query, content type and body (JSON, or Null).
#[allow(dead_code)] // each test crate reads the fields it needs
pub struct Call {
    pub method: Method,
    pub path: String,
    /// The query string, e.g. `watch=true&resourceVersion=10&allowWatchBookmarks=true`.
    pub query: String,
    /// The Content-Type header, e.g. `application/strategic-merge-patch+json` for a PATCH.
    pub content_type: String,
    pub body: Value,
}

impl Call {
    /// The value of query parameter `name`, when given.
    #[allow(dead_code)]
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// A response body that is either complete or a stream (a watch).
pub type AnyBody = BoxBody<Bytes, Infallible>;

/// A watch response: 200 with one JSON watch event per line, sent as the test pushes them into
/// the returned sender, e.g. `{"type":"ADDED","object":{...}}`. Open until the sender is dropped.
#[allow(dead_code)]
pub fn watch_stream() -> (mpsc::UnboundedSender<Value>, Response<AnyBody>) {
    let (events, receiver) = mpsc::unbounded_channel::<Value>();
    let frames = UnboundedReceiverStream::new(receiver)
        .map(|event| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{event}\n")))));
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(frames).boxed())
        .unwrap();
    (events, response)
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
pub async fn serve<H, F, B>(handler: H) -> SocketAddr
where
    H: Fn(Call) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
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
                            let query = request.uri().query().unwrap_or_default().to_string();
                            let content_type = request
                                .headers()
                                .get(hyper::header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let bytes = request.into_body().collect().await.unwrap().to_bytes();
                            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                            Ok::<_, Infallible>(
                                handler(Call {
                                    method,
                                    path,
                                    query,
                                    content_type,
                                    body,
                                })
                                .await,
                            )
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
