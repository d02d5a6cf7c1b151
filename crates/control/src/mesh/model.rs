//! The validated mesh model: workloads, services (endpoints resolved), authorization policies
//! and mesh settings, built from the YAML sections in `spec`. Every refusal names the offending
//! entry (`workloads[2].ips[0] "10.0.0.x": not an IP address`). `snapshot` converts the model
//! into the resources proxies receive.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use latch_identity::{SpiffeId, TrustDomain};
use thiserror::Error;

use super::spec::{
    MeshSettingsSpec, PolicySpec, PrincipalSpec, RuleSpec, ServiceSpec, WorkloadSpec,
};

/// The mesh port a workload listens on for mTLS when its entry does not say.
pub const DEFAULT_MESH_PORT: u16 = 15008;
/// Longest name, namespace, label key or hostname accepted.
const MAX_NAME_LEN: usize = 253;

/// A mesh configuration that cannot be used; `at` names the entry and field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{at}: {reason}")]
pub struct MeshError {
    pub at: String,
    pub reason: String,
}

fn invalid(at: impl Into<String>, reason: impl Into<String>) -> MeshError {
    MeshError {
        at: at.into(),
        reason: reason.into(),
    }
}

/// How a proxy treats plaintext arriving for an app port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MtlsMode {
    #[default]
    Strict,
    Permissive,
}

/// What a proxy does with outbound traffic to an address the mesh does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutboundPolicy {
    #[default]
    Passthrough,
    RegistryOnly,
}

/// Mesh-wide settings (`mesh:`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshSettings {
    pub mtls: MtlsMode,
    pub port_mtls: BTreeMap<u16, MtlsMode>,
    pub outbound_policy: OutboundPolicy,
}

/// A meshed workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub spiffe_id: SpiffeId,
    pub ips: Vec<IpAddr>,
    pub mesh_port: u16,
    pub labels: BTreeMap<String, String>,
}

/// A port of a service: `port` on the VIPs goes to `target_port` on the endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    pub name: String,
}

/// A virtual service with its endpoints resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub hostnames: Vec<String>,
    pub ports: Vec<ServicePort>,
    /// The selector the endpoints came from; `None` for explicit endpoints.
    pub selector: Option<BTreeMap<String, String>>,
    pub endpoints: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    pub principals: Vec<Principal>,
    pub namespaces: Vec<String>,
    pub ports: Vec<u16>,
}

/// Who may connect to the workloads a policy selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// True when the policy applies to `workload`: same namespace, and every selector label is
    /// on the workload with the same value (an empty selector selects the whole namespace).
    pub fn selects(&self, workload: &Workload) -> bool {
        self.namespace == workload.namespace && labels_match(&self.selector, &workload.labels)
    }
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The whole mesh as configured. Keys are "<namespace>/<name>".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshModel {
    pub settings: MeshSettings,
    pub workloads: BTreeMap<String, Workload>,
    pub services: BTreeMap<String, Service>,
    pub policies: BTreeMap<String, Policy>,
}

