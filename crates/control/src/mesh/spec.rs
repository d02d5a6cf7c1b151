//! The mesh sections of the control plane's YAML config file (`mesh`, `workloads`, `services`,
//! `policies`) exactly as written, before any validation. `model` turns them into the checked
//! domain types; nothing else reads these structs.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `mesh:` — mesh-wide settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSettingsSpec {
    /// STRICT (default) or PERMISSIVE.
    #[serde(default)]
    pub mtls: Option<String>,
    /// App port -> STRICT or PERMISSIVE, overriding `mtls`.
    #[serde(default)]
    pub port_mtls: BTreeMap<u32, String>,
    /// passthrough (default) or registry-only.
    #[serde(default)]
    pub outbound_policy: Option<String>,
}

/// One entry of `workloads:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    /// SPIFFE ID = spiffe://<trust domain>/ns/<namespace>/sa/<service_account>.
    #[serde(default)]
    pub service_account: Option<String>,
    /// Alternative to `service_account`; must be in the trust domain.
    #[serde(default)]
    pub spiffe_id: Option<String>,
    #[serde(default)]
    pub ips: Vec<String>,
    /// Default 15008.
    #[serde(default)]
    pub mesh_port: Option<u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One entry of `services:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub vips: Vec<String>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePortSpec>,
    /// Endpoints are the IPs of the namespace's workloads carrying these labels...
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    /// ...or these explicit IPs (exactly one of the two).
    #[serde(default)]
    pub endpoints: Option<Vec<String>>,
}

/// One entry of a service's `ports:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePortSpec {
    pub port: u32,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u32>,
    #[serde(default)]
    pub name: String,
}

/// One entry of `policies:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    pub namespace: String,
    /// Labels a workload of `namespace` must carry; empty or absent selects all of them.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// ALLOW or DENY.
    pub action: String,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// One entry of a policy's `rules:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default)]
    pub principals: Vec<PrincipalSpec>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u32>,
}

/// `{exact: "spiffe://..."}` or `{prefix: "spiffe://..."}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSpec {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
}
