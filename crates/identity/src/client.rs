//! The client side of the certificate service: a tonic channel to the control plane over TLS
//! 1.3 that accepts only the control plane's SPIFFE ID, and `fetch_svid`, which generates a
//! fresh key, sends its CSR with a proof, and checks what comes back. Used by latchctl, the
//! proxy's identity agent, the tests and the benchmarks.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use latch_proto::ca::CreateCertificateRequest;
use latch_proto::ca::certificate_service_client::CertificateServiceClient;
use latch_proto::ca::create_certificate_request::Proof;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::bundle::{BundleError, TrustBundle};
use crate::csr::{CsrError, generate_csr};
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
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Refused {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// A connection to the control plane's certificate service.
#[derive(Debug, Clone)]
pub struct CaClient {
    inner: CertificateServiceClient<Channel>,
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
        let tls = client_config(present_svid.then_some(store), verifier, &[ALPN_H2])?;
        Self::connect_with(addr, tls).await
    }

    /// Connects with a ready rustls config (tests use this to present arbitrary certificates).
    pub async fn connect_with(addr: &str, tls: rustls::ClientConfig) -> Result<Self, ClientError> {
        let channel = connect_channel(addr, tls, Some(Duration::from_secs(30))).await?;
        Ok(Self {
            inner: CertificateServiceClient::new(channel),
        })
    }

    /// Sends one CreateCertificate request as given.
    pub async fn create_certificate(
        &mut self,
        request: CreateCertificateRequest,
    ) -> Result<latch_proto::ca::CreateCertificateResponse, tonic::Status> {
        Ok(self.inner.create_certificate(request).await?.into_inner())
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
        svid_from_response(response, request.key)
    }
}

/// Checks a CreateCertificate response against the bundle it carries and pairs it with `key`.
pub fn svid_from_response(
    response: latch_proto::ca::CreateCertificateResponse,
    key: PrivatePkcs8KeyDer<'static>,
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
    verify_svid(&chain, &bundle, SystemTime::now(), PeerRole::Client)?;
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
