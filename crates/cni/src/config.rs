//! Which pods latch-cni captures and with which rules: Latch's fields of the plugin's entry in
//! the node's conflist, plus per-pod exclusions from `CNI_ARGS`. A pure decision, so the rules
//! are table-tested here and `plugin.rs` only applies them.
//!
//! A pod is captured when its namespace (`K8S_POD_NAMESPACE` in `CNI_ARGS`, which Kubernetes
//! runtimes always pass) is listed in `captureNamespaces` (or that list is `["*"]`) and not in
//! `excludeNamespaces`. kube-system and latch-system are never captured, whatever the config
//! says: the control plane and the cluster's own add-ons must start without the mesh.

use latch_mesh::ports::PROXY_UID;
use latch_proxy::capture::CaptureRules;
use serde::Deserialize;
use serde_json::Value;

use crate::spec::{CniError, Env, code};

/// Namespaces never captured.
pub const ALWAYS_EXCLUDED: [&str; 2] = ["kube-system", "latch-system"];

/// `CNI_ARGS` keys with per-pod exclusions (comma-separated ports), added to the config's.
pub const ARG_EXCLUDE_OUTBOUND: &str = "LATCH_EXCLUDE_OUTBOUND_PORTS";
pub const ARG_EXCLUDE_INBOUND: &str = "LATCH_EXCLUDE_INBOUND_PORTS";

/// Latch's fields of the plugin configuration (camelCase, as CNI configurations are written).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PluginConfig {
    /// Namespaces whose pods are meshed: exactly those labelled `latch.dev/inject=enabled`.
    /// `["*"]` captures every namespace not excluded. Empty (the default): nothing is captured.
    pub capture_namespaces: Vec<String>,
    /// Namespaces never captured, besides kube-system and latch-system.
    pub exclude_namespaces: Vec<String>,
    /// The proxy's uid, whose traffic leaves uncaptured.
    pub proxy_uid: u32,
    /// Destination ports every captured pod reaches directly.
    pub exclude_outbound_ports: Vec<u16>,
    /// Pod ports every captured pod exposes directly.
    pub exclude_inbound_ports: Vec<u16>,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            capture_namespaces: Vec::new(),
            exclude_namespaces: Vec::new(),
            proxy_uid: PROXY_UID,
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
        }
    }
}

/// What to do for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Capture(CaptureRules),
    /// Not meshed: leave the pod alone. The reason is for the log.
    Skip(String),
}

impl PluginConfig {
    /// Latch's fields out of the whole configuration object.
    pub fn from_conf(fields: &serde_json::Map<String, Value>) -> Result<Self, CniError> {
        let config: PluginConfig =
            serde_json::from_value(Value::Object(fields.clone())).map_err(|e| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "invalid latch-cni configuration",
                    format!(
                        "{e}; expected captureNamespaces and excludeNamespaces as lists of \
                         names, proxyUid as a number, excludeOutboundPorts and \
                         excludeInboundPorts as lists of ports (1-65535)"
                    ),
                )
            })?;
        let zero = config
            .exclude_outbound_ports
            .iter()
            .chain(&config.exclude_inbound_ports)
            .any(|p| *p == 0);
        if zero {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid latch-cni configuration",
                "port 0 in excludeOutboundPorts or excludeInboundPorts; ports are 1-65535",
            ));
        }
        Ok(config)
    }

    /// Whether and how to capture the pod `env` describes.
    pub fn decide(&self, env: &Env) -> Result<Decision, CniError> {
        let Some(namespace) = env.pod_namespace() else {
            return Ok(Decision::Skip(
                "CNI_ARGS has no K8S_POD_NAMESPACE (not a Kubernetes pod)".into(),
            ));
        };
        let excluded = ALWAYS_EXCLUDED.contains(&namespace)
            || self.exclude_namespaces.iter().any(|n| n == namespace);
        let listed = self
            .capture_namespaces
            .iter()
            .any(|n| n == namespace || n == "*");
        if excluded || !listed {
            return Ok(Decision::Skip(format!(
                "namespace {namespace} is not captured (captureNamespaces / excludeNamespaces)"
            )));
        }
        let mut rules = CaptureRules {
            proxy_uid: self.proxy_uid,
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
        };
        rules
            .exclude_outbound_ports
            .extend(ports_arg(env, ARG_EXCLUDE_OUTBOUND)?);
        rules
            .exclude_inbound_ports
            .extend(ports_arg(env, ARG_EXCLUDE_INBOUND)?);
        for ports in [
            &mut rules.exclude_outbound_ports,
            &mut rules.exclude_inbound_ports,
        ] {
            ports.sort_unstable();
            ports.dedup();
        }
        Ok(Decision::Capture(rules))
    }
}

