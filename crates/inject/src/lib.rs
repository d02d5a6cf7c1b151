//! Sidecar injection, shared by latch-control's admission webhook and `latchctl inject`: turns
//! a Pod (or a pod template: both are `{metadata, spec}`) into a meshed one, as a JSON Patch and
//! as the patched pod. `admission` wraps it in AdmissionReview v1, `manifest` applies it to
//! multi-document YAML. Pods are `serde_json::Value`s so fields this code does not know survive.

pub mod admission;
pub mod manifest;
pub mod patch;
pub mod probes;
pub mod settings;

use serde_json::{Map, Value, json};
use thiserror::Error;

pub use patch::PatchOp;
pub use settings::ProxySettings;

/// `"false"` (or `"disabled"`) on a pod's annotation or label: leave it alone.
pub const ANNOTATION_INJECT: &str = "latch.dev/inject";
/// Set on injected pods: what was added (JSON). Informational; injection is detected by name.
pub const ANNOTATION_STATUS: &str = "latch.dev/status";
/// `"false"` (or `"disabled"`) on a pod's annotation: no Workload API socket and no
/// `SPIFFE_ENDPOINT_SOCKET` in its containers (the proxy is injected all the same).
pub const ANNOTATION_WORKLOAD_API: &str = "latch.dev/workload-api";
/// Comma-separated destination ports the app reaches directly, not through the proxy.
pub const ANNOTATION_EXCLUDE_OUTBOUND: &str = "latch.dev/exclude-outbound-ports";
/// Comma-separated local ports reachable directly from outside the pod.
pub const ANNOTATION_EXCLUDE_INBOUND: &str = "latch.dev/exclude-inbound-ports";

/// The init container that installs the capture rules.
pub const IPTABLES_CONTAINER: &str = "latch-iptables";
/// In CNI mode, instead: the init container that waits until latch-cni's rules work.
pub const CNI_WAIT_CONTAINER: &str = "latch-cni-wait";
/// The uid `latch-cni wait` runs as: not root, not the proxy's (whose traffic is not captured).
const CNI_WAIT_UID: u32 = 65532;
/// The native sidecar (an init container with restartPolicy Always).
pub const PROXY_CONTAINER: &str = "latch-proxy";
/// The projected service-account token volume.
pub const TOKEN_VOLUME: &str = "latch-token";
/// The trust bundle volume, from the ConfigMap of the same name.
pub const BUNDLE_VOLUME: &str = "latch-ca-bundle";
/// The pod-private emptyDir holding the Workload API socket.
pub const WORKLOAD_API_VOLUME: &str = "latch-workload-api";
/// Where the proxy creates the socket and every app container finds it.
pub const WORKLOAD_API_DIR: &str = "/var/run/latch/workload-api";
pub const WORKLOAD_API_SOCKET: &str = "/var/run/latch/workload-api/socket";
/// The variable SPIFFE libraries (go-spiffe, py-spiffe, java-spiffe, spiffe-rs) read.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";
/// The ConfigMap holding the trust bundle in every meshed namespace, and its key.
pub const BUNDLE_CONFIGMAP: &str = "latch-ca-bundle";
pub const BUNDLE_KEY: &str = "bundle.pem";
/// Audience of the projected token; the certificate service accepts only this one.
pub const TOKEN_AUDIENCE: &str = "latch";
/// Ports the proxy listens on in the pod: outbound capture, inbound plaintext capture, mTLS,
/// admin. An app container declaring one of them would collide.
pub use latch_mesh::ports::PROXY_PORTS;
/// The proxy's uid, exempt from capture (`latch-proxy iptables install --proxy-uid`).
pub use latch_mesh::ports::PROXY_UID;
use latch_mesh::ports::{INBOUND_MTLS as MTLS_PORT, PROXY_ADMIN as ADMIN_PORT};

const TOKEN_DIR: &str = "/var/run/latch/token";
const BUNDLE_DIR: &str = "/var/run/latch/bundle";

