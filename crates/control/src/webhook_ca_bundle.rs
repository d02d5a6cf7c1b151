//! Keeps the injector's MutatingWebhookConfiguration (`latch-sidecar-injector`, or
//! `--webhook-configuration`) trusting the webhook: every `webhooks[].clientConfig.caBundle`
//! holds the CA's roots (the bundle PEM, base64 in the object). Runs with `--kubernetes` and
//! `--webhook`; started by `ControlPlane::start`.
//!
//! The task GETs the object and, when a caBundle differs, sends one strategic merge patch that
//! names each webhook (the list's merge key is `name`) with only its `clientConfig.caBundle`,
//! so nothing else in the object changes. A missing object (the operator applies
//! 40-webhook.yaml later) or a failed request is logged, counted
//! (`latch_control_webhook_ca_bundle_sync_failures_total`) and retried after 5 s, backing off to 30 s.
//! Once in sync it checks again every minute, so a re-applied 40-webhook.yaml (caBundle "") is repaired.
//! The CA, and so the bundle, is fixed for the life of the process.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Api;
use kube::api::{Patch, PatchParams, ValidationDirective};
use latch_admin::backoff::Backoff;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::kubernetes::ApiError;
use crate::metrics::Metrics;

/// The MutatingWebhookConfiguration of deploy/kubernetes/40-webhook.yaml.
pub const DEFAULT_CONFIGURATION: &str = "latch-sidecar-injector";
/// How long after a failure the sync is tried again; doubles per consecutive failure up to
/// `RETRY_CAP_FACTOR` times this (30 s), with jitter (`latch_admin::backoff`).
pub const RETRY: Duration = Duration::from_secs(5);
/// The retry wait's cap, as a multiple of the first retry wait.
pub const RETRY_CAP_FACTOR: u32 = 6;
/// How often an in-sync configuration is checked again.
pub const RESYNC: Duration = Duration::from_secs(60);
/// Field manager named in the patch request.
pub const FIELD_MANAGER: &str = "latch-control";

/// What one sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// Every caBundle already held the bundle.
    Unchanged,
    /// The patch was sent and accepted.
    Patched,
}

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "MutatingWebhookConfiguration {0} does not exist (yet); apply \
         deploy/kubernetes/40-webhook.yaml"
    )]
    Missing(String),
    #[error("MutatingWebhookConfiguration {name}: cannot {action} it: {source}")]
    Api {
        name: String,
        action: &'static str,
        source: ApiError,
    },
    #[error("MutatingWebhookConfiguration {0} has no webhooks")]
    Empty(String),
}

/// Writes the CA's roots into the webhook configuration's caBundles.
pub struct WebhookCaBundle {
    /// A client for requests (`KubernetesAccess::client`).
    pub client: kube::Client,
    /// The MutatingWebhookConfiguration's name.
    pub name: String,
    /// The CA's roots, PEM; synced again at once when they change.
    pub bundle_pem: watch::Receiver<String>,
    pub metrics: Arc<Metrics>,
    /// First wait after a failure (`RETRY`; shorter in tests); backs off to
    /// `RETRY_CAP_FACTOR` times it.
    pub retry: Duration,
    /// Wait after a success (`RESYNC`).
    pub resync: Duration,
}

impl WebhookCaBundle {
    /// Syncs now and then after a backed-off `retry` (failed) or `resync` (done) until `cancel`
    /// fires.
    pub fn spawn(mut self, tracker: &TaskTracker, cancel: CancellationToken) {
        tracker.spawn(async move {
            let mut failing = false;
            let mut backoff = Backoff::new(self.retry, self.retry * RETRY_CAP_FACTOR);
            let mut bundle_open = true;
            loop {
                let wait = match self.sync().await {
                    Ok(synced) => {
                        if synced == Synced::Patched || failing {
                            tracing::info!(
                                configuration = %self.name,
                                ?synced,
                                "webhook caBundle holds the CA's roots"
                            );
                        }
                        failing = false;
                        backoff.reset();
                        self.resync
                    }
                    Err(e) => {
                        let wait = backoff.next_wait();
                        self.metrics.webhook_ca_bundle_sync_failures.inc();
                        tracing::warn!(
                            "cannot set the webhook caBundle, retrying in {:?}: {e} (until it \
                             is set the API server cannot verify the injector and refuses new \
                             pods in injected namespaces; check the latch-control ClusterRole \
                             allows get and patch on it)",
                            wait
                        );
                        failing = true;
                        wait
                    }
                };
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                    changed = self.bundle_pem.changed(), if bundle_open => {
                        bundle_open = changed.is_ok();
                    }
                }
            }
        });
    }

    /// One GET and, when some caBundle differs, one patch.
    pub async fn sync(&self) -> Result<Synced, SyncError> {
        let api = Api::<MutatingWebhookConfiguration>::all(self.client.clone());
        let api_err = |action| {
            move |e: kube::Error| SyncError::Api {
                name: self.name.clone(),
                action,
                source: e.into(),
            }
        };
        let current = api
            .get_opt(&self.name)
            .await
            .map_err(api_err("read"))?
            .ok_or_else(|| SyncError::Missing(self.name.clone()))?;
        let webhooks = current.webhooks.unwrap_or_default();
        if webhooks.is_empty() {
            return Err(SyncError::Empty(self.name.clone()));
        }
        let bundle_pem = self.bundle_pem.borrow().clone();
        let want = bundle_pem.as_bytes();
        if webhooks
            .iter()
            .all(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(want))
        {
            return Ok(Synced::Unchanged);
        }
        let names: Vec<&str> = webhooks.iter().map(|w| w.name.as_str()).collect();
        api.patch(
            &self.name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                // The patch is hand-written JSON: a misspelt field fails the request (400)
                // instead of being dropped with a warning.
                field_validation: Some(ValidationDirective::Strict),
                ..PatchParams::default()
            },
            &Patch::Strategic(patch_body(&names, &bundle_pem)),
        )
        .await
        .map_err(api_err("patch"))?;
        Ok(Synced::Patched)
    }
}

/// The strategic merge patch setting `caBundle` (base64 of `bundle_pem`) of each named webhook
/// and nothing else: `webhooks` merges by `name`, so the other webhooks' fields are kept.
pub fn patch_body(names: &[&str], bundle_pem: &str) -> Value {
    let ca_bundle = ByteString(bundle_pem.as_bytes().to_vec());
    json!({
        "webhooks": names
            .iter()
            .map(|name| json!({"name": name, "clientConfig": {"caBundle": ca_bundle}}))
            .collect::<Vec<_>>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_body_names_each_webhook_with_base64_pem() {
        let body = patch_body(&["a.latch.dev", "b.latch.dev"], "PEM\n");
        assert_eq!(
            body,
            json!({"webhooks": [
                {"name": "a.latch.dev", "clientConfig": {"caBundle": "UEVNCg=="}},
                {"name": "b.latch.dev", "clientConfig": {"caBundle": "UEVNCg=="}},
            ]})
        );
    }
}
