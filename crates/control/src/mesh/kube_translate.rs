//! Turns what the Kubernetes API holds (Pods, Services, EndpointSlices and latch.dev
//! `AuthorizationPolicy` objects) into the mesh model. `translate` is a pure function of the
//! objects as the API returns them; an object that cannot be used is left out and reported in
//! `Translation::skipped`, never stopping the rest. Called by `kube_source` on every change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::DynamicObject;
use kube::core::ObjectMeta;
use latch_identity::TrustDomain;
use serde::Deserialize;

use latch_mesh::{MeshSettings, Workload, resource_name};

use super::model::{self, MeshModel};
use super::spec::{PolicySpec, RuleSpec, ServicePortSpec, ServiceSpec, WorkloadSpec};

/// The label the EndpointSlice controller puts on a slice, naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Everything the source watches, keyed "<namespace>/<name>".
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub pods: BTreeMap<String, Pod>,
    pub services: BTreeMap<String, KubeService>,
    pub endpoint_slices: BTreeMap<String, EndpointSlice>,
    pub policies: BTreeMap<String, DynamicObject>,
}

/// An object (or part of one) left out of the model, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    /// Pod, Service or AuthorizationPolicy; ConfigFile for an entry of the config file.
    pub kind: &'static str,
    /// "<namespace>/<name>" ("workload <namespace>/<name>" and so on for ConfigFile).
    pub object: String,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.reason)
    }
}

/// The model the cluster describes, and what had to be left out of it.
#[derive(Debug, Clone, Default)]
pub struct Translation {
    pub model: MeshModel,
    pub skipped: Vec<Skipped>,
}

/// `spec` of an `AuthorizationPolicy` (deploy/kubernetes/10-crd-authorizationpolicy.yaml): the
/// fields of a config file's `policies:` entry without name and namespace.
#[derive(Debug, Deserialize)]
struct PolicyObjectSpec {
    #[serde(default)]
    selector: BTreeMap<String, String>,
    action: String,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

fn meta_key(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// True for a pod the injector has changed: it records `latch.dev/status`, and the proxy runs
/// as the `latch-proxy` (init) container.
pub fn is_meshed(pod: &Pod) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(latch_inject::ANNOTATION_STATUS));
    let has_proxy = pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == latch_inject::PROXY_CONTAINER)
    });
    annotated || has_proxy
}

fn is_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Running")
}

/// The pod's IPs: `status.podIPs`, or `status.podIP` from API servers that only set that.
fn pod_ips(pod: &Pod) -> Vec<String> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed: Vec<String> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.clone())
        .filter(|ip| !ip.is_empty())
        .collect();
    if !listed.is_empty() {
        return listed;
    }
    status
        .pod_ip
        .iter()
        .filter(|ip| !ip.is_empty())
        .cloned()
        .collect()
}

/// Builds the mesh model: `settings` (from the config file) plus the cluster's workloads,
/// services and policies.
pub fn translate(
    objects: &ClusterObjects,
    trust_domain: &TrustDomain,
    settings: &MeshSettings,
) -> Translation {
    let mut out = Translation {
        model: MeshModel {
            settings: settings.clone(),
            ..MeshModel::default()
        },
        skipped: Vec::new(),
    };
    add_workloads(objects, trust_domain, &mut out);
    add_services(objects, &mut out);
    add_policies(objects, trust_domain, &mut out);
    out
}

