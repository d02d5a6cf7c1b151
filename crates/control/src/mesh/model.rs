//! The control plane's whole mesh (`MeshModel`: settings, workloads, services with endpoints
//! resolved, policies) built from the YAML sections in `spec`. Each entry goes through the
//! shared model's constructors (`latch_mesh`), the rules proxies apply to what they receive;
//! this file adds what only the whole config can check (names and IPs listed twice, VIPs that
//! are workload IPs) and resolves selectors. Every refusal names the offending entry
//! (`workloads[2].ips[0] "10.0.0.x": not an IP address`). `snapshot` encodes the model.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use latch_identity::{SpiffeId, TrustDomain};
use latch_mesh::model::labels_match;
use latch_mesh::validate::{check_labels, check_name, field, parse_ips, parse_spiffe_id};
use latch_mesh::{
    Action, MeshError, MeshSettings, MtlsMode, OutboundPolicy, Policy, Principal, Rule, Service,
    ServicePort, Workload, ports, resource_name,
};

use super::spec::{
    MeshSettingsSpec, PolicySpec, PrincipalSpec, RuleSpec, ServiceSpec, WorkloadSpec,
};

/// The whole mesh as configured. Keys are "<namespace>/<name>".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshModel {
    pub settings: MeshSettings,
    pub workloads: BTreeMap<String, Workload>,
    pub services: BTreeMap<String, Service>,
    pub policies: BTreeMap<String, Policy>,
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
                return Err(MeshError::invalid(
                    at,
                    format!("workload {key} is listed twice (first at {first})"),
                ));
            }
            for (j, ip) in workload.ips.iter().enumerate() {
                if let Some(owner) = ip_owner.insert(*ip, key.clone()) {
                    let at = format!("{at}.ips[{j}] \"{ip}\"");
                    return Err(MeshError::invalid(
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
                return Err(MeshError::invalid(
                    at,
                    format!("service {key} is listed twice (first at {first})"),
                ));
            }
            for (j, vip) in service.vips.iter().enumerate() {
                let vip_at = format!("{at}.vips[{j}] \"{vip}\"");
                if let Some(workload) = ip_owner.get(vip) {
                    return Err(MeshError::invalid(
                        vip_at,
                        format!("is an IP of workload {workload}; a VIP must be its own address"),
                    ));
                }
                if let Some(owner) = vip_owner.insert(*vip, key.clone()) {
                    return Err(MeshError::invalid(
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
            let policy = build_policy(trust_domain, &at, spec)?;
            let key = resource_name(&policy.namespace, &policy.name);
            if let Some(first) = listed_at.insert(key.clone(), at.clone()) {
                return Err(MeshError::invalid(
                    at,
                    format!("policy {key} is listed twice (first at {first})"),
                ));
            }
            model.policies.insert(key, policy);
        }
        Ok(model)
    }
}

fn build_settings(spec: &MeshSettingsSpec) -> Result<MeshSettings, MeshError> {
    let mtls = match &spec.mtls {
        Some(text) => MtlsMode::from_name("mesh.mtls", text)?,
        None => MtlsMode::Strict,
    };
    let port_mtls = spec
        .port_mtls
        .iter()
        .map(|(port, mode)| {
            let mode = MtlsMode::from_name(&format!("mesh.port_mtls[{port}]"), mode)?;
            Ok((*port, mode))
        })
        .collect::<Result<Vec<_>, MeshError>>()?;
    let outbound_policy = match spec.outbound_policy.as_deref() {
        None => OutboundPolicy::Passthrough,
        Some(text) => OutboundPolicy::from_name("mesh.outbound_policy", text)?,
    };
    MeshSettings::new("mesh.port_mtls", mtls, port_mtls, outbound_policy)
}

pub(super) fn build_workload(
    trust_domain: &TrustDomain,
    at: &str,
    spec: &WorkloadSpec,
) -> Result<Workload, MeshError> {
    // Names first: the SPIFFE ID is made of the namespace.
    check_name(&field(at, "name"), &spec.name)?;
    check_name(&field(at, "namespace"), &spec.namespace)?;
    let spiffe_id = match (&spec.service_account, &spec.spiffe_id) {
        (Some(sa), None) => {
            check_name(&field(at, "service_account"), sa)?;
            SpiffeId::workload(trust_domain, &spec.namespace, sa).map_err(|e| {
                MeshError::invalid(
                    format!("{at}.service_account \"{sa}\""),
                    format!("does not make a SPIFFE ID: {e}"),
                )
            })?
        }
        (None, Some(text)) => {
            let id_at = field(at, "spiffe_id");
            let id = parse_spiffe_id(&id_at, text)?;
            if !id.is_member_of(trust_domain) {
                return Err(MeshError::invalid(
                    format!("{id_at} \"{text}\""),
                    format!("not in trust domain {trust_domain}"),
                ));
            }
            id
        }
        _ => {
            return Err(MeshError::invalid(
                at,
                "give exactly one of service_account and spiffe_id",
            ));
        }
    };
    Workload::new(
        at,
        &spec.name,
        &spec.namespace,
        spiffe_id,
        spec.ips.iter().map(String::as_str),
        spec.mesh_port.unwrap_or(u32::from(ports::INBOUND_MTLS)),
        &spec.labels,
    )
}

pub(super) fn build_service(
    at: &str,
    spec: &ServiceSpec,
    workloads: &BTreeMap<String, Workload>,
) -> Result<Service, MeshError> {
    check_name(&field(at, "name"), &spec.name)?;
    check_name(&field(at, "namespace"), &spec.namespace)?;
    latch_mesh::validate::check_hostnames(&field(at, "hostnames"), &spec.hostnames)?;
    let ports = ServicePort::list(
        &field(at, "ports"),
        spec.ports
            .iter()
            .map(|p| (p.port, p.target_port, p.name.clone())),
    )?;
    let endpoints = match (&spec.selector, &spec.endpoints) {
        (Some(selector), None) => {
            check_labels(&field(at, "selector"), selector)?;
            workloads
                .values()
                .filter(|w| w.namespace == spec.namespace && labels_match(selector, &w.labels))
                .flat_map(|w| w.ips.iter().copied())
                .collect()
        }
        (None, Some(explicit)) => {
            parse_ips(&field(at, "endpoints"), explicit.iter().map(String::as_str))?
        }
        _ => {
            return Err(MeshError::invalid(
                at,
                "give exactly one of selector and endpoints",
            ));
        }
    };
    Service::new(
        at,
        &spec.name,
        &spec.namespace,
        spec.vips.iter().map(String::as_str),
        &spec.hostnames,
        ports,
        endpoints,
    )
}

/// A policy; its principals must name IDs of `trust_domain` (peers of others cannot connect).
pub(super) fn build_policy(
    trust_domain: &TrustDomain,
    at: &str,
    spec: &PolicySpec,
) -> Result<Policy, MeshError> {
    check_name(&field(at, "name"), &spec.name)?;
    check_name(&field(at, "namespace"), &spec.namespace)?;
    check_labels(&field(at, "selector"), &spec.selector)?;
    let action = Action::from_name(&field(at, "action"), &spec.action)?;
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| build_rule(trust_domain, &format!("{at}.rules[{i}]"), rule))
        .collect::<Result<_, _>>()?;
    Policy::new(
        at,
        &spec.name,
        &spec.namespace,
        &spec.selector,
        action,
        rules,
    )
}

fn build_rule(trust_domain: &TrustDomain, at: &str, spec: &RuleSpec) -> Result<Rule, MeshError> {
    let principals = spec
        .principals
        .iter()
        .enumerate()
        .map(|(i, p)| build_principal(trust_domain, &format!("{at}.principals[{i}]"), p))
        .collect::<Result<_, _>>()?;
    Rule::new(at, principals, &spec.namespaces, &spec.ports)
}

fn build_principal(
    trust_domain: &TrustDomain,
    at: &str,
    spec: &PrincipalSpec,
) -> Result<Principal, MeshError> {
    let principal = match (&spec.exact, &spec.prefix) {
        (Some(exact), None) => Principal::exact(at, exact)?,
        (None, Some(prefix)) => Principal::prefix(at, prefix)?,
        _ => {
            return Err(MeshError::invalid(
                at,
                "give exactly one of exact and prefix",
            ));
        }
    };
    principal.check_trust_domain(at, trust_domain)?;
    Ok(principal)
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
    fn a_mesh_file_of_twenty_thousand_workloads_loads() {
        // The bench's 10,000 proxies and their workloads breached the YAML parser's default
        // budget (250,000 nodes).
        let mut yaml = String::from("workloads:\n");
        for i in 0..20_000u32 {
            yaml.push_str(&format!(
                "  - name: w{i}\n    namespace: bench\n    service_account: w{i}\n    \
                 ips: [\"10.{}.{}.{}\"]\n    labels: {{app: w{i}, group: g{}, tier: bench}}\n",
                i >> 16,
                (i >> 8) & 255,
                i & 255,
                i / 10
            ));
        }
        let model = build(&yaml).unwrap();
        assert_eq!(model.workloads.len(), 20_000);
    }

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
                // Issue 16: once accepted here and refused by every proxy.
                "policies:\n  - {name: p, namespace: demo, action: ALLOW, rules: [{principals: [{prefix: \"spiffe:///ns/x\"}]}]}\n",
                r#"policies[0].rules[0].principals[0].prefix "spiffe:///ns/x": must start with spiffe://<trust domain>; the trust domain is empty"#,
            ),
            (
                // Issue 17: a raw string prefix admitted .../sa/webhook-evil.
                "policies:\n  - {name: p, namespace: demo, action: ALLOW, rules: [{principals: [{prefix: \"spiffe://cluster.local/ns/a/sa/web\"}]}]}\n",
                r#"policies[0].rules[0].principals[0].prefix "spiffe://cluster.local/ns/a/sa/web": must end in "/" to match whole path segments (write spiffe://cluster.local/ns/a/sa/web/ for IDs under it, or use exact: for this one ID)"#,
            ),
            (
                "policies:\n  - {name: p, namespace: demo, action: ALLOW, rules: [{principals: [{prefix: \"spiffe://cluster.local\"}]}]}\n",
                r#"policies[0].rules[0].principals[0].prefix "spiffe://cluster.local": must end in "/" to match whole path segments (write spiffe://cluster.local/ for IDs under it, or use exact: for this one ID)"#,
            ),
            (
                // Issue 19: no peer of another trust domain can ever connect.
                "policies:\n  - {name: p, namespace: demo, action: ALLOW, rules: [{principals: [{exact: spiffe://cluster.local/ns/a/sa/b}, {prefix: \"spiffe://other.org/ns/\"}]}]}\n",
                r#"policies[0].rules[0].principals[1].prefix "spiffe://other.org/ns/": not in trust domain cluster.local; peers of other trust domains cannot connect"#,
            ),
            (
                "policies:\n  - {name: p, namespace: demo, action: DENY, rules: [{principals: [{exact: spiffe://other.org/ns/a/sa/b}]}]}\n",
                r#"policies[0].rules[0].principals[0].exact "spiffe://other.org/ns/a/sa/b": not in trust domain cluster.local; peers of other trust domains cannot connect"#,
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
        assert_eq!(web.mesh_port, ports::INBOUND_MTLS);
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
