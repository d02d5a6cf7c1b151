//! The control plane's own SVID (`spiffe://<td>/ns/latch-system/sa/latch-control`), issued by its
//! CA in-process, served on the gRPC port and renewed at half its lifetime, and at once with the
//! new bundle whenever a root rotation step changes the bundle or the signing root.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use latch_admin::backoff::Backoff;
use latch_identity::client::control_plane_id;
use latch_identity::csr::generate_csr;
use latch_identity::{CertStore, Svid};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::StartError;
use crate::ca::{Ca, CaError};

/// First wait after a failed renewal; doubles per consecutive failure up to `RETRY_CAP`.
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_CAP: Duration = Duration::from_secs(30);

/// The control plane's own SVID, signed in-process: the certificate service never issues this
/// ID (`latch_identity::client::is_reserved`).
pub fn issue_own(ca: &Ca) -> Result<Svid, CaError> {
    let id = control_plane_id(ca.trust_domain());
    let request = generate_csr(None).map_err(|e| CaError::Sign(e.to_string()))?;
    let csr = latch_identity::csr::verify_csr(&request.csr_der)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let ttl = ca.ttl_policy().default;
    let issued = ca.issue(&id, &csr.public_key_spki, ttl, SystemTime::now())?;
    Svid::new(issued.chain, request.key).map_err(|e| CaError::Sign(e.to_string()))
}

/// When to renew an SVID issued at `issued`: half the validity left then. Not half of
/// NotBefore..NotAfter: NotBefore is backdated 5 minutes for clock skew, which would renew a
/// short-lived certificate at once, again and again.
fn renewal_time(issued: SystemTime, svid: &Svid) -> SystemTime {
    let left = svid
        .info()
        .not_after
        .duration_since(issued)
        .unwrap_or_default();
    issued + left / 2
}

/// Issues the serving SVID and spawns its renewal.
pub fn serving_identity(
    ca: &Arc<Ca>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Arc<CertStore>, StartError> {
    let mut bundles = ca.subscribe_bundle();
    let first = issue_own(ca)?;
    let mut next_renewal = renewal_time(SystemTime::now(), &first);
    let store = Arc::new(CertStore::with_svid(
        first,
        (*bundles.borrow_and_update()).as_ref().clone(),
    ));
    let (ca, renewing) = (ca.clone(), store.clone());
    tracker.spawn(async move {
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_CAP);
        loop {
            let wait = next_renewal
                .duration_since(SystemTime::now())
                .unwrap_or_default();
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
                    next_renewal = renewal_time(SystemTime::now(), &svid);
                    renewing.set_svid(svid);
                    backoff.reset();
                }
                Err(e) => {
                    let retry_in = backoff.next_wait();
                    tracing::error!(
                        ?retry_in,
                        "cannot renew the control plane's serving certificate: {e}"
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(retry_in) => {}
                    }
                }
            }
        }
    });
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::TtlPolicy;
    use latch_identity::TrustDomain;

    #[test]
    fn a_short_lived_serving_certificate_renews_at_half_its_ttl_not_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = TtlPolicy {
            default: Duration::from_secs(10),
            max: Duration::from_secs(3600),
        };
        let ca =
            Ca::load_or_create(dir.path(), &TrustDomain::new("test.latch").unwrap(), ttl).unwrap();
        let issued = SystemTime::now();
        let svid = issue_own(&ca).unwrap();
        // The leaf's NotBefore is 5 minutes back; the renewal is 5 s ahead all the same.
        assert!(svid.info().not_before < issued - Duration::from_secs(60));
        let after = renewal_time(issued, &svid).duration_since(issued).unwrap();
        assert!(
            (Duration::from_secs(4)..=Duration::from_secs(5)).contains(&after),
            "{after:?}"
        );
    }
}