/// Adds the config file's workloads, services and policies (machines outside the cluster, such
/// as VMs) to what the cluster describes. The cluster wins a conflict: a file entry named like a
/// cluster object, or using an IP or VIP the cluster uses, is left out and reported (kind
/// `ConfigFile`). File services keep the endpoints they were built with (their selector was
/// matched against the file's workloads when the file was loaded).
pub fn add_file_entries(out: &mut Translation, file: &MeshModel) {
    let mut taken: HashMap<IpAddr, String> = HashMap::new();
    for (key, workload) in &out.model.workloads {
        for ip in &workload.ips {
            taken.insert(*ip, format!("an IP of pod {key}"));
        }
    }
    for (key, service) in &out.model.services {
        for vip in &service.vips {
            taken.insert(*vip, format!("a VIP of service {key}"));
        }
    }
    let skip = |out: &mut Translation, what: &str, key: &str, reason: String| {
        out.skipped.push(Skipped {
            kind: "ConfigFile",
            object: format!("{what} {key}"),
            reason,
        });
    };
    for (key, workload) in &file.workloads {
        if out.model.workloads.contains_key(key) {
            skip(
                out,
                "workload",
                key,
                "the cluster has a pod of that name".into(),
            );
            continue;
        }
        if let Some((ip, owner)) = workload
            .ips
            .iter()
            .find_map(|ip| taken.get(ip).map(|owner| (ip, owner)))
        {
            skip(out, "workload", key, format!("IP {ip} is already {owner}"));
            continue;
        }
        for ip in &workload.ips {
            taken.insert(*ip, format!("an IP of workload {key}"));
        }
        out.model.workloads.insert(key.clone(), workload.clone());
    }
    for (key, service) in &file.services {
        if out.model.services.contains_key(key) {
            skip(
                out,
                "service",
                key,
                "the cluster has a Service of that name".into(),
            );
            continue;
        }
        if let Some((vip, owner)) = service
            .vips
            .iter()
            .find_map(|vip| taken.get(vip).map(|owner| (vip, owner)))
        {
            skip(out, "service", key, format!("VIP {vip} is already {owner}"));
            continue;
        }
        for vip in &service.vips {
            taken.insert(*vip, format!("a VIP of service {key}"));
        }
        out.model.services.insert(key.clone(), service.clone());
    }
    for (key, policy) in &file.policies {
        if out.model.policies.contains_key(key) {
            skip(
                out,
                "policy",
                key,
                "the cluster has an AuthorizationPolicy of that name".into(),
            );
            continue;
        }
        out.model.policies.insert(key.clone(), policy.clone());
    }
}

fn add_workloads(objects: &ClusterObjects, trust_domain: &TrustDomain, out: &mut Translation) {
    let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
    for pod in objects.pods.values() {
        if !is_meshed(pod) || !is_running(pod) {
            continue;
        }
        let ips = pod_ips(pod);
        if ips.is_empty() {
            continue;
        }
        let (namespace, name) = meta_key(&pod.metadata);
        let key = resource_name(&namespace, &name);
        let spec = WorkloadSpec {
            name,
            namespace,
            service_account: Some(
                pod.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".to_string()),
            ),
            spiffe_id: None,
            ips,
            mesh_port: None,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        };
        let skip = |reason: String| Skipped {
            kind: "Pod",
            object: key.clone(),
            reason,
        };
        let workload = match model::build_workload(trust_domain, "pod", &spec) {
            Ok(w) => w,
            Err(e) => {
                out.skipped.push(skip(e.to_string()));
                continue;
            }
        };
        if let Some((ip, owner)) = workload
            .ips
            .iter()
            .find_map(|ip| ip_owner.get(ip).map(|owner| (ip, owner)))
        {
            out.skipped
                .push(skip(format!("IP {ip} is already an IP of pod {owner}")));
            continue;
        }
        for ip in &workload.ips {
            ip_owner.insert(*ip, key.clone());
        }
        out.model.workloads.insert(key, workload);
    }
}

