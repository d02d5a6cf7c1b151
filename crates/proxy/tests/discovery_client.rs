//! The discovery client against a minimal in-test ADS server over plaintext gRPC: what it
//! subscribes to, how it answers good and bad responses, what it keeps, and how it comes back
//! after the server drops the stream.

use std::sync::Arc;
use std::time::Duration;

use latch_identity::client::ClientError;
use latch_identity::{CertStore, Svid, TrustBundle};
use latch_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use latch_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use latch_proto::mesh::{self, mesh_config};
use latch_proto::type_url;
use latch_proxy::{DiscoveryClient, DiscoveryConfig, LocalConfig, MeshState, Metrics, MtlsMode};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

const SELF_ID: &str = "spiffe://cluster.local/ns/demo/sa/web";
const WAIT: Duration = Duration::from_secs(5);

/// One stream as the server sees it: the client's requests, and a sender for responses
/// (dropping it ends the stream).
struct ServerStream {
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl ServerStream {
    async fn request(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("a request within 5 s")
            .expect("stream open")
    }

    /// Sends a response and returns the client's answer to it.
    async fn exchange(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        self.responses
            .send(Ok(response))
            .await
            .expect("stream open");
        self.request().await
    }
}

struct FakeAds {
    streams: mpsc::UnboundedSender<ServerStream>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut incoming = request.into_inner();
        let (requests_tx, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(request)) = incoming.message().await {
                let _ = requests_tx.send(request);
            }
        });
        let (responses, outgoing) = mpsc::channel(16);
        let _ = self.streams.send(ServerStream {
            requests,
            responses,
        });
        Ok(Response::new(ReceiverStream::new(outgoing)))
    }
}

/// A root CA's PEM and an SVID for SELF_ID it signed.
fn ca_and_svid() -> (String, Svid) {
    latch_testkit::certs::ca_and_svid(SELF_ID)
}

fn resource<M: Message>(url: &str, name: &str, message: &M) -> Resource {
    let version = format!("v-{name}-{}", message.encoded_len());
    Resource::of(url, name, &version, message)
}

fn response(
    url: &str,
    nonce: &str,
    resources: Vec<Resource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: format!("sys-{nonce}"),
        type_url: url.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
    }
}

fn workload(name: &str, ip: &str) -> mesh::Workload {
    mesh::Workload {
        name: name.into(),
        namespace: "demo".into(),
        spiffe_id: format!("spiffe://cluster.local/ns/demo/sa/{name}"),
        ips: vec![ip.into()],
        mesh_port: 15008,
        ..mesh::Workload::default()
    }
}

