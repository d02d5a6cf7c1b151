//! The Kubernetes config source against a fake API server answering lists and watches as the
//! real one does (a list with its resourceVersion, then a watch from that version streaming
//! newline-delimited ADDED/MODIFIED/DELETED/BOOKMARK events): what the control plane publishes
//! follows the cluster plus the config file's `mesh:` settings and entries (VMs). Namespaces with
//! injected pods get the trust bundle ConfigMap by server-side apply, again after it is deleted.
//! Kinds that cannot be listed or watched are named on /ready, which fails until all are listed.

#[path = "fake_kube/mod.rs"]
mod fake_kube;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_kube::{Call, not_found, respond, status, watch_stream};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use latch_control::kubernetes::KubernetesAccess;
use latch_control::mesh::MeshSnapshot;
use latch_control::{Config, ControlPlane};
use latch_mesh::MtlsMode;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

const PODS: &str = "/api/v1/pods";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const POLICIES: &str = "/apis/latch.dev/v1alpha1/authorizationpolicies";

/// What the fake API server holds: the list each collection answers, and the open watches.
#[derive(Default)]
struct Cluster {
    lists: Mutex<HashMap<&'static str, Value>>,
    /// List requests answered, per collection (a watch that ends in 410 Gone must be followed
    /// by one).
    list_requests: Mutex<HashMap<String, usize>>,
    /// Per collection: the event sender of its latest watch and the resourceVersion it asked
    /// to start from.
    watches: Mutex<HashMap<String, (UnboundedSender<Value>, String)>>,
    /// Server-side applies of the bundle ConfigMap that succeeded: (namespace, query, body).
    applied: Mutex<Vec<(String, String, Value)>>,
    /// How many applies to refuse (403) before accepting them.
    refuse_applies: Mutex<u32>,
    /// Collections answering 404 as for a CRD that is not installed.
    missing: Mutex<HashSet<String>>,
    /// Whether watch requests are refused (403).
    forbid_watches: Mutex<bool>,
    /// Every list request: (path, query).
    list_queries: Mutex<Vec<(String, String)>>,
    /// The resourceVersion etcd compacted to: continue tokens older than it answer 410.
    compacted: Mutex<u64>,
}

impl Cluster {
    fn send(&self, path: &str, event: Value) {
        let watches = self.watches.lock().unwrap();
        let (sender, _) = watches.get(path).expect("the collection is watched");
        sender.send(event).unwrap();
    }
}

async fn fake_api(cluster: Arc<Cluster>) -> SocketAddr {
    fake_kube::serve(move |call: Call| {
        let cluster = cluster.clone();
        async move {
            if call.method == Method::PATCH
                && let Some(namespace) = call
                    .path
                    .strip_prefix("/api/v1/namespaces/")
                    .and_then(|rest| rest.strip_suffix("/configmaps/latch-ca-bundle"))
            {
                let mut refuse = cluster.refuse_applies.lock().unwrap();
                if *refuse > 0 {
                    *refuse -= 1;
                    let message = format!(
                        "configmaps \"latch-ca-bundle\" is forbidden: User \"system:serviceaccount:latch-system:latch-control\" cannot patch resource \"configmaps\" in API group \"\" in the namespace \"{namespace}\""
                    );
                    return respond(
                        StatusCode::FORBIDDEN,
                        status(403, "Forbidden", "configmaps", "latch-ca-bundle", message),
                    )
                    .map(BodyExt::boxed);
                }
                cluster.applied.lock().unwrap().push((
                    namespace.to_string(),
                    call.query.clone(),
                    call.body.clone(),
                ));
                let mut stored = call.body.clone();
                stored["metadata"]["resourceVersion"] = json!("500");
                return respond(StatusCode::OK, stored).map(BodyExt::boxed);
            }
            let Some(list) = cluster.lists.lock().unwrap().get(call.path.as_str()).cloned() else {
                return not_found("resource", &call.path).map(BodyExt::boxed);
            };
            if cluster.missing.lock().unwrap().contains(&call.path) {
                // What the API server answers for a resource of an API group it does not serve.
                let mut body = status(404, "NotFound", "", "", String::new());
                body["message"] = json!("the server could not find the requested resource");
                body["details"] = json!({});
                return respond(StatusCode::NOT_FOUND, body).map(BodyExt::boxed);
            }
            let watch = matches!(call.param("watch"), Some("true" | "1"));
            if watch && *cluster.forbid_watches.lock().unwrap() {
                let resource = call.path.rsplit('/').next().unwrap_or_default().to_string();
                let message = format!(
                    "{resource} is forbidden: User \"system:serviceaccount:latch-system:latch-control\" cannot watch resource \"{resource}\" in API group \"\" at the cluster scope"
                );
                return respond(
                    StatusCode::FORBIDDEN,
                    status(403, "Forbidden", &resource, "", message),
                )
                .map(BodyExt::boxed);
            }
            if watch {
                let (sender, response) = watch_stream();
                let from = call
                    .param("resourceVersion")
                    .unwrap_or_default()
                    .to_string();
                cluster
                    .watches
                    .lock()
                    .unwrap()
                    .insert(call.path.clone(), (sender, from));
                response
            } else {
                if call.param("continue").is_none() {
                    *cluster
                        .list_requests
                        .lock()
                        .unwrap()
                        .entry(call.path.clone())
                        .or_default() += 1;
                }
                cluster
                    .list_queries
                    .lock()
                    .unwrap()
                    .push((call.path.clone(), call.query.clone()));
                let compacted = *cluster.compacted.lock().unwrap();
                fake_kube::list_response(&call, &list, compacted).map(BodyExt::boxed)
            }
        }
    })
    .await
}

