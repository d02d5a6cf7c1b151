//! Join tokens, revocations and JWT signing keys across control-plane replicas
//! (`--kubernetes`): two control
//! planes share one fake Kubernetes API server, which keeps Secrets as the real one does (`fake_kube::
//! SecretStore`: resourceVersion on every write, 409 Conflict for a stale update, 409
//! AlreadyExists for a taken name). They share the CA through `--ca-secret`, as the shipped
//! Deployment's replicas do, and each has its own empty data dir (the Deployment's emptyDir).
//! No Kubernetes API server can run on this machine; the fake answers as the API reference says,
//! and refuses with 403 what deploy/kubernetes/20-rbac.yaml does not grant latch-control.

mod fake_kube;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use fake_kube::rbac::{Rbac, shipped_manifest};
use fake_kube::{AnyBody, Call, SecretStore, not_found};
use http_body_util::BodyExt;
use hyper::Response;
use latch_control::ControlPlane;
use latch_control::kubernetes::KubernetesAccess;
use latch_identity::client::{CaClient, control_plane_id};
use latch_identity::csr::generate_csr;
use latch_identity::{CertStore, ExpectedPeer, TrustDomain};
use latch_proto::ca::CreateCertificateRequest;
use latch_proto::ca::create_certificate_request::Proof;
use serde_json::Value;
use tonic::Code;

const NAMESPACE: &str = "latch-system";
const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";

type Store = Arc<Mutex<SecretStore>>;

async fn fake_api(store: Store) -> SocketAddr {
    fake_api_with(store, Rbac::shipped()).await
}

/// The fake API server holding `store`, refusing with 403 what `rbac` does not allow, as the
/// API server does for latch-control's service account.
async fn fake_api_with(store: Store, rbac: Rbac) -> SocketAddr {
    fake_kube::serve_with(rbac, move |call: Call| {
        let response: Response<AnyBody> = store
            .lock()
            .unwrap()
            .handle(&call)
            .unwrap_or_else(|| not_found("unknown", &call.path).map(BodyExt::boxed));
        async move { response }
    })
    .await
}

/// A replica: `--kubernetes` against `api`, the CA in Secret latch-system/latch-ca, its own
/// data dir, and `config_yaml` as its config file when given.
struct Replica {
    cp: ControlPlane,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start(api: SocketAddr, config_yaml: Option<&str>) -> Self {
        Self::start_with(api, config_yaml, |_| {}).await
    }

