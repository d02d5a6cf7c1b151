//! Request bodies checked as the API server checks them, for the fake: the kind and apiVersion,
//! the name and namespace against the URL, required fields, the patch content types, the field
//! manager of a server-side apply, and unknown fields (field validation). Called by
//! `fake_kube::serve` for every write, before the test's handler sees the body.
//!
//! How the schema is known: each kind Latch writes is deserialized into its k8s-openapi type and
//! serialized again; a field of the request that the typed value no longer holds is a field the
//! schema does not declare (k8s-openapi's types are generated from the API server's OpenAPI
//! document, and like the API server's decoder they drop what they do not know). A value of the
//! wrong type fails the typed decoding, as it fails the API server's. The types are those of
//! Kubernetes 1.33 (the oldest k8s-openapi 0.29 has, and the one the workspace compiles); for the
//! four kinds below their fields are the same as in 1.29, the oldest version the manifests
//! target (compared field by field in the 1.29 and 1.33 schemas kubernetes-validate ships).
//! Kinds not listed here are not checked (the fake says so in no way: add them when Latch writes
//! them).

use hyper::Method;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use serde_json::{Value, json};

use super::Call;
use super::rbac::attributes;

/// A refused request: the HTTP status and the v1 Status body.
pub type Refusal = (u16, Value);

/// The kinds whose bodies are checked: (API group, resource, kind, apiVersion, namespaced).
const KINDS: &[(&str, &str, &str, &str, bool)] = &[
    ("", "secrets", "Secret", "v1", true),
    ("", "configmaps", "ConfigMap", "v1", true),
    (
        "authentication.k8s.io",
        "tokenreviews",
        "TokenReview",
        "authentication.k8s.io/v1",
        false,
    ),
    (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        "admissionregistration.k8s.io/v1",
        false,
    ),
];

fn failure(code: u16, reason: &str, kind: &str, name: &str, message: String) -> Refusal {
    let mut status = super::status(code, reason, kind, name, message);
    if kind.is_empty() && name.is_empty() {
        status["details"] = json!({});
    }
    (code, status)
}

fn bad_request(message: String) -> Refusal {
    failure(400, "BadRequest", "", "", message)
}

/// `kind "name" is invalid: field: detail`, the 422 of a failed validation.
fn invalid(kind: &str, name: &str, field: &str, detail: &str) -> Refusal {
    let mut refusal = failure(
        422,
        "Invalid",
        kind,
        name,
        format!("{kind} \"{name}\" is invalid: {field}: {detail}"),
    );
    refusal.1["details"]["causes"] = json!([{
        "reason": "FieldValueRequired", "message": detail, "field": field
    }]);
    refusal
}

/// Decodes `body` as `kind`'s type and serializes it again: the typed view of the body.
fn typed(kind: &str, body: &Value) -> Result<Value, String> {
    fn again<T: serde::de::DeserializeOwned + serde::Serialize>(
        body: &Value,
    ) -> Result<Value, String> {
        let object: T = serde_json::from_value(body.clone()).map_err(|e| e.to_string())?;
        serde_json::to_value(object).map_err(|e| e.to_string())
    }
    match kind {
        "Secret" => again::<Secret>(body),
        "ConfigMap" => again::<ConfigMap>(body),
        "TokenReview" => again::<TokenReview>(body),
        "MutatingWebhookConfiguration" => again::<MutatingWebhookConfiguration>(body),
        _ => Ok(body.clone()),
    }
}

