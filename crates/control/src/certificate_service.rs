//! `latch.ca.v1.CertificateService`: authenticates the caller (join token, Kubernetes
//! service-account token when the control plane runs with `--kubernetes`, or its current SVID
//! as TLS client certificate for renewal), checks the CSR, and asks the `Ca` to sign. Every
//! refusal has the gRPC status an operator would expect and says what to do about it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use latch_identity::csr::{CsrError, VerifiedCsr, verify_csr};
use latch_identity::{PeerRole, SpiffeId, SvidError, verify_svid};
use latch_proto::ca::certificate_service_server::CertificateService;
use latch_proto::ca::create_certificate_request::Proof;
use latch_proto::ca::{
    CreateCertificateRequest, CreateCertificateResponse, CreateJwtSvidRequest,
    CreateJwtSvidResponse,
};
use thiserror::Error;
use tonic::{Request, Response, Status};

use crate::ca::{Ca, CaError, TtlError};
use crate::jwt_authority::{JwtAuthority, check_audiences};
use crate::kubernetes::{PodBinding, SaTokenError, ServiceAccountAuthenticator};
use crate::metrics::{Metrics, ProofLabel};
use crate::revocations::{Issued, Revocations};
use crate::tls_incoming::PeerConn;
use crate::tokens::{JoinTokens, TokenError, TokenGrant};

/// Largest message tonic decodes at all (it answers OUT_OF_RANGE above this).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Largest CSR accepted; a P-256 CSR is a few hundred bytes. Larger ones get RESOURCE_EXHAUSTED.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why the CSR of an authenticated caller is refused.
#[derive(Debug, Error)]
pub enum CsrRefusal {
    #[error(transparent)]
    Invalid(#[from] CsrError),
    /// The CSR asks for this URI, which is not the authenticated ID.
    #[error("CSR asks for {0}")]
    OtherId(String),
}

/// The CSR checks once the caller is known to be `id`: a well-formed PKCS#10 of an allowed key
/// type with a valid self-signature, asking for no URI SAN but `id` (or none). The CA then
/// takes only its public key; whatever else the CSR asks for never reaches the certificate.
pub fn check_csr(csr_der: &[u8], id: &SpiffeId) -> Result<VerifiedCsr, CsrRefusal> {
    let csr = verify_csr(csr_der)?;
    if let Some(other) = csr.requested_uris.iter().find(|u| *u != id.as_str()) {
        return Err(CsrRefusal::OtherId(other.clone()));
    }
    Ok(csr)
}

/// How the caller proved who it is.
enum Proven {
    Token(TokenGrant),
    /// The service account's ID and the pod the token is bound to.
    ServiceAccount(SpiffeId, PodBinding),
    /// The presented SVID's ID, when it was issued, and the pod it was issued to (checked to
    /// still exist) when it was issued on a service-account token.
    Renewal(SpiffeId, SystemTime, Option<PodBinding>),
}

impl Proven {
    fn id(&self) -> &SpiffeId {
        match self {
            Proven::Token(grant) => &grant.id,
            Proven::ServiceAccount(id, _) | Proven::Renewal(id, ..) => id,
        }
    }

    /// The pod the new SVID is for, to be written into it.
    fn pod(&self) -> Option<&PodBinding> {
        match self {
            Proven::Token(_) | Proven::Renewal(_, _, None) => None,
            Proven::ServiceAccount(_, pod) | Proven::Renewal(_, _, Some(pod)) => Some(pod),
        }
    }

    /// When the proof came to be, for revocations: a revocation of the ID covers a token
    /// created, or an SVID issued, before it. A service-account token counts as older than any
    /// revocation (the kubelet keeps minting new ones for the same service account, so a new
    /// token is no new registration): a revoked service account gets nothing until the
    /// revocation expires.
    fn since(&self) -> SystemTime {
        match self {
            Proven::Token(grant) => grant.created_at,
            Proven::ServiceAccount(..) => SystemTime::UNIX_EPOCH,
            Proven::Renewal(_, issued_at, _) => *issued_at,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Proven::Token(_) => "join_token",
            Proven::ServiceAccount(..) => "service_account_token",
            Proven::Renewal(..) => "renewal",
        }
    }
}

/// A refusal: the status to return and the metric reason to count it under.
struct Refusal {
    reason: &'static str,
    status: Status,
}

impl Refusal {
    fn new(reason: &'static str, status: Status) -> Self {
        Self { reason, status }
    }
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        let reason = match &e {
            TokenError::Unknown => "token_unknown",
            TokenError::Expired { .. } => "token_expired",
            TokenError::AlreadyUsed { .. } => "token_used",
            TokenError::SingleUseUnguaranteed => "token_single_use_unguaranteed",
            _ => "token_state",
        };
        let status = match &e {
            TokenError::Persist { .. }
            | TokenError::Corrupt { .. }
            | TokenError::Shared { .. }
            | TokenError::SharedCorrupt { .. } => Status::unavailable(e.to_string()),
            TokenError::SingleUseUnguaranteed => Status::failed_precondition(e.to_string()),
            _ => Status::unauthenticated(e.to_string()),
        };
        Self::new(reason, status)
    }
}

