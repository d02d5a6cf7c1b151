//! HBONE on loopback (explicit mode, `--hbone` on the client side): application connections
//! to one peer proxy ride as HTTP/2 CONNECT streams on a few pooled mTLS tunnels. What a user
//! sees: bytes, half-close and resets carried per connection; one TLS handshake per tunnel, not
//! per connection (the server's handshake counter); a peer refused per stream; a plain `latch/1`
//! client still served by the same listener.

use std::net::SocketAddr;
use std::time::Duration;

use latch_identity::SpiffeId;
use latch_proxy::metrics::{ConnLabels, HandshakeLabels};
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

/// A server-side proxy and a client-side proxy with `--hbone` and one explicit listener to it.
async fn pair(h: &Harness, app_port: u16, allow: Vec<SpiffeId>, hbone: bool) -> (Proxy, Proxy) {
    let server_id = h.id("demo", "api");
    let mut config = h.mesh_proxy_config(&server_id, None);
    config.data.allow = allow;
    let server = latch_testkit::start_proxy(config).await;
    let mut config = h.proxy_config(&h.id("demo", "web"), None, None, false);
    config.data.explicit = vec![outbound(&server_id, server.inbound_addr.unwrap(), app_port)];
    config.data.hbone = hbone;
    let client = latch_testkit::start_proxy(config).await;
    (server, client)
}

/// Full TLS handshakes the server accepted: one per tunnel (or per latch/1 connection).
fn inbound_handshakes(server: &Proxy) -> u64 {
    ["full", "resumed"]
        .into_iter()
        .map(|kind| {
            server
                .metrics
                .handshakes
                .get_or_create(&HandshakeLabels {
                    direction: "inbound",
                    kind,
                })
                .get()
        })
        .sum()
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

/// `latch_proxy_hbone_tunnels_opened_total` and `latch_proxy_hbone_tunnels_active` for `peer`.
fn tunnel_count(proxy: &Proxy, direction: &'static str, peer: &SpiffeId) -> (u64, i64) {
    let labels = ConnLabels {
        direction,
        peer: peer.to_string(),
    };
    (
        proxy.metrics.tunnels_opened.get_or_create(&labels).get(),
        proxy.metrics.tunnels_active.get_or_create(&labels).get(),
    )
}

async fn roundtrip(tcp: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    tcp.write_all(message).await?;
    let mut buf = vec![0u8; message.len()];
    tcp.read_exact(&mut buf).await?;
    assert_eq!(buf, message);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_connections_ride_on_at_most_ten_tunnels_and_each_is_its_own_stream() {
    latch_proxy::data_path::raise_open_files_limit();
    let h = Harness::start().await;
    let app = byte_echo_app();
    let (server, client) = pair(&h, app.port(), Vec::new(), true).await;
    let entry = client.explicit_addrs[0];
    let mut open = Vec::new();
    for i in 0..1000u32 {
        let mut tcp = TcpStream::connect(entry).await.unwrap();
        roundtrip(&mut tcp, &i.to_be_bytes()).await.unwrap();
        open.push(tcp);
    }
    let tunnels = inbound_handshakes(&server);
    assert!(
        (1..=10).contains(&tunnels),
        "1,000 open connections on {tunnels} tunnels"
    );
    assert_eq!(opened(&server, "inbound", &h.id("demo", "web")), 1000);
    // The tunnel metrics say the same on both sides, under the peer's ID.
    let server_id = h.id("demo", "api");
    let web = h.id("demo", "web");
    assert_eq!(
        tunnel_count(&client, "outbound", &server_id),
        (tunnels, tunnels as i64)
    );
    assert_eq!(
        tunnel_count(&server, "inbound", &web),
        (tunnels, tunnels as i64)
    );
    // Every connection is still its own: each answers with its own bytes.
    for (i, tcp) in open.iter_mut().enumerate().step_by(97) {
        roundtrip(tcp, format!("again {i}").as_bytes())
            .await
            .unwrap();
    }
    // A reset on one stream leaves the others untouched.
    let victim = open.remove(0);
    // SO_LINGER 0: the close is a TCP reset (a zero linger never blocks the drop).
    #[allow(deprecated)]
    victim.set_linger(Some(Duration::ZERO)).unwrap();
    drop(victim);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for tcp in open.iter_mut().take(20) {
        roundtrip(tcp, b"still here").await.unwrap();
    }
    assert_eq!(inbound_handshakes(&server), tunnels, "no new tunnel");
    drop(open);
    client.shutdown().await;
    server.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_server_finishes_open_streams_takes_no_new_ones_and_closes_the_tunnel() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    let (server, client) = pair(&h, app.port(), Vec::new(), true).await;
    let entry = client.explicit_addrs[0];
    let server_id = h.id("demo", "api");
    let mut open = TcpStream::connect(entry).await.unwrap();
    roundtrip(&mut open, b"before").await.unwrap();
    assert_eq!(tunnel_count(&client, "outbound", &server_id), (1, 1));

    // The server drains (SIGTERM does the same): GOAWAY on the tunnel, the listener closed.
    let draining = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    roundtrip(&mut open, b"during the drain").await.unwrap();
    let mut late = TcpStream::connect(entry).await.unwrap();
    assert!(
        roundtrip(&mut late, b"too late").await.is_err(),
        "a new connection was carried by a draining server"
    );

    // The drain ends as soon as the open stream has, well before its 10 s timeout, and the
    // client's tunnel closes with it.
    drop(open);
    tokio::time::timeout(Duration::from_secs(5), draining)
        .await
        .expect("the drain waited for a stream that had ended")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), async {
        while tunnel_count(&client, "outbound", &server_id).1 != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the client still counts a tunnel to the drained server as open");
    client.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_crosses_an_hbone_stream() {
    let h = Harness::start().await;
    let app = latch_testkit::apps::reply_after_eof_app();
    let (server, client) = pair(&h, app.port(), Vec::new(), true).await;
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(client.explicit_addrs[0]).await.unwrap();
        tcp.write_all(&[7u8; 300_000]).await.unwrap();
        tcp.shutdown().await.unwrap(); // the app answers only after EOF
        let mut reply = String::new();
        tcp.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "got 300000 bytes");
    }
    assert_eq!(
        inbound_handshakes(&server),
        1,
        "three connections, one tunnel"
    );
    client.shutdown().await;
    server.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_the_server_does_not_allow_is_refused_per_stream_and_latch1_still_works() {
    let h = Harness::start().await;
    let app = byte_echo_app();
    // Refused: the allow list names someone else. The stream is refused (403), the app's
    // connection closed, the denial counted; the tunnel stays for the next stream.
    let (server, client) = pair(&h, app.port(), vec![h.id("demo", "frontend")], true).await;
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(client.explicit_addrs[0]).await.unwrap();
        assert!(roundtrip(&mut tcp, b"let me in").await.is_err());
    }
    let denials = server
        .metrics
        .authorization_denials
        .get_or_create(&ConnLabels {
            direction: "inbound",
            peer: h.id("demo", "web").to_string(),
        })
        .get();
    assert_eq!(denials, 2);
    assert_eq!(inbound_handshakes(&server), 1);
    client.shutdown().await;
    server.shutdown().await;

    // The same listener serves a client without --hbone (latch/1, one connection each).
    let (server, client) = pair(&h, app.port(), Vec::new(), false).await;
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(client.explicit_addrs[0]).await.unwrap();
        roundtrip(&mut tcp, b"old protocol").await.unwrap();
    }
    assert_eq!(opened(&server, "inbound", &h.id("demo", "web")), 2);
    client.shutdown().await;
    server.shutdown().await;
    h.stop().await;
}