    async fn start_with(
        api: SocketAddr,
        config_yaml: Option<&str>,
        adjust: impl FnOnce(&mut latch_control::config::Config),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = latch_testkit::loopback_config(dir.path().join("data"));
        // Long enough for the other replica's watch, short enough to wait for.
        config.jwt_publish_ahead = std::time::Duration::from_secs(4);
        adjust(&mut config);
        let mut kube_config = kube::Config::new(format!("http://{api}").parse().unwrap());
        // In a pod, the client's default namespace is the pod's own.
        kube_config.default_namespace = NAMESPACE.to_string();
        config.kubernetes = Some(KubernetesAccess::Config(Box::new(kube_config)));
        config.ca_secret = Some(format!("{NAMESPACE}/latch-ca").parse().unwrap());
        if let Some(yaml) = config_yaml {
            let path = dir.path().join("latch.yaml");
            std::fs::write(&path, yaml).unwrap();
            config.config_file = Some(path);
        }
        let cp = ControlPlane::start(config)
            .await
            .expect("control plane starts");
        Self { cp, _dir: dir }
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

    /// POSTs `body` to `path` on this replica's admin API with its credential, expecting 201;
    /// the answer.
    async fn admin_post(&self, path: &str, body: &str) -> Value {
        let credential = std::fs::read_to_string(&self.cp.admin_token_path).unwrap();
        let (status, answer) = latch_testkit::admin::request(
            self.cp.admin_addr,
            "POST",
            path,
            Some(credential.trim()),
            body,
        )
        .await
        .unwrap();
        assert_eq!(status, 201, "{answer}");
        serde_json::from_str(&answer).unwrap_or(Value::Null)
    }

    /// `latchctl token create` through this replica's admin API; returns the token.
    async fn create_token(&self, reusable: bool) -> String {
        let body = format!(r#"{{"spiffe_id":"{WEB}","ttl_seconds":600,"reusable":{reusable}}}"#);
        let answer = self.admin_post("/v1/join-tokens", &body).await;
        answer["token"].as_str().unwrap().to_string()
    }

    /// `latchctl identity revoke` through this replica's admin API.
    async fn revoke(&self, id: &str) {
        let body = format!(r#"{{"spiffe_id":"{id}","reason":"key leaked"}}"#);
        self.admin_post("/v1/revocations", &body).await;
    }

    /// The revoked IDs this replica enforces now.
    fn revoked(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .cp
            .revocations
            .list(std::time::SystemTime::now())
            .into_iter()
            .map(|r| r.spiffe_id)
            .collect();
        ids.sort();
        ids
    }

    /// One certificate request with `token`: the SPIFFE ID issued, or the refusal.
    async fn request(&self, token: &str) -> Result<String, tonic::Status> {
        request(self.client().await, token.to_string()).await
    }
}

/// A certificate request with `token` on `client`: the SPIFFE ID issued, or the refusal.
async fn request(mut client: CaClient, token: String) -> Result<String, tonic::Status> {
    let answer = client
        .create_certificate(CreateCertificateRequest {
            csr: generate_csr(None).unwrap().csr_der,
            ttl: None,
            proof: Some(Proof::JoinToken(token)),
        })
        .await?;
    Ok(answer.spiffe_id)
}

/// Sends `rounds` requests with `token` to each replica, all at once; returns the answers.
async fn race(
    replicas: &[&Replica],
    token: &str,
    rounds: usize,
) -> Vec<Result<String, tonic::Status>> {
    let mut clients = Vec::new();
    for _ in 0..rounds {
        for replica in replicas {
            clients.push(replica.client().await);
        }
    }
    // Connected first, so that the requests themselves start together.
    let requests = clients
        .into_iter()
        .map(|client| tokio::spawn(request(client, token.to_string())));
    let mut answers = Vec::new();
    for request in requests.collect::<Vec<_>>() {
        answers.push(request.await.unwrap());
    }
    answers
}

/// Exactly one issuance for `WEB`, every other answer "already used".
fn assert_exactly_one(answers: &[Result<String, tonic::Status>]) {
    let issued: Vec<_> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    assert_eq!(issued.len(), 1, "exactly one issuance: {answers:?}");
    assert_eq!(issued[0], WEB);
    for refusal in answers.iter().filter_map(|a| a.as_ref().err()) {
        latch_testkit::harness::assert_status(refusal, Code::Unauthenticated, "already used");
    }
}

fn token_secrets(store: &Store) -> Vec<Value> {
    store
        .lock()
        .unwrap()
        .all()
        .into_iter()
        .filter(|s| s["metadata"]["labels"]["latch.dev/join-token"] == "true")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_token_is_used_once_across_replicas_and_restarts() {
    let store = Store::default();
    let api = fake_api(store.clone()).await;
    let (a, b) = (
        Replica::start(api, None).await,
        Replica::start(api, None).await,
    );
    assert_eq!(
        a.cp.ca.bundle().roots(),
        b.cp.ca.bundle().roots(),
        "the replicas share the CA Secret"
    );

    let token = a.create_token(false).await;
    let answers = race(&[&a, &b], &token, 8).await;
    assert_exactly_one(&answers);
    assert_eq!(
        a.cp.metrics.issued_total() + b.cp.metrics.issued_total(),
        1,
        "one SVID issued by the two replicas together"
    );
    eprintln!(
        "16 requests on two replicas: {} lost a compare-and-swap (409 Conflict) and read again",
        store.lock().unwrap().conflicts
    );

    // The state is in the API: one Secret, holding the token's hash and its use, never the token.
    let secrets = token_secrets(&store);
    assert_eq!(secrets.len(), 1, "{secrets:?}");
    assert_eq!(secrets[0]["type"], "latch.dev/join-token");
    assert!(
        !serde_json::to_string(&store.lock().unwrap().all())
            .unwrap()
            .contains(&token),
        "the token itself is never stored"
    );

    // A replica replaced by a new pod (empty data dir) still knows the token was used.
    b.cp.shutdown().await;
    let c = Replica::start(api, None).await;
    let refusal = c
        .request(&token)
        .await
        .expect_err("a used token is refused");
    latch_testkit::harness::assert_status(&refusal, Code::Unauthenticated, "already used");

    // A token created on one replica works on the others.
    let reusable = c.create_token(true).await;
    for replica in [&a, &c] {
        assert_eq!(replica.request(&reusable).await.unwrap(), WEB);
    }
    a.cp.shutdown().await;
    c.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_single_use_token_is_used_once_across_replicas() {
    const TOKEN: &str = "configured-single-use-token-0123456789";
    let yaml = format!("join_tokens:\n  - spiffe_id: {WEB}\n    token: {TOKEN}\n");
    let store = Store::default();
    let api = fake_api(store.clone()).await;
    let (a, b) = (
        Replica::start(api, Some(&yaml)).await,
        Replica::start(api, Some(&yaml)).await,
    );
    assert!(
        token_secrets(&store).is_empty(),
        "a configured token has no Secret until its first use"
    );
    let answers = race(&[&a, &b], TOKEN, 8).await;
    assert_exactly_one(&answers);
    assert_eq!(token_secrets(&store).len(), 1);
    a.cp.shutdown().await;
    b.cp.shutdown().await;
}

#[tokio::test]
async fn expired_token_secrets_are_deleted_when_tokens_are_created() {
    let store = Store::default();
    let api = fake_api(store.clone()).await;
    let a = Replica::start(api, None).await;
    a.create_token(false).await;
    // Make the first one expired, as if created long ago.
    {
        let mut guard = store.lock().unwrap();
        let mut secret = guard
            .all()
            .into_iter()
            .find(|s| s["type"] == "latch.dev/join-token")
            .unwrap();
        let record: Value = {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(secret["data"]["record.json"].as_str().unwrap())
                .unwrap();
            let mut record: Value = serde_json::from_slice(&bytes).unwrap();
            record["expires_at"] = Value::from(1_000_000_000u64);
            record
        };
        use base64::Engine;
        secret["data"]["record.json"] =
            Value::from(base64::engine::general_purpose::STANDARD.encode(record.to_string()));
        secret["metadata"]["resourceVersion"] = Value::Null;
        let name = secret["metadata"]["name"].as_str().unwrap().to_string();
        let call = Call {
            method: hyper::Method::PUT,
            path: format!("/api/v1/namespaces/{NAMESPACE}/secrets/{name}"),
            query: String::new(),
            content_type: "application/json".into(),
            body: secret,
        };
        assert_eq!(guard.handle(&call).unwrap().status(), 200);
    }
    a.create_token(false).await;
    let left = token_secrets(&store);
    assert_eq!(
        left.len(),
        1,
        "the expired token's Secret was deleted: {left:?}"
    );
    a.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_made_on_one_replica_holds_on_every_replica_and_after_restarts() {
    let store = Store::default();
    let api = fake_api(store.clone()).await;
    let (a, b) = (
        Replica::start(api, None).await,
        Replica::start(api, None).await,
    );
    let token = a.create_token(true).await;
    assert_eq!(b.request(&token).await.unwrap(), WEB);

    let revoked_at = std::time::Instant::now();
    a.revoke(WEB).await;
    assert_eq!(a.revoked(), [WEB], "in force at once where it was made");
    latch_testkit::until(
        "the other replica learns the revocation through its watch",
        std::time::Duration::from_secs(5),
        || b.revoked() == [WEB],
    )
    .await;
    eprintln!(
        "the other replica enforced the revocation {:?} after the admin API answered",
        revoked_at.elapsed()
    );
    let refusal = b
        .request(&token)
        .await
        .expect_err("the token predates the revocation");
    latch_testkit::harness::assert_status(&refusal, Code::PermissionDenied, "was revoked at");

    // Two revocations made at once on the two replicas both stay (compare-and-swap).
    let (x, y) = (
        "spiffe://cluster.local/ns/demo/sa/x",
        "spiffe://cluster.local/ns/demo/sa/y",
    );
    tokio::join!(a.revoke(x), b.revoke(y));
    let all = [WEB, x, y].map(String::from).to_vec();
    latch_testkit::until(
        "both replicas hold all three",
        std::time::Duration::from_secs(5),
        || a.revoked() == all && b.revoked() == all,
    )
    .await;

    // A replica that starts with an empty data dir (a new pod) has them from the start.
    b.cp.shutdown().await;
    let c = Replica::start(api, None).await;
    assert_eq!(c.revoked(), all);
    a.cp.shutdown().await;
    c.cp.shutdown().await;
}

/// The JWT bundle this replica serves its proxies (the MeshConfig's JWKS), as key ids.
fn served_kids(replica: &Replica) -> Vec<String> {
    let snapshot = replica.cp.mesh.snapshot();
    let config = snapshot
        .resources(latch_control::mesh::snapshot::ResourceType::MeshConfig)
        .values()
        .next()
        .unwrap()
        .clone();
    let bytes = &config.body.value;
    let mut kids: Vec<String> = replica
        .cp
        .jwt
        .keys()
        .bundle()
        .kids()
        .filter(|kid| bytes.windows(kid.len()).any(|w| w == kid.as_bytes()))
        .map(String::from)
        .collect();
    kids.sort();
    kids
}

fn held_kids(replica: &Replica) -> Vec<String> {
    let mut kids: Vec<String> = replica
        .cp
        .jwt
        .keys()
        .bundle()
        .kids()
        .map(String::from)
        .collect();
    kids.sort();
    kids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_jwt_signing_keys_and_a_rotation_reaches_every_replica_before_it_signs() {
    use latch_identity::SpiffeId;
    use latch_identity::jwt::validate;
    use std::time::SystemTime;
    let store = Store::default();
    let api = fake_api(store.clone()).await;
    let (a, b) = tokio::join!(Replica::start(api, None), Replica::start(api, None));
    let td = TrustDomain::new("cluster.local").unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let now = SystemTime::now();
    assert_eq!(
        a.cp.jwt.keys().signing_kid(now).unwrap(),
        b.cp.jwt.keys().signing_kid(now).unwrap(),
        "replicas starting together sign with one key"
    );
    let token = a.cp.jwt.sign(&web, &["db".into()], now).unwrap().token;
    let claims = validate(&token, &td, b.cp.jwt.keys().bundle(), "db", now)
        .expect("a token from one replica validates with the other's bundle");
    assert_eq!(claims.subject, web);

    let rotation = a.cp.rotate_jwt_key().await.unwrap();
    latch_testkit::until(
        "the other replica serves the new key to its proxies",
        std::time::Duration::from_secs(5),
        || served_kids(&b).contains(&rotation.kid),
    )
    .await;
    assert!(
        SystemTime::now() < rotation.signs_from,
        "published by every replica before it signs"
    );
    assert_eq!(held_kids(&a), held_kids(&b));
    assert_eq!(
        b.cp.jwt.keys().signing_kid(rotation.signs_from).unwrap(),
        rotation.kid
    );
    let later =
        b.cp.jwt
            .sign(&web, &["db".into()], rotation.signs_from)
            .unwrap()
            .token;
    validate(
        &later,
        &td,
        a.cp.jwt.keys().bundle(),
        "db",
        rotation.signs_from,
    )
    .unwrap();

    // A new replica (an empty data dir) starts with the same keys.
    let c = Replica::start(api, None).await;
    assert_eq!(held_kids(&c), held_kids(&a));
    for replica in [a, b, c] {
        replica.cp.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_due_for_a_scheduled_jwt_key_rotation_at_once_make_one_key() {
    let store = Store::default();
    let api = fake_api(store.clone()).await;
    let every = std::time::Duration::from_secs(10);
    let (a, b) = tokio::join!(
        Replica::start_with(api, None, |c| c.jwt_key_rotation = every),
        Replica::start_with(api, None, |c| c.jwt_key_rotation = every),
    );
    let first = held_kids(&a);
    assert_eq!(first.len(), 1);
    latch_testkit::until(
        "both replicas hold the rotated keys",
        std::time::Duration::from_secs(20),
        || held_kids(&a).len() > 1 && held_kids(&a) == held_kids(&b),
    )
    .await;
    // Both woke for the same rotation; the compare-and-swap let one of them make the key.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let kids = held_kids(&a);
    assert_eq!(kids.len(), 2, "one new key, not one per replica: {kids:?}");
    assert_eq!(kids, held_kids(&b));
    a.cp.shutdown().await;
    b.cp.shutdown().await;
}

/// The API server refuses the JWT keys Secret (403, as for a Role without it) until the test
/// grants it: the replica starts and serves X509-SVIDs, signs no JWT-SVID, then creates the
/// keys and serves their bundle once the API answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keys_the_api_refuses_at_start_are_created_once_it_answers() {
    use latch_identity::SpiffeId;
    use std::sync::atomic::{AtomicBool, Ordering};
    let store = Store::default();
    let granted = Arc::new(AtomicBool::new(false));
    let rbac = Rbac::shipped();
    let api = {
        let (store, granted) = (store.clone(), granted.clone());
        fake_kube::serve(move |call: Call| {
            let jwt_keys = call.path.ends_with("/latch-jwt-keys")
                || call.query.contains("latch-jwt-keys")
                || call.body["metadata"]["name"] == "latch-jwt-keys";
            let refusal = rbac.refusal(&call).or_else(|| {
                (jwt_keys && !granted.load(Ordering::SeqCst)).then(|| {
                    fake_kube::status(
                        403,
                        "Forbidden",
                        "secrets",
                        "latch-jwt-keys",
                        "secrets \"latch-jwt-keys\" is forbidden: User \
                         \"system:serviceaccount:latch-system:latch-control\" cannot get \
                         resource \"secrets\" in API group \"\" in the namespace \"latch-system\""
                            .into(),
                    )
                })
            });
            let response: Response<AnyBody> = match refusal {
                Some(forbidden) => {
                    fake_kube::respond(hyper::StatusCode::FORBIDDEN, forbidden).map(BodyExt::boxed)
                }
                None => store
                    .lock()
                    .unwrap()
                    .handle(&call)
                    .unwrap_or_else(|| not_found("unknown", &call.path).map(BodyExt::boxed)),
            };
            async move { response }
        })
        .await
    };
    let replica = Replica::start(api, None).await;
    let token = replica.create_token(true).await;
    assert_eq!(
        replica.request(&token).await.unwrap(),
        WEB,
        "X509-SVIDs do not wait for the JWT keys"
    );
    let web = SpiffeId::parse(WEB).unwrap();
    let refused = replica
        .cp
        .jwt
        .sign(&web, &["db".into()], std::time::SystemTime::now())
        .err()
        .expect("nothing is signed without the shared keys")
        .to_string();
    assert!(
        refused.contains("not been read") && refused.contains("403"),
        "{refused}"
    );
    assert!(held_kids(&replica).is_empty());

    granted.store(true, Ordering::SeqCst);
    latch_testkit::until(
        "the replica creates the keys and serves their bundle",
        std::time::Duration::from_secs(10),
        || !served_kids(&replica).is_empty(),
    )
    .await;
    replica
        .cp
        .jwt
        .sign(&web, &["db".into()], std::time::SystemTime::now())
        .expect("signs once the keys are read");
    replica.cp.shutdown().await;
}

#[tokio::test]
async fn nothing_is_issued_while_the_shared_revocations_cannot_be_read() {
    // An API server that refuses every request with 403, as it does when the RBAC of
    // deploy/kubernetes/20-rbac.yaml was not applied (kube-rs would retry a 503 for minutes).
    let api = fake_kube::serve(|call: Call| async move {
        fake_kube::respond(
            hyper::StatusCode::FORBIDDEN,
            fake_kube::status(
                403,
                "Forbidden",
                "secrets",
                &call.path,
                "secrets is forbidden: User \"system:serviceaccount:latch-system:latch-control\" \
                 cannot get resource \"secrets\" in API group \"\" in the namespace \"latch-system\""
                    .into(),
            ),
        )
    })
    .await;
    const TOKEN: &str = "configured-reusable-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let mut config = latch_testkit::loopback_config(dir.path().join("data"));
    let mut kube_config = kube::Config::new(format!("http://{api}").parse().unwrap());
    kube_config.default_namespace = NAMESPACE.to_string();
    config.kubernetes = Some(KubernetesAccess::Config(Box::new(kube_config)));
    let path = dir.path().join("latch.yaml");
    std::fs::write(
        &path,
        format!("join_tokens:\n  - spiffe_id: {WEB}\n    token: {TOKEN}\n    reusable: true\n"),
    )
    .unwrap();
    config.config_file = Some(path);
    let cp = ControlPlane::start(config)
        .await
        .expect("starts without the API: the revocations are read once it answers");
    let replica = Replica { cp, _dir: dir };
    let refusal = replica
        .request(TOKEN)
        .await
        .expect_err("a revoked ID could otherwise get an SVID");
    latch_testkit::harness::assert_status(
        &refusal,
        Code::Unavailable,
        "the revocations kept in the Kubernetes API have not been read yet",
    );
    assert_eq!(replica.cp.metrics.issued_total(), 0);
    replica.cp.shutdown().await;
}

#[tokio::test]
async fn without_the_update_verb_of_the_rbac_manifest_single_use_tokens_fail_with_the_apis_403() {
    let shipped = shipped_manifest();
    let granted = "verbs: [get, list, watch, create, update, delete]";
    assert!(
        shipped.contains(granted),
        "the Secrets rule of 20-rbac.yaml changed"
    );
    let rbac =
        Rbac::from_manifest(&shipped.replace(granted, "verbs: [get, list, watch, create, delete]"));
    let store = Store::default();
    let api = fake_api_with(store.clone(), rbac).await;
    let a = Replica::start(api, None).await;
    let token = a.create_token(false).await;
    let refusal = a
        .request(&token)
        .await
        .expect_err("the use cannot be recorded");
    latch_testkit::harness::assert_status(
        &refusal,
        Code::Unavailable,
        "cannot update resource \"secrets\" in API group \"\" in the namespace \"latch-system\"",
    );
    assert!(
        refusal.message().contains("check latch-control's RBAC"),
        "{}",
        refusal.message()
    );
    assert_eq!(a.cp.metrics.issued_total(), 0);
    a.cp.shutdown().await;
}