/// The resource name of an object: "<namespace>/<name>".
pub fn resource_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl MeshModel {
    /// Validates the YAML sections and resolves service endpoints.
    pub fn build(
        trust_domain: &TrustDomain,
        settings: &MeshSettingsSpec,
        workloads: &[WorkloadSpec],
        services: &[ServiceSpec],
        policies: &[PolicySpec],
    ) -> Result<Self, MeshError> {
        let settings = build_settings(settings)?;
        let mut model = MeshModel {
            settings,
            ..Default::default()
        };
        // Which workload owns each IP, and where it was listed, to refuse overlaps.
        let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
        let mut listed_at: HashMap<String, String> = HashMap::new();
        for (i, spec) in workloads.iter().enumerate() {
            let at = format!("workloads[{i}]");
            let workload = build_workload(trust_domain, &at, spec)?;
            let key = resource_name(&workload.namespace, &workload.name);
            if let Some(first) = listed_at.insert(key.clone(), at.clone()) {
                return Err(invalid(
                    at,
                    format!("workload {key} is listed twice (first at {first})"),
                ));
            }
            for (j, ip) in workload.ips.iter().enumerate() {
                if let Some(owner) = ip_owner.insert(*ip, key.clone()) {
                    let at = format!("{at}.ips[{j}] \"{ip}\"");
                    return Err(invalid(
                        at,
                        if owner == key {
                            "listed twice".to_string()
                        } else {
                            format!("already an IP of workload {owner}")
                        },
                    ));
                }
            }
            model.workloads.insert(key, workload);
        }

        let mut vip_owner: HashMap<IpAddr, String> = HashMap::new();
        listed_at.clear();
        for (i, spec) in services.iter().enumerate() {
            let at = format!("services[{i}]");
            let service = build_service(&at, spec, &model.workloads)?;
            let key = resource_name(&service.namespace, &service.name);
            if let Some(first) = listed_at.insert(key.clone(), at.clone()) {
                return Err(invalid(
                    at,
                    format!("service {key} is listed twice (first at {first})"),
                ));
            }
            for (j, vip) in service.vips.iter().enumerate() {
                let vip_at = format!("{at}.vips[{j}] \"{vip}\"");
                if let Some(workload) = ip_owner.get(vip) {
                    return Err(invalid(
                        vip_at,
                        format!("is an IP of workload {workload}; a VIP must be its own address"),
                    ));
                }
                if let Some(owner) = vip_owner.insert(*vip, key.clone()) {
                    return Err(invalid(
                        vip_at,
                        if owner == key {
                            "listed twice".to_string()
                        } else {
                            format!("already a VIP of service {owner}")
                        },
                    ));
                }
            }
            model.services.insert(key, service);
        }

        listed_at.clear();
        for (i, spec) in policies.iter().enumerate() {
            let at = format!("policies[{i}]");
            let policy = build_policy(&at, spec)?;
            let key = resource_name(&policy.namespace, &policy.name);
            if let Some(first) = listed_at.insert(key.clone(), at.clone()) {
                return Err(invalid(
                    at,
                    format!("policy {key} is listed twice (first at {first})"),
                ));
            }
            model.policies.insert(key, policy);
        }
        Ok(model)
    }
}

fn mtls_mode(at: &str, text: &str) -> Result<MtlsMode, MeshError> {
    match text.to_ascii_uppercase().as_str() {
        "STRICT" => Ok(MtlsMode::Strict),
        "PERMISSIVE" => Ok(MtlsMode::Permissive),
        _ => Err(invalid(
            format!("{at} \"{text}\""),
            "must be STRICT or PERMISSIVE",
        )),
    }
}

fn build_settings(spec: &MeshSettingsSpec) -> Result<MeshSettings, MeshError> {
    let mtls = match &spec.mtls {
        Some(text) => mtls_mode("mesh.mtls", text)?,
        None => MtlsMode::Strict,
    };
    let mut port_mtls = BTreeMap::new();
    for (port, mode) in &spec.port_mtls {
        let at = format!("mesh.port_mtls[{port}]");
        let port = app_port(&at, *port)?;
        port_mtls.insert(port, mtls_mode(&at, mode)?);
    }
    let outbound_policy = match spec.outbound_policy.as_deref() {
        None => OutboundPolicy::Passthrough,
        Some(text) => match text.to_ascii_lowercase().replace('_', "-").as_str() {
            "passthrough" => OutboundPolicy::Passthrough,
            "registry-only" => OutboundPolicy::RegistryOnly,
            _ => {
                return Err(invalid(
                    format!("mesh.outbound_policy \"{text}\""),
                    "must be passthrough or registry-only",
                ));
            }
        },
    };
    Ok(MeshSettings {
        mtls,
        port_mtls,
        outbound_policy,
    })
}

/// Checks a name, namespace or service account: letters, digits, '-', '.', '_'.
fn check_name(at: &str, field: &str, value: &str) -> Result<(), MeshError> {
    if value.is_empty() {
        return Err(invalid(format!("{at}.{field}"), "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(invalid(
            format!("{at}.{field}"),
            format!("longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(invalid(
            format!("{at}.{field} \"{value}\""),
            "may hold only letters, digits, '-', '.' and '_'",
        ));
    }
    Ok(())
}

fn check_labels(at: &str, labels: &BTreeMap<String, String>) -> Result<(), MeshError> {
    for key in labels.keys() {
        if key.is_empty() || key.len() > MAX_NAME_LEN || key.chars().any(char::is_whitespace) {
            return Err(invalid(
                format!("{at} \"{key}\""),
                "a label key must be non-empty, without spaces, and at most 253 characters",
            ));
        }
    }
    Ok(())
}

fn ip(at: String, text: &str) -> Result<IpAddr, MeshError> {
    text.parse()
        .map_err(|_| invalid(format!("{at} \"{text}\""), "not an IP address"))
}

fn ips(at: &str, texts: &[String]) -> Result<Vec<IpAddr>, MeshError> {
    let mut out: Vec<IpAddr> = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let addr = ip(format!("{at}[{i}]"), text)?;
        if out.contains(&addr) {
            return Err(invalid(format!("{at}[{i}] \"{text}\""), "listed twice"));
        }
        out.push(addr);
    }
    Ok(out)
}