pub const DEFAULT_IMAGE: &str = "latch:dev";
/// A literal for clap's `default_value`; a test checks its port is `ports::CONTROL_GRPC`.
pub const DEFAULT_CONTROL_PLANE: &str = "latch-control.latch-system.svc:15010";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// What the injected containers are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// Image holding latch-proxy (used for both containers).
    pub image: String,
    /// The control plane's gRPC address as pods reach it.
    pub control_plane: String,
    pub trust_domain: String,
    /// The proxy's resources and log level unless the pod's annotations say otherwise.
    pub proxy: ProxySettings,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.into(),
            control_plane: DEFAULT_CONTROL_PLANE.into(),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            proxy: ProxySettings::default(),
        }
    }
}

/// Why a pod was left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// `latch.dev/inject: "false"` on the pod.
    OptedOut,
    /// It already has the latch-proxy or latch-iptables container.
    AlreadyInjected,
    /// hostNetwork pods share the node's network namespace: capture rules would hijack the node.
    HostNetwork,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::OptedOut => "opted out (latch.dev/inject: \"false\")",
            Self::AlreadyInjected => "already injected",
            Self::HostNetwork => "hostNetwork pod (capture rules would apply to the node)",
        })
    }
}

/// A pod the injector refuses: injecting it would produce a broken pod.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InjectError {
    #[error(
        "annotation {annotation}: {value:?} is not valid: {reason}; write ports as a \
         comma-separated list, e.g. \"22,5432\""
    )]
    BadPorts {
        annotation: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "{annotation} {value:?} is not valid: use \"true\" (or \"enabled\") to inject, \
         \"false\" (or \"disabled\") to opt out"
    )]
    BadInjectValue {
        annotation: &'static str,
        value: String,
    },
    #[error("not a pod: {0}")]
    NotAPod(String),
    #[error("the pod already has a {kind} named {name:?}, which injection would add; rename it")]
    NameTaken { kind: &'static str, name: String },
    #[error(
        "container {container:?} declares port {port}, which the Latch proxy uses in the pod \
         ({ports}); move the app to another port",
        ports = PROXY_PORTS.map(|p| p.to_string()).join(", ")
    )]
    PortTaken { container: String, port: u64 },
    #[error(
        "{whom} runs as uid {uid} (securityContext.runAsUser), the Latch proxy's uid: the \
         capture rules let that uid's traffic leave unproxied and in clear, so this app would \
         bypass the mesh; run it as another uid",
        uid = PROXY_UID
    )]
    ProxyUid {
        /// `the pod` (pod-level securityContext, inherited by every container and by
        /// ephemeral debug containers) or `container "app"`.
        whom: String,
    },
    #[error("annotation {annotation}: {value:?} is not valid: {reason}")]
    BadAnnotation {
        annotation: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "{probe}: {reason}; fix the probe, or keep the pod's probes as written with \
         latch.dev/rewrite-probes: \"false\""
    )]
    ProbePort { probe: String, reason: String },
    #[error(
        "container {container:?} already mounts a volume at {WORKLOAD_API_DIR}, where injection \
         mounts the Workload API socket; move that mount, or keep the pod without the Workload \
         API with latch.dev/workload-api: \"false\""
    )]
    MountTaken { container: String },
    #[error(transparent)]
    Patch(#[from] patch::PatchError),
}

/// The result of injecting one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// Empty when the pod was skipped.
    pub patch: Vec<PatchOp>,
    /// What the operator should know about an injection that went ahead (the webhook returns
    /// them as admission warnings, which kubectl prints; `latchctl inject` on standard error).
    pub warnings: Vec<String>,
    /// The pod with the patch applied (the input when skipped).
    pub pod: Value,
    pub skipped: Option<SkipReason>,
}

/// Capture exclusions read from the pod's annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub outbound_ports: Vec<u16>,
    pub inbound_ports: Vec<u16>,
}

/// Parses a comma-separated port list ("22, 5432"); blanks around entries are allowed, an
/// empty value means none. Sorted, without duplicates.
pub fn parse_ports(annotation: &'static str, value: &str) -> Result<Vec<u16>, InjectError> {
    let bad = |reason: String| InjectError::BadPorts {
        annotation,
        value: value.to_string(),
        reason,
    };
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut ports = value
        .split(',')
        .map(str::trim)
        .map(|entry| match entry.parse::<u16>() {
            _ if entry.is_empty() => Err(bad("empty entry".into())),
            Ok(0) | Err(_) => Err(bad(format!("{entry:?} is not a port (1-65535)"))),
            Ok(port) => Ok(port),
        })
        .collect::<Result<Vec<u16>, _>>()?;
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

pub(crate) fn string_map<'a>(pod: &'a Value, field: &str) -> Option<&'a Map<String, Value>> {
    pod.get("metadata")?.get(field)?.as_object()
}