fn assert_ack(answer: &DeltaDiscoveryRequest, url: &str, nonce: &str) {
    assert_eq!(answer.type_url, url);
    assert_eq!(answer.response_nonce, nonce);
    assert_eq!(answer.error_detail, None, "expected an ACK");
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribes_acks_nacks_removes_and_resubscribes_with_what_it_holds() {
    // The server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (streams_tx, mut streams) = mpsc::unbounded_channel();
    let server_stop = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(AggregatedDiscoveryServiceServer::new(FakeAds {
            streams: streams_tx,
        }))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            server_stop.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);

    // The client: an SVID from one CA; the MeshConfig will bring that CA plus a second root.
    let (ca_pem, svid) = ca_and_svid();
    let (next_root_pem, _) = ca_and_svid();
    let store = Arc::new(CertStore::with_svid(
        svid,
        TrustBundle::from_pem(ca_pem.as_bytes()).unwrap(),
    ));
    let mesh_state = Arc::new(MeshState::new(LocalConfig::default()));
    let metrics = Arc::new(Metrics::new());
    let client = Arc::new(DiscoveryClient::new(
        store.clone(),
        mesh_state.clone(),
        metrics.clone(),
        DiscoveryConfig {
            workload_name: Some("demo/web".into()),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            ..DiscoveryConfig::default()
        },
    ));
    let cancel = CancellationToken::new();
    let connect = move || async move {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                addr: addr.to_string(),
                reason: e.to_string(),
            })
    };
    let task = tokio::spawn(client.clone().run_with(connect, "test ADS", cancel.clone()));

    // First stream: four wildcard subscriptions in order, node id = workload name, nothing held.
    let mut stream = tokio::time::timeout(WAIT, streams.recv())
        .await
        .unwrap()
        .unwrap();
    for url in type_url::ALL {
        let subscribe = stream.request().await;
        assert_eq!(subscribe.type_url, url);
        assert_eq!(
            subscribe.node.as_ref().map(|n| n.id.as_str()),
            Some("demo/web")
        );
        assert!(subscribe.resource_names_subscribe.is_empty());
        assert!(subscribe.initial_resource_versions.is_empty(), "{url}");
        assert!(subscribe.response_nonce.is_empty());
    }

    // MeshConfig with a two-root bundle: applied, ACKed, bundle installed.
    let mesh_config = mesh::MeshConfig {
        mtls_mode: mesh_config::MtlsMode::Strict as i32,
        port_mtls: [(9090, mesh_config::MtlsMode::Permissive as i32)].into(),
        trust_bundle_pem: format!("{ca_pem}{next_root_pem}"),
        outbound_policy: mesh_config::OutboundPolicy::Passthrough as i32,
        revocations: vec![],
        jwt_bundle_jwks: String::new(),
    };
    let mesh_resource = resource(type_url::MESH_CONFIG, "mesh", &mesh_config);
    let answer = stream
        .exchange(response(
            type_url::MESH_CONFIG,
            "m1",
            vec![mesh_resource.clone()],
            &[],
        ))
        .await;
    assert_ack(&answer, type_url::MESH_CONFIG, "m1");
    assert_eq!(
        store.bundle().roots().len(),
        2,
        "the new bundle is installed"
    );
    assert_eq!(
        mesh_state.load().settings.mtls_for_port(9090),
        MtlsMode::Permissive
    );

    // Workloads.
    let web = resource(type_url::WORKLOAD, "demo/web", &workload("web", "10.0.0.2"));
    let db = resource(type_url::WORKLOAD, "demo/db", &workload("db", "10.0.0.3"));
    let answer = stream
        .exchange(response(
            type_url::WORKLOAD,
            "w1",
            vec![web.clone(), db.clone()],
            &[],
        ))
        .await;
    assert_ack(&answer, type_url::WORKLOAD, "w1");
    assert_eq!(mesh_state.load().peers.len(), 2);
    assert!(!client.is_synced(), "two types still missing");

    // Empty first responses of the other two types complete the sync.
    for (url, nonce) in [
        (type_url::SERVICE, "s1"),
        (type_url::AUTHORIZATION_POLICY, "p1"),
    ] {
        let answer = stream.exchange(response(url, nonce, vec![], &[])).await;
        assert_ack(&answer, url, nonce);
    }
    assert!(client.is_synced());

    // A malformed workload: NACK with INVALID_ARGUMENT naming it; the snapshot stays.
    let mut broken = workload("cache", "10.0.0.4");
    broken.spiffe_id = "not-an-id".into();
    let answer = stream
        .exchange(response(
            type_url::WORKLOAD,
            "w2",
            vec![
                resource(type_url::WORKLOAD, "demo/cache", &broken),
                resource(type_url::WORKLOAD, "demo/api", &workload("api", "10.0.0.5")),
            ],
            &["demo/db"],
        ))
        .await;
    assert_eq!(answer.response_nonce, "w2");
    let detail = answer.error_detail.expect("a NACK");
    assert_eq!(detail.code, 3);
    assert!(
        detail.message.contains("demo/cache") && detail.message.contains("spiffe_id"),
        "{}",
        detail.message
    );
    let peers = mesh_state.load().peers.clone();
    assert_eq!(peers.len(), 2, "nothing of the rejected response applied");
    assert!(peers.contains_key(&"10.0.0.3".parse().unwrap()));

    // A removal.
    let answer = stream
        .exchange(response(type_url::WORKLOAD, "w3", vec![], &["demo/db"]))
        .await;
    assert_ack(&answer, type_url::WORKLOAD, "w3");
    assert!(
        !mesh_state
            .load()
            .peers
            .contains_key(&"10.0.0.3".parse().unwrap())
    );

    // The server drops the stream: the client keeps its state and comes back with what it
    // holds.
    drop(stream);
    let mut stream = tokio::time::timeout(WAIT, streams.recv())
        .await
        .expect("the client reconnects")
        .unwrap();
    assert_eq!(mesh_state.load().peers.len(), 1, "last good state kept");
    let mut initial = Vec::new();
    for url in type_url::ALL {
        let subscribe = stream.request().await;
        assert_eq!(subscribe.type_url, url);
        initial.push(subscribe.initial_resource_versions);
    }
    assert_eq!(
        initial[0],
        [("mesh".to_string(), mesh_resource.version.clone())].into()
    );
    assert_eq!(
        initial[1],
        [("demo/web".to_string(), web.version.clone())].into()
    );
    assert!(initial[2].is_empty() && initial[3].is_empty());
    assert!(metrics.discovery_reconnects.get() >= 1);
    assert!(client.is_synced(), "sync survives a reconnect");

    cancel.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the client stops when cancelled")
        .unwrap();
    server_stop.cancel();
    let _ = server.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keeps_retrying_while_the_control_plane_has_no_discovery_service() {
    // UNIMPLEMENTED is what the control plane answers before it serves discovery: the client
    // keeps retrying and stays unsynced.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(NoDiscovery))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let (ca_pem, svid) = ca_and_svid();
    let store = Arc::new(CertStore::with_svid(
        svid,
        TrustBundle::from_pem(ca_pem.as_bytes()).unwrap(),
    ));
    let metrics = Arc::new(Metrics::new());
    let client = Arc::new(DiscoveryClient::new(
        store,
        Arc::new(MeshState::new(LocalConfig::default())),
        metrics.clone(),
        DiscoveryConfig {
            workload_name: None,
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(40),
            ..DiscoveryConfig::default()
        },
    ));
    let cancel = CancellationToken::new();
    let connect = move || async move {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                addr: addr.to_string(),
                reason: e.to_string(),
            })
    };
    let task = tokio::spawn(client.clone().run_with(connect, "test", cancel.clone()));
    tokio::time::timeout(WAIT, async {
        while metrics.discovery_reconnects.get() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("three retries");
    assert!(!client.is_synced());
    assert_eq!(
        client.missing_types(),
        ["MeshConfig", "Workload", "Service", "AuthorizationPolicy"]
    );
    cancel.cancel();
    task.await.unwrap();
    stop.cancel();
    let _ = server.await;
}

/// An ADS server that answers every stream with UNIMPLEMENTED, as tonic does for a service a
/// server does not have.
struct NoDiscovery;

#[tonic::async_trait]
impl AggregatedDiscoveryService for NoDiscovery {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("no discovery here"))
    }
}
