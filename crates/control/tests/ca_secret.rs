//! The CA kept in a Kubernetes Secret (`--ca-secret`), against a fake API server that stores
//! Secrets the way the real one does: one object per name, create answers 201 or 409
//! AlreadyExists (v1 Status), GET answers the object or 404. Replicas starting together end up
//! signing with one root; an existing Secret is used as it is; a damaged one is never replaced.

mod fake_kube;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use fake_kube::{Call, not_found, respond, status};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use latch_control::ca_secret::SecretRef;
use latch_control::kubernetes::KubernetesAccess;
use latch_control::{Config, ControlPlane, StartError};
use latch_identity::TrustBundle;
use serde_json::{Value, json};

const PATH: &str = "/api/v1/namespaces/latch-system/secrets/latch-ca";
const COLLECTION: &str = "/api/v1/namespaces/latch-system/secrets";

/// A tokio `Barrier` that remembers how many it waits for.
struct Race {
    barrier: tokio::sync::Barrier,
    n: usize,
}

impl Race {
    fn new(n: usize) -> Self {
        Self {
            barrier: tokio::sync::Barrier::new(n),
            n,
        }
    }

    fn n(&self) -> usize {
        self.n
    }

    async fn wait(&self) {
        self.barrier.wait().await;
    }
}

#[derive(Default)]
struct Store {
    /// The Secret latch-system/latch-ca as stored (a v1 Secret object), if any.
    secret: Option<Value>,
    /// Status codes of the create requests, in order.
    creates: Vec<u16>,
    /// GETs of the Secret so far.
    gets: usize,
    /// Every other Secret (the revocations', the JWT keys'), kept as the API server keeps them.
    others: fake_kube::SecretStore,
}

/// A fake API server holding `store`. With `barrier` for n replicas, each of the first n GETs
/// of the Secret waits until all n have arrived, so replicas starting together all find no
/// Secret and race to create it.
async fn fake_api(store: Arc<Mutex<Store>>, barrier: Option<Arc<Race>>) -> SocketAddr {
    fake_kube::serve(move |call: Call| {
        let store = store.clone();
        let barrier = barrier.clone();
        async move {
            let is_ca = call.path == PATH
                || (call.method == Method::POST
                    && call.path == COLLECTION
                    && call.body["metadata"]["name"] == "latch-ca");
            if !is_ca {
                let answer = store.lock().unwrap().others.handle(&call);
                return answer
                    .unwrap_or_else(|| not_found("unknown", &call.path).map(BodyExt::boxed));
            }
            ca_secret_call(store, barrier, call)
                .await
                .map(BodyExt::boxed)
        }
    })
    .await
}

/// The API server's answer to a request about Secret latch-system/latch-ca.
async fn ca_secret_call(
    store: Arc<Mutex<Store>>,
    barrier: Option<Arc<Race>>,
    call: Call,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    if call.method == Method::GET && call.path == PATH {
        let (found, first_round) = {
            let mut store = store.lock().unwrap();
            store.gets += 1;
            let n = barrier.as_ref().map_or(0, |b| b.n());
            (store.secret.clone(), store.gets <= n)
        };
        if let (Some(barrier), true) = (&barrier, first_round) {
            barrier.wait().await;
        }
        return match found {
            Some(secret) => respond(StatusCode::OK, secret),
            None => not_found("secrets", "latch-ca"),
        };
    }
    if call.method == Method::POST && call.path == COLLECTION {
        let mut store = store.lock().unwrap();
        if store.secret.is_some() {
            store.creates.push(409);
            return respond(
                StatusCode::CONFLICT,
                status(
                    409,
                    "AlreadyExists",
                    "secrets",
                    "latch-ca",
                    "secrets \"latch-ca\" already exists".into(),
                ),
            );
        }
        let mut secret = call.body.clone();
        secret["metadata"]["uid"] = json!("2f9c6a1e-7b3d-4e5f-8a9b-0c1d2e3f4a5b");
        secret["metadata"]["resourceVersion"] = json!("1042");
        secret["metadata"]["creationTimestamp"] = json!("2026-11-28T09:00:00Z");
        store.secret = Some(secret.clone());
        store.creates.push(201);
        return respond(StatusCode::CREATED, secret);
    }
    not_found("unknown", &call.path)
}

fn config(api: SocketAddr, data_dir: &std::path::Path) -> Config {
    let mut config = latch_testkit::loopback_config(data_dir.to_path_buf());
    let mut kube = kube::Config::new(format!("http://{api}").parse().unwrap());
    // In its pod, the client's default namespace is latch-system.
    kube.default_namespace = "latch-system".into();
    config.kubernetes = Some(KubernetesAccess::Config(Box::new(kube)));
    config.ca_secret = Some("latch-system/latch-ca".parse::<SecretRef>().unwrap());
    config
}

/// The PEM stored under `key` in the Secret.
fn secret_value(secret: &Value, key: &str) -> Vec<u8> {
    STANDARD
        .decode(secret["data"][key].as_str().expect("key present"))
        .unwrap()
}

