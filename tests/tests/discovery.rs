//! Discovery end to end on loopback: a real control plane watching a YAML file, real proxies
//! learning the mesh from it over the delta xDS stream, and traffic between them. Workloads get
//! their own loopback addresses (127.0.0.X), so the proxies route by destination IP exactly as
//! with transparent capture. The network-namespace versions (capture, policies, VIPs) are in
//! netns.rs.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use latch_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use latch_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use latch_proto::{mesh, type_url};
use latch_testkit::Harness;
use latch_testkit::admin::{metric, wait_ready};
use latch_testkit::apps::{Load, call, echo_app};
use latch_testkit::loopback_mesh::{Member, free_port, start_member, workloads_yaml};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yaml_change_reaches_every_connected_proxy() {
    let members: Vec<Member> = ["p1", "p2", "p3"]
        .iter()
        .zip(["127.0.0.21", "127.0.0.22", "127.0.0.23"])
        .map(|(name, ip)| Member {
            name,
            ip,
            mesh_port: free_port(ip),
        })
        .collect();
    let all: Vec<&Member> = members.iter().collect();
    let harness = Harness::start_with_mesh(&workloads_yaml(&all)).await;
    let mut proxies = Vec::new();
    for m in &members {
        proxies.push(start_member(&harness, m, &[]).await);
    }
    let newcomer: IpAddr = "10.9.9.9".parse().unwrap();
    for proxy in &proxies {
        assert!(
            proxy
                .mesh
                .load()
                .peers
                .contains_key(&IpAddr::from([127, 0, 0, 22]))
        );
        assert!(!proxy.mesh.load().peers.contains_key(&newcomer));
    }

    let mut yaml = workloads_yaml(&all);
    yaml.push_str(
        "  - name: newcomer\n    namespace: demo\n    service_account: newcomer\n    ips: [\"10.9.9.9\"]\n",
    );
    let written = Instant::now();
    harness.write_mesh(&yaml);
    for proxy in &proxies {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !proxy.mesh.load().peers.contains_key(&newcomer) {
            assert!(
                Instant::now() < deadline,
                "a proxy did not learn the new workload within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let peer = &proxy.mesh.load().peers[&newcomer];
        assert_eq!(
            peer.id.as_str(),
            "spiffe://cluster.local/ns/demo/sa/newcomer"
        );
        assert_eq!(peer.mesh_port, 15008, "the default mesh port");
    }
    println!(
        "the new workload reached all {} proxies {:?} after the file write",
        proxies.len(),
        written.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_a_control_plane_restart_and_resync_sends_nothing_unchanged() {
    let client = Member {
        name: "client",
        ip: "127.0.0.31",
        mesh_port: free_port("127.0.0.31"),
    };
    let server = Member {
        name: "server",
        ip: "127.0.0.32",
        mesh_port: free_port("127.0.0.32"),
    };
    let policy = "policies:\n  - name: server-callers\n    namespace: demo\n    selector: {app: server}\n    action: ALLOW\n    rules:\n      - principals: [{exact: \"spiffe://cluster.local/ns/demo/sa/client\"}]\n";
    let harness = Harness::start_with_mesh(&(workloads_yaml(&[&client, &server]) + policy)).await;
    let app_port = echo_app(server.ip, "server");
    let server_proxy = start_member(&harness, &server, &[]).await;
    // The explicit listener names the server by address, so every connection is routed through
    // the discovered snapshot: 127.0.0.32 is the server workload's IP.
    let client_proxy = start_member(
        &harness,
        &client,
        &[format!("127.0.0.31:0={}:{app_port}", server.ip)],
    )
    .await;
    let entry = client_proxy.explicit_addrs[0];
    assert_eq!(
        call(entry, "hello").await.expect("first call"),
        "server: hello"
    );

    // Load: back-to-back connections until told to stop; every failure counted.
    let load = Load::start(&[(entry.to_string(), "server")], 1);
    let received = |proxy: &latch_proxy::Proxy| {
        let admin = proxy.admin_addr;
        async move { metric(admin, "latch_proxy_discovery_resources_received", &[]).await }
    };
    let reconnects = |proxy: &latch_proxy::Proxy| {
        let admin = proxy.admin_addr;
        async move { metric(admin, "latch_proxy_discovery_reconnects", &[]).await }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = (received(&client_proxy).await, received(&server_proxy).await);
    let reconnects_before = (
        reconnects(&client_proxy).await,
        reconnects(&server_proxy).await,
    );

    let paused = harness.pause().await;
    let during = load.ok();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        load.ok() > during,
        "no traffic while the control plane was down"
    );
    let harness = paused.resume().await;
    // Both proxies reconnect and resync.
    let deadline = Instant::now() + Duration::from_secs(20);
    while reconnects(&client_proxy).await <= reconnects_before.0
        || reconnects(&server_proxy).await <= reconnects_before.1
        || metric(
            client_proxy.admin_addr,
            "latch_proxy_discovery_connected",
            &[],
        )
        .await
            != 1.0
        || metric(
            server_proxy.admin_addr,
            "latch_proxy_discovery_connected",
            &[],
        )
        .await
            != 1.0
    {
        assert!(Instant::now() < deadline, "the proxies did not resync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, errors) = load.stop().await;
    assert!(
        errors.is_empty(),
        "requests failed around the restart: {errors:?}"
    );
    assert!(ok > 20, "too little traffic to mean anything");
    assert_eq!(
        (received(&client_proxy).await, received(&server_proxy).await),
        before,
        "after the restart the proxies received resources they already had"
    );
    println!("{ok} requests, none failed, across a control-plane restart");
    drop(harness);
}

/// A discovery server under the test's control: it records every request and sends whatever
/// the test queues.
struct ScriptedServer {
    requests: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    responses: Mutex<Option<mpsc::Receiver<Result<DeltaDiscoveryResponse, tonic::Status>>>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for ScriptedServer {
    type DeltaAggregatedResourcesStream =
        ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let mut incoming = request.into_inner();
        let requests = self.requests.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = incoming.message().await {
                let _ = requests.send(r);
            }
        });
        let responses = self
            .responses
            .lock()
            .await
            .take()
            .ok_or_else(|| tonic::Status::unavailable("one stream only"))?;
        Ok(tonic::Response::new(ReceiverStream::new(responses)))
    }
}

fn resource<M: Message>(type_url: &str, name: &str, message: &M) -> Resource {
    let version = format!("v{}", message.encoded_len());
    Resource::of(type_url, name, &version, message)
}

fn response(type_url: &str, nonce: &str, resources: Vec<Resource>) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.to_string(),
        nonce: nonce.to_string(),
        resources,
        system_version_info: format!("version-of-{nonce}"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_resource_is_nacked_and_routing_keeps_the_last_good_snapshot() {
    let harness = Harness::start().await;
    // The scripted server serves TLS with the control plane's identity, signed by the real CA
    // in-process (the certificate service refuses to issue that ID to anyone).
    let svid = latch_control::identity::issue_own(&harness.control_plane.ca).expect("own SVID");
    let bundle = harness.bundle();
    let store = Arc::new(latch_identity::CertStore::with_svid(svid, bundle.clone()));
    let tls = latch_identity::tls::server_config(
        store.clone(),
        Arc::new(latch_identity::SpiffeClientVerifier::new(
            store,
            latch_identity::ClientAuth::Required(latch_identity::ExpectedPeer::TrustDomain(
                harness.trust_domain.clone(),
            )),
        )),
        &[latch_identity::tls::ALPN_H2],
    )
    .expect("server TLS");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tracker = tokio_util::task::TaskTracker::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    let incoming = latch_control::tls_incoming::incoming(
        listener,
        Arc::new(tls),
        latch_control::tls_incoming::AcceptLimits::default(),
        harness.control_plane.ca.clone(),
        harness.control_plane.metrics.clone(),
        &tracker,
        cancel.clone(),
    );
    let (requests_tx, mut requests) = mpsc::unbounded_channel();
    let (responses, responses_rx) = mpsc::channel(16);
    let server = ScriptedServer {
        requests: requests_tx,
        responses: Mutex::new(Some(responses_rx)),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(latch_control::tls_incoming::SeeRequestsLayer)
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned()),
    );

    // Server workload and app on 127.0.0.42; the client proxy routes by its address.
    let server_ip = "127.0.0.42";
    let app_port = echo_app(server_ip, "server");
    let server_member = Member {
        name: "server",
        ip: server_ip,
        mesh_port: free_port(server_ip),
    };
    let server_proxy = {
        let id = harness.id("demo", "server");
        let mut config = harness.mesh_proxy_config(&id, None);
        config.data.inbound = Some(SocketAddr::new(
            server_ip.parse().unwrap(),
            server_member.mesh_port,
        ));
        config.discovery = None;
        latch_testkit::start_proxy(config).await
    };
    let client_id = harness.id("demo", "client");
    let mut config = harness.mesh_proxy_config(&client_id, None);
    config.data.explicit = vec![
        format!("127.0.0.1:0={server_ip}:{app_port}")
            .parse()
            .expect("target"),
    ];
    if let Some(discovery) = config.discovery.as_mut() {
        discovery.address = Some(addr.to_string());
    }
    let client_proxy = latch_testkit::start_proxy(config).await;
    let entry = client_proxy.explicit_addrs[0];

    // The proxy subscribes to every type.
    let mut subscribed = Vec::new();
    while subscribed.len() < type_url::ALL.len() {
        let r = tokio::time::timeout(Duration::from_secs(10), requests.recv())
            .await
            .expect("subscribe requests")
            .expect("stream open");
        subscribed.push(r.type_url);
    }
    // A good first sync: the server workload, no services, no policies, default mesh config.
    let workload = mesh::Workload {
        name: "server".into(),
        namespace: "demo".into(),
        spiffe_id: "spiffe://cluster.local/ns/demo/sa/server".into(),
        ips: vec![server_ip.into()],
        mesh_port: u32::from(server_member.mesh_port),
        labels: Default::default(),
    };
    let mesh_config = mesh::MeshConfig {
        trust_bundle_pem: bundle.to_pem(),
        ..Default::default()
    };
    let first = [
        response(
            type_url::MESH_CONFIG,
            "n1",
            vec![resource(type_url::MESH_CONFIG, "mesh", &mesh_config)],
        ),
        response(
            type_url::WORKLOAD,
            "n2",
            vec![resource(type_url::WORKLOAD, "demo/server", &workload)],
        ),
        response(type_url::SERVICE, "n3", vec![]),
        response(type_url::AUTHORIZATION_POLICY, "n4", vec![]),
    ];
    for r in first {
        responses.send(Ok(r)).await.expect("send");
    }
    let mut acked = Vec::new();
    while acked.len() < 4 {
        let r = tokio::time::timeout(Duration::from_secs(10), requests.recv())
            .await
            .expect("ACKs")
            .expect("stream open");
        assert!(r.error_detail.is_none(), "good resources NACKed: {r:?}");
        acked.push(r.response_nonce);
    }
    assert_eq!(acked, ["n1", "n2", "n3", "n4"]);
    wait_ready(client_proxy.admin_addr, Duration::from_secs(15)).await;
    assert_eq!(call(entry, "one").await.expect("routed"), "server: one");

    // Now a Workload update whose IP is not an address.
    let broken = mesh::Workload {
        ips: vec!["not-an-ip".into()],
        ..workload.clone()
    };
    responses
        .send(Ok(response(
            type_url::WORKLOAD,
            "n5",
            vec![resource(type_url::WORKLOAD, "demo/server", &broken)],
        )))
        .await
        .expect("send");
    let nack = tokio::time::timeout(Duration::from_secs(10), requests.recv())
        .await
        .expect("a NACK")
        .expect("stream open");
    assert_eq!(nack.response_nonce, "n5");
    let detail = nack.error_detail.expect("a NACK carries error_detail");
    assert!(
        detail.message.contains("demo/server") && detail.message.contains("not-an-ip"),
        "the reason names the resource and the problem: {}",
        detail.message
    );
    // The last good snapshot keeps routing.
    assert_eq!(
        client_proxy.mesh.load().peers[&server_ip.parse::<IpAddr>().unwrap()].mesh_port,
        server_member.mesh_port
    );
    for i in 0..5 {
        let text = format!("after-nack-{i}");
        assert_eq!(
            call(entry, &text).await.expect("still routed"),
            format!("server: {text}")
        );
    }
    assert_eq!(
        metric(
            client_proxy.admin_addr,
            "latch_proxy_discovery_responses_rejected",
            &["Workload"]
        )
        .await,
        1.0
    );
    drop(server_proxy);
    cancel.cancel();
}
