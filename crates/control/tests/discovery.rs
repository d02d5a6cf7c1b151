//! Delta discovery against a real control plane: proxies are raw ADS streams over TLS with
//! SVIDs from the control plane's own CA, the mesh comes from a real config file edited on
//! disk, and every check is something a proxy or an operator would observe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use latch_control::{Config, ControlPlane};
use latch_identity::client::{CaClient, connect_channel, control_plane_id};
use latch_identity::tls::{ALPN_H2, client_config};
use latch_identity::{CertStore, ExpectedPeer, SpiffeId, SpiffeServerVerifier, Svid, TrustDomain};
use latch_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use latch_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use latch_proto::envoy::config::core::v3::Node;
use latch_proto::google::rpc::Status as RpcStatus;
use latch_proto::mesh::{MeshConfig, Service, Workload};
use latch_proto::type_url::{ALL, AUTHORIZATION_POLICY, MESH_CONFIG, SERVICE, WORKLOAD};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(5);
/// How long a test watches for something that must not happen (well over poll + settle).
const QUIET: Duration = Duration::from_millis(600);

const MESH: &str = "\
workloads:
  - {name: web, namespace: demo, service_account: web, ips: [10.0.0.2], labels: {app: web}}
  - {name: api, namespace: demo, service_account: api, ips: [10.0.0.3], labels: {app: api}}
services:
  - name: api
    namespace: demo
    vips: [10.96.0.10]
    ports: [{port: 80, target_port: 8080}]
    selector: {app: api}
