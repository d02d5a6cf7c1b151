//! The CA kept in a Kubernetes Secret shared by every control-plane replica
//! (`--ca-secret <namespace>/<name>`, keys `ca.crt` and `ca.key`). At start-up a replica reads
//! the Secret; when there is none it generates a root and creates the Secret, and when another
//! replica created it first (409 AlreadyExists) it reads and uses the winner's. Called once by
//! `ControlPlane::start`, before anything is signed.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use latch_identity::{TrustDomain, files};
use thiserror::Error;

use crate::ca::{Ca, CaError, PluginFiles, TtlPolicy};

/// Secret keys, the same the manual install uses (`kubectl create secret generic latch-ca
/// --from-file=ca.crt=... --from-file=ca.key=...`).
pub const CERT_KEY: &str = "ca.crt";
pub const KEY_KEY: &str = "ca.key";

/// Where the CA lives: `<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for SecretRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!(
                "{s:?} is not <namespace>/<name>, e.g. latch-system/latch-ca"
            )),
        }
    }
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Error)]
pub enum CaSecretError {
    #[error("CA Secret {secret}: cannot {action} it through the Kubernetes API: {reason}")]
    Api {
        secret: String,
        action: &'static str,
        reason: String,
    },
    #[error(
        "CA Secret {secret} has no {key:?} key; refusing to generate a new root over it, which \
         would break trust mesh-wide. It needs {CERT_KEY} (certificate PEM) and {KEY_KEY} (key PEM)"
    )]
    MissingKey { secret: String, key: &'static str },
    #[error("CA Secret {secret}: {source}")]
    Ca { secret: String, source: CaError },
    #[error("CA Secret {secret}: cannot write it into the data dir: {source}")]
    DataDir {
        secret: String,
        source: std::io::Error,
    },
}

/// How the CA came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The Secret existed.
    Loaded,
    /// This replica generated the root and created the Secret.
    Created,
    /// Another replica created the Secret between this one's read and create.
    LostRace,
}

/// Loads the CA from the Secret, creating it (with a new root) if there is none. The key and
/// certificate are copied into `<data_dir>/ca-secret/` (key 0600) and loaded like plug-in files.
pub async fn load_or_create(
    client: kube::Client,
    secret: &SecretRef,
    data_dir: &Path,
    trust_domain: &TrustDomain,
    ttl: TtlPolicy,
) -> Result<(Ca, Origin), CaSecretError> {
    let api = kube::Api::<Secret>::namespaced(client, &secret.namespace);
    let api_err = |action: &'static str| {
        move |e: kube::Error| CaSecretError::Api {
            secret: secret.to_string(),
            action,
            reason: crate::kubernetes::ApiError::from(e).0,
        }
    };
    let (found, origin) = match api.get_opt(&secret.name).await.map_err(api_err("read"))? {
        Some(found) => (found, Origin::Loaded),
        None => {
            let (cert_pem, key_pem) =
                Ca::generate_root(trust_domain).map_err(|source| CaSecretError::Ca {
                    secret: secret.to_string(),
                    source,
                })?;
            let new = Secret {
                metadata: ObjectMeta {
                    name: Some(secret.name.clone()),
                    namespace: Some(secret.namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/part-of".to_string(),
                        "latch".to_string(),
                    )])),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".to_string()),
                data: Some(BTreeMap::from([
                    (CERT_KEY.to_string(), ByteString(cert_pem.into_bytes())),
                    (KEY_KEY.to_string(), ByteString(key_pem.into_bytes())),
                ])),
                ..Secret::default()
            };
            // Creation is the conflict check: the API server stores one object per name, so of
            // two replicas creating at once exactly one succeeds and the other gets 409.
            match api.create(&PostParams::default(), &new).await {
                Ok(created) => (created, Origin::Created),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let winner = api
                        .get(&secret.name)
                        .await
                        .map_err(api_err("read (after another replica created)"))?;
                    (winner, Origin::LostRace)
                }
                Err(e) => return Err(api_err("create")(e)),
            }
        }
    };
    let data = found.data.unwrap_or_default();
    let get = |key: &'static str| {
        data.get(key)
            .filter(|v| !v.0.is_empty())
            .map(|v| v.0.clone())
            .ok_or(CaSecretError::MissingKey {
                secret: secret.to_string(),
                key,
            })
    };
    let (cert, key) = (get(CERT_KEY)?, get(KEY_KEY)?);
    let dir = data_dir.join("ca-secret");
    let io_err = |source| CaSecretError::DataDir {
        secret: secret.to_string(),
        source,
    };
    files::ensure_private_dir(&dir).map_err(io_err)?;
    let plugin = PluginFiles {
        cert: dir.join(CERT_KEY),
        key: dir.join(KEY_KEY),
        chain: None,
        bundle: None,
    };
    files::write_private(&plugin.key, &key).map_err(io_err)?;
    files::write_public(&plugin.cert, &cert).map_err(io_err)?;
    let ca = Ca::from_files(&plugin, trust_domain, ttl).map_err(|source| CaSecretError::Ca {
        secret: secret.to_string(),
        source,
    })?;
    Ok((ca, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_ref_parses_namespace_and_name() {
        let ok: SecretRef = "latch-system/latch-ca".parse().unwrap();
        assert_eq!(ok.namespace, "latch-system");
        assert_eq!(ok.name, "latch-ca");
        assert_eq!(ok.to_string(), "latch-system/latch-ca");
        for bad in ["latch-ca", "/latch-ca", "latch-system/", "a/b/c", ""] {
            assert!(bad.parse::<SecretRef>().is_err(), "{bad:?}");
        }
    }
}
