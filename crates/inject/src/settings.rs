//! The proxy's resources and log level: injector-wide defaults (`latch-control
//! --inject-proxy-*` flags), overridden per pod by annotations. A malformed value is refused
//! with the annotation and the reason, as the API server would refuse the pod it produced
//! later, with a less helpful message.

use serde_json::{Map, Value, json};

use crate::{InjectError, lookup};

pub const ANNOTATION_CPU_REQUEST: &str = "latch.dev/proxy-cpu-request";
pub const ANNOTATION_CPU_LIMIT: &str = "latch.dev/proxy-cpu-limit";
pub const ANNOTATION_MEMORY_REQUEST: &str = "latch.dev/proxy-memory-request";
pub const ANNOTATION_MEMORY_LIMIT: &str = "latch.dev/proxy-memory-limit";
pub const ANNOTATION_LOG_LEVEL: &str = "latch.dev/proxy-log-level";

/// The log levels the proxy's RUST_LOG takes here.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// The proxy container's resources and log level. An empty quantity leaves that entry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
    pub log_level: String,
    /// The capture rules come from `latch-cni` on the node (CNI mode): no privileged
    /// `latch-iptables` init container, a `latch-cni-wait` one without privileges instead.
    pub cni: bool,
}

impl Default for ProxySettings {
    /// Requests for an idle proxy; limits that a namespace quota on `limits.cpu` and
    /// `limits.memory` can count, high enough for a busy one (it moves several Gbit/s on
    /// one core).
    fn default() -> Self {
        Self {
            cpu_request: "50m".into(),
            cpu_limit: "2".into(),
            memory_request: "32Mi".into(),
            memory_limit: "256Mi".into(),
            log_level: "info".into(),
            cni: false,
        }
    }
}

/// The injector-wide defaults as flags, shared by `latch-control` (its webhook) and `latchctl
/// inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyFlags {
    /// CPU request of injected proxies (a pod's latch.dev/proxy-cpu-request overrides it).
    #[arg(long, env = "LATCH_INJECT_PROXY_CPU_REQUEST", default_value = "50m")]
    pub inject_proxy_cpu_request: String,
    /// CPU limit of injected proxies ("" for none; latch.dev/proxy-cpu-limit overrides it).
    #[arg(long, env = "LATCH_INJECT_PROXY_CPU_LIMIT", default_value = "2")]
    pub inject_proxy_cpu_limit: String,
    /// Memory request of injected proxies (latch.dev/proxy-memory-request overrides it).
    #[arg(
        long,
        env = "LATCH_INJECT_PROXY_MEMORY_REQUEST",
        default_value = "32Mi"
    )]
    pub inject_proxy_memory_request: String,
    /// Memory limit of injected proxies ("" for none; latch.dev/proxy-memory-limit overrides
    /// it).
    #[arg(long, env = "LATCH_INJECT_PROXY_MEMORY_LIMIT", default_value = "256Mi")]
    pub inject_proxy_memory_limit: String,
    /// Log level of injected proxies: error, warn, info, debug or trace
    /// (latch.dev/proxy-log-level overrides it).
    #[arg(long, env = "LATCH_INJECT_PROXY_LOG_LEVEL", default_value = "info")]
    pub inject_proxy_log_level: String,
    /// CNI mode: latch-cni (deploy/kubernetes/50-cni.yaml) installs the capture rules on the
    /// node, so injected pods get no privileged latch-iptables init container, only
    /// latch-cni-wait (no privileges), which holds the pod until the capture works; meshed pods
    /// then pass Pod Security "restricted".
    #[arg(long, env = "LATCH_INJECT_CNI")]
    pub inject_cni: bool,
}

impl ProxyFlags {
    /// The settings, checked.
    pub fn settings(&self) -> Result<ProxySettings, String> {
        let settings = ProxySettings {
            cpu_request: self.inject_proxy_cpu_request.clone(),
            cpu_limit: self.inject_proxy_cpu_limit.clone(),
            memory_request: self.inject_proxy_memory_request.clone(),
            memory_limit: self.inject_proxy_memory_limit.clone(),
            log_level: self.inject_proxy_log_level.clone(),
            cni: self.inject_cni,
        };
        settings
            .validate()
            .map_err(|e| format!("--inject-proxy-*: {e}"))?;
        Ok(settings)
    }
}

/// A Kubernetes quantity's value (`500m` is 0.5, `1Gi` 2^30), or why it is not one.
pub fn quantity(text: &str) -> Result<f64, String> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let value: f64 = number
        .parse()
        .ok()
        .filter(|_| !number.is_empty() && number.matches('.').count() <= 1)
        .ok_or_else(|| format!("{text:?} is not a quantity (e.g. 100m, 0.5, 64Mi, 1G)"))?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "{text:?} has unit {suffix:?}; use m, k, M, G, T, Ki, Mi, Gi or Ti"
            ));
        }
    };
    Ok(value * factor)
}