pub(crate) fn lookup<'a>(pod: &'a Value, field: &str, key: &str) -> Option<&'a str> {
    string_map(pod, field)?.get(key)?.as_str()
}

/// Whether the pod's annotation or label opts it out; other values than the four known are
/// refused so a typo is not silently read as "inject".
fn opted_out(pod: &Value) -> Result<bool, InjectError> {
    let mut out = false;
    for (field, what) in [
        ("annotations", "annotation latch.dev/inject"),
        ("labels", "label latch.dev/inject"),
    ] {
        out |= switched_off(pod, field, ANNOTATION_INJECT, what)?;
    }
    Ok(out)
}

/// Whether `key` in the pod's `field` (annotations or labels) says "false" or "disabled"; absent,
/// "true" and "enabled" mean on, anything else is refused.
fn switched_off(
    pod: &Value,
    field: &str,
    key: &str,
    what: &'static str,
) -> Result<bool, InjectError> {
    match lookup(pod, field, key) {
        None | Some("true" | "enabled") => Ok(false),
        Some("false" | "disabled") => Ok(true),
        Some(other) => Err(InjectError::BadInjectValue {
            annotation: what,
            value: other.to_string(),
        }),
    }
}

/// Whether the pod gets the Workload API (`latch.dev/workload-api`, on unless "false").
fn wants_workload_api(pod: &Value) -> Result<bool, InjectError> {
    let off = switched_off(
        pod,
        "annotations",
        ANNOTATION_WORKLOAD_API,
        "annotation latch.dev/workload-api",
    )?;
    Ok(!off)
}

/// Reads and validates the exclusion annotations.
pub fn exclusions(pod: &Value) -> Result<Exclusions, InjectError> {
    let read = |annotation| {
        lookup(pod, "annotations", annotation)
            .map(|value| parse_ports(annotation, value))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    Ok(Exclusions {
        outbound_ports: read(ANNOTATION_EXCLUDE_OUTBOUND)?,
        inbound_ports: read(ANNOTATION_EXCLUDE_INBOUND)?,
    })
}

pub(crate) fn named<'a>(spec: &'a Value, list: &str) -> impl Iterator<Item = &'a Value> {
    spec.get(list)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn has_name(spec: &Value, list: &str, name: &str) -> bool {
    named(spec, list).any(|item| item.get("name").and_then(Value::as_str) == Some(name))
}

fn runs_as_proxy_uid(item: &Value) -> bool {
    item.get("securityContext")
        .and_then(|context| context.get("runAsUser"))
        .and_then(Value::as_i64)
        == Some(i64::from(PROXY_UID))
}

/// Refuses an app that would run as the proxy's uid: the capture rules exempt that uid, so its
/// traffic would leave in clear. Checked on the pod-level securityContext (which containers
/// without their own `runAsUser`, and ephemeral debug containers added later, inherit) and on
/// each of the app's containers, init containers and ephemeral containers. `runAsGroup` 1337 is
/// allowed: the rules match the owner uid only (`-m owner --uid-owner`).
fn check_proxy_uid(spec: &Value) -> Result<(), InjectError> {
    if runs_as_proxy_uid(spec) {
        return Err(InjectError::ProxyUid {
            whom: "the pod".into(),
        });
    }
    for (list, kind) in [
        ("containers", "container"),
        ("initContainers", "init container"),
        ("ephemeralContainers", "ephemeral container"),
    ] {
        if let Some(container) = named(spec, list).find(|c| runs_as_proxy_uid(c)) {
            let name = container
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return Err(InjectError::ProxyUid {
                whom: format!("{kind} {name:?}"),
            });
        }
    }
    Ok(())
}

