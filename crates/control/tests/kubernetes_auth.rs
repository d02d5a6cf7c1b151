//! Service-account token authentication through the real gRPC certificate service, against a
//! fake Kubernetes API server on loopback (plain HTTP) that answers the way the real one does:
//! a TokenReview v1 object echoing the spec with the review's status (201 Created), a Pod for a
//! GET of an existing pod, and a v1 Status object with 404 for a missing one. Each test checks
//! what a proxy sees (the SVID and its SPIFFE ID, or the gRPC status), what an operator sees
//! (the refusal metric, nothing issued) and what the API server was asked.

mod fake_kube;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use fake_kube::{Call, not_found, respond};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use latch_control::ControlPlane;
use latch_control::kubernetes::KubernetesAccess;
use latch_identity::client::{CaClient, control_plane_id};
use latch_identity::csr::generate_csr;
use latch_identity::{CertStore, ExpectedPeer, SpiffeId, TrustDomain};
use latch_proto::ca::CreateCertificateRequest;
use latch_proto::ca::create_certificate_request::Proof;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::Code;

const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJhdWQiOlsibGF0Y2giXX0.c2lnbmF0dXJl";
const POD: &str = "web-7d4b9c6f5-x2x8k";
const POD_UID: &str = "5b0a3f2e-8c1d-4e6f-9a7b-1c2d3e4f5a6b";

/// What the fake API server answers and what it was asked.
#[derive(Default)]
struct ApiState {
    /// `status` of the next TokenReview answers.
    review_status: Value,
    /// Existing pods: (namespace, name) -> uid.
    pods: BTreeMap<(String, String), String>,
    /// Bodies of the TokenReviews created, parsed.
    reviews: Vec<Value>,
    /// Paths of the pod GETs.
    pod_gets: Vec<String>,
}

type Shared = Arc<Mutex<ApiState>>;

fn handle(state: &Shared, call: Call) -> Response<Full<Bytes>> {
    // What deploy/kubernetes/20-rbac.yaml does not grant latch-control never gets here:
    // `fake_kube::serve` answers it with the API server's 403.
    let mut state = state.lock().unwrap();
    if call.method == Method::POST && call.path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        state.reviews.push(call.body.clone());
        // The API server answers a TokenReview create with 201, the spec echoed and the status.
        return respond(
            StatusCode::CREATED,
            json!({
                "kind": "TokenReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": null},
                "spec": call.body["spec"],
                "status": state.review_status
            }),
        );
    }
    let parts: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
    if call.method == Method::GET
        && let ["api", "v1", "namespaces", namespace, "pods", name] = parts.as_slice()
    {
        state.pod_gets.push(call.path.clone());
        let key = (namespace.to_string(), name.to_string());
        return match state.pods.get(&key) {
            Some(uid) => respond(
                StatusCode::OK,
                json!({
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "metadata": {
                        "name": name,
                        "generateName": "web-7d4b9c6f5-",
                        "namespace": namespace,
                        "uid": uid,
                        "resourceVersion": "48213",
                        "creationTimestamp": "2026-11-28T09:12:44Z",
                        "labels": {"app": "web", "pod-template-hash": "7d4b9c6f5"}
                    },
                    "spec": {
                        "serviceAccountName": "web",
                        "containers": [{"name": "app", "image": "busybox:1.36"}]
                    },
                    "status": {"phase": "Running", "podIP": "10.244.1.7"}
                }),
            ),
            None => not_found("pods", name),
        };
    }
    not_found("unknown", &call.path)
}

/// Serves the fake API server on loopback until the test ends.
async fn fake_api(state: Shared) -> SocketAddr {
    fake_kube::serve(move |call| {
        let response = handle(&state, call);
        async move { response }
    })
    .await
}

/// The status of a successful review of a token bound to pod `POD` of service account
/// `namespace/service_account`, as the API server fills it in.
fn authenticated(namespace: &str, service_account: &str, audiences: &[&str]) -> Value {
    json!({
        "authenticated": true,
        "user": {
            "username": format!("system:serviceaccount:{namespace}:{service_account}"),
            "uid": "9e1f7c55-2a3b-4c5d-8e9f-0a1b2c3d4e5f",
            "groups": [
                "system:serviceaccounts",
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated"
            ],
            "extra": {
                "authentication.kubernetes.io/credential-id": ["JTI=3f1e0c9a-6b2d-4f8e-a1c3-5d7b9e0f2a4c"],
                "authentication.kubernetes.io/node-name": ["worker-1"],
                "authentication.kubernetes.io/node-uid": ["0f6e5d4c-3b2a-4190-8f7e-6d5c4b3a2918"],
                "authentication.kubernetes.io/pod-name": [POD],
                "authentication.kubernetes.io/pod-uid": [POD_UID]
            }
        },
        "audiences": audiences
    })
}