impl From<SaTokenError> for Refusal {
    fn from(e: SaTokenError) -> Self {
        let status = match &e {
            // The caller may well be who it says: the control plane could not ask. Retry.
            SaTokenError::Unavailable(_) => Status::unavailable(e.to_string()),
            _ => Status::unauthenticated(format!("service-account token refused: {e}")),
        };
        Self::new(e.reason(), status)
    }
}

impl From<CsrError> for Refusal {
    fn from(e: CsrError) -> Self {
        let reason = match &e {
            CsrError::DisallowedKeyType(_) => "csr_key_type",
            CsrError::BadSignature | CsrError::AlgorithmMismatch { .. } => "csr_signature",
            _ => "csr_malformed",
        };
        Self::new(reason, Status::invalid_argument(e.to_string()))
    }
}

impl From<TtlError> for Refusal {
    fn from(e: TtlError) -> Self {
        Self::new("ttl", Status::invalid_argument(e.to_string()))
    }
}

impl From<CaError> for Refusal {
    fn from(e: CaError) -> Self {
        match e {
            CaError::PublicKey(_) => {
                Self::new("csr_malformed", Status::invalid_argument(e.to_string()))
            }
            other => Self::new("ca_unavailable", Status::unavailable(other.to_string())),
        }
    }
}

/// The gRPC service.
pub struct CertificateServer {
    ca: Arc<Ca>,
    jwt: Arc<JwtAuthority>,
    tokens: Arc<JoinTokens>,
    revocations: Arc<Revocations>,
    issued: Arc<Issued>,
    /// Present when the control plane runs with `--kubernetes`.
    service_accounts: Option<Arc<ServiceAccountAuthenticator>>,
    metrics: Arc<Metrics>,
}