/// A comma-separated port list from `CNI_ARGS` (absent: none).
fn ports_arg(env: &Env, key: &str) -> Result<Vec<u16>, CniError> {
    let Some(value) = env.args.get(key) else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(|p| match p.trim().parse::<u16>() {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("malformed {key} in CNI_ARGS"),
                format!("{key}={value:?}: expected ports 1-65535 separated by commas"),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: Value) -> Result<PluginConfig, CniError> {
        PluginConfig::from_conf(json.as_object().unwrap())
    }

    fn env(args: &str) -> Env {
        Env::read(|name| (name == "CNI_ARGS").then(|| args.to_string())).unwrap()
    }

    #[test]
    fn which_pods_are_captured() {
        let listed = config(serde_json::json!({
            "type": "latch-cni",
            "captureNamespaces": ["shop", "kube-system"],
        }))
        .unwrap();
        let everything = config(serde_json::json!({
            "captureNamespaces": ["*"],
            "excludeNamespaces": ["legacy"],
        }))
        .unwrap();
        let nothing = config(serde_json::json!({})).unwrap();
        let table = [
            (&listed, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=a", true),
            (&listed, "K8S_POD_NAMESPACE=other", false),
            (&listed, "K8S_POD_NAMESPACE=kube-system", false),
            (&listed, "K8S_POD_NAME=a", false),
            (&listed, "", false),
            (&everything, "K8S_POD_NAMESPACE=other", true),
            (&everything, "K8S_POD_NAMESPACE=legacy", false),
            (&everything, "K8S_POD_NAMESPACE=latch-system", false),
            (&nothing, "K8S_POD_NAMESPACE=shop", false),
        ];
        for (config, args, captured) in table {
            let decision = config.decide(&env(args)).unwrap();
            assert_eq!(
                matches!(decision, Decision::Capture(_)),
                captured,
                "{args:?} with {config:?}: {decision:?}"
            );
        }
    }

    #[test]
    fn exclusions_merge_config_and_cni_args() {
        let config = config(serde_json::json!({
            "captureNamespaces": ["shop"],
            "proxyUid": 2000,
            "excludeOutboundPorts": [5432, 22],
            "excludeInboundPorts": [9090],
        }))
        .unwrap();
        let decision = config
            .decide(&env(
                "K8S_POD_NAMESPACE=shop;LATCH_EXCLUDE_OUTBOUND_PORTS=6379,22;LATCH_EXCLUDE_INBOUND_PORTS=8081",
            ))
            .unwrap();
        assert_eq!(
            decision,
            Decision::Capture(CaptureRules {
                proxy_uid: 2000,
                exclude_outbound_ports: vec![22, 5432, 6379],
                exclude_inbound_ports: vec![8081, 9090],
            })
        );
        for bad in ["0", "70000", "22,,23", "postgres"] {
            let err = config
                .decide(&env(&format!(
                    "K8S_POD_NAMESPACE=shop;LATCH_EXCLUDE_OUTBOUND_PORTS={bad}"
                )))
                .unwrap_err();
            assert_eq!(err.code, code::INVALID_ENVIRONMENT, "{bad}");
        }
    }

    #[test]
    fn malformed_config_is_an_invalid_config() {
        for bad in [
            serde_json::json!({"captureNamespaces": "shop"}),
            serde_json::json!({"excludeOutboundPorts": [70000]}),
            serde_json::json!({"excludeInboundPorts": [0]}),
            serde_json::json!({"proxyUid": -1}),
        ] {
            assert_eq!(
                config(bad.clone()).unwrap_err().code,
                code::INVALID_CONFIG,
                "{bad}"
            );
        }
    }
}
