//! The injector webhook over real HTTPS, as the Kubernetes API server uses it: the client trusts
//! only the control plane's bundle.pem (the MutatingWebhookConfiguration's caBundle) and checks
//! the DNS name latch-control.latch-system.svc. An AdmissionReview for a pod comes back with a
//! patch that, applied by an independent JSON Patch implementation, gives exactly what offline
//! injection gives; bad requests get clear 4xx answers; the certificate is one openssl and curl
//! accept for that name, and is renewed before it expires.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use latch_control::webhook::{MAX_BODY, WEBHOOK_DNS_NAME, WebhookConfig};
use latch_control::{Config, ControlPlane};
use latch_inject::InjectConfig;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn inject_config() -> InjectConfig {
    InjectConfig {
        image: "registry.test/latch:9.9.9".into(),
        control_plane: "latch-control.latch-system.svc:15010".into(),
        trust_domain: "cluster.local".into(),
        ..InjectConfig::default()
    }
}

async fn start(data_dir: &Path, ttl: Option<Duration>) -> ControlPlane {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = latch_testkit::loopback_config(data_dir.to_path_buf());
    config.webhook = Some(WebhookConfig {
        listen: any,
        inject: inject_config(),
        configuration: "latch-sidecar-injector".into(),
    });
    if let Some(ttl) = ttl {
        config.ttl.default = ttl;
    }
    ControlPlane::start(config)
        .await
        .expect("control plane starts")
}

/// A TLS client like the API server's: trusts the roots in bundle.pem, verifies `name`.
async fn connect(
    cp: &ControlPlane,
    name: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&cp.bundle_path).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(cp.webhook_addr.expect("webhook is served")).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
}

/// Sends one HTTP/1.1 request; returns the status code and the body.
async fn request(cp: &ControlPlane, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut tls = connect(cp, WEBHOOK_DNS_NAME, &[&rustls::version::TLS13])
        .await
        .expect("TLS handshake with the webhook");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {WEBHOOK_DNS_NAME}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) before reading all of a large body.
    let _ = tls.write_all(body).await;
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let status_line = String::from_utf8_lossy(&response[..split]).to_string();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {status_line}"));
    (status, response[split + 4..].to_vec())
}

fn demo_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "http-client-6f7c9-",
            "namespace": "latch-demo",
            "labels": {"app": "http-client"},
            "annotations": {"latch.dev/exclude-outbound-ports": "5432"},
        },
        "spec": {
            "serviceAccountName": "http-client",
            "containers": [{"name": "client", "image": "busybox:1.36", "command": ["sleep", "infinity"]}],
        },
    })
}

fn admission_review(uid: &str, pod: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "latch-demo",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
        }
    }))
    .unwrap()
}