fn join_ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The init container that installs the capture rules as root with NET_ADMIN and NET_RAW.
fn iptables_container(config: &InjectConfig, exclusions: &Exclusions) -> Value {
    let mut command: Vec<String> = [
        "latch-proxy",
        "iptables",
        "install",
        "--proxy-uid",
        &PROXY_UID.to_string(),
    ]
    .map(String::from)
    .to_vec();
    if !exclusions.outbound_ports.is_empty() {
        command.push("--exclude-outbound-ports".into());
        command.push(join_ports(&exclusions.outbound_ports));
    }
    if !exclusions.inbound_ports.is_empty() {
        command.push("--exclude-inbound-ports".into());
        command.push(join_ports(&exclusions.inbound_ports));
    }
    json!({
        "name": IPTABLES_CONTAINER,
        "image": config.image,
        "command": command,
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            // iptables takes its lock under /run.
            "readOnlyRootFilesystem": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    })
}

/// CNI mode's first init container: `latch-cni wait`, without privileges, returns once the
/// pod's outbound traffic is captured (latch-cni installed the rules when the pod's network was
/// set up), so the app never starts uncaptured on a node where latch-cni is missing.
fn cni_wait_container(config: &InjectConfig) -> Value {
    json!({
        "name": CNI_WAIT_CONTAINER,
        "image": config.image,
        "command": ["latch-cni", "wait", "--timeout", "60s"],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "32Mi"},
        },
        "securityContext": restricted_security_context(CNI_WAIT_UID),
    })
}

/// The proxy as a native sidecar: an init container with restartPolicy Always, whose startup
/// probe on /ready holds back the app containers until the proxy has an SVID and the mesh.
/// With `app_probes`, it answers the app's rewritten probes (`probes`); with `workload_api`,
/// it serves the Workload API on the pod's socket volume.
fn proxy_container(
    config: &InjectConfig,
    settings: &ProxySettings,
    app_probes: bool,
    workload_api: bool,
) -> Value {
    let ready = json!({"path": "/ready", "port": ADMIN_PORT});
    let mut proxy = json!({
        "name": PROXY_CONTAINER,
        "image": config.image,
        "restartPolicy": "Always",
        "command": ["latch-proxy"],
        "args": [
            "--control-plane", config.control_plane,
            "--trust-domain", config.trust_domain,
            "--ca-bundle", format!("{BUNDLE_DIR}/{BUNDLE_KEY}"),
            "--token-file", format!("{TOKEN_DIR}/token"),
            "--transparent",
            // Expanded by the kubelet from the env below: the pod's real name, which a webhook
            // does not know yet for pods named by generateName.
            "--workload-name", "$(LATCH_POD_NAMESPACE)/$(LATCH_POD_NAME)",
            // The kubelet probes the pod IP, of either family; the capture rules never redirect
            // this port.
            "--admin", format!("[::]:{ADMIN_PORT}"),
        ],
        "env": [
            {"name": "LATCH_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "LATCH_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "RUST_LOG", "value": settings.log_level},
        ],
        "ports": [
            {"name": "latch-mtls", "containerPort": MTLS_PORT, "protocol": "TCP"},
            {"name": "latch-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "startupProbe": {"httpGet": ready, "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 300},
        "readinessProbe": {"httpGet": ready, "periodSeconds": 5, "timeoutSeconds": 1, "failureThreshold": 3},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": ADMIN_PORT},
            "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 3,
        },
        "resources": settings.resources(),
        "securityContext": restricted_security_context(PROXY_UID),
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": BUNDLE_VOLUME, "mountPath": BUNDLE_DIR, "readOnly": true},
        ],
    });
    if app_probes {
        let annotation = format!("metadata.annotations['{}']", probes::ANNOTATION_APP_PROBES);
        if let Some(env) = proxy["env"].as_array_mut() {
            env.push(json!({"name": "LATCH_APP_PROBES", "valueFrom": {"fieldRef": {"fieldPath": annotation}}}));
        }
    }
    if workload_api {
        // Any uid may connect: only this pod's containers mount the volume, so the volume
        // already decides who reaches the socket (the app's uid is not known here).
        let args = [
            "--workload-api".to_string(),
            format!("unix://{WORKLOAD_API_SOCKET}"),
            "--workload-api-allow-uid".to_string(),
            "any".to_string(),
        ];
        if let Some(list) = proxy["args"].as_array_mut() {
            list.extend(args.map(Value::String));
        }
        if let Some(mounts) = proxy["volumeMounts"].as_array_mut() {
            mounts.push(json!({"name": WORKLOAD_API_VOLUME, "mountPath": WORKLOAD_API_DIR}));
        }
    }
    proxy
}

