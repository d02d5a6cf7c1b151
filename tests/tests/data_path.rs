//! The mTLS data path on loopback (explicit mode): apps speak plain TCP, proxies speak mTLS,
//! the receiving proxy checks the caller's SPIFFE ID. Refusals at the mesh port, a wrong server
//! identity, bad transport headers, rotations under load, authorization and drain.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use latch_identity::{CertStore, ExpectedPeer, SpiffeId, SpiffeServerVerifier, Svid, TrustBundle};
use latch_proxy::metrics::{ConnLabels, FailureLabels};
use latch_proxy::{ExplicitDestination, ExplicitTarget, Proxy};
use latch_testkit::Harness;
use latch_testkit::apps::byte_echo_app;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn outbound(id: &SpiffeId, mesh: SocketAddr, port: u16) -> ExplicitTarget {
    ExplicitTarget {
        listen: "127.0.0.1:0".parse().unwrap(),
        to: ExplicitDestination::Fixed {
            id: id.clone(),
            mesh_addr: mesh,
            target_port: port,
        },
    }
}

/// A server-side proxy (inbound only) and a client-side proxy with one explicit listener to it.
struct Pair {
    server: Proxy,
    client: Proxy,
    server_id: SpiffeId,
    client_id: SpiffeId,
    /// Where the client app connects.
    entry: SocketAddr,
}

async fn pair(h: &Harness, app_port: u16, ttl: Option<Duration>) -> Pair {
    let server_id = h.id("demo", "api");
    let client_id = h.id("demo", "web");
    let server = latch_testkit::start_proxy(h.mesh_proxy_config(&server_id, ttl)).await;
    let mut config = h.proxy_config(&client_id, ttl, None, false);
    config.data.explicit = vec![outbound(&server_id, server.inbound_addr.unwrap(), app_port)];
    let client = latch_testkit::start_proxy(config).await;
    let entry = client.explicit_addrs[0];
    Pair {
        server,
        client,
        server_id,
        client_id,
        entry,
    }
}

async fn roundtrip(entry: SocketAddr, message: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(entry).await?;
    tcp.write_all(message).await?;
    let mut buf = vec![0u8; message.len()];
    tcp.read_exact(&mut buf).await?;
    Ok(buf)
}

fn opened(proxy: &Proxy, direction: &'static str, peer: &SpiffeId) -> u64 {
    proxy
        .metrics
        .connections_opened
        .get_or_create(&ConnLabels {
            direction,
            peer: peer.to_string(),
        })
        .get()
}

