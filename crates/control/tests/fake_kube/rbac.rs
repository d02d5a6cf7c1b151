//! RBAC as the API server applies it, for the fake: the rules of deploy/kubernetes/20-rbac.yaml
//! granted to latch-control (its ClusterRole everywhere, its Roles in their namespaces), each
//! request mapped to its verb, API group, resource, namespace and name as the API server maps
//! it (GET of an item `get`, of a collection `list`, or `watch` with `watch=true`; POST
//! `create`; PUT `update`; PATCH `patch`; DELETE `delete`), and a request no rule allows
//! answered with the 403 Status the API server sends.

use serde_json::{Value, json};

use super::Call;

/// One rule of a Role or ClusterRole, and the namespace it applies in (None: cluster-wide).
#[derive(Debug, Clone)]
struct Rule {
    namespace: Option<String>,
    groups: Vec<String>,
    resources: Vec<String>,
    names: Vec<String>,
    verbs: Vec<String>,
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Attributes {
    pub verb: &'static str,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// latch-control's permissions.
#[derive(Debug, Clone)]
pub struct Rbac {
    rules: Vec<Rule>,
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

impl Rbac {
    /// The rules bound to latch-control in `manifest` (the YAML of 20-rbac.yaml).
    pub fn from_manifest(manifest: &str) -> Self {
        let mut reader = manifest.as_bytes();
        let documents: Vec<Value> = serde_saphyr::read::<_, Value>(&mut reader)
            .map(|doc| doc.expect("the RBAC manifest is YAML"))
            .filter(|doc| !doc.is_null())
            .collect();
        let bound = |kind: &str, name: &str| {
            documents.iter().any(|doc| {
                doc["kind"] == format!("{kind}Binding")
                    && doc["roleRef"]["kind"] == kind
                    && doc["roleRef"]["name"] == name
                    && doc["subjects"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|s| s["kind"] == "ServiceAccount" && s["name"] == "latch-control")
            })
        };
        let mut rules = Vec::new();
        for doc in &documents {
            let kind = doc["kind"].as_str().unwrap_or_default();
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            if !matches!(kind, "Role" | "ClusterRole") || !bound(kind, name) {
                continue;
            }
            let namespace = (kind == "Role")
                .then(|| doc["metadata"]["namespace"].as_str().map(String::from))
                .flatten();
            for rule in doc["rules"].as_array().into_iter().flatten() {
                rules.push(Rule {
                    namespace: namespace.clone(),
                    groups: strings(&rule["apiGroups"]),
                    resources: strings(&rule["resources"]),
                    names: strings(&rule["resourceNames"]),
                    verbs: strings(&rule["verbs"]),
                });
            }
        }
        assert!(!rules.is_empty(), "no rule is bound to latch-control");
        Self { rules }
    }

    /// The shipped manifest's rules.
    pub fn shipped() -> Self {
        Self::from_manifest(&shipped_manifest())
    }

    /// Whether a rule allows `request`.
    pub fn allows(&self, request: &Attributes) -> bool {
        self.rules.iter().any(|rule| {
            rule.namespace
                .as_ref()
                .is_none_or(|ns| request.namespace.as_ref() == Some(ns))
                && rule.groups.iter().any(|g| g == "*" || *g == request.group)
                && rule
                    .resources
                    .iter()
                    .any(|r| r == "*" || *r == request.resource)
                && rule.verbs.iter().any(|v| v == "*" || v == request.verb)
                && (rule.names.is_empty()
                    || request
                        .name
                        .as_ref()
                        .is_some_and(|n| rule.names.contains(n)))
        })
    }

    /// The 403 the API server answers when no rule allows `call`; `None` when one does.
    pub fn refusal(&self, call: &Call) -> Option<Value> {
        let request = attributes(call)?;
        if self.allows(&request) {
            return None;
        }
        let group = &request.group;
        let scope = match &request.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        let named = request
            .name
            .as_ref()
            .map(|n| format!("{} \"{n}\"", request.resource))
            .unwrap_or_else(|| request.resource.clone());
        Some(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!(
                "{named} is forbidden: User \"system:serviceaccount:latch-system:latch-control\" \
                 cannot {} resource \"{}\" in API group \"{group}\" {scope}",
                request.verb, request.resource
            ),
            "reason": "Forbidden",
            "details": {"name": request.name.clone().unwrap_or_default(), "kind": request.resource},
            "code": 403
        }))
    }
}

/// deploy/kubernetes/20-rbac.yaml.
pub fn shipped_manifest() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/kubernetes/20-rbac.yaml");
    std::fs::read_to_string(path).expect("20-rbac.yaml")
}