/// SVIDs of 10 s rotate under a load of new connections: each side's rotation, and the client's
/// starts new tunnels (its SVID serial is part of the pool's key) while a stream opened before
/// keeps working on the old one; no request fails.
#[tokio::test(flavor = "multi_thread")]
async fn rotations_move_new_streams_to_new_tunnels_and_fail_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let h = Harness::start().await;
    let app = byte_echo_app();
    let server_id = h.id("demo", "api");
    let ttl = Some(Duration::from_secs(10));
    let server = latch_testkit::start_proxy(h.mesh_proxy_config(&server_id, ttl)).await;
    let mut config = h.proxy_config(&h.id("demo", "web"), ttl, None, false);
    config.data.explicit = vec![outbound(
        &server_id,
        server.inbound_addr.unwrap(),
        app.port(),
    )];
    config.data.hbone = true;
    let client = latch_testkit::start_proxy(config).await;
    let entry = client.explicit_addrs[0];
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = async {
                    let mut tcp = TcpStream::connect(entry).await?;
                    roundtrip(&mut tcp, b"request").await
                }
                .await;
                match result {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let mut long_lived = TcpStream::connect(entry).await.unwrap();
    let rotations = || client.metrics.rotations.get();
    let start = rotations();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while rotations() < start + 2 {
        roundtrip(&mut long_lived, b"ping")
            .await
            .expect("the old stream keeps working");
        assert!(
            tokio::time::Instant::now() < deadline,
            "two rotations of 10 s SVIDs within 40 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A moment for new connections after the last rotation.
    tokio::time::sleep(Duration::from_secs(1)).await;
    roundtrip(&mut long_lived, b"ping").await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(ok.load(Ordering::Relaxed) > 50);
    assert!(
        inbound_handshakes(&server) >= 3,
        "a tunnel per client SVID: {}",
        inbound_handshakes(&server)
    );
    client.shutdown().await;
    server.shutdown().await;
    h.stop().await;
}

/// Writes "hi" to an echo app named `name` through `tcp` and checks the answer.
async fn exchange(tcp: &mut TcpStream, name: &str) -> std::io::Result<()> {
    tcp.write_all(b"hi").await?;
    let mut buf = vec![0u8; name.len() + 4];
    tcp.read_exact(&mut buf).await?;
    assert_eq!(buf, format!("{name}: hi").as_bytes());
    Ok(())
}

/// A policy edit, over discovery, that stops allowing one of two ports closes exactly the
/// streams to that port: the streams to the other port, on the same tunnel, keep working, and
/// no new tunnel is opened.
#[tokio::test(flavor = "multi_thread")]
async fn a_policy_edit_closes_exactly_the_streams_it_denies() {
    use latch_testkit::apps::echo_app;
    use latch_testkit::loopback_mesh::{
        Member, free_port, start_member, start_member_with, workloads_yaml,
    };
    let server = Member {
        name: "server",
        ip: "127.0.0.51",
        mesh_port: free_port("127.0.0.51"),
    };
    let client = Member {
        name: "client",
        ip: "127.0.0.52",
        mesh_port: free_port("127.0.0.52"),
    };
    let (kept, cut) = (echo_app(server.ip, "kept"), echo_app(server.ip, "cut"));
    let policy = |ports: &str| {
        format!(
            "policies:\n  - name: server-callers\n    namespace: demo\n    selector: {{app: server}}\n    action: ALLOW\n    rules:\n      - principals: [{{exact: \"spiffe://cluster.local/ns/demo/sa/client\"}}]\n        ports: [{ports}]\n"
        )
    };
    let members = workloads_yaml(&[&server, &client]);
    let h = Harness::start_with_mesh(&(members.clone() + &policy(&format!("{kept}, {cut}")))).await;
    let server_proxy = start_member(&h, &server, &[]).await;
    let client_proxy = start_member_with(
        &h,
        &client,
        &[
            format!("127.0.0.52:0={}:{kept}", server.ip),
            format!("127.0.0.52:0={}:{cut}", server.ip),
        ],
        None,
        |config| config.data.hbone = true,
    )
    .await;
    let mut to_kept = Vec::new();
    let mut to_cut = Vec::new();
    for _ in 0..5 {
        let mut tcp = TcpStream::connect(client_proxy.explicit_addrs[0])
            .await
            .unwrap();
        exchange(&mut tcp, "kept").await.unwrap();
        to_kept.push(tcp);
        let mut tcp = TcpStream::connect(client_proxy.explicit_addrs[1])
            .await
            .unwrap();
        exchange(&mut tcp, "cut").await.unwrap();
        to_cut.push(tcp);
    }
    assert_eq!(
        inbound_handshakes(&server_proxy),
        1,
        "ten streams, one tunnel"
    );

    h.write_mesh(&(members + &policy(&kept.to_string())));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for tcp in &mut to_cut {
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("a denied stream is closed within 10 s of the edit");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }
    for tcp in &mut to_kept {
        exchange(tcp, "kept")
            .await
            .expect("an allowed stream is untouched");
    }
    let mut tcp = TcpStream::connect(client_proxy.explicit_addrs[1])
        .await
        .unwrap();
    assert!(
        exchange(&mut tcp, "cut").await.is_err(),
        "new streams to the port are denied"
    );
    assert_eq!(inbound_handshakes(&server_proxy), 1, "the tunnel stayed");
    client_proxy.shutdown().await;
    server_proxy.shutdown().await;
    h.stop().await;
}

/// A meshed peer with a valid SVID speaking HBONE by hand: it cannot use the tunnel as a relay
/// (a CONNECT to another address, or to one of the proxy's own ports, is 403), a request that is
/// not CONNECT is 405; a CONNECT to the app's port on the
/// workload's address is 200. Each refusal leaves the tunnel usable.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_cannot_use_a_tunnel_as_a_relay_or_reach_the_proxy() {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let h = Harness::start().await;
    let app = byte_echo_app();
    let (server, client) = pair(&h, app.port(), Vec::new(), false).await;
    let server_id = h.id("demo", "api");
    let tls = latch_proxy::transport::MeshTls::new(client.store().clone(), h.trust_domain.clone())
        .unwrap();
    let mesh = server.inbound_addr.unwrap();
    let tcp = TcpStream::connect(mesh).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls.tunnel_client(&server_id).unwrap())
        .connect(tls.session_name(&server_id), tcp)
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut ask = async |method: hyper::Method, authority: &str| {
        let request = hyper::Request::builder()
            .method(method)
            .uri(authority)
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender
            .send_request(request)
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let admin_port = server.admin_addr.port();
    assert_eq!(
        ask(hyper::Method::CONNECT, "10.9.9.9:80").await,
        403,
        "another host"
    );
    assert_eq!(
        ask(hyper::Method::CONNECT, "127.0.0.2:80").await,
        403,
        "another local address"
    );
    assert_eq!(
        ask(hyper::Method::CONNECT, &format!("127.0.0.1:{admin_port}")).await,
        403,
        "the proxy's admin port"
    );
    assert_eq!(
        ask(
            hyper::Method::CONNECT,
            &format!("127.0.0.1:{}", mesh.port())
        )
        .await,
        403,
        "the proxy's own mesh port"
    );
    assert_eq!(
        ask(
            hyper::Method::GET,
            &format!("http://127.0.0.1:{}/", app.port())
        )
        .await,
        405
    );
    assert_eq!(
        ask(hyper::Method::CONNECT, &format!("127.0.0.1:{}", app.port())).await,
        200,
        "the app, after every refusal, on the same tunnel"
    );
    client.shutdown().await;
    server.shutdown().await;
    h.stop().await;
}
