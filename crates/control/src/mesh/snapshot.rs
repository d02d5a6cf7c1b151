//! Immutable snapshots of the mesh as proxies see it: per resource type, name -> resource
//! encoded once (`prost_types::Any`) with its content-hash version. A new snapshot reuses the
//! previous one's `Arc`s for everything unchanged, so discovery streams diff by pointer.
//! Also answers which policies a caller may see, and what an on-demand subscription name (a
//! workload IP, a service VIP or a resource name) stands for, through indexes by IP, VIP and
//! namespace built once per snapshot so that no lookup scans the mesh.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use latch_identity::SpiffeId;
use latch_identity::bundle::sha256_hex;
use latch_proto::mesh as proto;
use prost::Message;

use latch_mesh::{MeshConfig, Workload};

use super::model::MeshModel;

/// Hex characters of SHA-256 kept in a version string.
const VERSION_LEN: usize = 16;

/// The four resource types, in the order a proxy applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceType {
    MeshConfig,
    Workload,
    Service,
    AuthorizationPolicy,
}

impl ResourceType {
    pub const ALL: [ResourceType; 4] = [
        ResourceType::MeshConfig,
        ResourceType::Workload,
        ResourceType::Service,
        ResourceType::AuthorizationPolicy,
    ];

    pub fn type_url(self) -> &'static str {
        use latch_proto::type_url;
        match self {
            ResourceType::MeshConfig => type_url::MESH_CONFIG,
            ResourceType::Workload => type_url::WORKLOAD,
            ResourceType::Service => type_url::SERVICE,
            ResourceType::AuthorizationPolicy => type_url::AUTHORIZATION_POLICY,
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Short name for logs and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            ResourceType::MeshConfig => "mesh_config",
            ResourceType::Workload => "workload",
            ResourceType::Service => "service",
            ResourceType::AuthorizationPolicy => "authorization_policy",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether a proxy may subscribe to resources of this type by name (on demand) instead of
    /// with the wildcard. MeshConfig is one resource and the policies a caller sees are
    /// already only those that select it, so both are served by wildcard only.
    pub fn on_demand(self) -> bool {
        matches!(self, ResourceType::Workload | ResourceType::Service)
    }
}

/// One resource ready to send: encoded once, shared by every stream that sends it.
#[derive(Debug, PartialEq)]
pub struct VersionedResource {
    pub name: Arc<str>,
    /// First 16 hex characters of SHA-256 of the encoded message.
    pub version: String,
    pub body: prost_types::Any,
}

/// Every resource of one type, by name.
pub type ResourceMap = BTreeMap<Arc<str>, Arc<VersionedResource>>;

/// The version of a set of resources: a hash over its sorted name=version pairs. This is
/// `system_version_info` in discovery responses.
pub fn set_version<'a>(entries: impl Iterator<Item = &'a Arc<VersionedResource>>) -> String {
    let mut text = String::new();
    for entry in entries {
        let _ = writeln!(text, "{}={}", entry.name, entry.version);
    }
    short_hash(text.as_bytes())
}

fn short_hash(data: &[u8]) -> String {
    let mut hex = sha256_hex(data);
    hex.truncate(VERSION_LEN);
    hex
}

/// All resources of one type in a snapshot.
#[derive(Debug)]
pub struct TypeSnapshot {
    pub resources: Arc<ResourceMap>,
    /// `set_version` of all of them.
    pub version: String,
    /// What changed since the previous snapshot's map, computed once for every stream that
    /// holds that map.
    pub delta: Option<TypeDelta>,
}

/// The difference between a previous map of a type and the current one.
#[derive(Debug)]
pub struct TypeDelta {
    /// The map this delta starts from (compared by pointer; `Weak` so it is not kept alive).
    pub from: Weak<ResourceMap>,
    /// Added or changed resources.
    pub changed: Vec<Arc<VersionedResource>>,
    /// Names no longer present.
    pub removed: Vec<Arc<str>>,
}

impl TypeDelta {
    /// True when this delta starts from `held`.
    pub fn starts_from(&self, held: &Arc<ResourceMap>) -> bool {
        std::ptr::eq(self.from.as_ptr(), Arc::as_ptr(held))
    }
}