/// The number a named target port stands for: what the Service's EndpointSlices give for the
/// service port (the EndpointSlice controller resolved it), else the container port of that
/// name on the running pods the Service selects, when they all agree on one.
fn resolve_named_port(
    objects: &ClusterObjects,
    service: (&str, &str),
    service_port_name: Option<&str>,
    selector: Option<&BTreeMap<String, String>>,
    port_name: &str,
) -> Result<u16, String> {
    let (namespace, name) = service;
    let from_slices: BTreeSet<i32> = service_slices(objects, namespace, name)
        .flat_map(|slice| slice.ports.iter().flatten())
        .filter(|p| p.name.as_deref().unwrap_or_default() == service_port_name.unwrap_or_default())
        .filter_map(|p| p.port)
        .collect();
    if let [number] = from_slices.iter().collect::<Vec<_>>()[..]
        && let Ok(number) = u16::try_from(*number)
        && number != 0
    {
        return Ok(number);
    }
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Err(format!(
            "target port {port_name:?} is a name and the Service has no selector to find the \
             pods defining it; use a number"
        ));
    };
    let mut numbers = BTreeSet::new();
    for pod in objects.pods.values() {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if pod.metadata.namespace.as_deref() != Some(namespace)
            || !is_running(pod)
            || !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        {
            continue;
        }
        for container in pod.spec.iter().flat_map(|s| s.containers.iter()) {
            for port in container.ports.iter().flatten() {
                if port.name.as_deref() == Some(port_name) {
                    numbers.insert(port.container_port);
                }
            }
        }
    }
    match numbers.len() {
        1 => numbers
            .first()
            .and_then(|n| u16::try_from(*n).ok())
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("target port {port_name:?} is not a TCP port number")),
        0 => Err(format!(
            "target port {port_name:?}: no running pod the Service selects has a container port \
             of that name"
        )),
        _ => Err(format!(
            "target port {port_name:?} means different numbers on different pods ({numbers:?}); \
             not supported, use a number"
        )),
    }
}

/// The IPv4 and IPv6 EndpointSlices of Service `namespace/name`.
fn service_slices<'a>(
    objects: &'a ClusterObjects,
    namespace: &'a str,
    name: &'a str,
) -> impl Iterator<Item = &'a EndpointSlice> {
    objects.endpoint_slices.values().filter(move |slice| {
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        slice.metadata.namespace.as_deref() == Some(namespace)
            && owner.map(String::as_str) == Some(name)
            && matches!(slice.address_type.as_str(), "IPv4" | "IPv6")
    })
}

/// Ready addresses of the EndpointSlices of Service `namespace/name`. An endpoint without
/// `conditions.ready` counts as ready, as the API reference says consumers should read it.
fn ready_endpoints(objects: &ClusterObjects, namespace: &str, name: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for slice in service_slices(objects, namespace, name) {
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            for address in &endpoint.addresses {
                if address.parse::<IpAddr>().is_ok() && seen.insert(address.clone()) {
                    out.push(address.clone());
                }
            }
        }
    }
    out
}

fn add_services(objects: &ClusterObjects, out: &mut Translation) {
    let mut vip_owner: HashMap<IpAddr, String> = HashMap::new();
    let workload_ips: HashMap<IpAddr, &Workload> = out
        .model
        .workloads
        .values()
        .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w)))
        .collect();
    let mut services = Vec::new();
    for service in objects.services.values() {
        let (namespace, name) = meta_key(&service.metadata);
        let key = resource_name(&namespace, &name);
        let Some(spec) = &service.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let vips: Vec<String> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.clone(),
            _ => spec.cluster_ip.iter().cloned().collect(),
        }
        .into_iter()
        .filter(|ip| !ip.is_empty() && ip != "None")
        .collect();
        let mut ports = Vec::new();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let target_port = match &port.target_port {
                None => None,
                Some(IntOrString::Int(n)) => Some(u32::try_from(*n).unwrap_or(0)),
                Some(IntOrString::String(text)) => match text.parse::<u32>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        match resolve_named_port(
                            objects,
                            (&namespace, &name),
                            port.name.as_deref(),
                            spec.selector.as_ref(),
                            text,
                        ) {
                            Ok(n) => Some(u32::from(n)),
                            Err(reason) => {
                                out.skipped.push(Skipped {
                                    kind: "Service",
                                    object: key.clone(),
                                    reason: format!("port {}: {reason}", port.port),
                                });
                                continue;
                            }
                        }
                    }
                },
            };
            ports.push(ServicePortSpec {
                port: u32::try_from(port.port).unwrap_or(0),
                target_port,
                name: port.name.clone().unwrap_or_default(),
            });
        }
        if ports.is_empty() {
            // UDP-only, port-less or every port unresolved (reported above): nothing to route.
            continue;
        }
        let service_spec = ServiceSpec {
            hostnames: vec![format!("{name}.{namespace}.svc")],
            endpoints: Some(ready_endpoints(objects, &namespace, &name)),
            name,
            namespace,
            vips,
            ports,
            selector: None,
        };
        services.push((key, service_spec));
    }
    for (key, spec) in services {
        let skip = |reason: String| Skipped {
            kind: "Service",
            object: key.clone(),
            reason,
        };
        let built = match model::build_service("service", &spec, &out.model.workloads) {
            Ok(s) => s,
            Err(e) => {
                out.skipped.push(skip(e.to_string()));
                continue;
            }
        };
        let clash = built.vips.iter().find_map(|vip| {
            workload_ips
                .get(vip)
                .map(|w| format!("VIP {vip} is an IP of pod {}/{}", w.namespace, w.name))
                .or_else(|| {
                    vip_owner
                        .get(vip)
                        .map(|owner| format!("VIP {vip} is already a VIP of service {owner}"))
                })
        });
        if let Some(reason) = clash {
            out.skipped.push(skip(reason));
            continue;
        }
        for vip in &built.vips {
            vip_owner.insert(*vip, key.clone());
        }
        out.model.services.insert(key, built);
    }
}

