//! The control plane under connection floods, as an attacker without credentials (threat model
//! A5) would try them: idle TLS connections on the gRPC listener, from one address and from
//! many, well over --max-connections, and request heads sent a byte a second to the injector
//! webhook. Meanwhile a real `latchctl cert request`, a renewal, a discovery stream and an
//! AdmissionReview are served in their normal time; the flood's connections are closed by the
//! budgets and counted in latch_control_connections_refused_total.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use latch_control::ControlPlane;
use latch_control::tls_incoming::AcceptLimits;
use latch_control::webhook::{WEBHOOK_DNS_NAME, WebhookConfig};
use latch_identity::client::{CaClient, connect_channel, control_plane_id};
use latch_identity::tls::{ALPN_H2, client_config, placeholder_server_name};
use latch_identity::{CertStore, ExpectedPeer, SpiffeId, SpiffeServerVerifier, Svid};
use latch_proto::discovery::DeltaDiscoveryRequest;
use latch_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use latch_proto::envoy::config::core::v3::Node;
use latch_proto::type_url::MESH_CONFIG;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

/// The bound every served call must meet under the flood (they take milliseconds without it).
const SERVED_WITHIN: Duration = Duration::from_secs(5);

async fn start(limits: AcceptLimits, dir: &Path) -> ControlPlane {
    let mut config = latch_testkit::loopback_config(dir.join("data"));
    config.limits = limits;
    config.webhook = Some(WebhookConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        inject: latch_inject::InjectConfig {
            image: "registry.test/latch:9.9.9".into(),
            control_plane: "latch-control.latch-system.svc:15010".into(),
            trust_domain: latch_testkit::TRUST_DOMAIN.into(),
            ..latch_inject::InjectConfig::default()
        },
        configuration: "latch-sidecar-injector".into(),
    });
    ControlPlane::start(config)
        .await
        .expect("control plane starts")
}

fn refused(cp: &ControlPlane, listener: &'static str, reason: &'static str) -> u64 {
    cp.metrics.connections_refused(listener, reason)
}

fn workload(cp: &ControlPlane, name: &str) -> SpiffeId {
    SpiffeId::workload(cp.ca.trust_domain(), "demo", name).unwrap()
}

/// A TCP connection from `source` (a 127.0.0.x address) to `addr`.
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    socket.connect(addr).await
}

/// The client TLS config of a caller with no certificate (a join-token caller, or an
/// attacker), or presenting `svid`.
fn grpc_tls(cp: &ControlPlane, svid: Option<&Svid>) -> rustls::ClientConfig {
    let bundle = cp.ca.bundle().as_ref().clone();
    let store = Arc::new(match svid {
        Some(svid) => {
            let copy = Svid::new(svid.chain().to_vec(), svid.private_key().clone_key()).unwrap();
            CertStore::with_svid(copy, bundle)
        }
        None => CertStore::new(bundle),
    });
    let verifier = Arc::new(SpiffeServerVerifier::new(
        store.clone(),
        ExpectedPeer::Exactly(control_plane_id(cp.ca.trust_domain())),
    ));
    client_config(svid.map(|_| store), verifier, &[ALPN_H2]).unwrap()
}

/// The anchors a client of `cp` holds: its CA's bundle.
fn anchors(cp: &ControlPlane) -> Arc<CertStore> {
    Arc::new(CertStore::new(cp.ca.bundle().as_ref().clone()))
}

/// Completes a TLS handshake with the gRPC listener from `source` and then sends nothing;
/// returns once the server closed the connection (EOF or reset). Err if it never got through
/// the handshake.
async fn idle_tls(
    source: [u8; 4],
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    handshakes: &AtomicU64,
) -> std::io::Result<()> {
    let tcp = connect_from(source, addr).await?;
    let mut conn = TlsConnector::from(tls)
        .connect(placeholder_server_name(), tcp)
        .await?;
    handshakes.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 256];
    // The server's HTTP/2 SETTINGS may arrive; the client never answers.
    while let Ok(n) = conn.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

