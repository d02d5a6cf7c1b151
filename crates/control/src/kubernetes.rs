//! Kubernetes service-account tokens as proof of identity. The certificate service hands the
//! projected token a proxy presents to `ServiceAccountAuthenticator`, which asks the API server
//! (a `TokenReviewer`: TokenReview with audience `latch`, then a GET of the bound pod) and turns
//! the answer into `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//! `KubeTokenReviewer` is the kube-rs implementation; `ControlPlane::start` builds it when the
//! control plane runs with `--kubernetes`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use latch_identity::{SpiffeId, TrustDomain};
use thiserror::Error;

/// The audience a proxy's projected token must be issued for (the injector mounts it so).
pub const AUDIENCE: &str = "latch";
/// `status.user.extra` keys the API server sets for a token bound to a pod.
pub const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_KEY: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
/// Longest the control plane waits for one answer from the API server.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a watch may stay silent before the connection is taken for dead (the API server
/// ends a watch after at most 290 s when the client asks for no other timeout).
const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(330);

/// How the control plane reaches the Kubernetes API server.
#[derive(Debug, Clone)]
pub enum KubernetesAccess {
    /// The pod's own service account and the API server named by KUBERNETES_SERVICE_HOST.
    InCluster,
    /// An explicit client configuration (tests, or a control plane outside the cluster).
    Config(Box<kube::Config>),
}

impl KubernetesAccess {
    /// Builds the client for requests (5 s timeout). Fails when in-cluster configuration is
    /// missing (not in a pod).
    pub fn client(&self) -> Result<kube::Client, String> {
        self.build(Some(API_TIMEOUT))
    }

    /// Builds the client for watches: a watch may stay silent for minutes, so reads wait up to
    /// `WATCH_READ_TIMEOUT` (past the server's own 290 s watch timeout) before giving up.
    pub fn watch_client(&self) -> Result<kube::Client, String> {
        self.build(None)
    }

    fn build(&self, request_timeout: Option<Duration>) -> Result<kube::Client, String> {
        let mut config = match self {
            KubernetesAccess::InCluster => kube::Config::incluster().map_err(|e| {
                format!(
                    "--kubernetes: no in-cluster configuration ({e}); latch-control must run in a \
                     pod with a service-account token mounted, or without --kubernetes"
                )
            })?,
            KubernetesAccess::Config(config) => (**config).clone(),
        };
        match request_timeout {
            Some(timeout) if config.read_timeout.is_none() => {
                config.read_timeout = Some(timeout);
                config.reset_reader_on_write = true;
            }
            Some(_) => {}
            None => config.read_timeout = Some(WATCH_READ_TIMEOUT),
        }
        tracing::info!(api_server = %config.cluster_url, "Kubernetes API client configured");
        kube::Client::try_from(config)
            .map_err(|e| format!("--kubernetes: cannot build the Kubernetes API client: {e}"))
    }
}

/// Why the API server could not be asked: a connection failure, a timeout, or an error status
/// (403 when RBAC does not allow `create tokenreviews` or `get pods`).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ApiError(pub String);

impl From<kube::Error> for ApiError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(status) => ApiError(format!(
                "the API server answered {} {}: {}",
                status.code, status.reason, status.message
            )),
            other => ApiError(other.to_string()),
        }
    }
}

/// The two questions asked of the Kubernetes API server.
#[tonic::async_trait]
pub trait TokenReviewer: Send + Sync + 'static {
    /// Creates a TokenReview of `token` for `audiences` and returns its status.
    async fn review(&self, token: &str, audiences: &[&str]) -> Result<TokenReviewStatus, ApiError>;
    /// The uid of pod `namespace/name`, or `None` when there is no such pod.
    async fn pod_uid(&self, namespace: &str, name: &str) -> Result<Option<String>, ApiError>;
}

/// `TokenReviewer` over a kube-rs client.
pub struct KubeTokenReviewer {
    client: kube::Client,
}

impl KubeTokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

