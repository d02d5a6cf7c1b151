//! What the data path knows about the mesh: an immutable `MeshSnapshot` behind an `ArcSwap` in
//! `MeshState`, read at every new connection. The snapshot is built from what discovery holds
//! (`Discovered`: resources already converted into `latch_mesh` types) plus the local flags
//! (`LocalConfig`); the xDS client (`xds.rs`) publishes a new one after every applied
//! response, the data path only reads. With on-demand discovery, `Demand` is where the data
//! path leaves the destinations it does not know and waits for their answer; the xDS client
//! subscribes to them and records the answers. The bottom layer of the proxy: it uses no other
//! module.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Guard};
use latch_identity::{SpiffeId, TrustBundle};
use latch_mesh::{MeshSettings, MtlsMode, OutboundPolicy, Policy, Principal, Service, Workload};
use serde_json::json;

/// A meshed workload reachable at an IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeer {
    pub id: SpiffeId,
    pub mesh_port: u16,
}

/// Where an outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Over mTLS to `mesh_addr`, expecting `id`, for the app port `target_port`.
    Mesh {
        mesh_addr: SocketAddr,
        id: SpiffeId,
        target_port: u16,
    },
    /// Plain TCP to this address (an unknown destination, or an unmeshed service endpoint).
    Passthrough(SocketAddr),
    /// Not forwarded; `reason` is the metric label, `why` the log line.
    Refused { reason: &'static str, why: String },
}

/// The MeshConfig as the proxy holds it: the settings, and the trust bundle parsed and checked
/// against the proxy's own SVID (`None` when the control plane sent none).
#[derive(Debug, Clone)]
pub struct CheckedMeshConfig {
    pub settings: MeshSettings,
    pub bundle: Option<TrustBundle>,
    /// Revoked identities; the proxy installs them in its `CertStore`.
    pub revocations: latch_identity::Revocations,
    /// The JWT bundle, when the control plane sent one; installed in the `CertStore` for the
    /// Workload API's JWT methods.
    pub jwt_bundle: Option<latch_identity::jwt::JwtBundle>,
}

/// A resource held by discovery with the version it came with.
#[derive(Debug, Clone)]
pub struct Held<T> {
    pub version: String,
    pub value: T,
}

/// Everything discovery holds, per type, keyed by resource name.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    pub mesh: BTreeMap<String, Held<CheckedMeshConfig>>,
    pub workloads: BTreeMap<String, Held<Workload>>,
    pub services: BTreeMap<String, Held<Service>>,
    pub policies: BTreeMap<String, Held<Policy>>,
}

/// What the local flags add to the mesh.
#[derive(Debug, Clone, Default)]
pub struct LocalConfig {
    /// `--peer`: used for IPs discovery does not know.
    pub peers: Vec<(IpAddr, MeshPeer)>,
    /// `--inbound-mode`: when set, wins over the MeshConfig's modes.
    pub inbound_mode: Option<MtlsMode>,
    /// `--outbound-policy`: when set, wins over the MeshConfig's policy.
    pub outbound_policy: Option<OutboundPolicy>,
}

/// A service as the data path routes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    pub name: String,
    pub ports: BTreeMap<u16, u16>,
    pub endpoints: Vec<IpAddr>,
}

/// The mesh as the data path sees it.
#[derive(Debug, Clone)]
pub struct MeshSnapshot {
    /// Meshed workloads by IP (discovery first, then `--peer`).
    pub peers: HashMap<IpAddr, MeshPeer>,
    /// Services by VIP.
    pub services: HashMap<IpAddr, Arc<ServiceRoute>>,
    /// Policies selecting this workload, by name (the order decides nothing).
    pub policies: Vec<Policy>,
    /// mTLS modes and outbound policy: the MeshConfig's, or the flags' where given.
    pub settings: MeshSettings,
}