/// What `held` lacks of `current` (new, or at another version) and what it holds that
/// `current` does not.
pub fn diff(
    held: &ResourceMap,
    current: &ResourceMap,
) -> (Vec<Arc<VersionedResource>>, Vec<Arc<str>>) {
    let changed = current
        .iter()
        .filter(|(name, res)| {
            held.get(*name)
                .is_none_or(|h| !Arc::ptr_eq(h, res) && h.version != res.version)
        })
        .map(|(_, res)| res.clone())
        .collect();
    let removed = held
        .keys()
        .filter(|name| !current.contains_key(*name))
        .cloned()
        .collect();
    (changed, removed)
}

/// The mesh at one moment, as every discovery stream reads it.
#[derive(Debug)]
pub struct MeshSnapshot {
    /// Counts published models that changed something; 0 is the start-up model.
    pub generation: u64,
    /// A hash over the four type versions: equal for equal content, across restarts too.
    pub version: String,
    /// When the model was published.
    pub loaded_at: SystemTime,
    pub model: Arc<MeshModel>,
    /// SHA-256 (hex) of the MeshConfig's trust bundle PEM: what a proxy's MeshConfig ACK
    /// confirms it holds.
    pub trust_bundle_sha256: Arc<str>,
    types: [TypeSnapshot; 4],
    /// SPIFFE ID -> names of the workloads that have it.
    workloads_by_id: HashMap<String, Vec<String>>,
    /// Workload IP -> names of the workloads that have it (the first by name is the one
    /// proxies route to; the others are sent too, so a proxy sees the clash as it would with
    /// the wildcard).
    workloads_by_ip: HashMap<IpAddr, Vec<Arc<str>>>,
    /// Service VIP -> names of the services that have it.
    services_by_vip: HashMap<IpAddr, Vec<Arc<str>>>,
    /// Namespace -> names of its policies (a policy selects workloads of its namespace only).
    policies_by_namespace: HashMap<String, Vec<String>>,
}

impl MeshSnapshot {
    /// Encodes `model` (with `trust_bundle_pem` and `revocations` in the MeshConfig, and no JWT
    /// bundle), reusing `previous`'s shared resources wherever the content is the same.
    pub fn build(
        model: MeshModel,
        trust_bundle_pem: &str,
        revocations: &BTreeMap<SpiffeId, SystemTime>,
        previous: Option<&MeshSnapshot>,
        generation: u64,
    ) -> Self {
        Self::build_with_jwt(
            model,
            trust_bundle_pem,
            "",
            revocations,
            previous,
            generation,
        )
    }

    /// `build`, with the JWT bundle (JWKS JSON) in the MeshConfig too.
    pub fn build_with_jwt(
        model: MeshModel,
        trust_bundle_pem: &str,
        jwt_bundle_jwks: &str,
        revocations: &BTreeMap<SpiffeId, SystemTime>,
        previous: Option<&MeshSnapshot>,
        generation: u64,
    ) -> Self {
        let prev = |ty: ResourceType| previous.map(|p| &p.types[ty.index()].resources);
        let mesh_config = encode_all(
            [(
                Arc::from(latch_proto::MESH_CONFIG_NAME),
                proto::MeshConfig::from(&MeshConfig {
                    settings: model.settings.clone(),
                    trust_bundle_pem: trust_bundle_pem.to_string(),
                    revocations: revocations.clone(),
                    jwt_bundle_jwks: jwt_bundle_jwks.to_string(),
                })
                .encode_to_vec(),
            )],
            ResourceType::MeshConfig,
            prev(ResourceType::MeshConfig),
        );
        let workloads = encode_all(
            model.workloads.iter().map(|(k, w)| {
                (
                    Arc::from(k.as_str()),
                    proto::Workload::from(w).encode_to_vec(),
                )
            }),
            ResourceType::Workload,
            prev(ResourceType::Workload),
        );
        let services = encode_all(
            model.services.iter().map(|(k, s)| {
                (
                    Arc::from(k.as_str()),
                    proto::Service::from(s).encode_to_vec(),
                )
            }),
            ResourceType::Service,
            prev(ResourceType::Service),
        );
        let policies = encode_all(
            model.policies.iter().map(|(k, p)| {
                (
                    Arc::from(k.as_str()),
                    proto::AuthorizationPolicy::from(p).encode_to_vec(),
                )
            }),
            ResourceType::AuthorizationPolicy,
            prev(ResourceType::AuthorizationPolicy),
        );
        let types = [mesh_config, workloads, services, policies];
        let version = short_hash(
            types
                .iter()
                .map(|t| t.version.as_str())
                .collect::<Vec<_>>()
                .join(",")
                .as_bytes(),
        );
        let mut workloads_by_id: HashMap<String, Vec<String>> = HashMap::new();
        let mut workloads_by_ip: HashMap<IpAddr, Vec<Arc<str>>> = HashMap::new();
        for ((key, w), name) in model.workloads.iter().zip(types[1].resources.keys()) {
            workloads_by_id
                .entry(w.spiffe_id.to_string())
                .or_default()
                .push(key.clone());
            for ip in &w.ips {
                workloads_by_ip.entry(*ip).or_default().push(name.clone());
            }
        }
        let mut services_by_vip: HashMap<IpAddr, Vec<Arc<str>>> = HashMap::new();
        for (s, name) in model.services.values().zip(types[2].resources.keys()) {
            for vip in &s.vips {
                services_by_vip.entry(*vip).or_default().push(name.clone());
            }
        }
        let mut policies_by_namespace: HashMap<String, Vec<String>> = HashMap::new();
        for (key, p) in &model.policies {
            policies_by_namespace
                .entry(p.namespace.clone())
                .or_default()
                .push(key.clone());
        }
        Self {
            generation,
            version,
            loaded_at: SystemTime::now(),
            model: Arc::new(model),
            trust_bundle_sha256: Arc::from(sha256_hex(trust_bundle_pem.as_bytes())),
            types,
            workloads_by_id,
            workloads_by_ip,
            services_by_vip,
            policies_by_namespace,
        }
    }