/// The webhook's TLS client, trusting bundle.pem as the API server does.
fn webhook_tls(cp: &ControlPlane) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&cp.bundle_path).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(latch_identity::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One slow-header connection to the webhook from `source`: a request head sent one byte a
/// second until the server closes the connection.
async fn slow_head(source: [u8; 4], addr: SocketAddr, tls: Arc<rustls::ClientConfig>) {
    let Ok(tcp) = connect_from(source, addr).await else {
        return;
    };
    let name = ServerName::try_from(WEBHOOK_DNS_NAME).unwrap();
    let Ok(conn) = TlsConnector::from(tls).connect(name, tcp).await else {
        return;
    };
    let (mut read, mut write) = tokio::io::split(conn);
    let dribble = async {
        for byte in b"POST /inject HTTP/1.1\r\nHost: latch-control.latch-system.svc\r\n".repeat(8) {
            if write.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let mut buf = [0u8; 256];
    tokio::select! {
        _ = dribble => {}
        _ = read.read(&mut buf) => {}
    }
}

/// An AdmissionReview for a pod creation, POSTed as the API server does (from 127.0.0.1);
/// returns the HTTP status and body.
async fn admission_review(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> (u16, String) {
    let body = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "flood-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "demo"},
                "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "nginx"}]},
            },
            "dryRun": false,
        }
    })
    .to_string();
    let tcp = connect_from([127, 0, 0, 1], addr).await.unwrap();
    let name = ServerName::try_from(WEBHOOK_DNS_NAME).unwrap();
    let mut conn = TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    let head = format!(
        "POST /inject HTTP/1.1\r\nHost: {WEBHOOK_DNS_NAME}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = conn.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).to_string();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

/// A discovery stream: the request side (dropping it ends the stream) and the responses.
type Stream = (
    tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<latch_proto::discovery::DeltaDiscoveryResponse>,
);

/// Opens a discovery stream presenting `svid` and waits for its first MeshConfig.
async fn discovery_stream(cp: &ControlPlane, svid: &Svid) -> Stream {
    let channel = connect_channel(&cp.grpc_addr.to_string(), grpc_tls(cp, Some(svid)), None)
        .await
        .expect("discovery connection");
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    requests
        .send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "demo/mesh-client".into(),
                cluster: String::new(),
            }),
            type_url: MESH_CONFIG.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("discovery stream opens")
        .into_inner();
    let first = responses
        .message()
        .await
        .expect("a response")
        .expect("stream open");
    assert_eq!(first.type_url, MESH_CONFIG);
    (requests, responses)
}

