//! The client side of the certificate service: a tonic channel to the control plane over TLS
//! 1.3 that accepts only the control plane's SPIFFE ID, and `fetch_svid`, which generates a
//! fresh key, sends its CSR with a proof, and checks what comes back. Used by latchctl, the
//! proxy's identity agent, the tests and the benchmarks.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use latch_proto::ca::certificate_service_client::CertificateServiceClient;
use latch_proto::ca::create_certificate_request::Proof;
use latch_proto::ca::{CreateCertificateRequest, CreateJwtSvidRequest};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::bundle::{BundleError, TrustBundle};
use crate::csr::{CsrError, generate_csr};
use crate::jwt::{JwtBundle, JwtError};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::CertStore;
use crate::svid::{PeerRole, Svid, SvidError, verify_svid};
use crate::tls::{ALPN_H2, client_config, placeholder_server_name};
use crate::verifier::{ExpectedPeer, SpiffeServerVerifier};

/// Namespace and service account the control plane's SVID is issued for.
pub const CONTROL_PLANE_NAMESPACE: &str = "latch-system";
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "latch-control";

/// The SPIFFE ID a control plane of `trust_domain` serves with.
pub fn control_plane_id(trust_domain: &TrustDomain) -> SpiffeId {
    // Both segments are fixed valid names, so this cannot fail for a valid trust domain.
    SpiffeId::workload(
        trust_domain,
        CONTROL_PLANE_NAMESPACE,
        CONTROL_PLANE_SERVICE_ACCOUNT,
    )
    .unwrap_or_else(|_| trust_domain.id())
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("control plane address {addr:?} is invalid: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot connect to the control plane at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("control plane refused the request ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("CSR: {0}")]
    Csr(#[from] CsrError),
    #[error("control plane returned an unusable trust bundle: {0}")]
    Bundle(#[from] BundleError),
    #[error("control plane returned an unusable SVID: {0}")]
    Svid(#[from] SvidError),
    #[error("control plane returned an unusable JWT-SVID: {0}")]
    Jwt(#[from] JwtError),
    #[error(
        "control plane returned an SVID that the trust bundle this process holds does not \
         verify ({0}); refused (is the bundle given to this process this control plane's?)"
    )]
    Unanchored(SvidError),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Refused {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// Service accounts of the control plane's namespace that it uses for itself: its serving
/// identity and the CA's self-test. Never issued to a caller, whatever the proof.
pub const RESERVED_SERVICE_ACCOUNTS: [&str; 2] = [CONTROL_PLANE_SERVICE_ACCOUNT, "ca-self-test"];

/// True when `id` is one the control plane keeps for itself (in any trust domain): a workload
/// holding it could pose as the control plane to every proxy.
pub fn is_reserved(id: &SpiffeId) -> bool {
    RESERVED_SERVICE_ACCOUNTS
        .iter()
        .any(|sa| id.path() == format!("/ns/{CONTROL_PLANE_NAMESPACE}/sa/{sa}"))
}

/// Why `id` (reserved) is refused, in the words every refusal uses.
pub fn reserved_refusal(id: &SpiffeId) -> String {
    format!(
        "{id} is reserved for the control plane's own use and is never issued to a workload \
         (a holder could pose as the control plane); use another service account"
    )
}

/// A connection to the control plane's certificate service. Responses are checked against the
/// trust anchors this side already holds (`anchors`), never against a bundle in the response.
#[derive(Debug, Clone)]
pub struct CaClient {
    inner: CertificateServiceClient<Channel>,
    anchors: Arc<CertStore>,
}

impl CaClient {
    /// Connects to `addr` (host:port), trusting the bundle in `store` and accepting only a server
    /// presenting `expected`. The store's SVID, if any, is presented as client certificate.
    pub async fn connect(
        addr: &str,
        store: Arc<CertStore>,
        expected: ExpectedPeer,
        present_svid: bool,
    ) -> Result<Self, ClientError> {
        let verifier = Arc::new(SpiffeServerVerifier::new(store.clone(), expected));
        let tls = client_config(present_svid.then_some(store.clone()), verifier, &[ALPN_H2])?;
        Self::connect_with(addr, tls, store).await
    }

    /// Connects with a ready rustls config (tests use this to present arbitrary certificates),
    /// checking responses against the bundle in `anchors`.
    pub async fn connect_with(
        addr: &str,
        tls: rustls::ClientConfig,
        anchors: Arc<CertStore>,
    ) -> Result<Self, ClientError> {
        let channel = connect_channel(addr, tls, Some(Duration::from_secs(30))).await?;
        Ok(Self {
            inner: CertificateServiceClient::new(channel),
            anchors,
        })
    }

    /// Sends one CreateCertificate request as given.
    pub async fn create_certificate(
        &mut self,
        request: CreateCertificateRequest,
    ) -> Result<latch_proto::ca::CreateCertificateResponse, tonic::Status> {
        Ok(self.inner.create_certificate(request).await?.into_inner())
    }

    /// Sends one CreateJwtSvid request as given.
    pub async fn create_jwt_svid(
        &mut self,
        request: CreateJwtSvidRequest,
    ) -> Result<latch_proto::ca::CreateJwtSvidResponse, tonic::Status> {
        Ok(self.inner.create_jwt_svid(request).await?.into_inner())
    }

    /// Generates a fresh P-256 key, asks for an SVID with `proof` (a join token, or `None` to
    /// renew with the presented SVID), and validates the answer.
    pub async fn fetch_svid(
        &mut self,
        id_hint: Option<&SpiffeId>,
        ttl: Option<Duration>,
        join_token: Option<String>,
    ) -> Result<(Svid, TrustBundle), ClientError> {
        self.fetch_svid_with(id_hint, ttl, join_token.map(Proof::JoinToken))
            .await
    }

    /// Like `fetch_svid`, with any kind of proof.
    pub async fn fetch_svid_with(
        &mut self,
        id_hint: Option<&SpiffeId>,
        ttl: Option<Duration>,
        proof: Option<Proof>,
    ) -> Result<(Svid, TrustBundle), ClientError> {
        let request = generate_csr(id_hint)?;
        let response = self
            .create_certificate(CreateCertificateRequest {
                csr: request.csr_der,
                ttl: ttl.map(|d| prost_types::Duration {
                    seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
                }),
                proof,
            })
            .await?;
        svid_from_response(response, request.key, &self.anchors.bundle())
    }
}

/// A JWT-SVID from the control plane, checked against the JWT bundle that came with it.
#[derive(Debug, Clone)]
pub struct IssuedJwtSvid {
    pub spiffe_id: SpiffeId,
    pub token: String,
    /// Its `iat` (the control plane's clock); the Unix epoch when it has none.
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    pub bundle: JwtBundle,
}

impl CaClient {
    /// Asks for a JWT-SVID for `audience`, authenticated by the SVID this client presents.
    /// The token must validate, for every audience asked for, with the JWT bundle of the
    /// response and name the presented SVID's ID (the server was authenticated as the control
    /// plane against the anchors held).
    pub async fn fetch_jwt_svid(
        &mut self,
        audience: Vec<String>,
    ) -> Result<IssuedJwtSvid, ClientError> {
        let response = self
            .create_jwt_svid(CreateJwtSvidRequest {
                audience: audience.clone(),
            })
            .await?;
        let unusable = |why: &str| ClientError::Jwt(JwtError::Malformed(why.to_string()));
        let json: serde_json::Value = serde_json::from_slice(&response.jwt_bundle)
            .map_err(|_| unusable("the JWT bundle is not JSON"))?;
        let bundle = JwtBundle::from_jwks(&json)?;
        let own = self
            .anchors
            .svid()
            .ok_or_else(|| unusable("no SVID is held to ask with"))?;
        let now = SystemTime::now();
        let trust_domain = own.id().trust_domain();
        let (mut issued_at, mut expires_at) = (SystemTime::UNIX_EPOCH, now);
        for aud in &audience {
            let claims = crate::jwt::validate(&response.token, &trust_domain, &bundle, aud, now)?;
            if claims.subject != *own.id() {
                return Err(unusable("its subject is not this SVID's SPIFFE ID"));
            }
            expires_at = claims.expires;
            issued_at = claims.issued_at();
        }
        Ok(IssuedJwtSvid {
            spiffe_id: own.id().clone(),
            token: response.token,
            issued_at,
            expires_at,
            bundle,
        })
    }
}

/// Checks a CreateCertificate response and pairs it with `key`. The chain must verify against
/// `anchors`, the bundle the caller already holds: a bundle carried in the same response proves
/// nothing about it. The response's bundle is returned as the new bundle only if it also
/// anchors the new SVID (so installing it cannot cut the caller off from its own identity);
/// it came over a connection whose server was authenticated as the control plane against
/// `anchors`, as discovery's bundles do.
pub fn svid_from_response(
    response: latch_proto::ca::CreateCertificateResponse,
    key: PrivatePkcs8KeyDer<'static>,
    anchors: &TrustBundle,
) -> Result<(Svid, TrustBundle), ClientError> {
    let bundle = TrustBundle::new(
        response
            .trust_bundle
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
    )?;
    let chain: Vec<CertificateDer<'static>> = response
        .certificate_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let now = SystemTime::now();
    verify_svid(&chain, anchors, now, PeerRole::Client).map_err(ClientError::Unanchored)?;
    verify_svid(&chain, &bundle, now, PeerRole::Client)?;
    Ok((Svid::new(chain, key)?, bundle))
}

/// Opens an HTTP/2 channel to the control plane at `addr` over TLS with `tls`. Each new
/// connection the channel makes runs a fresh handshake, so it presents the SVID current at that
/// moment. `request_timeout` bounds unary calls; long-lived streams pass `None` and rely on
/// HTTP/2 keepalive to notice a dead peer.
pub async fn connect_channel(
    addr: &str,
    tls: rustls::ClientConfig,
    request_timeout: Option<Duration>,
) -> Result<Channel, ClientError> {
    let endpoint =
        Endpoint::from_shared(format!("http://{addr}")).map_err(|e| ClientError::Address {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    let mut endpoint = endpoint
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(timeout) = request_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let connector = TlsConnector::from(Arc::new(tls));
    let target = addr.to_string();
    endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let (connector, target) = (connector.clone(), target.clone());
            async move {
                let tcp = TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(placeholder_server_name(), tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| {
            let mut reason = crate::report::error_chain(&e);
            if matches!(crate::report::svid_error(&e), Some(SvidError::Chain { .. })) {
                reason.push_str(
                    " (the control plane's certificate is not signed by a root of the trust \
                     bundle given to this process: is it this control plane's bundle.pem?)",
                );
            }
            ClientError::Connect {
                addr: addr.to_string(),
                reason,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Ca, leaf_params, spiffe_id};

    /// A CreateCertificate response carrying `leaf` signed by `ca` and `ca`'s own bundle.
    fn response(
        ca: &Ca,
        bundle: &[&Ca],
    ) -> (
        latch_proto::ca::CreateCertificateResponse,
        PrivatePkcs8KeyDer<'static>,
    ) {
        let leaf = ca.sign(&leaf_params("/ns/demo/sa/web"));
        let response = latch_proto::ca::CreateCertificateResponse {
            certificate_chain: vec![leaf.cert.to_vec()],
            trust_bundle: bundle.iter().map(|ca| ca.cert().to_vec()).collect(),
            ..Default::default()
        };
        (response, leaf.key_der())
    }

    #[test]
    fn a_response_is_checked_against_the_anchors_held_not_its_own_bundle() {
        let ours = Ca::root("ours");
        let theirs = Ca::root("theirs");

        // Signed by another CA and carrying that CA as its bundle: self-consistent, refused.
        let (forged, key) = response(&theirs, &[&theirs]);
        let err = svid_from_response(forged, key, &ours.bundle()).unwrap_err();
        assert!(matches!(err, ClientError::Unanchored(_)), "{err}");
        assert!(
            err.to_string()
                .contains("the trust bundle this process holds does not verify"),
            "{err}"
        );

        // Signed by our CA: accepted, with the response's bundle (ours plus a next root, as
        // during a rotation) as the new bundle.
        let (good, key) = response(&ours, &[&ours, &theirs]);
        let (svid, bundle) = svid_from_response(good, key, &ours.bundle()).unwrap();
        assert_eq!(svid.id(), &spiffe_id("/ns/demo/sa/web"));
        assert_eq!(bundle.roots().len(), 2);

        // Signed by our CA but with a bundle that lacks it: installing it would cut us off.
        let (cut_off, key) = response(&ours, &[&theirs]);
        assert!(matches!(
            svid_from_response(cut_off, key, &ours.bundle()),
            Err(ClientError::Svid(_))
        ));
    }

    #[test]
    fn the_control_planes_own_ids_are_reserved_in_every_trust_domain() {
        for id in [
            "spiffe://cluster.local/ns/latch-system/sa/latch-control",
            "spiffe://other.example/ns/latch-system/sa/latch-control",
            "spiffe://cluster.local/ns/latch-system/sa/ca-self-test",
        ] {
            assert!(is_reserved(&SpiffeId::parse(id).unwrap()), "{id}");
        }
        for id in [
            "spiffe://cluster.local/ns/latch-system/sa/latch-control-2",
            "spiffe://cluster.local/ns/latch-system/sa/monitoring",
            "spiffe://cluster.local/ns/demo/sa/latch-control",
        ] {
            assert!(!is_reserved(&SpiffeId::parse(id).unwrap()), "{id}");
        }
    }
}