    /// Every resource of `ty` (for policies: all of them, before visibility filtering).
    pub fn resources(&self, ty: ResourceType) -> &Arc<ResourceMap> {
        &self.types[ty.index()].resources
    }

    /// What changed in `ty` since the previous snapshot, if there was one and it changed.
    pub fn delta(&self, ty: ResourceType) -> Option<&TypeDelta> {
        self.types[ty.index()].delta.as_ref()
    }

    /// `set_version` of every resource of `ty`.
    pub fn type_version(&self, ty: ResourceType) -> &str {
        &self.types[ty.index()].version
    }

    /// True when both snapshots hold the same resources at the same versions.
    pub fn same_content(&self, other: &MeshSnapshot) -> bool {
        self.version == other.version
    }

    /// The workloads a caller speaks for: the one named `node_id` if it has the caller's
    /// SPIFFE ID, otherwise every workload with the caller's SPIFFE ID.
    pub fn caller_workloads(&self, caller: &SpiffeId, node_id: &str) -> Vec<&Workload> {
        if let Some(w) = self
            .model
            .workloads
            .get(node_id)
            .filter(|w| w.spiffe_id == *caller)
        {
            return vec![w];
        }
        self.workloads_by_id
            .get(caller.as_str())
            .into_iter()
            .flatten()
            .filter_map(|name| self.model.workloads.get(name))
            .collect()
    }