/// Runs `attack` from every source, each connection again 200 ms after it is closed, until
/// `stop` is set.
fn keep_attacking<F, Fut>(
    attacks: &mut JoinSet<()>,
    sources: &[[u8; 4]],
    per_source: usize,
    stop: &Arc<AtomicBool>,
    attack: F,
) where
    F: Fn([u8; 4]) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    for &source in sources {
        for _ in 0..per_source {
            let (stop, attack) = (stop.clone(), attack.clone());
            attacks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    attack(source).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issuance_renewal_discovery_and_injection_are_served_under_connection_floods() {
    let dir = tempfile::tempdir().unwrap();
    let limits = AcceptLimits {
        max_connections: 64,
        max_per_source: 16,
        ..AcceptLimits::default()
    };
    let cp = start(limits, dir.path()).await;
    let grpc = cp.grpc_addr;
    let webhook = cp.webhook_addr.expect("webhook served");

    // Built (if needed) before the flood, so that the measured time is the request's.
    let latchctl = latch_testkit::binaries::workspace_binary("latchctl");
    // What the legitimate callers hold before the flood: an SVID to renew and open streams with.
    let id = workload(&cp, "web");
    let token = cp
        .tokens
        .create(&id, Duration::from_secs(600), false)
        .await
        .unwrap()
        .token;
    let (svid, _) = CaClient::connect_with(&grpc.to_string(), grpc_tls(&cp, None), anchors(&cp))
        .await
        .unwrap()
        .fetch_svid(None, None, Some(token))
        .await
        .unwrap();

    // 200 idle TLS connections from 127.0.0.2 and 200 from 8 other addresses (25 each), each
    // reopened when closed; 300 slow request heads on the webhook from 127.0.0.3.
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = Arc::new(AtomicU64::new(0));
    let mut attacks = JoinSet::new();
    let idle = {
        let (tls, handshakes) = (Arc::new(grpc_tls(&cp, None)), handshakes.clone());
        move |source| {
            let (tls, handshakes) = (tls.clone(), handshakes.clone());
            async move {
                let _ = idle_tls(source, grpc, tls, &handshakes).await;
            }
        }
    };
    keep_attacking(&mut attacks, &[[127, 0, 0, 2]], 200, &stop, idle.clone());
    let several: Vec<[u8; 4]> = (10..18).map(|i| [127, 0, 0, i]).collect();
    keep_attacking(&mut attacks, &several, 25, &stop, idle);
    let slow = {
        let tls = webhook_tls(&cp);
        move |source| slow_head(source, webhook, tls.clone())
    };
    keep_attacking(&mut attacks, &[[127, 0, 0, 3]], 300, &stop, slow);

    // The flood is on once it has gone through the budgets.
    latch_testkit::until(
        "the flood fills the budgets",
        Duration::from_secs(20),
        || {
            handshakes.load(Ordering::Relaxed) > 2 * limits.max_connections as u64
                && refused(&cp, "grpc", "source_connection_limit") > 0
                && refused(&cp, "grpc", "unauthenticated_evicted") > 0
                && refused(&cp, "webhook", "source_connection_limit") > 0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A real `latchctl cert request` with a join token.
    let token = cp
        .tokens
        .create(&workload(&cp, "api"), Duration::from_secs(600), false)
        .await
        .unwrap()
        .token;
    let out = dir.path().join("api-svid");
    let (grpc_arg, bundle, out_arg) = (
        grpc.to_string(),
        cp.bundle_path.to_str().unwrap().to_string(),
        out.to_str().unwrap().to_string(),
    );
    let started = Instant::now();
    let latchctl = tokio::task::spawn_blocking(move || {
        latch_testkit::binaries::run(
            latchctl,
            &[
                "cert",
                "request",
                "--token",
                &token,
                "--control-plane",
                &grpc_arg,
                "--bundle",
                &bundle,
                "--out",
                &out_arg,
            ],
        )
    })
    .await
    .unwrap();
    let cert_request = started.elapsed();
    assert!(
        latchctl.status.success(),
        "latchctl cert request failed under the flood: {}",
        String::from_utf8_lossy(&latchctl.stderr)
    );

    // A renewal, presenting the SVID.
    let started = Instant::now();
    let renewed = tokio::time::timeout(SERVED_WITHIN, async {
        CaClient::connect_with(&grpc.to_string(), grpc_tls(&cp, Some(&svid)), anchors(&cp))
            .await?
            .fetch_svid(Some(&id), None, None)
            .await
    })
    .await;
    let renewal = started.elapsed();
    let (renewed, _) = renewed
        .expect("renewal answered in time")
        .expect("renewal served under the flood");
    assert_eq!(renewed.id(), &id);

    // A discovery stream's first answer.
    let started = Instant::now();
    let stream = tokio::time::timeout(SERVED_WITHIN, discovery_stream(&cp, &svid))
        .await
        .expect("discovery answered in time");
    let discovery = started.elapsed();

    // An AdmissionReview from the API server's address.
    let started = Instant::now();
    let (status, body) =
        tokio::time::timeout(SERVED_WITHIN, admission_review(webhook, webhook_tls(&cp)))
            .await
            .expect("AdmissionReview answered in time");
    let review = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("flood-1"), "{body}");

    println!(
        "under the flood ({} TLS handshakes by the attacker so far): latchctl cert request \
         {cert_request:?}, renewal {renewal:?}, discovery first response {discovery:?}, \
         AdmissionReview {review:?}",
        handshakes.load(Ordering::Relaxed)
    );
    for reason in [
        "source_connection_limit",
        "unauthenticated_evicted",
        "unauthenticated_limit",
        "first_request_timeout",
        "unauthenticated_lifetime",
        "handshake_timeout",
    ] {
        println!("grpc {reason}: {}", refused(&cp, "grpc", reason));
    }
    println!(
        "webhook source_connection_limit: {}",
        refused(&cp, "webhook", "source_connection_limit")
    );
    assert!(
        cert_request < SERVED_WITHIN,
        "latchctl cert request took {cert_request:?}"
    );
    assert_eq!(cp.metrics.discovery_streams.get(), 1, "the stream is open");
    drop(stream);
    stop.store(true, Ordering::Relaxed);
    attacks.abort_all();
    cp.shutdown().await;
}

/// Opens a silent TLS connection from `source` (presenting `svid`, if any) and returns a task
/// that ends with how long after the handshake the server closed it.
async fn silent(
    cp: &ControlPlane,
    source: [u8; 4],
    svid: Option<&Svid>,
) -> tokio::task::JoinHandle<Duration> {
    let tls = Arc::new(grpc_tls(cp, svid));
    let tcp = connect_from(source, cp.grpc_addr).await.unwrap();
    let mut conn = TlsConnector::from(tls)
        .connect(placeholder_server_name(), tcp)
        .await
        .expect("TLS handshake");
    let started = Instant::now();
    tokio::spawn(async move {
        let mut buf = [0u8; 256];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        started.elapsed()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_unauthenticated_connections_are_closed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let first_request = Duration::from_secs(2);
    let lifetime = Duration::from_secs(4);
    let idle = Duration::from_secs(3);
    let cp = start(
        AcceptLimits {
            max_unauthenticated: Some(2),
            first_request_timeout: first_request,
            unauthenticated_lifetime: lifetime,
            idle_timeout: idle,
            ..AcceptLimits::default()
        },
        dir.path(),
    )
    .await;
    let grpc = cp.grpc_addr.to_string();
    let id = workload(&cp, "web");
    let token = cp
        .tokens
        .create(&id, Duration::from_secs(600), true)
        .await
        .unwrap()
        .token;
    let (svid, _) = CaClient::connect_with(&grpc, grpc_tls(&cp, None), anchors(&cp))
        .await
        .unwrap()
        .fetch_svid(None, None, Some(token.clone()))
        .await
        .unwrap();
    let (_requests, mut stream) = discovery_stream(&cp, &svid).await;
    // The first client's connection is gone once its place is free.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Two silent connections without a certificate fill the unauthenticated budget; a
    // join-token caller from another address closes one of them and is served.
    let silent_a = silent(&cp, [127, 0, 0, 2], None).await;
    let silent_b = silent(&cp, [127, 0, 0, 2], None).await;
    let mut caller = CaClient::connect_with(&grpc, grpc_tls(&cp, None), anchors(&cp))
        .await
        .unwrap();
    caller
        .fetch_svid(None, None, Some(token))
        .await
        .expect("a join-token caller is served with the budget full of silent connections");
    let silent_svid = silent(&cp, [127, 0, 0, 4], Some(&svid)).await;
    let (a, b) = (silent_a.await.unwrap(), silent_b.await.unwrap());
    let (evicted, timed_out) = (a.min(b), a.max(b));
    let authenticated = silent_svid.await.unwrap();
    println!(
        "silent connections closed after: evicted {evicted:?}, without a request {timed_out:?} \
         (no certificate) and {authenticated:?} (with an SVID)"
    );
    assert!(
        evicted < first_request / 2,
        "made room for the caller at once: {evicted:?}"
    );
    assert!(
        timed_out >= first_request - Duration::from_millis(100) && timed_out < first_request * 3
    );
    assert!(
        authenticated >= first_request - Duration::from_millis(100)
            && authenticated < first_request * 3,
        "an SVID does not exempt a connection from sending a request: {authenticated:?}"
    );
    assert_eq!(refused(&cp, "grpc", "unauthenticated_evicted"), 1);
    assert_eq!(refused(&cp, "grpc", "first_request_timeout"), 2);

    // The join-token caller's connection ends at the unauthenticated lifetime, while the
    // discovery stream, authenticated, stays.
    latch_testkit::until(
        "the join-token caller's connection reaches its lifetime",
        lifetime * 2,
        || refused(&cp, "grpc", "unauthenticated_lifetime") == 1,
    )
    .await;
    let next = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(
        next.is_err(),
        "the discovery stream is still open: {next:?}"
    );
    assert_eq!(cp.metrics.discovery_streams.get(), 1);
    let metrics = latch_testkit::admin::request(cp.admin_addr, "GET", "/metrics", None, "")
        .await
        .expect("metrics")
        .1;
    assert!(
        metrics.contains(
            "latch_control_connections_refused_total{listener=\"grpc\",reason=\"unauthenticated_lifetime\"} 1"
        ),
        "{metrics}"
    );
    drop(caller);

    // An authenticated client that renewed and then holds its connection without a request is
    // closed after a whole idle window; the discovery stream, open all along (longer than
    // that window), is not idle and stays.
    let mut renewer = CaClient::connect_with(&grpc, grpc_tls(&cp, Some(&svid)), anchors(&cp))
        .await
        .unwrap();
    renewer.fetch_svid(None, None, None).await.expect("renewal");
    let renewed_at = Instant::now();
    latch_testkit::until(
        "the idle authenticated connection is closed",
        idle * 3,
        || refused(&cp, "grpc", "idle_timeout") == 1,
    )
    .await;
    let closed_after = renewed_at.elapsed();
    println!("idle authenticated connection closed {closed_after:?} after its last request");
    assert!(
        closed_after >= idle - Duration::from_millis(100),
        "{closed_after:?}"
    );
    let next = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(
        next.is_err(),
        "the discovery stream is still open: {next:?}"
    );
    assert_eq!(cp.metrics.discovery_streams.get(), 1);
    assert_eq!(refused(&cp, "grpc", "idle_timeout"), 1, "only the idle one");
    cp.shutdown().await;
}