/// The handshake-failure count once it reaches `want` (or after 5 s): the proxy counts a failure
/// after sending its alert, so a refused client can finish before the count moves.
async fn settled_failures(
    proxy: &Proxy,
    direction: &'static str,
    reason: &'static str,
    want: u64,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = handshake_failures(proxy, direction, reason);
        if now == want || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn handshake_failures(proxy: &Proxy, direction: &'static str, reason: &'static str) -> u64 {
    proxy
        .metrics
        .handshake_failures
        .get_or_create(&FailureLabels { direction, reason })
        .get()
}

fn refusals(proxy: &Proxy, direction: &'static str, reason: &'static str) -> u64 {
    proxy
        .metrics
        .connections_refused
        .get_or_create(&FailureLabels { direction, reason })
        .get()
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_crosses_mtls_and_each_side_knows_the_other() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    let p = pair(&h, app.port(), None).await;
    assert_eq!(
        roundtrip(p.entry, b"hello through the mesh").await.unwrap(),
        b"hello through the mesh"
    );
    // The server proxy saw the client's SPIFFE ID, the client proxy the server's.
    assert_eq!(opened(&p.server, "inbound", &p.client_id), 1);
    assert_eq!(opened(&p.client, "outbound", &p.server_id), 1);
    p.client.shutdown().await;
    p.server.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_crosses_the_mesh() {
    let h = Harness::start().await;
    let app = latch_testkit::apps::reply_after_eof_app();
    let p = pair(&h, app.port(), None).await;
    let mut tcp = TcpStream::connect(p.entry).await.unwrap();
    tcp.write_all(&[7u8; 100_000]).await.unwrap();
    tcp.shutdown().await.unwrap(); // half-close: the app answers only after EOF
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "got 100000 bytes");
    p.client.shutdown().await;
    p.server.shutdown().await;
    h.stop().await;
}

/// A TLS client that presents `chain`/`key` (or nothing) to `addr` with ALPN latch/1 and sends a
/// valid header; returns whether data came back through.
async fn direct_client(
    addr: SocketAddr,
    bundle: TrustBundle,
    presented: Option<&Svid>,
    header: &[u8],
) -> Result<Vec<u8>, String> {
    let store = Arc::new(CertStore::new(bundle));
    let verifier = Arc::new(SpiffeServerVerifier::new(store, ExpectedPeer::AnyInBundle));
    let builder = rustls::ClientConfig::builder_with_provider(latch_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match presented {
        Some(svid) => builder
            .with_client_auth_cert(svid.chain().to_vec(), svid.private_key().clone_key().into())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"latch/1".to_vec()];
    config.enable_sni = false;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect(latch_identity::tls::placeholder_server_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    // A rejected client certificate surfaces on the first read, not in connect().
    tls.write_all(header).await.map_err(|e| e.to_string())?;
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut buf))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Completes an mTLS handshake with a valid SVID, sends `bytes` as the transport header and
/// nothing else, and returns how long the server took to close the connection.
async fn raw_header(addr: SocketAddr, bundle: TrustBundle, svid: &Svid, bytes: &[u8]) -> Duration {
    let store = Arc::new(CertStore::with_svid(
        Svid::new(svid.chain().to_vec(), svid.private_key().clone_key()).unwrap(),
        bundle,
    ));
    let verifier = Arc::new(SpiffeServerVerifier::new(
        store.clone(),
        ExpectedPeer::AnyInBundle,
    ));
    let config = latch_identity::tls::client_config(Some(store), verifier, &[b"latch/1"]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(latch_identity::tls::placeholder_server_name(), tcp)
        .await
        .unwrap();
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(15), tls.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "server closed the connection: {closed:?}"
    );
    started.elapsed()
}

fn header(port: u16) -> Vec<u8> {
    latch_proxy::transport::TransportHeader { target_port: port }.encode()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mesh_port_refuses_everything_but_valid_svids_of_the_trust_domain() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    let server = latch_testkit::start_proxy(h.mesh_proxy_config(&h.id("demo", "api"), None)).await;
    let inbound = server.inbound_addr.unwrap();
    let hdr = header(app.port());

    // Baseline: a valid SVID of the trust domain gets through.
    let (good, bundle) = h.svid(&h.id("demo", "web"), None).await;
    assert_eq!(
        direct_client(inbound, bundle.clone(), Some(&good), &hdr)
            .await
            .unwrap(),
        b"ping"
    );

    // No client certificate.
    assert!(
        direct_client(inbound, bundle.clone(), None, &hdr)
            .await
            .is_err()
    );
    assert_eq!(
        settled_failures(&server, "inbound", "no_client_cert", 1).await,
        1
    );

    // A valid certificate from another CA.
    let foreign = Harness::start().await;
    let (stranger, _) = foreign.svid(&foreign.id("demo", "web"), None).await;
    assert!(
        direct_client(inbound, bundle.clone(), Some(&stranger), &hdr)
            .await
            .is_err()
    );
    assert_eq!(
        settled_failures(&server, "inbound", "untrusted_cert", 1).await,
        1
    );

    // A certificate of another trust domain, even with its root in the bundle.
    let other_td = Harness::start_with(|c| {
        c.trust_domain = latch_identity::TrustDomain::new("other.example").unwrap()
    })
    .await;
    let token = other_td.token(
        &other_td.id("demo", "web"),
        Duration::from_secs(3600),
        false,
    );
    let (outsider, _) = other_td
        .client()
        .await
        .fetch_svid(None, None, Some(token))
        .await
        .unwrap();
    let mut roots = bundle.roots().to_vec();
    roots.extend(other_td.bundle().roots().iter().cloned());
    server.store().set_bundle(TrustBundle::new(roots).unwrap());
    assert!(
        direct_client(inbound, bundle.clone(), Some(&outsider), &hdr)
            .await
            .is_err()
    );
    assert_eq!(
        settled_failures(&server, "inbound", "unexpected_peer", 1).await,
        1
    );

    // An expired SVID of the right CA.
    let (short, _) = h
        .svid(&h.id("demo", "old"), Some(Duration::from_secs(1)))
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        direct_client(inbound, bundle.clone(), Some(&short), &hdr)
            .await
            .is_err()
    );
    assert_eq!(
        settled_failures(&server, "inbound", "expired_cert", 1).await,
        1
    );

    // A TLS 1.2-only client (openssl), even with a valid SVID.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svid.pem"), good.chain_pem()).unwrap();
    std::fs::write(dir.path().join("svid.key"), good.key_pem()).unwrap();
    let output = Command::new("openssl")
        .args([
            "s_client",
            "-tls1_2",
            "-connect",
            &inbound.to_string(),
            "-alpn",
            "latch/1",
            "-cert",
        ])
        .arg(dir.path().join("svid.pem"))
        .arg("-key")
        .arg(dir.path().join("svid.key"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success() || !stdout.contains("Protocol  : TLSv1.2"),
        "{stdout}"
    );
    assert_eq!(
        settled_failures(&server, "inbound", "incompatible_peer", 1).await,
        1
    );

    // None of the refused clients reached the app.
    let inbound_opened: u64 = [h.id("demo", "web"), h.id("demo", "old")]
        .iter()
        .map(|id| opened(&server, "inbound", id))
        .sum();
    assert_eq!(
        inbound_opened, 1,
        "only the baseline connection was proxied"
    );
    server.shutdown().await;
    foreign.stop().await;
    other_td.stop().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_with_the_wrong_identity_is_refused_by_the_outbound_side() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    // The proxy at the mesh address is "db", but the client expects "api".
    let impostor = latch_testkit::start_proxy(h.mesh_proxy_config(&h.id("demo", "db"), None)).await;
    let expected = h.id("demo", "api");
    let mut config = h.proxy_config(&h.id("demo", "web"), None, None, false);
    config.data.explicit = vec![outbound(
        &expected,
        impostor.inbound_addr.unwrap(),
        app.port(),
    )];
    let client = latch_testkit::start_proxy(config).await;
    let result = roundtrip(client.explicit_addrs[0], b"secret").await;
    assert!(
        result.is_err(),
        "nothing may flow to a server with another identity"
    );
    assert_eq!(
        settled_failures(&client, "outbound", "unexpected_peer", 1).await,
        1
    );
    assert_eq!(opened(&impostor, "inbound", &h.id("demo", "web")), 0);
    client.shutdown().await;
    impostor.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_transport_headers_are_refused_within_the_timeout_without_disturbing_others() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    let p = pair(&h, app.port(), None).await;
    let inbound = p.server.inbound_addr.unwrap();
    let (prober, bundle) = h.svid(&h.id("demo", "prober"), None).await;

    // A healthy long-lived connection through the mesh while the bad ones arrive.
    let mut healthy = TcpStream::connect(p.entry).await.unwrap();
    healthy.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    healthy.read_exact(&mut buf).await.unwrap();

    let oversized = [0xff_u8, 0xff].to_vec();
    let truncated = vec![0x00, 0x03, 0x01];
    let silent = Vec::new();
    let started = Instant::now();
    let (a, b, c) = tokio::join!(
        raw_header(inbound, bundle.clone(), &prober, &oversized),
        raw_header(inbound, bundle.clone(), &prober, &truncated),
        raw_header(inbound, bundle.clone(), &prober, &silent),
    );
    // Oversized: refused at once. Truncated and silent: refused when the 5 s header timeout
    // passes, and not much later.
    assert!(a < Duration::from_secs(1), "{a:?}");
    for waited in [b, c] {
        assert!(
            waited >= Duration::from_secs(4) && waited < Duration::from_secs(8),
            "{waited:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(refusals(&p.server, "inbound", "header_too_long"), 1);
    assert_eq!(
        refusals(&p.server, "inbound", "header_timeout"),
        2,
        "truncated and silent headers time out"
    );

    healthy.write_all(b"two").await.unwrap();
    healthy.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two");
    drop(healthy);
    p.client.shutdown().await;
    p.server.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_s_own_listeners_are_never_a_target() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    let server_id = h.id("demo", "api");
    let server = latch_testkit::start_proxy(h.mesh_proxy_config(&server_id, None)).await;
    let mesh = server.inbound_addr.unwrap();
    // The app next to the server answers; the server's admin and mesh listeners (random
    // ports here, so refused as bound listeners, not as well-known ports) do not.
    let mut config = h.proxy_config(&h.id("demo", "web"), None, None, false);
    config.data.explicit = [app.port(), server.admin_addr.port(), mesh.port()]
        .into_iter()
        .map(|port| outbound(&server_id, mesh, port))
        .collect();
    let client = latch_testkit::start_proxy(config).await;
    let entries = client.explicit_addrs.clone();
    assert_eq!(roundtrip(entries[0], b"app").await.unwrap(), b"app");
    for entry in &entries[1..] {
        let reply = roundtrip(*entry, b"GET /debug/config HTTP/1.0\r\n\r\n").await;
        assert!(
            reply.is_err(),
            "the proxy answered through the tunnel: {reply:?}"
        );
    }
    assert_eq!(refusals(&server, "inbound", "proxy_port"), 2);
    client.shutdown().await;
    server.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_allow_list_denies_other_callers_and_counts_them() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    let server_id = h.id("demo", "api");
    let mut config = h.mesh_proxy_config(&server_id, None);
    config.data.allow = vec![h.id("demo", "frontend")];
    let server = latch_testkit::start_proxy(config).await;
    let mut config = h.proxy_config(&h.id("demo", "web"), None, None, false);
    config.data.explicit = vec![outbound(
        &server_id,
        server.inbound_addr.unwrap(),
        app.port(),
    )];
    let client = latch_testkit::start_proxy(config).await;
    assert!(
        roundtrip(client.explicit_addrs[0], b"let me in")
            .await
            .is_err()
    );
    let denials = server
        .metrics
        .authorization_denials
        .get_or_create(&ConnLabels {
            direction: "inbound",
            peer: h.id("demo", "web").to_string(),
        })
        .get();
    assert_eq!(denials, 1);
    client.shutdown().await;
    server.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn five_rotations_under_load_fail_no_request_and_keep_an_old_connection() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    let p = pair(&h, app.port(), Some(Duration::from_secs(10))).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, entry) = (stop.clone(), ok.clone(), failed.clone(), p.entry);
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match roundtrip(entry, b"request").await {
                    Ok(reply) if reply == b"request" => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let mut long_lived = TcpStream::connect(p.entry).await.unwrap();
    let start_rotations = (
        p.server.metrics.rotations.get(),
        p.client.metrics.rotations.get(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pings = 0u32;
    loop {
        long_lived
            .write_all(b"ping")
            .await
            .expect("long-lived connection writes");
        let mut buf = [0u8; 4];
        long_lived
            .read_exact(&mut buf)
            .await
            .expect("long-lived connection reads");
        pings += 1;
        let rotated = (
            p.server.metrics.rotations.get() - start_rotations.0,
            p.client.metrics.rotations.get() - start_rotations.1,
        );
        if rotated.0 >= 5 && rotated.1 >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "5 rotations of 10 s SVIDs within 60 s: {rotated:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    println!(
        "{} requests, {} pings on the long-lived connection",
        ok.load(Ordering::Relaxed),
        pings
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed across the rotations"
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    p.client.shutdown().await;
    p.server.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_open_connections_and_stops_accepting() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    let p = pair(&h, app.port(), None).await;
    let mut open = TcpStream::connect(p.entry).await.unwrap();
    open.write_all(b"a").await.unwrap();
    let mut buf = [0u8; 1];
    open.read_exact(&mut buf).await.unwrap();

    let entry = p.entry;
    let draining = tokio::spawn(p.client.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New connections are no longer accepted...
    assert!(roundtrip(entry, b"new").await.is_err());
    // ...while the open one keeps working until it closes.
    open.write_all(b"b").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"b");
    assert!(!draining.is_finished());
    drop(open);
    tokio::time::timeout(Duration::from_secs(5), draining)
        .await
        .expect("drain ends once connections close")
        .unwrap();
    p.server.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotate_in_the_mesh_config() {
    // The mesh client configs are cached per expected ID; rotation must not pin an old SVID.
    let h = Harness::start().await;
    let app = byte_echo_app();
    let p = pair(&h, app.port(), Some(Duration::from_secs(4))).await;
    let first = p.client.store().svid().unwrap().info().serial.clone();
    // The store also changes when a bundle (X.509 or JWT) arrives over discovery: wait for
    // the change that is a new SVID.
    let mut changes = p.client.store().subscribe();
    tokio::time::timeout(Duration::from_secs(10), async {
        while p.client.store().svid().unwrap().info().serial == first {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the SVID rotates within 10 s");
    assert_ne!(p.client.store().svid().unwrap().info().serial, first);
    assert_eq!(
        roundtrip(p.entry, b"after rotation").await.unwrap(),
        b"after rotation"
    );
    let valid = p.server.store().valid_svid(SystemTime::now()).is_some();
    assert!(valid);
    p.client.shutdown().await;
    p.server.shutdown().await;
    h.stop().await;
}

fn handshakes(proxy: &Proxy, direction: &'static str, kind: &'static str) -> u64 {
    proxy
        .metrics
        .handshakes
        .get_or_create(&latch_proxy::metrics::HandshakeLabels { direction, kind })
        .get()
}

#[tokio::test(flavor = "multi_thread")]
async fn repeat_connections_resume_until_the_client_rotates() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    let p = pair(&h, app.port(), Some(Duration::from_secs(6))).await;
    for _ in 0..5 {
        assert_eq!(roundtrip(p.entry, b"again").await.unwrap(), b"again");
    }
    assert_eq!(
        handshakes(&p.server, "inbound", "full"),
        1,
        "only the first connection pays for certificates"
    );
    assert_eq!(handshakes(&p.server, "inbound", "resumed"), 4);
    assert_eq!(handshakes(&p.client, "outbound", "resumed"), 4);

    // Once the client's SVID rotates, its tickets from the old identity are not offered. (The
    // store also changes when a bundle arrives: wait for a new serial.)
    let before = p.client.store().svid().unwrap().info().serial.clone();
    let mut changes = p.client.store().subscribe();
    tokio::time::timeout(Duration::from_secs(10), async {
        while p.client.store().svid().unwrap().info().serial == before {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the SVID rotates within 10 s");
    assert_eq!(roundtrip(p.entry, b"after").await.unwrap(), b"after");
    assert_eq!(handshakes(&p.server, "inbound", "full"), 2);
    p.client.shutdown().await;
    p.server.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn session_tickets_die_with_the_server_svid_that_issued_them() {
    use rustls::server::ProducesTickets;
    let h = Harness::start().await;
    let (svid, bundle) = h
        .svid(&h.id("demo", "api"), Some(Duration::from_secs(30)))
        .await;
    let not_after = svid.info().not_after;
    let ticketer =
        latch_proxy::transport::SvidTicketer::new(Arc::new(CertStore::with_svid(svid, bundle)));
    let ticket = ticketer.encrypt(b"session state").unwrap();
    assert!(
        (1..=31).contains(&ticketer.lifetime()),
        "lifetime {} s",
        ticketer.lifetime()
    );
    let before = not_after - Duration::from_secs(1);
    assert_eq!(
        ticketer.decrypt_at(&ticket, before).as_deref(),
        Some(&b"session state"[..])
    );
    assert_eq!(
        ticketer.decrypt_at(&ticket, not_after + Duration::from_secs(1)),
        None
    );
    let mut forged = ticket.clone();
    forged[0] ^= 1;
    assert_eq!(ticketer.decrypt_at(&forged, before), None);
    assert_eq!(ticketer.decrypt_at(&ticket[..4], before), None);
    h.stop().await;
}