/// The Workload API's emptyDir: in memory (a socket needs no disk), private to the pod.
fn workload_api_volume() -> Value {
    json!({"name": WORKLOAD_API_VOLUME, "emptyDir": {"medium": "Memory"}})
}

/// What Pod Security "restricted" asks of a container, running as `uid`: non-root, no
/// privilege, no escalation, a read-only root, every capability dropped, the runtime's seccomp
/// profile.
fn restricted_security_context(uid: u32) -> Value {
    json!({
        "runAsUser": uid,
        "runAsGroup": uid,
        "runAsNonRoot": true,
        "privileged": false,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// The patch that gives one app container the socket (read-only: connecting needs no write
/// access to the directory) and `SPIFFE_ENDPOINT_SOCKET`, unless it sets that variable itself
/// in `env`. A variable in `env` takes precedence over one from `envFrom` (a ConfigMap or
/// Secret the injector cannot read), so a container with `envFrom` gets a warning.
fn workload_api_for(
    container: &Value,
    path: &[&str],
    ops: &mut Vec<PatchOp>,
    warnings: &mut Vec<String>,
) {
    let mount =
        json!({"name": WORKLOAD_API_VOLUME, "mountPath": WORKLOAD_API_DIR, "readOnly": true});
    append(container, path, "volumeMounts", mount, ops);
    let sets_it = named_env(container).any(|name| name == SPIFFE_ENDPOINT_SOCKET);
    if !sets_it {
        let env = json!({"name": SPIFFE_ENDPOINT_SOCKET, "value": format!("unix://{WORKLOAD_API_SOCKET}")});
        append(container, path, "env", env, ops);
        if container
            .get("envFrom")
            .and_then(Value::as_array)
            .is_some_and(|sources| !sources.is_empty())
        {
            warnings.push(format!(
                "container {:?}: injection sets {SPIFFE_ENDPOINT_SOCKET} to the pod's Latch \
                 Workload API, which takes precedence over a {SPIFFE_ENDPOINT_SOCKET} from its \
                 envFrom; set it under env to keep your own, or annotate the pod \
                 latch.dev/workload-api: \"false\"",
                container_name(container)
            ));
        }
    }
}

fn container_name(container: &Value) -> &str {
    container
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Refuses a container that already mounts something where the Workload API socket goes (the
/// API server would refuse the pod for the duplicate mount path, less clearly).
fn check_workload_api_mounts(spec: &Value) -> Result<(), InjectError> {
    for container in named(spec, "containers").chain(named(spec, "initContainers")) {
        let taken = named(container, "volumeMounts")
            .filter_map(|m| m.get("mountPath").and_then(Value::as_str))
            .any(|path| path.trim_end_matches('/') == WORKLOAD_API_DIR);
        if taken {
            return Err(InjectError::MountTaken {
                container: container_name(container).to_string(),
            });
        }
    }
    Ok(())
}

fn named_env(container: &Value) -> impl Iterator<Item = &str> {
    named(container, "env").filter_map(|e| e.get("name").and_then(Value::as_str))
}

/// Adds `item` to the list `list` of the object at `path`, creating the list if absent.
fn append(object: &Value, path: &[&str], list: &str, item: Value, ops: &mut Vec<PatchOp>) {
    let mut at: Vec<&str> = path.to_vec();
    at.push(list);
    if object.get(list).is_some_and(Value::is_array) {
        at.push("-");
        ops.push(PatchOp::add(&at, item));
    } else {
        ops.push(PatchOp::add(&at, json!([item])));
    }
}

fn volumes() -> [Value; 2] {
    [
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token",
            }}]},
        }),
        json!({
            "name": BUNDLE_VOLUME,
            "configMap": {"name": BUNDLE_CONFIGMAP, "items": [{"key": BUNDLE_KEY, "path": BUNDLE_KEY}]},
        }),
    ]
}

