//! JWT-SVIDs for the Workload API. `JwtSvids` asks the control plane for a token per set of
//! audiences (authenticated by the proxy's X509-SVID), caches it, and asks again once half its
//! lifetime has passed, so a client always gets a token with at least half its lifetime left.
//! `validate` checks a token against the JWT bundle discovery delivered into the `CertStore`.
//! Called by the Workload API's FetchJWTSVID and ValidateJWTSVID.

use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use latch_identity::client::{CaClient, ClientError, IssuedJwtSvid};
use latch_identity::jwt::JwtSvidClaims;
use latch_identity::{CertStore, ExpectedPeer, SpiffeId};
use tonic::Status;

/// Audiences one request may name, and the length of each (bytes); the control plane's limits.
pub const MAX_AUDIENCES: usize = 16;
pub const MAX_AUDIENCE_BYTES: usize = 256;
/// Audience sets cached at once; past it, expired entries are dropped, and a new set is served
/// uncached while the cache is still full.
const MAX_CACHED: usize = 1024;

#[derive(Clone)]
struct Cached {
    spiffe_id: SpiffeId,
    token: String,
    issued_at: SystemTime,
    refresh_at: SystemTime,
}

/// The proxy's JWT-SVIDs, by audience set.
pub struct JwtSvids {
    store: Arc<CertStore>,
    control_plane: String,
    control_plane_id: ExpectedPeer,
    /// One connection to the control plane, opened at the first request and replaced after an
    /// error (a new connection presents the SVID current at that moment).
    client: tokio::sync::Mutex<Option<CaClient>>,
    /// Sorted, deduplicated audiences -> token.
    cache: DashMap<Vec<String>, Cached>,
}

/// The audience set as a cache key, after the checks the control plane would make.
fn audience_key(audience: &[String]) -> Result<Vec<String>, Status> {
    if audience.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(Status::invalid_argument(format!(
            "{} audiences asked for; at most {MAX_AUDIENCES}",
            audience.len()
        )));
    }
    if let Some(a) = audience
        .iter()
        .find(|a| a.is_empty() || a.len() > MAX_AUDIENCE_BYTES || a.chars().any(char::is_control))
    {
        return Err(Status::invalid_argument(format!(
            "each audience must be 1 to {MAX_AUDIENCE_BYTES} bytes without control characters \
             (one is {} bytes)",
            a.len()
        )));
    }
    let mut key = audience.to_vec();
    key.sort();
    key.dedup();
    Ok(key)
}

impl JwtSvids {
    pub fn new(
        store: Arc<CertStore>,
        control_plane: String,
        control_plane_id: ExpectedPeer,
    ) -> Self {
        Self {
            store,
            control_plane,
            control_plane_id,
            client: tokio::sync::Mutex::new(None),
            cache: DashMap::new(),
        }
    }

    /// A JWT-SVID of this proxy's SPIFFE ID for `audience`: from the cache while it has more
    /// than half its lifetime left, else from the control plane.
    pub async fn fetch(&self, audience: &[String]) -> Result<(SpiffeId, String), Status> {
        let key = audience_key(audience)?;
        let now = SystemTime::now();
        let Some(svid) = self.store.valid_svid(now) else {
            return Err(Status::unavailable(
                "this proxy holds no valid X509-SVID yet, so it cannot ask for a JWT-SVID; retry",
            ));
        };
        // Not a token of an ID revoked since it was issued: the control plane refuses a new
        // one, and the app learns it now rather than when the cached token runs out.
        if let Some(cached) = self.cache.get(&key)
            && cached.spiffe_id == *svid.id()
            && now < cached.refresh_at
            && self
                .store
                .revocations()
                .covers_issued(&cached.spiffe_id, cached.issued_at)
                .is_none()
        {
            return Ok((cached.spiffe_id.clone(), cached.token.clone()));
        }
        let issued = self.issue(key.clone()).await?;
        let lifetime = issued.expires_at.duration_since(now).unwrap_or_default();
        let cached = Cached {
            spiffe_id: issued.spiffe_id.clone(),
            token: issued.token.clone(),
            issued_at: issued.issued_at,
            refresh_at: now + lifetime / 2,
        };
        if self.cache.len() >= MAX_CACHED && !self.cache.contains_key(&key) {
            // Full: drop what would be fetched again anyway, then the entry due first, so that
            // a burst of one-off audiences cannot keep the audiences in steady use out.
            self.cache.retain(|_, c| c.refresh_at > now);
            if self.cache.len() >= MAX_CACHED {
                let due_first = self
                    .cache
                    .iter()
                    .min_by_key(|entry| entry.refresh_at)
                    .map(|entry| entry.key().clone());
                if let Some(due_first) = due_first {
                    self.cache.remove(&due_first);
                }
            }
        }
        self.cache.insert(key, cached);
        Ok((issued.spiffe_id, issued.token))
    }