/// A refused review: the API server leaves `user` empty and says why in `error`.
fn unauthenticated(error: &str) -> Value {
    json!({"user": {}, "error": error})
}

struct Plane {
    cp: ControlPlane,
    api: Shared,
    _dir: tempfile::TempDir,
}

impl Plane {
    /// A control plane with `--kubernetes` pointed at a fake API server answering
    /// `review_status`, where pod shop/`POD` exists.
    async fn start(review_status: Value) -> Self {
        let api = Arc::new(Mutex::new(ApiState {
            review_status,
            pods: BTreeMap::from([(("shop".to_string(), POD.to_string()), POD_UID.to_string())]),
            ..ApiState::default()
        }));
        let addr = fake_api(api.clone()).await;
        Self::start_at(format!("http://{addr}"), api).await
    }

    async fn start_at(url: String, api: Shared) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = latch_testkit::loopback_config(dir.path().join("data"));
        let mut kube_config = kube::Config::new(url.parse().unwrap());
        // In a pod, the client's default namespace is the pod's own: latch-system.
        kube_config.default_namespace = "latch-system".into();
        config.kubernetes = Some(KubernetesAccess::Config(Box::new(kube_config)));
        let cp = ControlPlane::start(config)
            .await
            .expect("control plane starts");
        Self { cp, api, _dir: dir }
    }

    async fn client(&self) -> CaClient {
        let trust_domain = TrustDomain::new("cluster.local").unwrap();
        CaClient::connect(
            &self.cp.grpc_addr.to_string(),
            Arc::new(CertStore::new(self.cp.ca.bundle().as_ref().clone())),
            ExpectedPeer::Exactly(control_plane_id(&trust_domain)),
            false,
        )
        .await
        .expect("client connects")
    }

    /// Sends `TOKEN` with a CSR for `asks_for` (none: let the token decide); expects a refusal
    /// with `code`, a message mentioning `message_part`, counted under `reason`, and nothing
    /// issued.
    async fn assert_refused(
        &self,
        asks_for: Option<&SpiffeId>,
        code: Code,
        message_part: &str,
        reason: &'static str,
    ) -> String {
        let before = self.cp.metrics.refusals(reason);
        let status = self
            .client()
            .await
            .create_certificate(CreateCertificateRequest {
                csr: generate_csr(asks_for).unwrap().csr_der,
                ttl: None,
                proof: Some(Proof::ServiceAccountToken(TOKEN.to_string())),
            })
            .await
            .expect_err("the request must be refused");
        latch_testkit::harness::assert_status(&status, code, message_part);
        assert_eq!(
            self.cp.metrics.refusals(reason),
            before + 1,
            "refusal counted as {reason}"
        );
        assert_eq!(self.cp.metrics.issued_total(), 0, "nothing issued");
        status.message().to_string()
    }

    fn reviews(&self) -> Vec<Value> {
        self.api.lock().unwrap().reviews.clone()
    }

    fn pod_gets(&self) -> Vec<String> {
        self.api.lock().unwrap().pod_gets.clone()
    }
}

/// The one TokenReview the control plane created asked about `TOKEN` for audience latch.
fn assert_reviewed_token(reviews: &[Value]) {
    assert_eq!(reviews.len(), 1, "one TokenReview per request: {reviews:?}");
    let review = &reviews[0];
    assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(review["kind"], "TokenReview");
    assert_eq!(review["spec"]["token"], TOKEN);
    assert_eq!(review["spec"]["audiences"], json!(["latch"]));
}

/// The URI SAN of a DER certificate, read with x509-parser.
fn uri_san(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris.len(), 1, "exactly one URI SAN: {uris:?}");
    uris[0].clone()
}