/// A list as the API server returns it (items without kind and apiVersion).
fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({
        "kind": kind,
        "apiVersion": api_version,
        "metadata": {"resourceVersion": "100"},
        "items": items
    })
}

/// A watch event; `object` gets the kind and apiVersion a watch sends.
fn event(kind_of_event: &str, kind: &str, api_version: &str, mut object: Value) -> Value {
    object["kind"] = json!(kind);
    object["apiVersion"] = json!(api_version);
    json!({"type": kind_of_event, "object": object})
}

/// An injected pod; `ip` None is a pod not yet scheduled (Pending, no IP).
fn pod(name: &str, sa: &str, app: &str, ip: Option<&str>, rv: u32) -> Value {
    let mut pod = json!({
        "metadata": {
            "name": name,
            "namespace": "latch-demo",
            "uid": format!("uid-{name}"),
            "resourceVersion": rv.to_string(),
            "labels": {"app": app},
            "annotations": {"latch.dev/status": "{\"initContainers\":[\"latch-iptables\",\"latch-proxy\"]}"}
        },
        "spec": {
            "serviceAccountName": sa,
            "initContainers": [
                {"name": "latch-iptables", "image": "latch:dev"},
                {"name": "latch-proxy", "image": "latch:dev", "restartPolicy": "Always"}
            ],
            "containers": [{"name": "app", "image": "busybox:1.36", "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]
        },
        "status": {"phase": "Pending", "qosClass": "Burstable"}
    });
    if let Some(ip) = ip {
        pod["status"] = json!({
            "phase": "Running",
            "hostIP": "172.18.0.2",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "qosClass": "Burstable"
        });
    }
    pod
}

fn slice(ready: &[&str], not_ready: &[&str], rv: u32) -> Value {
    let endpoint = |ip: &&str, ready: bool| {
        json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "nodeName": "node-1"
        })
    };
    let endpoints: Vec<Value> = ready
        .iter()
        .map(|ip| endpoint(ip, true))
        .chain(not_ready.iter().map(|ip| endpoint(ip, false)))
        .collect();
    json!({
        "metadata": {
            "name": "http-server-x7k2p",
            "namespace": "latch-demo",
            "resourceVersion": rv.to_string(),
            "labels": {
                "kubernetes.io/service-name": "http-server",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            }
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
    })
}

fn policy(name: &str, spec: Value, rv: u32) -> Value {
    json!({
        "apiVersion": "latch.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "latch-demo", "uid": format!("uid-{name}"), "resourceVersion": rv.to_string(), "generation": 1},
        "spec": spec
    })
}

fn initial_cluster() -> Cluster {
    let service = json!({
        "metadata": {"name": "http-server", "namespace": "latch-demo", "resourceVersion": "50"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.12.34",
            "clusterIPs": ["10.96.12.34"],
            "selector": {"app": "http-server"},
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"}]
        },
        "status": {"loadBalancer": {}}
    });
    let allow = json!({
        "selector": {"app": "http-server"},
        "action": "ALLOW",
        "rules": [{"principals": [{"exact": "spiffe://cluster.local/ns/latch-demo/sa/http-client"}]}]
    });
    Cluster {
        list_requests: Mutex::default(),
        lists: Mutex::new(HashMap::from([
            (
                PODS,
                list(
                    "PodList",
                    "v1",
                    vec![
                        pod(
                            "http-server-a",
                            "http-server",
                            "http-server",
                            Some("10.244.1.5"),
                            60,
                        ),
                        pod("http-client-b", "http-client", "http-client", None, 61),
                    ],
                ),
            ),
            (SERVICES, list("ServiceList", "v1", vec![service])),
            (
                SLICES,
                list(
                    "EndpointSliceList",
                    "discovery.k8s.io/v1",
                    vec![slice(&["10.244.1.5"], &[], 70)],
                ),
            ),
            (
                POLICIES,
                list(
                    "AuthorizationPolicyList",
                    "latch.dev/v1alpha1",
                    vec![
                        policy("allow-client", allow, 80),
                        policy("broken", json!({"action": "PERMIT"}), 81),
                    ],
                ),
            ),
        ])),
        watches: Mutex::default(),
        applied: Mutex::default(),
        refuse_applies: Mutex::default(),
        missing: Mutex::default(),
        forbid_watches: Mutex::default(),
        list_queries: Mutex::default(),
        compacted: Mutex::default(),
    }
}

/// Waits (up to 10 s) until the bundle ConfigMap was applied in `namespace`.
async fn until_applied(cluster: &Cluster, namespace: &str) -> (String, Value) {
    let wait = async {
        loop {
            if let Some((_, query, body)) = cluster
                .applied
                .lock()
                .unwrap()
                .iter()
                .find(|(ns, _, _)| ns == namespace)
            {
                return (query.clone(), body.clone());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("no bundle ConfigMap applied in {namespace}"))
}

/// Waits (up to 10 s) for a published mesh satisfying `check`.
async fn until(
    cp: &ControlPlane,
    what: &str,
    check: impl Fn(&MeshSnapshot) -> bool,
) -> Arc<MeshSnapshot> {
    let mut snapshots = cp.mesh.subscribe();
    let wait = async {
        loop {
            let current = snapshots.borrow_and_update().clone();
            if check(&current) {
                return current;
            }
            snapshots.changed().await.unwrap();
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), wait).await {
        Ok(snapshot) => snapshot,
        Err(_) => panic!(
            "no mesh where {what}; last: {:#?}",
            cp.mesh.snapshot().model
        ),
    }
}

fn endpoints(snapshot: &MeshSnapshot) -> Vec<String> {
    snapshot
        .model
        .services
        .get("latch-demo/http-server")
        .map(|s| s.endpoints.iter().map(IpAddr::to_string).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_published_mesh_follows_the_cluster() {
    let cluster = Arc::new(initial_cluster());
    let addr = fake_api(cluster.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("latch.yaml");
    std::fs::write(
        &file,
        "mesh:\n  mtls: PERMISSIVE\nworkloads:\n  - {name: vm, namespace: legacy, service_account: vm, ips: [192.0.2.10]}\n  - {name: squatter, namespace: legacy, service_account: vm, ips: [10.244.1.5]}\n",
    )
    .unwrap();
    let mut config = kube_config(addr, dir.path().join("data"));
    config.config_file = Some(file);
    let cp = ControlPlane::start(config)
        .await
        .expect("control plane starts");

    // The lists: the running pod, its service and endpoints, the valid policy.
    let first = until(&cp, "the listed objects are in", |s| {
        s.model.workloads.contains_key("latch-demo/http-server-a")
            && s.model.policies.contains_key("latch-demo/allow-client")
    })
    .await;
    let model = &first.model;
    assert_eq!(
        model.workloads.keys().collect::<Vec<_>>(),
        ["latch-demo/http-server-a", "legacy/vm"],
        "the pending pod is not a workload; the file's VM joins, the one using a pod's IP not"
    );
    assert_eq!(
        model.workloads["legacy/vm"].spiffe_id.as_str(),
        "spiffe://cluster.local/ns/legacy/sa/vm"
    );
    assert_eq!(cp.metrics.kubernetes_skipped_count("ConfigFile"), 1);
    assert_eq!(
        model.workloads["latch-demo/http-server-a"]
            .spiffe_id
            .as_str(),
        "spiffe://cluster.local/ns/latch-demo/sa/http-server"
    );
    assert_eq!(
        model.settings.mtls,
        MtlsMode::Permissive,
        "mesh: from the file"
    );
    let service = &model.services["latch-demo/http-server"];
    assert_eq!(service.vips, ["10.96.12.34".parse::<IpAddr>().unwrap()]);
    assert_eq!(service.ports[0].target_port, 8080, "named port resolved");
    assert_eq!(endpoints(&first), ["10.244.1.5"]);
    assert_eq!(
        model.policies.keys().collect::<Vec<_>>(),
        ["latch-demo/allow-client"],
        "the malformed policy is left out, the rest is served"
    );
    assert_eq!(
        cp.metrics.kubernetes_skipped_count("AuthorizationPolicy"),
        1
    );

    // Every collection is now watched from the version its list returned.
    tokio::time::timeout(Duration::from_secs(10), async {
        while cluster.watches.lock().unwrap().len() < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("all four collections are watched");
    for path in [PODS, SERVICES, SLICES, POLICIES] {
        assert_eq!(cluster.watches.lock().unwrap()[path].1, "100", "{path}");
    }

    // A pod becoming Running with an IP appears as a workload (after a bookmark).
    cluster.send(
        PODS,
        json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "105"}}}),
    );
    cluster.send(
        PODS,
        event(
            "MODIFIED",
            "Pod",
            "v1",
            pod(
                "http-client-b",
                "http-client",
                "http-client",
                Some("10.244.2.7"),
                106,
            ),
        ),
    );
    let s = until(&cp, "http-client-b is a workload", |s| {
        s.model.workloads.contains_key("latch-demo/http-client-b")
    })
    .await;
    assert_eq!(
        s.model.workloads["latch-demo/http-client-b"].ips,
        ["10.244.2.7".parse::<IpAddr>().unwrap()]
    );

    // An EndpointSlice change changes the service's endpoints; not-ready ones stay out.
    cluster.send(
        SLICES,
        event(
            "MODIFIED",
            "EndpointSlice",
            "discovery.k8s.io/v1",
            slice(&["10.244.1.5", "10.244.1.6"], &["10.244.1.7"], 107),
        ),
    );
    until(&cp, "two endpoints", |s| {
        endpoints(s) == ["10.244.1.5", "10.244.1.6"]
    })
    .await;

    // A deleted pod disappears; changes arriving together are published as one model.
    let before = cp.mesh.snapshot().generation;
    cluster.send(
        PODS,
        event(
            "DELETED",
            "Pod",
            "v1",
            pod(
                "http-server-a",
                "http-server",
                "http-server",
                Some("10.244.1.5"),
                108,
            ),
        ),
    );
    cluster.send(
        SLICES,
        event(
            "MODIFIED",
            "EndpointSlice",
            "discovery.k8s.io/v1",
            slice(&["10.244.1.6"], &[], 109),
        ),
    );
    let s = until(&cp, "http-server-a is gone and its endpoint with it", |s| {
        !s.model.workloads.contains_key("latch-demo/http-server-a")
            && endpoints(s) == ["10.244.1.6"]
    })
    .await;
    assert_eq!(s.generation, before + 1, "one publish for both changes");

    // A new policy appears; fixing the malformed one brings it in.
    cluster.send(
        POLICIES,
        event(
            "ADDED",
            "AuthorizationPolicy",
            "latch.dev/v1alpha1",
            policy(
                "deny-legacy",
                json!({"action": "DENY", "rules": [{"namespaces": ["legacy"]}]}),
                110,
            ),
        ),
    );
    cluster.send(
        POLICIES,
        event(
            "MODIFIED",
            "AuthorizationPolicy",
            "latch.dev/v1alpha1",
            policy("broken", json!({"action": "ALLOW"}), 111),
        ),
    );
    let s = until(&cp, "three policies", |s| s.model.policies.len() == 3).await;
    assert_eq!(
        s.model.policies["latch-demo/deny-legacy"].rules[0].namespaces,
        ["legacy"]
    );
    assert_eq!(
        cp.metrics.kubernetes_skipped_count("AuthorizationPolicy"),
        0
    );

    // The namespace with injected pods has the trust bundle ConfigMap, by server-side apply.
    let bundle = std::fs::read_to_string(&cp.bundle_path).unwrap();
    let (query, body) = until_applied(&cluster, "latch-demo").await;
    assert!(query.contains("fieldManager=latch-control"), "{query}");
    assert!(query.contains("force=true"), "{query}");
    assert_eq!(body["apiVersion"], "v1");
    assert_eq!(body["kind"], "ConfigMap");
    assert_eq!(body["metadata"]["name"], "latch-ca-bundle");
    assert_eq!(body["metadata"]["namespace"], "latch-demo");
    assert_eq!(body["data"]["bundle.pem"], bundle.as_str());

    // A pending injected pod in a new namespace gets it there too (it cannot start without it),
    // also when the first try is refused.
    *cluster.refuse_applies.lock().unwrap() = 1;
    let mut shop_pod = pod("cart-0", "cart", "cart", None, 112);
    shop_pod["metadata"]["namespace"] = json!("shop");
    cluster.send(PODS, event("ADDED", "Pod", "v1", shop_pod));
    let (_, body) = until_applied(&cluster, "shop").await;
    assert_eq!(body["data"]["bundle.pem"], bundle.as_str());
    assert_eq!(
        *cluster.refuse_applies.lock().unwrap(),
        0,
        "the first try was refused"
    );
    let applied: Vec<String> = cluster
        .applied
        .lock()
        .unwrap()
        .iter()
        .map(|(ns, _, _)| ns.clone())
        .collect();
    assert_eq!(applied, ["latch-demo", "shop"], "each namespace once");

    cp.shutdown().await;
}

/// GET `path` on the admin server: (status, body).
async fn admin_get(cp: &ControlPlane, path: &str) -> (u16, String) {
    latch_testkit::admin::request(cp.admin_addr, "GET", path, None, "")
        .await
        .expect("admin API answers")
}

/// Polls /ready (up to 20 s: the watchers back off) until `check` holds; returns the last answer.
async fn until_ready(cp: &ControlPlane, what: &str, check: impl Fn(u16, &str) -> bool) {
    let mut last = (0, String::new());
    let wait = async {
        loop {
            last = admin_get(cp, "/ready").await;
            if check(last.0, &last.1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .is_err()
    {
        panic!("/ready never showed {what}; last: {last:?}");
    }
}

fn kube_config(addr: SocketAddr, data: std::path::PathBuf) -> Config {
    let mut config = latch_testkit::loopback_config(data);
    let mut kube = kube::Config::new(format!("http://{addr}").parse().unwrap());
    // In its pod, the client's default namespace is latch-system (where its Secrets are).
    kube.default_namespace = "latch-system".into();
    config.kubernetes = Some(KubernetesAccess::Config(Box::new(kube)));
    config.kubernetes_mesh = true;
    config
}

#[tokio::test]
async fn ready_fails_until_every_kind_is_listed_and_names_failing_watches() {
    let cluster = Arc::new(initial_cluster());
    // The AuthorizationPolicy CRD is not installed yet.
    cluster.missing.lock().unwrap().insert(POLICIES.to_string());
    let addr = fake_api(cluster.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(kube_config(addr, dir.path().join("data")))
        .await
        .expect("control plane starts");

    until_ready(&cp, "the missing CRD", |status, body| {
        status == 503
            && body.contains("kubernetes AuthorizationPolicy: cannot list, retrying")
            && body.contains("the server could not find the requested resource")
    })
    .await;
    let (_, body) = admin_get(&cp, "/ready").await;
    assert!(
        body.starts_with("not ready: the mesh has not been read from its source yet"),
        "{body}"
    );
    assert!(!body.contains("kubernetes Pod"), "pods are listed: {body}");
    assert!(
        cp.mesh.snapshot().model.workloads.is_empty(),
        "nothing is served before every kind is listed"
    );
    assert!(!cp.mesh.is_synced());

    // Installing the CRD lets the next retry list it; the mesh is served and /ready is clean.
    cluster.missing.lock().unwrap().clear();
    until_ready(&cp, "ready without problems", |status, body| {
        status == 200 && body == "ready\n"
    })
    .await;
    assert!(cp.mesh.is_synced());
    assert!(
        cp.mesh
            .snapshot()
            .model
            .workloads
            .contains_key("latch-demo/http-server-a")
    );

    // Watches refused (RBAC changed): the pods watch ends and cannot be re-established.
    // /ready stays 200 (the listed state is served) and says so; an event clears it.
    *cluster.forbid_watches.lock().unwrap() = true;
    cluster.watches.lock().unwrap().remove(PODS);
    until_ready(&cp, "the refused pods watch", |status, body| {
        status == 200
            && body.starts_with("ready\n")
            && body.contains("kubernetes Pod: watch failed at")
            && body.contains("cannot watch resource")
    })
    .await;
    let (_, metrics) = admin_get(&cp, "/metrics").await;
    assert!(
        metrics.contains("latch_control_kubernetes_watch_failures_total{kind=\"Pod\"}"),
        "{metrics}"
    );
    *cluster.forbid_watches.lock().unwrap() = false;
    tokio::time::timeout(Duration::from_secs(20), async {
        while !cluster.watches.lock().unwrap().contains_key(PODS) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the pods watch is re-established");
    cluster.send(
        PODS,
        event(
            "MODIFIED",
            "Pod",
            "v1",
            pod(
                "http-client-b",
                "http-client",
                "http-client",
                Some("10.244.2.7"),
                120,
            ),
        ),
    );
    until_ready(&cp, "the watch problem cleared", |status, body| {
        status == 200 && body == "ready\n"
    })
    .await;

    cp.shutdown().await;
}

#[tokio::test]
async fn a_deleted_bundle_configmap_is_applied_again() {
    use latch_control::bundle_configmaps::BundleConfigMaps;
    let cluster = Arc::new(initial_cluster());
    let addr = fake_api(cluster.clone()).await;
    let client =
        kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap()))
            .unwrap();
    let (namespaces, receiver) =
        tokio::sync::watch::channel(std::collections::BTreeSet::from(["latch-demo".to_string()]));
    let tracker = tokio_util::task::TaskTracker::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (bundle, bundle_pem) =
        tokio::sync::watch::channel("-----BEGIN CERTIFICATE-----\n...\n".to_string());
    BundleConfigMaps {
        client,
        bundle_pem,
        retry: Duration::from_millis(100),
        resync: Duration::from_millis(300),
    }
    .spawn(receiver, &tracker, cancel.clone());

    until_applied(&cluster, "latch-demo").await;
    // `kubectl delete configmap latch-ca-bundle -n latch-demo`: the fake API server forgets it.
    cluster.applied.lock().unwrap().clear();
    let (_, body) = until_applied(&cluster, "latch-demo").await;
    assert_eq!(
        body["data"]["bundle.pem"],
        "-----BEGIN CERTIFICATE-----\n...\n"
    );

    // A namespace that no longer holds injected pods is left alone.
    namespaces.send_replace(std::collections::BTreeSet::from(["shop".to_string()]));
    until_applied(&cluster, "shop").await;
    cluster.applied.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let namespaces_applied: HashSet<String> = cluster
        .applied
        .lock()
        .unwrap()
        .iter()
        .map(|(ns, _, _)| ns.clone())
        .collect();
    assert_eq!(namespaces_applied, HashSet::from(["shop".to_string()]));

    // A new bundle (a root rotation step) is applied at once, not at the next resync.
    cluster.applied.lock().unwrap().clear();
    bundle.send_replace("-----BEGIN CERTIFICATE-----\nnew\n".to_string());
    let (_, body) = until_applied(&cluster, "shop").await;
    assert_eq!(
        body["data"]["bundle.pem"],
        "-----BEGIN CERTIFICATE-----\nnew\n"
    );

    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn a_watch_that_ends_in_410_gone_is_followed_by_a_relist() {
    let cluster = Arc::new(initial_cluster());
    let addr = fake_api(cluster.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(kube_config(addr, dir.path().join("data")))
        .await
        .expect("control plane starts");
    until(&cp, "the listed pod is in", |s| {
        s.model.workloads.contains_key("latch-demo/http-server-a")
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while cluster.watches.lock().unwrap().len() < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("all four collections are watched");
    let lists_before = cluster.list_requests.lock().unwrap()[PODS];

    // While the watch was behind, etcd compacted past its version, a pod was deleted and another
    // added: the API server ends the watch with an ERROR event holding 410 Expired, as it does,
    // and only a new list shows either change.
    cluster.lists.lock().unwrap().insert(
        PODS,
        list(
            "PodList",
            "v1",
            vec![pod(
                "http-server-c",
                "http-server",
                "http-server",
                Some("10.244.1.7"),
                300,
            )],
        ),
    );
    cluster.send(
        PODS,
        json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 100 (250)", "reason": "Expired", "code": 410
        }}),
    );
    let relisted = until(&cp, "the pod only the new list holds is in", |s| {
        s.model.workloads.contains_key("latch-demo/http-server-c")
    })
    .await;
    assert!(
        !relisted
            .model
            .workloads
            .contains_key("latch-demo/http-client-b"),
        "the relist replaced what the old list said"
    );
    assert!(cluster.list_requests.lock().unwrap()[PODS] > lists_before);
    cp.shutdown().await;
}

/// Running pods `web-0000`, `web-0001`, ... in latch-demo, each with its own IP.
fn many_pods(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let ip = format!("10.245.{}.{}", i / 250, i % 250 + 1);
            pod(&format!("web-{i:04}"), "web", "web", Some(&ip), 60)
        })
        .collect()
}

#[tokio::test]
async fn a_collection_of_several_pages_is_listed_whole() {
    use latch_control::mesh::kube_source::LIST_PAGE_SIZE;
    let cluster = Arc::new(initial_cluster());
    // More pods than two pages hold: the watcher must follow `continue` twice.
    let n = 2 * LIST_PAGE_SIZE as usize + 201;
    cluster
        .lists
        .lock()
        .unwrap()
        .insert(PODS, list("PodList", "v1", many_pods(n)));
    let addr = fake_api(cluster.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(kube_config(addr, dir.path().join("data")))
        .await
        .expect("control plane starts");
    let s = until(&cp, "every pod of every page is a workload", |s| {
        s.model.workloads.len() == n
    })
    .await;
    for i in [
        0,
        LIST_PAGE_SIZE as usize - 1,
        LIST_PAGE_SIZE as usize,
        n - 1,
    ] {
        assert!(
            s.model
                .workloads
                .contains_key(&format!("latch-demo/web-{i:04}")),
            "pod {i}"
        );
    }
    let pages: Vec<String> = cluster
        .list_queries
        .lock()
        .unwrap()
        .iter()
        .filter(|(path, _)| path == PODS)
        .map(|(_, query)| query.clone())
        .collect();
    assert_eq!(pages.len(), 3, "three pages: {pages:?}");
    for (i, query) in pages.iter().enumerate() {
        assert!(query.contains("limit=500"), "{query}");
        assert_eq!(query.contains("continue="), i > 0, "{query}");
    }
    cp.shutdown().await;
}

#[tokio::test]
async fn a_continue_token_older_than_the_compaction_answers_410_expired() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ListParams;
    let cluster = Arc::new(initial_cluster());
    cluster
        .lists
        .lock()
        .unwrap()
        .insert(PODS, list("PodList", "v1", many_pods(5)));
    let addr = fake_api(cluster.clone()).await;
    let client =
        kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap()))
            .unwrap();
    let pods = kube::Api::<Pod>::all(client);

    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    assert_eq!(first.metadata.resource_version.as_deref(), Some("100"));
    let token = first.metadata.continue_.clone().expect("a continue token");
    let second = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    let names = |list: &kube::core::ObjectList<Pod>| -> Vec<String> {
        list.items
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect()
    };
    assert_eq!(names(&first), ["web-0000", "web-0001"]);
    assert_eq!(names(&second), ["web-0002", "web-0003"]);

    // etcd compacted past the list's version: the token is too old.
    *cluster.compacted.lock().unwrap() = 150;
    let Err(kube::Error::Api(expired)) = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
    else {
        panic!("a continue token from before the compaction must fail");
    };
    assert_eq!((expired.code, expired.reason.as_str()), (410, "Expired"));
    assert!(
        expired.message.contains("continue parameter is too old"),
        "{}",
        expired.message
    );
    // A token the API server never made is a bad request.
    let Err(kube::Error::Api(garbage)) = pods
        .list(&ListParams::default().limit(2).continue_token("not-a-token"))
        .await
    else {
        panic!("a garbage continue token must fail");
    };
    assert_eq!((garbage.code, garbage.reason.as_str()), (400, "BadRequest"));

    // Selectors apply before the page is cut.
    let selected = pods
        .list(
            &ListParams::default()
                .fields("metadata.name!=web-0000")
                .labels("app in (web,other)")
                .limit(3),
        )
        .await
        .unwrap();
    assert_eq!(names(&selected), ["web-0001", "web-0002", "web-0003"]);
    assert_eq!(selected.metadata.remaining_item_count, Some(1));
}
