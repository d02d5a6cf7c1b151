//! The delta xDS server (`AggregatedDiscoveryService.DeltaAggregatedResources`): authenticates
//! each proxy by its SVID, then keeps one task per stream that answers subscriptions and pushes
//! only what changed in what that stream sees. A wildcard subscriber sees the whole mesh (a few
//! pointers into the shared snapshot); an on-demand one sees its own workload plus what it
//! subscribed to by name (addresses), so its state grows with its subscriptions, not with the
//! mesh. `ControlPlane::start` mounts it on the gRPC server.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use latch_identity::svid::format_time;
use latch_identity::{PeerRole, SpiffeId, verify_svid};
use latch_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use latch_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::Ca;
use crate::mesh::snapshot::{diff, set_version};
use crate::mesh::{Mesh, MeshSnapshot, ResourceMap, ResourceType, VersionedResource};
use crate::metrics::{CallerLabel, Metrics, TypeLabel};
use crate::revocations::Revocations;
use crate::tls_incoming::PeerConn;

/// Responses queued per stream before its task waits for the proxy to read; a slow proxy
/// then skips intermediate models instead of buffering them.
const RESPONSE_BUFFER: usize = 2;
/// Largest discovery request decoded (tonic answers OUT_OF_RANGE above it): ACKs, NACKs and
/// subscriptions are small; the resource versions a reconnecting proxy holds take ~100 bytes
/// each.
pub const MAX_DISCOVERY_REQUEST_BYTES: usize = 1024 * 1024;
/// Characters of a NACK's error text that reach the log (a proxy's own text, cut so that a
/// peer controls neither the shape nor the size of a log line).
const MAX_NACK_MESSAGE_CHARS: usize = 512;
/// How long a stream's last error may wait to be queued before the stream just ends.
const FINAL_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest response (roughly, in encoded bytes) before a push is split. Each stream's encoder
/// keeps a buffer as large as the largest message it ever sent, so one response holding a
/// 1,000-workload mesh would cost every connected proxy ~200 KiB for as long as it stays
/// connected. Measured with 1,000 proxies (`cargo xtask bench discovery`): one response per
/// type 275 KiB of control-plane memory per proxy, 16 KiB parts 91 KiB, 4 KiB parts 67 KiB
/// (tonic's encoder starts at 8 KiB, so smaller parts no longer shrink it).
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024;
/// Names one stream may hold subscribed per type (on demand). A proxy subscribes to the
/// destinations its app talks to and drops idle ones; this bounds what one caller can make
/// the control plane hold.
pub const MAX_SUBSCRIPTIONS_PER_TYPE: usize = 4096;
/// Longest subscription name accepted (an IP address or `<namespace>/<name>`).
const MAX_SUBSCRIPTION_NAME: usize = 256;

/// The gRPC service.
/// Which trust bundle the proxy on each open stream has acknowledged (the ACK of a MeshConfig
/// response), so a new root signs only once every connected proxy trusts it.
#[derive(Debug, Default)]
pub struct BundleAcks {
    streams: DashMap<u64, StreamBundle>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct StreamBundle {
    caller: String,
    /// SHA-256 of the acknowledged bundle PEM.
    acked: Option<Arc<str>>,
}

impl BundleAcks {
    fn open(&self, caller: &SpiffeId) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.streams.insert(
            id,
            StreamBundle {
                caller: caller.to_string(),
                acked: None,
            },
        );
        id
    }

    fn acked(&self, stream: u64, bundle_sha256: Arc<str>) {
        if let Some(mut entry) = self.streams.get_mut(&stream) {
            entry.acked = Some(bundle_sha256);
        }
    }

    fn close(&self, stream: u64) {
        self.streams.remove(&stream);
    }

