//! Revocations shared by the control-plane replicas, with `--kubernetes`: one Secret,
//! `latch-revocations` in the control plane's namespace, holding the same JSON as
//! `<data-dir>/revocations.json`. A replica's data dir is its own (an `emptyDir`), so a
//! revocation made through one replica's admin API would otherwise reach only the proxies
//! connected to that replica, and be forgotten when it restarts.
//!
//! A revocation is written with compare-and-swap (`shared_secret.rs`), so two revocations made
//! on two replicas at once both stay. Every replica watches the Secret and serves what it holds;
//! the replica that wrote it serves it at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::revocations::{Revocation, RevocationError, Revocations, StateFile};
use crate::shared_secret::{Change, SecretError, SharedSecret};

/// The Secret's name and key.
pub const NAME: &str = "latch-revocations";
const KEY: &str = "revocations.json";

impl From<SecretError> for RevocationError {
    fn from(e: SecretError) -> Self {
        RevocationError::Shared {
            secret: e.secret,
            action: e.action,
            reason: e.reason,
        }
    }
}

/// The revocations Secret of one namespace.
#[derive(Clone, Debug)]
pub struct RevocationSecret(SharedSecret);

impl RevocationSecret {
    /// The Secret in the client's default namespace: in a pod, its own.
    pub fn new(client: kube::Client) -> Self {
        Self(SharedSecret::new(client, NAME, KEY))
    }

    fn decode(&self, bytes: Option<&[u8]>) -> Result<BTreeMap<String, Revocation>, SecretError> {
        let Some(bytes) = bytes else {
            return Ok(BTreeMap::new());
        };
        serde_json::from_slice::<StateFile>(bytes)
            .map(|state| state.revocations)
            .map_err(|e| self.0.error("read", format!("{KEY} is corrupt: {e}")))
    }

    /// The revocations the Secret holds (none when there is no Secret yet).
    pub async fn load(&self) -> Result<BTreeMap<String, Revocation>, RevocationError> {
        Ok(self.decode(self.0.read().await?.as_deref())?)
    }

    /// Adds `revocation` (replacing one of the same ID), dropping the expired ones, with
    /// compare-and-swap; returns what the Secret holds now.
    pub async fn add(
        &self,
        revocation: &Revocation,
        now: SystemTime,
    ) -> Result<BTreeMap<String, Revocation>, RevocationError> {
        let now_secs = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.0
            .update(|current| {
                let mut entries = self.decode(current)?;
                entries.retain(|_, r| r.expires_at > now_secs);
                entries.insert(revocation.spiffe_id.clone(), revocation.clone());
                let json = serde_json::to_vec_pretty(&StateFile::new(entries.clone()))
                    .map_err(|e| self.0.error("write", e.to_string()))?;
                Ok::<_, RevocationError>(Change::Write(json, entries))
            })
            .await
    }

    /// Keeps `revocations` equal to the Secret, through a watch, until `cancel`. A deleted
    /// Secret leaves no revocation in force (and says so in the log).
    pub fn follow(
        self,
        watch_client: kube::Client,
        revocations: Arc<Revocations>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) {
        let this = self.clone();
        self.0.follow(
            watch_client,
            move |document| match this.decode(document) {
                Ok(entries) => revocations.replace_all(entries),
                Err(e) => tracing::warn!("revocations not updated: {}: {}", e.secret, e.reason),
            },
            tracker,
            cancel,
        );
    }
}