fn reviews(cp: &ControlPlane, result: &'static str) -> u64 {
    cp.metrics
        .webhook_reviews
        .get_or_create(&latch_control::metrics::ResultLabel { result })
        .get()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_is_injected_over_https_exactly_like_offline_injection() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path(), None).await;

    let (status, body) = request(
        &cp,
        "POST",
        "/inject",
        &admission_review("3f0b7c2e-1", demo_pod()),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let response = &review["response"];
    assert_eq!(response["uid"], "3f0b7c2e-1");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut served = demo_pod();
    json_patch::patch(&mut served, &patch).unwrap();

    let offline = latch_inject::inject(&demo_pod(), &inject_config()).unwrap();
    assert!(offline.skipped.is_none());
    assert_eq!(served, offline.pod);
    // The control plane's settings reached the pod.
    assert_eq!(
        served["spec"]["initContainers"][1]["image"],
        "registry.test/latch:9.9.9"
    );
    assert_eq!(reviews(&cp, "injected"), 1);

    // The pod as the API server would send it again (reinvocation): allowed, no patch.
    let (status, body) = request(
        &cp,
        "POST",
        "/inject",
        &admission_review("3f0b7c2e-2", served),
    )
    .await;
    assert_eq!(status, 200);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["allowed"], true);
    assert!(review["response"].get("patch").is_none());
    assert_eq!(reviews(&cp, "skipped"), 1);

    // A bad annotation: the pod is denied, with the reason, in a 200 AdmissionReview.
    let mut bad = demo_pod();
    bad["metadata"]["annotations"]["latch.dev/exclude-outbound-ports"] = json!("postgres");
    let (status, body) =
        request(&cp, "POST", "/inject", &admission_review("3f0b7c2e-3", bad)).await;
    assert_eq!(status, 200);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["uid"], "3f0b7c2e-3");
    assert_eq!(review["response"]["allowed"], false);
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("\"postgres\" is not a port"), "{message}");
    assert_eq!(reviews(&cp, "refused"), 1);

    // An app container running as the proxy's uid would be exempt from capture: denied.
    let mut shared_uid = demo_pod();
    shared_uid["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 1337});
    let (status, body) = request(
        &cp,
        "POST",
        "/inject",
        &admission_review("3f0b7c2e-4", shared_uid),
    )
    .await;
    assert_eq!(status, 200);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["uid"], "3f0b7c2e-4");
    assert_eq!(review["response"]["allowed"], false);
    assert!(review["response"].get("patch").is_none());
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("container \"client\" runs as uid 1337")
            && message.contains("bypass the mesh"),
        "{message}"
    );
    assert_eq!(reviews(&cp, "refused"), 2);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_client_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path(), None).await;
    let error_of = |body: &[u8]| -> String {
        let value: Value = serde_json::from_slice(body).expect("a JSON error body");
        value["error"].as_str().unwrap().to_string()
    };

    let (status, body) = request(&cp, "POST", "/inject", b"{\"apiVersion\": ").await;
    assert_eq!(status, 400);
    assert!(error_of(&body).contains("not JSON"), "{}", error_of(&body));

    let mut v1beta1: Value = serde_json::from_slice(&admission_review("u", demo_pod())).unwrap();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (status, body) = request(
        &cp,
        "POST",
        "/inject",
        &serde_json::to_vec(&v1beta1).unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        error_of(&body).contains("admission.k8s.io/v1beta1"),
        "{}",
        error_of(&body)
    );

    let (status, body) = request(&cp, "POST", "/inject", &vec![b' '; MAX_BODY + 1]).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));

    let (status, _) = request(&cp, "GET", "/inject", b"").await;
    assert_eq!(status, 405);
    let (status, _) = request(&cp, "POST", "/mutate", b"{}").await;
    assert_eq!(status, 404);
    assert_eq!(reviews(&cp, "invalid"), 3);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_certificate_is_for_the_service_name_and_openssl_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path(), None).await;

    // Another name is refused (TLS 1.2: see the curl test).
    assert!(
        connect(&cp, "latch-control.default.svc", &[&rustls::version::TLS13])
            .await
            .is_err()
    );

    let tls = connect(&cp, WEBHOOK_DNS_NAME, &[&rustls::version::TLS13])
        .await
        .unwrap();
    let chain = tls.get_ref().1.peer_certificates().unwrap().to_vec();
    let leaf = dir.path().join("webhook.pem");
    std::fs::write(
        &leaf,
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::engine::general_purpose::STANDARD.encode(chain[0].as_ref())
        ),
    )
    .unwrap();
    let verify = |hostname: &str| {
        Command::new("openssl")
            .args([
                "verify",
                "-purpose",
                "sslserver",
                "-verify_hostname",
                hostname,
                "-CAfile",
            ])
            .arg(&cp.bundle_path)
            .arg(&leaf)
            .output()
            .expect("openssl is installed")
    };
    let ok = verify(WEBHOOK_DNS_NAME);
    assert!(
        ok.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!verify("latch-control.other.svc").status.success());
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_reaches_the_injector_over_tls13_with_the_bundle_as_ca() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path(), None).await;
    let port = cp.webhook_addr.unwrap().port();
    let review_file = dir.path().join("review.json");
    std::fs::write(&review_file, admission_review("curl-1", demo_pod())).unwrap();
    let curl = |tls: &[&str]| {
        tokio::process::Command::new("curl")
            .args(["--silent", "--show-error", "--fail"])
            .args(tls)
            .arg("--cacert")
            .arg(&cp.bundle_path)
            .arg("--resolve")
            .arg(format!("{WEBHOOK_DNS_NAME}:{port}:127.0.0.1"))
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", review_file.display()))
            .arg(format!("https://{WEBHOOK_DNS_NAME}:{port}/inject"))
            .output()
    };
    // TLS 1.3 only: a client limited to 1.2 gets no answer.
    let old = curl(&["--tlsv1.2", "--tls-max", "1.2"])
        .await
        .expect("curl is installed");
    // curl's exit code 35: the TLS handshake failed.
    assert_eq!(
        old.status.code(),
        Some(35),
        "a TLS 1.2 client was not refused at the handshake: {}",
        String::from_utf8_lossy(&old.stderr)
    );
    let output = curl(&["--tlsv1.3"]).await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let review: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(review["response"]["uid"], "curl-1");
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_certificate_is_renewed_before_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path(), Some(Duration::from_secs(3))).await;
    let serial_and_expiry = || async {
        let tls = connect(&cp, WEBHOOK_DNS_NAME, &[&rustls::version::TLS13])
            .await
            .expect("the webhook's certificate verifies");
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let info = x509_parser::parse_x509_certificate(&leaf).unwrap().1;
        (
            info.raw_serial().to_vec(),
            info.validity().not_after.timestamp(),
        )
    };
    let (first, first_expiry) = serial_and_expiry().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (second, second_expiry) = serial_and_expiry().await;
    assert_ne!(first, second, "the certificate was not renewed");
    assert!(second_expiry > first_expiry);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_is_off_unless_asked_for() {
    use clap::Parser;
    let args = latch_control::Args::try_parse_from(["latch-control"]).unwrap();
    assert!(Config::try_from(args).unwrap().webhook.is_none());
    let args = latch_control::Args::try_parse_from([
        "latch-control",
        "--webhook",
        "0.0.0.0:15017",
        "--trust-domain",
        "prod.example",
    ])
    .unwrap();
    let webhook = Config::try_from(args).unwrap().webhook.unwrap();
    assert_eq!(webhook.listen.port(), 15017);
    assert_eq!(webhook.inject.image, "latch:dev");
    assert_eq!(webhook.inject.trust_domain, "prod.example");
    assert_eq!(
        webhook.inject.control_plane,
        "latch-control.latch-system.svc:15010"
    );
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(latch_testkit::loopback_config(dir.path().to_path_buf()))
        .await
        .unwrap();
    assert!(cp.webhook_addr.is_none());
    cp.shutdown().await;
}