/// What injection added, recorded in the `latch.dev/status` annotation.
fn status(workload_api: bool, cni: bool) -> String {
    let mut volumes = vec![TOKEN_VOLUME, BUNDLE_VOLUME];
    if workload_api {
        volumes.push(WORKLOAD_API_VOLUME);
    }
    let first = if cni {
        CNI_WAIT_CONTAINER
    } else {
        IPTABLES_CONTAINER
    };
    json!({
        "initContainers": [first, PROXY_CONTAINER],
        "volumes": volumes,
    })
    .to_string()
}

/// Whether the pod already carries what injection adds.
pub fn is_injected(pod: &Value) -> bool {
    let Some(spec) = pod.get("spec") else {
        return false;
    };
    [PROXY_CONTAINER, IPTABLES_CONTAINER, CNI_WAIT_CONTAINER]
        .iter()
        .any(|name| has_name(spec, "initContainers", name) || has_name(spec, "containers", name))
}

/// Injects the proxy into `pod`, a Pod or a pod template (`{metadata, spec}`).
///
/// Skipped (no patch): opted out, already injected, hostNetwork. Refused: a malformed
/// annotation, a name or port the injection needs already taken, an app running as the proxy's
/// uid, something that is not a pod.
pub fn inject(pod: &Value, config: &InjectConfig) -> Result<Injection, InjectError> {
    let spec = pod
        .get("spec")
        .filter(|spec| spec.is_object())
        .ok_or_else(|| InjectError::NotAPod("no spec object".into()))?;
    if !spec.get("containers").is_some_and(Value::is_array) {
        return Err(InjectError::NotAPod("spec.containers is not a list".into()));
    }
    // Annotations are validated even on pods that end up skipped: a typo should surface at once.
    let opted_out = opted_out(pod)?;
    let exclusions = exclusions(pod)?;
    let workload_api = wants_workload_api(pod)?;
    let skip = if opted_out {
        Some(SkipReason::OptedOut)
    } else if is_injected(pod) {
        Some(SkipReason::AlreadyInjected)
    } else if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        Some(SkipReason::HostNetwork)
    } else {
        None
    };
    if let Some(reason) = skip {
        return Ok(Injection {
            patch: Vec::new(),
            warnings: Vec::new(),
            pod: pod.clone(),
            skipped: Some(reason),
        });
    }

    check_proxy_uid(spec)?;
    if workload_api {
        check_workload_api_mounts(spec)?;
    }
    for name in [TOKEN_VOLUME, BUNDLE_VOLUME, WORKLOAD_API_VOLUME] {
        if has_name(spec, "volumes", name) {
            return Err(InjectError::NameTaken {
                kind: "volume",
                name: name.into(),
            });
        }
    }
    for container in named(spec, "containers").chain(named(spec, "initContainers")) {
        for port in container
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(number) = port.get("containerPort").and_then(Value::as_u64)
                && PROXY_PORTS.iter().any(|p| u64::from(*p) == number)
            {
                return Err(InjectError::PortTaken {
                    container: container
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    port: number,
                });
            }
        }
    }

    let settings = config.proxy.for_pod(pod)?;
    let rewritten = probes::rewrite(pod, spec)?;
    if settings.cni {
        // The kubelet passes no annotation to a CNI plugin: a per-pod exclusion would be
        // silently ignored, so it is refused.
        for (annotation, ports) in [
            (ANNOTATION_EXCLUDE_OUTBOUND, &exclusions.outbound_ports),
            (ANNOTATION_EXCLUDE_INBOUND, &exclusions.inbound_ports),
        ] {
            if !ports.is_empty() {
                return Err(InjectError::BadAnnotation {
                    annotation,
                    value: join_ports(ports),
                    reason: "in CNI mode the capture rules come from latch-cni, which cannot see \
                             pod annotations; set excludeOutboundPorts or excludeInboundPorts \
                             in its configuration (latch-cni-config) for the whole mesh"
                        .into(),
                });
            }
        }
    }
    let mut annotations = vec![(
        ANNOTATION_STATUS,
        Value::String(status(workload_api, settings.cni)),
    )];
    if !rewritten.originals.is_empty() {
        annotations.push((
            probes::ANNOTATION_APP_PROBES,
            Value::String(Value::Object(rewritten.originals.clone()).to_string()),
        ));
    }
    let mut ops = Vec::new();
    match pod.get("metadata") {
        Some(metadata) if metadata.get("annotations").is_some_and(Value::is_object) => {
            for (key, value) in annotations {
                ops.push(PatchOp::add(&["metadata", "annotations", key], value));
            }
        }
        Some(metadata) if metadata.is_object() => ops.push(PatchOp::add(
            &["metadata", "annotations"],
            Value::Object(annotations.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
        )),
        _ => ops.push(PatchOp::add(
            &["metadata"],
            json!({"annotations": Value::Object(annotations.into_iter().map(|(k, v)| (k.to_string(), v)).collect())}),
        )),
    }
    ops.extend(rewritten.ops);
    let (iptables, proxy) = (
        if settings.cni {
            cni_wait_container(config)
        } else {
            iptables_container(config, &exclusions)
        },
        proxy_container(
            config,
            &settings,
            !rewritten.originals.is_empty(),
            workload_api,
        ),
    );
    // First in line, before the pod's own init containers: those may need the network, which
    // is captured from the moment the rules exist, so the proxy must already be serving.
    if spec.get("initContainers").is_some_and(Value::is_array) {
        ops.push(PatchOp::add(&["spec", "initContainers", "0"], iptables));
        ops.push(PatchOp::add(&["spec", "initContainers", "1"], proxy));
    } else {
        ops.push(PatchOp::add(
            &["spec", "initContainers"],
            json!([iptables, proxy]),
        ));
    }
    let mut volumes = volumes().to_vec();
    if workload_api {
        volumes.push(workload_api_volume());
    }
    if spec.get("volumes").is_some_and(Value::is_array) {
        for volume in volumes {
            ops.push(PatchOp::add(&["spec", "volumes", "-"], volume));
        }
    } else {
        ops.push(PatchOp::add(&["spec", "volumes"], json!(volumes)));
    }
    let mut warnings = Vec::new();
    if workload_api {
        // Every app container, and the app's own init containers (they start after the proxy,
        // which is first in line, so the socket is there for them too). The indexes are those of
        // the pod as received: the operations on initContainers above insert ours at 0 and 1,
        // so the app's own have moved up by two.
        for (i, container) in named(spec, "containers").enumerate() {
            let index = i.to_string();
            workload_api_for(
                container,
                &["spec", "containers", &index],
                &mut ops,
                &mut warnings,
            );
        }
        for (i, container) in named(spec, "initContainers").enumerate() {
            let index = (i + 2).to_string();
            workload_api_for(
                container,
                &["spec", "initContainers", &index],
                &mut ops,
                &mut warnings,
            );
        }
    }

    let mut injected = pod.clone();
    patch::apply(&mut injected, &ops)?;
    Ok(Injection {
        patch: ops,
        warnings,
        pod: injected,
        skipped: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_control_plane_is_on_the_grpc_port() {
        let port = DEFAULT_CONTROL_PLANE.rsplit(':').next().unwrap();
        assert_eq!(port, latch_mesh::ports::CONTROL_GRPC.to_string());
    }

    #[test]
    fn port_lists_parse_or_are_refused_with_the_culprit() {
        let parse = |v| parse_ports(ANNOTATION_EXCLUDE_OUTBOUND, v);
        assert_eq!(parse("22"), Ok(vec![22]));
        assert_eq!(parse(" 5432, 22,22 "), Ok(vec![22, 5432]));
        assert_eq!(parse(""), Ok(vec![]));
        assert_eq!(parse("65535"), Ok(vec![65535]));
        for (bad, culprit) in [
            ("0", "\"0\" is not a port"),
            ("65536", "\"65536\" is not a port"),
            ("22,ssh", "\"ssh\" is not a port"),
            ("-1", "\"-1\" is not a port"),
            ("22,,23", "empty entry"),
            ("22;23", "\"22;23\" is not a port"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.contains(culprit) && err.contains(ANNOTATION_EXCLUDE_OUTBOUND),
                "{bad:?}: {err}"
            );
        }
    }
}
