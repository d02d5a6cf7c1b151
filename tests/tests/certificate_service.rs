//! The certificate service over real gRPC and TLS: what it issues, and one test per refusal.
//! Each refusal asserts the gRPC status code and that no SVID was issued.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use latch_identity::client::CaClient;
use latch_identity::csr::generate_csr;
use latch_identity::{PeerRole, SpiffeId, verify_svid};
use latch_proto::ca::CreateCertificateRequest;
use latch_proto::ca::create_certificate_request::Proof;
use latch_testkit::Harness;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);

fn request(csr: Vec<u8>, token: Option<&str>) -> CreateCertificateRequest {
    CreateCertificateRequest {
        csr,
        ttl: None,
        proof: token.map(|t| Proof::JoinToken(t.to_string())),
    }
}

/// Sends `request` and asserts it is refused with `code` and nothing is issued.
async fn assert_refused(
    h: &Harness,
    client: &mut CaClient,
    request: CreateCertificateRequest,
    code: Code,
    message_part: &str,
) {
    let before = h.issued();
    let status = client
        .create_certificate(request)
        .await
        .expect_err("request must be refused");
    latch_testkit::harness::assert_status(&status, code, message_part);
    assert_eq!(
        h.issued(),
        before,
        "a refused request must not issue anything"
    );
}

fn valid_csr() -> Vec<u8> {
    generate_csr(None).unwrap().csr_der
}

#[tokio::test]
async fn join_token_gets_an_svid_for_its_id() {
    let h = Harness::start().await;
    let id = h.id("demo", "web");
    let token = h.token(&id, HOUR, false);
    let (svid, bundle) = h
        .client()
        .await
        .fetch_svid(Some(&id), None, Some(token))
        .await
        .unwrap();
    assert_eq!(svid.id(), &id);
    assert_eq!(bundle.roots(), h.bundle().roots());
    let info = verify_svid(svid.chain(), &bundle, SystemTime::now(), PeerRole::Server).unwrap();
    // Default TTL is one hour, NotBefore backdated five minutes (clock skew between peers).
    assert_eq!(info.lifetime(), HOUR + Duration::from_secs(300));
    assert_eq!(h.issued(), 1);
    h.stop().await;
}

#[tokio::test]
async fn renewal_with_current_svid_keeps_the_id_and_changes_the_serial() {
    let h = Harness::start().await;
    let id = h.id("demo", "api");
    let (first, _) = h.svid(&id, None).await;
    let mut renewing = h.client_presenting(&first).await;
    let (second, _) = renewing
        .fetch_svid(Some(&id), Some(Duration::from_secs(600)), None)
        .await
        .unwrap();
    assert_eq!(second.id(), &id);
    assert_ne!(second.info().serial, first.info().serial);
    assert_eq!(second.info().lifetime(), Duration::from_secs(600 + 300));
    assert_eq!(h.control_plane.metrics.refusals("renewal_expired"), 0);
    h.stop().await;
}

