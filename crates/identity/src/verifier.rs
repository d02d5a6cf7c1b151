//! SPIFFE-aware rustls verifiers. Both read the trust bundle from the `CertStore` at every
//! handshake, validate the peer's chain as an X509-SVID (`svid::verify_svid`) and can insist on
//! one expected SPIFFE ID. DNS names are never consulted: identity is the URI SAN.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::CertStore;
use crate::svid::{PeerRole, SvidError, SvidInfo, verify_svid};

/// Which peer identities a verifier accepts, once the chain is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Any SPIFFE ID whose SVID chains to the bundle.
    AnyInBundle,
    /// Any SPIFFE ID of this trust domain.
    TrustDomain(TrustDomain),
    /// Exactly this SPIFFE ID.
    Exactly(SpiffeId),
}

impl ExpectedPeer {
    fn check(&self, id: &SpiffeId) -> Result<(), SvidError> {
        let ok = match self {
            ExpectedPeer::AnyInBundle => true,
            ExpectedPeer::TrustDomain(td) => id.is_member_of(td),
            ExpectedPeer::Exactly(want) => want == id,
        };
        if ok {
            Ok(())
        } else {
            Err(SvidError::UnexpectedId {
                expected: self.to_string(),
                got: id.clone(),
            })
        }
    }
}

impl std::fmt::Display for ExpectedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedPeer::AnyInBundle => f.write_str("any SPIFFE ID in the trust bundle"),
            ExpectedPeer::TrustDomain(td) => write!(f, "an ID in trust domain {td}"),
            ExpectedPeer::Exactly(id) => write!(f, "{id}"),
        }
    }
}

fn to_unix(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs())
}

fn verify_peer(
    store: &CertStore,
    expected: &ExpectedPeer,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    role: PeerRole,
) -> Result<SvidInfo, SvidError> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let info = verify_svid(&chain, &store.bundle(), to_unix(now), role)?;
    expected.check(&info.id)?;
    Ok(info)
}

fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &crate::tls::provider().signature_verification_algorithms,
    )
}

fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General(
        "TLS 1.2 is disabled: Latch speaks TLS 1.3 only".into(),
    ))
}

fn schemes() -> Vec<SignatureScheme> {
    crate::tls::provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// Verifies servers, for clients: the server's SVID must chain to the bundle and match
/// `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    store: Arc<CertStore>,
    expected: ExpectedPeer,
}

impl SpiffeServerVerifier {
    pub fn new(store: Arc<CertStore>, expected: ExpectedPeer) -> Self {
        Self { store, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_peer(
            &self.store,
            &self.expected,
            end_entity,
            intermediates,
            now,
            PeerRole::Server,
        )
        .map_err(|e| e.to_rustls())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// How a server treats client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// A valid client SVID matching the expectation is required at the handshake.
    Required(ExpectedPeer),
    /// A client certificate is optional and only proof of key possession is checked at the
    /// handshake; the application validates the chain itself (`svid::verify_svid`) so that it
    /// can answer an expired or foreign certificate with a precise error instead of a TLS
    /// alert. Used by the certificate service, where renewal callers present their SVID.
    Deferred,
}

/// Verifies clients, for servers.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    store: Arc<CertStore>,
    auth: ClientAuth,
}

impl SpiffeClientVerifier {
    pub fn new(store: Arc<CertStore>, auth: ClientAuth) -> Self {
        Self { store, auth }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        matches!(self.auth, ClientAuth::Required(_))
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match &self.auth {
            ClientAuth::Required(expected) => {
                verify_peer(
                    &self.store,
                    expected,
                    end_entity,
                    intermediates,
                    now,
                    PeerRole::Client,
                )
                .map_err(|e| e.to_rustls())?;
            }
            ClientAuth::Deferred => {}
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// The SPIFFE ID in a verified peer's leaf certificate (`peer_certificates()` of a finished
/// handshake); `None` when the peer sent no certificate or it carries no valid ID.
pub fn peer_spiffe_id(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = peer_certificates?.first()?;
    SvidInfo::from_leaf(leaf).ok().map(|info| info.id)
}
