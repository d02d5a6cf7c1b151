//! A fake Kubernetes API server for tests: plain HTTP/1.1 on loopback. Every request first goes
//! through what the real API server checks before any storage sees it: the RBAC of
//! deploy/kubernetes/20-rbac.yaml for latch-control (`rbac`, 403 Forbidden) and the request body
//! against the kind's schema (`schema`, 400 BadRequest / 422 Invalid / 415); then the test's
//! handler answers. Helpers build the JSON the real API server sends for errors (v1 Status),
//! paginated lists with selectors (`list_response`: `limit`, `continue`, 410 Expired) and watch
//! responses (a chunked body of newline-delimited watch events, kept open).

#[allow(dead_code)] // each test crate uses what it needs
pub mod rbac;
#[allow(dead_code)]
pub mod schema;

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
    /// The value of query parameter `name`, when given (as sent: percent-encoded).
    #[allow(dead_code)]
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The value of query parameter `name`, percent-decoded (`+` is a space, as in a form).
    #[allow(dead_code)]
    pub fn decoded(&self, name: &str) -> Option<String> {
        self.param(name).map(percent_decode)
    }
}

/// `%2F` to `/`, `+` to a space: a query value as the client encoded it (form encoding).
pub fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&value[i + 1..i + 3], 16) {
                Ok(byte) => {
                    out.push(byte);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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

/// Serves `handler` on a loopback port until the test ends, behind the checks of the shipped
/// RBAC manifest and the request schemas (see the module comment); returns its address.
#[allow(dead_code)]
pub async fn serve<H, F, B>(handler: H) -> SocketAddr
where
    H: Fn(Call) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
{
    serve_with(rbac::Rbac::shipped(), handler).await
}

/// `serve` with latch-control granted `rbac` instead of the shipped manifest's rules.
pub async fn serve_with<H, F, B>(rbac: rbac::Rbac, handler: H) -> SocketAddr
where
    H: Fn(Call) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    let rbac = Arc::new(rbac);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let rbac = rbac.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        let rbac = rbac.clone();
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
                            let mut call = Call {
                                method,
                                path,
                                query,
                                content_type,
                                body,
                            };
                            // Authorization comes before anything looks at the body, as in the
                            // API server's handler chain.
                            if let Some(forbidden) = rbac.refusal(&call) {
                                eprintln!(
                                    "fake API server: 403 {} {}?{}: {}",
                                    call.method, call.path, call.query, forbidden["message"]
                                );
                                return Ok::<_, Infallible>(
                                    respond(StatusCode::FORBIDDEN, forbidden).map(BodyExt::boxed),
                                );
                            }
                            let warnings = match schema::check(&mut call) {
                                Ok(warnings) => warnings,
                                Err((code, status)) => {
                                    eprintln!(
                                        "fake API server: {code} {} {}?{}: {}",
                                        call.method, call.path, call.query, status["message"]
                                    );
                                    let code = StatusCode::from_u16(code).unwrap();
                                    return Ok(respond(code, status).map(BodyExt::boxed));
                                }
                            };
                            let mut response = handler(call).await.map(BodyExt::boxed);
                            for warning in warnings {
                                let value = format!("299 - {warning:?}");
                                response
                                    .headers_mut()
                                    .append("warning", value.parse().unwrap());
                            }
                            Ok(response)
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

/// One requirement of a label selector as the API server parses it (`k=v`, `k==v`, `k!=v`,
/// `k in (a,b)`, `k notin (a,b)`, `k`, `!k`); `Err` is its message for what it cannot parse.
fn label_requirement_matches(requirement: &str, labels: &Value) -> Result<bool, String> {
    let requirement = requirement.trim();
    let label = |key: &str| labels[key.trim()].as_str().map(String::from);
    let set = |values: &str| -> Result<Vec<String>, String> {
        let inner = values
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("unable to parse requirement: {requirement:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    if let Some((key, values)) = requirement.split_once(" notin ") {
        let values = set(values)?;
        return Ok(label(key).is_none_or(|v| !values.contains(&v)));
    }
    if let Some((key, values)) = requirement.split_once(" in ") {
        let values = set(values)?;
        return Ok(label(key).is_some_and(|v| values.contains(&v)));
    }
    if let Some((key, value)) = requirement.split_once("!=") {
        return Ok(label(key).as_deref() != Some(value.trim()));
    }
    if let Some((key, value)) = requirement
        .split_once("==")
        .or_else(|| requirement.split_once('='))
    {
        return Ok(label(key).as_deref() == Some(value.trim()));
    }
    if let Some(key) = requirement.strip_prefix('!') {
        return Ok(label(key).is_none());
    }
    if requirement.is_empty() || requirement.contains([' ', '(', ')']) {
        return Err(format!("unable to parse requirement: {requirement:?}"));
    }
    Ok(label(requirement).is_some())
}

/// Whether `object` matches the call's `labelSelector` and `fieldSelector` (fields:
/// `metadata.name` and `metadata.namespace`, with `=`, `==` or `!=`; the API server supports a
/// few more per kind, the fake refuses them as it refuses unsupported ones).
pub fn selected(call: &Call, object: &Value) -> Result<bool, String> {
    let mut matches = true;
    if let Some(selector) = call.decoded("labelSelector") {
        for requirement in split_selector(&selector) {
            matches &= label_requirement_matches(&requirement, &object["metadata"]["labels"])?;
        }
    }
    if let Some(selector) = call.decoded("fieldSelector") {
        for requirement in selector.split(',').filter(|r| !r.trim().is_empty()) {
            let (field, value, equal) = if let Some((f, v)) = requirement.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = requirement
                .split_once("==")
                .or_else(|| requirement.split_once('='))
            {
                (f, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{requirement}'; can't understand"
                ));
            };
            let actual = match field.trim() {
                "metadata.name" => object["metadata"]["name"].as_str(),
                "metadata.namespace" => object["metadata"]["namespace"].as_str(),
                other => return Err(format!("field label not supported: {other}")),
            };
            matches &= (actual.unwrap_or_default() == value.trim()) == equal;
        }
    }
    Ok(matches)
}

/// A label selector's requirements: commas inside `( )` belong to a set.
fn split_selector(selector: &str) -> Vec<String> {
    let (mut parts, mut current, mut depth) = (Vec::new(), String::new(), 0);
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() {
        parts.push(current);
    }
    parts
}

/// A continue token as the API server makes one: base64url of `{"v", "rv", "start"}`, the
/// list's resourceVersion and the key to go on from.
fn continue_token(rv: u64, start: &str) -> String {
    use base64::Engine;
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String), String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|e| e.to_string())?;
    let token: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if token["v"] != "meta.k8s.io/v1" {
        return Err("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)".into());
    }
    match (token["rv"].as_u64(), token["start"].as_str()) {
        (Some(rv), Some(start)) if rv > 0 => Ok((rv, start.to_string())),
        _ => Err("continue key is not valid: incorrect encoded start resourceVersion".into()),
    }
}