#[tonic::async_trait]
impl TokenReviewer for KubeTokenReviewer {
    async fn review(&self, token: &str, audiences: &[&str]) -> Result<TokenReviewStatus, ApiError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            },
            ..TokenReview::default()
        };
        let api = kube::Api::<TokenReview>::all(self.client.clone());
        let answer = api
            .create(&kube::api::PostParams::default(), &review)
            .await?;
        Ok(answer.status.unwrap_or_default())
    }

    async fn pod_uid(&self, namespace: &str, name: &str) -> Result<Option<String>, ApiError> {
        let api = kube::Api::<Pod>::namespaced(self.client.clone(), namespace);
        Ok(api
            .get_opt(name)
            .await?
            .map(|pod| pod.metadata.uid.unwrap_or_default()))
    }
}

/// Why a service-account token was refused. `reason()` is the metric label.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SaTokenError {
    #[error("the service-account token is empty")]
    Empty,
    #[error("the Kubernetes API server did not authenticate the service-account token: {0}")]
    Invalid(String),
    #[error(
        "the service-account token is not for audience \"{AUDIENCE}\" ({0}); mount a projected \
         service-account token with `audience: {AUDIENCE}` (injected pods have one)"
    )]
    Audience(String),
    #[error(
        "the token belongs to {0:?}, which is not a service account \
         (system:serviceaccount:<namespace>:<name>)"
    )]
    NotServiceAccount(String),
    #[error(
        "the service-account token is not bound to a pod (the API server reported no {POD_NAME_KEY} \
         and {POD_UID_KEY}); use a projected service-account token volume, not a Secret token"
    )]
    Unbound,
    #[error("the pod {namespace}/{name} the token is bound to no longer exists")]
    PodMissing { namespace: String, name: String },
    #[error(
        "the pod {namespace}/{name} the token is bound to was replaced (token bound to uid \
         {bound_uid}, the pod now has uid {current_uid})"
    )]
    PodReplaced {
        namespace: String,
        name: String,
        bound_uid: String,
        current_uid: String,
    },
    #[error("cannot check the service-account token with the Kubernetes API server: {0}")]
    Unavailable(String),
}

impl SaTokenError {
    /// The `latch_control_svid_refusals_total` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SaTokenError::Empty | SaTokenError::Invalid(_) => "sa_token_invalid",
            SaTokenError::Audience(_) => "sa_token_audience",
            SaTokenError::NotServiceAccount(_) => "sa_token_not_service_account",
            SaTokenError::Unbound => "sa_token_unbound",
            SaTokenError::PodMissing { .. } | SaTokenError::PodReplaced { .. } => {
                "sa_token_pod_missing"
            }
            SaTokenError::Unavailable(_) => "kubernetes_unavailable",
        }
    }
}

/// The pod an SVID was issued to, on a service-account token bound to it. Written into the
/// SVID's subject as one organizationalUnitName, `kubernetes-pod:<namespace>/<name>/<uid>`
/// (none of the three can hold a '/'), so that any replica can check at renewal that the pod
/// still exists: an SVID must not outlive its pod by renewing itself. Subject attributes are
/// free in an X.509-SVID (only the URI SAN names the workload) and peers ignore them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodBinding {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

const POD_BINDING_PREFIX: &str = "kubernetes-pod:";

impl PodBinding {
    /// The subject organizationalUnitName value.
    pub fn to_subject_value(&self) -> String {
        format!(
            "{POD_BINDING_PREFIX}{}/{}/{}",
            self.namespace, self.name, self.uid
        )
    }

    /// The binding in a leaf certificate's subject, if it has one.
    pub fn from_leaf(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let value = cert
            .subject()
            .iter_organizational_unit()
            .find_map(|ou| ou.as_str().ok()?.strip_prefix(POD_BINDING_PREFIX))?
            .to_string();
        let mut parts = value.splitn(3, '/');
        let (namespace, name, uid) = (parts.next()?, parts.next()?, parts.next()?);
        (!namespace.is_empty() && !name.is_empty() && !uid.is_empty()).then(|| Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: uid.to_string(),
        })
    }
}