impl MeshSnapshot {
    /// Builds the snapshot from discovery's resources and the local flags. Where two
    /// resources claim the same IP or VIP, the first by name wins (and a warning is logged).
    pub fn build(discovered: &Discovered, local: &LocalConfig) -> Self {
        let mesh = discovered.mesh.values().next().map(|h| &h.value);
        let mut peers = HashMap::new();
        for workload in discovered.workloads.values().map(|h| &h.value) {
            for ip in &workload.ips {
                let peer = MeshPeer {
                    id: workload.spiffe_id.clone(),
                    mesh_port: workload.mesh_port,
                };
                if let Some(existing) = peers.get(ip) {
                    if existing != &peer {
                        tracing::warn!(%ip, workload = %workload.resource_name(), "IP already claimed by another workload; ignoring this claim");
                    }
                    continue;
                }
                peers.insert(*ip, peer);
            }
        }
        for (ip, peer) in &local.peers {
            peers.entry(*ip).or_insert_with(|| peer.clone());
        }
        let mut services = HashMap::new();
        for service in discovered.services.values().map(|h| &h.value) {
            let route = Arc::new(ServiceRoute {
                name: service.resource_name(),
                ports: service
                    .ports
                    .iter()
                    .map(|p| (p.port, p.target_port))
                    .collect(),
                endpoints: service.endpoints.clone(),
            });
            for vip in &service.vips {
                if services.contains_key(vip) {
                    tracing::warn!(%vip, service = %route.name, "VIP already claimed by another service; ignoring this claim");
                    continue;
                }
                services.insert(*vip, route.clone());
            }
        }
        let mut settings = mesh.map(|m| m.settings.clone()).unwrap_or_default();
        if let Some(mode) = local.inbound_mode {
            settings.mtls = mode;
            settings.port_mtls.clear();
        }
        if let Some(policy) = local.outbound_policy {
            settings.outbound_policy = policy;
        }
        Self {
            peers,
            services,
            policies: discovered
                .policies
                .values()
                .map(|h| h.value.clone())
                .collect(),
            settings,
        }
    }

    /// True when `ip` is a workload IP or a service VIP this snapshot routes.
    pub fn knows(&self, ip: IpAddr) -> bool {
        self.peers.contains_key(&ip) || self.services.contains_key(&ip)
    }

    /// The route to a meshed workload's IP.
    fn mesh_route(&self, ip: IpAddr, target_port: u16) -> Option<Route> {
        self.peers.get(&ip).map(|peer| Route::Mesh {
            mesh_addr: SocketAddr::new(ip, peer.mesh_port),
            id: peer.id.clone(),
            target_port,
        })
    }

    /// Decides where a connection to `destination` goes. For a service VIP, `pick` chooses
    /// among the endpoints (ip:target_port, never empty) and returns an index into them.
    pub fn route(
        &self,
        destination: SocketAddr,
        pick: impl FnOnce(&[SocketAddr]) -> usize,
    ) -> Route {
        let ip = destination.ip();
        if let Some(service) = self.services.get(&ip) {
            let Some(&target_port) = service.ports.get(&destination.port()) else {
                return Route::Refused {
                    reason: "unknown_service_port",
                    why: format!(
                        "{destination}: service {} has no port {}",
                        service.name,
                        destination.port()
                    ),
                };
            };
            let candidates: Vec<SocketAddr> = service
                .endpoints
                .iter()
                .map(|ip| SocketAddr::new(*ip, target_port))
                .collect();
            if candidates.is_empty() {
                return Route::Refused {
                    reason: "no_endpoints",
                    why: format!("{destination}: service {} has no endpoints", service.name),
                };
            }
            let chosen = candidates[pick(&candidates).min(candidates.len() - 1)];
            return self
                .mesh_route(chosen.ip(), target_port)
                .unwrap_or(Route::Passthrough(chosen));
        }
        if let Some(route) = self.mesh_route(ip, destination.port()) {
            return route;
        }
        match self.settings.outbound_policy {
            OutboundPolicy::Passthrough => Route::Passthrough(destination),
            OutboundPolicy::RegistryOnly => Route::Refused {
                reason: "registry_only",
                why: format!(
                    "{destination} is not a meshed workload or service and the outbound policy is registry-only"
                ),
            },
        }
    }

