//! The mesh model's types: `Workload`, `Service`, `Policy` (`Rule`, `Principal`, `Action`),
//! `MeshSettings` (`MtlsMode`, `OutboundPolicy`) and `MeshConfig`. Each type's constructor
//! applies the rules of `validate`, so a value of these types is valid wherever it was built:
//! from the control plane's YAML or Kubernetes objects, or from a discovery resource.
//! Also what a policy means: which workloads it selects and which callers a rule matches.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use latch_identity::{SpiffeId, TrustDomain};

use crate::MeshError;
use crate::validate::{
    check_hostnames, check_labels, check_name, check_principal_prefix, field, parse_ips,
    parse_port, parse_spiffe_id, prefix_trust_domain,
};

/// The resource name of an object: "<namespace>/<name>".
pub fn resource_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// How a proxy treats plaintext arriving for an app port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MtlsMode {
    /// Refuse plaintext: only mTLS from other proxies reaches the app.
    #[default]
    Strict,
    /// Forward plaintext to the app (migration).
    Permissive,
}

impl MtlsMode {
    /// STRICT or PERMISSIVE, in any case.
    pub fn from_name(at: &str, text: &str) -> Result<Self, MeshError> {
        match text.to_ascii_uppercase().as_str() {
            "STRICT" => Ok(MtlsMode::Strict),
            "PERMISSIVE" => Ok(MtlsMode::Permissive),
            _ => Err(MeshError::invalid(
                format!("{at} \"{text}\""),
                "must be STRICT or PERMISSIVE",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
        }
    }
}

/// What a proxy does with outbound traffic to an address the mesh does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutboundPolicy {
    /// Forward in plain TCP.
    #[default]
    Passthrough,
    /// Refuse anything that is not in the mesh.
    RegistryOnly,
}

impl OutboundPolicy {
    /// passthrough or registry-only (any case, '_' for '-').
    pub fn from_name(at: &str, text: &str) -> Result<Self, MeshError> {
        match text.to_ascii_lowercase().replace('_', "-").as_str() {
            "passthrough" => Ok(OutboundPolicy::Passthrough),
            "registry-only" => Ok(OutboundPolicy::RegistryOnly),
            _ => Err(MeshError::invalid(
                format!("{at} \"{text}\""),
                "must be passthrough or registry-only",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OutboundPolicy::Passthrough => "PASSTHROUGH",
            OutboundPolicy::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

/// Mesh-wide settings: the mTLS mode (a default and per-app-port exceptions) and the outbound
/// policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshSettings {
    pub mtls: MtlsMode,
    pub port_mtls: BTreeMap<u16, MtlsMode>,
    pub outbound_policy: OutboundPolicy,
}

impl MeshSettings {
    /// Checks the per-port exceptions' ports (`at` names the `port_mtls` field).
    pub fn new(
        at: &str,
        mtls: MtlsMode,
        port_mtls: impl IntoIterator<Item = (u32, MtlsMode)>,
        outbound_policy: OutboundPolicy,
    ) -> Result<Self, MeshError> {
        let port_mtls = port_mtls
            .into_iter()
            .map(|(port, mode)| Ok((parse_port(&format!("{at}[{port}]"), port)?, mode)))
            .collect::<Result<_, MeshError>>()?;
        Ok(Self {
            mtls,
            port_mtls,
            outbound_policy,
        })
    }

    /// One mode for every port.
    pub fn uniform(mtls: MtlsMode, outbound_policy: OutboundPolicy) -> Self {
        Self {
            mtls,
            port_mtls: BTreeMap::new(),
            outbound_policy,
        }
    }

    /// The mode for plaintext arriving for app port `port`.
    pub fn mtls_for_port(&self, port: u16) -> MtlsMode {
        self.port_mtls.get(&port).copied().unwrap_or(self.mtls)
    }
}

/// The single MeshConfig resource: the settings, the CA's trust bundle (PEM, may be empty), the
/// revoked identities (each with the time of its revocation) and the JWT bundle (JWKS JSON, may
/// be empty; the proxy parses it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshConfig {
    pub settings: MeshSettings,
    pub trust_bundle_pem: String,
    pub revocations: BTreeMap<SpiffeId, SystemTime>,
    pub jwt_bundle_jwks: String,
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

impl Workload {
    /// Checks every field; `at` names the entry ("workloads[2]", or "" for a message).
    pub fn new<'a>(
        at: &str,
        name: &str,
        namespace: &str,
        spiffe_id: SpiffeId,
        ips: impl IntoIterator<Item = &'a str>,
        mesh_port: u32,
        labels: &BTreeMap<String, String>,
    ) -> Result<Self, MeshError> {
        check_name(&field(at, "name"), name)?;
        check_name(&field(at, "namespace"), namespace)?;
        check_labels(&field(at, "labels"), labels)?;
        Ok(Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            spiffe_id,
            ips: parse_ips(&field(at, "ips"), ips)?,
            mesh_port: parse_port(&field(at, "mesh_port"), mesh_port)?,
            labels: labels.clone(),
        })
    }

    /// "<namespace>/<name>".
    pub fn resource_name(&self) -> String {
        resource_name(&self.namespace, &self.name)
    }
}

/// A port of a service: `port` on the VIPs goes to `target_port` on the endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    pub name: String,
}

impl ServicePort {
    /// At least one port, each 1 to 65535, no port twice; `target_port` defaults to `port`.
    /// `at` names the `ports` field.
    pub fn list(
        at: &str,
        ports: impl IntoIterator<Item = (u32, Option<u32>, String)>,
    ) -> Result<Vec<ServicePort>, MeshError> {
        let mut out: Vec<ServicePort> = Vec::new();
        for (i, (port, target_port, name)) in ports.into_iter().enumerate() {
            let port_at = format!("{at}[{i}]");
            let port = parse_port(&field(&port_at, "port"), port)?;
            let target_port = match target_port {
                Some(t) => parse_port(&field(&port_at, "target_port"), t)?,
                None => port,
            };
            if out.iter().any(|q| q.port == port) {
                return Err(MeshError::invalid(
                    format!("{}.port {port}", port_at),
                    "listed twice in this service",
                ));
            }
            out.push(ServicePort {
                port,
                target_port,
                name,
            });
        }
        if out.is_empty() {
            return Err(MeshError::invalid(at, "a service needs at least one port"));
        }
        Ok(out)
    }
}

/// A virtual service with its endpoints resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub hostnames: Vec<String>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<IpAddr>,
}

impl Service {
    /// Checks every field but the ports (built by `ServicePort::list`) and the endpoints
    /// (resolved or parsed by the caller); `at` names the entry.
    pub fn new<'a>(
        at: &str,
        name: &str,
        namespace: &str,
        vips: impl IntoIterator<Item = &'a str>,
        hostnames: &[String],
        ports: Vec<ServicePort>,
        endpoints: Vec<IpAddr>,
    ) -> Result<Self, MeshError> {
        check_name(&field(at, "name"), name)?;
        check_name(&field(at, "namespace"), namespace)?;
        check_hostnames(&field(at, "hostnames"), hostnames)?;
        Ok(Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            vips: parse_ips(&field(at, "vips"), vips)?,
            hostnames: hostnames.to_vec(),
            ports,
            endpoints,
        })
    }

    /// "<namespace>/<name>".
    pub fn resource_name(&self) -> String {
        resource_name(&self.namespace, &self.name)
    }
}

