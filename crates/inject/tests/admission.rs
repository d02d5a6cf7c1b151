//! AdmissionReview v1 as the API server sends it (shapes from the Kubernetes API reference,
//! admission.k8s.io/v1): a Pod CREATE is answered with the uid echoed and a base64 JSON Patch
//! that turns the pod into what offline injection produces; other requests are allowed
//! unchanged; malformed reviews are errors; a refused pod is denied with the reason.

use base64::Engine;
use latch_inject::admission::{ReviewError, Verdict, review};
use latch_inject::{InjectConfig, SkipReason, inject};
use serde_json::{Value, json};

fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-5d9f8b7c4-", "namespace": "demo", "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "nginx:1.27"}]},
    })
}

fn admission_review(kind: Value, operation: &str, object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": kind,
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": kind,
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "uid": "u", "groups": ["system:serviceaccounts"]},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    })
}

fn pod_kind() -> Value {
    json!({"group": "", "version": "v1", "kind": "Pod"})
}

fn body(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

#[test]
fn a_pod_create_gets_the_patch_of_offline_injection() {
    let config = InjectConfig::default();
    let reviewed = review(
        &body(&admission_review(pod_kind(), "CREATE", pod())),
        &config,
    )
    .unwrap();
    assert_eq!(reviewed.verdict, Verdict::Injected);
    assert_eq!(reviewed.pod, "demo/web-5d9f8b7c4-");
    let response = &reviewed.response;
    assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["kind"], "AdmissionReview");
    let answer = &response["response"];
    assert_eq!(answer["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(answer["allowed"], true);
    assert_eq!(answer["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod();
    json_patch::patch(&mut patched, &patch).unwrap();
    assert_eq!(patched, inject(&pod(), &config).unwrap().pod);
}

/// `env` takes precedence over `envFrom`, so the injected SPIFFE_ENDPOINT_SOCKET would hide one
/// from a ConfigMap the injector cannot read: the operator is told through an admission
/// warning (kubectl prints them); a container without envFrom gets none.
#[test]
fn a_container_with_env_from_gets_a_warning_that_the_socket_variable_is_set() {
    let config = InjectConfig::default();
    let answer =
        |pod: Value| review(&body(&admission_review(pod_kind(), "CREATE", pod)), &config).unwrap();
    let plain = answer(pod());
    assert_eq!(plain.verdict, Verdict::Injected);
    assert!(plain.response["response"].get("warnings").is_none());

    let mut with_env_from = pod();
    with_env_from["spec"]["containers"][0]["envFrom"] =
        serde_json::json!([{"configMapRef": {"name": "app-settings"}}]);
    let warned = answer(with_env_from);
    assert_eq!(warned.verdict, Verdict::Injected);
    let warnings = warned.response["response"]["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let warning = warnings[0].as_str().unwrap();
    assert!(
        warning.contains("SPIFFE_ENDPOINT_SOCKET") && warning.contains("envFrom"),
        "{warning}"
    );
}

#[test]
fn requests_that_are_not_pod_creates_are_allowed_unchanged() {
    let config = InjectConfig::default();
    let cases = [
        admission_review(pod_kind(), "UPDATE", pod()),
        admission_review(
            json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
            "CREATE",
            json!({}),
        ),
    ];
    for request in cases {
        let reviewed = review(&body(&request), &config).unwrap();
        assert_eq!(reviewed.verdict, Verdict::Ignored);
        let answer = &reviewed.response["response"];
        assert_eq!(answer["allowed"], true);
        assert!(answer.get("patch").is_none() && answer.get("patchType").is_none());
    }
    // An already injected pod: allowed, no patch.
    let injected = inject(&pod(), &config).unwrap().pod;
    let reviewed = review(
        &body(&admission_review(pod_kind(), "CREATE", injected)),
        &config,
    )
    .unwrap();
    assert_eq!(
        reviewed.verdict,
        Verdict::Skipped(SkipReason::AlreadyInjected)
    );
    assert!(reviewed.response["response"].get("patch").is_none());
}

#[test]
fn a_pod_with_a_bad_annotation_is_denied_with_the_reason() {
    let mut bad = pod();
    bad["metadata"]["annotations"] = json!({"latch.dev/exclude-outbound-ports": "all"});
    let reviewed = review(
        &body(&admission_review(pod_kind(), "CREATE", bad)),
        &InjectConfig::default(),
    )
    .unwrap();
    let answer = &reviewed.response["response"];
    assert_eq!(answer["allowed"], false);
    assert_eq!(answer["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(answer["status"]["code"], 400);
    let message = answer["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("demo/web-5d9f8b7c4-")
            && message.contains("latch.dev/exclude-outbound-ports")
            && message.contains("\"all\" is not a port"),
        "{message}"
    );
    assert!(matches!(reviewed.verdict, Verdict::Refused(_)));
}

#[test]
fn malformed_reviews_are_errors() {
    let config = InjectConfig::default();
    assert!(matches!(
        review(b"{not json", &config),
        Err(ReviewError::NotJson(_))
    ));
    let mut v1beta1 = admission_review(pod_kind(), "CREATE", pod());
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    assert_eq!(
        review(&body(&v1beta1), &config).unwrap_err(),
        ReviewError::WrongType {
            api_version: "admission.k8s.io/v1beta1".into(),
            kind: "AdmissionReview".into()
        }
    );
    let mut no_uid = admission_review(pod_kind(), "CREATE", pod());
    no_uid["request"].as_object_mut().unwrap().remove("uid");
    assert_eq!(
        review(&body(&no_uid), &config).unwrap_err(),
        ReviewError::NoUid
    );
    let mut no_object = admission_review(pod_kind(), "CREATE", pod());
    no_object["request"]
        .as_object_mut()
        .unwrap()
        .remove("object");
    assert_eq!(
        review(&body(&no_object), &config).unwrap_err(),
        ReviewError::NoObject
    );
}
