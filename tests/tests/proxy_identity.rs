//! latch-proxy keeps its identity alive: rotation with short TTLs and hot swap under open
//! connections, riding out a control plane outage, the SPIFFE Workload API as a third-party
//! client sees it, and proof that the private key never travels.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use latch_identity::{
    CertStore, ClientAuth, ExpectedPeer, SpiffeClientVerifier, SpiffeServerVerifier, SvidInfo,
};
use latch_proto::ca::certificate_service_server::CertificateService;
use latch_testkit::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

/// A TLS echo server presenting whatever SVID `store` holds at each handshake.
async fn echo_server(store: Arc<CertStore>) -> std::net::SocketAddr {
    let verifier = SpiffeClientVerifier::new(
        store.clone(),
        ClientAuth::Required(ExpectedPeer::AnyInBundle),
    );
    let config = latch_identity::tls::server_config(store, Arc::new(verifier), &[b"test"]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 64];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn connect(addr: std::net::SocketAddr, client: &Arc<CertStore>) -> TlsStream<TcpStream> {
    let verifier = SpiffeServerVerifier::new(client.clone(), ExpectedPeer::AnyInBundle);
    let config =
        latch_identity::tls::client_config(Some(client.clone()), Arc::new(verifier), &[b"test"])
            .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(latch_identity::tls::placeholder_server_name(), tcp)
        .await
        .unwrap()
}

async fn echo(tls: &mut TlsStream<TcpStream>, message: &[u8]) {
    tls.write_all(message).await.unwrap();
    let mut buf = vec![0u8; message.len()];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, message);
}

fn presented_serial(tls: &TlsStream<TcpStream>) -> String {
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("server presented a certificate");
    SvidInfo::from_leaf(&certs[0]).unwrap().serial
}

