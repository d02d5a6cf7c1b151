//! Discovery end to end on loopback: a real control plane watching a YAML file, real proxies
//! learning the mesh from it over the delta xDS stream, and traffic between them. Workloads get
//! their own loopback addresses (127.0.0.X), so the proxies route by destination IP exactly as
//! with transparent capture. The network-namespace versions (capture, policies, VIPs) are in
//! netns.rs; the on-demand tests here use them too, since a destination never heard of is one
//! the app connects to through the capture, not one named by a flag.

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
use latch_testkit::loopback_mesh::{
    Member, free_port, start_member, start_member_with, workloads_yaml,
};
use latch_testkit::netns::{Pod, PodControlPlane, TestNet, logs, require_netns_with};
use latch_testkit::spiffe_id;
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
    // p1 subscribes to the whole mesh (--discovery-wildcard); p2 and p3 learn on demand and
    // are configured to reach 10.9.9.9:80, an address the mesh does not know yet.
    let mut proxies = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let proxy = if i == 0 {
            start_member_with(&harness, m, &[], None, |config| {
                if let Some(discovery) = config.discovery.as_mut() {
                    discovery.wildcard = true;
                }
            })
            .await
        } else {
            start_member(&harness, m, &[format!("{}:0=10.9.9.9:80", m.ip)]).await
        };
        proxies.push(proxy);
    }
    let newcomer: IpAddr = "10.9.9.9".parse().unwrap();
    let p2: IpAddr = [127, 0, 0, 22].into();
    assert!(
        proxies[0].mesh.load().peers.contains_key(&p2),
        "the wildcard proxy knows every workload"
    );
    assert!(
        proxies[1].mesh.load().peers.contains_key(&p2),
        "a proxy knows its own workload"
    );
    assert!(
        !proxies[2].mesh.load().peers.contains_key(&p2),
        "an on-demand proxy does not learn workloads it never asked for"
    );
    for proxy in &proxies {
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

/// A mesh config listing `pods` (demo/<pod>, service account and label app = the pod's name)
/// at their addresses, then `rest`.
fn pods_yaml(pods: &[(&str, &Pod)], rest: &str) -> String {
    let mut out = String::from("workloads:\n");
    for (name, pod) in pods {
        out.push_str(&format!(
            "  - name: {name}\n    namespace: demo\n    service_account: {name}\n    ips: [\"{}\"]\n    labels: {{app: {name}}}\n",
            pod.ip()
        ));
    }
    out + rest
}

/// What the proxy in `pod` knows of the mesh (its /debug/config, read on the pod's loopback).
fn known(pod: &Pod) -> serde_json::Value {
    let text = pod
        .curl("http://127.0.0.1:15020/debug/config")
        .unwrap_or_else(|e| panic!("/debug/config of {}: {e}", pod.name));
    serde_json::from_str(&text).expect("/debug/config is JSON")
}

#[test]
fn a_first_connection_to_a_destination_never_heard_of_is_meshed() {
    if !require_netns_with(&["tshark"]) {
        return;
    }
    const BODY: &str = "served by b, on-demand-marker";
    let net = TestNet::new("ondemand");
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let c = net.add_pod("c");
    let nginx = b.start_nginx(BODY);
    let mut control = PodControlPlane::start_with(&net, &pods_yaml(&[("a", &a), ("b", &b)], ""));
    let proxy_b = control.mesh_discovered(&b);
    let proxy_a = control.mesh_discovered(&a);
    let logs = || logs(&[&proxy_a, &proxy_b, &nginx, &control.process]);
    let b_ip = b.ip().to_string();
    assert!(
        known(&a)["workloads"].get(&b_ip).is_none(),
        "a's proxy knew b before any connection: {}",
        known(&a)
    );

    let capture = b.capture();
    let reply = a.curl(&format!("http://{b_ip}/"));
    let pcap = capture.stop();
    assert_eq!(reply.as_deref(), Ok(BODY), "{}", logs());
    pcap.assert_mesh_only(15008, 80, BODY);
    let b_label = format!("peer=\"{}\"", spiffe_id("b"));
    let a_label = format!("peer=\"{}\"", spiffe_id("a"));
    assert_eq!(
        a.proxy_metric(
            "latch_proxy_tcp_connections_opened",
            &["direction=\"outbound\"", &b_label]
        ),
        1.0,
        "the first connection went over mTLS to b's identity\n{}",
        logs()
    );
    assert_eq!(
        b.proxy_metric(
            "latch_proxy_tcp_connections_opened",
            &["direction=\"inbound\"", &a_label]
        ),
        1.0,
        "{}",
        logs()
    );
    assert_eq!(
        a.proxy_metric("latch_proxy_discovery_lookups", &["result=\"found\""]),
        1.0
    );
    assert_eq!(
        known(&a)["workloads"][&b_ip]["spiffe_id"],
        spiffe_id("b"),
        "{}",
        known(&a)
    );

    // An address the mesh does not know: answered as such, and the connection passes
    // through (the outbound policy) in plain TCP to c, unmeshed.
    let plain = c.start_nginx_on(&["80"], "served by c in clear");
    let reply = a.curl(&format!("http://{}/", c.ip()));
    assert_eq!(reply.as_deref(), Ok("served by c in clear"), "{}", logs());
    assert_eq!(
        a.proxy_metric("latch_proxy_discovery_lookups", &["result=\"not_found\""]),
        1.0
    );
    // Answered once: the next connection does not ask again.
    assert_eq!(
        a.curl(&format!("http://{}/", c.ip())).as_deref(),
        Ok("served by c in clear")
    );
    assert_eq!(
        a.proxy_metric("latch_proxy_discovery_lookups", &["result=\"not_found\""]),
        1.0
    );
    assert_eq!(
        a.proxy_metric("latch_proxy_discovery_lookups", &["result=\"timeout\""]),
        0.0
    );

    // The control plane goes away. What a's proxy knows keeps routing (b meshed, c in clear),
    // but an address it never asked about is refused rather than sent in clear: it might be a
    // meshed peer (d here is merely unknown to the mesh, and never reached).
    let d = net.add_pod("d");
    let d_nginx = d.start_nginx_on(&["80"], "served by d in clear");
    assert!(
        control.process.interrupt(Duration::from_secs(10)),
        "latch-control stops"
    );
    let logs = || latch_testkit::netns::logs(&[&proxy_a, &proxy_b, &nginx, &d_nginx]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a.proxy_metric("latch_proxy_discovery_connected", &[]) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a's proxy never saw the stream end\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        a.curl(&format!("http://{b_ip}/")).as_deref(),
        Ok(BODY),
        "{}",
        logs()
    );
    assert_eq!(
        a.curl(&format!("http://{}/", c.ip())).as_deref(),
        Ok("served by c in clear")
    );
    let refused = a.curl(&format!("http://{}/", d.ip()));
    assert!(refused.is_err(), "d was reached in clear: {refused:?}");
    assert_eq!(
        a.proxy_metric(
            "latch_proxy_discovery_lookups",
            &["result=\"discovery_down\""]
        ),
        1.0
    );
    assert_eq!(
        a.proxy_metric(
            "latch_proxy_tcp_connections_refused",
            &["reason=\"discovery_unanswered\""]
        ),
        1.0,
        "{}",
        logs()
    );
    drop(plain);
}

#[test]
fn a_destination_that_moves_is_followed_by_the_next_connection() {
    if !require_netns_with(&[]) {
        return;
    }
    const VIP: &str = "10.96.0.10";
    let net = TestNet::new("moves");
    let a = net.add_pod("a");
    let home = net.add_pod("web");
    let away = net.add_pod("web2");
    let servers = [
        home.start_nginx("served in the first pod"),
        away.start_nginx("served in the second pod"),
    ];
    let service = format!(
        "services:\n  - name: web\n    namespace: demo\n    vips: [\"{VIP}\"]\n    ports: [{{port: 80, target_port: 80}}]\n    selector: {{app: web}}\n"
    );
    let control =
        PodControlPlane::start_with(&net, &pods_yaml(&[("a", &a), ("web", &home)], &service));
    let proxy_home = control.mesh_discovered(&home);
    // The workload's next home runs a proxy with the same identity, demo/web.
    let proxy_away = control.start_proxy_as(&away, "web", &[]);
    control.capture(&away);
    let proxy_a = control.mesh_discovered(&a);
    let logs = || {
        logs(&[
            &proxy_a,
            &proxy_home,
            &proxy_away,
            &servers[0],
            &servers[1],
            &control.process,
        ])
    };
    let url = format!("http://{VIP}/");
    assert_eq!(
        a.curl(&url).as_deref(),
        Ok("served in the first pod"),
        "{}",
        logs()
    );

    // demo/web moves: its IP is now the second pod's.
    let applied =
        |pod: &Pod| pod.proxy_metric("latch_proxy_discovery_responses_applied", &["Workload"]);
    let before = applied(&a);
    control.write_config(&pods_yaml(&[("a", &a), ("web", &away)], &service));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while applied(&a) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "a's proxy never heard that web moved\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        a.curl(&url).as_deref(),
        Ok("served in the second pod"),
        "{}",
        logs()
    );
    let web_label = format!("peer=\"{}\"", spiffe_id("web"));
    assert_eq!(
        a.proxy_metric(
            "latch_proxy_tcp_connections_opened",
            &["direction=\"outbound\"", &web_label]
        ),
        2.0,
        "both connections were meshed to web's identity\n{}",
        logs()
    );
    assert_eq!(
        away.proxy_metric(
            "latch_proxy_tcp_connections_opened",
            &["direction=\"inbound\""]
        ),
        1.0
    );
}
