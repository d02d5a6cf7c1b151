//! The control plane's own SVID (`spiffe://<td>/ns/latch-system/sa/latch-control`), issued by its
//! CA in-process, served on the gRPC port and renewed at half its lifetime, and at once with the
//! new bundle whenever a root rotation step changes the bundle or the signing root.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use latch_identity::client::control_plane_id;
use latch_identity::csr::generate_csr;
use latch_identity::{CertStore, Svid};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::StartError;
use crate::ca::{Ca, CaError};

fn issue_own(ca: &Ca) -> Result<Svid, CaError> {
    let id = control_plane_id(ca.trust_domain());
    let request = generate_csr(None).map_err(|e| CaError::Sign(e.to_string()))?;
    let csr = latch_identity::csr::verify_csr(&request.csr_der)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let ttl = ca.ttl_policy().default;
    let issued = ca.issue(&id, &csr.public_key_spki, ttl, SystemTime::now())?;
    Svid::new(issued.chain, request.key).map_err(|e| CaError::Sign(e.to_string()))
}

/// Issues the serving SVID and spawns its renewal.
pub fn serving_identity(
    ca: &Arc<Ca>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Arc<CertStore>, StartError> {
    let mut bundles = ca.subscribe_bundle();
    let store = Arc::new(CertStore::with_svid(
        issue_own(ca)?,
        (*bundles.borrow_and_update()).as_ref().clone(),
    ));
    let (ca, renewing) = (ca.clone(), store.clone());
    tracker.spawn(async move {
        loop {
            let wait = renewing.svid().map_or(Duration::ZERO, |svid| {
                let info = svid.info();
                let renew_at = info.not_before + info.lifetime() / 2;
                renew_at.duration_since(SystemTime::now()).unwrap_or_default()
            });
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
                changed = bundles.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let bundle = (*bundles.borrow_and_update()).as_ref().clone();
                    // The new bundle first: it trusts both the old and the new root.
                    renewing.set_bundle(bundle);
                }
            }
            match issue_own(&ca) {
                Ok(svid) => {
                    tracing::info!(serial = %svid.info().serial, "renewed the control plane's serving certificate");
                    renewing.set_svid(svid);
                }
                Err(e) => {
                    tracing::error!("cannot renew the control plane's serving certificate: {e}");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                    }
                }
            }
        }
    });
    Ok(store)
}