/// Turns service-account tokens into SPIFFE IDs, asking a `TokenReviewer`.
pub struct ServiceAccountAuthenticator {
    reviewer: Arc<dyn TokenReviewer>,
    trust_domain: TrustDomain,
}

impl ServiceAccountAuthenticator {
    pub fn new(reviewer: Arc<dyn TokenReviewer>, trust_domain: TrustDomain) -> Self {
        Self {
            reviewer,
            trust_domain,
        }
    }

    /// The SPIFFE ID `token` proves and the pod it is bound to, once the API server
    /// authenticated it for audience `latch` as a service account and that pod still exists.
    pub async fn authenticate(&self, token: &str) -> Result<(SpiffeId, PodBinding), SaTokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(SaTokenError::Empty);
        }
        let status = self
            .reviewer
            .review(token, &[AUDIENCE])
            .await
            .map_err(|e| SaTokenError::Unavailable(e.0))?;
        let BoundPod {
            namespace,
            name,
            uid,
            id,
        } = check_review(&status, &self.trust_domain)?;
        let pod = PodBinding {
            namespace,
            name,
            uid,
        };
        self.check_pod(&pod).await?;
        Ok((id, pod))
    }

    /// Ok when pod `pod.namespace/pod.name` exists and is still the one with `pod.uid` (not
    /// deleted, not replaced by a pod of the same name).
    pub async fn check_pod(&self, pod: &PodBinding) -> Result<(), SaTokenError> {
        match self
            .reviewer
            .pod_uid(&pod.namespace, &pod.name)
            .await
            .map_err(|e| SaTokenError::Unavailable(e.0))?
        {
            None => Err(SaTokenError::PodMissing {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            }),
            Some(current) if current != pod.uid => Err(SaTokenError::PodReplaced {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                bound_uid: pod.uid.clone(),
                current_uid: current,
            }),
            Some(_) => Ok(()),
        }
    }
}

/// What a successful review says: the identity, and the pod whose existence is still to check.
#[derive(Debug, PartialEq, Eq)]
struct BoundPod {
    namespace: String,
    name: String,
    uid: String,
    id: SpiffeId,
}

/// Applies the rules to a TokenReview status; everything but the pod lookup.
fn check_review(
    status: &TokenReviewStatus,
    trust_domain: &TrustDomain,
) -> Result<BoundPod, SaTokenError> {
    if status.authenticated != Some(true) {
        let error = status
            .error
            .clone()
            .unwrap_or_else(|| "no reason given".to_string());
        // The API server's words for a token issued for other audiences.
        if error.contains("invalid for the target audiences") {
            return Err(SaTokenError::Audience(error));
        }
        return Err(SaTokenError::Invalid(error));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(SaTokenError::Audience(format!(
            "the API server authenticated it for audiences {audiences:?}"
        )));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = parse_service_account(&username)
        .ok_or_else(|| SaTokenError::NotServiceAccount(username.clone()))?;
    let id = SpiffeId::workload(trust_domain, namespace, service_account)
        .map_err(|_| SaTokenError::NotServiceAccount(username.clone()))?;
    let extra = user.extra.unwrap_or_default();
    let single = |key: &str| match extra.get(key).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Some(value.clone()),
        _ => None,
    };
    let (Some(name), Some(uid)) = (single(POD_NAME_KEY), single(POD_UID_KEY)) else {
        return Err(SaTokenError::Unbound);
    };
    Ok(BoundPod {
        namespace: namespace.to_string(),
        name,
        uid,
        id,
    })
}

