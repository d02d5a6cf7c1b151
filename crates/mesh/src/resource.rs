//! The model as xDS resources: `From` each model type into its `latch.mesh.v1` message (what
//! the control plane encodes) and `TryFrom` each message into the model type (what the proxy
//! decodes), through the same constructors and rules as the control plane's config. Errors name
//! the field inside the message; `from_resource` adds the envelope checks (body, type URL,
//! decoding, resource name) the proxy's xDS client applies to every resource it receives.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use latch_identity::SpiffeId;
use latch_proto::mesh as proto;
use latch_proto::mesh::{authorization_policy, mesh_config, principal_match};
use latch_proto::type_url;
use prost::Message;

use crate::MeshError;
use crate::model::{
    Action, MeshConfig, MeshSettings, MtlsMode, OutboundPolicy, Policy, Principal, Rule, Service,
    ServicePort, Workload,
};
use crate::validate::{parse_ips, parse_spiffe_id};

/// A model type that travels as a discovery resource.
pub trait Resource: Sized {
    /// The type URL of its `google.protobuf.Any`.
    const TYPE_URL: &'static str;
    /// Its name in logs and messages ("Workload").
    const KIND: &'static str;
    /// Its `latch.mesh.v1` message.
    type Message: Message + Default;

    /// The message converted into the model, every field checked.
    fn from_message(message: &Self::Message) -> Result<Self, MeshError>;

    /// The resource name it must travel under.
    fn resource_name(&self) -> String;
}

/// The value of a discovery resource named `name` with body `body`: present, of `R`'s type,
/// decodable, valid, and named as its message says.
pub fn from_resource<R: Resource>(
    name: &str,
    body: Option<&prost_types::Any>,
) -> Result<R, MeshError> {
    let any = body.ok_or(MeshError::NoBody)?;
    if any.type_url != R::TYPE_URL {
        return Err(MeshError::WrongType {
            found: any.type_url.clone(),
            expected: R::KIND,
        });
    }
    let message = R::Message::decode(any.value.as_slice())?;
    let value = R::from_message(&message)?;
    let expected = value.resource_name();
    if name != expected {
        return Err(MeshError::WrongName {
            kind: R::KIND,
            expected,
        });
    }
    Ok(value)
}

impl From<&Workload> for proto::Workload {
    fn from(w: &Workload) -> Self {
        proto::Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            spiffe_id: w.spiffe_id.to_string(),
            ips: w.ips.iter().map(ToString::to_string).collect(),
            mesh_port: u32::from(w.mesh_port),
            labels: w.labels.clone(),
        }
    }
}

impl TryFrom<&proto::Workload> for Workload {
    type Error = MeshError;

    fn try_from(m: &proto::Workload) -> Result<Self, MeshError> {
        // proto3 has no absent number: 0 is an unset mesh port.
        if m.mesh_port == 0 {
            return Err(MeshError::invalid("mesh_port", "is not set"));
        }
        let spiffe_id: SpiffeId = parse_spiffe_id("spiffe_id", &m.spiffe_id)?;
        Workload::new(
            "",
            &m.name,
            &m.namespace,
            spiffe_id,
            m.ips.iter().map(String::as_str),
            m.mesh_port,
            &m.labels,
        )
    }
}

impl Resource for Workload {
    const TYPE_URL: &'static str = type_url::WORKLOAD;
    const KIND: &'static str = "Workload";
    type Message = proto::Workload;

    fn from_message(message: &proto::Workload) -> Result<Self, MeshError> {
        Self::try_from(message)
    }

    fn resource_name(&self) -> String {
        Workload::resource_name(self)
    }
}

impl From<&Service> for proto::Service {
    fn from(s: &Service) -> Self {
        proto::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            vips: s.vips.iter().map(ToString::to_string).collect(),
            hostnames: s.hostnames.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| proto::ServicePort {
                    port: u32::from(p.port),
                    target_port: u32::from(p.target_port),
                    name: p.name.clone(),
                })
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .map(|ip| proto::Endpoint { ip: ip.to_string() })
                .collect(),
        }
    }
}

