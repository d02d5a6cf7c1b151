//! The identity agent: obtains the proxy's SVID with its credential (join token, or a
//! Kubernetes service-account token file re-read at every request), renews it at half its
//! lifetime (±10% jitter) with a fresh key each time, retries failures with capped exponential
//! backoff, and swaps SVID and bundle into the `CertStore` the data path and the Workload API
//! read. Owned by `Proxy`; runs until cancelled.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use latch_admin::backoff::{Backoff, random_unit};
use latch_identity::client::{CaClient, ClientError};
use latch_identity::{CertStore, ExpectedPeer, Svid, TrustBundle};
use latch_proto::ca::create_certificate_request::Proof;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How the proxy proves who it is when it holds no valid SVID.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A join token (from LATCH_JOIN_TOKEN).
    JoinToken(String),
    /// A file holding a join token, read at each use.
    JoinTokenFile(PathBuf),
    /// A Kubernetes projected service-account token file; it rotates, so it is re-read at
    /// every request.
    ServiceAccountTokenFile(PathBuf),
    /// Nothing: only renewal with a valid SVID is possible.
    None,
}

impl Credential {
    fn proof(&self) -> Result<Proof, String> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        match self {
            Credential::JoinToken(token) => Ok(Proof::JoinToken(token.clone())),
            Credential::JoinTokenFile(path) => read(path).map(Proof::JoinToken),
            Credential::ServiceAccountTokenFile(path) => read(path).map(Proof::ServiceAccountToken),
            Credential::None => Err(
                "no credential configured (--join-token-file, LATCH_JOIN_TOKEN or --token-file)"
                    .into(),
            ),
        }
    }
}

/// Settings of the identity agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub control_plane: String,
    /// The control plane's SPIFFE ID.
    pub control_plane_id: ExpectedPeer,
    pub credential: Credential,
    /// Requested SVID lifetime; the control plane's default when `None`.
    pub ttl: Option<Duration>,
}

/// First wait after a failed attempt; doubles per consecutive failure up to the cap.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Cap of the retry wait before the first SVID is held.
const INITIAL_CAP: Duration = Duration::from_secs(5);
const MAX_CAP: Duration = Duration::from_secs(30);

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// When to renew an SVID received at `received` that expires at `not_after`: at 50% ±10% of the
/// validity left at receipt. (NotBefore is backdated for clock skew, so it is not the start.)
pub fn renew_at(received: SystemTime, not_after: SystemTime) -> SystemTime {
    let validity = not_after.duration_since(received).unwrap_or_default();
    let fraction = 0.5 + 0.1 * (2.0 * random_unit() - 1.0);
    received + validity.mul_f64(fraction)
}

/// Longest wait between retries while holding an SVID of this validity: a tenth of it, within
/// [1 s, 30 s], so several retries fit before expiry.
pub fn backoff_cap(validity: Duration) -> Duration {
    (validity / 10).clamp(Duration::from_secs(1), MAX_CAP)
}

/// Why an attempt failed, for the metric label.
fn failure_reason(e: &ClientError) -> &'static str {
    match e {
        ClientError::Connect { .. } | ClientError::Address { .. } => "unavailable",
        ClientError::Refused { code, .. } => match code {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => "unavailable",
            tonic::Code::Unauthenticated => "unauthenticated",
            tonic::Code::PermissionDenied => "permission_denied",
            _ => "refused",
        },
        ClientError::Svid(_) | ClientError::Bundle(_) | ClientError::Jwt(_) => "invalid_response",
        ClientError::Unanchored(_) => "unanchored_response",
        ClientError::Csr(_) | ClientError::Tls(_) => "local",
    }
}

/// The agent.
pub struct IdentityAgent {
    store: Arc<CertStore>,
    config: AgentConfig,
    metrics: Arc<Metrics>,
    /// Unix seconds of the next planned renewal (0 = none planned).
    next_rotation: AtomicU64,
    /// Validity left when the current SVID was received, in seconds (0 = none yet).
    validity: AtomicU64,
}