/// `system:serviceaccount:<namespace>:<name>` -> (namespace, name), both valid Kubernetes
/// names (lowercase letters, digits, '-' and '.'), so they cannot reshape the SPIFFE ID path.
fn parse_service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
    let (namespace, name) = rest.split_once(':')?;
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !s.starts_with(['-', '.'])
    };
    (valid(namespace) && valid(name)).then_some((namespace, name))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn status(
        authenticated: bool,
        audiences: &[&str],
        username: &str,
        pod: Option<(&str, &str)>,
        error: Option<&str>,
    ) -> TokenReviewStatus {
        let extra = pod.map(|(name, uid)| {
            BTreeMap::from([
                (POD_NAME_KEY.to_string(), vec![name.to_string()]),
                (POD_UID_KEY.to_string(), vec![uid.to_string()]),
            ])
        });
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            error: error.map(str::to_string),
            user: Some(UserInfo {
                username: Some(username.to_string()),
                uid: Some("0d8f3c2a-1b7e-4f6a-9c1d-2e3f4a5b6c7d".into()),
                groups: Some(vec!["system:serviceaccounts".into()]),
                extra,
            }),
        }
    }

    #[test]
    fn review_rules() {
        let sa = "system:serviceaccount:shop:web";
        let pod = Some(("web-7d4b9c-x2x8k", "uid-1"));
        #[rustfmt::skip]
        let cases: Vec<(&str, TokenReviewStatus, Result<&str, &str>)> = vec![
            ("good", status(true, &["latch"], sa, pod, None), Ok("spiffe://cluster.local/ns/shop/sa/web")),
            ("good among audiences", status(true, &["other", "latch"], sa, pod, None), Ok("spiffe://cluster.local/ns/shop/sa/web")),
            ("other audience", status(true, &["other"], sa, pod, None), Err("sa_token_audience")),
            ("no audiences", status(true, &[], sa, pod, None), Err("sa_token_audience")),
            ("rejected for audience", status(false, &[], "", None, Some("[invalid bearer token, token audiences [\"other\"] is invalid for the target audiences [\"latch\"]]")), Err("sa_token_audience")),
            ("expired", status(false, &[], "", None, Some("[invalid bearer token, Token has expired.]")), Err("sa_token_invalid")),
            ("not authenticated, no error", status(false, &["latch"], sa, pod, None), Err("sa_token_invalid")),
            ("admin", status(true, &["latch"], "kubernetes-admin", pod, None), Err("sa_token_not_service_account")),
            ("node", status(true, &["latch"], "system:node:worker-1", pod, None), Err("sa_token_not_service_account")),
            ("path in namespace", status(true, &["latch"], "system:serviceaccount:a/sa/b:c", pod, None), Err("sa_token_not_service_account")),
            ("extra colon", status(true, &["latch"], "system:serviceaccount:shop:web:x", pod, None), Err("sa_token_not_service_account")),
            ("empty name", status(true, &["latch"], "system:serviceaccount:shop:", pod, None), Err("sa_token_not_service_account")),
            ("upper case", status(true, &["latch"], "system:serviceaccount:Shop:web", pod, None), Err("sa_token_not_service_account")),
            ("not bound", status(true, &["latch"], sa, None, None), Err("sa_token_unbound")),
        ];
        for (name, status, want) in cases {
            let got = check_review(&status, &td());
            match (got, want) {
                (Ok(bound), Ok(id)) => assert_eq!(bound.id.as_str(), id, "{name}"),
                (Err(e), Err(reason)) => assert_eq!(e.reason(), reason, "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn bound_pod_needs_exactly_one_name_and_uid() {
        let mut s = status(
            true,
            &["latch"],
            "system:serviceaccount:shop:web",
            None,
            None,
        );
        let user = s.user.as_mut().unwrap();
        user.extra = Some(BTreeMap::from([
            (POD_NAME_KEY.to_string(), vec!["a".into(), "b".into()]),
            (POD_UID_KEY.to_string(), vec!["u".into()]),
        ]));
        assert_eq!(check_review(&s, &td()).unwrap_err(), SaTokenError::Unbound);
        let user = s.user.as_mut().unwrap();
        user.extra = Some(BTreeMap::from([(
            POD_NAME_KEY.to_string(),
            vec!["a".into()],
        )]));
        assert_eq!(check_review(&s, &td()).unwrap_err(), SaTokenError::Unbound);
    }
}