#[tokio::test]
async fn bound_service_account_token_gets_an_svid_for_its_service_account() {
    let plane = Plane::start(authenticated("shop", "web", &["latch"])).await;
    let (svid, bundle) = plane
        .client()
        .await
        .fetch_svid_with(None, None, Some(Proof::ServiceAccountToken(TOKEN.into())))
        .await
        .expect("SVID issued");
    assert_eq!(
        uri_san(svid.chain()[0].as_ref()),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(bundle.roots(), plane.cp.ca.bundle().roots());
    assert_eq!(plane.cp.metrics.issued_total(), 1);
    assert_reviewed_token(&plane.reviews());
    assert_eq!(
        plane.pod_gets(),
        vec![format!("/api/v1/namespaces/shop/pods/{POD}")]
    );
    plane.cp.shutdown().await;
}

#[tokio::test]
async fn csr_for_another_identity_is_denied() {
    let plane = Plane::start(authenticated("shop", "web", &["latch"])).await;
    let admin = SpiffeId::parse("spiffe://cluster.local/ns/kube-system/sa/admin").unwrap();
    plane
        .assert_refused(
            Some(&admin),
            Code::PermissionDenied,
            "the service-account token grants spiffe://cluster.local/ns/shop/sa/web",
            "csr_identity",
        )
        .await;
    plane.cp.shutdown().await;
}

#[tokio::test]
async fn token_authenticated_for_another_audience_is_refused() {
    let plane = Plane::start(authenticated("shop", "web", &["other"])).await;
    plane
        .assert_refused(
            None,
            Code::Unauthenticated,
            "not for audience \"latch\"",
            "sa_token_audience",
        )
        .await;
    assert_reviewed_token(&plane.reviews());
    assert!(plane.pod_gets().is_empty(), "no pod lookup after a refusal");
    plane.cp.shutdown().await;
}

#[tokio::test]
async fn token_the_api_server_rejects_for_its_audience_is_refused() {
    let plane = Plane::start(unauthenticated(
        "[invalid bearer token, token audiences [\"other\"] is invalid for the target audiences [\"latch\"]]",
    ))
    .await;
    let message = plane
        .assert_refused(
            None,
            Code::Unauthenticated,
            "is invalid for the target audiences",
            "sa_token_audience",
        )
        .await;
    assert!(
        message.contains("audience: latch"),
        "says what to fix: {message}"
    );
    assert_reviewed_token(&plane.reviews());
    plane.cp.shutdown().await;
}

#[tokio::test]
async fn expired_token_is_refused() {
    let plane = Plane::start(unauthenticated(
        "[invalid bearer token, Token has expired.]",
    ))
    .await;
    plane
        .assert_refused(
            None,
            Code::Unauthenticated,
            "Token has expired.",
            "sa_token_invalid",
        )
        .await;
    assert_reviewed_token(&plane.reviews());
    assert!(plane.pod_gets().is_empty());
    plane.cp.shutdown().await;
}

#[tokio::test]
async fn token_of_a_deleted_pod_is_refused() {
    let plane = Plane::start(authenticated("shop", "web", &["latch"])).await;
    plane.api.lock().unwrap().pods.clear();
    plane
        .assert_refused(
            None,
            Code::Unauthenticated,
            &format!("the pod shop/{POD} the token is bound to no longer exists"),
            "sa_token_pod_missing",
        )
        .await;
    assert_eq!(
        plane.pod_gets(),
        vec![format!("/api/v1/namespaces/shop/pods/{POD}")]
    );
    plane.cp.shutdown().await;
}

#[tokio::test]
async fn token_of_a_replaced_pod_is_refused() {
    // A StatefulSet pod deleted and created again: same name, new uid.
    let plane = Plane::start(authenticated("shop", "web", &["latch"])).await;
    plane.api.lock().unwrap().pods.insert(
        ("shop".into(), POD.into()),
        "11111111-2222-4333-8444-555555555555".into(),
    );
    plane
        .assert_refused(
            None,
            Code::Unauthenticated,
            "was replaced",
            "sa_token_pod_missing",
        )
        .await;
    plane.cp.shutdown().await;
}

#[tokio::test]
async fn token_of_a_user_is_refused() {
    let mut status = authenticated("shop", "web", &["latch"]);
    status["user"] = json!({
        "username": "kubernetes-admin",
        "groups": ["kubeadm:cluster-admins", "system:authenticated"]
    });
    let plane = Plane::start(status).await;
    plane
        .assert_refused(
            None,
            Code::Unauthenticated,
            "\"kubernetes-admin\", which is not a service account",
            "sa_token_not_service_account",
        )
        .await;
    plane.cp.shutdown().await;
}

#[tokio::test]
async fn token_not_bound_to_a_pod_is_refused() {
    // A legacy Secret-based token: authenticated, but no pod in user.extra.
    let mut status = authenticated("shop", "web", &["latch"]);
    status["user"]["extra"] = json!({});
    let plane = Plane::start(status).await;
    plane
        .assert_refused(
            None,
            Code::Unauthenticated,
            "not bound to a pod",
            "sa_token_unbound",
        )
        .await;
    assert!(plane.pod_gets().is_empty());
    plane.cp.shutdown().await;
}

#[tokio::test]
async fn unreachable_api_server_is_unavailable_not_a_verdict() {
    // A port nothing listens on.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let api = Arc::new(Mutex::new(ApiState::default()));
    let plane = Plane::start_at(format!("http://127.0.0.1:{port}"), api).await;
    plane
        .assert_refused(
            None,
            Code::Unavailable,
            "cannot check the service-account token with the Kubernetes API server",
            "kubernetes_unavailable",
        )
        .await;
    plane.cp.shutdown().await;
}

#[tokio::test]
async fn without_kubernetes_tokens_are_still_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = latch_testkit::loopback_config(dir.path().join("data"));
    let cp = ControlPlane::start(config).await.unwrap();
    let plane = Plane {
        cp,
        api: Arc::new(Mutex::new(ApiState::default())),
        _dir: dir,
    };
    plane
        .assert_refused(
            None,
            Code::Unauthenticated,
            "--kubernetes",
            "sa_token_unsupported",
        )
        .await;
    plane.cp.shutdown().await;
}