impl IdentityAgent {
    pub fn new(store: Arc<CertStore>, config: AgentConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            config,
            metrics,
            next_rotation: AtomicU64::new(0),
            validity: AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// The planned time of the next renewal, if one is planned.
    pub fn next_rotation(&self) -> Option<SystemTime> {
        match self.next_rotation.load(Ordering::Relaxed) {
            0 => None,
            secs => Some(UNIX_EPOCH + Duration::from_secs(secs)),
        }
    }

    /// One attempt: renew with the current SVID if it is still valid, otherwise (or when the
    /// renewal is refused as unauthenticated) use the credential.
    async fn obtain(&self) -> Result<(Svid, TrustBundle), ClientError> {
        if let Some(current) = self.store.valid_svid(SystemTime::now()) {
            let mut client = CaClient::connect(
                &self.config.control_plane,
                self.store.clone(),
                self.config.control_plane_id.clone(),
                true,
            )
            .await?;
            match client
                .fetch_svid(Some(current.id()), self.config.ttl, None)
                .await
            {
                Err(ClientError::Refused {
                    code: tonic::Code::Unauthenticated,
                    message,
                }) if !matches!(self.config.credential, Credential::None) => {
                    tracing::warn!("renewal refused ({message}); trying the credential");
                }
                other => return other,
            }
        }
        let proof = self
            .config
            .credential
            .proof()
            .map_err(|message| ClientError::Refused {
                code: tonic::Code::Unauthenticated,
                message,
            })?;
        let mut client = CaClient::connect(
            &self.config.control_plane,
            self.store.clone(),
            self.config.control_plane_id.clone(),
            false,
        )
        .await?;
        client
            .fetch_svid_with(None, self.config.ttl, Some(proof))
            .await
    }

    fn install(&self, svid: Svid, bundle: TrustBundle) {
        let received = SystemTime::now();
        let info = svid.info().clone();
        let bundle_changed = bundle.roots() != self.store.bundle().roots();
        if bundle_changed {
            tracing::info!(fingerprints = ?bundle.fingerprints(), "trust bundle changed");
        }
        // Plan the renewal and update the metrics before swapping: whoever is woken by the new
        // SVID (the Workload API, /debug/certs, tests) sees a consistent state.
        let validity = info.not_after.duration_since(received).unwrap_or_default();
        self.validity.store(validity.as_secs(), Ordering::Relaxed);
        let next = renew_at(received, info.not_after);
        self.next_rotation.store(unix(next), Ordering::Relaxed);
        self.metrics.rotations.inc();
        self.metrics
            .svid_expiry
            .set(i64::try_from(unix(info.not_after)).unwrap_or(i64::MAX));
        self.store.rotate(svid, bundle_changed.then_some(bundle));
        tracing::info!(
            spiffe_id = %info.id,
            serial = %info.serial,
            not_after = %latch_identity::svid::format_time(info.not_after),
            next_rotation = %latch_identity::svid::format_time(next),
            "SVID installed"
        );
    }

    /// Runs until `cancel`: obtain, install, sleep until the renewal time, repeat; retry
    /// failures with capped exponential backoff plus jitter.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(FIRST_RETRY, INITIAL_CAP);
        let mut retry_in = Duration::ZERO;
        let mut expired_logged = false;
        loop {
            let wait = match (self.store.svid(), self.next_rotation()) {
                (Some(_), Some(at)) if backoff.is_reset() => {
                    at.duration_since(SystemTime::now()).unwrap_or_default()
                }
                _ => retry_in,
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.obtain().await {
                Ok((svid, bundle)) => {
                    self.install(svid, bundle);
                    backoff.reset();
                    expired_logged = false;
                }
                Err(e) => {
                    let reason = failure_reason(&e);
                    self.metrics.failed(reason);
                    backoff.set_cap(match self.validity.load(Ordering::Relaxed) {
                        0 => INITIAL_CAP,
                        secs => backoff_cap(Duration::from_secs(secs)),
                    });
                    retry_in = backoff.next_wait();
                    let expired = self.store.valid_svid(SystemTime::now()).is_none()
                        && self.store.svid().is_some();
                    if expired && !expired_logged {
                        tracing::error!(
                            "SVID has expired and could not be renewed: new mTLS handshakes fail \
                             closed until the control plane at {} answers",
                            self.config.control_plane
                        );
                        expired_logged = true;
                    }
                    tracing::warn!(
                        reason,
                        ?retry_in,
                        "could not obtain an SVID from {}: {e}",
                        self.config.control_plane
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_lands_between_40_and_60_percent_of_the_validity() {
        let received = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let not_after = received + Duration::from_secs(100);
        for _ in 0..1000 {
            let at = renew_at(received, not_after)
                .duration_since(received)
                .unwrap();
            assert!(
                at >= Duration::from_secs(40) && at <= Duration::from_secs(60),
                "{at:?}"
            );
        }
    }

    #[test]
    fn backoff_cap_is_a_tenth_of_validity_within_bounds() {
        assert_eq!(backoff_cap(Duration::from_secs(10)), Duration::from_secs(1));
        assert_eq!(
            backoff_cap(Duration::from_secs(100)),
            Duration::from_secs(10)
        );
        assert_eq!(
            backoff_cap(Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
    }
}