/// What a policy does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// ALLOW or DENY, in any case.
    pub fn from_name(at: &str, text: &str) -> Result<Self, MeshError> {
        match text.to_ascii_uppercase().as_str() {
            "ALLOW" => Ok(Action::Allow),
            "DENY" => Ok(Action::Deny),
            _ => Err(MeshError::invalid(
                format!("{at} \"{text}\""),
                "must be ALLOW or DENY",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        }
    }
}

/// How a rule names callers. Both name IDs as strings; proxies only ever see callers of their
/// own trust domain (the mesh TLS verifier refuses others), and the control plane refuses
/// principals of other trust domains (`Principal::check_trust_domain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The caller's ID string equals this SPIFFE ID.
    Exact(String),
    /// The caller's ID lies under this prefix, by whole path segments: it equals the prefix, or
    /// the prefix ends in `/` and the ID starts with it (`spiffe://td/ns/a/` matches
    /// `spiffe://td/ns/a/sa/web`; `spiffe://td/` every ID of `td`). Prefixes built through
    /// `Principal::prefix` always end in `/`.
    Prefix(String),
}

impl Principal {
    /// `at` names the principal; the error names its `exact` field.
    pub fn exact(at: &str, id: &str) -> Result<Self, MeshError> {
        parse_spiffe_id(&field(at, "exact"), id)?;
        Ok(Principal::Exact(id.to_string()))
    }

    /// `at` names the principal; the error names its `prefix` field.
    pub fn prefix(at: &str, prefix: &str) -> Result<Self, MeshError> {
        check_principal_prefix(&field(at, "prefix"), prefix)?;
        Ok(Principal::Prefix(prefix.to_string()))
    }