fn current_serial(store: &CertStore) -> String {
    store.svid().expect("svid").info().serial.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_second_svids_rotate_and_open_connections_survive() {
    let h = Harness::start().await;
    let id = h.id("demo", "web");
    let proxy = h
        .start_proxy(&id, Some(Duration::from_secs(10)), None)
        .await;
    let store = proxy.store().clone();
    let addr = echo_server(store.clone()).await;

    // A client with its own SVID from the same CA.
    let client_id = h.id("demo", "client");
    let (client_svid, bundle) = h.svid(&client_id, None).await;
    let client = Arc::new(CertStore::with_svid(client_svid, bundle));

    let mut before = connect(addr, &client).await;
    echo(&mut before, b"before the first rotation").await;
    let mut serials = vec![current_serial(&store)];
    assert_eq!(presented_serial(&before), serials[0]);

    let mut changes = store.subscribe();
    while serials.len() < 4 {
        tokio::time::timeout(Duration::from_secs(15), changes.changed())
            .await
            .expect("a rotation within 15 s of a 10 s TTL")
            .unwrap();
        let serial = current_serial(&store);
        assert!(
            !serials.contains(&serial),
            "each rotation brings a new serial"
        );
        serials.push(serial.clone());
        // A new handshake presents the current SVID.
        let mut fresh = connect(addr, &client).await;
        assert_eq!(presented_serial(&fresh), serial);
        echo(&mut fresh, b"new connection").await;
        assert_eq!(store.svid().unwrap().id(), &id);
    }
    // The connection opened before the first rotation still carries data after the third.
    echo(&mut before, b"after the third rotation").await;
    assert!(proxy.metrics.rotations.get() >= 4);
    proxy.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_outage_keeps_the_svid_and_renewal_resumes() {
    let h = Harness::start().await;
    let id = h.id("demo", "api");
    let ttl = Duration::from_secs(20);
    // /ready is checked below; discovery would hold it at 503 against this control plane.
    let proxy =
        latch_testkit::start_proxy(h.proxy_config_without_discovery(&id, Some(ttl), false)).await;
    let store = proxy.store().clone();
    let first = store.svid().unwrap();
    let renew_at = proxy.agent.next_rotation().expect("a renewal is planned");

    let paused = h.pause().await;
    // Stay down past the planned renewal (one rotation interval) and a few retries.
    tokio::time::sleep(
        renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            + Duration::from_secs(3),
    )
    .await;
    let failures = proxy.metrics.failures("unavailable");
    assert!(failures >= 2, "failed attempts are counted: {failures}");
    let held = store.svid().unwrap();
    assert_eq!(
        held.info().serial,
        first.info().serial,
        "the proxy keeps its SVID"
    );
    assert!(
        store.valid_svid(SystemTime::now()).is_some(),
        "and it is still valid"
    );
    let (ready, _) = latch_testkit::admin::get(&proxy.admin_addr.to_string(), "/ready")
        .await
        .unwrap();
    assert_eq!(ready, 200, "/ready stays true while the SVID is valid");

    let h = paused.resume().await;
    let resumed_at = std::time::Instant::now();
    let mut changes = store.subscribe();
    // The backoff cap for a 20 s SVID is 2 s; allow it plus the reconnect.
    tokio::time::timeout(Duration::from_secs(4), changes.changed())
        .await
        .expect("renewed within one backoff period of the control plane's return")
        .unwrap();
    assert_ne!(current_serial(&store), first.info().serial);
    println!(
        "renewed {:?} after the control plane came back",
        resumed_at.elapsed()
    );
    proxy.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_svid_fails_closed_and_the_token_brings_the_proxy_back() {
    let h = Harness::start().await;
    let id = h.id("demo", "batch");
    let config = h.proxy_config_without_discovery(&id, Some(Duration::from_secs(3)), true);
    let proxy = latch_testkit::start_proxy(config).await;
    let store = proxy.store().clone();
    let addr = echo_server(store.clone()).await;
    let client_token = h.token(&h.id("demo", "client"), Duration::from_secs(3600), false);
    let (client_svid, bundle) = h
        .client()
        .await
        .fetch_svid(None, None, Some(client_token))
        .await
        .unwrap();
    let client = Arc::new(CertStore::with_svid(client_svid, bundle));
    let admin = proxy.admin_addr.to_string();

    let paused = h.pause().await;
    let expired_at = store.svid().unwrap().info().not_after;
    tokio::time::sleep(
        expired_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            + Duration::from_millis(1500),
    )
    .await;
    let (status, body) = latch_testkit::admin::get(&admin, "/ready").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("expired"), "{body}");
    // New handshakes fail closed: the server has nothing to present.
    let verifier = SpiffeServerVerifier::new(client.clone(), ExpectedPeer::AnyInBundle);
    let config =
        latch_identity::tls::client_config(Some(client.clone()), Arc::new(verifier), &[b"test"])
            .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(latch_identity::tls::placeholder_server_name(), tcp)
        .await;
    assert!(
        handshake.is_err(),
        "a proxy with an expired SVID must not complete handshakes"
    );

    // Back: the expired SVID cannot be renewed, so the reusable join token is used.
    let h = paused.resume().await;
    let mut changes = store.subscribe();
    tokio::time::timeout(Duration::from_secs(6), changes.changed())
        .await
        .expect("new SVID")
        .unwrap();
    assert!(store.valid_svid(SystemTime::now()).is_some());
    assert_eq!(
        latch_testkit::admin::get(&admin, "/ready").await.unwrap().0,
        200
    );
    let mut conn = connect(addr, &client).await;
    echo(&mut conn, b"serving again").await;
    proxy.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spiffe_library_client_fetches_and_follows_the_svid() {
    let h = Harness::start().await;
    let id = h.id("demo", "spiffe-aware");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let proxy = h
        .start_proxy(&id, Some(Duration::from_secs(10)), Some(socket.clone()))
        .await;
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the socket is owner-only");

    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let first = contexts.next().await.unwrap().unwrap();
    let svid = first.default_svid().expect("an SVID").clone();
    assert_eq!(svid.spiffe_id().to_string(), id.to_string());
    // Validate what the library parsed against the bundle it received.
    let td = spiffe::TrustDomain::new("cluster.local").unwrap();
    let bundle = first
        .bundle_set()
        .get(&td)
        .expect("bundle for cluster.local");
    let roots = bundle
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec().into())
        .collect();
    let bundle = latch_identity::TrustBundle::new(roots).unwrap();
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec().into())
        .collect();
    let info = latch_identity::verify_svid(
        &chain,
        &bundle,
        SystemTime::now(),
        latch_identity::PeerRole::Client,
    )
    .unwrap();
    assert_eq!(info.serial, current_serial(proxy.store()));
    // The key the library got is the SVID's key.
    assert_eq!(
        svid.private_key().as_ref(),
        proxy
            .store()
            .svid()
            .unwrap()
            .private_key()
            .secret_pkcs8_der()
    );

    // After a rotation the stream delivers the next SVID.
    let next = tokio::time::timeout(Duration::from_secs(15), contexts.next())
        .await
        .expect("next SVID within 15 s")
        .unwrap()
        .unwrap();
    let next_leaf = next.default_svid().unwrap().leaf().as_bytes().to_vec();
    let next_info = SvidInfo::from_leaf(&next_leaf).unwrap();
    assert_ne!(next_info.serial, info.serial);
    assert_eq!(next_info.id, id);

    // The bundles stream answers too.
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&td).is_some());

    // Without the security header: InvalidArgument.
    let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower_service_for(socket.clone()))
        .await
        .unwrap();
    let mut raw =
        latch_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let status = raw
        .fetch_x509svid(latch_proto::workload::X509svidRequest {})
        .await
        .expect_err("no security header");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("workload.spiffe.io"),
        "{}",
        status.message()
    );
    // JWT-SVIDs: the audience is required (INVALID_ARGUMENT, as the spec says), another
    // SPIFFE ID than the workload's is PERMISSION_DENIED, and a token for the workload's ID
    // comes back for an audience.
    fn with_header<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        request
    }
    let jwt_request = |audience: &[&str], spiffe_id: &str| {
        with_header(latch_proto::workload::JwtsvidRequest {
            audience: audience.iter().map(|a| a.to_string()).collect(),
            spiffe_id: spiffe_id.into(),
        })
    };
    let status = raw.fetch_jwtsvid(jwt_request(&[], "")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = raw
        .fetch_jwtsvid(jwt_request(
            &["x"],
            "spiffe://cluster.local/ns/demo/sa/other",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let svids = raw
        .fetch_jwtsvid(jwt_request(&["x"], &id.to_string()))
        .await
        .unwrap()
        .into_inner()
        .svids;
    assert_eq!(svids.len(), 1);
    assert_eq!(svids[0].spiffe_id, id.to_string());
    let validate = |svid: &str, audience: &str| {
        with_header(latch_proto::workload::ValidateJwtsvidRequest {
            audience: audience.into(),
            svid: svid.into(),
        })
    };
    let status = raw
        .validate_jwtsvid(validate("not.a.jwt", "x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = raw
        .validate_jwtsvid(validate(&svids[0].svid, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let valid = raw
        .validate_jwtsvid(validate(&svids[0].svid, "x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(valid.spiffe_id, id.to_string());
    assert!(valid.claims.unwrap().fields.contains_key("exp"));

    proxy.shutdown().await;
    assert!(!socket.exists(), "the socket is removed on shutdown");
    h.stop().await;
}

fn tower_service_for(
    socket: std::path::PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_| {
        let socket = socket.clone();
        async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(socket).await?,
            ))
        }
    })
}

/// A certificate service that records every request it receives, then lets the real one answer.
struct Recording {
    inner: latch_control::certificate_service::CertificateServer,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

#[tonic::async_trait]
impl CertificateService for Recording {
    async fn create_certificate(
        &self,
        request: tonic::Request<latch_proto::ca::CreateCertificateRequest>,
    ) -> Result<tonic::Response<latch_proto::ca::CreateCertificateResponse>, tonic::Status> {
        self.seen
            .lock()
            .unwrap()
            .push(prost::Message::encode_to_vec(request.get_ref()));
        self.inner.create_certificate(request).await
    }

    async fn create_jwt_svid(
        &self,
        request: tonic::Request<latch_proto::ca::CreateJwtSvidRequest>,
    ) -> Result<tonic::Response<latch_proto::ca::CreateJwtSvidResponse>, tonic::Status> {
        self.inner.create_jwt_svid(request).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_private_key_never_reaches_the_ca() {
    let h = Harness::start().await;
    let cp = &h.control_plane;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = Recording {
        inner: latch_control::certificate_service::CertificateServer::new(
            cp.ca.clone(),
            cp.jwt.clone(),
            cp.tokens.clone(),
            cp.revocations.clone(),
            Default::default(),
            None,
            cp.metrics.clone(),
        ),
        seen: seen.clone(),
    };
    // Serve the recording service with the control plane's own TLS set-up.
    let tracker = tokio_util::task::TaskTracker::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    let identity =
        latch_control::identity::serving_identity(&cp.ca, &tracker, cancel.clone()).unwrap();
    let tls = latch_identity::tls::server_config(
        identity.clone(),
        Arc::new(SpiffeClientVerifier::new(identity, ClientAuth::Deferred)),
        &[latch_identity::tls::ALPN_H2],
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = latch_control::tls_incoming::incoming(
        listener,
        Arc::new(tls),
        Default::default(),
        cp.ca.clone(),
        cp.metrics.clone(),
        &tracker,
        cancel.clone(),
    );
    let server = tonic::transport::Server::builder()
        .layer(latch_control::tls_incoming::SeeRequestsLayer)
        .add_service(
            latch_proto::ca::certificate_service_server::CertificateServiceServer::new(service),
        )
        .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
    tracker.spawn(async move { server.await.unwrap() });

    let id = h.id("demo", "secretive");
    let token = h.token(&id, Duration::from_secs(3600), false);
    let config = latch_proxy::Config {
        agent: latch_proxy::AgentConfig {
            control_plane: addr.to_string(),
            control_plane_id: ExpectedPeer::Exactly(latch_identity::client::control_plane_id(
                &h.trust_domain,
            )),
            credential: latch_proxy::Credential::JoinToken(token),
            ttl: Some(Duration::from_secs(10)),
        },
        bundle: h.bundle(),
        workload_api: None,
        admin: "127.0.0.1:0".parse().unwrap(),
        app_probes: Default::default(),
        data: latch_proxy::DataPathConfig::none(h.trust_domain.clone()),
        discovery: None,
    };
    let proxy = latch_proxy::Proxy::start(config).await.unwrap();
    assert!(proxy.wait_for_svid(Duration::from_secs(10)).await);
    // Wait for one renewal too, so both kinds of request were seen.
    let mut changes = proxy.store().subscribe();
    tokio::time::timeout(Duration::from_secs(15), changes.changed())
        .await
        .unwrap()
        .unwrap();

    let svid = proxy.store().svid().unwrap();
    let pkcs8 = svid.private_key().secret_pkcs8_der().to_vec();
    // The P-256 private scalar: the 32-byte OCTET STRING after ECPrivateKey's version (02 01 01).
    let at = pkcs8
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("EC private key")
        + 5;
    let scalar = pkcs8[at..at + 32].to_vec();
    let requests = seen.lock().unwrap().clone();
    assert!(
        requests.len() >= 2,
        "first issuance and a renewal were recorded"
    );
    for request in &requests {
        assert!(
            !request.windows(pkcs8.len()).any(|w| w == pkcs8),
            "PKCS#8 key sent"
        );
        assert!(
            !request.windows(32).any(|w| w == scalar),
            "private scalar sent"
        );
    }
    // What was sent for the current SVID is a CSR carrying its public key.
    let last: latch_proto::ca::CreateCertificateRequest =
        prost::Message::decode(requests.last().unwrap().as_slice()).unwrap();
    let csr = latch_identity::csr::verify_csr(&last.csr).unwrap();
    let leaf = x509_parser::parse_x509_certificate(&svid.chain()[0])
        .unwrap()
        .1;
    assert_eq!(csr.public_key_spki, leaf.public_key().raw);

    proxy.shutdown().await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    h.stop().await;
}
