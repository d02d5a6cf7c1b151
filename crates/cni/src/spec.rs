//! The CNI protocol as the plugin speaks it (CNI specification 0.3.0 to 1.1.0): the
//! `CNI_*` environment, the network configuration on stdin, the versions we support, and the
//! error object written to stdout on failure. Nothing here touches the network; `plugin.rs`
//! does the work, `main.rs` wires stdin, stdout and the exit code.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every version of the specification this plugin implements. CHECK exists from 0.4.0, STATUS
/// and GC from 1.1.0; a chained plugin passes the previous result through, so the result
/// format of each version is the runtime's own.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version, used when the input names none (VERSION without stdin).
pub const LATEST_VERSION: &str = "1.1.0";

/// Error codes of the specification ("Error" section); 100 and up are the plugin's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// STATUS (1.1.0): the plugin cannot serve ADD on this node.
    pub const NOT_AVAILABLE: u32 = 50;
    /// Latch's own: the capture rules could not be installed or removed.
    pub const CAPTURE_FAILED: u32 = 100;
    /// Latch's own: CHECK found the capture rules missing or altered.
    pub const CAPTURE_MISSING: u32 = 101;
}

/// A failure as the runtime reads it: `{"cniVersion", "code", "msg", "details"}` on stdout and
/// a non-zero exit status. `msg` is short; `details` says what to check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            cni_version: LATEST_VERSION.to_string(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The same error, reported in the version the runtime asked for (when we support it).
    pub fn in_version(mut self, version: &str) -> Self {
        if SUPPORTED_VERSIONS.contains(&version) {
            self.cni_version = version.to_string();
        }
        self
    }
}

/// The operation the runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(value: &str) -> Result<Self, CniError> {
        Ok(match value {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENVIRONMENT,
                    "unknown CNI_COMMAND",
                    format!(
                        "CNI_COMMAND={other:?}; expected ADD, DEL, CHECK, VERSION, STATUS or GC"
                    ),
                ));
            }
        })
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub container_id: Option<String>,
    /// The path of the pod's network namespace (e.g. /var/run/netns/cni-1234...).
    pub netns: Option<String>,
    pub ifname: Option<String>,
    /// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;` (Kubernetes runtimes pass
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, ... and `IgnoreUnknown=1`).
    pub args: BTreeMap<String, String>,
}

impl Env {
    /// Reads the environment through `var` (std::env::var in the binary, a map in tests).
    /// Empty variables count as absent: runtimes set `CNI_NETNS=` on a DEL whose namespace is
    /// gone.
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        Ok(Self {
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: parse_args(&get("CNI_ARGS").unwrap_or_default())?,
        })
    }

    /// `CNI_CONTAINERID`, which ADD, DEL and CHECK require.
    pub fn require_container_id(&self) -> Result<&str, CniError> {
        self.container_id.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_CONTAINERID is not set",
                "the runtime must name the container for ADD, DEL and CHECK",
            )
        })
    }

    /// The pod's Kubernetes namespace, from `CNI_ARGS` `K8S_POD_NAMESPACE`.
    pub fn pod_namespace(&self) -> Option<&str> {
        self.args.get("K8S_POD_NAMESPACE").map(String::as_str)
    }

    /// `<namespace>/<name>` of the pod for messages, or the container id outside Kubernetes.
    pub fn pod_label(&self) -> String {
        match (self.pod_namespace(), self.args.get("K8S_POD_NAME")) {
            (Some(ns), Some(name)) => format!("pod {ns}/{name}"),
            _ => format!(
                "container {}",
                self.container_id.as_deref().unwrap_or("(unnamed)")
            ),
        }
    }
}

/// Parses `CNI_ARGS`. A pair without `=` is refused: the runtime and the plugin would
/// disagree on what was asked.
fn parse_args(text: &str) -> Result<BTreeMap<String, String>, CniError> {
    text.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "malformed CNI_ARGS",
                format!("{pair:?} is not KEY=VALUE (CNI_ARGS is KEY=VALUE pairs joined by ';')"),
            )),
        })
        .collect()
}

/// The network configuration on stdin: its version, `prevResult` for a chained plugin, and
/// every other field (`name`, `type`, Latch's own settings read by `config.rs`) kept as raw
/// JSON, so that a malformed Latch field is reported as an invalid config, not a decode error.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

impl NetConf {
    /// Decodes stdin and checks the version.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "cannot decode the network configuration on stdin",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "unsupported cniVersion",
                format!(
                    "the configuration has cniVersion {:?}; latch-cni supports {}",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        Ok(conf)
    }

    /// True when this configuration's version has `command` (CHECK from 0.4.0, STATUS and GC
    /// from 1.1.0).
    pub fn version_has(&self, command: Command) -> bool {
        let at_least = |min: &str| version_key(&self.cni_version) >= version_key(min);
        match command {
            Command::Check => at_least("0.4.0"),
            Command::Status | Command::Gc => at_least("1.1.0"),
            Command::Add | Command::Del | Command::Version => true,
        }
    }
}

/// "1.0.0" -> [1, 0, 0], for ordering; unparsable parts count as 0 (only supported versions get
/// here).
fn version_key(version: &str) -> Vec<u32> {
    version.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// The `cniVersion` stdin asks for when we support it, else the newest.
pub fn asked_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string())
}

/// VERSION's answer: the version asked for (or the newest) and every supported one.
pub fn version_info(stdin: &[u8]) -> Value {
    serde_json::json!({
        "cniVersion": asked_version(stdin),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        Env::read(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn cni_args_are_key_value_pairs() {
        let env = env(&[
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", ""),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1",
            ),
        ])
        .unwrap();
        assert_eq!(env.netns, None, "an empty CNI_NETNS is no namespace");
        assert_eq!(env.pod_namespace(), Some("shop"));
        assert_eq!(env.pod_label(), "pod shop/web-1");
        let err = self::env(&[("CNI_ARGS", "K8S_POD_NAMESPACE=shop;oops")]).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENVIRONMENT);
        assert!(err.details.contains("\"oops\""), "{err:?}");
    }

    #[test]
    fn commands_and_versions() {
        assert_eq!(Command::parse("CHECK").unwrap(), Command::Check);
        assert_eq!(
            Command::parse("add").unwrap_err().code,
            code::INVALID_ENVIRONMENT
        );
        let conf = |v: &str| NetConf::parse(format!(r#"{{"cniVersion":"{v}"}}"#).as_bytes());
        assert_eq!(conf("0.2.0").unwrap_err().code, code::INCOMPATIBLE_VERSION);
        assert!(!conf("0.3.1").unwrap().version_has(Command::Check));
        assert!(conf("0.4.0").unwrap().version_has(Command::Check));
        assert!(!conf("1.0.0").unwrap().version_has(Command::Status));
        assert!(conf("1.1.0").unwrap().version_has(Command::Gc));
        assert_eq!(
            NetConf::parse(b"{not json").unwrap_err().code,
            code::DECODE_FAILURE
        );
    }

    #[test]
    fn version_answers_the_asked_version_and_lists_all() {
        let info = version_info(br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(info["cniVersion"], "0.4.0");
        assert_eq!(
            info["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(version_info(b"")["cniVersion"], LATEST_VERSION);
    }

    #[test]
    fn errors_serialize_as_the_spec_says() {
        let err = CniError::new(7, "bad", "because").in_version("1.0.0");
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            serde_json::json!({"cniVersion": "1.0.0", "code": 7, "msg": "bad", "details": "because"})
        );
    }
}
