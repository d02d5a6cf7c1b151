//! Offline injection of multi-document YAML (`latchctl inject`): Pods, and the pod templates of
//! Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs and
//! CronJobs (also inside a `List`), go through `inject`; every other document is written back
//! as it was read (comments and formatting are not kept: the YAML is parsed and re-emitted).

use serde_json::Value;
use thiserror::Error;

use crate::{InjectConfig, InjectError, SkipReason, inject};

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("document {index}: not YAML: {reason}")]
    Yaml { index: usize, reason: String },
    #[error("document {index} ({what}): {reason}")]
    Shape {
        index: usize,
        what: String,
        reason: String,
    },
    #[error("document {index} ({what}): {source}")]
    Inject {
        index: usize,
        what: String,
        source: InjectError,
    },
}

/// What happened to one pod or pod template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `Kind/name` of the document.
    pub object: String,
    pub skipped: Option<SkipReason>,
    /// The injection's warnings (see `Injection::warnings`).
    pub warnings: Vec<String>,
}

/// Injects every pod and pod template in `yaml`; returns the new YAML and what was done.
pub fn inject_manifests(
    yaml: &str,
    config: &InjectConfig,
) -> Result<(String, Vec<Outcome>), ManifestError> {
    let mut docs = Vec::new();
    let mut outcomes = Vec::new();
    // One document at a time, so an error names its document. Empty documents (a leading or
    // doubled `---`) yield nothing; merge keys (`<<`) are expanded while reading.
    let mut reader = yaml.as_bytes();
    let documents = serde_saphyr::read_with_options::<_, Value>(&mut reader, yaml_1_2());
    for (index, document) in documents.enumerate() {
        let index = index + 1;
        let yaml_err = |e: &dyn std::fmt::Display| ManifestError::Yaml {
            index,
            reason: e.to_string(),
        };
        let mut doc = document.map_err(|e| yaml_err(&e))?;
        if doc.is_null() {
            continue;
        }
        if kind_of(&doc).is_some_and(is_pod_bearing) {
            inject_object(&mut doc, index, config, &mut outcomes)?;
        }
        docs.push(serde_saphyr::to_string(&doc).map_err(|e| yaml_err(&e))?);
    }
    Ok((docs.join("---\n"), outcomes))
}

/// YAML 1.2 scalars, as serde_yaml read them before: `yes`, `on`, `0755` and `1_000` stay
/// strings instead of becoming booleans and numbers, so a document that is not a pod comes out
/// as it went in.
fn yaml_1_2() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
    }
}

fn kind_of(doc: &Value) -> Option<&str> {
    doc.get("kind")?.as_str()
}

fn is_pod_bearing(kind: &str) -> bool {
    template_path(kind).is_some() || kind == "List"
}

/// Where a kind keeps its pod: "" for a Pod itself.
fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn describe_json(object: &Value) -> String {
    let name = object
        .pointer("/metadata/name")
        .or_else(|| object.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("<no kind>");
    format!("{kind}/{name}")
}

fn inject_object(
    object: &mut Value,
    index: usize,
    config: &InjectConfig,
    outcomes: &mut Vec<Outcome>,
) -> Result<(), ManifestError> {
    let what = describe_json(object);
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind == "List" {
        let items = object
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| ManifestError::Shape {
                index,
                what: what.clone(),
                reason: "a List without an items list".into(),
            })?;
        for item in items.iter_mut() {
            if item
                .get("kind")
                .and_then(Value::as_str)
                .is_some_and(is_pod_bearing)
            {
                inject_object(item, index, config, outcomes)?;
            }
        }
        return Ok(());
    }
    let path = template_path(kind).unwrap_or("");
    let template = object
        .pointer_mut(path)
        .ok_or_else(|| ManifestError::Shape {
            index,
            what: what.clone(),
            reason: format!("no pod template at {path}"),
        })?;
    let injection = inject(template, config).map_err(|source| ManifestError::Inject {
        index,
        what: what.clone(),
        source,
    })?;
    *template = injection.pod;
    outcomes.push(Outcome {
        object: what,
        skipped: injection.skipped,
        warnings: injection.warnings,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_documents_keep_yaml_1_2_scalars_and_merge_keys_are_expanded() {
        let yaml = "kind: ConfigMap\nmetadata: {name: x}\ndata:\n  a: yes\n  b: on\n  c: 0755\n  \
                    d: 1_000\n  e: 'no'\n---\n---\nkind: Other\nbase: &b {x: 1}\nm:\n  <<: *b\n  z: 2\n";
        let (out, outcomes) = inject_manifests(yaml, &InjectConfig::default()).unwrap();
        assert!(outcomes.is_empty());
        assert_eq!(
            out,
            "kind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: \"yes\"\n  b: \"on\"\n  \
             c: \"0755\"\n  d: \"1_000\"\n  e: \"no\"\n---\nkind: Other\nbase:\n  x: 1\nm:\n  \
             z: 2\n  x: 1\n"
        );
    }

    #[test]
    fn a_syntax_error_names_its_document() {
        let err = inject_manifests("kind: A\n---\nkind: [\n", &InjectConfig::default())
            .expect_err("unclosed bracket");
        assert!(
            err.to_string().starts_with("document 2: not YAML: "),
            "{err}"
        );
    }
}