impl TryFrom<&proto::Service> for Service {
    type Error = MeshError;

    fn try_from(m: &proto::Service) -> Result<Self, MeshError> {
        // The control plane always writes the target port, so 0 is refused, not defaulted.
        let ports = ServicePort::list(
            "ports",
            m.ports
                .iter()
                .map(|p| (p.port, Some(p.target_port), p.name.clone())),
        )?;
        let endpoints = parse_ips("endpoints", m.endpoints.iter().map(|e| e.ip.as_str()))?;
        Service::new(
            "",
            &m.name,
            &m.namespace,
            m.vips.iter().map(String::as_str),
            &m.hostnames,
            ports,
            endpoints,
        )
    }
}

impl Resource for Service {
    const TYPE_URL: &'static str = type_url::SERVICE;
    const KIND: &'static str = "Service";
    type Message = proto::Service;

    fn from_message(message: &proto::Service) -> Result<Self, MeshError> {
        Self::try_from(message)
    }

    fn resource_name(&self) -> String {
        Service::resource_name(self)
    }
}

impl From<&Policy> for proto::AuthorizationPolicy {
    fn from(p: &Policy) -> Self {
        use principal_match::Match;
        proto::AuthorizationPolicy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            selector: p.selector.clone(),
            action: match p.action {
                Action::Allow => authorization_policy::Action::Allow as i32,
                Action::Deny => authorization_policy::Action::Deny as i32,
            },
            rules: p
                .rules
                .iter()
                .map(|r| proto::Rule {
                    principals: r
                        .principals
                        .iter()
                        .map(|m| proto::PrincipalMatch {
                            r#match: Some(match m {
                                Principal::Exact(s) => Match::Exact(s.clone()),
                                Principal::Prefix(s) => Match::Prefix(s.clone()),
                            }),
                        })
                        .collect(),
                    namespaces: r.namespaces.clone(),
                    ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                })
                .collect(),
        }
    }
}

impl TryFrom<&proto::AuthorizationPolicy> for Policy {
    type Error = MeshError;

    fn try_from(m: &proto::AuthorizationPolicy) -> Result<Self, MeshError> {
        let action = match authorization_policy::Action::try_from(m.action) {
            Ok(authorization_policy::Action::Allow) => Action::Allow,
            Ok(authorization_policy::Action::Deny) => Action::Deny,
            Err(_) => {
                return Err(MeshError::invalid(
                    format!("action {}", m.action),
                    "is neither ALLOW nor DENY",
                ));
            }
        };
        let mut rules = Vec::with_capacity(m.rules.len());
        for (i, r) in m.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            let mut principals = Vec::with_capacity(r.principals.len());
            for (j, p) in r.principals.iter().enumerate() {
                let at = format!("{at}.principals[{j}]");
                principals.push(match &p.r#match {
                    Some(principal_match::Match::Exact(id)) => Principal::exact(&at, id)?,
                    Some(principal_match::Match::Prefix(prefix)) => Principal::prefix(&at, prefix)?,
                    None => {
                        return Err(MeshError::invalid(at, "has neither exact nor prefix"));
                    }
                });
            }
            rules.push(Rule::new(&at, principals, &r.namespaces, &r.ports)?);
        }
        Policy::new("", &m.name, &m.namespace, &m.selector, action, rules)
    }
}

impl Resource for Policy {
    const TYPE_URL: &'static str = type_url::AUTHORIZATION_POLICY;
    const KIND: &'static str = "AuthorizationPolicy";
    type Message = proto::AuthorizationPolicy;

    fn from_message(message: &proto::AuthorizationPolicy) -> Result<Self, MeshError> {
        Self::try_from(message)
    }

    fn resource_name(&self) -> String {
        Policy::resource_name(self)
    }
}

fn mtls_mode_number(mode: MtlsMode) -> i32 {
    match mode {
        MtlsMode::Strict => mesh_config::MtlsMode::Strict as i32,
        MtlsMode::Permissive => mesh_config::MtlsMode::Permissive as i32,
    }
}