/// A TCP port, 1..=65535.
fn app_port(at: &str, port: u32) -> Result<u16, MeshError> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(
            format!("{at} {port}"),
            "not a TCP port (1 to 65535)",
        )),
    }
}

pub(super) fn build_workload(
    trust_domain: &TrustDomain,
    at: &str,
    spec: &WorkloadSpec,
) -> Result<Workload, MeshError> {
    check_name(at, "name", &spec.name)?;
    check_name(at, "namespace", &spec.namespace)?;
    let spiffe_id = match (&spec.service_account, &spec.spiffe_id) {
        (Some(sa), None) => {
            check_name(at, "service_account", sa)?;
            SpiffeId::workload(trust_domain, &spec.namespace, sa).map_err(|e| {
                invalid(
                    format!("{at}.service_account \"{sa}\""),
                    format!("does not make a SPIFFE ID: {e}"),
                )
            })?
        }
        (None, Some(text)) => {
            let id_at = format!("{at}.spiffe_id \"{text}\"");
            let id = SpiffeId::parse(text)
                .map_err(|e| invalid(&id_at, format!("not a SPIFFE ID: {e}")))?;
            if !id.is_member_of(trust_domain) {
                return Err(invalid(
                    id_at,
                    format!("not in trust domain {trust_domain}"),
                ));
            }
            id
        }
        _ => {
            return Err(invalid(
                at,
                "give exactly one of service_account and spiffe_id",
            ));
        }
    };
    check_labels(&format!("{at}.labels"), &spec.labels)?;
    Ok(Workload {
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        spiffe_id,
        ips: ips(&format!("{at}.ips"), &spec.ips)?,
        mesh_port: match spec.mesh_port {
            Some(port) => app_port(&format!("{at}.mesh_port"), port)?,
            None => DEFAULT_MESH_PORT,
        },
        labels: spec.labels.clone(),
    })
}

pub(super) fn build_service(
    at: &str,
    spec: &ServiceSpec,
    workloads: &BTreeMap<String, Workload>,
) -> Result<Service, MeshError> {
    check_name(at, "name", &spec.name)?;
    check_name(at, "namespace", &spec.namespace)?;
    for (i, host) in spec.hostnames.iter().enumerate() {
        if host.is_empty() || host.len() > MAX_NAME_LEN || host.chars().any(char::is_whitespace) {
            return Err(invalid(
                format!("{at}.hostnames[{i}] \"{host}\""),
                "not a host name",
            ));
        }
    }
    if spec.ports.is_empty() {
        return Err(invalid(
            format!("{at}.ports"),
            "a service needs at least one port",
        ));
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(spec.ports.len());
    for (i, p) in spec.ports.iter().enumerate() {
        let port_at = format!("{at}.ports[{i}]");
        let port = app_port(&format!("{port_at}.port"), p.port)?;
        let target_port = match p.target_port {
            Some(t) => app_port(&format!("{port_at}.target_port"), t)?,
            None => port,
        };
        if ports.iter().any(|q| q.port == port) {
            return Err(invalid(
                format!("{port_at}.port {port}"),
                "listed twice in this service",
            ));
        }
        ports.push(ServicePort {
            port,
            target_port,
            name: p.name.clone(),
        });
    }
    let (selector, endpoints) = match (&spec.selector, &spec.endpoints) {
        (Some(selector), None) => {
            check_labels(&format!("{at}.selector"), selector)?;
            let endpoints = workloads
                .values()
                .filter(|w| w.namespace == spec.namespace && labels_match(selector, &w.labels))
                .flat_map(|w| w.ips.iter().copied())
                .collect();
            (Some(selector.clone()), endpoints)
        }
        (None, Some(explicit)) => (None, ips(&format!("{at}.endpoints"), explicit)?),
        _ => {
            return Err(invalid(at, "give exactly one of selector and endpoints"));
        }
    };
    Ok(Service {
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        vips: ips(&format!("{at}.vips"), &spec.vips)?,
        hostnames: spec.hostnames.clone(),
        ports,
        selector,
        endpoints,
    })
}

pub(super) fn build_policy(at: &str, spec: &PolicySpec) -> Result<Policy, MeshError> {
    check_name(at, "name", &spec.name)?;
    check_name(at, "namespace", &spec.namespace)?;
    check_labels(&format!("{at}.selector"), &spec.selector)?;
    let action = match spec.action.to_ascii_uppercase().as_str() {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        _ => {
            return Err(invalid(
                format!("{at}.action \"{}\"", spec.action),
                "must be ALLOW or DENY",
            ));
        }
    };
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| build_rule(&format!("{at}.rules[{i}]"), rule))
        .collect::<Result<_, _>>()?;
    Ok(Policy {
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        selector: spec.selector.clone(),
        action,
        rules,
    })
}