    /// Asks the control plane, on the held connection, then once more on a new one when the
    /// first attempt failed for any reason but a refusal.
    async fn issue(&self, audience: Vec<String>) -> Result<IssuedJwtSvid, Status> {
        let mut last = None;
        for _ in 0..2 {
            let mut client = match self.client().await {
                Ok(client) => client,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match client.fetch_jwt_svid(audience.clone()).await {
                Ok(issued) => return Ok(issued),
                Err(
                    e @ ClientError::Refused {
                        code: tonic::Code::PermissionDenied | tonic::Code::InvalidArgument,
                        ..
                    },
                ) => return Err(self.status(e)),
                Err(e) => {
                    *self.client.lock().await = None;
                    last = Some(e);
                }
            }
        }
        Err(self.status(last.unwrap_or(ClientError::Refused {
            code: tonic::Code::Unavailable,
            message: "no attempt made".into(),
        })))
    }

    async fn client(&self) -> Result<CaClient, ClientError> {
        let mut held = self.client.lock().await;
        if let Some(client) = held.as_ref() {
            return Ok(client.clone());
        }
        let client = CaClient::connect(
            &self.control_plane,
            self.store.clone(),
            self.control_plane_id.clone(),
            true,
        )
        .await?;
        *held = Some(client.clone());
        Ok(client)
    }

    /// The Workload API status for a failure to get a token: the control plane's refusals of
    /// the ID (revoked, reserved) stay PERMISSION_DENIED; anything else may pass: UNAVAILABLE.
    fn status(&self, e: ClientError) -> Status {
        match e {
            ClientError::Refused {
                code: tonic::Code::PermissionDenied,
                message,
            } => Status::permission_denied(format!(
                "the control plane refused a JWT-SVID: {message}"
            )),
            ClientError::Refused {
                code: tonic::Code::InvalidArgument,
                message,
            } => Status::invalid_argument(message),
            other => Status::unavailable(format!(
                "cannot get a JWT-SVID from the control plane at {}: {other}",
                self.control_plane
            )),
        }
    }
}

/// ValidateJWTSVID: `token` must be signed by a key of the trust domain's JWT bundle, unexpired,
/// for `audience`, with a `sub` of this proxy's trust domain. Every refusal of the token is
/// INVALID_ARGUMENT (as SPIRE answers); no bundle or SVID yet is UNAVAILABLE.
pub fn validate(
    store: &CertStore,
    token: &str,
    audience: &str,
    now: SystemTime,
) -> Result<JwtSvidClaims, Status> {
    if audience.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if token.is_empty() {
        return Err(Status::invalid_argument("svid must be specified"));
    }
    let (Some(svid), Some(bundle)) = (store.svid(), store.jwt_bundle()) else {
        return Err(Status::unavailable(
            "this proxy has no JWT bundle from the control plane yet; retry",
        ));
    };
    let claims =
        latch_identity::jwt::validate(token, &svid.id().trust_domain(), &bundle, audience, now)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    // A JWT-SVID cannot be recalled, but its subject can be revoked: the revocations this
    // proxy holds (from discovery) refuse the tokens issued before.
    if let Some(revoked_at) = store
        .revocations()
        .covers_issued(&claims.subject, claims.issued_at())
    {
        return Err(Status::invalid_argument(format!(
            "{} was revoked at {}; its JWT-SVIDs issued before then are refused",
            claims.subject,
            latch_identity::svid::format_time(revoked_at)
        )));
    }
    Ok(claims)
}

/// A JSON value as a protobuf `Value` (the claims of ValidateJWTSVID's response).
pub fn proto_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(proto_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(proto_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn proto_struct(map: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), proto_value(v)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_are_checked_and_keyed_as_a_set() {
        let key = audience_key(&["b".into(), "a".into(), "b".into()]).unwrap();
        assert_eq!(key, vec!["a".to_string(), "b".to_string()]);
        for audience in [
            vec![],
            vec![String::new()],
            vec!["x".repeat(MAX_AUDIENCE_BYTES + 1)],
            vec!["a\u{7}".into()],
            vec!["a".to_string(); MAX_AUDIENCES + 1],
        ] {
            let status = audience_key(&audience).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{audience:?}");
        }
    }

    #[test]
    fn claims_become_a_protobuf_struct() {
        let claims = serde_json::json!({"sub": "spiffe://td/x", "aud": ["a"], "exp": 5});
        let s = proto_struct(claims.as_object().unwrap());
        assert_eq!(
            s.fields["sub"].kind,
            Some(prost_types::value::Kind::StringValue(
                "spiffe://td/x".into()
            ))
        );
        assert_eq!(
            s.fields["exp"].kind,
            Some(prost_types::value::Kind::NumberValue(5.0))
        );
    }
}