    /// The authorization policies that select any of the caller's workloads.
    pub fn visible_policies(&self, caller: &SpiffeId, node_id: &str) -> ResourceMap {
        let workloads = self.caller_workloads(caller, node_id);
        if workloads.is_empty() {
            return ResourceMap::new();
        }
        let all = self.resources(ResourceType::AuthorizationPolicy);
        let mut namespaces: Vec<&str> = workloads.iter().map(|w| w.namespace.as_str()).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        namespaces
            .into_iter()
            .filter_map(|ns| self.policies_by_namespace.get(ns))
            .flatten()
            .filter(|key| {
                self.model
                    .policies
                    .get(key.as_str())
                    .is_some_and(|p| workloads.iter().any(|w| p.selects(w)))
            })
            .filter_map(|key| all.get_key_value(key.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The caller's own workloads as resources (what an on-demand proxy receives at start to
    /// serve its inbound traffic), added to `into`.
    pub fn own_workloads_into(&self, caller: &SpiffeId, node_id: &str, into: &mut ResourceMap) {
        let all = self.resources(ResourceType::Workload);
        for w in self.caller_workloads(caller, node_id) {
            if let Some((k, v)) = all.get_key_value(w.resource_name().as_str()) {
                into.insert(k.clone(), v.clone());
            }
        }
    }

    /// Adds to `into` the resources of `ty` that the on-demand subscription `name` brings, and
    /// returns whether `name` is known as a `ty` at all. Names are an IP address (Workload:
    /// the workloads with that IP, and the endpoint workloads of a service with that VIP, so
    /// a proxy can mesh to them; Service: the services with that VIP) or a resource name
    /// (`<namespace>/<name>`). Index lookups only: nothing here scans the mesh.
    pub fn resolve_into(&self, ty: ResourceType, name: &str, into: &mut ResourceMap) -> bool {
        let all = self.resources(ty);
        let Ok(ip) = name.parse::<IpAddr>() else {
            return match all.get_key_value(name) {
                Some((k, v)) => {
                    into.insert(k.clone(), v.clone());
                    true
                }
                None => false,
            };
        };
        let add = |names: Option<&Vec<Arc<str>>>, into: &mut ResourceMap| {
            for n in names.into_iter().flatten() {
                if let Some((k, v)) = all.get_key_value(n) {
                    into.insert(k.clone(), v.clone());
                }
            }
        };
        match ty {
            ResourceType::Workload => {
                let own = self.workloads_by_ip.get(&ip);
                add(own, into);
                for service in self.services_by_vip.get(&ip).into_iter().flatten() {
                    let Some(service) = self.model.services.get(&**service) else {
                        continue;
                    };
                    for endpoint in &service.endpoints {
                        add(self.workloads_by_ip.get(endpoint), into);
                    }
                }
                own.is_some()
            }
            ResourceType::Service => {
                let services = self.services_by_vip.get(&ip);
                add(services, into);
                services.is_some()
            }
            _ => false,
        }
    }
}

/// Wraps each encoded message with its version, reusing `previous`'s entry (and whole map)
/// when nothing changed.
fn encode_all(
    encoded: impl IntoIterator<Item = (Arc<str>, Vec<u8>)>,
    ty: ResourceType,
    previous: Option<&Arc<ResourceMap>>,
) -> TypeSnapshot {
    let mut map = ResourceMap::new();
    let mut reused = 0;
    for (name, bytes) in encoded {
        let version = short_hash(&bytes);
        let entry = match previous.and_then(|p| p.get(&name)) {
            Some(old) if old.version == version => {
                reused += 1;
                old.clone()
            }
            _ => Arc::new(VersionedResource {
                name: name.clone(),
                version,
                body: prost_types::Any {
                    type_url: ty.type_url().to_string(),
                    value: bytes,
                },
            }),
        };
        map.insert(name, entry);
    }
    let version = set_version(map.values());
    let (resources, delta) = match previous {
        Some(p) if p.len() == map.len() && reused == map.len() => (p.clone(), None),
        Some(p) => {
            let (changed, removed) = diff(p, &map);
            let delta = TypeDelta {
                from: Arc::downgrade(p),
                changed,
                removed,
            };
            (Arc::new(map), Some(delta))
        }
        None => (Arc::new(map), None),
    };
    TypeSnapshot {
        resources,
        version,
        delta,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use latch_identity::TrustDomain;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n";

    fn model(yaml: &str) -> MeshModel {
        FileConfig::parse(yaml)
            .unwrap()
            .mesh_model(&TrustDomain::new("cluster.local").unwrap())
            .unwrap()
    }

    fn build(yaml: &str, previous: Option<&MeshSnapshot>) -> MeshSnapshot {
        MeshSnapshot::build(model(yaml), PEM, &BTreeMap::new(), previous, 1)
    }

    fn version(s: &MeshSnapshot, ty: ResourceType, name: &str) -> String {
        s.resources(ty)[name].version.clone()
    }

    const BASE: &str = "workloads:\n\
        \x20 - {name: web, namespace: demo, service_account: web, ips: [10.0.0.2], labels: {app: web}}\n\
        \x20 - {name: api, namespace: demo, service_account: api, ips: [10.0.0.3], labels: {app: api}}\n\
        services:\n\
        \x20 - {name: api, namespace: demo, vips: [10.96.0.10], ports: [{port: 80, target_port: 8080}], selector: {app: api}}\n";

    #[test]
    fn empty_mesh_has_only_the_mesh_config_with_the_bundle() {
        let s = MeshSnapshot::build(MeshModel::default(), PEM, &BTreeMap::new(), None, 0);
        let mesh = &s.resources(ResourceType::MeshConfig)[latch_proto::MESH_CONFIG_NAME];
        let decoded = proto::MeshConfig::decode(mesh.body.value.as_slice()).unwrap();
        assert_eq!(decoded.trust_bundle_pem, PEM);
        assert_eq!(mesh.body.type_url, latch_proto::type_url::MESH_CONFIG);
        for ty in [
            ResourceType::Workload,
            ResourceType::Service,
            ResourceType::AuthorizationPolicy,
        ] {
            assert!(s.resources(ty).is_empty());
        }
    }

    #[test]
    fn versions_are_content_hashes() {
        let a = build(BASE, None);
        let b = build(BASE, None);
        assert_eq!(a.version, b.version, "equal content, equal model version");
        assert_eq!(
            version(&a, ResourceType::Workload, "demo/web"),
            version(&b, ResourceType::Workload, "demo/web")
        );
        let web = version(&a, ResourceType::Workload, "demo/web");
        assert_eq!(web.len(), 16);
        assert!(web.bytes().all(|c| c.is_ascii_hexdigit()));

        // A label of api changes api's version and, through the selector, nothing else here.
        let relabelled = BASE.replace("labels: {app: api}", "labels: {app: api, v: \"2\"}");
        let c = build(&relabelled, Some(&a));
        assert_ne!(a.version, c.version);
        assert_ne!(
            version(&a, ResourceType::Workload, "demo/api"),
            version(&c, ResourceType::Workload, "demo/api")
        );
        assert_eq!(
            version(&a, ResourceType::Workload, "demo/web"),
            version(&c, ResourceType::Workload, "demo/web")
        );
        assert_ne!(
            a.type_version(ResourceType::Workload),
            c.type_version(ResourceType::Workload)
        );
        assert_eq!(
            a.type_version(ResourceType::Service),
            c.type_version(ResourceType::Service)
        );
        // A new endpoint IP changes the service.
        let more = BASE.replace("ips: [10.0.0.3]", "ips: [10.0.0.3, 10.0.0.4]");
        let d = build(&more, Some(&a));
        assert_ne!(
            version(&a, ResourceType::Service, "demo/api"),
            version(&d, ResourceType::Service, "demo/api")
        );
    }

    #[test]
    fn unchanged_resources_keep_their_shared_pointers() {
        let a = build(BASE, None);
        let same = build(BASE, Some(&a));
        for ty in ResourceType::ALL {
            assert!(
                Arc::ptr_eq(a.resources(ty), same.resources(ty)),
                "{ty:?} map reused"
            );
        }
        let relabelled = BASE.replace("labels: {app: web}", "labels: {app: web, v: \"2\"}");
        let b = build(&relabelled, Some(&a));
        assert!(!Arc::ptr_eq(
            a.resources(ResourceType::Workload),
            b.resources(ResourceType::Workload)
        ));
        let (wa, wb) = (
            a.resources(ResourceType::Workload),
            b.resources(ResourceType::Workload),
        );
        assert!(Arc::ptr_eq(&wa["demo/api"], &wb["demo/api"]));
        assert!(!Arc::ptr_eq(&wa["demo/web"], &wb["demo/web"]));
        assert!(Arc::ptr_eq(
            a.resources(ResourceType::Service),
            b.resources(ResourceType::Service)
        ));
    }

    #[test]
    fn each_snapshot_carries_its_delta_from_the_previous_one() {
        let a = build(BASE, None);
        let b = build(
            &BASE.replace("labels: {app: web}", "labels: {app: web, v: \"2\"}"),
            Some(&a),
        );
        let delta = b.delta(ResourceType::Workload).expect("workloads changed");
        assert!(delta.starts_from(a.resources(ResourceType::Workload)));
        let changed: Vec<&str> = delta.changed.iter().map(|r| &*r.name).collect();
        assert_eq!(changed, ["demo/web"]);
        assert!(delta.removed.is_empty());
        assert!(
            b.delta(ResourceType::Service).is_none(),
            "services unchanged"
        );

        // A stream still holding `a` when `c` arrives cannot use c's delta (from b).
        let c = build(
            &BASE.replace("ips: [10.0.0.3]", "ips: [10.0.0.4]"),
            Some(&b),
        );
        let delta = c.delta(ResourceType::Workload).unwrap();
        assert!(!delta.starts_from(a.resources(ResourceType::Workload)));
        let (changed, removed) = diff(
            a.resources(ResourceType::Workload),
            c.resources(ResourceType::Workload),
        );
        assert_eq!(changed.len(), 1, "only api differs between a and c");
        assert_eq!(&*changed[0].name, "demo/api");
        assert!(removed.is_empty());
    }

    #[test]
    fn subscription_names_resolve_through_the_indexes() {
        let s = build(BASE, None);
        let resolve = |ty: ResourceType, name: &str| {
            let mut map = ResourceMap::new();
            let known = s.resolve_into(ty, name, &mut map);
            (known, map.keys().map(|k| k.to_string()).collect::<Vec<_>>())
        };
        let (w, v) = (ResourceType::Workload, ResourceType::Service);
        let table: [(ResourceType, &str, bool, &[&str]); 9] = [
            (w, "10.0.0.2", true, &["demo/web"]),
            // A VIP is no workload, but brings the service's endpoint workloads.
            (w, "10.96.0.10", false, &["demo/api"]),
            (v, "10.96.0.10", true, &["demo/api"]),
            (v, "10.0.0.3", false, &[]),
            (w, "10.0.0.99", false, &[]),
            (w, "demo/api", true, &["demo/api"]),
            (v, "demo/api", true, &["demo/api"]),
            (v, "demo/nope", false, &[]),
            (ResourceType::MeshConfig, "10.0.0.2", false, &[]),
        ];
        for (ty, name, known, names) in table {
            assert_eq!(
                resolve(ty, name),
                (known, names.iter().map(|n| n.to_string()).collect()),
                "{ty:?} {name}"
            );
        }
        let td = TrustDomain::new("cluster.local").unwrap();
        let mut own = ResourceMap::new();
        s.own_workloads_into(
            &SpiffeId::workload(&td, "demo", "web").unwrap(),
            "",
            &mut own,
        );
        assert_eq!(own.keys().map(|k| &**k).collect::<Vec<_>>(), ["demo/web"]);
    }

    #[test]
    fn callers_see_the_policies_selecting_their_workloads() {
        let yaml = "workloads:\n\
            \x20 - {name: web, namespace: demo, service_account: web, ips: [10.0.0.2], labels: {app: web}}\n\
            \x20 - {name: web2, namespace: demo, service_account: web, ips: [10.0.0.9], labels: {app: web, canary: \"yes\"}}\n\
            \x20 - {name: api, namespace: demo, service_account: api, ips: [10.0.0.3], labels: {app: api}}\n\
            policies:\n\
            \x20 - {name: all-demo, namespace: demo, action: ALLOW}\n\
            \x20 - {name: web, namespace: demo, selector: {app: web}, action: ALLOW}\n\
            \x20 - {name: canary, namespace: demo, selector: {canary: \"yes\"}, action: DENY}\n\
            \x20 - {name: api, namespace: demo, selector: {app: api}, action: ALLOW}\n\
            \x20 - {name: other-ns, namespace: other, action: ALLOW}\n";
        let s = build(yaml, None);
        let td = TrustDomain::new("cluster.local").unwrap();
        let web_id = SpiffeId::workload(&td, "demo", "web").unwrap();
        let api_id = SpiffeId::workload(&td, "demo", "api").unwrap();
        let stranger = SpiffeId::workload(&td, "demo", "db").unwrap();
        let names = |map: ResourceMap| map.keys().map(|k| k.to_string()).collect::<Vec<_>>();

        // node id names a workload with the caller's ID: only that workload counts.
        assert_eq!(
            names(s.visible_policies(&web_id, "demo/web")),
            ["demo/all-demo", "demo/web"]
        );
        assert_eq!(
            names(s.visible_policies(&web_id, "demo/web2")),
            ["demo/all-demo", "demo/canary", "demo/web"]
        );
        // No node id, or one naming another identity's workload: every workload with the ID.
        for node in ["", "demo/api", "demo/nonexistent"] {
            assert_eq!(
                names(s.visible_policies(&web_id, node)),
                ["demo/all-demo", "demo/canary", "demo/web"],
                "node {node:?}"
            );
        }
        assert_eq!(
            names(s.visible_policies(&api_id, "")),
            ["demo/all-demo", "demo/api"]
        );
        assert!(s.visible_policies(&stranger, "demo/web").is_empty());
    }
}
