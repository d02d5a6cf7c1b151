//! AdmissionReview v1 (admission.k8s.io/v1) for the mutating webhook: request body in, review
//! response out. Pods being created are injected (base64 JSON Patch); anything else is allowed
//! unchanged; a pod the injector refuses is denied with the reason. latch-control's webhook
//! server calls `review`; transport concerns (TLS, body size, HTTP status) stay there.

use base64::Engine;
use serde_json::{Value, json};
use thiserror::Error;

use crate::{InjectConfig, SkipReason, inject};

/// The only AdmissionReview version served (the API server sends the first version the
/// webhook configuration lists in admissionReviewVersions).
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// A request that is not an AdmissionReview we can answer (HTTP 400).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("request body is not JSON: {0}")]
    NotJson(String),
    #[error(
        "expected apiVersion {API_VERSION:?} and kind \"AdmissionReview\", got {api_version:?} \
         and {kind:?}; list only v1 in the webhook's admissionReviewVersions"
    )]
    WrongType { api_version: String, kind: String },
    #[error("AdmissionReview has no request.uid")]
    NoUid,
    #[error("AdmissionReview request for a Pod CREATE has no request.object")]
    NoObject,
}

/// What the webhook did, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    Skipped(SkipReason),
    /// Not a Pod CREATE: allowed without a patch.
    Ignored,
    /// Denied, with the message shown to whoever created the pod.
    Refused(String),
}

/// An answered review: the AdmissionReview JSON to send back, and what happened.
#[derive(Debug, Clone)]
pub struct Reviewed {
    pub response: Value,
    pub verdict: Verdict,
    /// `namespace/name` (or generateName) of the pod, for logs.
    pub pod: String,
}

/// Answers one AdmissionReview request body.
pub fn review(body: &[u8], config: &InjectConfig) -> Result<Reviewed, ReviewError> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| ReviewError::NotJson(e.to_string()))?;
    let api_version = review.get("apiVersion").and_then(Value::as_str);
    let kind = review.get("kind").and_then(Value::as_str);
    if api_version != Some(API_VERSION) || kind != Some("AdmissionReview") {
        return Err(ReviewError::WrongType {
            api_version: api_version.unwrap_or_default().into(),
            kind: kind.unwrap_or_default().into(),
        });
    }
    let request = review.get("request").unwrap_or(&Value::Null);
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|uid| !uid.is_empty())
        .ok_or(ReviewError::NoUid)?;
    let str_at = |pointer: &str| request.pointer(pointer).and_then(Value::as_str);
    let is_pod_create = str_at("/kind/group") == Some("")
        && str_at("/kind/kind") == Some("Pod")
        && str_at("/operation") == Some("CREATE");
    let name = str_at("/object/metadata/name")
        .filter(|n| !n.is_empty())
        .or(str_at("/object/metadata/generateName"))
        .or(str_at("/name"))
        .unwrap_or_default();
    let pod = format!("{}/{name}", str_at("/namespace").unwrap_or_default());

    let answer = |allowed: bool, extra: Value, verdict| {
        let mut response = json!({"uid": uid, "allowed": allowed});
        if let (Some(response), Value::Object(extra)) = (response.as_object_mut(), extra) {
            response.extend(extra);
        }
        Reviewed {
            response: json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}),
            verdict,
            pod: pod.clone(),
        }
    };
    if !is_pod_create {
        return Ok(answer(true, Value::Null, Verdict::Ignored));
    }
    let object = request.get("object").ok_or(ReviewError::NoObject)?;
    Ok(match inject(object, config) {
        Ok(injection) => match injection.skipped {
            Some(reason) => answer(true, Value::Null, Verdict::Skipped(reason)),
            None => {
                // Serializing a Vec of plain structs cannot fail.
                let patch = serde_json::to_vec(&injection.patch).unwrap_or_default();
                let mut extra = json!({
                    "patchType": "JSONPatch",
                    "patch": base64::engine::general_purpose::STANDARD.encode(patch),
                });
                if !injection.warnings.is_empty() {
                    extra["warnings"] = json!(injection.warnings);
                }
                answer(true, extra, Verdict::Injected)
            }
        },
        Err(e) => {
            let message = format!("latch sidecar injection refused pod {pod}: {e}");
            answer(
                false,
                json!({"status": {
                    "status": "Failure", "code": 400, "reason": "BadRequest", "message": message,
                }}),
                Verdict::Refused(message.clone()),
            )
        }
    })
}