policies:
  - {name: all-demo, namespace: demo, action: ALLOW}
  - name: web-from-ops
    namespace: demo
    selector: {app: web}
    action: ALLOW
    rules:
      - principals: [{prefix: \"spiffe://cluster.local/ns/ops/\"}]
        ports: [8080]
  - {name: api-deny, namespace: demo, selector: {app: api}, action: DENY, rules: [{namespaces: [other]}]}
";

/// A control plane in this process with a config file in a temp dir.
struct Plane {
    cp: ControlPlane,
    dir: tempfile::TempDir,
    config_path: Option<PathBuf>,
    trust_domain: TrustDomain,
}

impl Plane {
    async fn start(yaml: Option<&str>) -> Self {
        Self::start_with(yaml, |_| {}).await
    }

    async fn start_with(yaml: Option<&str>, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = yaml.map(|yaml| {
            let path = dir.path().join("latch.yaml");
            std::fs::write(&path, yaml).unwrap();
            path
        });
        let (cp, trust_domain) = Self::launch(dir.path(), config_path.clone(), adjust).await;
        Self {
            cp,
            dir,
            config_path,
            trust_domain,
        }
    }

    async fn launch(
        dir: &Path,
        config_path: Option<PathBuf>,
        adjust: impl FnOnce(&mut Config),
    ) -> (ControlPlane, TrustDomain) {
        let mut config = latch_testkit::loopback_config(dir.join("data"));
        let trust_domain = config.trust_domain.clone();
        config.config_file = config_path;
        adjust(&mut config);
        let cp = ControlPlane::start(config)
            .await
            .expect("control plane starts");
        (cp, trust_domain)
    }

    /// Stops the control plane and starts it again on the same data dir and config file.
    async fn restart(self) -> Self {
        self.cp.shutdown().await;
        let (cp, _) = Self::launch(self.dir.path(), self.config_path.clone(), |_| {}).await;
        Self { cp, ..self }
    }

    fn id(&self, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::workload(&self.trust_domain, ns, sa).unwrap()
    }

    fn store(&self) -> Arc<CertStore> {
        Arc::new(CertStore::new(self.cp.ca.bundle().as_ref().clone()))
    }

    fn verifier(&self) -> Arc<SpiffeServerVerifier> {
        Arc::new(SpiffeServerVerifier::new(
            self.store(),
            ExpectedPeer::Exactly(control_plane_id(&self.trust_domain)),
        ))
    }

    /// An SVID for `id` from this control plane's CA, through a join token.
    async fn svid(&self, id: &SpiffeId, ttl: Option<Duration>) -> Svid {
        let token = self
            .cp
            .tokens
            .create(id, Duration::from_secs(600), false)
            .await
            .unwrap()
            .token;
        let mut client = CaClient::connect(
            &self.cp.grpc_addr.to_string(),
            self.store(),
            ExpectedPeer::Exactly(control_plane_id(&self.trust_domain)),
            false,
        )
        .await
        .unwrap();
        client.fetch_svid(None, ttl, Some(token)).await.unwrap().0
    }

    /// A discovery client presenting `svid` (or no certificate).
    async fn client(
        &self,
        svid: Option<Svid>,
    ) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
        let store = svid.map(|svid| {
            Arc::new(CertStore::with_svid(
                svid,
                self.cp.ca.bundle().as_ref().clone(),
            ))
        });
        let tls = client_config(store, self.verifier(), &[ALPN_H2]).unwrap();
        let channel = connect_channel(&self.cp.grpc_addr.to_string(), tls, None)
            .await
            .unwrap();
        AggregatedDiscoveryServiceClient::new(channel)
    }

    /// Opens a stream as workload `ns/sa` (a fresh SVID) with node id `node`.
    async fn proxy(&self, ns: &str, sa: &str, node: &str) -> Proxy {
        let svid = self.svid(&self.id(ns, sa), None).await;
        Proxy::open(self.client(Some(svid)).await, node)
            .await
            .expect("stream opens")
    }

    /// Replaces the config file the way editors do: write a new file, rename it over.
    fn edit(&self, yaml: &str) {
        let path = self
            .config_path
            .as_ref()
            .expect("started with a config file");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    async fn admin_get(&self, path: &str) -> (u16, String) {
        latch_testkit::admin::request(self.cp.admin_addr, "GET", path, None, "")
            .await
            .expect("admin API answers")
    }
}

/// One raw delta ADS stream, as a proxy holds it.
struct Proxy {
    node: String,
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

type Versions = BTreeMap<String, String>;

impl Proxy {
    async fn open(
        mut client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
        node: &str,
    ) -> Result<Self, tonic::Status> {
        let (requests, rx) = mpsc::channel(16);
        let responses = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            node: node.to_string(),
            requests,
            responses,
        })
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.requests.send(request).await.expect("stream open");
    }

    async fn subscribe(&self, type_url: &str, initial: Versions) {
        self.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: self.node.clone(),
                cluster: String::new(),
            }),
            type_url: type_url.to_string(),
            initial_resource_versions: initial,
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&self, response: &DeltaDiscoveryResponse, why: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: why.to_string(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }

    /// The next response; fails the test after `WAIT`.
    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        match tokio::time::timeout(WAIT, self.responses.message()).await {
            Ok(Ok(Some(response))) => response,
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(status)) => panic!("stream failed: {status:?}"),
            Err(_) => panic!("no response within {WAIT:?}"),
        }
    }

    /// Waits for the stream to end with an error status, and returns it.
    async fn refused(mut self) -> tonic::Status {
        match tokio::time::timeout(WAIT, self.responses.message()).await {
            Ok(Err(status)) => status,
            Ok(other) => panic!("expected the stream to be refused, got {other:?}"),
            Err(_) => panic!("no refusal within {WAIT:?}"),
        }
    }

    /// Fails the test if a response arrives within `QUIET`.
    async fn expect_quiet(&mut self) {
        if let Ok(next) = tokio::time::timeout(QUIET, self.responses.message()).await {
            panic!("expected no response, got {next:?}");
        }
    }

    /// Subscribes on demand: MeshConfig and policies with the wildcard, Workload and Service
    /// by `names` (none: "*" unsubscribed), holding `initial`; checks one answer per type in
    /// order, ACKs each, and returns them.
    async fn sync_on_demand(
        &mut self,
        names: &[&str],
        initial: &[Versions; 4],
    ) -> Vec<DeltaDiscoveryResponse> {
        for (type_url, held) in ALL.iter().zip(initial) {
            let mut request = DeltaDiscoveryRequest {
                node: Some(Node {
                    id: self.node.clone(),
                    cluster: String::new(),
                }),
                type_url: type_url.to_string(),
                initial_resource_versions: held.clone(),
                ..Default::default()
            };
            if [WORKLOAD, SERVICE].contains(type_url) {
                request.resource_names_subscribe = names.iter().map(|n| n.to_string()).collect();
                if names.is_empty() {
                    request.resource_names_unsubscribe = vec!["*".into()];
                }
            }
            self.send(request).await;
        }
        self.answers().await
    }

    /// One response per type, in the order of `ALL`, each ACKed.
    async fn answers(&mut self) -> Vec<DeltaDiscoveryResponse> {
        let mut responses = Vec::new();
        for type_url in ALL {
            let response = self.recv().await;
            assert_eq!(
                response.type_url, type_url,
                "one response per type, in order"
            );
            self.ack(&response).await;
            responses.push(response);
        }
        responses
    }

    /// Adds and drops on-demand names of Workload and Service; returns the two answers (ACKed).
    async fn look_up(&mut self, add: &[&str], drop: &[&str]) -> [DeltaDiscoveryResponse; 2] {
        let strings = |v: &[&str]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        for type_url in [WORKLOAD, SERVICE] {
            self.send(DeltaDiscoveryRequest {
                type_url: type_url.to_string(),
                resource_names_subscribe: strings(add),
                resource_names_unsubscribe: strings(drop),
                ..Default::default()
            })
            .await;
        }
        let workloads = self.recv().await;
        assert_eq!(workloads.type_url, WORKLOAD);
        self.ack(&workloads).await;
        let services = self.recv().await;
        assert_eq!(services.type_url, SERVICE);
        self.ack(&services).await;
        [workloads, services]
    }

    /// Subscribes to all four types (holding `initial`), checks one answer per type in
    /// order, ACKs each, and returns them.
    async fn sync(&mut self, initial: &[Versions; 4]) -> Vec<DeltaDiscoveryResponse> {
        for (type_url, held) in ALL.iter().zip(initial) {
            self.subscribe(type_url, held.clone()).await;
        }
        self.answers().await
    }
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

fn versions(response: &DeltaDiscoveryResponse) -> Versions {
    response
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

fn decode<M: Message + Default>(response: &DeltaDiscoveryResponse, name: &str) -> M {
    let resource = response
        .resources
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("{name} not in {:?}", names(response)));
    let any = resource.resource.as_ref().expect("resource body");
    assert_eq!(any.type_url, response.type_url);
    M::decode(any.value.as_slice()).unwrap()
}

fn empty() -> [Versions; 4] {
    Default::default()
}