#[tokio::test]
async fn garbage_csr_is_invalid_argument() {
    let h = Harness::start().await;
    let token = h.token(&h.id("demo", "web"), HOUR, false);
    let mut client = h.client().await;
    assert_refused(
        &h,
        &mut client,
        request(b"garbage".to_vec(), Some(&token)),
        Code::InvalidArgument,
        "PKCS#10",
    )
    .await;
    // The refused request did not spend the single-use token.
    client.fetch_svid(None, None, Some(token)).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn csr_with_bad_signature_is_invalid_argument() {
    let h = Harness::start().await;
    let id = h.id("demo", "web");
    let token = h.token(&id, HOUR, false);
    let mut csr = generate_csr(Some(&id)).unwrap().csr_der;
    let last = csr.len() - 1;
    csr[last] ^= 0x01; // corrupt the signature
    assert_refused(
        &h,
        &mut h.client().await,
        request(csr, Some(&token)),
        Code::InvalidArgument,
        "signature",
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn disallowed_key_type_is_invalid_argument() {
    let h = Harness::start().await;
    let token = h.token(&h.id("demo", "web"), HOUR, false);
    let key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    assert_refused(
        &h,
        &mut h.client().await,
        request(csr, Some(&token)),
        Code::InvalidArgument,
        "not allowed",
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn csr_asking_for_another_id_is_permission_denied() {
    let h = Harness::start().await;
    let token = h.token(&h.id("demo", "web"), HOUR, false);
    let other = h.id("kube-system", "admin");
    let csr = generate_csr(Some(&other)).unwrap().csr_der;
    assert_refused(
        &h,
        &mut h.client().await,
        request(csr, Some(&token)),
        Code::PermissionDenied,
        other.as_str(),
    )
    .await;
    // Two URI SANs, one of them right: still refused.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = [h.id("demo", "web"), other]
        .iter()
        .map(|id| SanType::URI(id.as_str().try_into().unwrap()))
        .collect();
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    assert_refused(
        &h,
        &mut h.client().await,
        request(csr, Some(&token)),
        Code::PermissionDenied,
        "kube-system",
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn the_control_planes_own_id_is_never_issued() {
    let h = Harness::start().await;
    // A token for it cannot be created through the admin API or the config file (see
    // latchctl's and the config's tests); this one stands for a token recorded before that
    // check existed, or for a Kubernetes service account of that name.
    let reserved = h.id("latch-system", "latch-control");
    let token = h.token(&reserved, HOUR, true);
    for csr in [valid_csr(), generate_csr(Some(&reserved)).unwrap().csr_der] {
        assert_refused(
            &h,
            &mut h.client().await,
            request(csr, Some(&token)),
            Code::PermissionDenied,
            "is reserved for the control plane's own use",
        )
        .await;
    }
    let self_test = h.id("latch-system", "ca-self-test");
    let token = h.token(&self_test, HOUR, false);
    assert_refused(
        &h,
        &mut h.client().await,
        request(valid_csr(), Some(&token)),
        Code::PermissionDenied,
        "reserved",
    )
    .await;
    // Other service accounts of the namespace are ordinary workloads.
    let monitoring = h.id("latch-system", "monitoring");
    let token = h.token(&monitoring, HOUR, false);
    let (svid, _) = h
        .client()
        .await
        .fetch_svid(None, None, Some(token))
        .await
        .unwrap();
    assert_eq!(svid.id(), &monitoring);
    h.stop().await;
}

#[tokio::test]
async fn a_token_deleted_from_the_config_file_stops_working_after_reload_and_restart() {
    const KEPT: &str = "kept-configured-token-0123";
    const DELETED: &str = "deleted-configured-token-0123";
    let entry = |token: &str| {
        format!(
            "  - spiffe_id: spiffe://cluster.local/ns/demo/sa/web\n    token: {token}\n    reusable: true\n"
        )
    };
    let both = format!("join_tokens:\n{}{}", entry(KEPT), entry(DELETED));
    let h = Harness::start_with_mesh(&both).await;
    for token in [KEPT, DELETED] {
        let reply = h
            .client()
            .await
            .fetch_svid(None, None, Some(token.into()))
            .await;
        assert!(reply.is_ok(), "{token}: {reply:?}");
    }

    h.write_mesh(&format!("join_tokens:\n{}", entry(KEPT)));
    // The file source reloads within a second or two of the edit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h
        .client()
        .await
        .fetch_svid(None, None, Some(DELETED.into()))
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted token still works 10 s after the edit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        h.client()
            .await
            .fetch_svid(None, None, Some(KEPT.into()))
            .await
            .is_ok()
    );

    // A restart reads join-tokens.json, where the token is gone too.
    let h = h.pause().await.resume().await;
    let status = h
        .client()
        .await
        .create_certificate(request(valid_csr(), Some(DELETED)))
        .await
        .expect_err("refused after the restart");
    latch_testkit::harness::assert_status(&status, Code::Unauthenticated, "not known");
    h.stop().await;
}

#[tokio::test]
async fn unknown_token_is_unauthenticated() {
    let h = Harness::start().await;
    assert_refused(
        &h,
        &mut h.client().await,
        request(valid_csr(), Some("latch-jt-0000")),
        Code::Unauthenticated,
        "not known",
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn expired_token_is_unauthenticated() {
    let h = Harness::start().await;
    let id = h.id("demo", "web");
    h.control_plane
        .tokens
        .add_configured(
            Some("an-expired-configured-token"),
            None,
            latch_control::tokens::TokenRecord {
                spiffe_id: id.to_string(),
                expires_at: Some(
                    (SystemTime::now() - Duration::from_secs(180))
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap()
                        .as_secs(),
                ),
                reusable: true,
                used_at: None,
                configured: true,
                created_at_ms: None,
            },
        )
        .unwrap();
    assert_refused(
        &h,
        &mut h.client().await,
        request(valid_csr(), Some("an-expired-configured-token")),
        Code::Unauthenticated,
        "expired 3m",
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn reused_single_use_token_is_unauthenticated() {
    let h = Harness::start().await;
    let token = h.token(&h.id("demo", "web"), HOUR, false);
    let mut client = h.client().await;
    client
        .fetch_svid(None, None, Some(token.clone()))
        .await
        .unwrap();
    assert_refused(
        &h,
        &mut client,
        request(valid_csr(), Some(&token)),
        Code::Unauthenticated,
        "already used",
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn concurrent_uses_of_a_single_use_token_issue_exactly_once() {
    let h = Harness::start().await;
    let token = h.token(&h.id("demo", "web"), HOUR, false);
    let client = h.client().await;
    let attempts = (0..8).map(|_| {
        let (mut client, token) = (client.clone(), token.clone());
        tokio::spawn(async move { client.fetch_svid(None, None, Some(token)).await.is_ok() })
    });
    let successes = futures::future::join_all(attempts)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap())
        .count();
    assert_eq!(successes, 1);
    assert_eq!(h.issued(), 1);
    h.stop().await;
}

#[tokio::test]
async fn ttl_over_the_maximum_is_invalid_argument() {
    let h = Harness::start().await;
    let token = h.token(&h.id("demo", "web"), HOUR, false);
    let mut req = request(valid_csr(), Some(&token));
    req.ttl = Some(prost_types::Duration {
        seconds: 25 * 3600,
        nanos: 0,
    });
    assert_refused(
        &h,
        &mut h.client().await,
        req,
        Code::InvalidArgument,
        "maximum",
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn no_proof_is_unauthenticated() {
    let h = Harness::start().await;
    assert_refused(
        &h,
        &mut h.client().await,
        request(valid_csr(), None),
        Code::Unauthenticated,
        "no proof",
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn renewal_with_an_expired_svid_is_unauthenticated() {
    let h = Harness::start().await;
    let id = h.id("demo", "web");
    let (short, _) = h.svid(&id, Some(Duration::from_secs(1))).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut client = h.client_presenting(&short).await;
    assert_refused(
        &h,
        &mut client,
        request(valid_csr(), None),
        Code::Unauthenticated,
        "expired",
    )
    .await;
    assert_eq!(h.control_plane.metrics.refusals("renewal_expired"), 1);
    h.stop().await;
}

#[tokio::test]
async fn renewal_with_a_foreign_ca_svid_is_unauthenticated() {
    let h = Harness::start().await;
    let foreign = Harness::start().await;
    let id = foreign.id("demo", "web");
    let (svid, _) = foreign.svid(&id, None).await;
    let mut client = h.client_presenting(&svid).await;
    assert_refused(
        &h,
        &mut client,
        request(valid_csr(), None),
        Code::Unauthenticated,
        "trust bundle",
    )
    .await;
    h.stop().await;
    foreign.stop().await;
}

#[tokio::test]
async fn renewal_cannot_change_the_id() {
    let h = Harness::start().await;
    let id = h.id("demo", "web");
    let (svid, _) = h.svid(&id, None).await;
    let mut client = h.client_presenting(&svid).await;
    let other = h.id("demo", "db");
    let csr = generate_csr(Some(&other)).unwrap().csr_der;
    assert_refused(
        &h,
        &mut client,
        request(csr, None),
        Code::PermissionDenied,
        "renewal keeps",
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn a_flood_of_bad_requests_does_not_starve_good_ones() {
    let h = Harness::start().await;
    let good_token = h.token(&h.id("demo", "web"), HOUR, true);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flooders = Vec::new();
    for _ in 0..8 {
        let mut client = h.client().await;
        let stop = stop.clone();
        flooders.push(tokio::spawn(async move {
            let mut refused = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let bad = request(vec![0x30; 4096], Some("latch-jt-not-a-token"));
                if client.create_certificate(bad).await.is_err() {
                    refused += 1;
                }
            }
            refused
        }));
    }
    // While the flood runs, 50 good requests all succeed.
    let mut good = h.client().await;
    for _ in 0..50 {
        good.fetch_svid(None, None, Some(good_token.clone()))
            .await
            .expect("good request served during the flood");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for f in flooders {
        refused += f.await.unwrap();
    }
    assert!(refused > 0, "the flood ran");
    assert_eq!(h.issued(), 50);
    h.stop().await;
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let h = Harness::start().await;
    let token = h.token(&h.id("demo", "web"), HOUR, false);
    let status = h
        .client()
        .await
        .create_certificate(request(vec![0u8; 128 * 1024], Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("16384-byte limit"),
        "{}",
        status.message()
    );
    // Past tonic's own decode limit the message is not even read.
    let status = h
        .client()
        .await
        .create_certificate(request(vec![0u8; 512 * 1024], Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());
    assert_eq!(h.issued(), 0);
    h.stop().await;
}

#[tokio::test]
async fn the_server_is_only_trusted_as_the_control_plane_id() {
    let h = Harness::start().await;
    let store = Arc::new(latch_identity::CertStore::new(h.bundle()));
    let wrong = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/impostor").unwrap();
    let expected = latch_identity::ExpectedPeer::Exactly(wrong);
    let err = CaClient::connect(&h.grpc_addr(), store, expected, false)
        .await
        .expect_err("a server with another SPIFFE ID must not be trusted");
    let message = err.to_string();
    assert!(
        message.contains("ns/latch-system/sa/latch-control") && message.contains("impostor"),
        "{message}"
    );
    h.stop().await;
}

fn jwt_request(audience: &[&str]) -> latch_proto::ca::CreateJwtSvidRequest {
    latch_proto::ca::CreateJwtSvidRequest {
        audience: audience.iter().map(|a| a.to_string()).collect(),
    }
}

#[tokio::test]
async fn a_current_svid_gets_a_jwt_svid_for_its_id_and_audiences() {
    let h = Harness::start().await;
    let id = h.id("demo", "web");
    let (svid, _) = h.svid(&id, None).await;
    let mut client = h.client_presenting(&svid).await;
    let response = client
        .create_jwt_svid(jwt_request(&["db", "cache"]))
        .await
        .unwrap();
    assert_eq!(response.spiffe_id, id.to_string());
    let bundle = latch_identity::jwt::JwtBundle::from_jwks(
        &serde_json::from_slice(&response.jwt_bundle).unwrap(),
    )
    .unwrap();
    assert_eq!(&bundle, h.control_plane.jwt.keys().bundle());
    let now = SystemTime::now();
    for audience in ["db", "cache"] {
        let claims =
            latch_identity::jwt::validate(&response.token, &h.trust_domain, &bundle, audience, now)
                .unwrap();
        assert_eq!(claims.subject, id);
        let expires = claims.expires.duration_since(now).unwrap();
        assert!(expires <= Duration::from_secs(300) && expires > Duration::from_secs(290));
        assert_eq!(
            response.expires_at.as_ref().map(|t| t.seconds),
            Some(
                claims
                    .expires
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64
            )
        );
    }
    h.stop().await;
}

/// Each refusal of CreateJwtSvid: its code and words, and no token.
#[tokio::test]
async fn jwt_svid_refusals() {
    let h = Harness::start().await;
    let id = h.id("demo", "web");
    let (svid, _) = h.svid(&id, None).await;
    let mut client = h.client_presenting(&svid).await;
    let refused = |status: Result<latch_proto::ca::CreateJwtSvidResponse, tonic::Status>,
                   code: Code,
                   words: &str| {
        let status = status.expect_err("refused");
        latch_testkit::harness::assert_status(&status, code, words);
    };
    refused(
        client.create_jwt_svid(jwt_request(&[])).await,
        Code::InvalidArgument,
        "no audience",
    );
    let many: Vec<String> = (0..17).map(|i| format!("a{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    refused(
        client.create_jwt_svid(jwt_request(&many)).await,
        Code::InvalidArgument,
        "at most 16",
    );
    let long = "a".repeat(257);
    refused(
        client.create_jwt_svid(jwt_request(&[&long])).await,
        Code::InvalidArgument,
        "256-byte limit",
    );
    // No SVID presented: a join token is no proof for a JWT-SVID.
    refused(
        h.client().await.create_jwt_svid(jwt_request(&["db"])).await,
        Code::Unauthenticated,
        "TLS client certificate",
    );
    // An expired SVID.
    let (short, _) = h
        .svid(&h.id("demo", "short"), Some(Duration::from_secs(1)))
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    refused(
        h.client_presenting(&short)
            .await
            .create_jwt_svid(jwt_request(&["db"]))
            .await,
        Code::Unauthenticated,
        "expired",
    );
    // A revoked ID: its current SVID gets no JWT-SVID.
    h.control_plane
        .revocations
        .revoke(&id, "test", SystemTime::now(), HOUR)
        .await
        .unwrap();
    refused(
        client.create_jwt_svid(jwt_request(&["db"])).await,
        Code::PermissionDenied,
        "revoked",
    );
    assert_eq!(h.control_plane.metrics.jwt_svids_issued.get(), 0);
    h.stop().await;
}