fn add_policies(objects: &ClusterObjects, trust_domain: &TrustDomain, out: &mut Translation) {
    for object in objects.policies.values() {
        let (namespace, name) = meta_key(&object.metadata);
        let key = resource_name(&namespace, &name);
        let spec = object
            .data
            .get("spec")
            .ok_or_else(|| "has no spec".to_string())
            .and_then(|spec| PolicyObjectSpec::deserialize(spec).map_err(|e| format!("spec: {e}")))
            .and_then(|spec| {
                model::build_policy(
                    trust_domain,
                    "spec",
                    &PolicySpec {
                        name,
                        namespace,
                        selector: spec.selector,
                        action: spec.action,
                        rules: spec.rules,
                    },
                )
                .map_err(|e| e.to_string())
            });
        match spec {
            Ok(policy) => {
                out.model.policies.insert(key, policy);
            }
            Err(reason) => out.skipped.push(Skipped {
                kind: "AuthorizationPolicy",
                object: key,
                reason,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    /// A pod as `GET /api/v1/namespaces/latch-demo/pods/<name>` returns it after injection.
    fn pod(name: &str, phase: &str, ips: &[&str], meshed: bool) -> Value {
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "latch-demo",
                "uid": format!("uid-{name}"),
                "resourceVersion": "4711",
                "creationTimestamp": "2026-11-28T10:00:00Z",
                "labels": {"app": "http-server", "pod-template-hash": "6d9f7c"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "http-server-6d9f7c", "uid": "rs-uid", "controller": true, "blockOwnerDeletion": true}]
            },
            "spec": {
                "serviceAccountName": "http-server",
                "serviceAccount": "http-server",
                "nodeName": "node-1",
                "containers": [{
                    "name": "httpd",
                    "image": "busybox:1.36",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
                }]
            },
            "status": {"phase": phase, "hostIP": "172.18.0.2", "qosClass": "Burstable"}
        });
        if meshed {
            pod["metadata"]["annotations"] = json!({"latch.dev/status": "{\"initContainers\":[\"latch-iptables\",\"latch-proxy\"]}"});
            pod["spec"]["initContainers"] = json!([
                {"name": "latch-iptables", "image": "latch:dev"},
                {"name": "latch-proxy", "image": "latch:dev", "restartPolicy": "Always"}
            ]);
        }
        if let Some(first) = ips.first() {
            pod["status"]["podIP"] = json!(first);
            pod["status"]["podIPs"] = ips.iter().map(|ip| json!({"ip": ip})).collect();
        }
        pod
    }

    fn service(name: &str, target_port: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "latch-demo", "uid": format!("uid-{name}"), "resourceVersion": "812"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "10.96.12.34",
                "clusterIPs": ["10.96.12.34"],
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "selector": {"app": "http-server"},
                "sessionAffinity": "None",
                "ports": [
                    {"name": "http", "protocol": "TCP", "port": 80, "targetPort": target_port},
                    {"name": "metrics", "protocol": "TCP", "port": 9090, "targetPort": 9090},
                    {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53}
                ]
            },
            "status": {"loadBalancer": {}}
        })
    }

    fn endpoint_slice(name: &str, service: &str, endpoints: Value) -> Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "latch-demo",
                "generateName": format!("{service}-"),
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
                },
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service, "uid": "svc-uid", "controller": true, "blockOwnerDeletion": true}]
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
        })
    }

    fn endpoint(ip: &str, ready: Option<bool>) -> Value {
        let mut e = json!({
            "addresses": [ip],
            "nodeName": "node-1",
            "targetRef": {"kind": "Pod", "namespace": "latch-demo", "name": format!("pod-{ip}"), "uid": "u"}
        });
        if let Some(ready) = ready {
            e["conditions"] = json!({"ready": ready, "serving": ready, "terminating": false});
        }
        e
    }

    fn policy(name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "latch.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "latch-demo", "uid": format!("uid-{name}"), "resourceVersion": "99", "generation": 1},
            "spec": spec
        })
    }

    fn objects(
        pods: &[Value],
        services: &[Value],
        slices: &[Value],
        policies: &[Value],
    ) -> ClusterObjects {
        fn table<K: serde::de::DeserializeOwned + kube::Resource>(
            items: &[Value],
        ) -> BTreeMap<String, K> {
            items
                .iter()
                .map(|v| {
                    let object: K = serde_json::from_value(v.clone()).unwrap();
                    let meta = object.meta();
                    (
                        format!(
                            "{}/{}",
                            meta.namespace.clone().unwrap(),
                            meta.name.clone().unwrap()
                        ),
                        object,
                    )
                })
                .collect()
        }
        ClusterObjects {
            pods: table(pods),
            services: table(services),
            endpoint_slices: table(slices),
            policies: table(policies),
        }
    }

    fn ips(list: &[IpAddr]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn demo_objects_become_workloads_services_and_policies() {
        let objects = objects(
            &[
                pod(
                    "http-server-a",
                    "Running",
                    &["10.244.1.5", "fd00:10:244:1::5"],
                    true,
                ),
                pod("http-server-b", "Pending", &[], true),
                pod("http-server-c", "Succeeded", &["10.244.1.7"], true),
                pod("plain", "Running", &["10.244.1.8"], false),
            ],
            &[service("http-server", json!("http"))],
            &[endpoint_slice(
                "http-server-x7k2p",
                "http-server",
                json!([
                    endpoint("10.244.1.5", Some(true)),
                    endpoint("10.244.2.9", Some(false)),
                    endpoint("10.244.3.3", None)
                ]),
            )],
            &[policy(
                "http-server",
                json!({"selector": {"app": "http-server"}, "action": "ALLOW", "rules": [{"principals": [{"exact": "spiffe://cluster.local/ns/latch-demo/sa/http-client"}], "ports": [8080]}]}),
            )],
        );
        let out = translate(&objects, &td(), &MeshSettings::default());
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        let model = out.model;

        assert_eq!(
            model.workloads.keys().collect::<Vec<_>>(),
            ["latch-demo/http-server-a"],
            "only meshed Running pods with an IP"
        );
        let w = &model.workloads["latch-demo/http-server-a"];
        assert_eq!(
            w.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/latch-demo/sa/http-server"
        );
        assert_eq!(ips(&w.ips), ["10.244.1.5", "fd00:10:244:1::5"]);
        assert_eq!(w.labels["app"], "http-server");
        assert_eq!(w.mesh_port, latch_mesh::ports::INBOUND_MTLS);

        let s = &model.services["latch-demo/http-server"];
        assert_eq!(ips(&s.vips), ["10.96.12.34"]);
        assert_eq!(s.hostnames, ["http-server.latch-demo.svc"]);
        let ports: Vec<(u16, u16, &str)> = s
            .ports
            .iter()
            .map(|p| (p.port, p.target_port, p.name.as_str()))
            .collect();
        assert_eq!(
            ports,
            [(80, 8080, "http"), (9090, 9090, "metrics")],
            "named target port resolved from the pods; UDP left out"
        );
        assert_eq!(
            ips(&s.endpoints),
            ["10.244.1.5", "10.244.3.3"],
            "ready endpoints, and those without conditions (read as ready)"
        );

        let p = &model.policies["latch-demo/http-server"];
        assert_eq!(p.action, latch_mesh::Action::Allow);
        assert_eq!(p.selector["app"], "http-server");
        assert_eq!(p.rules[0].ports, [8080]);
        assert!(p.selects(w));
    }

    #[test]
    fn a_malformed_policy_is_skipped_and_the_rest_kept() {
        let good = policy("good", json!({"action": "DENY"}));
        let objects = objects(
            &[],
            &[],
            &[],
            &[
                policy("bad-action", json!({"action": "PERMIT"})),
                policy("bad-rules", json!({"action": "ALLOW", "rules": "everyone"})),
                policy(
                    "bad-principal",
                    json!({"action": "ALLOW", "rules": [{"principals": [{"prefix": "ns/latch-demo"}]}]}),
                ),
                policy(
                    "raw-prefix",
                    json!({"action": "ALLOW", "rules": [{"principals": [{"prefix": "spiffe://cluster.local/ns/latch-demo"}]}]}),
                ),
                policy(
                    "foreign",
                    json!({"action": "DENY", "rules": [{"principals": [{"exact": "spiffe://other.org/ns/a/sa/b"}]}]}),
                ),
                json!({"apiVersion": "latch.dev/v1alpha1", "kind": "AuthorizationPolicy", "metadata": {"name": "no-spec", "namespace": "latch-demo"}}),
                good,
            ],
        );
        let out = translate(&objects, &td(), &MeshSettings::default());
        assert_eq!(
            out.model.policies.keys().collect::<Vec<_>>(),
            ["latch-demo/good"]
        );
        let skipped: Vec<String> = out.skipped.iter().map(ToString::to_string).collect();
        for (object, words) in [
            (
                "latch-demo/bad-action",
                r#"spec.action "PERMIT": must be ALLOW or DENY"#,
            ),
            (
                "latch-demo/bad-rules",
                "spec: invalid type: string \"everyone\"",
            ),
            ("latch-demo/bad-principal", "must start with spiffe://"),
            (
                "latch-demo/raw-prefix",
                r#"spec.rules[0].principals[0].prefix "spiffe://cluster.local/ns/latch-demo": must end in "/""#,
            ),
            (
                "latch-demo/foreign",
                "not in trust domain cluster.local; peers of other trust domains cannot connect",
            ),
            ("latch-demo/no-spec", "has no spec"),
        ] {
            assert!(
                skipped.iter().any(
                    |s| s.starts_with(&format!("AuthorizationPolicy {object}: "))
                        && s.contains(words)
                ),
                "{object} / {words:?} not in {skipped:#?}"
            );
        }
    }

    #[test]
    fn named_target_ports_that_cannot_be_resolved_leave_the_port_out() {
        let mut other = pod("http-server-z", "Running", &["10.244.1.6"], false);
        other["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(8081);
        let objects_with = |pods: &[Value], target: Value| {
            objects(pods, &[service("http-server", target)], &[], &[])
        };
        let web = pod("http-server-a", "Running", &["10.244.1.5"], true);
        for (pods, target, reason) in [
            (
                vec![web.clone()],
                json!("grpc"),
                "no running pod the Service selects has a container port of that name",
            ),
            (
                vec![web.clone(), other],
                json!("http"),
                "means different numbers on different pods",
            ),
        ] {
            let out = translate(
                &objects_with(&pods, target),
                &td(),
                &MeshSettings::default(),
            );
            let s = &out.model.services["latch-demo/http-server"];
            assert_eq!(s.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [9090]);
            assert_eq!(out.skipped.len(), 1, "{:?}", out.skipped);
            assert_eq!(out.skipped[0].kind, "Service");
            assert!(
                out.skipped[0].reason.starts_with("port 80: target port"),
                "{}",
                out.skipped[0]
            );
            assert!(out.skipped[0].reason.contains(reason), "{}", out.skipped[0]);
        }
        // A numeric string is a number.
        let out = translate(
            &objects_with(&[], json!("8080")),
            &td(),
            &MeshSettings::default(),
        );
        assert_eq!(
            out.model.services["latch-demo/http-server"].ports[0].target_port,
            8080
        );
    }

    #[test]
    fn named_target_ports_come_from_the_endpoint_slices_first() {
        // No pod is listed (e.g. not yet seen): the slice's port for service port "http" is
        // what the EndpointSlice controller resolved.
        let mut slice = endpoint_slice(
            "http-server-1",
            "http-server",
            json!([endpoint("10.244.1.5", Some(true))]),
        );
        slice["ports"] = json!([{"name": "http", "protocol": "TCP", "port": 8443}]);
        let out = translate(
            &objects(&[], &[service("http-server", json!("web"))], &[slice], &[]),
            &td(),
            &MeshSettings::default(),
        );
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        let s = &out.model.services["latch-demo/http-server"];
        assert_eq!((s.ports[0].port, s.ports[0].target_port), (80, 8443));
    }

    #[test]
    fn headless_services_have_no_vip_and_slices_of_other_services_are_ignored() {
        let mut headless = service("db", json!(5432));
        headless["spec"]["clusterIP"] = json!("None");
        headless["spec"]["clusterIPs"] = json!(["None"]);
        let mut external = service("ext", json!(443));
        external["spec"] = json!({"type": "ExternalName", "externalName": "example.com"});
        let out = translate(
            &objects(
                &[],
                &[headless, external],
                &[
                    endpoint_slice("db-1", "db", json!([endpoint("10.244.4.4", Some(true))])),
                    endpoint_slice("web-1", "web", json!([endpoint("10.244.5.5", Some(true))])),
                ],
                &[],
            ),
            &td(),
            &MeshSettings::default(),
        );
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        assert_eq!(
            out.model.services.keys().collect::<Vec<_>>(),
            ["latch-demo/db"]
        );
        let db = &out.model.services["latch-demo/db"];
        assert!(db.vips.is_empty());
        assert_eq!(ips(&db.endpoints), ["10.244.4.4"]);
    }

    #[test]
    fn dual_stack_services_carry_both_families() {
        // As the API server writes a PreferDualStack Service: one EndpointSlice per family.
        let mut dual = service("http-server", json!(8080));
        dual["spec"]["clusterIPs"] = json!(["10.96.12.34", "fd00:10:96::1234"]);
        dual["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
        dual["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
        let v4 = endpoint_slice(
            "http-server-v4",
            "http-server",
            json!([endpoint("10.244.1.5", Some(true))]),
        );
        let mut v6 = endpoint_slice(
            "http-server-v6",
            "http-server",
            json!([endpoint("fd00:10:244:1::5", Some(true))]),
        );
        v6["addressType"] = json!("IPv6");
        let out = translate(
            &objects(&[], &[dual], &[v4, v6], &[]),
            &td(),
            &MeshSettings::default(),
        );
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        let s = &out.model.services["latch-demo/http-server"];
        assert_eq!(ips(&s.vips), ["10.96.12.34", "fd00:10:96::1234"]);
        assert_eq!(ips(&s.endpoints), ["10.244.1.5", "fd00:10:244:1::5"]);
    }

    #[test]
    fn a_pod_reusing_another_pods_ip_is_skipped() {
        let out = translate(
            &objects(
                &[
                    pod("a", "Running", &["10.244.1.5"], true),
                    pod("b", "Running", &["10.244.1.5"], true),
                ],
                &[],
                &[],
                &[],
            ),
            &td(),
            &MeshSettings::default(),
        );
        assert_eq!(
            out.model.workloads.keys().collect::<Vec<_>>(),
            ["latch-demo/a"]
        );
        assert_eq!(
            out.skipped
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["Pod latch-demo/b: IP 10.244.1.5 is already an IP of pod latch-demo/a"]
        );
    }
}
