//! A fake Kubernetes API server for tests: plain HTTP/1.1 on loopback, each request answered by
//! the test's handler. Helpers build the JSON the real API server sends for errors (v1 Status)
//! and watch responses (a chunked body of newline-delimited watch events, kept open).

#[allow(dead_code)] // each test crate uses what it needs
pub mod rbac;

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

/// Secrets kept the way the API server keeps them, for the endpoints under
/// `/api/v1/namespaces/{namespace}/secrets`: create (201; 409 AlreadyExists for a taken name),
/// get (404 when absent), list with an equality `labelSelector` or `fieldSelector`
/// (`metadata.name=`), update by PUT (404 when absent; 409 Conflict when the body names a
/// `resourceVersion` that is no longer current; no version means an unconditional update),
/// delete, and watch (`watch=true`: every change after the given `resourceVersion`, as
/// ADDED/MODIFIED/DELETED events, then each new one as it happens). Every write takes a new
/// `resourceVersion` from one counter, as etcd's revision does.
#[allow(dead_code)]
#[derive(Default)]
pub struct SecretStore {
    objects: std::collections::BTreeMap<(String, String), Value>,
    revision: u64,
    /// Writes answered 409 Conflict (a lost compare-and-swap).
    pub conflicts: usize,
    /// Every change: (resourceVersion, namespace, watch event).
    history: Vec<(u64, String, Value)>,
    /// Open watches: namespace, name filter, where to send.
    watches: Vec<(String, Option<String>, mpsc::UnboundedSender<Value>)>,
}

/// A selector's `key=value`, percent-decoded.
fn selector(value: &str) -> (String, String) {
    let decoded = value
        .replace("%2F", "/")
        .replace("%2f", "/")
        .replace("%3D", "=")
        .replace("%3d", "=");
    match decoded.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => (decoded, String::new()),
    }
}

#[allow(dead_code)]
impl SecretStore {
    /// Every stored Secret, as the API server would return it.
    pub fn all(&self) -> Vec<Value> {
        self.objects.values().cloned().collect()
    }

    /// Answers `call` when it is for Secrets; `None` otherwise.
    pub fn handle(&mut self, call: &Call) -> Option<Response<AnyBody>> {
        if call.method == Method::GET && call.param("watch") == Some("true") {
            let parts: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
            if let ["api", "v1", "namespaces", namespace, "secrets"] = parts.as_slice() {
                return Some(self.watch(namespace, call));
            }
        }
        self.handle_plain(call).map(|r| r.map(BodyExt::boxed))
    }

    fn watch(&mut self, namespace: &str, call: &Call) -> Response<AnyBody> {
        let name = call
            .param("fieldSelector")
            .map(selector)
            .filter(|(k, _)| k == "metadata.name")
            .map(|(_, v)| v);
        let since: u64 = call
            .param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (events, response) = watch_stream();
        for (version, ns, event) in &self.history {
            let matches = ns == namespace
                && name
                    .as_deref()
                    .is_none_or(|n| event["object"]["metadata"]["name"] == n);
            if *version > since && matches {
                let _ = events.send(event.clone());
            }
        }
        self.watches.push((namespace.to_string(), name, events));
        response
    }

    /// Records a change and sends it to the watches it concerns.
    fn changed(&mut self, namespace: &str, kind: &str, object: &Value) {
        let event = json!({"type": kind, "object": object});
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.history
            .push((1000 + self.revision, namespace.to_string(), event.clone()));
        self.watches.retain(|(ns, filter, events)| {
            if ns != namespace || filter.as_ref().is_some_and(|f| *f != name) {
                return !events.is_closed();
            }
            events.send(event.clone()).is_ok()
        });
    }