    /// The snapshot as JSON, for /debug/config.
    pub fn to_json(&self) -> serde_json::Value {
        let peers: BTreeMap<String, _> = self
            .peers
            .iter()
            .map(|(ip, p)| {
                (
                    ip.to_string(),
                    json!({"spiffe_id": p.id.as_str(), "mesh_port": p.mesh_port}),
                )
            })
            .collect();
        let services: BTreeMap<String, _> = self
            .services
            .iter()
            .map(|(vip, s)| {
                (
                    vip.to_string(),
                    json!({
                        "service": s.name,
                        "ports": s.ports.iter().map(|(p, t)| (p.to_string(), *t)).collect::<BTreeMap<_, _>>(),
                        "endpoints": s.endpoints.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                    }),
                )
            })
            .collect();
        let mut policies: Vec<_> = self.policies.iter().map(policy_json).collect();
        policies.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        json!({
            "workloads": peers,
            "services": services,
            "policies": policies,
            "mtls": {
                "default": self.settings.mtls.as_str(),
                "ports": self.settings.port_mtls.iter().map(|(p, m)| (p.to_string(), m.as_str())).collect::<BTreeMap<_, _>>(),
            },
            "outbound_policy": self.settings.outbound_policy.as_str(),
        })
    }
}

/// A policy as JSON, for /debug/config.
fn policy_json(policy: &Policy) -> serde_json::Value {
    let rules: Vec<_> = policy
        .rules
        .iter()
        .map(|r| {
            let principals: Vec<_> = r
                .principals
                .iter()
                .map(|p| match p {
                    Principal::Exact(s) => json!({"exact": s}),
                    Principal::Prefix(s) => json!({"prefix": s}),
                })
                .collect();
            json!({"principals": principals, "namespaces": r.namespaces, "ports": r.ports})
        })
        .collect();
    json!({
        "name": policy.resource_name(),
        "action": policy.action.as_str(),
        "rules": rules,
    })
}

/// The current snapshot and the local flags it is built with. Discovery publishes; the data
/// path loads and subscribes (to re-check open connections after a change).
pub struct MeshState {
    local: LocalConfig,
    snapshot: ArcSwap<MeshSnapshot>,
    changes: tokio::sync::watch::Sender<u64>,
    /// The on-demand lookups, when discovery is on demand (`None`: wildcard or no discovery).
    demand: Option<Demand>,
}

impl MeshState {
    /// The flag-only snapshot, until discovery publishes.
    pub fn new(local: LocalConfig) -> Self {
        let snapshot = MeshSnapshot::build(&Discovered::default(), &local);
        Self {
            local,
            snapshot: ArcSwap::from_pointee(snapshot),
            changes: tokio::sync::watch::Sender::new(0),
            demand: None,
        }
    }

    /// `new`, with discovery on demand: destinations are looked up as the data path meets them.
    pub fn on_demand(local: LocalConfig, demand: Demand) -> Self {
        Self {
            demand: Some(demand),
            ..Self::new(local)
        }
    }

    /// The on-demand lookups, when discovery is on demand.
    pub fn demand(&self) -> Option<&Demand> {
        self.demand.as_ref()
    }