fn build_rule(at: &str, spec: &RuleSpec) -> Result<Rule, MeshError> {
    let principals = spec
        .principals
        .iter()
        .enumerate()
        .map(|(i, p)| build_principal(&format!("{at}.principals[{i}]"), p))
        .collect::<Result<_, _>>()?;
    for (i, ns) in spec.namespaces.iter().enumerate() {
        check_name(at, &format!("namespaces[{i}]"), ns)?;
    }
    let ports = spec
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| app_port(&format!("{at}.ports[{i}]"), *p))
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        principals,
        namespaces: spec.namespaces.clone(),
        ports,
    })
}

fn build_principal(at: &str, spec: &PrincipalSpec) -> Result<Principal, MeshError> {
    match (&spec.exact, &spec.prefix) {
        (Some(exact), None) => {
            // Any trust domain: policies may name federated callers.
            SpiffeId::parse(exact).map_err(|e| {
                invalid(
                    format!("{at}.exact \"{exact}\""),
                    format!("not a SPIFFE ID: {e}"),
                )
            })?;
            Ok(Principal::Exact(exact.clone()))
        }
        (None, Some(prefix)) => {
            if !prefix.starts_with("spiffe://") || prefix.len() <= "spiffe://".len() {
                return Err(invalid(
                    format!("{at}.prefix \"{prefix}\""),
                    "must start with spiffe://<trust domain>",
                ));
            }
            Ok(Principal::Prefix(prefix.clone()))
        }
        _ => Err(invalid(at, "give exactly one of exact and prefix")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn build(yaml: &str) -> Result<MeshModel, String> {
        FileConfig::parse(yaml)?
            .mesh_model(&td())
            .map_err(|e| e.to_string())
    }

    const WEB: &str = "  - {name: web, namespace: demo, service_account: web, ips: [10.0.0.2], labels: {app: web}}\n";

    #[test]
    fn refusals_name_the_entry() {
        for (yaml, expected) in [
            (
                "workloads:\n  - {name: a, namespace: demo, service_account: a, ips: [10.0.0.1]}\n  - {name: b, namespace: demo, service_account: b}\n  - {name: c, namespace: demo, service_account: c, ips: [10.0.0.x]}\n",
                r#"workloads[2].ips[0] "10.0.0.x": not an IP address"#,
            ),
            (
                "workloads:\n  - {name: web, namespace: demo, spiffe_id: \"spiffe://other.org/ns/demo/sa/web\"}\n",
                r#"workloads[0].spiffe_id "spiffe://other.org/ns/demo/sa/web": not in trust domain cluster.local"#,
            ),
            (
                "workloads:\n  - {name: web, namespace: demo, spiffe_id: \"http://x\"}\n",
                r#"workloads[0].spiffe_id "http://x": not a SPIFFE ID"#,
            ),
            (
                "workloads:\n  - {name: web, namespace: demo}\n",
                "workloads[0]: give exactly one of service_account and spiffe_id",
            ),
            (
                "workloads:\n  - {name: web, namespace: demo, service_account: web, spiffe_id: \"spiffe://cluster.local/x\"}\n",
                "workloads[0]: give exactly one of service_account and spiffe_id",
            ),
            (
                "workloads:\n  - {name: \"we b\", namespace: demo, service_account: web}\n",
                r#"workloads[0].name "we b": may hold only letters"#,
            ),
            (
                "workloads:\n  - {name: web, namespace: \"\", service_account: web}\n",
                "workloads[0].namespace: must not be empty",
            ),
            (
                "workloads:\n  - {name: web, namespace: demo, service_account: web, mesh_port: 70000}\n",
                "workloads[0].mesh_port 70000: not a TCP port",
            ),
            (
                &format!("workloads:\n{WEB}{WEB}"),
                "workloads[1]: workload demo/web is listed twice (first at workloads[0])",
            ),
            (
                &format!(
                    "workloads:\n{WEB}  - {{name: api, namespace: demo, service_account: api, ips: [10.0.0.2]}}\n"
                ),
                r#"workloads[1].ips[0] "10.0.0.2": already an IP of workload demo/web"#,
            ),
            (
                "services:\n  - {name: api, namespace: demo, ports: [{port: 80}], selector: {app: api}, endpoints: [10.0.0.3]}\n",
                "services[0]: give exactly one of selector and endpoints",
            ),
            (
                "services:\n  - {name: api, namespace: demo, ports: [{port: 80}]}\n",
                "services[0]: give exactly one of selector and endpoints",
            ),
            (
                "services:\n  - {name: api, namespace: demo, selector: {}}\n",
                "services[0].ports: a service needs at least one port",
            ),
            (
                "services:\n  - {name: api, namespace: demo, ports: [{port: 80}, {port: 80, target_port: 81}], selector: {}}\n",
                "services[0].ports[1].port 80: listed twice in this service",
            ),
            (
                "services:\n  - {name: api, namespace: demo, ports: [{port: 80, target_port: 0}], selector: {}}\n",
                "services[0].ports[0].target_port 0: not a TCP port",
            ),
            (
                &format!(
                    "workloads:\n{WEB}services:\n  - {{name: api, namespace: demo, vips: [10.0.0.2], ports: [{{port: 80}}], selector: {{}}}}\n"
                ),
                r#"services[0].vips[0] "10.0.0.2": is an IP of workload demo/web"#,
            ),
            (
                "services:\n  - {name: a, namespace: demo, vips: [10.96.0.1], ports: [{port: 80}], selector: {}}\n  - {name: b, namespace: demo, vips: [10.96.0.1], ports: [{port: 80}], selector: {}}\n",
                r#"services[1].vips[0] "10.96.0.1": already a VIP of service demo/a"#,
            ),
            (
                "services:\n  - {name: a, namespace: demo, ports: [{port: 80}], endpoints: [10.0.0.1, 10.0.0.1]}\n",
                r#"services[0].endpoints[1] "10.0.0.1": listed twice"#,
            ),
            (
                "policies:\n  - {name: p, namespace: demo, action: PERMIT}\n",
                r#"policies[0].action "PERMIT": must be ALLOW or DENY"#,
            ),
            (
                "policies:\n  - {name: p, namespace: demo, action: ALLOW, rules: [{principals: [{exact: a, prefix: b}]}]}\n",
                "policies[0].rules[0].principals[0]: give exactly one of exact and prefix",
            ),
            (
                "policies:\n  - {name: p, namespace: demo, action: ALLOW, rules: [{principals: [{prefix: \"demo/\"}]}]}\n",
                r#"policies[0].rules[0].principals[0].prefix "demo/": must start with spiffe://"#,
            ),
            (
                "policies:\n  - {name: p, namespace: demo, action: ALLOW, rules: [{ports: [8080, 0]}]}\n",
                "policies[0].rules[0].ports[1] 0: not a TCP port",
            ),
            (
                "policies:\n  - {name: p, namespace: demo, action: ALLOW}\n  - {name: p, namespace: demo, action: DENY}\n",
                "policies[1]: policy demo/p is listed twice (first at policies[0])",
            ),
            (
                "mesh:\n  mtls: strikt\n",
                r#"mesh.mtls "strikt": must be STRICT or PERMISSIVE"#,
            ),
            (
                "mesh:\n  port_mtls: {8080: OFF}\n",
                r#"mesh.port_mtls[8080] "OFF": must be STRICT or PERMISSIVE"#,
            ),
            (
                "mesh:\n  outbound_policy: deny\n",
                r#"mesh.outbound_policy "deny": must be passthrough or registry-only"#,
            ),
            (
                "workloads:\n  - {name: web, namespace: demo, service_account: web, color: blue}\n",
                "unknown field `color`",
            ),
            ("meshes: {}\n", "unknown field `meshes`"),
        ] {
            let err = build(yaml).expect_err(yaml);
            assert!(
                err.contains(expected),
                "for\n{yaml}\nexpected {expected:?}, got {err:?}"
            );
        }
    }

    #[test]
    fn full_example_builds_with_defaults() {
        let model = build(
            "mesh:\n  mtls: PERMISSIVE\n  port_mtls: {8080: STRICT}\n  outbound_policy: registry-only\n\
             workloads:\n  - {name: web, namespace: demo, spiffe_id: \"spiffe://cluster.local/custom/web\", ips: [10.0.0.2, \"fd00::2\"]}\n\
             services:\n  - {name: ext, namespace: demo, vips: [10.96.0.9], hostnames: [ext.demo], ports: [{port: 443}], endpoints: [192.0.2.1]}\n\
             policies:\n  - {name: deny-all, namespace: demo, action: deny, rules: [{}]}\n",
        )
        .unwrap();
        assert_eq!(model.settings.mtls, MtlsMode::Permissive);
        assert_eq!(model.settings.port_mtls[&8080], MtlsMode::Strict);
        assert_eq!(model.settings.outbound_policy, OutboundPolicy::RegistryOnly);
        let web = &model.workloads["demo/web"];
        assert_eq!(web.spiffe_id.as_str(), "spiffe://cluster.local/custom/web");
        assert_eq!(web.mesh_port, DEFAULT_MESH_PORT);
        assert_eq!(web.ips.len(), 2);
        let ext = &model.services["demo/ext"];
        assert_eq!(
            ext.ports[0].target_port, 443,
            "target_port defaults to port"
        );
        assert_eq!(ext.endpoints, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(model.policies["demo/deny-all"].action, Action::Deny);
        assert_eq!(
            build("").unwrap(),
            MeshModel::default(),
            "an empty file is an empty mesh"
        );
    }

    #[test]
    fn selector_resolves_to_the_ips_of_matching_workloads_in_the_namespace() {
        let model = build(
            "workloads:\n\
             \x20 - {name: api-1, namespace: demo, service_account: api, ips: [10.0.0.3, 10.0.0.4], labels: {app: api, tier: back}}\n\
             \x20 - {name: api-2, namespace: demo, service_account: api, ips: [10.0.0.5], labels: {app: api}}\n\
             \x20 - {name: api-3, namespace: other, service_account: api, ips: [10.0.1.3], labels: {app: api}}\n\
             \x20 - {name: web, namespace: demo, service_account: web, ips: [10.0.0.2], labels: {app: web}}\n\
             services:\n\
             \x20 - {name: api, namespace: demo, ports: [{port: 80, target_port: 8080}], selector: {app: api}}\n\
             \x20 - {name: back, namespace: demo, ports: [{port: 80}], selector: {app: api, tier: back}}\n\
             \x20 - {name: all, namespace: demo, ports: [{port: 80}], selector: {}}\n\
             \x20 - {name: none, namespace: demo, ports: [{port: 80}], selector: {app: db}}\n",
        )
        .unwrap();
        let endpoints = |name: &str| -> Vec<String> {
            model.services[name]
                .endpoints
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(endpoints("demo/api"), ["10.0.0.3", "10.0.0.4", "10.0.0.5"]);
        assert_eq!(endpoints("demo/back"), ["10.0.0.3", "10.0.0.4"]);
        assert_eq!(
            endpoints("demo/all"),
            ["10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.2"]
        );
        assert!(endpoints("demo/none").is_empty());
    }

    #[test]
    fn policy_selects_by_namespace_and_labels() {
        let model = build(&format!(
            "workloads:\n{WEB}policies:\n\
             \x20 - {{name: ns, namespace: demo, action: ALLOW}}\n\
             \x20 - {{name: web, namespace: demo, selector: {{app: web}}, action: ALLOW}}\n\
             \x20 - {{name: api, namespace: demo, selector: {{app: api}}, action: ALLOW}}\n\
             \x20 - {{name: other, namespace: other, action: ALLOW}}\n"
        ))
        .unwrap();
        let web = &model.workloads["demo/web"];
        let selecting: Vec<&str> = model
            .policies
            .values()
            .filter(|p| p.selects(web))
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(selecting, ["ns", "web"]);
    }
}
