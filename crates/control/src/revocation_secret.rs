//! Revocations shared by the control-plane replicas, with `--kubernetes`: one Secret,
//! `latch-revocations` in the control plane's namespace, holding the same JSON as
//! `<data-dir>/revocations.json`. A replica's data dir is its own (an `emptyDir`), so a
//! revocation made through one replica's admin API would otherwise reach only the proxies
//! connected to that replica, and be forgotten when it restarts.
//!
//! A revocation is written with compare-and-swap on the Secret's `resourceVersion` (read, add,
//! write naming the version read; on 409 Conflict read again), so two revocations made on two
//! replicas at once both stay. Every replica watches the Secret and serves what it holds; the
//! replica that wrote it serves it at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::kubernetes::ApiError;
use crate::revocations::{Revocation, RevocationError, Revocations, StateFile};

/// The Secret's name and key.
pub const NAME: &str = "latch-revocations";
const KEY: &str = "revocations.json";
/// Conflicting writes tolerated for one revocation (each means another replica revoked in
/// between).
const ATTEMPTS: usize = 8;

/// The revocations Secret of one namespace.
#[derive(Clone)]
pub struct RevocationSecret {
    api: kube::Api<Secret>,
    namespace: String,
}

impl std::fmt::Debug for RevocationSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RevocationSecret({}/{NAME})", self.namespace)
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == code)
}

impl RevocationSecret {
    /// The Secret in the client's default namespace: in a pod, its own.
    pub fn new(client: kube::Client) -> Self {
        let namespace = client.default_namespace().to_string();
        Self {
            api: kube::Api::namespaced(client, &namespace),
            namespace,
        }
    }

    fn error(&self, action: &'static str, reason: String) -> RevocationError {
        RevocationError::Shared {
            secret: format!("{}/{NAME}", self.namespace),
            action,
            reason,
        }
    }

    fn decode(&self, secret: &Secret) -> Result<BTreeMap<String, Revocation>, RevocationError> {
        let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(KEY)) else {
            return Ok(BTreeMap::new());
        };
        serde_json::from_slice::<StateFile>(&bytes.0)
            .map(|state| state.revocations)
            .map_err(|e| self.error("read", format!("{KEY} is corrupt: {e}")))
    }

    /// The revocations the Secret holds (none when there is no Secret yet).
    pub async fn load(&self) -> Result<BTreeMap<String, Revocation>, RevocationError> {
        match self.api.get_opt(NAME).await {
            Ok(Some(secret)) => self.decode(&secret),
            Ok(None) => Ok(BTreeMap::new()),
            Err(e) => Err(self.error("read", ApiError::from(e).0)),
        }
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
        for _ in 0..ATTEMPTS {
            let current = self
                .api
                .get_opt(NAME)
                .await
                .map_err(|e| self.error("read", ApiError::from(e).0))?;
            let mut entries = match &current {
                Some(secret) => self.decode(secret)?,
                None => BTreeMap::new(),
            };
            entries.retain(|_, r| r.expires_at > now_secs);
            entries.insert(revocation.spiffe_id.clone(), revocation.clone());
            let json = serde_json::to_vec_pretty(&StateFile::new(entries.clone()))
                .map_err(|e| self.error("write", e.to_string()))?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(NAME.to_string()),
                    namespace: Some(self.namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/part-of".to_string(),
                        "latch".to_string(),
                    )])),
                    resource_version: current
                        .as_ref()
                        .and_then(|s| s.metadata.resource_version.clone()),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".to_string()),
                data: Some(BTreeMap::from([(KEY.to_string(), ByteString(json))])),
                ..Secret::default()
            };
            let written = match current {
                Some(_) => {
                    self.api
                        .replace(NAME, &PostParams::default(), &secret)
                        .await
                }
                None => self.api.create(&PostParams::default(), &secret).await,
            };
            match written {
                Ok(_) => return Ok(entries),
                // Another replica wrote in between (409 Conflict on replace, AlreadyExists on
                // create): read again.
                Err(e) if is_status(&e, 409) => continue,
                Err(e) => return Err(self.error("write", ApiError::from(e).0)),
            }
        }
        Err(self.error(
            "write",
            format!("{ATTEMPTS} conflicting writes in a row; retry"),
        ))
    }

    /// Keeps `revocations` equal to the Secret, through a watch, until `cancel`. The watcher
    /// relists after any error (with backoff), so a missed event is made up for.
    pub fn follow(
        self,
        watch_client: kube::Client,
        revocations: Arc<Revocations>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) {
        let api = kube::Api::<Secret>::namespaced(watch_client, &self.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={NAME}"));
        tracker.spawn(async move {
            let mut events = Box::pin(watcher::watcher(api, config).default_backoff());
            // Whether the (re)list in progress found the Secret: a relist without it means it
            // was deleted while the watch was down.
            let mut listed = false;
            loop {
                let event = tokio::select! {
                    _ = cancel.cancelled() => return,
                    event = events.next() => match event {
                        Some(event) => event,
                        None => return,
                    },
                };
                match event {
                    Ok(Event::Apply(secret) | Event::InitApply(secret)) => {
                        listed = true;
                        match self.decode(&secret) {
                            Ok(entries) => revocations.replace_all(entries),
                            Err(e) => tracing::warn!("revocations not updated: {e}"),
                        }
                    }
                    Ok(Event::Init) => listed = false,
                    Ok(Event::InitDone) if !listed => revocations.replace_all(BTreeMap::new()),
                    Ok(Event::Delete(_)) => {
                        tracing::warn!(
                            secret = NAME,
                            "the revocations Secret was deleted; the revocations it held are \
                             no longer in force"
                        );
                        revocations.replace_all(BTreeMap::new());
                    }
                    Ok(Event::InitDone) => {}
                    Err(e) => tracing::warn!(secret = NAME, "watching revocations: {e}"),
                }
            }
        });
    }
}