    /// Before routing a new connection to `ip`: with on-demand discovery, a destination the
    /// snapshot does not know is looked up, waiting for the answer at most the lookup timeout
    /// (not at all while no discovery stream is open); a known one is marked used. Returns
    /// the lookup's result ("found", "not_found", "timeout", "discovery_down"), or `None` when
    /// there was nothing to look up.
    pub async fn wait_for(&self, ip: IpAddr) -> Option<&'static str> {
        let demand = self.demand.as_ref()?;
        if self.load().knows(ip) {
            demand.touch(ip);
            return None;
        }
        // Receivers first, so an answer recorded after `want` is not missed.
        let mut answers = demand.answered.subscribe();
        let mut changes = self.changes.subscribe();
        match demand.want(ip) {
            // Answered before: the mesh has no such destination (negative, still fresh).
            Want::Answered => return None,
            Want::Full => return Some("table_full"),
            Want::Waiting => {}
        }
        if !demand.is_connected() {
            // No stream to answer: asked again once one is open; this connection goes on.
            return Some("discovery_down");
        }
        let deadline = tokio::time::sleep(demand.config.lookup_timeout);
        tokio::pin!(deadline);
        loop {
            if self.load().knows(ip) {
                return Some("found");
            }
            if demand.is_answered(ip) {
                return Some("not_found");
            }
            tokio::select! {
                _ = &mut deadline => return Some("timeout"),
                changed = answers.changed() => if changed.is_err() { return Some("timeout") },
                changed = changes.changed() => if changed.is_err() { return Some("timeout") },
            }
        }
    }

    /// The current snapshot (cheap; hold it only for the duration of one decision).
    pub fn load(&self) -> Guard<Arc<MeshSnapshot>> {
        self.snapshot.load()
    }

    /// Rebuilds the snapshot from `discovered`, swaps it in and wakes subscribers.
    pub fn publish(&self, discovered: &Discovered) {
        let snapshot = MeshSnapshot::build(discovered, &self.local);
        self.snapshot.store(Arc::new(snapshot));
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// A receiver that wakes after every `publish`.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// How on-demand discovery treats the destinations it looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemandConfig {
    /// How long the first connection to an unknown destination waits for the answer before it
    /// follows the outbound policy.
    pub lookup_timeout: Duration,
    /// A destination not connected to for this long is unsubscribed.
    pub idle_timeout: Duration,
    /// How long an address the mesh does not know stays subscribed (so that connections to it
    /// pass through or are refused at once) after its answer.
    pub negative_ttl: Duration,
}

impl Default for DemandConfig {
    fn default() -> Self {
        Self {
            lookup_timeout: Duration::from_millis(1500),
            idle_timeout: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(30),
        }
    }
}

/// Addresses a proxy holds subscribed at most (the control plane takes 4,096 per stream).
/// An app that connects to more distinct unknown addresses within their expiry (a scan)
/// makes the extra connections follow the outbound policy at once, without a lookup, rather
/// than growing this table or having the control plane end the stream.
pub const MAX_LOOKUPS: usize = 2048;

/// What `Demand::want` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Answered before; the snapshot says the rest.
    Answered,
    /// Asked for (now or by an earlier connection); the answer is pending.
    Waiting,
    /// The table is full: not looked up.
    Full,
}

/// Where a looked-up address stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// Asked for by the data path; not yet sent to the control plane.
    Wanted,
    /// Subscribed; waiting for the answer of each type (Workload, Service).
    Sent { workload: bool, service: bool },
    /// Both types answered, at this time; the snapshot says whether it is in the mesh.
    Answered(Instant),
}

#[derive(Debug, Clone, Copy)]
struct DemandEntry {
    lookup: Lookup,
    last_used: Instant,
    /// Configured destinations (explicit listeners) are never unsubscribed.
    pinned: bool,
}

/// The on-demand lookups: every address the proxy subscribed to by name (or is about to),
/// with when it was last used. The data path adds and touches entries; the xDS client sends
/// them, records their answers and drops idle ones. Bounded by what the app connects to
/// within `idle_timeout`.
#[derive(Debug)]
pub struct Demand {
    pub config: DemandConfig,
    entries: Mutex<HashMap<IpAddr, DemandEntry>>,
    /// Woken when an address is wanted.
    wanted: tokio::sync::Notify,
    /// Bumped when lookups are answered.
    answered: tokio::sync::watch::Sender<u64>,
    /// Whether a discovery stream is open (no lookup waits for an answer that cannot come).
    connected: std::sync::atomic::AtomicBool,
}