fn mtls_mode(at: &str, value: i32) -> Result<MtlsMode, MeshError> {
    match mesh_config::MtlsMode::try_from(value) {
        Ok(mesh_config::MtlsMode::Strict) => Ok(MtlsMode::Strict),
        Ok(mesh_config::MtlsMode::Permissive) => Ok(MtlsMode::Permissive),
        Err(_) => Err(MeshError::invalid(
            format!("{at} {value}"),
            "is neither STRICT nor PERMISSIVE",
        )),
    }
}

impl From<&MeshConfig> for proto::MeshConfig {
    fn from(c: &MeshConfig) -> Self {
        let s = &c.settings;
        proto::MeshConfig {
            mtls_mode: mtls_mode_number(s.mtls),
            port_mtls: s
                .port_mtls
                .iter()
                .map(|(port, mode)| (u32::from(*port), mtls_mode_number(*mode)))
                .collect(),
            trust_bundle_pem: c.trust_bundle_pem.clone(),
            outbound_policy: match s.outbound_policy {
                OutboundPolicy::Passthrough => mesh_config::OutboundPolicy::Passthrough as i32,
                OutboundPolicy::RegistryOnly => mesh_config::OutboundPolicy::RegistryOnly as i32,
            },
            revocations: c
                .revocations
                .iter()
                .map(|(id, at)| mesh_config::Revocation {
                    spiffe_id: id.to_string(),
                    revoked_at_unix: at
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
                })
                .collect(),
            jwt_bundle_jwks: c.jwt_bundle_jwks.clone(),
        }
    }
}

impl TryFrom<&proto::MeshConfig> for MeshConfig {
    type Error = MeshError;

    fn try_from(m: &proto::MeshConfig) -> Result<Self, MeshError> {
        let mut port_mtls = Vec::with_capacity(m.port_mtls.len());
        for (port, mode) in &m.port_mtls {
            port_mtls.push((*port, mtls_mode(&format!("port_mtls[{port}]"), *mode)?));
        }
        let outbound_policy = match mesh_config::OutboundPolicy::try_from(m.outbound_policy) {
            Ok(mesh_config::OutboundPolicy::Passthrough) => OutboundPolicy::Passthrough,
            Ok(mesh_config::OutboundPolicy::RegistryOnly) => OutboundPolicy::RegistryOnly,
            Err(_) => {
                return Err(MeshError::invalid(
                    format!("outbound_policy {}", m.outbound_policy),
                    "is neither PASSTHROUGH nor REGISTRY_ONLY",
                ));
            }
        };
        let settings = MeshSettings::new(
            "port_mtls",
            mtls_mode("mtls_mode", m.mtls_mode)?,
            port_mtls,
            outbound_policy,
        )?;
        let mut revocations = BTreeMap::new();
        for (i, r) in m.revocations.iter().enumerate() {
            let at = format!("revocations[{i}]");
            let id = parse_spiffe_id(&format!("{at}.spiffe_id"), &r.spiffe_id)?;
            let secs = u64::try_from(r.revoked_at_unix)
                .map_err(|_| MeshError::invalid(format!("{at}.revoked_at_unix"), "is negative"))?;
            revocations.insert(id, UNIX_EPOCH + Duration::from_secs(secs));
        }
        Ok(MeshConfig {
            settings,
            trust_bundle_pem: m.trust_bundle_pem.clone(),
            revocations,
            jwt_bundle_jwks: m.jwt_bundle_jwks.clone(),
        })
    }
}

impl Resource for MeshConfig {
    const TYPE_URL: &'static str = type_url::MESH_CONFIG;
    const KIND: &'static str = "MeshConfig";
    type Message = proto::MeshConfig;

    fn from_message(message: &proto::MeshConfig) -> Result<Self, MeshError> {
        Self::try_from(message)
    }

    /// There is one MeshConfig, named "mesh".
    fn resource_name(&self) -> String {
        latch_proto::MESH_CONFIG_NAME.to_string()
    }
}
