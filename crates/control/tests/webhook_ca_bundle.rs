//! The webhook caBundle sync (`--kubernetes` with `--webhook`) against a fake API server that
//! stores the MutatingWebhookConfiguration of deploy/kubernetes/40-webhook.yaml and applies
//! strategic merge patches to it the way the real one does for this type (`webhooks` merged by
//! `name`, objects merged field by field). The patch names every webhook with only its caBundle,
//! base64 of the bundle PEM; nothing else in the object changes; a missing object is retried
//! until the operator applies it.

mod fake_kube;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use fake_kube::rbac::{Rbac, shipped_manifest};
use fake_kube::{Call, not_found, respond};
use hyper::{Method, StatusCode};
use latch_control::ControlPlane;
use latch_control::kubernetes::KubernetesAccess;
use latch_control::metrics::Metrics;
use latch_control::webhook::WebhookConfig;
use latch_control::webhook_ca_bundle::{Synced, WebhookCaBundle};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/latch-sidecar-injector";
const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

#[derive(Default)]
struct Store {
    /// The MutatingWebhookConfiguration as stored, if any.
    object: Option<Value>,
    /// Every PATCH: (content type, body).
    patches: Vec<(String, Value)>,
    gets: usize,
}

/// The object of deploy/kubernetes/40-webhook.yaml as the API server returns it.
fn manifest_object() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/kubernetes/40-webhook.yaml"
    ))
    .unwrap();
    let mut object: Value = serde_saphyr::from_str(&text).unwrap();
    object["metadata"]["uid"] = json!("5b1f0c3e-2a4d-4e6f-8b9c-0d1e2f3a4b5c");
    object["metadata"]["resourceVersion"] = json!("2201");
    object
}