/// The subject organizationalUnitName values of a DER certificate.
fn subject_units(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject()
        .iter_organizational_unit()
        .map(|ou| ou.as_str().unwrap().to_string())
        .collect()
}

impl Plane {
    /// A renewal: a new CSR, no proof, `svid` presented as the TLS client certificate.
    async fn renew(&self, svid: &latch_identity::Svid) -> Result<Vec<u8>, tonic::Status> {
        let store = Arc::new(CertStore::new(self.cp.ca.bundle().as_ref().clone()));
        store.set_svid(
            latch_identity::Svid::new(svid.chain().to_vec(), svid.private_key().clone_key())
                .unwrap(),
        );
        let trust_domain = TrustDomain::new("cluster.local").unwrap();
        let mut client = CaClient::connect(
            &self.cp.grpc_addr.to_string(),
            store,
            ExpectedPeer::Exactly(control_plane_id(&trust_domain)),
            true,
        )
        .await
        .expect("client connects");
        let answer = client
            .create_certificate(CreateCertificateRequest {
                csr: generate_csr(None).unwrap().csr_der,
                ttl: None,
                proof: None,
            })
            .await?;
        Ok(answer.certificate_chain[0].clone())
    }
}

#[tokio::test]
async fn renewal_needs_the_pod_the_svid_was_issued_to() {
    let plane = Plane::start(authenticated("shop", "web", &["latch"])).await;
    let (svid, _) = plane
        .client()
        .await
        .fetch_svid_with(None, None, Some(Proof::ServiceAccountToken(TOKEN.into())))
        .await
        .expect("SVID issued");
    let bound = vec![format!("kubernetes-pod:shop/{POD}/{POD_UID}")];
    assert_eq!(subject_units(svid.chain()[0].as_ref()), bound);

    // While the pod runs, renewal works (one more pod lookup) and the new SVID is bound too.
    let renewed = plane
        .renew(&svid)
        .await
        .expect("renewal while the pod runs");
    assert_eq!(subject_units(&renewed), bound);
    assert_eq!(plane.pod_gets().len(), 2, "{:?}", plane.pod_gets());

    // Pod deleted: the SVID cannot renew itself; the proxy has to come back with its
    // service-account token, which the API server no longer accepts once the pod is gone.
    plane.api.lock().unwrap().pods.clear();
    let refused = plane.renew(&svid).await.expect_err("pod deleted");
    latch_testkit::harness::assert_status(
        &refused,
        Code::Unauthenticated,
        &format!("issued to pod shop/{POD} (uid {POD_UID}), and that pod no longer exists"),
    );
    assert_eq!(plane.cp.metrics.refusals("renewal_pod_gone"), 1);

    // Same name, new pod (a StatefulSet pod recreated): still refused.
    plane.api.lock().unwrap().pods.insert(
        ("shop".into(), POD.into()),
        "11111111-2222-4333-8444-555555555555".into(),
    );
    let refused = plane.renew(&svid).await.expect_err("pod replaced");
    latch_testkit::harness::assert_status(
        &refused,
        Code::Unauthenticated,
        "that pod name now belongs to another pod (uid 11111111-2222-4333-8444-555555555555)",
    );
    assert_eq!(plane.cp.metrics.refusals("renewal_pod_gone"), 2);
    assert_eq!(
        plane.cp.metrics.issued_total(),
        2,
        "the first SVID and one renewal"
    );
    plane.cp.shutdown().await;
}
