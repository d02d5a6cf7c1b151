//! The trust bundle ConfigMap `latch-ca-bundle` (key `bundle.pem`) that injected proxies mount,
//! kept in every namespace holding injected pods. The Kubernetes source reports those
//! namespaces; this task applies the ConfigMap (server-side apply, field manager
//! `latch-control`) when a namespace gains injected pods, retries failures, and applies it again
//! in every such namespace each `resync`, so a deleted or edited copy is back within a minute.
//! ConfigMaps are not watched: that would need list/watch on every ConfigMap in the cluster.
//! Started by `ControlPlane::start`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, ValidationDirective};
use latch_admin::backoff::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::kubernetes::ApiError;

/// The ConfigMap the injector mounts into every proxy (`--ca-bundle`).
pub const CONFIGMAP_NAME: &str = "latch-ca-bundle";
pub const BUNDLE_KEY: &str = "bundle.pem";
/// Server-side apply field manager.
pub const FIELD_MANAGER: &str = "latch-control";
/// How long after a failure a namespace is tried again; doubles per consecutive failed pass
/// up to `RETRY_CAP_FACTOR` times this (30 s), with jitter (`latch_admin::backoff`).
pub const RETRY: Duration = Duration::from_secs(5);
/// The retry wait's cap, as a multiple of the first retry wait.
pub const RETRY_CAP_FACTOR: u32 = 6;
/// How often every namespace's copy is applied again. An apply that changes nothing writes
/// nothing (the resourceVersion stays), so this costs one request per namespace.
pub const RESYNC: Duration = Duration::from_secs(60);

/// Writes the bundle ConfigMap into namespaces as they gain injected pods.
pub struct BundleConfigMaps {
    /// A client for requests (`KubernetesAccess::client`).
    pub client: kube::Client,
    /// The CA's roots, PEM; every namespace's copy is applied again when they change.
    pub bundle_pem: watch::Receiver<String>,
    /// The first wait after a failure, `RETRY` (tests use less); backs off to
    /// `RETRY_CAP_FACTOR` times it.
    pub retry: Duration,
    /// `RESYNC` (tests use less).
    pub resync: Duration,
}

impl BundleConfigMaps {
    /// Follows `namespaces` (those holding injected pods) until `cancel` fires.
    pub fn spawn(
        mut self,
        mut namespaces: watch::Receiver<BTreeSet<String>>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) {
        tracker.spawn(async move {
            // Namespaces whose copy was applied since the last resync.
            let mut done: BTreeSet<String> = BTreeSet::new();
            let mut applied_once: BTreeSet<String> = BTreeSet::new();
            let mut bundle_open = true;
            let mut backoff = Backoff::new(self.retry, self.retry * RETRY_CAP_FACTOR);
            // Set when a namespace failed in the last pass: the wait before the next one.
            let mut retry_in: Option<Duration> = None;
            let mut resync = tokio::time::interval(self.resync);
            resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            resync.reset();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    changed = namespaces.changed() => {
                        if changed.is_err() {
                            break;
                        }
                    }
                    _ = tokio::time::sleep(retry_in.unwrap_or_default()), if retry_in.is_some() => {}
                    _ = resync.tick() => done.clear(),
                    changed = self.bundle_pem.changed(), if bundle_open => {
                        bundle_open = changed.is_ok();
                        done.clear();
                    }
                }
                let wanted = namespaces.borrow_and_update().clone();
                done.retain(|namespace| wanted.contains(namespace));
                retry_in = None;
                for namespace in wanted.difference(&done.clone()) {
                    match self.apply(namespace).await {
                        Ok(()) => {
                            if applied_once.insert(namespace.clone()) {
                                tracing::info!(
                                    namespace,
                                    "trust bundle ConfigMap {CONFIGMAP_NAME} applied"
                                );
                            }
                            done.insert(namespace.clone());
                        }
                        Err(e) => {
                            let wait = *retry_in.get_or_insert_with(|| backoff.next_wait());
                            tracing::warn!(
                                namespace,
                                "cannot apply the trust bundle ConfigMap {CONFIGMAP_NAME}, \
                                 retrying in {:?}: {e} (injected proxies there cannot start \
                                 without it; check the latch-control ClusterRole allows create \
                                 and patch on it)",
                                wait
                            );
                        }
                    }
                }
                if retry_in.is_none() {
                    backoff.reset();
                }
            }
        });
    }

    async fn apply(&self, namespace: &str) -> Result<(), ApiError> {
        let config_map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(CONFIGMAP_NAME.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_string(),
                    "latch".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                BUNDLE_KEY.to_string(),
                self.bundle_pem.borrow().clone(),
            )])),
            ..ConfigMap::default()
        };
        Api::<ConfigMap>::namespaced(self.client.clone(), namespace)
            .patch(
                CONFIGMAP_NAME,
                // Strict: a field the API server does not know fails the apply instead of being
                // dropped with a warning nobody reads.
                &PatchParams::apply(FIELD_MANAGER)
                    .force()
                    .validation(ValidationDirective::Strict),
                &Patch::Apply(&config_map),
            )
            .await?;
        Ok(())
    }
}