    /// True when `peer` is named by this principal.
    pub fn matches(&self, peer: &SpiffeId) -> bool {
        let peer = peer.as_str();
        match self {
            Principal::Exact(id) => peer == id,
            Principal::Prefix(prefix) => {
                peer == prefix || (prefix.ends_with('/') && peer.starts_with(prefix.as_str()))
            }
        }
    }

    /// Refuses a principal outside `trust_domain`: no peer of another trust domain can connect,
    /// so such a rule could never match (the control plane's check; proxies accept either).
    /// `at` names the principal.
    pub fn check_trust_domain(
        &self,
        at: &str,
        trust_domain: &TrustDomain,
    ) -> Result<(), MeshError> {
        let (at, text, td) = match self {
            Principal::Exact(id) => (
                field(at, "exact"),
                id,
                SpiffeId::parse(id)
                    .ok()
                    .map(|id| id.trust_domain_name().to_string()),
            ),
            Principal::Prefix(prefix) => (
                field(at, "prefix"),
                prefix,
                prefix_trust_domain(prefix).map(str::to_string),
            ),
        };
        if td.as_deref() == Some(trust_domain.as_str()) {
            Ok(())
        } else {
            Err(MeshError::invalid(
                format!("{at} \"{text}\""),
                format!(
                    "not in trust domain {trust_domain}; peers of other trust domains cannot connect"
                ),
            ))
        }
    }
}

/// Matches when every non-empty field matches; with every field empty, matches every caller.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    pub principals: Vec<Principal>,
    pub namespaces: Vec<String>,
    pub ports: Vec<u16>,
}

impl Rule {
    /// Checks the namespaces and ports (principals are built by `Principal::exact`/`prefix`);
    /// `at` names the rule.
    pub fn new(
        at: &str,
        principals: Vec<Principal>,
        namespaces: &[String],
        ports: &[u32],
    ) -> Result<Self, MeshError> {
        for (i, ns) in namespaces.iter().enumerate() {
            check_name(&field(at, &format!("namespaces[{i}]")), ns)?;
        }
        let ports = ports
            .iter()
            .enumerate()
            .map(|(i, p)| parse_port(&field(at, &format!("ports[{i}]")), *p))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            principals,
            namespaces: namespaces.to_vec(),
            ports,
        })
    }

    /// True when `peer`, connecting to `port`, is matched by every non-empty field.
    pub fn matches(&self, peer: &SpiffeId, port: u16) -> bool {
        let principal =
            self.principals.is_empty() || self.principals.iter().any(|p| p.matches(peer));
        let namespace = self.namespaces.is_empty()
            || namespace_of(peer).is_some_and(|ns| self.namespaces.iter().any(|n| n == ns));
        let port = self.ports.is_empty() || self.ports.contains(&port);
        principal && namespace && port
    }
}

/// The namespace in a `/ns/<ns>/sa/<sa>` ID; other shapes have none.
fn namespace_of(peer: &SpiffeId) -> Option<&str> {
    let mut segments = peer.path().strip_prefix('/')?.split('/');
    match (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (Some("ns"), Some(ns), Some("sa"), Some(_), None) => Some(ns),
        _ => None,
    }
}

/// Who may connect to the workloads a policy selects. It matches when any rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    /// Labels a workload of `namespace` must carry; empty selects all of them.
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// Checks name, namespace and selector (rules are built by `Rule::new`); `at` names the
    /// entry.
    pub fn new(
        at: &str,
        name: &str,
        namespace: &str,
        selector: &BTreeMap<String, String>,
        action: Action,
        rules: Vec<Rule>,
    ) -> Result<Self, MeshError> {
        check_name(&field(at, "name"), name)?;
        check_name(&field(at, "namespace"), namespace)?;
        check_labels(&field(at, "selector"), selector)?;
        Ok(Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            selector: selector.clone(),
            action,
            rules,
        })
    }

    /// "<namespace>/<name>".
    pub fn resource_name(&self) -> String {
        resource_name(&self.namespace, &self.name)
    }

    /// True when the policy applies to `workload`: same namespace, and every selector label is
    /// on the workload with the same value (an empty selector selects the whole namespace).
    pub fn selects(&self, workload: &Workload) -> bool {
        self.namespace == workload.namespace && labels_match(&self.selector, &workload.labels)
    }

    /// True when any rule matches `peer` connecting to `port`.
    pub fn matches(&self, peer: &SpiffeId, port: u16) -> bool {
        self.rules.iter().any(|r| r.matches(peer, port))
    }
}