impl Demand {
    /// A table holding the configured destinations `pinned` (subscribed at start, never
    /// dropped).
    pub fn new(config: DemandConfig, pinned: impl IntoIterator<Item = IpAddr>) -> Self {
        let now = Instant::now();
        let entries = pinned
            .into_iter()
            .map(|ip| {
                let entry = DemandEntry {
                    lookup: Lookup::Wanted,
                    last_used: now,
                    pinned: true,
                };
                (ip, entry)
            })
            .collect();
        Self {
            config,
            entries: Mutex::new(entries),
            wanted: tokio::sync::Notify::new(),
            answered: tokio::sync::watch::Sender::new(0),
            connected: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Set by the xDS client when a stream opens or ends.
    pub fn set_connected(&self, connected: bool) {
        self.connected
            .store(connected, std::sync::atomic::Ordering::Release);
    }

    fn is_connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::Acquire)
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, DemandEntry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `ip` used now, if it is subscribed.
    pub fn touch(&self, ip: IpAddr) {
        if let Some(entry) = self.entries().get_mut(&ip) {
            entry.last_used = Instant::now();
        }
    }

    /// Asks for `ip` (marking it used).
    fn want(&self, ip: IpAddr) -> Want {
        let now = Instant::now();
        let mut entries = self.entries();
        if entries.len() >= MAX_LOOKUPS && !entries.contains_key(&ip) {
            return Want::Full;
        }
        let entry = entries.entry(ip).or_insert(DemandEntry {
            lookup: Lookup::Wanted,
            last_used: now,
            pinned: false,
        });
        entry.last_used = now;
        let answered = matches!(entry.lookup, Lookup::Answered(_));
        let new = entry.lookup == Lookup::Wanted;
        drop(entries);
        if new {
            self.wanted.notify_one();
        }
        if answered {
            Want::Answered
        } else {
            Want::Waiting
        }
    }

    fn is_answered(&self, ip: IpAddr) -> bool {
        self.entries()
            .get(&ip)
            .is_some_and(|e| matches!(e.lookup, Lookup::Answered(_)))
    }

    /// Resolves once an address is wanted (a permit is kept if nobody waits).
    pub async fn wanted(&self) {
        self.wanted.notified().await
    }

    /// The wanted addresses not sent yet, now marked sent.
    pub fn take_wanted(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (ip, entry) in self.entries().iter_mut() {
            if entry.lookup == Lookup::Wanted {
                entry.lookup = Lookup::Sent {
                    workload: false,
                    service: false,
                };
                out.push(*ip);
            }
        }
        out.sort();
        out
    }

    /// Every address, for a new stream's subscriptions; those not answered yet are now
    /// waiting for that stream's answer.
    pub fn subscriptions(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (ip, entry) in self.entries().iter_mut() {
            if !matches!(entry.lookup, Lookup::Answered(_)) {
                entry.lookup = Lookup::Sent {
                    workload: false,
                    service: false,
                };
            }
            out.push(*ip);
        }
        out.sort();
        out
    }

    /// Records a complete response of Workload (`workload`) or Service type: an address
    /// waiting for it is answered by that type when `covers` says the snapshot now has it
    /// as that type, or when the control plane named it in `removed` (it has no such one).
    /// Returns how many lookups are now answered (found or not).
    pub fn record_answer(
        &self,
        workload: bool,
        removed: &[String],
        covers: impl Fn(IpAddr) -> bool,
    ) -> usize {
        let now = Instant::now();
        let mut done = 0;
        for (ip, entry) in self.entries().iter_mut() {
            let Lookup::Sent {
                workload: mut w,
                service: mut s,
            } = entry.lookup
            else {
                continue;
            };
            let answered = covers(*ip) || removed.iter().any(|r| r.parse() == Ok(*ip));
            if workload {
                w |= answered;
            } else {
                s |= answered;
            }
            entry.lookup = if w && s {
                done += 1;
                Lookup::Answered(now)
            } else {
                Lookup::Sent {
                    workload: w,
                    service: s,
                }
            };
        }
        if done > 0 {
            self.answered.send_modify(|n| *n += 1);
        }
        done
    }

    /// Drops and returns the addresses to unsubscribe at `now`: unused for `idle_timeout`, or
    /// answered as unknown (`known` false) more than `negative_ttl` ago. Configured ones stay.
    pub fn expire(&self, now: Instant, known: impl Fn(IpAddr) -> bool) -> Vec<IpAddr> {
        let mut out = Vec::new();
        self.entries().retain(|ip, entry| {
            let idle = now.saturating_duration_since(entry.last_used) >= self.config.idle_timeout;
            let stale_negative = matches!(entry.lookup, Lookup::Answered(at)
                if now.saturating_duration_since(at) >= self.config.negative_ttl && !known(*ip));
            let expired = !entry.pinned && (idle || stale_negative);
            if expired {
                out.push(*ip);
            }
            !expired
        });
        out.sort();
        out
    }

    /// How many addresses are subscribed (or about to be).
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// True when no address is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use latch_mesh::ServicePort;
    use latch_mesh::ports::INBOUND_MTLS;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn held<T>(value: T) -> Held<T> {
        Held {
            version: "v1".into(),
            value,
        }
    }

    /// demo/web at 10.0.0.2 and 10.0.0.3 (mesh port 15008), service demo/api on VIP
    /// 10.96.0.10 port 80 -> 8080 with endpoints 10.0.0.2 (meshed) and 10.1.0.9 (not).
    fn discovered() -> Discovered {
        let mut d = Discovered::default();
        d.workloads.insert(
            "demo/web".into(),
            held(Workload {
                name: "web".into(),
                namespace: "demo".into(),
                spiffe_id: id("spiffe://cluster.local/ns/demo/sa/web"),
                ips: vec![ip("10.0.0.2"), ip("10.0.0.3")],
                mesh_port: INBOUND_MTLS,
                labels: BTreeMap::new(),
            }),
        );
        d.services.insert(
            "demo/api".into(),
            held(Service {
                name: "api".into(),
                namespace: "demo".into(),
                vips: vec![ip("10.96.0.10")],
                hostnames: Vec::new(),
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                    name: "http".into(),
                }],
                endpoints: vec![ip("10.0.0.2"), ip("10.1.0.9")],
            }),
        );
        d
    }

    fn mesh(mode: MtlsMode, policy: OutboundPolicy) -> Held<CheckedMeshConfig> {
        held(CheckedMeshConfig {
            settings: MeshSettings {
                mtls: mode,
                port_mtls: [(9090, MtlsMode::Permissive)].into(),
                outbound_policy: policy,
            },
            bundle: None,
            revocations: Default::default(),
            jwt_bundle: None,
        })
    }

    #[test]
    fn flag_only_snapshot_routes_peers_and_passes_the_rest_through() {
        let web = id("spiffe://cluster.local/ns/a/sa/web");
        let local = LocalConfig {
            peers: vec![(
                ip("10.0.0.2"),
                MeshPeer {
                    id: web.clone(),
                    mesh_port: INBOUND_MTLS,
                },
            )],
            ..LocalConfig::default()
        };
        let snapshot = MeshSnapshot::build(&Discovered::default(), &local);
        assert_eq!(
            snapshot.route(addr("10.0.0.2:80"), |_| 0),
            Route::Mesh {
                mesh_addr: addr("10.0.0.2:15008"),
                id: web,
                target_port: 80
            }
        );
        let other = addr("10.0.0.3:80");
        assert_eq!(snapshot.route(other, |_| 0), Route::Passthrough(other));
        assert_eq!(
            snapshot.settings,
            MeshSettings::uniform(MtlsMode::Strict, OutboundPolicy::Passthrough)
        );
    }

    #[test]
    fn vip_routes_to_the_picked_endpoint_meshed_or_plain() {
        let snapshot = MeshSnapshot::build(&discovered(), &LocalConfig::default());
        let mut offered = Vec::new();
        let route = snapshot.route(addr("10.96.0.10:80"), |c| {
            offered = c.to_vec();
            0
        });
        assert_eq!(offered, vec![addr("10.0.0.2:8080"), addr("10.1.0.9:8080")]);
        assert_eq!(
            route,
            Route::Mesh {
                mesh_addr: addr("10.0.0.2:15008"),
                id: id("spiffe://cluster.local/ns/demo/sa/web"),
                target_port: 8080
            }
        );
        assert_eq!(
            snapshot.route(addr("10.96.0.10:80"), |_| 1),
            Route::Passthrough(addr("10.1.0.9:8080"))
        );
    }

    #[test]
    fn vip_with_unknown_port_or_no_endpoints_is_refused() {
        let mut d = discovered();
        let snapshot = MeshSnapshot::build(&d, &LocalConfig::default());
        assert!(matches!(
            snapshot.route(addr("10.96.0.10:81"), |_| 0),
            Route::Refused {
                reason: "unknown_service_port",
                ..
            }
        ));
        d.services
            .get_mut("demo/api")
            .unwrap()
            .value
            .endpoints
            .clear();
        let snapshot = MeshSnapshot::build(&d, &LocalConfig::default());
        assert!(matches!(
            snapshot.route(addr("10.96.0.10:80"), |_| panic!("nothing to pick")),
            Route::Refused {
                reason: "no_endpoints",
                ..
            }
        ));
    }

    #[test]
    fn workload_ip_keeps_the_original_port_and_unknown_follows_the_outbound_policy() {
        let mut d = discovered();
        let snapshot = MeshSnapshot::build(&d, &LocalConfig::default());
        assert_eq!(
            snapshot.route(addr("10.0.0.3:5432"), |_| 0),
            Route::Mesh {
                mesh_addr: addr("10.0.0.3:15008"),
                id: id("spiffe://cluster.local/ns/demo/sa/web"),
                target_port: 5432
            }
        );
        // An unmeshed service endpoint is not a meshed workload when dialled directly.
        assert_eq!(
            snapshot.route(addr("10.1.0.9:8080"), |_| 0),
            Route::Passthrough(addr("10.1.0.9:8080"))
        );
        d.mesh.insert(
            "mesh".into(),
            mesh(MtlsMode::Strict, OutboundPolicy::RegistryOnly),
        );
        let snapshot = MeshSnapshot::build(&d, &LocalConfig::default());
        assert!(matches!(
            snapshot.route(addr("10.1.0.9:8080"), |_| 0),
            Route::Refused {
                reason: "registry_only",
                ..
            }
        ));
        // Registry-only still reaches what the registry knows.
        assert!(matches!(
            snapshot.route(addr("10.96.0.10:80"), |_| 1),
            Route::Passthrough(_)
        ));
    }

    #[test]
    fn discovery_wins_over_peer_flags_for_the_ips_it_knows() {
        let flagged = id("spiffe://cluster.local/ns/old/sa/web");
        let local = LocalConfig {
            peers: vec![
                (
                    ip("10.0.0.2"),
                    MeshPeer {
                        id: flagged.clone(),
                        mesh_port: 25008,
                    },
                ),
                (
                    ip("10.0.0.9"),
                    MeshPeer {
                        id: flagged.clone(),
                        mesh_port: 25008,
                    },
                ),
            ],
            ..LocalConfig::default()
        };
        let snapshot = MeshSnapshot::build(&discovered(), &local);
        assert_eq!(
            snapshot.peers[&ip("10.0.0.2")].id.as_str(),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
        assert_eq!(
            snapshot.peers[&ip("10.0.0.9")],
            MeshPeer {
                id: flagged,
                mesh_port: 25008
            }
        );
    }

    #[test]
    fn mesh_config_decides_unless_a_flag_overrides() {
        let mut d = discovered();
        d.mesh.insert(
            "mesh".into(),
            mesh(MtlsMode::Strict, OutboundPolicy::RegistryOnly),
        );
        let snapshot = MeshSnapshot::build(&d, &LocalConfig::default());
        assert_eq!(snapshot.settings.mtls_for_port(80), MtlsMode::Strict);
        assert_eq!(snapshot.settings.mtls_for_port(9090), MtlsMode::Permissive);
        assert_eq!(
            snapshot.settings.outbound_policy,
            OutboundPolicy::RegistryOnly
        );

        let local = LocalConfig {
            inbound_mode: Some(MtlsMode::Strict),
            outbound_policy: Some(OutboundPolicy::Passthrough),
            ..LocalConfig::default()
        };
        let snapshot = MeshSnapshot::build(&d, &local);
        assert_eq!(
            snapshot.settings.mtls_for_port(9090),
            MtlsMode::Strict,
            "--inbound-mode wins over port_mtls too"
        );
        assert_eq!(
            snapshot.settings.outbound_policy,
            OutboundPolicy::Passthrough
        );

        let local = LocalConfig {
            inbound_mode: Some(MtlsMode::Permissive),
            ..LocalConfig::default()
        };
        let snapshot = MeshSnapshot::build(&d, &local);
        assert_eq!(snapshot.settings.mtls_for_port(80), MtlsMode::Permissive);
        assert_eq!(
            snapshot.settings.outbound_policy,
            OutboundPolicy::RegistryOnly
        );
    }

    #[test]
    fn demand_answers_lookups_only_once_both_types_did_and_drops_idle_and_unknown_ones() {
        let config = DemandConfig {
            lookup_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
        };
        let pinned = ip("10.96.0.10");
        let demand = Demand::new(config, [pinned]);
        assert_eq!(
            demand.subscriptions(),
            [pinned],
            "configured destinations at start"
        );
        assert_eq!(
            demand.want(ip("10.0.0.2")),
            Want::Waiting,
            "a new one waits"
        );
        assert_eq!(demand.want(ip("10.0.0.9")), Want::Waiting);
        assert_eq!(demand.take_wanted(), [ip("10.0.0.2"), ip("10.0.0.9")]);
        assert!(demand.take_wanted().is_empty(), "sent once");
        // The Workload answer: 10.0.0.2 is a workload, 10.0.0.9 is no workload's address.
        let workload_ip = |addr: IpAddr| addr == ip("10.0.0.2");
        let none: [String; 0] = [];
        assert_eq!(
            demand.record_answer(true, &["10.0.0.9".to_string()], workload_ip),
            0,
            "the Service answers are still missing"
        );
        assert!(!demand.is_answered(ip("10.0.0.2")));
        // The Service answer: the VIP is a service; the other two are no service's.
        let answered = demand.record_answer(
            false,
            &["10.0.0.2".to_string(), "10.0.0.9".to_string()],
            |addr| addr == pinned,
        );
        assert_eq!(answered, 2);
        assert!(demand.is_answered(ip("10.0.0.9")) && demand.is_answered(ip("10.0.0.2")));
        assert!(
            !demand.is_answered(pinned),
            "its Workload answer is missing"
        );
        assert_eq!(demand.record_answer(true, &none, |_| false), 0);
        assert_eq!(
            demand.want(ip("10.0.0.9")),
            Want::Answered,
            "no second lookup"
        );

        // The unknown one goes after negative_ttl, the known one after idle_timeout, the
        // configured one never.
        let now = Instant::now();
        let known = |addr: IpAddr| addr != ip("10.0.0.9");
        assert!(demand.expire(now, known).is_empty());
        assert_eq!(
            demand.expire(now + Duration::from_secs(6), known),
            [ip("10.0.0.9")]
        );
        assert_eq!(
            demand.expire(now + Duration::from_secs(61), known),
            [ip("10.0.0.2")]
        );
        assert!(
            demand
                .expire(now + Duration::from_secs(3600), known)
                .is_empty()
        );
        assert_eq!(demand.len(), 1);
    }

    #[test]
    fn publish_swaps_the_snapshot_and_wakes_subscribers() {
        let state = MeshState::new(LocalConfig::default());
        let changes = state.subscribe();
        assert!(state.load().services.is_empty());
        state.publish(&discovered());
        assert!(changes.has_changed().unwrap());
        assert_eq!(state.load().services.len(), 1);
    }
}