impl CertificateServer {
    pub fn new(
        ca: Arc<Ca>,
        jwt: Arc<JwtAuthority>,
        tokens: Arc<JoinTokens>,
        revocations: Arc<Revocations>,
        issued: Arc<Issued>,
        service_accounts: Option<Arc<ServiceAccountAuthenticator>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            ca,
            jwt,
            tokens,
            revocations,
            issued,
            service_accounts,
            metrics,
        }
    }

    async fn authenticate(
        &self,
        proof: Option<&Proof>,
        peer: Option<&PeerConn>,
        now: SystemTime,
    ) -> Result<Proven, Refusal> {
        match proof {
            Some(Proof::JoinToken(token)) => {
                return Ok(Proven::Token(self.tokens.authenticate(token, now).await?));
            }
            Some(Proof::ServiceAccountToken(token)) => {
                let Some(service_accounts) = &self.service_accounts else {
                    return Err(Refusal::new(
                        "sa_token_unsupported",
                        Status::unauthenticated(
                            "this control plane does not accept Kubernetes service-account \
                             tokens: it runs without --kubernetes (LATCH_KUBERNETES); start it \
                             with that flag in the cluster, or use a join token",
                        ),
                    ));
                };
                let (id, pod) = service_accounts.authenticate(token).await?;
                return Ok(Proven::ServiceAccount(id, pod));
            }
            None => {}
        }
        let Some(chain) = peer.and_then(|p| p.certs.as_deref()) else {
            return Err(Refusal::new(
                "no_proof",
                Status::unauthenticated(
                    "no proof of identity: send a join token, or present your current SVID as \
                     the TLS client certificate to renew",
                ),
            ));
        };
        let info = verify_svid(chain, &self.ca.bundle(), now, PeerRole::Client).map_err(|e| {
            let reason = match e {
                SvidError::Expired { .. } => "renewal_expired",
                SvidError::Chain { .. } => "renewal_untrusted",
                _ => "renewal_invalid",
            };
            let hint = match e {
                SvidError::Expired { .. } => {
                    "; an expired SVID cannot be renewed, authenticate with a join token again"
                }
                _ => "",
            };
            Refusal::new(
                reason,
                Status::unauthenticated(format!("renewal refused: {e}{hint}")),
            )
        })?;
        if !info.id.is_member_of(self.ca.trust_domain()) {
            return Err(Refusal::new(
                "renewal_untrusted",
                Status::unauthenticated(format!(
                    "renewal refused: {} is not in trust domain {}",
                    info.id,
                    self.ca.trust_domain()
                )),
            ));
        }
        let issued_at = info.issued_at();
        let pod = PodBinding::from_leaf(chain[0].as_ref());
        if let (Some(pod), Some(service_accounts)) = (&pod, &self.service_accounts) {
            service_accounts.check_pod(pod).await.map_err(|e| match e {
                SaTokenError::Unavailable(_) => Refusal::from(e),
                _ => Refusal::new(
                    "renewal_pod_gone",
                    Status::unauthenticated(format!(
                        "renewal refused: this SVID was issued to pod {}/{} (uid {}), and {}; \
                         authenticate with a service-account token of a running pod",
                        pod.namespace,
                        pod.name,
                        pod.uid,
                        match e {
                            SaTokenError::PodReplaced { current_uid, .. } => format!(
                                "that pod name now belongs to another pod (uid {current_uid})"
                            ),
                            _ => "that pod no longer exists".to_string(),
                        }
                    )),
                ),
            })?;
        }
        Ok(Proven::Renewal(info.id, issued_at, pod))
    }

    async fn create(
        &self,
        request: &CreateCertificateRequest,
        peer: Option<&PeerConn>,
    ) -> Result<(CreateCertificateResponse, &'static str), Refusal> {
        let now = SystemTime::now();
        if request.csr.len() > MAX_CSR_BYTES {
            return Err(Refusal::new(
                "too_large",
                Status::resource_exhausted(format!(
                    "CSR of {} bytes is over the {MAX_CSR_BYTES}-byte limit",
                    request.csr.len()
                )),
            ));
        }
        let requested_ttl = match &request.ttl {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Refusal::new(
                    "ttl",
                    Status::invalid_argument("requested TTL is negative"),
                ));
            }
            Some(d) => Some(Duration::new(
                d.seconds.unsigned_abs(),
                d.nanos.unsigned_abs(),
            )),
        };
        let ttl = self.ca.ttl_policy().resolve(requested_ttl)?;
        let proven = self.authenticate(request.proof.as_ref(), peer, now).await?;
        // Whatever the proof (a token created before this check existed, a Kubernetes service
        // account of that name, a certificate from an earlier CA): never issued.
        Self::check_grantable(&proven, &self.revocations, now)?;
        let csr = match check_csr(&request.csr, proven.id()) {
            Ok(csr) => csr,
            Err(CsrRefusal::Invalid(e)) => return Err(e.into()),
            Err(CsrRefusal::OtherId(other)) => {
                let why = match &proven {
                    Proven::Token(_) => format!("the join token grants {}", proven.id()),
                    Proven::ServiceAccount(..) => {
                        format!("the service-account token grants {}", proven.id())
                    }
                    Proven::Renewal(..) => format!(
                        "renewal keeps the SPIFFE ID of the presented certificate, {}",
                        proven.id()
                    ),
                };
                return Err(Refusal::new(
                    "csr_identity",
                    Status::permission_denied(format!(
                        "CSR asks for {}, but {why}",
                        latch_admin::untrusted(&other, 256)
                    )),
                ));
            }
        };
        if let Proven::Token(grant) = &proven {
            self.tokens.consume(grant, now).await?;
        }
        let unit = proven.pod().map(PodBinding::to_subject_value);
        let issued = self.ca.issue_with_unit(
            proven.id(),
            unit.as_deref(),
            &csr.public_key_spki,
            ttl,
            now,
        )?;
        tracing::info!(
            spiffe_id = %issued.info.id,
            serial = %issued.info.serial,
            not_after = %latch_identity::svid::format_time(issued.info.not_after),
            proof = proven.label(),
            "issued SVID"
        );
        self.issued
            .record(&issued.info.id, proven.label(), &issued.info.serial, now);
        let expires_at = issued
            .info
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok((
            CreateCertificateResponse {
                spiffe_id: issued.info.id.to_string(),
                certificate_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
                trust_bundle: self
                    .ca
                    .bundle()
                    .roots()
                    .iter()
                    .map(|c| c.to_vec())
                    .collect(),
                jwt_bundle: self.jwt.bundle_jwks().into_bytes(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: i64::try_from(expires_at.as_secs()).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
            },
            proven.label(),
        ))
    }
}