/// A Secret as an operator creates it with kubectl, holding `data` (values as given).
fn operator_secret(data: BTreeMap<&str, &[u8]>) -> Value {
    let data: BTreeMap<&str, String> = data
        .into_iter()
        .map(|(k, v)| (k, STANDARD.encode(v)))
        .collect();
    json!({
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {
            "name": "latch-ca",
            "namespace": "latch-system",
            "uid": "7a1b2c3d-4e5f-4061-8293-a4b5c6d7e8f9",
            "resourceVersion": "311",
            "creationTimestamp": "2026-11-01T12:00:00Z"
        },
        "data": data,
        "type": "Opaque"
    })
}

#[tokio::test]
async fn replicas_starting_together_share_one_root() {
    let store = Arc::new(Mutex::new(Store::default()));
    let api = fake_api(store.clone(), Some(Arc::new(Race::new(2)))).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = tokio::join!(
        ControlPlane::start(config(api, dir_a.path())),
        ControlPlane::start(config(api, dir_b.path())),
    );
    let (a, b) = (a.expect("replica a starts"), b.expect("replica b starts"));

    let (mut creates, secret) = {
        let store = store.lock().unwrap();
        (store.creates.clone(), store.secret.clone())
    };
    creates.sort();
    assert_eq!(creates, [201, 409], "both created, one won");
    let secret = secret.expect("the Secret exists");
    let stored_root = TrustBundle::from_pem(&secret_value(&secret, "ca.crt")).unwrap();
    assert_eq!(a.ca.bundle().roots(), stored_root.roots());
    assert_eq!(b.ca.bundle().roots(), stored_root.roots());
    // What each replica serves its clients is that root too.
    for cp in [&a, &b] {
        let served = std::fs::read(&cp.bundle_path).unwrap();
        assert_eq!(
            TrustBundle::from_pem(&served).unwrap().roots(),
            stored_root.roots()
        );
    }
    assert!(
        String::from_utf8(secret_value(&secret, "ca.key"))
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert_eq!(secret["type"], "Opaque");
    a.shutdown().await;
    b.shutdown().await;

    // A later replica (or a restart) reads it and creates nothing.
    let dir_c = tempfile::tempdir().unwrap();
    let api = fake_api(store.clone(), None).await;
    let c = ControlPlane::start(config(api, dir_c.path()))
        .await
        .unwrap();
    assert_eq!(c.ca.bundle().roots(), stored_root.roots());
    assert_eq!(store.lock().unwrap().creates.len(), 2);
    c.shutdown().await;
}

#[tokio::test]
async fn an_operators_secret_is_used_as_it_is() {
    // The root an operator made with latch-control itself, as docs/kubernetes.md shows.
    let init = tempfile::tempdir().unwrap();
    let first = ControlPlane::start(latch_testkit::loopback_config(init.path().to_path_buf()))
        .await
        .unwrap();
    first.shutdown().await;
    let cert = std::fs::read(init.path().join("ca/root.crt.pem")).unwrap();
    let key = std::fs::read(init.path().join("ca/root.key.pem")).unwrap();
    let store = Arc::new(Mutex::new(Store {
        secret: Some(operator_secret(BTreeMap::from([
            ("ca.crt", cert.as_slice()),
            ("ca.key", key.as_slice()),
        ]))),
        ..Store::default()
    }));
    let api = fake_api(store.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(api, dir.path())).await.unwrap();
    let root = TrustBundle::from_pem(&cert).unwrap();
    assert_eq!(cp.ca.bundle().roots(), root.roots());
    assert!(store.lock().unwrap().creates.is_empty(), "nothing created");
    cp.shutdown().await;
}

#[tokio::test]
async fn a_secret_without_its_key_stops_start_up_and_is_not_replaced() {
    let store = Arc::new(Mutex::new(Store {
        secret: Some(operator_secret(BTreeMap::from([(
            "ca.crt",
            b"-----BEGIN CERTIFICATE-----\n".as_slice(),
        )]))),
        ..Store::default()
    }));
    let before = store.lock().unwrap().secret.clone();
    let api = fake_api(store.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let err = match ControlPlane::start(config(api, dir.path())).await {
        Ok(_) => panic!("start-up must fail"),
        Err(e) => e,
    };
    assert!(matches!(err, StartError::CaSecret(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("latch-system/latch-ca has no \"ca.key\" key"),
        "{message}"
    );
    assert!(
        message.contains("refusing to generate a new root"),
        "{message}"
    );
    let store = store.lock().unwrap();
    assert!(store.creates.is_empty());
    assert_eq!(store.secret, before, "the Secret is left as it was");
}

#[tokio::test]
async fn unreachable_api_server_stops_start_up() {
    let port = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let api = SocketAddr::from(([127, 0, 0, 1], port));
    let err = match ControlPlane::start(config(api, dir.path())).await {
        Ok(_) => panic!("start-up must fail"),
        Err(e) => e,
    };
    let message = err.to_string();
    assert!(
        message
            .contains("CA Secret latch-system/latch-ca: cannot read it through the Kubernetes API"),
        "{message}"
    );
    assert!(
        !dir.path().join("ca").exists(),
        "no local root made instead"
    );
}
