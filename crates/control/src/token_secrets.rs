//! Join-token state in the Kubernetes API, with `--kubernetes`: one Secret per token in the
//! control plane's own namespace, so that every replica, and the pod that replaces one, sees the
//! same tokens and the same uses. A data dir on an `emptyDir` would give each replica (and each
//! restart) its own record, and a single-use token one use per replica.
//!
//! Spending a single-use token is a compare-and-swap on the Secret's `resourceVersion`: read,
//! check it is unused, write it back used with the version read. The API server applies a write
//! only when the version is still current, so of two replicas spending the same token at once
//! one succeeds and the other gets 409 Conflict, reads again, and finds it used. A configured
//! token (from the config file, which every replica reads) has no Secret until its first use,
//! which creates one: creation is the same check, the API server keeping one object per name.
//!
//! Only the token's SHA-256 is stored (in the Secret's name and record), never the token.

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};

use crate::kubernetes::ApiError;
use crate::tokens::{TokenError, TokenRecord, unix};

/// Label on every token Secret: `kubectl get secrets -l latch.dev/join-token -n latch-system`.
pub const LABEL: &str = "latch.dev/join-token";
/// The Secret type, so that tools showing Secrets say what these are.
pub const SECRET_TYPE: &str = "latch.dev/join-token";
/// The key holding the record (JSON).
const RECORD_KEY: &str = "record.json";
/// Conflicting writes tolerated while spending one token; each conflict means another replica
/// wrote the same token in between, so this is reached only under a storm of concurrent uses.
const SPEND_ATTEMPTS: usize = 8;

/// The token Secrets of one namespace.
pub struct TokenSecrets {
    api: kube::Api<Secret>,
    namespace: String,
}

/// A token's record as read, with the version a write must name.
pub struct Stored {
    pub record: TokenRecord,
    resource_version: Option<String>,
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == code)
}

impl TokenSecrets {
    /// The Secrets in the client's default namespace: in a pod, its own namespace.
    pub fn new(client: kube::Client) -> Self {
        let namespace = client.default_namespace().to_string();
        Self {
            api: kube::Api::namespaced(client, &namespace),
            namespace,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Secret name of the token with hash `hash` (64 hex characters: a valid name).
    pub fn name(hash: &str) -> String {
        format!("latch-join-token-{hash}")
    }

    fn error(&self, action: &'static str, e: kube::Error) -> TokenError {
        TokenError::Shared {
            namespace: self.namespace.clone(),
            action,
            reason: ApiError::from(e).0,
        }
    }

    fn secret(&self, hash: &str, record: &TokenRecord, resource_version: Option<String>) -> Secret {
        let json = serde_json::to_vec(record).expect("a token record serializes");
        Secret {
            metadata: ObjectMeta {
                name: Some(Self::name(hash)),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (LABEL.to_string(), "true".to_string()),
                    ("app.kubernetes.io/part-of".to_string(), "latch".to_string()),
                ])),
                resource_version,
                ..ObjectMeta::default()
            },
            type_: Some(SECRET_TYPE.to_string()),
            data: Some(BTreeMap::from([(RECORD_KEY.to_string(), ByteString(json))])),
            ..Secret::default()
        }
    }

    fn decode(&self, secret: Secret) -> Result<Stored, TokenError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let record = secret
            .data
            .as_ref()
            .and_then(|data| data.get(RECORD_KEY))
            .ok_or_else(|| format!("no {RECORD_KEY} key"))
            .and_then(|bytes| serde_json::from_slice(&bytes.0).map_err(|e| e.to_string()))
            .map_err(|reason| TokenError::SharedCorrupt {
                secret: format!("{}/{name}", self.namespace),
                reason,
            })?;
        Ok(Stored {
            record,
            resource_version: secret.metadata.resource_version,
        })
    }

    /// Records a new token; fails (and the token does not exist) when the API refuses.
    pub async fn create(&self, hash: &str, record: &TokenRecord) -> Result<(), TokenError> {
        self.api
            .create(&PostParams::default(), &self.secret(hash, record, None))
            .await
            .map(drop)
            .map_err(|e| self.error("create", e))
    }

    /// The record of the token with hash `hash`, if there is one.
    pub async fn get(&self, hash: &str) -> Result<Option<Stored>, TokenError> {
        match self.api.get_opt(&Self::name(hash)).await {
            Ok(Some(secret)) => self.decode(secret).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(self.error("read", e)),
        }
    }

    /// Records the first use of the token with hash `hash` at `now`, atomically across
    /// replicas: `AlreadyUsed` when it is single-use and some replica used it first.
    /// `configured` is the record of a token listed in the config file, which has no Secret
    /// until its first use; `None` for a created token, whose missing Secret means `Unknown`.
    pub async fn spend(
        &self,
        hash: &str,
        configured: Option<&TokenRecord>,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        let name = Self::name(hash);
        for _ in 0..SPEND_ATTEMPTS {
            let written = match self.get(hash).await? {
                None => {
                    let Some(record) = configured else {
                        return Err(TokenError::Unknown);
                    };
                    let used = TokenRecord {
                        used_at: Some(unix(now)),
                        ..record.clone()
                    };
                    self.api
                        .create(&PostParams::default(), &self.secret(hash, &used, None))
                        .await
                }
                Some(Stored {
                    record,
                    resource_version,
                }) => {
                    if let Some(at) = record.used_at {
                        return if record.reusable {
                            Ok(())
                        } else {
                            Err(TokenError::already_used(&record.spiffe_id, at))
                        };
                    }
                    let used = TokenRecord {
                        used_at: Some(unix(now)),
                        ..record
                    };
                    self.api
                        .replace(
                            &name,
                            &PostParams::default(),
                            &self.secret(hash, &used, resource_version),
                        )
                        .await
                }
            };
            match written {
                Ok(_) => return Ok(()),
                // Another replica created or changed it since the read: read again.
                Err(e) if is_status(&e, 409) => continue,
                Err(e) if is_status(&e, 404) => return Err(TokenError::Unknown),
                Err(e) => return Err(self.error("record the use of", e)),
            }
        }
        Err(TokenError::Shared {
            namespace: self.namespace.clone(),
            action: "record the use of",
            reason: format!("{SPEND_ATTEMPTS} conflicting writes in a row; retry"),
        })
    }

    /// Deletes the Secret of a token (gone already is fine).
    pub async fn delete(&self, hash: &str) -> Result<(), TokenError> {
        match self
            .api
            .delete(&Self::name(hash), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(self.error("delete", e)),
        }
    }

    /// Deletes the Secrets of tokens that expired before `now`: nothing can use them any more.
    /// Returns how many.
    pub async fn sweep_expired(&self, now: SystemTime) -> Result<usize, TokenError> {
        let list = self
            .api
            .list(&ListParams::default().labels(&format!("{LABEL}=true")))
            .await
            .map_err(|e| self.error("list", e))?;
        let mut deleted = 0;
        for secret in list.items {
            let Some(name) = secret.metadata.name.clone() else {
                continue;
            };
            let Some(hash) = name.strip_prefix("latch-join-token-") else {
                continue;
            };
            let expired = match self.decode(secret) {
                Ok(stored) => stored.record.expires_at.is_some_and(|at| at <= unix(now)),
                Err(_) => false,
            };
            if expired {
                self.delete(hash).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}
