//! The xDS (discovery) client: one delta ADS stream to the control plane over mTLS (the proxy's
//! SVID), subscribing to MeshConfig, Workload, Service and AuthorizationPolicy; nonces, ACKs and
//! NACKs (`DiscoveryClient::handle`), reconnects with capped, jittered backoff. On demand (the
//! default), Workload and Service are subscribed by address: the configured destinations at
//! start, then each address the data path leaves in `Demand`, dropped again once idle. Each response is
//! converted into `latch_mesh` types as a whole (`apply`, through `latch_mesh::from_resource`),
//! then applied (`MeshState` rebuilt and swapped, trust bundle installed, ACK) or rejected (NACK
//! with every reason, previous state kept). Owned by `Proxy`; the admin server reads its sync.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use latch_identity::bundle::BundleError;
use latch_identity::client::ClientError;
use latch_identity::{CertStore, ExpectedPeer, PeerRole, SpiffeId, SvidError, TrustBundle};
use latch_mesh::{MeshConfig, MeshError, from_resource};
use latch_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use latch_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use latch_proto::envoy::config::core::v3::Node;
use latch_proto::type_url;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::metrics::{Metrics, TypeLabel};
use crate::state::{CheckedMeshConfig, DemandConfig, Discovered, Held, MeshState};

/// gRPC status code INVALID_ARGUMENT, sent in a NACK's error_detail.
const INVALID_ARGUMENT: i32 = 3;

/// Discovery settings; the control plane's address and ID are the identity agent's.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// "<namespace>/<name>" of this proxy's workload (`--workload-name`); sent as node id.
    pub workload_name: Option<String>,
    /// Where the discovery server listens when it is not the control plane's certificate
    /// service address (`--discovery-address`); it must present the control plane's ID.
    pub address: Option<String>,
    /// First wait before reconnecting; doubles up to `max_backoff` (±jitter), reset after a
    /// stream that applied a response.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Subscribe to every workload and service of the mesh (`--discovery-wildcard`) instead of
    /// looking destinations up on demand.
    pub wildcard: bool,
    /// Timeouts of on-demand lookups.
    pub demand: DemandConfig,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            workload_name: None,
            address: None,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            wildcard: false,
            demand: DemandConfig::default(),
        }
    }
}

/// How often idle on-demand subscriptions are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Connect(#[from] ClientError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("control plane refused the discovery stream ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("control plane ended the discovery stream")]
    Ended,
}