/// The answer to a list request for the collection `list` (a `...List` object: kind,
/// apiVersion, `metadata.resourceVersion`, items), as the API server pages it: items in key
/// order (namespace, then name), filtered by the selectors; at most `limit` of them, with
/// `metadata.continue` and `remainingItemCount` when more remain; `continue` goes on after the
/// token's key, at the token's resourceVersion. A token that cannot be decoded answers 400; one
/// older than `compacted` (etcd compacted its revision away) answers 410 Expired, as the API
/// server does. The fake always honours `limit` (a 1.29 API server serves a list with
/// `resourceVersion=0` from its watch cache in one piece; a client must handle both answers).
pub fn list_response(call: &Call, list: &Value, compacted: u64) -> Response<Full<Bytes>> {
    let bad_request = |message: String| {
        let mut body = status(400, "BadRequest", "", "", message);
        body["details"] = json!({});
        respond(StatusCode::BAD_REQUEST, body)
    };
    let list_rv: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let (rv, start) = match call.decoded("continue").filter(|c| !c.is_empty()) {
        None => (list_rv, String::new()),
        Some(token) => match decode_continue(&token) {
            Err(e) => return bad_request(format!("invalid continue token: {e}")),
            Ok((rv, _)) if rv < compacted => {
                let mut body = status(
                    410,
                    "Expired",
                    "",
                    "",
                    "The provided continue parameter is too old to display a consistent list                      result. You can start a new list without the continue parameter, or use the                      continue token in this response to retrieve the remainder of the results.                      Continuing with the provided token results in an inconsistent list - objects                      that were created, modified, or deleted between the time the first chunk was                      returned and now may show up in the list."
                        .into(),
                );
                body["details"] = json!({});
                return respond(StatusCode::GONE, body);
            }
            Ok(found) => found,
        },
    };
    let limit = match call.param("limit").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(limit)) => limit,
        Some(Err(e)) => return bad_request(format!("invalid limit: {e}")),
    };
    let key = |object: &Value| {
        format!(
            "{}/{}",
            object["metadata"]["namespace"].as_str().unwrap_or_default(),
            object["metadata"]["name"].as_str().unwrap_or_default()
        )
    };
    let mut items: Vec<(String, Value)> = Vec::new();
    for item in list["items"].as_array().into_iter().flatten() {
        match selected(call, item) {
            Ok(true) if key(item) >= start => items.push((key(item), item.clone())),
            Ok(_) => {}
            Err(e) => return bad_request(e),
        }
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if limit > 0 && items.len() > limit {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = &items[limit - 1].0;
        metadata["continue"] = json!(continue_token(rv, &format!("{last}\u{0}")));
        metadata["remainingItemCount"] = json!(remaining);
    }
    let mut page = list.clone();
    page["metadata"] = metadata;
    page["items"] = Value::Array(items.into_iter().map(|(_, item)| item).collect());
    respond(StatusCode::OK, page)
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
    let decoded = percent_decode(value);
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
            (&Method::GET, None) => self.list(&namespace, call),
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

    /// The namespace's Secrets, selected and paged as the API server does (`list_response`).
    fn list(&self, namespace: &str, call: &Call) -> Response<Full<Bytes>> {
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, object)| object.clone())
            .collect();
        let list = json!({
            "kind": "SecretList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": (1000 + self.revision).to_string()},
            "items": items
        });
        list_response(call, &list, 0)
    }
}