/// The request attributes of `call`, as the API server derives them from the path: `None` for
/// a non-resource URL (`/version`, `/api`, `/apis`: discovery, which every authenticated user may
/// read). A subresource is `resource/subresource` (`pods/log`), as RBAC rules name it; the
/// deprecated `/watch/` prefix is a watch; DELETE of a collection is `deletecollection`.
pub fn attributes(call: &Call) -> Option<Attributes> {
    let parts: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => return None,
    };
    let (legacy_watch, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (resource, name) = match rest {
        [resource] => (resource.to_string(), None),
        [resource, name] => (resource.to_string(), Some(name.to_string())),
        [resource, name, subresource] => {
            (format!("{resource}/{subresource}"), Some(name.to_string()))
        }
        _ => return None,
    };
    let watch = legacy_watch || matches!(call.param("watch"), Some("true" | "1"));
    let verb = match (call.method.as_str(), &name) {
        ("GET", _) if watch => "watch",
        ("GET", Some(_)) => "get",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        _ => return None,
    };
    Some(Attributes {
        verb,
        group,
        resource,
        namespace,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str, path_and_query: &str) -> Call {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        Call {
            method: method.parse().unwrap(),
            path: path.into(),
            query: query.into(),
            content_type: String::new(),
            body: Value::Null,
        }
    }

    #[test]
    fn requests_map_to_the_attributes_the_api_server_checks() {
        let cases = [
            (
                "GET",
                "/api/v1/pods?limit=500",
                "list",
                "",
                "pods",
                None,
                None,
            ),
            (
                "GET",
                "/api/v1/pods?watch=true",
                "watch",
                "",
                "pods",
                None,
                None,
            ),
            (
                "GET",
                "/api/v1/watch/namespaces/a/pods/p",
                "watch",
                "",
                "pods",
                Some("a"),
                Some("p"),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p",
                "get",
                "",
                "pods",
                Some("a"),
                Some("p"),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/log",
                "get",
                "",
                "pods/log",
                Some("a"),
                Some("p"),
            ),
            (
                "PUT",
                "/api/v1/namespaces/a/pods/p/status",
                "update",
                "",
                "pods/status",
                Some("a"),
                Some("p"),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/a/secrets",
                "deletecollection",
                "",
                "secrets",
                Some("a"),
                None,
            ),
            (
                "POST",
                "/apis/authentication.k8s.io/v1/tokenreviews",
                "create",
                "authentication.k8s.io",
                "tokenreviews",
                None,
                None,
            ),
            (
                "GET",
                "/api/v1/namespaces/a",
                "get",
                "",
                "namespaces",
                None,
                Some("a"),
            ),
        ];
        for (method, path, verb, group, resource, namespace, name) in cases {
            assert_eq!(
                attributes(&call(method, path)),
                Some(Attributes {
                    verb,
                    group: group.into(),
                    resource: resource.into(),
                    namespace: namespace.map(String::from),
                    name: name.map(String::from),
                }),
                "{method} {path}"
            );
        }
        assert_eq!(attributes(&call("GET", "/version")), None);
    }

    #[test]
    fn the_shipped_manifest_grants_only_what_it_names() {
        let rbac = Rbac::shipped();
        let allowed = |m: &str, p: &str| rbac.refusal(&call(m, p)).is_none();
        assert!(allowed(
            "PATCH",
            "/api/v1/namespaces/shop/configmaps/latch-ca-bundle"
        ));
        assert!(!allowed(
            "PATCH",
            "/api/v1/namespaces/shop/configmaps/other"
        ));
        assert!(!allowed("GET", "/api/v1/namespaces/shop/configmaps"));
        assert!(allowed(
            "GET",
            "/api/v1/namespaces/latch-system/secrets/latch-ca"
        ));
        assert!(!allowed(
            "GET",
            "/api/v1/namespaces/default/secrets/latch-ca"
        ));
        assert!(!allowed(
            "DELETE",
            "/api/v1/namespaces/latch-system/secrets"
        ));
        assert!(!allowed("GET", "/api/v1/namespaces/a/pods/p/log"));
        assert!(!allowed("PATCH", "/api/v1/namespaces/a/pods/p"));
    }
}