impl From<tonic::Status> for DiscoveryError {
    fn from(status: tonic::Status) -> Self {
        DiscoveryError::Refused {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// The short name of a type URL, for logs and metric labels.
pub fn type_name(type_url: &str) -> &'static str {
    match type_url {
        type_url::MESH_CONFIG => "MeshConfig",
        type_url::WORKLOAD => "Workload",
        type_url::SERVICE => "Service",
        type_url::AUTHORIZATION_POLICY => "AuthorizationPolicy",
        _ => "unknown",
    }
}

/// How a stream ended.
#[derive(Debug)]
pub struct StreamEnd {
    /// Responses applied on this stream.
    pub applied: usize,
    /// Why it ended; `None` when cancelled.
    pub error: Option<DiscoveryError>,
}

/// The discovery client.
pub struct DiscoveryClient {
    store: Arc<CertStore>,
    mesh: Arc<MeshState>,
    metrics: Arc<Metrics>,
    config: DiscoveryConfig,
    /// Everything applied so far; kept across streams.
    discovered: Mutex<Discovered>,
    /// Types whose first response has been applied.
    synced_types: Mutex<BTreeSet<&'static str>>,
    synced: AtomicBool,
}

impl DiscoveryClient {
    pub fn new(
        store: Arc<CertStore>,
        mesh: Arc<MeshState>,
        metrics: Arc<Metrics>,
        config: DiscoveryConfig,
    ) -> Self {
        Self {
            store,
            mesh,
            metrics,
            config,
            discovered: Mutex::new(Discovered::default()),
            synced_types: Mutex::new(BTreeSet::new()),
            synced: AtomicBool::new(false),
        }
    }

    /// True once the first response of every type has been applied (stays true while the
    /// control plane is away: the last good state keeps serving).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The types not yet applied once, for /ready.
    pub fn missing_types(&self) -> Vec<&'static str> {
        let synced = self.synced_types.lock().unwrap_or_else(|e| e.into_inner());
        type_url::ALL
            .iter()
            .map(|t| type_name(t))
            .filter(|t| !synced.contains(t))
            .collect()
    }

    fn discovered(&self) -> std::sync::MutexGuard<'_, Discovered> {
        self.discovered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects to the control plane with the proxy's SVID once it holds one, and keeps a
    /// stream open until `cancel`.
    pub async fn run(
        self: Arc<Self>,
        control_plane: String,
        control_plane_id: ExpectedPeer,
        cancel: CancellationToken,
    ) {
        let mut changes = self.store.subscribe();
        while self.store.svid().is_none() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
        let verifier = Arc::new(latch_identity::SpiffeServerVerifier::new(
            self.store.clone(),
            control_plane_id,
        ));
        let tls = match latch_identity::tls::client_config(
            Some(self.store.clone()),
            verifier,
            &[latch_identity::tls::ALPN_H2],
        ) {
            Ok(tls) => tls,
            Err(e) => {
                tracing::error!("discovery disabled: cannot build its TLS configuration: {e}");
                return;
            }
        };
        let address = control_plane.clone();
        self.run_with(
            move || {
                let (address, tls) = (address.clone(), tls.clone());
                async move { latch_identity::client::connect_channel(&address, tls, None).await }
            },
            &control_plane,
            cancel,
        )
        .await;
    }

    /// The reconnect loop over any way of making a channel (tests use plaintext).
    pub async fn run_with<F, Fut>(
        self: Arc<Self>,
        mut connect: F,
        control_plane: &str,
        cancel: CancellationToken,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Channel, ClientError>>,
    {
        let mut backoff =
            latch_admin::backoff::Backoff::new(self.config.min_backoff, self.config.max_backoff);
        loop {
            let end = tokio::select! {
                _ = cancel.cancelled() => return,
                channel = connect() => match channel {
                    Ok(channel) => self.run_stream(channel, &cancel).await,
                    Err(e) => StreamEnd { applied: 0, error: Some(e.into()) },
                },
            };
            let Some(error) = end.error else { return };
            if end.applied > 0 {
                backoff.reset();
            }
            let wait = backoff.next_wait();
            self.metrics.discovery_reconnects.inc();
            tracing::warn!(
                retry_in = ?wait,
                synced = self.is_synced(),
                "discovery stream to {control_plane} is down (keeping the last good mesh state): {error}"
            );
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The four subscribe requests, in the contract's order, with what is held of each type.
    /// On demand, Workload and Service name the subscribed addresses (none: "*" unsubscribed,
    /// which asks for the proxy's own workload only).
    pub fn subscriptions(&self) -> Vec<DeltaDiscoveryRequest> {
        let names: Option<Vec<String>> = self
            .mesh
            .demand()
            .map(|d| d.subscriptions().iter().map(ToString::to_string).collect());
        let discovered = self.discovered();
        let node = Node {
            id: self.config.workload_name.clone().unwrap_or_default(),
            ..Node::default()
        };
        type_url::ALL
            .iter()
            .map(|&url| {
                let mut request = DeltaDiscoveryRequest {
                    node: Some(node.clone()),
                    type_url: url.to_string(),
                    initial_resource_versions: discovered.versions(url),
                    ..DeltaDiscoveryRequest::default()
                };
                if let Some(names) = names.as_ref().filter(|_| on_demand_type(url)) {
                    if names.is_empty() {
                        request.resource_names_unsubscribe = vec!["*".to_string()];
                    }
                    request.resource_names_subscribe = names.clone();
                }
                request
            })
            .collect()
    }

    /// Requests changing the on-demand subscriptions of Workload and Service: `add` and `drop`.
    fn resubscribe(add: &[IpAddr], drop: &[IpAddr]) -> [DeltaDiscoveryRequest; 2] {
        let names = |ips: &[IpAddr]| ips.iter().map(ToString::to_string).collect::<Vec<_>>();
        [type_url::WORKLOAD, type_url::SERVICE].map(|url| DeltaDiscoveryRequest {
            type_url: url.to_string(),
            resource_names_subscribe: names(add),
            resource_names_unsubscribe: names(drop),
            ..DeltaDiscoveryRequest::default()
        })
    }

    /// Runs one stream on `channel`: subscribe, then apply or reject each response and answer
    /// it, until the stream ends or `cancel` fires.
    pub async fn run_stream(&self, channel: Channel, cancel: &CancellationToken) -> StreamEnd {
        let mut applied = 0;
        let end = |applied, error| StreamEnd {
            applied,
            error: Some(error),
        };
        let (requests, outgoing) = mpsc::channel(16);
        for request in self.subscriptions() {
            // The receiver is alive: it is right here.
            let _ = requests.send(request).await;
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let opened = tokio::select! {
            _ = cancel.cancelled() => return StreamEnd { applied, error: None },
            opened = client.delta_aggregated_resources(ReceiverStream::new(outgoing)) => opened,
        };
        let mut responses = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => return end(applied, status.into()),
        };
        self.metrics.discovery_connected.set(1);
        if let Some(demand) = self.mesh.demand() {
            demand.set_connected(true);
        }
        tracing::info!("discovery stream open");
        let demand = self.mesh.demand();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let error = loop {
            let message = tokio::select! {
                _ = cancel.cancelled() => break None,
                message = responses.message() => message,
                _ = async { if let Some(d) = demand { d.wanted().await } else { std::future::pending().await } } => {
                    let Some(demand) = demand else { continue };
                    let add = demand.take_wanted();
                    if add.is_empty() {
                        continue;
                    }
                    tracing::debug!(addresses = ?add, "looking up destinations on demand");
                    if !self.send_all(&requests, Self::resubscribe(&add, &[])).await {
                        break Some(DiscoveryError::Ended);
                    }
                    continue;
                }
                _ = sweep.tick(), if demand.is_some() => {
                    let Some(demand) = demand else { continue };
                    let snapshot = self.mesh.load();
                    let dropped = demand.expire(std::time::Instant::now(), |ip| snapshot.knows(ip));
                    if dropped.is_empty() {
                        continue;
                    }
                    tracing::debug!(addresses = ?dropped, "unsubscribing destinations no longer used");
                    if !self.send_all(&requests, Self::resubscribe(&[], &dropped)).await {
                        break Some(DiscoveryError::Ended);
                    }
                    continue;
                }
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => break Some(DiscoveryError::Ended),
                Err(status) => break Some(status.into()),
            };
            let answer = self.handle(response);
            if answer.error_detail.is_none() {
                applied += 1;
            }
            if requests.send(answer).await.is_err() {
                break Some(DiscoveryError::Ended);
            }
        };
        self.metrics.discovery_connected.set(0);
        if let Some(demand) = demand {
            demand.set_connected(false);
        }
        StreamEnd { applied, error }
    }

    /// Queues `batch` on the stream; false when it is gone.
    async fn send_all(
        &self,
        requests: &mpsc::Sender<DeltaDiscoveryRequest>,
        batch: impl IntoIterator<Item = DeltaDiscoveryRequest>,
    ) -> bool {
        for request in batch {
            if requests.send(request).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Applies one response all or nothing; returns the ACK or NACK to send.
    pub fn handle(&self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let kind = type_name(&response.type_url);
        let mut answer = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..DeltaDiscoveryRequest::default()
        };
        let mut discovered = self.discovered();
        // Removals of names not held (an on-demand answer "no such address") change nothing.
        let removals = response
            .removed_resources
            .iter()
            .filter(|name| discovered.holds(&response.type_url, name))
            .count();
        let next = apply(&discovered, &response, &self.store, SystemTime::now());
        match next {
            Ok(next) => {
                *discovered = next;
                let mesh_config = (kind == "MeshConfig")
                    .then(|| discovered.mesh.values().next())
                    .flatten();
                let bundle = mesh_config.and_then(|m| m.value.bundle.clone());
                let jwt_bundle = mesh_config.and_then(|m| m.value.jwt_bundle.clone());
                // Before the snapshot: re-authorizing open connections reads them.
                if let Some(config) = mesh_config
                    && config.value.revocations != *self.store.revocations()
                {
                    let revoked = &config.value.revocations.0;
                    tracing::warn!(
                        count = revoked.len(),
                        first = ?revoked.keys().take(8).map(ToString::to_string).collect::<Vec<_>>(),
                        "revocations from the control plane installed"
                    );
                    self.store.set_revocations(config.value.revocations.clone());
                }
                self.mesh.publish(&discovered);
                drop(discovered);
                if let Some(demand) = self.mesh.demand()
                    && on_demand_type(&response.type_url)
                    && !response.system_version_info.is_empty()
                {
                    let snapshot = self.mesh.load();
                    let workload = response.type_url == type_url::WORKLOAD;
                    demand.record_answer(workload, &response.removed_resources, |ip| {
                        if workload {
                            snapshot.peers.contains_key(&ip)
                        } else {
                            snapshot.services.contains_key(&ip)
                        }
                    });
                }
                if let Some(bundle) = bundle.filter(|b| b.roots() != self.store.bundle().roots()) {
                    tracing::info!(fingerprints = ?bundle.fingerprints(), "trust bundle from the control plane installed");
                    self.store.set_bundle(bundle);
                }
                if let Some(jwt_bundle) = jwt_bundle {
                    if self.store.jwt_bundle().as_deref() != Some(&jwt_bundle) {
                        tracing::info!(kids = ?jwt_bundle.kids().collect::<Vec<_>>(), "JWT bundle from the control plane installed");
                    }
                    self.store.set_jwt_bundle(jwt_bundle);
                }
                self.metrics
                    .discovery_applied
                    .get_or_create(&TypeLabel { r#type: kind })
                    .inc();
                self.metrics
                    .discovery_resources
                    .get_or_create(&TypeLabel { r#type: kind })
                    .inc_by((response.resources.len() + removals) as u64);
                tracing::info!(
                    r#type = kind,
                    version = %response.system_version_info,
                    updated = response.resources.len(),
                    removed = response.removed_resources.len(),
                    "discovery response applied"
                );
                // A large push comes in several responses; only the last carries the type's
                // version, and only then is the first sync of this type complete.
                if !response.system_version_info.is_empty() {
                    self.mark_synced(kind);
                }
            }
            Err(reasons) => {
                drop(discovered);
                let message = reasons
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                self.metrics
                    .discovery_rejected
                    .get_or_create(&TypeLabel { r#type: kind })
                    .inc();
                tracing::warn!(
                    r#type = kind,
                    nonce = %response.nonce,
                    "rejected a discovery response, keeping the previous {kind} state: {message}"
                );
                answer.error_detail = Some(latch_proto::google::rpc::Status {
                    code: INVALID_ARGUMENT,
                    message,
                    details: Vec::new(),
                });
            }
        }
        answer
    }

    fn mark_synced(&self, kind: &'static str) {
        let mut synced = self.synced_types.lock().unwrap_or_else(|e| e.into_inner());
        if synced.insert(kind) && synced.len() == type_url::ALL.len() {
            self.synced.store(true, Ordering::Release);
            tracing::info!("in sync with the control plane: all resource types received");
        }
    }
}

/// Whether resources of `type_url` are subscribed by name when discovery is on demand.
fn on_demand_type(url: &str) -> bool {
    url == type_url::WORKLOAD || url == type_url::SERVICE
}

impl Discovered {
    /// True when a resource `name` of `type_url` is held.
    pub fn holds(&self, type_url: &str, name: &str) -> bool {
        match type_url {
            type_url::MESH_CONFIG => self.mesh.contains_key(name),
            type_url::WORKLOAD => self.workloads.contains_key(name),
            type_url::SERVICE => self.services.contains_key(name),
            type_url::AUTHORIZATION_POLICY => self.policies.contains_key(name),
            _ => false,
        }
    }

    /// name -> version of what is held of `type_url`.
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        fn of<T>(held: &BTreeMap<String, Held<T>>) -> BTreeMap<String, String> {
            held.iter()
                .map(|(name, h)| (name.clone(), h.version.clone()))
                .collect()
        }
        match type_url {
            type_url::MESH_CONFIG => of(&self.mesh),
            type_url::WORKLOAD => of(&self.workloads),
            type_url::SERVICE => of(&self.services),
            type_url::AUTHORIZATION_POLICY => of(&self.policies),
            _ => BTreeMap::new(),
        }
    }
}

/// Why a resource of a response was refused.
#[derive(Debug, Error)]
pub enum ResourceError {
    /// Not a valid resource of its type (body, type URL, decoding, name or a field).
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error("sent twice in one response")]
    SentTwice,
    #[error("trust_bundle_pem: {0}")]
    Bundle(#[from] BundleError),
    #[error("jwt_bundle_jwks: {0}")]
    JwtBundle(String),
    /// Installing the bundle would cut this proxy off from every peer.
    #[error("trust_bundle_pem has no root for this proxy's own SVID ({id}): {reason}")]
    BundleLacksOwnRoot { id: SpiffeId, reason: SvidError },
}

/// Why a response was refused; the NACK's message joins them with "; ".
#[derive(Debug, Error)]
pub enum Rejection {
    #[error("{name:?}: {error}")]
    Resource { name: String, error: ResourceError },
    #[error("type_url {0:?} is not one this proxy subscribed to")]
    UnknownType(String),
}

/// The state after `response`, or every reason it is rejected.
pub fn apply(
    current: &Discovered,
    response: &DeltaDiscoveryResponse,
    store: &CertStore,
    now: SystemTime,
) -> Result<Discovered, Vec<Rejection>> {
    let mut next = current.clone();
    match response.type_url.as_str() {
        type_url::MESH_CONFIG => apply_type(&mut next.mesh, response, |r| {
            check_mesh_config(from_resource(&r.name, r.resource.as_ref())?, store, now)
        })?,
        type_url::WORKLOAD => apply_type(&mut next.workloads, response, |r| {
            Ok(from_resource(&r.name, r.resource.as_ref())?)
        })?,
        type_url::SERVICE => apply_type(&mut next.services, response, |r| {
            Ok(from_resource(&r.name, r.resource.as_ref())?)
        })?,
        type_url::AUTHORIZATION_POLICY => apply_type(&mut next.policies, response, |r| {
            Ok(from_resource(&r.name, r.resource.as_ref())?)
        })?,
        other => return Err(vec![Rejection::UnknownType(other.to_string())]),
    }
    Ok(next)
}

/// Validates every resource of a response, then removes and updates; nothing on any error.
fn apply_type<T>(
    held: &mut BTreeMap<String, Held<T>>,
    response: &DeltaDiscoveryResponse,
    validate: impl Fn(&Resource) -> Result<T, ResourceError>,
) -> Result<(), Vec<Rejection>> {
    let mut errors = Vec::new();
    let mut updates = BTreeMap::new();
    for resource in &response.resources {
        let value = validate(resource).and_then(|value| {
            if updates.contains_key(&resource.name) {
                Err(ResourceError::SentTwice)
            } else {
                Ok(value)
            }
        });
        match value {
            Ok(value) => {
                updates.insert(
                    resource.name.clone(),
                    Held {
                        version: resource.version.clone(),
                        value,
                    },
                );
            }
            Err(error) => errors.push(Rejection::Resource {
                name: resource.name.clone(),
                error,
            }),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    for name in &response.removed_resources {
        held.remove(name);
    }
    held.extend(updates);
    Ok(())
}

/// The MeshConfig with its trust bundle parsed. A bundle must validate the proxy's current
/// SVID: installing one that does not would cut this proxy off from every peer.
fn check_mesh_config(
    config: MeshConfig,
    store: &CertStore,
    now: SystemTime,
) -> Result<CheckedMeshConfig, ResourceError> {
    let bundle = if config.trust_bundle_pem.trim().is_empty() {
        None
    } else {
        let bundle = TrustBundle::from_pem(config.trust_bundle_pem.as_bytes())?;
        if let Some(svid) = store.svid() {
            latch_identity::verify_svid(svid.chain(), &bundle, now, PeerRole::Client).map_err(
                |reason| ResourceError::BundleLacksOwnRoot {
                    id: svid.id().clone(),
                    reason,
                },
            )?;
        }
        Some(bundle)
    };
    let jwt_bundle = if config.jwt_bundle_jwks.trim().is_empty() {
        None
    } else {
        let json: serde_json::Value = serde_json::from_str(&config.jwt_bundle_jwks)
            .map_err(|e| ResourceError::JwtBundle(format!("not JSON: {e}")))?;
        Some(
            latch_identity::jwt::JwtBundle::from_jwks(&json)
                .map_err(|e| ResourceError::JwtBundle(e.to_string()))?,
        )
    };
    Ok(CheckedMeshConfig {
        settings: config.settings,
        bundle,
        revocations: latch_identity::Revocations(config.revocations),
        jwt_bundle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ca_and_svid, store_with_svid};
    use latch_mesh::{Action, MtlsMode, OutboundPolicy};
    use latch_proto::mesh::{
        self, Endpoint, PrincipalMatch, ServicePort, authorization_policy, mesh_config,
        principal_match,
    };
    use prost::Message;

    const SELF: &str = "spiffe://cluster.local/ns/demo/sa/web";

    fn store() -> (CertStore, String) {
        store_with_svid(SELF)
    }

    fn resource<M: Message>(url: &str, name: &str, message: &M) -> Resource {
        Resource::of(url, name, "v1", message)
    }

    fn response(url: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: url.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: "n1".into(),
            system_version_info: "v1".into(),
        }
    }

    fn good_workload() -> mesh::Workload {
        mesh::Workload {
            name: "web".into(),
            namespace: "demo".into(),
            spiffe_id: SELF.into(),
            ips: vec!["10.0.0.2".into()],
            mesh_port: 15008,
            ..mesh::Workload::default()
        }
    }

    fn good_service() -> mesh::Service {
        mesh::Service {
            name: "api".into(),
            namespace: "demo".into(),
            vips: vec!["10.96.0.10".into()],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
                name: "http".into(),
            }],
            endpoints: vec![Endpoint {
                ip: "10.0.0.3".into(),
            }],
            ..mesh::Service::default()
        }
    }

    fn good_policy() -> mesh::AuthorizationPolicy {
        mesh::AuthorizationPolicy {
            name: "allow".into(),
            namespace: "demo".into(),
            action: authorization_policy::Action::Allow as i32,
            rules: vec![mesh::Rule {
                principals: vec![
                    PrincipalMatch {
                        r#match: Some(principal_match::Match::Exact(SELF.into())),
                    },
                    PrincipalMatch {
                        r#match: Some(principal_match::Match::Prefix(
                            "spiffe://cluster.local/ns/ops/".into(),
                        )),
                    },
                ],
                namespaces: vec!["demo".into()],
                ports: vec![8080],
            }],
            ..mesh::AuthorizationPolicy::default()
        }
    }

    /// The one reason `apply` gives for a response of the single `resource`.
    fn rejection(store: &CertStore, url: &str, resource: Resource) -> String {
        match apply(
            &Discovered::default(),
            &response(url, vec![resource], &[]),
            store,
            SystemTime::now(),
        ) {
            Ok(_) => panic!("accepted"),
            Err(reasons) => {
                assert_eq!(reasons.len(), 1, "{reasons:?}");
                reasons[0].to_string()
            }
        }
    }

    fn accepts(store: &CertStore, url: &str, resource: Resource) -> Discovered {
        apply(
            &Discovered::default(),
            &response(url, vec![resource], &[]),
            store,
            SystemTime::now(),
        )
        .unwrap()
    }

    #[test]
    fn valid_resources_are_accepted() {
        let (store, pem) = store();
        let d = accepts(
            &store,
            type_url::WORKLOAD,
            resource(type_url::WORKLOAD, "demo/web", &good_workload()),
        );
        assert_eq!(d.workloads["demo/web"].value.mesh_port, 15008);
        assert_eq!(d.workloads["demo/web"].version, "v1");
        let d = accepts(
            &store,
            type_url::SERVICE,
            resource(type_url::SERVICE, "demo/api", &good_service()),
        );
        assert_eq!(d.services["demo/api"].value.ports[0].target_port, 8080);
        let d = accepts(
            &store,
            type_url::AUTHORIZATION_POLICY,
            resource(type_url::AUTHORIZATION_POLICY, "demo/allow", &good_policy()),
        );
        assert_eq!(d.policies["demo/allow"].value.action, Action::Allow);
        let mesh = mesh::MeshConfig {
            mtls_mode: mesh_config::MtlsMode::Permissive as i32,
            port_mtls: [(8080, mesh_config::MtlsMode::Strict as i32)].into(),
            trust_bundle_pem: pem,
            outbound_policy: mesh_config::OutboundPolicy::RegistryOnly as i32,
            revocations: vec![],
            jwt_bundle_jwks: String::new(),
        };
        let d = accepts(
            &store,
            type_url::MESH_CONFIG,
            resource(type_url::MESH_CONFIG, "mesh", &mesh),
        );
        let held = &d.mesh["mesh"].value;
        assert_eq!(held.settings.mtls_for_port(8080), MtlsMode::Strict);
        assert_eq!(held.settings.mtls_for_port(80), MtlsMode::Permissive);
        assert_eq!(held.settings.outbound_policy, OutboundPolicy::RegistryOnly);
        assert!(held.bundle.is_some());
    }

    #[test]
    fn every_rejection_reason() {
        let (store, _) = store();
        let (other_ca, _) = ca_and_svid(SELF);
        let w = type_url::WORKLOAD;
        let workload = |edit: fn(&mut mesh::Workload)| {
            let mut m = good_workload();
            edit(&mut m);
            resource(w, "demo/web", &m)
        };
        let s = type_url::SERVICE;
        let service = |edit: fn(&mut mesh::Service)| {
            let mut m = good_service();
            edit(&mut m);
            resource(s, "demo/api", &m)
        };
        let p = type_url::AUTHORIZATION_POLICY;
        let policy = |edit: fn(&mut mesh::AuthorizationPolicy)| {
            let mut m = good_policy();
            edit(&mut m);
            resource(p, "demo/allow", &m)
        };
        let m = type_url::MESH_CONFIG;
        let mesh_with = |pem: &str| {
            resource(
                m,
                "mesh",
                &mesh::MeshConfig {
                    trust_bundle_pem: pem.into(),
                    ..mesh::MeshConfig::default()
                },
            )
        };
        let mesh = |edit: fn(&mut mesh::MeshConfig)| {
            let mut c = mesh::MeshConfig::default();
            edit(&mut c);
            resource(m, "mesh", &c)
        };
        let principal = |m: principal_match::Match| mesh::AuthorizationPolicy {
            rules: vec![mesh::Rule {
                principals: vec![PrincipalMatch { r#match: Some(m) }],
                ..mesh::Rule::default()
            }],
            ..good_policy()
        };
        let table: Vec<(&str, Resource, &str)> = vec![
            (
                w,
                workload(|m| m.spiffe_id = "spiffe://Bad/x".into()),
                "spiffe_id",
            ),
            (w, workload(|m| m.spiffe_id = String::new()), "spiffe_id"),
            (
                w,
                workload(|m| m.ips.push("10.0.0.300".into())),
                "not an IP address",
            ),
            (w, workload(|m| m.mesh_port = 0), "mesh_port: is not set"),
            (w, workload(|m| m.mesh_port = 70000), "mesh_port 70000"),
            (w, workload(|m| m.name = "api".into()), "does not match"),
            (
                w,
                workload(|m| m.namespace.clear()),
                "namespace: must not be empty",
            ),
            // A Service's bytes under the Workload type URL.
            (
                w,
                resource(w, "demo/web", &good_service()),
                "cannot be decoded",
            ),
            (
                w,
                resource(s, "demo/web", &good_workload()),
                "in a Workload response",
            ),
            (
                w,
                Resource {
                    resource: None,
                    ..resource(w, "demo/web", &good_workload())
                },
                "no resource body",
            ),
            (
                w,
                Resource {
                    resource: Some(prost_types::Any {
                        type_url: w.into(),
                        value: vec![0xff, 0xff, 0xff],
                    }),
                    ..resource(w, "demo/web", &good_workload())
                },
                "cannot be decoded",
            ),
            (s, service(|m| m.vips = vec!["api.demo".into()]), "vip"),
            (
                s,
                service(|m| m.endpoints[0].ip = "nope".into()),
                "endpoints[0] \"nope\": not an IP address",
            ),
            (s, service(|m| m.ports[0].port = 0), "port 0"),
            (s, service(|m| m.ports[0].target_port = 0), "target_port 0"),
            (
                s,
                service(|m| m.ports[0].target_port = 65536),
                "target_port 65536",
            ),
            (
                s,
                service(|m| m.ports.push(m.ports[0].clone())),
                "listed twice",
            ),
            (p, policy(|m| m.action = 7), "neither ALLOW nor DENY"),
            (
                p,
                resource(
                    p,
                    "demo/allow",
                    &principal(principal_match::Match::Exact("web".into())),
                ),
                "rules[0].principals[0].exact \"web\": not a SPIFFE ID",
            ),
            (
                p,
                resource(
                    p,
                    "demo/allow",
                    &principal(principal_match::Match::Prefix("http://x/".into())),
                ),
                "rules[0].principals[0].prefix \"http://x/\": must start with spiffe://",
            ),
            (
                p,
                resource(
                    p,
                    "demo/allow",
                    &principal(principal_match::Match::Prefix("spiffe://".into())),
                ),
                "rules[0].principals[0].prefix \"spiffe://\": must start with spiffe://",
            ),
            (
                p,
                resource(
                    p,
                    "demo/allow",
                    &principal(principal_match::Match::Prefix("spiffe:///ns/x".into())),
                ),
                "rules[0].principals[0].prefix \"spiffe:///ns/x\": must start with spiffe://<trust domain>; the trust domain is empty",
            ),
            (
                p,
                policy(|m| m.rules[0].principals = vec![PrincipalMatch { r#match: None }]),
                "neither exact nor prefix",
            ),
            (
                p,
                policy(|m| m.rules[0].ports = vec![0]),
                "rules[0].ports[0] 0",
            ),
            (
                p,
                policy(|m| m.rules[0].namespaces = vec!["a/b".into()]),
                "rules[0].namespaces[0] \"a/b\": may hold only",
            ),
            (
                m,
                resource(m, "global", &mesh::MeshConfig::default()),
                "must be named \"mesh\"",
            ),
            (
                m,
                mesh(|c| c.mtls_mode = 9),
                "neither STRICT nor PERMISSIVE",
            ),
            (
                m,
                mesh(|c| c.port_mtls = [(8080, 9)].into()),
                "neither STRICT nor PERMISSIVE",
            ),
            (
                m,
                mesh(|c| c.port_mtls = [(0, 0)].into()),
                "port_mtls[0] 0: not a TCP port",
            ),
            (
                m,
                mesh(|c| c.outbound_policy = 4),
                "neither PASSTHROUGH nor REGISTRY_ONLY",
            ),
            (
                m,
                mesh_with("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"),
                "trust_bundle_pem",
            ),
            (m, mesh_with(&other_ca), "no root for this proxy's own SVID"),
        ];
        for (i, (url, resource, expected)) in table.into_iter().enumerate() {
            let reason = rejection(&store, url, resource);
            assert!(
                reason.contains(expected),
                "row {i}: {reason:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn responses_apply_all_or_nothing_and_removals_apply() {
        let (store, _) = store();
        let w = type_url::WORKLOAD;
        let named = |name: &str| mesh::Workload {
            name: name.into(),
            ..good_workload()
        };
        let held = apply(
            &Discovered::default(),
            &response(
                w,
                vec![
                    resource(w, "demo/web", &named("web")),
                    resource(w, "demo/db", &named("db")),
                ],
                &[],
            ),
            &store,
            SystemTime::now(),
        )
        .unwrap();
        // One bad resource rejects the whole response, removals included.
        let bad = DeltaDiscoveryResponse {
            resources: vec![
                resource(w, "demo/cache", &named("cache")),
                resource(w, "demo/oops", &named("other")),
            ],
            ..response(w, vec![], &["demo/web"])
        };
        let reasons = apply(&held, &bad, &store, SystemTime::now()).unwrap_err();
        assert_eq!(reasons.len(), 1);
        assert!(
            reasons[0].to_string().starts_with("\"demo/oops\""),
            "{reasons:?}"
        );
        // A good one removes and adds.
        let good = response(
            w,
            vec![resource(w, "demo/cache", &named("cache"))],
            &["demo/web"],
        );
        let next = apply(&held, &good, &store, SystemTime::now()).unwrap();
        assert_eq!(
            next.workloads.keys().collect::<Vec<_>>(),
            ["demo/cache", "demo/db"]
        );
        assert_eq!(
            next.versions(w),
            [
                ("demo/cache".to_string(), "v1".to_string()),
                ("demo/db".to_string(), "v1".to_string())
            ]
            .into()
        );
        // Unknown types are rejected outright.
        let reasons = apply(
            &held,
            &response("type.googleapis.com/x.Y", vec![], &[]),
            &store,
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(
            reasons[0]
                .to_string()
                .contains("not one this proxy subscribed to")
        );
    }

    #[test]
    fn a_nack_keeps_the_snapshot_and_counts() {
        let (store, _) = store();
        let store = Arc::new(store);
        let mesh = Arc::new(MeshState::new(Default::default()));
        let metrics = Arc::new(Metrics::new());
        let client = DiscoveryClient::new(
            store,
            mesh.clone(),
            metrics.clone(),
            DiscoveryConfig::default(),
        );
        let w = type_url::WORKLOAD;
        let ack = client.handle(response(
            w,
            vec![resource(w, "demo/web", &good_workload())],
            &[],
        ));
        assert_eq!(
            (ack.response_nonce.as_str(), ack.error_detail),
            ("n1", None)
        );
        assert_eq!(mesh.load().peers.len(), 1);
        let mut bad = good_workload();
        bad.ips = vec!["nope".into()];
        let nack = client.handle(DeltaDiscoveryResponse {
            nonce: "n2".into(),
            ..response(w, vec![resource(w, "demo/web", &bad)], &[])
        });
        let detail = nack.error_detail.unwrap();
        assert_eq!((nack.response_nonce.as_str(), detail.code), ("n2", 3));
        assert!(detail.message.contains("demo/web"), "{}", detail.message);
        assert_eq!(mesh.load().peers.len(), 1, "the previous state stays");
        let label = TypeLabel { r#type: "Workload" };
        assert_eq!(metrics.discovery_rejected.get_or_create(&label).get(), 1);
        assert_eq!(metrics.discovery_applied.get_or_create(&label).get(), 1);
        assert!(!client.is_synced());
        assert_eq!(
            client.missing_types(),
            ["MeshConfig", "Service", "AuthorizationPolicy"]
        );
    }

    #[test]
    fn a_type_is_in_sync_only_once_a_response_carries_its_version() {
        let (store, _) = store();
        let mesh = Arc::new(MeshState::new(Default::default()));
        let client = DiscoveryClient::new(
            Arc::new(store),
            mesh.clone(),
            Arc::new(Metrics::new()),
            DiscoveryConfig::default(),
        );
        let w = type_url::WORKLOAD;
        // The first part of a split push: applied, but the type is not complete yet.
        let part = DeltaDiscoveryResponse {
            system_version_info: String::new(),
            ..response(w, vec![resource(w, "demo/web", &good_workload())], &[])
        };
        assert_eq!(client.handle(part).error_detail, None);
        assert_eq!(mesh.load().peers.len(), 1);
        assert!(client.missing_types().contains(&"Workload"));
        let last = DeltaDiscoveryResponse {
            nonce: "n2".into(),
            ..response(w, vec![], &[])
        };
        assert_eq!(client.handle(last).error_detail, None);
        assert!(!client.missing_types().contains(&"Workload"));
    }
}