    fn handle_plain(&mut self, call: &Call) -> Option<Response<Full<Bytes>>> {
        let parts: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
        let (namespace, name) = match parts.as_slice() {
            ["api", "v1", "namespaces", namespace, "secrets"] => (namespace.to_string(), None),
            ["api", "v1", "namespaces", namespace, "secrets", name] => {
                (namespace.to_string(), Some(name.to_string()))
            }
            _ => return None,
        };
        Some(match (&call.method, name) {
            (&Method::POST, None) => self.create(namespace, call.body.clone()),
            (&Method::GET, None) => self.list(
                &namespace,
                call.param("labelSelector"),
                call.param("fieldSelector"),
            ),
            (&Method::GET, Some(name)) => match self.objects.get(&(namespace, name.clone())) {
                Some(object) => respond(StatusCode::OK, object.clone()),
                None => not_found("secrets", &name),
            },
            (&Method::PUT, Some(name)) => self.update(namespace, name, call.body.clone()),
            (&Method::DELETE, Some(name)) => {
                match self.objects.remove(&(namespace.clone(), name.clone())) {
                    Some(object) => {
                        self.revision += 1;
                        self.changed(&namespace, "DELETED", &object);
                        respond(
                            StatusCode::OK,
                            json!({
                                "kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Success",
                                "details": {"name": name, "kind": "secrets", "uid": "deleted"}
                            }),
                        )
                    }
                    None => not_found("secrets", &name),
                }
            }
            (method, name) => respond(
                StatusCode::METHOD_NOT_ALLOWED,
                status(
                    405,
                    "MethodNotAllowed",
                    "secrets",
                    name.as_deref().unwrap_or_default(),
                    format!(
                        "the server does not allow this method on the requested resource ({method})"
                    ),
                ),
            ),
        })
    }

    fn next_version(&mut self) -> String {
        self.revision += 1;
        (1000 + self.revision).to_string()
    }

    fn create(&mut self, namespace: String, mut body: Value) -> Response<Full<Bytes>> {
        let name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !body["metadata"]["resourceVersion"].is_null() {
            return respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                status(
                    500,
                    "InternalError",
                    "secrets",
                    &name,
                    "resourceVersion should not be set on objects to be created".into(),
                ),
            );
        }
        let key = (namespace.clone(), name.clone());
        if self.objects.contains_key(&key) {
            return respond(
                StatusCode::CONFLICT,
                status(
                    409,
                    "AlreadyExists",
                    "secrets",
                    &name,
                    format!("secrets \"{name}\" already exists"),
                ),
            );
        }
        let version = self.next_version();
        let metadata = &mut body["metadata"];
        metadata["namespace"] = json!(namespace);
        metadata["resourceVersion"] = json!(version);
        metadata["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", self.revision));
        metadata["creationTimestamp"] = json!("2026-12-07T18:00:00Z");
        body["kind"] = json!("Secret");
        body["apiVersion"] = json!("v1");
        self.objects.insert(key, body.clone());
        self.changed(&namespace, "ADDED", &body);
        respond(StatusCode::CREATED, body)
    }

    fn update(
        &mut self,
        namespace: String,
        name: String,
        mut body: Value,
    ) -> Response<Full<Bytes>> {
        let key = (namespace, name.clone());
        let Some(current) = self.objects.get(&key).cloned() else {
            return not_found("secrets", &name);
        };
        let current_version = current["metadata"]["resourceVersion"].clone();
        let asked = &body["metadata"]["resourceVersion"];
        if !asked.is_null() && *asked != current_version {
            self.conflicts += 1;
            return respond(
                StatusCode::CONFLICT,
                status(
                    409,
                    "Conflict",
                    "secrets",
                    &name,
                    format!(
                        "Operation cannot be fulfilled on secrets \"{name}\": the object has \
                         been modified; please apply your changes to the latest version and try \
                         again"
                    ),
                ),
            );
        }
        let version = self.next_version();
        let metadata = &mut body["metadata"];
        metadata["resourceVersion"] = json!(version);
        metadata["uid"] = current["metadata"]["uid"].clone();
        metadata["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
        metadata["namespace"] = json!(key.0);
        body["kind"] = json!("Secret");
        body["apiVersion"] = json!("v1");
        let namespace = key.0.clone();
        self.objects.insert(key, body.clone());
        self.changed(&namespace, "MODIFIED", &body);
        respond(StatusCode::OK, body)
    }

    fn list(
        &self,
        namespace: &str,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Response<Full<Bytes>> {
        // `key=value` (percent-encoded by the client); one equality requirement is enough here.
        let wanted = labels.map(selector);
        let name = fields
            .map(selector)
            .filter(|(k, _)| k == "metadata.name")
            .map(|(_, v)| v);
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .filter(|(_, object)| match &wanted {
                None => true,
                Some((k, v)) => object["metadata"]["labels"][k.as_str()] == json!(v),
            })
            .filter(|((_, n), _)| name.as_ref().is_none_or(|name| name == n))
            .map(|(_, object)| object.clone())
            .collect();
        respond(
            StatusCode::OK,
            json!({
                "kind": "SecretList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": (1000 + self.revision).to_string()},
                "items": items
            }),
        )
    }
}