impl ProxySettings {
    /// Checks the values (as flags: `what` names them in the error).
    pub fn validate(&self) -> Result<(), String> {
        for (what, value) in [
            ("cpu request", &self.cpu_request),
            ("cpu limit", &self.cpu_limit),
            ("memory request", &self.memory_request),
            ("memory limit", &self.memory_limit),
        ] {
            if !value.is_empty() {
                quantity(value).map_err(|e| format!("proxy {what}: {e}"))?;
            }
        }
        for (resource, request, limit) in [
            ("cpu", &self.cpu_request, &self.cpu_limit),
            ("memory", &self.memory_request, &self.memory_limit),
        ] {
            if !request.is_empty() && !limit.is_empty() && quantity(request)? > quantity(limit)? {
                return Err(format!(
                    "proxy {resource} request {request} is over its limit {limit}"
                ));
            }
        }
        if !LOG_LEVELS.contains(&self.log_level.as_str()) {
            return Err(format!(
                "proxy log level {:?} is not one of {}",
                self.log_level,
                LOG_LEVELS.join(", ")
            ));
        }
        Ok(())
    }

    /// These settings with the pod's annotations applied; a malformed one is refused.
    pub fn for_pod(&self, pod: &Value) -> Result<Self, InjectError> {
        let mut settings = self.clone();
        for (annotation, field) in [
            (ANNOTATION_CPU_REQUEST, &mut settings.cpu_request),
            (ANNOTATION_CPU_LIMIT, &mut settings.cpu_limit),
            (ANNOTATION_MEMORY_REQUEST, &mut settings.memory_request),
            (ANNOTATION_MEMORY_LIMIT, &mut settings.memory_limit),
            (ANNOTATION_LOG_LEVEL, &mut settings.log_level),
        ] {
            if let Some(value) = lookup(pod, "annotations", annotation) {
                *field = value.trim().to_string();
                let check = if annotation == ANNOTATION_LOG_LEVEL {
                    LOG_LEVELS
                        .contains(&field.as_str())
                        .then_some(())
                        .ok_or_else(|| format!("use one of {}", LOG_LEVELS.join(", ")))
                } else {
                    quantity(field).map(drop)
                };
                check.map_err(|reason| InjectError::BadAnnotation {
                    annotation,
                    value: value.to_string(),
                    reason,
                })?;
            }
        }
        settings
            .validate()
            .map_err(|reason| InjectError::BadAnnotation {
                annotation: "latch.dev/proxy-*",
                value: String::new(),
                reason,
            })?;
        Ok(settings)
    }

    /// The container's `resources`.
    pub fn resources(&self) -> Value {
        let pick = |entries: [(&str, &String); 2]| {
            entries
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect::<Map<String, Value>>()
        };
        let mut resources = Map::new();
        let requests = pick([("cpu", &self.cpu_request), ("memory", &self.memory_request)]);
        let limits = pick([("cpu", &self.cpu_limit), ("memory", &self.memory_limit)]);
        if !requests.is_empty() {
            resources.insert("requests".into(), Value::Object(requests));
        }
        if !limits.is_empty() {
            resources.insert("limits".into(), Value::Object(limits));
        }
        Value::Object(resources)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(quantity("500m"), Ok(0.5));
        assert_eq!(quantity("2"), Ok(2.0));
        assert_eq!(quantity("0.25"), Ok(0.25));
        assert_eq!(quantity("64Mi"), Ok(64.0 * 1024.0 * 1024.0));
        assert_eq!(quantity("1G"), Ok(1e9));
        for bad in ["", "m", "1.2.3", "12 Mi", "1Xi", "-1", "lots"] {
            assert!(quantity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn annotations_override_defaults_and_bad_ones_are_refused() {
        let pod =
            |annotations: Value| json!({"metadata": {"annotations": annotations}, "spec": {}});
        let defaults = ProxySettings::default();
        let set = defaults
            .for_pod(&pod(json!({
                ANNOTATION_CPU_REQUEST: "200m",
                ANNOTATION_MEMORY_LIMIT: "1Gi",
                ANNOTATION_LOG_LEVEL: "debug",
            })))
            .unwrap();
        assert_eq!(
            set.resources(),
            json!({"requests": {"cpu": "200m", "memory": "32Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}})
        );
        assert_eq!(set.log_level, "debug");
        for (annotations, culprit) in [
            (json!({ANNOTATION_CPU_LIMIT: "two"}), ANNOTATION_CPU_LIMIT),
            (json!({ANNOTATION_LOG_LEVEL: "loud"}), ANNOTATION_LOG_LEVEL),
            (
                json!({ANNOTATION_CPU_REQUEST: "3"}),
                "cpu request 3 is over its limit 2",
            ),
        ] {
            let err = defaults.for_pod(&pod(annotations)).unwrap_err().to_string();
            assert!(err.contains(culprit), "{err}");
        }
    }
}