impl CertificateServer {
    /// Refuses an ID that is reserved, revoked, or revoked a moment ago, whatever the proof (a
    /// token created before this check existed, a Kubernetes service account of that name, a
    /// certificate from an earlier CA).
    /// Counts and logs a refused `what` request, and gives the status to answer with.
    fn refused(&self, what: &str, peer: Option<&PeerConn>, refusal: Refusal) -> Status {
        self.metrics.refused(refusal.reason);
        tracing::info!(
            remote = ?peer.map(|p| p.remote),
            reason = refusal.reason,
            code = ?refusal.status.code(),
            "refused {what} request: {}",
            refusal.status.message()
        );
        refusal.status
    }

    fn check_grantable(
        proven: &Proven,
        revocations: &Revocations,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        if latch_identity::client::is_reserved(proven.id()) {
            return Err(Refusal::new(
                "reserved_id",
                Status::permission_denied(latch_identity::client::reserved_refusal(proven.id())),
            ));
        }
        if !revocations.is_loaded() {
            return Err(Refusal::new(
                "revocations_unavailable",
                Status::unavailable(
                    "the revocations kept in the Kubernetes API have not been read yet; retry \
                     shortly",
                ),
            ));
        }
        if let Some(revocation) = revocations.covering(proven.id(), proven.since()) {
            return Err(Refusal::new(
                "revoked",
                Status::permission_denied(revocation.refusal()),
            ));
        }
        if revocations.holds_off(proven.id(), now) {
            return Err(Refusal::new(
                "revoked_just_now",
                Status::unavailable(format!(
                    "{} was revoked less than a second ago; retry in a second",
                    proven.id()
                )),
            ));
        }
        Ok(())
    }

    /// A JWT-SVID for the caller's SVID's ID: only the TLS client certificate proves who the
    /// caller is (no token: a JWT-SVID is for a workload that already holds its X509-SVID).
    async fn create_jwt(
        &self,
        request: &CreateJwtSvidRequest,
        peer: Option<&PeerConn>,
    ) -> Result<CreateJwtSvidResponse, Refusal> {
        let now = SystemTime::now();
        check_audiences(&request.audience)
            .map_err(|why| Refusal::new("jwt_audience", Status::invalid_argument(why)))?;
        if peer.and_then(|p| p.certs.as_deref()).is_none() {
            return Err(Refusal::new(
                "no_proof",
                Status::unauthenticated(
                    "a JWT-SVID is issued to a caller that presents its current SVID as the \
                     TLS client certificate; none was presented",
                ),
            ));
        }
        let proven = self.authenticate(None, peer, now).await?;
        Self::check_grantable(&proven, &self.revocations, now)?;
        let issued = self
            .jwt
            .sign(proven.id(), &request.audience, now)
            .map_err(|e| {
                Refusal::new(
                    "jwt_signing",
                    Status::unavailable(format!("cannot sign a JWT-SVID: {e}")),
                )
            })?;
        tracing::info!(
            spiffe_id = %proven.id(),
            audiences = request.audience.len(),
            kid = self.jwt.keys().signing_kid(now).unwrap_or_default(),
            "issued JWT-SVID"
        );
        let expires_at = issued
            .expires_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(CreateJwtSvidResponse {
            spiffe_id: proven.id().to_string(),
            token: issued.token,
            expires_at: Some(prost_types::Timestamp {
                seconds: i64::try_from(expires_at.as_secs()).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            jwt_bundle: self.jwt.bundle_jwks().into_bytes(),
        })
    }
}

#[tonic::async_trait]
impl CertificateService for CertificateServer {
    async fn create_jwt_svid(
        &self,
        request: Request<CreateJwtSvidRequest>,
    ) -> Result<Response<CreateJwtSvidResponse>, Status> {
        let peer = request.extensions().get::<PeerConn>().cloned();
        match self.create_jwt(request.get_ref(), peer.as_ref()).await {
            Ok(response) => {
                self.metrics.jwt_svids_issued.inc();
                Ok(Response::new(response))
            }
            Err(refusal) => Err(self.refused("JWT-SVID", peer.as_ref(), refusal)),
        }
    }

    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let peer = request.extensions().get::<PeerConn>().cloned();
        match self.create(request.get_ref(), peer.as_ref()).await {
            Ok((response, proof)) => {
                self.metrics
                    .svids_issued
                    .get_or_create(&ProofLabel { proof })
                    .inc();
                Ok(Response::new(response))
            }
            Err(refusal) => Err(self.refused("certificate", peer.as_ref(), refusal)),
        }
    }
}