/// The paths of the fields of `original` that `typed` does not hold (null values count as
/// absent), in the API server's notation (`spec.containers[0].foo`); they are removed from
/// `original`.
fn unknown_fields(original: &mut Value, typed: &Value, path: &str, found: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(fields), Value::Object(known)) => {
            fields.retain(|key, value| {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match known.get(key) {
                    _ if value.is_null() => true,
                    Some(known) => {
                        unknown_fields(value, known, &here, found);
                        true
                    }
                    None => {
                        found.push(here);
                        false
                    }
                }
            });
        }
        (Value::Array(items), Value::Array(known)) => {
            for (i, (item, known)) in items.iter_mut().zip(known).enumerate() {
                unknown_fields(item, known, &format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}

/// Checks `call`'s body when it writes a kind listed above. `Ok` holds the warnings to send
/// (`Warning` headers: unknown fields dropped under `fieldValidation=Warn`); the body is then
/// what the API server would go on with (unknown fields removed). `Err` is the refusal.
pub fn check(call: &mut Call) -> Result<Vec<String>, Refusal> {
    if !matches!(call.method, Method::POST | Method::PUT | Method::PATCH) {
        return Ok(Vec::new());
    }
    let Some(request) = attributes(call) else {
        return Ok(Vec::new());
    };
    let Some(&(_, _, kind, api_version, namespaced)) = KINDS
        .iter()
        .find(|(g, r, ..)| *g == request.group && *r == request.resource)
    else {
        return Ok(Vec::new());
    };
    let url_name = request.name.clone().unwrap_or_default();
    let validation = call
        .param("fieldValidation")
        .unwrap_or_default()
        .to_string();
    if !matches!(validation.as_str(), "" | "Strict" | "Warn" | "Ignore") {
        return Err(bad_request(format!(
            "fieldValidation must be one of Ignore, Warn or Strict, not {validation:?}"
        )));
    }

    // The patch types the API server accepts, and what it requires of each.
    let mut full_object = call.method != Method::PATCH;
    if call.method == Method::PATCH {
        let content_type = call.content_type.split(';').next().unwrap_or_default();
        match content_type {
            "application/apply-patch+yaml" => {
                full_object = true;
                if call.param("fieldManager").is_none_or(str::is_empty) {
                    return Err(invalid(
                        "PatchOptions.meta.k8s.io",
                        "",
                        "fieldManager",
                        "Required value: is required for apply patch",
                    ));
                }
            }
            "application/strategic-merge-patch+json" | "application/merge-patch+json" => {}
            "application/json-patch+json" => {
                // A list of operations, applied to the stored object by the handler.
                let operations = call.body.as_array().cloned().unwrap_or_default();
                if !call.body.is_array()
                    || operations
                        .iter()
                        .any(|op| !op["op"].is_string() || !op["path"].is_string())
                {
                    return Err(bad_request(
                        "the server rejected our request due to an error in our request".into(),
                    ));
                }
                return Ok(Vec::new());
            }
            other => {
                let (code, mut body) = failure(
                    415,
                    "UnsupportedMediaType",
                    "",
                    "",
                    format!(
                        "the body of the request was in an unknown format ({other}) - accepted \
                         media types include: application/json-patch+json, \
                         application/merge-patch+json, application/apply-patch+yaml, \
                         application/strategic-merge-patch+json"
                    ),
                );
                body["details"] = json!({});
                return Err((code, body));
            }
        }
        if call.param("force").is_some() && content_type != "application/apply-patch+yaml" {
            return Err(invalid(
                "PatchOptions.meta.k8s.io",
                "",
                "force",
                "Forbidden: may not be specified for non-apply patch",
            ));
        }
    }
    if !call.body.is_object() {
        return Err(bad_request(format!(
            "the body of the request is not a JSON object ({kind} in version \"{}\" expected)",
            api_version.rsplit('/').next().unwrap_or(api_version)
        )));
    }

    // A whole object names its kind and version, which must be this resource's.
    let body = &call.body;
    if full_object {
        if body["kind"].as_str().is_none_or(str::is_empty) {
            return Err(bad_request(format!("Object 'Kind' is missing in '{body}'")));
        }
        if body["apiVersion"] != api_version {
            return Err(bad_request(format!(
                "the API version in the data ({}) does not match the expected API version \
                 ({api_version})",
                body["apiVersion"].as_str().unwrap_or_default()
            )));
        }
        if body["kind"] != kind {
            return Err(bad_request(format!(
                "the kind in the data ({}) does not match the expected kind ({kind})",
                body["kind"].as_str().unwrap_or_default()
            )));
        }
    }
    let body_name = body["metadata"]["name"].as_str().unwrap_or_default();
    if request.name.is_some() && !body_name.is_empty() && body_name != url_name {
        return Err(bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL \
             ({url_name})"
        )));
    }
    if let (Some(namespace), Some(in_body)) =
        (&request.namespace, body["metadata"]["namespace"].as_str())
        && namespace != in_body
    {
        return Err(bad_request(
            "the namespace of the provided object does not match the namespace sent on the \
             request"
                .into(),
        ));
    }
    if call.method == Method::POST
        && namespaced
        && body_name.is_empty()
        && body["metadata"]["generateName"]
            .as_str()
            .is_none_or(str::is_empty)
    {
        return Err(invalid(
            kind,
            "",
            "metadata.name",
            "Required value: name or generateName is required",
        ));
    }
    if kind == "TokenReview" && body["spec"]["token"].as_str().is_none_or(str::is_empty) {
        return Err(bad_request(
            "token is required for TokenReview in authentication".into(),
        ));
    }

    // Types and unknown fields, against the schema.
    let typed = typed(kind, body).map_err(|e| {
        bad_request(format!(
            "{kind} in version \"{}\" cannot be handled as a {kind}: {e}",
            api_version.rsplit('/').next().unwrap_or(api_version)
        ))
    })?;
    let mut unknown = Vec::new();
    unknown_fields(&mut call.body, &typed, "", &mut unknown);
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    let described: Vec<String> = unknown
        .iter()
        .map(|field| format!("unknown field \"{field}\""))
        .collect();
    // Strict refuses; an apply also refuses without a directive (Latch always asks for Strict
    // on its patches, so this default never decides a test); Warn (the default of the other
    // writes since Kubernetes 1.27) drops the fields with a warning; Ignore drops them.
    let apply = call
        .content_type
        .starts_with("application/apply-patch+yaml");
    match validation.as_str() {
        "Strict" => Err(bad_request(format!(
            "strict decoding error: {}",
            described.join(", ")
        ))),
        "" if apply => Err(bad_request(format!(
            "strict decoding error: {}",
            described.join(", ")
        ))),
        "Ignore" => Ok(Vec::new()),
        _ => Ok(described),
    }
}