    /// (open streams, callers of those that have not acknowledged `bundle_sha256`).
    pub fn lagging(&self, bundle_sha256: &str) -> (usize, Vec<String>) {
        let mut lagging: Vec<String> = self
            .streams
            .iter()
            .filter(|s| s.acked.as_deref() != Some(bundle_sha256))
            .map(|s| s.caller.clone())
            .collect();
        lagging.sort();
        (self.streams.len(), lagging)
    }
}

pub struct DiscoveryServer {
    ca: Arc<Ca>,
    mesh: Arc<Mesh>,
    revocations: Arc<Revocations>,
    metrics: Arc<Metrics>,
    acks: Arc<BundleAcks>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl DiscoveryServer {
    /// Stream tasks are spawned on `tracker` and end when `cancel` fires, or when a revocation
    /// in `revocations` covers the caller's SVID; each records in `acks` which trust bundle its
    /// proxy acknowledged.
    pub fn new(
        ca: Arc<Ca>,
        mesh: Arc<Mesh>,
        revocations: Arc<Revocations>,
        metrics: Arc<Metrics>,
        acks: Arc<BundleAcks>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            ca,
            mesh,
            revocations,
            metrics,
            acks,
            tracker,
            cancel,
        }
    }

    /// The caller's SPIFFE ID and when its SVID expires, from the TLS client certificate.
    fn authenticate(&self, peer: Option<&PeerConn>) -> Result<Caller, Status> {
        let Some(chain) = peer.and_then(|p| p.certs.as_deref()) else {
            return Err(Status::unauthenticated(
                "discovery needs the proxy's SVID as TLS client certificate, and none was \
                 presented",
            ));
        };
        let info = verify_svid(
            chain,
            &self.ca.bundle(),
            SystemTime::now(),
            PeerRole::Client,
        )
        .map_err(|e| Status::unauthenticated(format!("discovery refused: {e}")))?;
        if !info.id.is_member_of(self.ca.trust_domain()) {
            return Err(Status::unauthenticated(format!(
                "discovery refused: {} is not in trust domain {}",
                info.id,
                self.ca.trust_domain()
            )));
        }
        let issued_at = info.issued_at();
        if !self.revocations.is_loaded() {
            return Err(Status::unavailable(
                "the revocations kept in the Kubernetes API have not been read yet; retry shortly",
            ));
        }
        if let Some(revocation) = self.revocations.covering(&info.id, issued_at) {
            return Err(Status::permission_denied(format!(
                "discovery refused: {}",
                revocation.refusal()
            )));
        }
        Ok(Caller {
            id: info.id,
            issued_at,
            not_after: info.not_after,
            remote: peer.map(|p| p.remote),
        })
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for DiscoveryServer {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.extensions().get::<PeerConn>().cloned();
        let caller = self.authenticate(peer.as_ref()).inspect_err(|status| {
            tracing::info!(
                remote = ?peer.as_ref().map(|p| p.remote),
                "refused discovery stream: {}",
                status.message()
            );
        })?;
        if !self.mesh.is_synced() {
            // Serving the empty mesh now would tell a reconnecting proxy to drop everything it
            // knows; it keeps its last good state and retries with backoff instead.
            return Err(Status::unavailable(
                "the control plane has not read the mesh from its source yet; retry shortly",
            ));
        }
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let snapshots = self.mesh.subscribe();
        let stream = DeltaStream::new(
            caller,
            snapshots,
            self.revocations.clone(),
            self.metrics.clone(),
            self.acks.clone(),
            tx,
            self.cancel.clone(),
        );
        // Answer at once with the response stream: the server's request timeout applies only
        // until this returns, so it never cuts a long-lived stream.
        self.tracker.spawn(stream.run(request.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Who is on the other end of a stream.
#[derive(Debug)]
struct Caller {
    id: SpiffeId,
    issued_at: SystemTime,
    not_after: SystemTime,
    remote: Option<SocketAddr>,
}

/// A set of resources of one type: a whole shared map (types everyone sees, compared by
/// pointer), or the caller's own selection (policies).
#[derive(Debug)]
enum ResourceSet {
    Shared(Arc<ResourceMap>),
    Own(ResourceMap),
}

impl ResourceSet {
    fn map(&self) -> &ResourceMap {
        match self {
            ResourceSet::Shared(map) => map,
            ResourceSet::Own(map) => map,
        }
    }

    fn is_same(&self, other: &ResourceSet) -> bool {
        match (self, other) {
            (ResourceSet::Shared(a), ResourceSet::Shared(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Why a stream's task stopped.
enum Ended {
    Shutdown,
    Expired,
    ProxyGone,
    ProxyClosed,
    Refused(Status),
}

/// One proxy's stream: what it holds per type, and the latest snapshot.
struct DeltaStream {
    caller: Caller,
    /// From the first request that carries a node; "" until then.
    node_id: String,
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    current: Arc<MeshSnapshot>,
    /// Per type (by `ResourceType::index`): what the proxy holds, `None` before it subscribes.
    held: [Option<ResourceSet>; 4],
    /// Per type: the names subscribed on demand, `None` for a wildcard subscription (and
    /// before the first request of that type).
    demand: [Option<BTreeSet<Box<str>>>; 4],
    /// The services an on-demand Workload set was resolved through (by VIP): a change to one
    /// of them may change which endpoint workloads the stream sees.
    via_services: Vec<Arc<str>>,
    /// Per type, for the sets this stream selects itself (policies, on-demand types): the
    /// maps the held set was selected from; while both are current, it cannot have changed.
    basis: [[Weak<ResourceMap>; 2]; 4],
    nonce: u64,
    metrics: Arc<Metrics>,
    acks: Arc<BundleAcks>,
    /// This stream's entry in `acks`.
    stream_id: u64,
    /// The nonce of the last MeshConfig response sent and the bundle it carried.
    bundle_sent: Option<(String, Arc<str>)>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    cancel: CancellationToken,
    expires: Instant,
    /// Checked at every change: a revoked proxy loses its stream at once.
    revocations: Arc<Revocations>,
    revocation_changes: watch::Receiver<u64>,
}

impl DeltaStream {
    fn new(
        caller: Caller,
        mut snapshots: watch::Receiver<Arc<MeshSnapshot>>,
        revocations: Arc<Revocations>,
        metrics: Arc<Metrics>,
        acks: Arc<BundleAcks>,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
        cancel: CancellationToken,
    ) -> Self {
        let current = snapshots.borrow_and_update().clone();
        let stream_id = acks.open(&caller.id);
        let left = caller
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let now = Instant::now();
        let expires = now
            .checked_add(left)
            .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
        Self {
            caller,
            node_id: String::new(),
            snapshots,
            current,
            held: [None, None, None, None],
            demand: [None, None, None, None],
            via_services: Vec::new(),
            basis: Default::default(),
            nonce: 0,
            metrics,
            acks,
            stream_id,
            bundle_sent: None,
            tx,
            cancel,
            expires,
            revocation_changes: revocations.subscribe(),
            revocations,
        }
    }

    /// The node id, or the caller's SPIFFE ID when the proxy sent none (for logs and metrics).
    fn node_label(&self) -> &str {
        if self.node_id.is_empty() {
            self.caller.id.as_str()
        } else {
            &self.node_id
        }
    }

    async fn run(mut self, mut requests: Streaming<DeltaDiscoveryRequest>) {
        self.metrics.discovery_streams.inc();
        tracing::debug!(caller = %self.caller.id, remote = ?self.caller.remote, "discovery stream opened");
        let expiry = tokio::time::sleep_until(self.expires);
        tokio::pin!(expiry);
        let ended = loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break Ended::Shutdown,
                _ = &mut expiry => break Ended::Expired,
                _ = self.tx.closed() => break Ended::ProxyGone,
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        if let Err(ended) = self.handle(request).await {
                            break ended;
                        }
                    }
                    Ok(None) => break Ended::ProxyClosed,
                    Err(status) => {
                        tracing::debug!(caller = %self.caller.id, "discovery stream read failed: {status}");
                        break Ended::ProxyGone;
                    }
                },
                changed = self.revocation_changes.changed() => {
                    if changed.is_err() {
                        break Ended::Shutdown;
                    }
                    self.revocation_changes.mark_unchanged();
                    if let Some(revocation) =
                        self.revocations.covering(&self.caller.id, self.caller.issued_at)
                    {
                        break Ended::Refused(Status::permission_denied(revocation.refusal()));
                    }
                }
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        break Ended::Shutdown;
                    }
                    self.current = self.snapshots.borrow_and_update().clone();
                    if let Err(ended) = self.push().await {
                        break ended;
                    }
                }
            }
        };
        self.metrics.discovery_streams.dec();
        let names: usize = self.demand.iter().flatten().map(BTreeSet::len).sum();
        self.metrics
            .discovery_subscriptions
            .dec_by(i64::try_from(names).unwrap_or(i64::MAX));
        self.acks.close(self.stream_id);
        let node = self.node_label().to_string();
        match ended {
            Ended::Expired => tracing::info!(
                node,
                caller = %self.caller.id,
                "ending discovery stream: the caller's SVID expired at {}; the proxy reconnects with its renewed SVID",
                format_time(self.caller.not_after)
            ),
            Ended::Refused(status) => {
                tracing::info!(node, caller = %self.caller.id, "ending discovery stream: {}", status.message());
                let _ = tokio::time::timeout(FINAL_SEND_TIMEOUT, self.tx.send(Err(status))).await;
            }
            Ended::Shutdown | Ended::ProxyGone | Ended::ProxyClosed => {
                tracing::debug!(node, caller = %self.caller.id, "discovery stream closed");
            }
        }
    }

    /// What the caller may see of `ty` in the current snapshot: the whole shared map for a
    /// wildcard subscription, otherwise its own selection (policies that select it; for an
    /// on-demand type its own workloads and what its subscribed names resolve to).
    fn visible(&mut self, ty: ResourceType) -> ResourceSet {
        self.basis[ty.index()] = self.inputs(ty).map(Arc::downgrade);
        if ty == ResourceType::AuthorizationPolicy {
            return ResourceSet::Own(
                self.current
                    .visible_policies(&self.caller.id, &self.node_id),
            );
        }
        let Some(names) = &self.demand[ty.index()] else {
            return ResourceSet::Shared(self.current.resources(ty).clone());
        };
        let mut map = ResourceMap::new();
        if ty == ResourceType::Workload {
            self.current
                .own_workloads_into(&self.caller.id, &self.node_id, &mut map);
            let mut via = ResourceMap::new();
            for name in names {
                self.current
                    .resolve_into(ResourceType::Service, name, &mut via);
            }
            self.via_services = via.into_keys().collect();
        }
        for name in names {
            self.current.resolve_into(ty, name, &mut map);
        }
        ResourceSet::Own(map)
    }

    /// For an on-demand type whose input maps changed since its set was selected: true when
    /// the snapshot's deltas show that nothing this stream sees or could see changed (the
    /// common case: most changes concern workloads other proxies talk to), so the set stays
    /// and only its basis moves on. O(changed resources), not O(subscriptions) or O(mesh).
    fn unaffected(&self, ty: ResourceType) -> bool {
        let kinds = match ty {
            ResourceType::Workload => [ResourceType::Workload, ResourceType::Service],
            ResourceType::Service => [ResourceType::Service, ResourceType::Service],
            _ => return false,
        };
        let (Some(names), Some(held)) = (&self.demand[ty.index()], &self.held[ty.index()]) else {
            return false;
        };
        let inputs = self.inputs(ty);
        for ((map, basis), kind) in inputs.iter().zip(&self.basis[ty.index()]).zip(kinds) {
            if std::ptr::eq(Arc::as_ptr(map), basis.as_ptr()) {
                continue;
            }
            // A stream that skipped a snapshot cannot tell from the last delta alone.
            let Some(delta) = self.current.delta(kind) else {
                return false;
            };
            if !std::ptr::eq(delta.from.as_ptr(), basis.as_ptr()) {
                return false;
            }
            let touched = delta.changed.iter().map(|r| &r.name).chain(&delta.removed);
            for name in touched {
                if held.map().contains_key(name) || names.contains(&**name) {
                    return false;
                }
                if kind == ResourceType::Workload && self.might_see_workload(name, names) {
                    return false;
                }
                if kind == ResourceType::Service && self.might_see_service(name, names) {
                    return false;
                }
            }
        }
        true
    }

    /// Whether workload `name` (as it is now) is one of the caller's own or sits at an
    /// address this stream subscribed to or behind a service it resolved.
    fn might_see_workload(&self, name: &str, names: &BTreeSet<Box<str>>) -> bool {
        if name == self.node_id {
            return true;
        }
        let Some(w) = self.current.model.workloads.get(name) else {
            return false;
        };
        w.spiffe_id == self.caller.id
            || w.ips.iter().any(|ip| {
                names
                    .iter()
                    .any(|n| n.parse::<std::net::IpAddr>() == Ok(*ip))
                    || self.via_services.iter().any(|s| {
                        self.current
                            .model
                            .services
                            .get(&**s)
                            .is_some_and(|s| s.endpoints.contains(ip))
                    })
            })
    }

    /// Whether service `name` (as it is now, or as it was when resolved) is one this stream
    /// resolved or has a VIP it subscribed to.
    fn might_see_service(&self, name: &Arc<str>, names: &BTreeSet<Box<str>>) -> bool {
        if self.via_services.contains(name) {
            return true;
        }
        self.current.model.services.get(&**name).is_some_and(|s| {
            s.vips.iter().any(|vip| {
                names
                    .iter()
                    .any(|n| n.parse::<std::net::IpAddr>() == Ok(*vip))
            })
        })
    }

    /// The maps that decide what a self-selected set of `ty` holds.
    fn inputs(&self, ty: ResourceType) -> [&Arc<ResourceMap>; 2] {
        let of = |t| self.current.resources(t);
        match ty {
            ResourceType::AuthorizationPolicy => [
                of(ResourceType::Workload),
                of(ResourceType::AuthorizationPolicy),
            ],
            // Through a VIP, a service's endpoints decide which workloads are sent.
            ResourceType::Workload => [of(ResourceType::Workload), of(ResourceType::Service)],
            other => [of(other), of(other)],
        }
    }

    /// True when the held self-selected set of `ty` was selected from the current maps.
    fn selection_current(&self, ty: ResourceType) -> bool {
        self.inputs(ty)
            .iter()
            .zip(&self.basis[ty.index()])
            .all(|(map, basis)| std::ptr::eq(Arc::as_ptr(map), basis.as_ptr()))
    }

    /// True when the stream selects its own set of `ty` (rather than holding the shared map).
    fn selects_own(&self, ty: ResourceType) -> bool {
        ty == ResourceType::AuthorizationPolicy || self.demand[ty.index()].is_some()
    }

    /// `system_version_info` for `set` of type `ty`.
    fn set_version(&self, ty: ResourceType, set: &ResourceSet) -> String {
        match set {
            ResourceSet::Shared(_) => self.current.type_version(ty).to_string(),
            ResourceSet::Own(map) => set_version(map.values()),
        }
    }

    async fn handle(&mut self, request: DeltaDiscoveryRequest) -> Result<(), Ended> {
        if self.node_id.is_empty()
            && let Some(node) = request.node.as_ref().filter(|n| !n.id.is_empty())
        {
            // It reaches logs and selects policies: a workload name or nothing.
            if !latch_mesh::validate::is_workload_name(&node.id) {
                return Err(Ended::Refused(Status::invalid_argument(format!(
                    "node id {} is not <namespace>/<name> (letters, digits, '.', '-', '_'), \
                     e.g. demo/web: set --workload-name",
                    latch_admin::untrusted(&node.id, 64)
                ))));
            }
            self.node_id = node.id.clone();
        }
        let Some(ty) = ResourceType::from_type_url(&request.type_url) else {
            return Err(Ended::Refused(Status::invalid_argument(format!(
                "unknown type_url {:?}; this control plane serves {}",
                request.type_url,
                latch_proto::type_url::ALL.join(", ")
            ))));
        };
        if !request.response_nonce.is_empty() {
            match request.error_detail.as_ref().filter(|e| e.code != 0) {
                Some(error) => {
                    tracing::warn!(
                        node = self.node_label(),
                        caller = %self.caller.id,
                        r#type = ty.label(),
                        nonce = %latch_admin::untrusted(&request.response_nonce, 64),
                        code = error.code,
                        "proxy rejected a discovery response (NACK): {}",
                        latch_admin::untrusted(&error.message, MAX_NACK_MESSAGE_CHARS)
                    );
                    self.metrics
                        .discovery_nacks
                        .get_or_create(&CallerLabel {
                            spiffe_id: self.caller.id.to_string(),
                        })
                        .inc();
                }
                None => {
                    tracing::trace!(r#type = ty.label(), nonce = %request.response_nonce, "ACK");
                    if let Some((nonce, bundle)) = &self.bundle_sent
                        && ty == ResourceType::MeshConfig
                        && *nonce == request.response_nonce
                    {
                        self.acks.acked(self.stream_id, bundle.clone());
                    }
                }
            }
            return Ok(());
        }
        if self.held[ty.index()].is_some() {
            return self.resubscribe(ty, &request).await;
        }
        let subscribe = &request.resource_names_subscribe;
        // xDS: a first request naming nothing (or naming "*") is a wildcard subscription;
        // naming resources, or unsubscribing "*", asks for those names only.
        let wildcard = subscribe.iter().any(|n| n == "*")
            || (subscribe.is_empty()
                && !request.resource_names_unsubscribe.iter().any(|n| n == "*"));
        let mut unknown = Vec::new();
        if !wildcard {
            if !ty.on_demand() {
                return Err(Ended::Refused(Status::invalid_argument(format!(
                    "{} is served by wildcard only: send resource_names_subscribe empty",
                    ty.label()
                ))));
            }
            let mut names = BTreeSet::new();
            add_names(&mut names, subscribe)?;
            self.metrics
                .discovery_subscriptions
                .inc_by(i64::try_from(names.len()).unwrap_or(i64::MAX));
            self.demand[ty.index()] = Some(names);
        }
        let visible = self.visible(ty);
        if let Some(names) = &self.demand[ty.index()] {
            unknown = self.unknown_names(ty, names.iter().map(|n| &**n));
        }
        let initial = &request.initial_resource_versions;
        let changed: Vec<Arc<VersionedResource>> = visible
            .map()
            .values()
            .filter(|r| initial.get(&*r.name) != Some(&r.version))
            .cloned()
            .collect();
        let mut removed: Vec<Arc<str>> = initial
            .keys()
            .filter(|name| !visible.map().contains_key(name.as_str()))
            .map(|name| Arc::from(name.as_str()))
            .collect();
        removed.extend(unknown);
        let version = self.set_version(ty, &visible);
        self.held[ty.index()] = Some(visible);
        if ty == ResourceType::MeshConfig && changed.is_empty() {
            // The proxy reconnected holding the current MeshConfig, bundle included.
            self.acks
                .acked(self.stream_id, self.current.trust_bundle_sha256.clone());
        }
        self.send(ty, changed, removed, version).await
    }

    /// The names among `names` that stand for nothing of `ty` now: sent in `removed_resources`
    /// in answer to a subscription, so the proxy knows the mesh has no such destination.
    fn unknown_names<'a>(
        &self,
        ty: ResourceType,
        names: impl Iterator<Item = &'a str>,
    ) -> Vec<Arc<str>> {
        let mut scratch = ResourceMap::new();
        names
            .filter(|name| {
                scratch.clear();
                !self.current.resolve_into(ty, name, &mut scratch)
            })
            .map(Arc::from)
            .collect()
    }

    /// A later request of a type already subscribed: on-demand names added or dropped. Every
    /// such request is answered, even when nothing changed, so the proxy knows its lookup was
    /// seen: the resources each new name resolves to (sent again when already held) or the
    /// name in `removed_resources` when it stands for nothing.
    async fn resubscribe(
        &mut self,
        ty: ResourceType,
        request: &DeltaDiscoveryRequest,
    ) -> Result<(), Ended> {
        let Some(names) = self.demand[ty.index()].as_mut() else {
            if request
                .resource_names_subscribe
                .iter()
                .chain(&request.resource_names_unsubscribe)
                .any(|name| name != "*")
            {
                return Err(Ended::Refused(Status::invalid_argument(format!(
                    "this stream subscribed to every {} (wildcard); names cannot be added or \
                     dropped: open a new stream that names them from the start",
                    ty.label()
                ))));
            }
            tracing::debug!(r#type = ty.label(), "repeated subscribe ignored");
            return Ok(());
        };
        let held_before = names.len();
        for name in &request.resource_names_unsubscribe {
            names.remove(name.as_str());
        }
        let before = names.len();
        let added = add_names(names, &request.resource_names_subscribe);
        let after = names.len();
        self.metrics.discovery_subscriptions.inc_by(
            i64::try_from(after).unwrap_or(i64::MAX) - i64::try_from(held_before).unwrap_or(0),
        );
        added?;
        let added = after - before;
        let visible = self.visible(ty);
        let Some(held) = &self.held[ty.index()] else {
            return Ok(());
        };
        let (mut changed, mut removed) = diff(held.map(), visible.map());
        let new_names = &request.resource_names_subscribe;
        let mut answer = ResourceMap::new();
        for name in new_names {
            self.current.resolve_into(ty, name, &mut answer);
        }
        for resource in answer.into_values() {
            if !changed.iter().any(|c| c.name == resource.name) {
                changed.push(resource);
            }
        }
        removed.extend(self.unknown_names(ty, new_names.iter().map(String::as_str)));
        tracing::debug!(
            node = self.node_label(),
            r#type = ty.label(),
            added,
            dropped = request.resource_names_unsubscribe.len(),
            "on-demand subscriptions changed"
        );
        let version = self.set_version(ty, &visible);
        self.held[ty.index()] = Some(visible);
        self.send(ty, changed, removed, version).await
    }

    /// Sends every subscribed type's changes since what the proxy holds.
    async fn push(&mut self) -> Result<(), Ended> {
        for ty in ResourceType::ALL {
            if self.held[ty.index()].is_none()
                || (self.selects_own(ty) && self.selection_current(ty))
            {
                continue;
            }
            if self.unaffected(ty) {
                self.basis[ty.index()] = self.inputs(ty).map(Arc::downgrade);
                continue;
            }
            let visible = self.visible(ty);
            let Some(held) = &self.held[ty.index()] else {
                continue;
            };
            if held.is_same(&visible) {
                continue;
            }
            // Streams in step with the model share the diff computed once per snapshot; a
            // stream that skipped snapshots (slow proxy) diffs for itself.
            let shared_delta = match held {
                ResourceSet::Shared(map) => self.current.delta(ty).filter(|d| d.starts_from(map)),
                ResourceSet::Own(_) => None,
            };
            let (changed, removed) = match shared_delta {
                Some(delta) => (delta.changed.clone(), delta.removed.clone()),
                None => diff(held.map(), visible.map()),
            };
            let version = self.set_version(ty, &visible);
            // Hold the new set even when nothing changed: it frees the old snapshot's map.
            self.held[ty.index()] = Some(visible);
            if changed.is_empty() && removed.is_empty() {
                continue;
            }
            self.send(ty, changed, removed, version).await?;
        }
        Ok(())
    }

    /// Sends `changed` and `removed` of type `ty`, in as many responses as it takes to keep each
    /// under `MAX_RESPONSE_BYTES`. Only the last carries `system_version_info` (and the
    /// removals): a proxy knows a push is complete when it sees a version.
    async fn send(
        &mut self,
        ty: ResourceType,
        changed: Vec<Arc<VersionedResource>>,
        removed: Vec<Arc<str>>,
        system_version_info: String,
    ) -> Result<(), Ended> {
        let mut chunks: Vec<&[Arc<VersionedResource>]> = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, r) in changed.iter().enumerate() {
            let size = r.body.value.len() + r.name.len() + r.version.len() + 64;
            if i > start && bytes + size > MAX_RESPONSE_BYTES {
                chunks.push(&changed[start..i]);
                (start, bytes) = (i, 0);
            }
            bytes += size;
        }
        chunks.push(&changed[start..]);
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let (version, removed) = if i == last {
                (system_version_info.clone(), removed.as_slice())
            } else {
                (String::new(), &[][..])
            };
            self.send_one(ty, chunk, removed, version).await?;
        }
        Ok(())
    }

    async fn send_one(
        &mut self,
        ty: ResourceType,
        changed: &[Arc<VersionedResource>],
        removed: &[Arc<str>],
        system_version_info: String,
    ) -> Result<(), Ended> {
        self.nonce += 1;
        let response = DeltaDiscoveryResponse {
            system_version_info,
            resources: changed
                .iter()
                .map(|r| Resource {
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    name: r.name.to_string(),
                })
                .collect(),
            type_url: ty.type_url().to_string(),
            nonce: self.nonce.to_string(),
            removed_resources: removed.iter().map(|name| name.to_string()).collect(),
        };
        tracing::debug!(
            node = self.node_label(),
            r#type = ty.label(),
            nonce = self.nonce,
            resources = response.resources.len(),
            removed = response.removed_resources.len(),
            "sending discovery response"
        );
        tokio::select! {
            sent = self.tx.send(Ok(response)) => sent.map_err(|_| Ended::ProxyGone)?,
            _ = self.cancel.cancelled() => return Err(Ended::Shutdown),
            _ = tokio::time::sleep_until(self.expires) => return Err(Ended::Expired),
        }
        if ty == ResourceType::MeshConfig && !changed.is_empty() {
            self.bundle_sent = Some((
                self.nonce.to_string(),
                self.current.trust_bundle_sha256.clone(),
            ));
        }
        self.metrics
            .discovery_responses
            .get_or_create(&TypeLabel { r#type: ty.label() })
            .inc();
        Ok(())
    }
}

/// Adds the subscription `names` to `into` ("*" is not a name here), within the per-stream
/// bounds.
fn add_names(into: &mut BTreeSet<Box<str>>, names: &[String]) -> Result<(), Ended> {
    for name in names.iter().filter(|n| *n != "*") {
        if name.is_empty() || name.len() > MAX_SUBSCRIPTION_NAME {
            return Err(Ended::Refused(Status::invalid_argument(format!(
                "subscription name of {} bytes: a name is an IP address or <namespace>/<name>, \
                 1 to {MAX_SUBSCRIPTION_NAME} bytes",
                name.len()
            ))));
        }
        into.insert(name.as_str().into());
        if into.len() > MAX_SUBSCRIPTIONS_PER_TYPE {
            return Err(Ended::Refused(Status::resource_exhausted(format!(
                "more than {MAX_SUBSCRIPTIONS_PER_TYPE} names subscribed on one stream for one \
                 type; a proxy unsubscribes the destinations it no longer uses"
            ))));
        }
    }
    Ok(())
}