#[tokio::test]
async fn first_sync_serves_every_type_and_the_bundle_without_a_config_file() {
    let plane = Plane::start(None).await;
    let mut proxy = plane.proxy("demo", "web", "demo/web").await;
    let first = proxy.sync(&empty()).await;

    assert_eq!(names(&first[0]), [latch_proto::MESH_CONFIG_NAME]);
    let mesh: MeshConfig = decode(&first[0], latch_proto::MESH_CONFIG_NAME);
    assert_eq!(mesh.trust_bundle_pem, plane.cp.ca.bundle().to_pem());
    assert_eq!(mesh.mtls_mode, 0, "STRICT by default");
    for response in &first[1..] {
        assert!(response.resources.is_empty() && response.removed_resources.is_empty());
        assert!(!response.system_version_info.is_empty());
    }
    let mut nonces: Vec<&str> = first.iter().map(|r| r.nonce.as_str()).collect();
    nonces.sort();
    nonces.dedup();
    assert_eq!(nonces.len(), 4, "every response has its own nonce");
    // ACKs (sent by sync) draw no further responses.
    proxy.expect_quiet().await;

    let (_, metrics) = plane.admin_get("/metrics").await;
    for line in [
        "latch_control_discovery_streams 1",
        "latch_control_discovery_responses_total{type=\"mesh_config\"} 1",
        "latch_control_discovery_responses_total{type=\"authorization_policy\"} 1",
        "latch_control_mesh_generation 0",
    ] {
        assert!(metrics.contains(line), "{line:?} not in\n{metrics}");
    }
    drop(proxy);
    let deadline = Instant::now() + WAIT;
    while plane.cp.metrics.discovery_streams.get() != 0 {
        assert!(Instant::now() < deadline, "closed stream still counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn edits_send_only_the_changed_resources_and_removals() {
    // A 1 s request timeout: the stream must outlive it.
    let plane = Plane::start_with(Some(MESH), |c| c.request_timeout = Duration::from_secs(1)).await;
    let mut proxy = plane.proxy("demo", "web", "demo/web").await;
    let first = proxy.sync(&empty()).await;
    assert_eq!(names(&first[1]), ["demo/api", "demo/web"]);
    assert_eq!(names(&first[2]), ["demo/api"]);
    let service: Service = decode(&first[2], "demo/api");
    assert_eq!(service.endpoints.len(), 1);
    assert_eq!(service.endpoints[0].ip, "10.0.0.3");
    assert_eq!(service.ports[0].target_port, 8080);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A label on web: only web is sent again (api and the service are untouched).
    plane.edit(&MESH.replace("labels: {app: web}", "labels: {app: web, v: \"2\"}"));
    let delta = proxy.recv().await;
    assert_eq!(delta.type_url, WORKLOAD);
    assert_eq!(names(&delta), ["demo/web"]);
    assert!(delta.removed_resources.is_empty());
    assert_ne!(delta.system_version_info, first[1].system_version_info);
    let web: Workload = decode(&delta, "demo/web");
    assert_eq!(web.labels.get("v").map(String::as_str), Some("2"));
    assert_ne!(delta.nonce, first[1].nonce);
    proxy.ack(&delta).await;
    proxy.expect_quiet().await;

    // api goes away: the workload is removed, and the service loses its endpoint.
    let without_api = MESH
        .replace("labels: {app: web}", "labels: {app: web, v: \"2\"}")
        .replace(
            "  - {name: api, namespace: demo, service_account: api, ips: [10.0.0.3], labels: {app: api}}\n",
            "",
        );
    plane.edit(&without_api);
    let removal = proxy.recv().await;
    assert_eq!(removal.type_url, WORKLOAD);
    assert!(removal.resources.is_empty());
    assert_eq!(removal.removed_resources, ["demo/api"]);
    let service_delta = proxy.recv().await;
    assert_eq!(service_delta.type_url, SERVICE);
    let service: Service = decode(&service_delta, "demo/api");
    assert!(service.endpoints.is_empty());
    proxy.expect_quiet().await;
    assert_eq!(plane.cp.metrics.config_reloads("applied"), 2);
}

#[tokio::test]
async fn nack_is_counted_and_nothing_is_resent_until_it_changes() {
    let plane = Plane::start(Some(MESH)).await;
    let svid = plane.svid(&plane.id("demo", "web"), None).await;
    let mut proxy = Proxy::open(plane.client(Some(svid)).await, "demo/web")
        .await
        .unwrap();
    for type_url in ALL {
        proxy.subscribe(type_url, Versions::new()).await;
    }
    let mut workloads = None;
    for _ in 0..4 {
        let response = proxy.recv().await;
        if response.type_url == WORKLOAD {
            proxy.nack(&response, "demo/web: mesh_port 0").await;
            workloads = Some(response);
        } else {
            proxy.ack(&response).await;
        }
    }
    let web = plane.id("demo", "web").to_string();
    let deadline = Instant::now() + WAIT;
    while plane.cp.metrics.nacks(&web) != 1 {
        assert!(Instant::now() < deadline, "NACK not counted for {web}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.expect_quiet().await;

    // An unrelated change (the service) does not bring the rejected workloads back...
    plane.edit(&MESH.replace("target_port: 8080", "target_port: 8081"));
    let delta = proxy.recv().await;
    assert_eq!(delta.type_url, SERVICE);
    proxy.ack(&delta).await;
    proxy.expect_quiet().await;

    // ...a change of a workload sends that workload (only).
    plane.edit(
        &MESH
            .replace("target_port: 8080", "target_port: 8081")
            .replace("ips: [10.0.0.2]", "ips: [10.0.0.2, 10.0.0.12]"),
    );
    let delta = proxy.recv().await;
    assert_eq!(delta.type_url, WORKLOAD);
    assert_eq!(names(&delta), ["demo/web"]);
    assert_ne!(
        versions(&delta)["demo/web"],
        versions(workloads.as_ref().unwrap())["demo/web"]
    );
    let (_, metrics) = plane.admin_get("/metrics").await;
    assert!(
        metrics.contains(&format!(
            "latch_control_discovery_nacks_total{{spiffe_id=\"{web}\"}} 1"
        )),
        "{metrics}"
    );

    // Without a node id, NACKs are counted under the caller's SPIFFE ID all the same.
    let mut anonymous = plane.proxy("demo", "api", "").await;
    anonymous.subscribe(MESH_CONFIG, Versions::new()).await;
    let response = anonymous.recv().await;
    anonymous.nack(&response, "bad bundle").await;
    let id = plane.id("demo", "api").to_string();
    let deadline = Instant::now() + WAIT;
    while plane.cp.metrics.nacks(&id) != 1 {
        assert!(Instant::now() < deadline, "NACK not counted for {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_node_id_that_is_no_workload_name_ends_the_stream_and_reaches_no_metric() {
    let plane = Plane::start(Some(MESH)).await;
    // Under the 1 MiB request limit, so it reaches the node id check.
    let huge = format!("demo/{}", "w".repeat(512 * 1024));
    let forged = "demo/web\nINFO issued SVID spiffe_id=spiffe://cluster.local/ns/x/sa/y";
    for node in [huge.as_str(), forged, "web", "demo/web/x"] {
        let proxy = plane.proxy("demo", "web", node).await;
        proxy.subscribe(MESH_CONFIG, Versions::new()).await;
        let status = proxy.refused().await;
        latch_testkit::harness::assert_status(
            &status,
            tonic::Code::InvalidArgument,
            "is not <namespace>/<name>",
        );
        assert!(
            status.message().len() < 300,
            "the refusal quotes a bounded part of the id: {} bytes",
            status.message().len()
        );
    }
    let (_, metrics) = plane.admin_get("/metrics").await;
    assert!(
        metrics.len() < 64 * 1024,
        "/metrics is {} bytes",
        metrics.len()
    );
    assert!(!metrics.contains("wwwwwwww"), "a node id reached /metrics");
}

#[tokio::test]
async fn reconnecting_with_initial_versions_receives_only_differences_across_a_restart() {
    let plane = Plane::start(Some(MESH)).await;
    let svid_id = plane.id("demo", "web");
    let mut proxy = plane.proxy("demo", "web", "demo/web").await;
    let first = proxy.sync(&empty()).await;
    let held: [Versions; 4] = [
        versions(&first[0]),
        versions(&first[1]),
        versions(&first[2]),
        versions(&first[3]),
    ];
    assert_eq!(held[3].len(), 2, "web sees all-demo and web-from-ops");
    drop(proxy);

    // Same content after a restart: the proxy is told it is in sync, and nothing more.
    let plane = plane.restart().await;
    let svid = plane.svid(&svid_id, None).await;
    let mut proxy = Proxy::open(plane.client(Some(svid)).await, "demo/web")
        .await
        .unwrap();
    for response in proxy.sync(&held).await {
        assert!(
            response.resources.is_empty() && response.removed_resources.is_empty(),
            "{} resent: {:?} {:?}",
            response.type_url,
            names(&response),
            response.removed_resources
        );
    }
    proxy.expect_quiet().await;
    drop(proxy);

    // api removed while the proxy was away: it learns exactly that on reconnect.
    plane.edit(&MESH.replace(
        "  - {name: api, namespace: demo, service_account: api, ips: [10.0.0.3], labels: {app: api}}\n",
        "",
    ));
    let deadline = Instant::now() + WAIT;
    while plane
        .cp
        .mesh
        .snapshot()
        .model
        .workloads
        .contains_key("demo/api")
    {
        assert!(Instant::now() < deadline, "edit not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let svid = plane.svid(&svid_id, None).await;
    let mut proxy = Proxy::open(plane.client(Some(svid)).await, "demo/web")
        .await
        .unwrap();
    let mut stale = held.clone();
    stale[1].insert("demo/gone".into(), "0123456789abcdef".into());
    let again = proxy.sync(&stale).await;
    assert!(again[0].resources.is_empty() && again[0].removed_resources.is_empty());
    assert!(again[1].resources.is_empty());
    assert_eq!(again[1].removed_resources, ["demo/api", "demo/gone"]);
    assert_eq!(
        names(&again[2]),
        ["demo/api"],
        "the service lost its endpoint"
    );
    assert!(again[3].resources.is_empty() && again[3].removed_resources.is_empty());
    proxy.expect_quiet().await;
}

#[tokio::test]
async fn callers_without_a_valid_svid_are_unauthenticated() {
    let plane = Plane::start(Some(MESH)).await;
    let refused = Proxy::open(plane.client(None).await, "demo/web").await;
    let status = refused.err().expect("no client certificate is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // An SVID from another CA of the same trust domain name.
    let foreign = Plane::start(None).await;
    let foreign_svid = foreign.svid(&foreign.id("demo", "web"), None).await;
    let refused = Proxy::open(plane.client(Some(foreign_svid)).await, "demo/web").await;
    let status = refused.err().expect("a foreign CA's SVID is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("trust bundle"), "{status:?}");
    assert_eq!(plane.cp.metrics.discovery_streams.get(), 0);
}

#[tokio::test]
async fn callers_see_only_the_policies_selecting_their_workload() {
    let plane = Plane::start(Some(MESH)).await;
    let mut web = plane.proxy("demo", "web", "demo/web").await;
    let mut api = plane.proxy("demo", "api", "demo/api").await;
    // A caller whose ID no workload has sees no policy at all.
    let mut stranger = plane.proxy("ops", "debug", "").await;
    let web_first = web.sync(&empty()).await;
    let api_first = api.sync(&empty()).await;
    let stranger_first = stranger.sync(&empty()).await;
    assert_eq!(names(&web_first[3]), ["demo/all-demo", "demo/web-from-ops"]);
    assert_eq!(names(&api_first[3]), ["demo/all-demo", "demo/api-deny"]);
    assert!(stranger_first[3].resources.is_empty());
    assert_ne!(
        web_first[3].system_version_info,
        api_first[3].system_version_info
    );
    // Everyone sees every workload and service.
    assert_eq!(names(&stranger_first[1]), ["demo/api", "demo/web"]);

    // web is relabelled app: api: it gains api-deny and loses web-from-ops.
    plane.edit(&MESH.replace("labels: {app: web}", "labels: {app: api}"));
    let workload_delta = web.recv().await;
    assert_eq!(workload_delta.type_url, WORKLOAD);
    web.ack(&workload_delta).await;
    // web now has app: api, so the selector-based service gains it as an endpoint.
    let service_delta = web.recv().await;
    assert_eq!(service_delta.type_url, SERVICE);
    web.ack(&service_delta).await;
    let policy_delta = web.recv().await;
    assert_eq!(policy_delta.type_url, AUTHORIZATION_POLICY);
    assert_eq!(names(&policy_delta), ["demo/api-deny"]);
    assert_eq!(policy_delta.removed_resources, ["demo/web-from-ops"]);
    // api's visible policies did not change: it gets the workload and service deltas only.
    assert_eq!(api.recv().await.type_url, WORKLOAD);
    assert_eq!(api.recv().await.type_url, SERVICE);
    api.expect_quiet().await;
}

#[tokio::test]
async fn a_bad_edit_keeps_the_last_good_model_and_ready_says_why() {
    let plane = Plane::start(Some(MESH)).await;
    let mut proxy = plane.proxy("demo", "web", "demo/web").await;
    proxy.sync(&empty()).await;
    let good = plane.cp.mesh.snapshot();
    assert_eq!(
        plane.admin_get("/ready").await,
        (200, "ready\n".to_string())
    );

    plane.edit(&MESH.replace("ips: [10.0.0.2]", "ips: [10.0.0.x]"));
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let (status, body) = plane.admin_get("/ready").await;
        assert_eq!(status, 200, "the last good model is still served: {body}");
        if body != "ready\n" {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "/ready never reported the bad edit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let path = plane.config_path.as_ref().unwrap().display().to_string();
    let expected = format!(
        "config: {path}: workloads[0].ips[0] \"10.0.0.x\": not an IP address; serving the model loaded at {}",
        latch_identity::svid::format_time(good.loaded_at)
    );
    assert!(body.contains(&expected), "{body:?} lacks {expected:?}");
    assert_eq!(plane.cp.metrics.config_reloads("rejected"), 1);
    assert!(Arc::ptr_eq(&good, &plane.cp.mesh.snapshot()));
    proxy.expect_quiet().await;

    // A good edit is applied and clears the report.
    plane.edit(&MESH.replace("ips: [10.0.0.2]", "ips: [10.0.0.22]"));
    let delta = proxy.recv().await;
    assert_eq!(names(&delta), ["demo/web"]);
    assert_eq!(
        plane.admin_get("/ready").await,
        (200, "ready\n".to_string())
    );
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_is_applied() {
    // Kubernetes mounts: latch.yaml -> ..data/latch.yaml, ..data -> ..v1; an update points
    // ..data at a new directory with one rename.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..v1")).unwrap();
    std::fs::write(root.join("..v1/latch.yaml"), MESH).unwrap();
    std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/latch.yaml", root.join("latch.yaml")).unwrap();
    let plane = Plane::start_with(None, |c| c.config_file = Some(root.join("latch.yaml"))).await;
    let mut proxy = plane.proxy("demo", "web", "demo/web").await;
    let first = proxy.sync(&empty()).await;
    assert_eq!(names(&first[1]), ["demo/api", "demo/web"]);

    std::fs::create_dir(root.join("..v2")).unwrap();
    std::fs::write(
        root.join("..v2/latch.yaml"),
        MESH.replace("ips: [10.0.0.3]", "ips: [10.0.0.33]"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    let delta = proxy.recv().await;
    assert_eq!(delta.type_url, WORKLOAD);
    assert_eq!(names(&delta), ["demo/api"]);
}

#[tokio::test]
async fn the_stream_ends_when_the_callers_svid_expires() {
    let plane = Plane::start(None).await;
    let svid = plane
        .svid(&plane.id("demo", "web"), Some(Duration::from_secs(3)))
        .await;
    let not_after = svid.info().not_after;
    let mut proxy = Proxy::open(plane.client(Some(svid)).await, "demo/web")
        .await
        .unwrap();
    proxy.sync(&empty()).await;
    let end = tokio::time::timeout(WAIT, proxy.responses.message())
        .await
        .expect("stream ends by NotAfter");
    assert!(matches!(end, Ok(None)), "stream ended cleanly: {end:?}");
    let now = std::time::SystemTime::now();
    assert!(
        now + Duration::from_millis(200) >= not_after,
        "ended {:?} before NotAfter",
        not_after.duration_since(now).unwrap_or_default()
    );
}

#[tokio::test]
async fn a_bad_mesh_in_the_config_file_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latch.yaml");
    std::fs::write(
        &path,
        MESH.replace(
            "service_account: api",
            "spiffe_id: \"spiffe://example.org/api\"",
        ),
    )
    .unwrap();
    let mut config = latch_testkit::loopback_config(dir.path().join("data"));
    config.config_file = Some(path.clone());
    let err = ControlPlane::start(config)
        .await
        .err()
        .expect("start-up refused");
    let message = err.to_string();
    assert!(
        message.contains(&format!("config file {}", path.display()))
            && message.contains(
                "workloads[1].spiffe_id \"spiffe://example.org/api\": not in trust domain cluster.local"
            ),
        "{message}"
    );
    assert!(
        !dir.path().join("data/ca").exists() && !dir.path().join("data/bundle.pem").exists(),
        "no CA is created for a config that cannot start"
    );
}

#[tokio::test]
async fn a_large_push_is_split_and_only_its_last_part_carries_the_version() {
    let mut yaml = String::from("workloads:\n");
    for i in 0..400 {
        yaml.push_str(&format!(
            "  - {{name: w{i}, namespace: demo, service_account: w{i}, ips: [\"10.2.{}.{}\"], labels: {{app: w{i}, team: payments}}}}\n",
            i / 256,
            i % 256
        ));
    }
    let plane = Plane::start(Some(&yaml)).await;
    let mut proxy = plane.proxy("demo", "w0", "demo/w0").await;
    for (type_url, held) in ALL.iter().zip(empty()) {
        proxy.subscribe(type_url, held).await;
    }
    let mut parts = Vec::new();
    let mut complete = BTreeMap::new();
    while complete.len() < ALL.len() {
        let response = proxy.recv().await;
        proxy.ack(&response).await;
        if response.type_url == WORKLOAD {
            parts.push(response.clone());
        }
        if !response.system_version_info.is_empty() {
            complete.insert(response.type_url.clone(), response.system_version_info);
        }
    }
    assert!(
        parts.len() > 1,
        "400 workloads should not fit in one response"
    );
    let (last, earlier) = parts.split_last().expect("parts");
    for part in earlier {
        assert_eq!(
            part.system_version_info, "",
            "only the last part has the version"
        );
        assert!(
            part.encoded_len() <= 20 * 1024,
            "{} bytes",
            part.encoded_len()
        );
    }
    assert!(!last.system_version_info.is_empty());
    let mut all: Vec<&str> = parts.iter().flat_map(names).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 400, "every workload exactly once");
    proxy.expect_quiet().await;
}

/// POSTs `path` to the admin API with the admin credential: (status, body).
async fn admin_post(plane: &Plane, path: &str) -> (u16, String) {
    let credential = std::fs::read_to_string(&plane.cp.admin_token_path).unwrap();
    latch_testkit::admin::request(
        plane.cp.admin_addr,
        "POST",
        path,
        Some(credential.trim()),
        "",
    )
    .await
    .expect("admin API answers")
}

#[tokio::test]
async fn a_new_root_is_activated_only_once_every_connected_proxy_acknowledged_it() {
    let plane = Plane::start(None).await;
    let mut proxy = plane.proxy("demo", "web", "demo/web-1").await;
    proxy.sync(&empty()).await;

    let (status, body) = admin_post(&plane, "/v1/ca/rotate/prepare").await;
    assert_eq!(status, 200, "{body}");
    // The MeshConfig with both roots is pushed; this proxy holds it without acknowledging.
    let push = proxy.recv().await;
    assert_eq!(push.type_url, MESH_CONFIG);
    let mesh: MeshConfig = decode(&push, latch_proto::MESH_CONFIG_NAME);
    assert_eq!(mesh.trust_bundle_pem, plane.cp.ca.bundle().to_pem());
    assert_eq!(plane.cp.ca.bundle().roots().len(), 2);

    let (status, body) = admin_post(&plane, "/v1/ca/rotate/activate").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("1 of 1 connected proxies have not acknowledged")
            && body.contains("spiffe://cluster.local/ns/demo/sa/web"),
        "{body}"
    );
    let (_, status_body) = plane.admin_get("/v1/ca").await;
    assert!(
        status_body.contains("\"phase\": \"prepared\""),
        "{status_body}"
    );

    proxy.ack(&push).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = admin_post(&plane, "/v1/ca/rotate/activate").await;
        if status == 200 {
            assert!(body.contains("\"phase\": \"activated\""), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Retiring before the longest leaf lifetime has passed is refused, naming when it may.
    let (status, body) = admin_post(&plane, "/v1/ca/rotate/retire").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("may still anchor live leaves until"),
        "{body}"
    );
}

#[tokio::test]
async fn ready_and_metrics_warn_about_a_root_expiring_within_30_days() {
    // An operator's root (plug-in mode) made by openssl, valid for 10 more days.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (
        dir.path().join("root.crt.pem"),
        dir.path().join("root.key.pem"),
    );
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "10", "-subj", "/CN=Root expiring soon"])
        .args(["-addext", "basicConstraints=critical,CA:true"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .args(["-addext", "subjectAltName=URI:spiffe://cluster.local"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let plane = Plane::start_with(None, |config| {
        config.plugin = Some(latch_control::ca::PluginFiles {
            cert: cert.clone(),
            key: key.clone(),
            chain: None,
            bundle: None,
        });
    })
    .await;
    let (status, body) = plane.admin_get("/ready").await;
    assert_eq!(status, 200, "expiring is not expired: {body}");
    assert!(body.starts_with("ready\nca: root "), "{body}");
    assert!(body.contains("(in 9 days)"), "{body}");
    let (_, metrics) = plane.admin_get("/metrics").await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("latch_control_ca_certificate_expiry_timestamp_seconds{"))
        .unwrap_or_else(|| panic!("no expiry metric in {metrics}"));
    assert!(line.contains("role=\"root\""), "{line}");
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((value - now - 10.0 * 86_400.0).abs() < 120.0, "{line}");

    // A root made by the control plane itself (a year) gets no warning.
    let fresh = Plane::start(None).await;
    assert_eq!(
        fresh.admin_get("/ready").await,
        (200, "ready\n".to_string())
    );
}

#[tokio::test]
async fn a_revoked_proxy_loses_its_stream_and_cannot_open_another() {
    let plane = Plane::start(None).await;
    let id = plane.id("demo", "web");
    let svid = plane.svid(&id, None).await;
    let again = Svid::new(svid.chain().to_vec(), svid.private_key().clone_key()).unwrap();
    let mut proxy = Proxy::open(plane.client(Some(svid)).await, "demo/web")
        .await
        .unwrap();
    proxy.sync(&empty()).await;
    // Another proxy, not revoked, keeps its stream.
    let mut other = plane.proxy("demo", "api", "demo/api").await;
    other.sync(&empty()).await;

    let revoked_at = Instant::now();
    plane
        .cp
        .revocations
        .revoke(
            &id,
            "key leaked",
            std::time::SystemTime::now(),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    // The revocation itself may be pushed first; then the stream ends.
    let status = loop {
        match tokio::time::timeout(WAIT, proxy.responses.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Err(status)) => break status,
            other => panic!("expected the stream to be ended with a status, got {other:?}"),
        }
    };
    eprintln!(
        "stream ended {:?} after the revocation",
        revoked_at.elapsed()
    );
    latch_testkit::harness::assert_status(
        &status,
        tonic::Code::PermissionDenied,
        "spiffe://cluster.local/ns/demo/sa/web was revoked",
    );
    // The unrevoked proxy only hears of the revocation.
    let pushed = other.recv().await;
    assert_eq!(pushed.type_url, MESH_CONFIG);

    // Reconnecting with the same SVID is refused.
    let refused = match Proxy::open(plane.client(Some(again)).await, "demo/web").await {
        Err(status) => status,
        Ok(proxy) => proxy.refused().await,
    };
    latch_testkit::harness::assert_status(
        &refused,
        tonic::Code::PermissionDenied,
        "discovery refused: spiffe://cluster.local/ns/demo/sa/web was revoked",
    );
}

/// MESH with a third workload, db, that web never talks to.
fn mesh_with_db() -> String {
    MESH.replace(
        "services:\n",
        "  - {name: db, namespace: demo, service_account: db, ips: [10.0.0.4], labels: {app: db}}\nservices:\n",
    )
}

#[tokio::test]
async fn an_on_demand_proxy_learns_its_own_workload_then_each_address_it_looks_up() {
    let plane = Plane::start(Some(&mesh_with_db())).await;
    let mut web = plane.proxy("demo", "web", "demo/web").await;
    let first = web.sync_on_demand(&[], &empty()).await;
    assert_eq!(names(&first[0]), [latch_proto::MESH_CONFIG_NAME]);
    assert_eq!(
        names(&first[1]),
        ["demo/web"],
        "only its own workload at start"
    );
    assert!(first[2].resources.is_empty(), "no service at start");
    assert_eq!(names(&first[3]), ["demo/all-demo", "demo/web-from-ops"]);

    // A VIP: the service, and its endpoint workload so the connection can be meshed; the VIP
    // is no workload's address, which the Workload answer says by naming it as removed.
    let [workloads, services] = web.look_up(&["10.96.0.10"], &[]).await;
    assert_eq!(names(&workloads), ["demo/api"]);
    assert_eq!(workloads.removed_resources, ["10.96.0.10"]);
    assert_eq!(names(&services), ["demo/api"]);
    assert!(services.removed_resources.is_empty());
    // An address the mesh does not know: answered as such on both types.
    let [workloads, services] = web.look_up(&["10.0.0.99"], &[]).await;
    assert!(workloads.resources.is_empty() && services.resources.is_empty());
    assert_eq!(workloads.removed_resources, ["10.0.0.99"]);
    assert_eq!(services.removed_resources, ["10.0.0.99"]);
    assert!(
        !workloads.system_version_info.is_empty(),
        "a complete answer"
    );
    // api's own IP, already held through the VIP: sent again, so the lookup has its answer.
    let [workloads, services] = web.look_up(&["10.0.0.3"], &[]).await;
    assert_eq!(names(&workloads), ["demo/api"]);
    assert_eq!(services.removed_resources, ["10.0.0.3"]);
    web.expect_quiet().await;
    assert_eq!(
        plane.cp.metrics.discovery_subscriptions.get(),
        6,
        "three names on each of two types"
    );

    // db changes: web never looked it up and hears nothing.
    let db_relabelled = mesh_with_db().replace("labels: {app: db}", "labels: {app: db, v: \"2\"}");
    plane.edit(&db_relabelled);
    web.expect_quiet().await;
    // api changes: web, subscribed to it, gets it.
    let api_relabelled =
        db_relabelled.replace("labels: {app: api}", "labels: {app: api, v: \"2\"}");
    plane.edit(&api_relabelled);
    let push = web.recv().await;
    assert_eq!(
        (push.type_url.as_str(), names(&push)),
        (WORKLOAD, vec!["demo/api"])
    );
    web.ack(&push).await;
    web.expect_quiet().await;
    // A workload appears at the unknown address web asked about: it is pushed.
    let with_newcomer = api_relabelled.replace(
        "services:\n",
        "  - {name: newcomer, namespace: demo, service_account: newcomer, ips: [10.0.0.99]}\nservices:\n",
    );
    plane.edit(&with_newcomer);
    let push = web.recv().await;
    assert_eq!(
        (push.type_url.as_str(), names(&push)),
        (WORKLOAD, vec!["demo/newcomer"])
    );
    web.ack(&push).await;
    web.expect_quiet().await;

    // Dropping the VIP keeps api (still subscribed by its IP) but drops the service.
    let [workloads, services] = web.look_up(&[], &["10.96.0.10"]).await;
    assert!(workloads.resources.is_empty() && workloads.removed_resources.is_empty());
    assert_eq!(services.removed_resources, ["demo/api"]);
    let [workloads, _] = web.look_up(&[], &["10.0.0.3", "10.0.0.99"]).await;
    assert_eq!(workloads.removed_resources, ["demo/api", "demo/newcomer"]);
    assert_eq!(plane.cp.metrics.discovery_subscriptions.get(), 0);
}

#[tokio::test]
async fn a_policy_change_reaches_only_the_on_demand_proxies_it_selects() {
    let plane = Plane::start(Some(MESH)).await;
    let mut web = plane.proxy("demo", "web", "demo/web").await;
    let mut api = plane.proxy("demo", "api", "demo/api").await;
    web.sync_on_demand(&[], &empty()).await;
    api.sync_on_demand(&[], &empty()).await;
    plane.edit(&MESH.replace("ports: [8080]", "ports: [8081]"));
    let push = web.recv().await;
    assert_eq!(
        (push.type_url.as_str(), names(&push)),
        (AUTHORIZATION_POLICY, vec!["demo/web-from-ops"])
    );
    web.ack(&push).await;
    api.expect_quiet().await;
    web.expect_quiet().await;
}

#[tokio::test]
async fn an_on_demand_proxy_reconnecting_with_its_names_and_versions_receives_nothing_it_has() {
    let plane = Plane::start(Some(MESH)).await;
    let id = plane.id("demo", "web");
    let mut web = plane.proxy("demo", "web", "demo/web").await;
    let first = web.sync_on_demand(&["10.96.0.10"], &empty()).await;
    assert_eq!(names(&first[1]), ["demo/api", "demo/web"]);
    assert_eq!(names(&first[2]), ["demo/api"]);
    let held: [Versions; 4] = [0, 1, 2, 3].map(|i| versions(&first[i]));
    drop(web);

    let plane = plane.restart().await;
    let svid = plane.svid(&id, None).await;
    let mut web = Proxy::open(plane.client(Some(svid)).await, "demo/web")
        .await
        .unwrap();
    let again = web.sync_on_demand(&["10.96.0.10"], &held).await;
    for response in &again {
        assert!(
            response.resources.is_empty(),
            "{} resent",
            response.type_url
        );
    }
    // The subscription is back: a change to the service's endpoint workload is pushed.
    plane.edit(&MESH.replace("labels: {app: api}", "labels: {app: api, v: \"2\"}"));
    let push = web.recv().await;
    assert_eq!(
        (push.type_url.as_str(), names(&push)),
        (WORKLOAD, vec!["demo/api"])
    );
}

#[tokio::test]
async fn on_demand_subscriptions_are_bounded_and_wildcard_only_types_refuse_names() {
    let plane = Plane::start(Some(MESH)).await;
    let mut web = plane.proxy("demo", "web", "demo/web").await;
    web.sync_on_demand(&[], &empty()).await;
    let too_many: Vec<String> = (0..=latch_control::discovery::MAX_SUBSCRIPTIONS_PER_TYPE)
        .map(|i| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256))
        .collect();
    web.send(DeltaDiscoveryRequest {
        type_url: WORKLOAD.into(),
        resource_names_subscribe: too_many,
        ..Default::default()
    })
    .await;
    let status = web.refused().await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    let svid = plane.svid(&plane.id("demo", "web"), None).await;
    let proxy = Proxy::open(plane.client(Some(svid)).await, "demo/web")
        .await
        .unwrap();
    proxy
        .send(DeltaDiscoveryRequest {
            type_url: MESH_CONFIG.into(),
            resource_names_subscribe: vec!["mesh".into()],
            ..Default::default()
        })
        .await;
    let status = proxy.refused().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("wildcard"), "{status:?}");
}

#[tokio::test]
async fn a_workload_appearing_behind_a_subscribed_vip_is_pushed_and_others_are_not() {
    // The service lists its endpoint by address; no workload is there yet.
    let base = "\
workloads:
  - {name: web, namespace: demo, service_account: web, ips: [10.0.0.2], labels: {app: web}}
services:
  - {name: db, namespace: demo, vips: [10.96.0.20], ports: [{port: 5432}], endpoints: [10.0.0.7]}
";
    let plane = Plane::start(Some(base)).await;
    let mut web = plane.proxy("demo", "web", "demo/web").await;
    let first = web.sync_on_demand(&["10.96.0.20"], &empty()).await;
    assert_eq!(names(&first[1]), ["demo/web"]);
    assert_eq!(names(&first[2]), ["demo/db"]);

    // A workload nobody asked about: nothing is sent.
    let elsewhere = base.replace(
        "services:\n",
        "  - {name: other, namespace: demo, service_account: other, ips: [10.0.0.8]}\nservices:\n",
    );
    plane.edit(&elsewhere);
    web.expect_quiet().await;
    // The endpoint's workload is created: the service did not change, but web can now mesh
    // to it, so it is pushed.
    plane.edit(&elsewhere.replace(
        "services:\n",
        "  - {name: db, namespace: demo, service_account: db, ips: [10.0.0.7]}\nservices:\n",
    ));
    let push = web.recv().await;
    assert_eq!(
        (push.type_url.as_str(), names(&push)),
        (WORKLOAD, vec!["demo/db"])
    );
    web.ack(&push).await;
    web.expect_quiet().await;
}
