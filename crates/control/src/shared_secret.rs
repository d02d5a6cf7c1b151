//! One document (a single data key) in a Kubernetes Secret, shared by the control-plane
//! replicas: read, changed with compare-and-swap, and followed through a watch. A replica's data
//! dir is its own (an `emptyDir`), so state every replica must agree on lives here instead:
//! the revocations (`revocation_secret.rs`) and the JWT signing keys (`jwt_authority.rs`).
//!
//! A change is read, modify, write naming the `resourceVersion` read; when another replica
//! wrote in between, the API server answers 409 Conflict (409 AlreadyExists for a create) and
//! the change is made again on what that replica wrote. So two changes made on two replicas at
//! once both stay, and a decision such as "rotate if nobody has yet" is taken by one replica.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::kubernetes::ApiError;

/// Conflicting writes tolerated for one change (each means another replica wrote in between).
const ATTEMPTS: usize = 8;

/// A failed read or write, with the API server's reason.
#[derive(Debug, Clone)]
pub struct SecretError {
    /// `<namespace>/<name>`.
    pub secret: String,
    pub action: &'static str,
    pub reason: String,
}

/// What a change decided, given what the Secret held.
pub enum Change<T> {
    /// Write these bytes, then return `T`.
    Write(Vec<u8>, T),
    /// Leave the Secret as it is and return `T`.
    Keep(T),
}

/// The document `key` of Secret `name` in the client's default namespace (in a pod, its own).
#[derive(Clone)]
pub struct SharedSecret {
    api: kube::Api<Secret>,
    namespace: String,
    name: &'static str,
    key: &'static str,
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret {}/{} ({})", self.namespace, self.name, self.key)
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == code)
}

impl SharedSecret {
    pub fn new(client: kube::Client, name: &'static str, key: &'static str) -> Self {
        let namespace = client.default_namespace().to_string();
        Self {
            api: kube::Api::namespaced(client, &namespace),
            namespace,
            name,
            key,
        }
    }

    /// `<namespace>/<name>`.
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn error(&self, action: &'static str, reason: impl Into<String>) -> SecretError {
        SecretError {
            secret: self.display(),
            action,
            reason: reason.into(),
        }
    }

    fn document<'a>(&self, secret: &'a Secret) -> Option<&'a [u8]> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(self.key))
            .map(|b| b.0.as_slice())
    }

    /// The document, or None when there is no Secret (or it lacks the key).
    pub async fn read(&self) -> Result<Option<Vec<u8>>, SecretError> {
        let secret = self
            .api
            .get_opt(self.name)
            .await
            .map_err(|e| self.error("read", ApiError::from(e).0))?;
        Ok(secret
            .as_ref()
            .and_then(|s| self.document(s))
            .map(<[u8]>::to_vec))
    }

    /// Applies `change` to the document (None when there is none yet) with compare-and-swap,
    /// calling it again on what another replica wrote when a write conflicts.
    pub async fn update<T, E>(
        &self,
        mut change: impl FnMut(Option<&[u8]>) -> Result<Change<T>, E>,
    ) -> Result<T, E>
    where
        E: From<SecretError>,
    {
        for _ in 0..ATTEMPTS {
            let current = self
                .api
                .get_opt(self.name)
                .await
                .map_err(|e| self.error("read", ApiError::from(e).0))?;
            let (bytes, result) = match change(current.as_ref().and_then(|s| self.document(s)))? {
                Change::Keep(result) => return Ok(result),
                Change::Write(bytes, result) => (bytes, result),
            };
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(self.name.to_string()),
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
                data: Some(BTreeMap::from([(self.key.to_string(), ByteString(bytes))])),
                ..Secret::default()
            };
            let written = match current {
                Some(_) => {
                    self.api
                        .replace(self.name, &PostParams::default(), &secret)
                        .await
                }
                None => self.api.create(&PostParams::default(), &secret).await,
            };
            match written {
                Ok(_) => return Ok(result),
                Err(e) if is_status(&e, 409) => continue,
                Err(e) => return Err(self.error("write", ApiError::from(e).0).into()),
            }
        }
        Err(self
            .error(
                "write",
                format!("{ATTEMPTS} conflicting writes in a row; retry"),
            )
            .into())
    }

    /// Calls `apply` with the document every time it changes (None when the Secret is deleted,
    /// or found missing by a relist), until `cancel`. The watcher relists after any error, with
    /// backoff, so a missed event is made up for.
    pub fn follow(
        self,
        watch_client: kube::Client,
        apply: impl Fn(Option<&[u8]>) + Send + 'static,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) {
        let api = kube::Api::<Secret>::namespaced(watch_client, &self.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
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
                        apply(self.document(&secret));
                    }
                    Ok(Event::Init) => listed = false,
                    Ok(Event::InitDone) if !listed => apply(None),
                    Ok(Event::Delete(_)) => {
                        tracing::warn!(secret = %self.display(), "the Secret was deleted");
                        apply(None);
                    }
                    Ok(Event::InitDone) => {}
                    Err(e) => tracing::warn!(secret = %self.display(), "watching: {e}"),
                }
            }
        });
    }
}