/// Strategic merge as the API server applies it to this type: lists of objects with a
/// `name` merge by name, objects merge field by field, anything else is replaced.
fn strategic_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                match target.get_mut(key) {
                    Some(existing) => strategic_merge(existing, value),
                    None => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(target), Value::Array(patch))
            if patch.iter().all(|p| p.get("name").is_some()) =>
        {
            for item in patch {
                match target
                    .iter_mut()
                    .find(|t| t.get("name") == item.get("name"))
                {
                    Some(existing) => strategic_merge(existing, item),
                    None => target.push(item.clone()),
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

async fn fake_api(store: Arc<Mutex<Store>>) -> SocketAddr {
    fake_api_with(store, Rbac::shipped()).await
}

/// The fake API server granting latch-control `rbac`.
async fn fake_api_with(store: Arc<Mutex<Store>>, rbac: Rbac) -> SocketAddr {
    fake_kube::serve_with(rbac, move |call: Call| {
        let store = store.clone();
        async move {
            let mut store = store.lock().unwrap();
            if call.path != PATH {
                return not_found("unknown", &call.path);
            }
            if call.method == Method::GET {
                store.gets += 1;
                return match &store.object {
                    Some(object) => respond(StatusCode::OK, object.clone()),
                    None => not_found(
                        "mutatingwebhookconfigurations.admissionregistration.k8s.io",
                        "latch-sidecar-injector",
                    ),
                };
            }
            if call.method == Method::PATCH {
                store
                    .patches
                    .push((call.content_type.clone(), call.body.clone()));
                let Some(object) = store.object.as_mut() else {
                    return not_found(
                        "mutatingwebhookconfigurations.admissionregistration.k8s.io",
                        "latch-sidecar-injector",
                    );
                };
                strategic_merge(object, &call.body);
                return respond(StatusCode::OK, object.clone());
            }
            not_found("unknown", &call.path)
        }
    })
    .await
}

/// The client latch-control makes in its pod (default namespace latch-system).
fn kube_access(api: SocketAddr) -> KubernetesAccess {
    let mut config = kube::Config::new(format!("http://{api}").parse().unwrap());
    config.default_namespace = "latch-system".into();
    KubernetesAccess::Config(Box::new(config))
}

fn client(api: SocketAddr) -> kube::Client {
    kube_access(api).client().unwrap()
}

fn task(api: SocketAddr, metrics: Arc<Metrics>) -> WebhookCaBundle {
    WebhookCaBundle {
        client: client(api),
        name: "latch-sidecar-injector".into(),
        bundle_pem: tokio::sync::watch::channel(PEM.to_string()).1,
        metrics,
        retry: Duration::from_millis(100),
        resync: Duration::from_secs(3600),
    }
}

/// The patch expected for the two webhooks of 40-webhook.yaml.
fn expected_patch(pem: &str) -> Value {
    let ca_bundle = STANDARD.encode(pem);
    json!({"webhooks": [
        {"name": "namespace.inject.latch.dev", "clientConfig": {"caBundle": ca_bundle}},
        {"name": "object.inject.latch.dev", "clientConfig": {"caBundle": ca_bundle}},
    ]})
}

/// `before` with every webhook's caBundle set to base64 of `pem`, and nothing else changed.
fn with_ca_bundle(before: &Value, pem: &str) -> Value {
    let mut after = before.clone();
    for webhook in after["webhooks"].as_array_mut().unwrap() {
        webhook["clientConfig"]["caBundle"] = json!(STANDARD.encode(pem));
    }
    after
}

async fn wait_for_patches(store: &Arc<Mutex<Store>>, n: usize) {
    for _ in 0..200 {
        if store.lock().unwrap().patches.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no caBundle patch within 10 s");
}

#[tokio::test]
async fn patches_only_the_ca_bundles_then_leaves_them() {
    let before = manifest_object();
    let store = Arc::new(Mutex::new(Store {
        object: Some(before.clone()),
        ..Store::default()
    }));
    let api = fake_api(store.clone()).await;
    let metrics = Arc::new(Metrics::new());
    let sync = task(api, metrics.clone());

    assert_eq!(sync.sync().await.unwrap(), Synced::Patched);
    {
        let store = store.lock().unwrap();
        assert_eq!(store.patches.len(), 1);
        let (content_type, body) = &store.patches[0];
        assert_eq!(content_type, "application/strategic-merge-patch+json");
        assert_eq!(body, &expected_patch(PEM));
        for webhook in body["webhooks"].as_array().unwrap() {
            let decoded = STANDARD
                .decode(webhook["clientConfig"]["caBundle"].as_str().unwrap())
                .unwrap();
            assert_eq!(decoded, PEM.as_bytes());
        }
        assert_eq!(
            store.object.as_ref().unwrap(),
            &with_ca_bundle(&before, PEM)
        );
    }
    // In sync: read, not written again.
    assert_eq!(sync.sync().await.unwrap(), Synced::Unchanged);
    assert_eq!(store.lock().unwrap().patches.len(), 1);
    assert_eq!(metrics.webhook_ca_bundle_sync_failures.get(), 0);

    // Emptied again (40-webhook.yaml re-applied): the next sync repairs it.
    store.lock().unwrap().object = Some(before.clone());
    assert_eq!(sync.sync().await.unwrap(), Synced::Patched);
    assert_eq!(
        store.lock().unwrap().object.as_ref().unwrap(),
        &with_ca_bundle(&before, PEM)
    );
}

#[tokio::test]
async fn missing_configuration_is_retried_until_applied() {
    let store = Arc::new(Mutex::new(Store::default()));
    let api = fake_api(store.clone()).await;
    let metrics = Arc::new(Metrics::new());
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    task(api, metrics.clone()).spawn(&tracker, cancel.clone());

    // 404s are counted and retried (every 100 ms here, 5 s in the binary).
    for _ in 0..200 {
        if metrics.webhook_ca_bundle_sync_failures.get() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(metrics.webhook_ca_bundle_sync_failures.get() >= 2);
    assert!(store.lock().unwrap().gets >= 2);
    assert!(store.lock().unwrap().patches.is_empty());

    // The operator applies 40-webhook.yaml.
    let before = manifest_object();
    store.lock().unwrap().object = Some(before.clone());
    wait_for_patches(&store, 1).await;
    let failures = metrics.webhook_ca_bundle_sync_failures.get();
    {
        let store = store.lock().unwrap();
        assert_eq!(store.patches[0].1, expected_patch(PEM));
        assert_eq!(
            store.object.as_ref().unwrap(),
            &with_ca_bundle(&before, PEM)
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.lock().unwrap().patches.len(), 1, "patched once");
    assert_eq!(metrics.webhook_ca_bundle_sync_failures.get(), failures);

    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

/// `ControlPlane::start` with Kubernetes access and the webhook writes the CA's own roots.
#[tokio::test]
async fn control_plane_writes_its_roots() {
    let before = manifest_object();
    let store = Arc::new(Mutex::new(Store {
        object: Some(before.clone()),
        ..Store::default()
    }));
    let api = fake_api(store.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = latch_testkit::loopback_config(dir.path().to_path_buf());
    config.kubernetes = Some(kube_access(api));
    config.webhook = Some(WebhookConfig {
        listen: any,
        inject: latch_inject::InjectConfig {
            image: "latch:test".into(),
            control_plane: "latch-control.latch-system.svc:15010".into(),
            trust_domain: "cluster.local".into(),
            ..latch_inject::InjectConfig::default()
        },
        configuration: "latch-sidecar-injector".into(),
    });
    let cp = ControlPlane::start(config)
        .await
        .expect("control plane starts");
    wait_for_patches(&store, 1).await;
    let pem = cp.ca.bundle().to_pem();
    assert_eq!(std::fs::read_to_string(&cp.bundle_path).unwrap(), pem);
    {
        let store = store.lock().unwrap();
        assert_eq!(store.patches[0].1, expected_patch(&pem));
        assert_eq!(
            store.object.as_ref().unwrap(),
            &with_ca_bundle(&before, &pem)
        );
    }
    cp.shutdown().await;
}

/// The patch verb removed from the manifest's rule for the webhook configuration: the sync fails
/// with the API server's 403, and the object is left as it was.
#[tokio::test]
async fn without_the_patch_verb_the_sync_fails_with_the_api_servers_403() {
    let before = manifest_object();
    let store = Arc::new(Mutex::new(Store {
        object: Some(before.clone()),
        ..Store::default()
    }));
    let granted = "resourceNames: [latch-sidecar-injector]\n    verbs: [get, patch]";
    let shipped = shipped_manifest();
    assert!(
        shipped.contains(granted),
        "the rule this test edits is shipped"
    );
    let rbac = Rbac::from_manifest(&shipped.replace(
        granted,
        "resourceNames: [latch-sidecar-injector]\n    verbs: [get]",
    ));
    let api = fake_api_with(store.clone(), rbac).await;
    let err = task(api, Arc::new(Metrics::new()))
        .sync()
        .await
        .expect_err("the patch is forbidden");
    let message = err.to_string();
    assert!(
        message.contains(
            "mutatingwebhookconfigurations \"latch-sidecar-injector\" is forbidden: User \
             \"system:serviceaccount:latch-system:latch-control\" cannot patch resource \
             \"mutatingwebhookconfigurations\" in API group \"admissionregistration.k8s.io\""
        ),
        "{message}"
    );
    let store = store.lock().unwrap();
    assert!(store.patches.is_empty(), "the handler never saw the patch");
    assert_eq!(store.object.as_ref().unwrap(), &before);
}

/// A body the schema does not allow is refused before anything is stored, with the Status the
/// API server sends: an unknown (misspelt) field under strict field validation, an apply without
/// a field manager, a patch in a media type the API server does not take.
#[tokio::test]
async fn bodies_the_schema_does_not_allow_are_refused_as_the_api_server_refuses_them() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams};
    let before = manifest_object();
    let store = Arc::new(Mutex::new(Store {
        object: Some(before.clone()),
        ..Store::default()
    }));
    let api = fake_api(store.clone()).await;
    let webhooks = kube::Api::<MutatingWebhookConfiguration>::all(client(api));
    let misspelt = json!({"webhooks": [
        {"name": "namespace.inject.latch.dev", "clientConfig": {"cabundle": "Zm9v"}}
    ]});

    let strict = PatchParams {
        field_manager: Some("latch-control".into()),
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..PatchParams::default()
    };
    let Err(kube::Error::Api(refused)) = webhooks
        .patch(
            "latch-sidecar-injector",
            &strict,
            &Patch::Strategic(&misspelt),
        )
        .await
    else {
        panic!("an unknown field must be refused under fieldValidation=Strict");
    };
    assert_eq!((refused.code, refused.reason.as_str()), (400, "BadRequest"));
    assert_eq!(
        refused.message,
        "strict decoding error: unknown field \"webhooks[0].clientConfig.cabundle\""
    );
    assert!(store.lock().unwrap().patches.is_empty());

    // Without a directive (Warn, the default for patches) the field is dropped, not stored.
    webhooks
        .patch(
            "latch-sidecar-injector",
            &PatchParams::default(),
            &Patch::Strategic(&misspelt),
        )
        .await
        .expect("accepted with a warning");
    let (_, stored_patch) = store.lock().unwrap().patches[0].clone();
    assert_eq!(
        stored_patch,
        json!({"webhooks": [{"name": "namespace.inject.latch.dev", "clientConfig": {}}]})
    );
    assert_eq!(store.lock().unwrap().object.as_ref().unwrap(), &before);

    // Server-side apply needs a field manager (422 Invalid), and its body must be the kind.
    let config_maps = kube::Api::<ConfigMap>::namespaced(client(api), "shop");
    let bundle = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "latch-ca-bundle", "namespace": "shop"},
        "data": {"bundle.pem": PEM}
    });
    let Err(kube::Error::Api(invalid)) = config_maps
        .patch(
            "latch-ca-bundle",
            &PatchParams::default(),
            &Patch::Apply(&bundle),
        )
        .await
    else {
        panic!("an apply without fieldManager must be refused");
    };
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    assert!(
        invalid.message.contains("fieldManager: Required value"),
        "{}",
        invalid.message
    );
    let mut wrong_kind = bundle.clone();
    wrong_kind["kind"] = json!("Secret");
    let Err(kube::Error::Api(wrong)) = config_maps
        .patch(
            "latch-ca-bundle",
            &PatchParams::apply("latch-control"),
            &Patch::Apply(&wrong_kind),
        )
        .await
    else {
        panic!("an apply of another kind must be refused");
    };
    assert_eq!((wrong.code, wrong.reason.as_str()), (400, "BadRequest"));
}