/// True when every label of `selector` is in `labels` with the same value.
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn prefixes_match_whole_path_segments() {
        const WEB: &str = "spiffe://cluster.local/ns/a/sa/web";
        for (prefix, peer, matches) in [
            ("spiffe://cluster.local/ns/a/sa/web/", WEB, false),
            (
                "spiffe://cluster.local/ns/a/sa/web/",
                "spiffe://cluster.local/ns/a/sa/web/x",
                true,
            ),
            ("spiffe://cluster.local/ns/a/sa/", WEB, true),
            (
                "spiffe://cluster.local/ns/a/sa/",
                "spiffe://cluster.local/ns/a/sa/webhook-evil",
                true,
            ),
            ("spiffe://cluster.local/ns/a/", WEB, true),
            (
                "spiffe://cluster.local/ns/a/",
                "spiffe://cluster.local/ns/ab/sa/web",
                false,
            ),
            ("spiffe://cluster.local/", WEB, true),
            (
                "spiffe://cluster.local/",
                "spiffe://cluster.localx/ns/a/sa/web",
                false,
            ),
            (
                "spiffe://cluster.local/",
                "spiffe://other.org/ns/a/sa/web",
                false,
            ),
            // Without the final '/' (refused by `Principal::prefix`, but a value built
            // directly): only the ID itself, never a longer segment.
            (WEB, WEB, true),
            (WEB, "spiffe://cluster.local/ns/a/sa/webhook-evil", false),
            (WEB, "spiffe://cluster.local/ns/a/sa/web/x", false),
            ("spiffe://cluster.local/ns/a", WEB, false),
            (
                "spiffe://cluster.local",
                "spiffe://cluster.localx/ns/a/sa/web",
                false,
            ),
        ] {
            assert_eq!(
                Principal::Prefix(prefix.into()).matches(&id(peer)),
                matches,
                "{prefix} / {peer}"
            );
        }
        assert!(Principal::Exact(WEB.into()).matches(&id(WEB)));
        assert!(!Principal::Exact(WEB.into()).matches(&id("spiffe://cluster.local/ns/a/sa/webx")));
    }

    #[test]
    fn only_prefixes_ending_in_a_slash_are_built() {
        assert_eq!(
            Principal::prefix("principals[0]", "spiffe://cluster.local/ns/a/sa/web")
                .unwrap_err()
                .to_string(),
            "principals[0].prefix \"spiffe://cluster.local/ns/a/sa/web\": must end in \"/\" to \
             match whole path segments (write spiffe://cluster.local/ns/a/sa/web/ for IDs under \
             it, or use exact: for this one ID)"
        );
        assert_eq!(
            Principal::prefix("p", "spiffe://cluster.local/"),
            Ok(Principal::Prefix("spiffe://cluster.local/".into()))
        );
    }

    #[test]
    fn principals_of_other_trust_domains_are_refused() {
        let td = TrustDomain::new("cluster.local").unwrap();
        for (principal, field, ok) in [
            (
                Principal::Exact("spiffe://cluster.local/ns/a/sa/web".into()),
                "exact",
                true,
            ),
            (
                Principal::Prefix("spiffe://cluster.local/".into()),
                "prefix",
                true,
            ),
            (
                Principal::Prefix("spiffe://cluster.local/ns/a/".into()),
                "prefix",
                true,
            ),
            (
                Principal::Exact("spiffe://other.org/ns/a/sa/web".into()),
                "exact",
                false,
            ),
            (
                Principal::Exact("spiffe://cluster.localx/ns/a".into()),
                "exact",
                false,
            ),
            (
                Principal::Prefix("spiffe://other.org/ns/".into()),
                "prefix",
                false,
            ),
            (
                Principal::Prefix("spiffe://cluster.localx/".into()),
                "prefix",
                false,
            ),
            (
                Principal::Prefix("spiffe://Cluster.local/".into()),
                "prefix",
                false,
            ),
        ] {
            let result = principal.check_trust_domain("r.principals[1]", &td);
            assert_eq!(result.is_ok(), ok, "{principal:?}: {result:?}");
            if let Err(e) = result {
                let (Principal::Exact(text) | Principal::Prefix(text)) = &principal;
                assert_eq!(
                    e.to_string(),
                    format!(
                        "r.principals[1].{field} \"{text}\": not in trust domain cluster.local; \
                         peers of other trust domains cannot connect"
                    )
                );
            }
        }
    }
}
