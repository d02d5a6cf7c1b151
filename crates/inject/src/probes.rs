//! Probe rewriting. Under STRICT capture the kubelet's plaintext probe of an app port is
//! redirected to the proxy and refused, and a `tcpSocket` probe is answered by the proxy even
//! when the app is dead. So each app container's `httpGet`, `tcpSocket` and `grpc` probe
//! (startup, readiness, liveness) becomes an `httpGet` of `/app-health/<container>/<kind>` on
//! the proxy's admin port, which capture never redirects; its timing fields stay. The originals,
//! with named ports resolved as the kubelet resolves them (against the container's own
//! `ports`), go into the pod annotation `latch.dev/app-probes`, which the proxy reads
//! (`--app-probes`, from the annotation through the downward API) and runs against the app on
//! loopback. `exec` probes, and `httpGet` probes with a `host` (they do not probe the pod),
//! stay as they are. `latch.dev/rewrite-probes: "false"` keeps every probe as written.

use serde_json::{Map, Value, json};

use crate::{InjectError, PatchOp, lookup, named};
use latch_mesh::ports::PROXY_ADMIN;

/// `"false"` on a pod: keep its probes as written.
pub const ANNOTATION_REWRITE: &str = "latch.dev/rewrite-probes";
/// The original probes by `<container>/<kind>` (JSON), for the proxy.
pub const ANNOTATION_APP_PROBES: &str = "latch.dev/app-probes";
/// The admin path prefix of rewritten probes (the proxy's `app_probes::PATH_PREFIX`).
pub const PATH_PREFIX: &str = "/app-health/";

const KINDS: [(&str, &str); 3] = [
    ("startupProbe", "startup"),
    ("readinessProbe", "readiness"),
    ("livenessProbe", "liveness"),
];
const HANDLERS: [&str; 3] = ["httpGet", "tcpSocket", "grpc"];

/// The rewritten probes' patch and the originals for the annotation (empty when none).
pub struct Rewritten {
    pub ops: Vec<PatchOp>,
    pub originals: Map<String, Value>,
}

/// Whether the pod asks to keep its probes; other values than true/false are refused.
fn rewrite_wanted(pod: &Value) -> Result<bool, InjectError> {
    match lookup(pod, "annotations", ANNOTATION_REWRITE) {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(InjectError::BadAnnotation {
            annotation: ANNOTATION_REWRITE,
            value: other.to_string(),
            reason: "use \"true\" or \"false\"".into(),
        }),
    }
}

/// `port` (a number or the name of one of `container`'s ports) as a number.
fn resolve_port(container: &Value, port: &Value, at: &str) -> Result<u16, InjectError> {
    let refuse = |reason: String| InjectError::ProbePort {
        probe: at.to_string(),
        reason,
    };
    match port {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| refuse(format!("{n} is not a port"))),
        Value::String(name) => named(container, "ports")
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| p.get("containerPort").and_then(Value::as_u64))
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| {
                refuse(format!(
                    "the container declares no port named {name:?}, so the kubelet could not \
                     probe it either"
                ))
            }),
        _ => Err(refuse("port must be a number or a port name".into())),
    }
}

/// The original probe for the proxy: its handler with the port resolved, and its timeout.
fn original(container: &Value, probe: &Value, at: &str) -> Result<Option<Value>, InjectError> {
    let mut kept = Map::new();
    if let Some(http) = probe.get("httpGet") {
        if http
            .get("host")
            .and_then(Value::as_str)
            .is_some_and(|h| !h.is_empty())
        {
            return Ok(None);
        }
        let mut handler = Map::new();
        let port = resolve_port(container, http.get("port").unwrap_or(&Value::Null), at)?;
        handler.insert("port".into(), json!(port));
        for field in ["path", "scheme", "httpHeaders"] {
            if let Some(value) = http.get(field) {
                handler.insert(field.into(), value.clone());
            }
        }
        kept.insert("httpGet".into(), Value::Object(handler));
    } else if let Some(tcp) = probe.get("tcpSocket") {
        if tcp
            .get("host")
            .and_then(Value::as_str)
            .is_some_and(|h| !h.is_empty())
        {
            return Ok(None);
        }
        let port = resolve_port(container, tcp.get("port").unwrap_or(&Value::Null), at)?;
        kept.insert("tcpSocket".into(), json!({ "port": port }));
    } else if let Some(grpc) = probe.get("grpc") {
        // The API allows only a number here.
        let port = resolve_port(container, grpc.get("port").unwrap_or(&Value::Null), at)?;
        let mut handler = json!({ "port": port });
        if let Some(service) = grpc.get("service") {
            handler["service"] = service.clone();
        }
        kept.insert("grpc".into(), handler);
    } else {
        return Ok(None);
    }
    if let Some(timeout) = probe.get("timeoutSeconds") {
        kept.insert("timeoutSeconds".into(), timeout.clone());
    }
    Ok(Some(Value::Object(kept)))
}

/// Rewrites the probes of the pod's app containers (not its init containers: their probes,
/// when sidecars have any, are theirs to answer).
pub fn rewrite(pod: &Value, spec: &Value) -> Result<Rewritten, InjectError> {
    let mut rewritten = Rewritten {
        ops: Vec::new(),
        originals: Map::new(),
    };
    if !rewrite_wanted(pod)? {
        return Ok(rewritten);
    }
    for (index, container) in named(spec, "containers").enumerate() {
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        for (field, kind) in KINDS {
            let Some(probe) = container.get(field).filter(|p| p.is_object()) else {
                continue;
            };
            let key = format!("{name}/{kind}");
            let Some(kept) = original(container, probe, &format!("container {name:?} {field}"))?
            else {
                continue;
            };
            let mut new = probe.as_object().cloned().unwrap_or_default();
            for handler in HANDLERS {
                new.remove(handler);
            }
            new.insert(
                "httpGet".into(),
                json!({"path": format!("{PATH_PREFIX}{key}"), "port": PROXY_ADMIN, "scheme": "HTTP"}),
            );
            rewritten.ops.push(PatchOp::add(
                &["spec", "containers", &index.to_string(), field],
                Value::Object(new),
            ));
            rewritten.originals.insert(key, kept);
        }
    }
    Ok(rewritten)
}
