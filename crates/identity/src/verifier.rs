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
    store.revocations().check(&info)?;
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
        &crate::crypto::provider().signature_verification_algorithms,
    )
}

fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General(
        "TLS 1.2 is disabled: Latch speaks TLS 1.3 only".into(),
    ))
}

fn schemes() -> Vec<SignatureScheme> {
    crate::crypto::provider()
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

/// The peer's leaf certificate as an SVID (`peer_certificates()` of a finished handshake): its
/// SPIFFE ID and times; `None` when the peer sent no certificate or it carries no valid ID.
/// Only an identity once the chain was validated: by a `Required` verifier at the handshake,
/// or by `verify_svid` when the server uses `ClientAuth::Deferred`.
pub fn peer_svid(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<SvidInfo> {
    SvidInfo::from_leaf(peer_certificates?.first()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Ca, Pair, anonymous_client, client, server, spiffe_id, svid_error};

    const SERVER: &str = "/ns/demo/sa/server";
    const CLIENT: &str = "/ns/demo/sa/client";

    fn store(ca: &Ca, path: &str, trusts: &Ca) -> Arc<CertStore> {
        Arc::new(CertStore::with_svid(ca.svid(path), trusts.bundle()))
    }

    #[test]
    fn expected_peer_matches_ids() {
        let td = TrustDomain::new("test.latch").unwrap();
        let other_td = TrustDomain::new("other.latch").unwrap();
        let web = spiffe_id("/ns/demo/sa/web");
        let cases = [
            (ExpectedPeer::AnyInBundle, true),
            (ExpectedPeer::TrustDomain(td), true),
            (ExpectedPeer::TrustDomain(other_td), false),
            (ExpectedPeer::Exactly(web.clone()), true),
            (ExpectedPeer::Exactly(spiffe_id("/ns/demo/sa/db")), false),
        ];
        for (expected, ok) in cases {
            match expected.check(&web) {
                Ok(()) => assert!(ok, "{expected:?} accepted {web}"),
                Err(SvidError::UnexpectedId {
                    expected: shown,
                    got,
                }) => {
                    assert!(!ok, "{expected:?} refused {web}");
                    assert_eq!(shown, expected.to_string());
                    assert_eq!(got, web);
                }
                Err(e) => panic!("{expected:?}: {e:?}"),
            }
        }
    }

    #[test]
    fn mutual_tls_with_exact_ids() {
        let root = Ca::root("Latch Root");
        let server_store = store(&root, SERVER, &root);
        let client_store = store(&root, CLIENT, &root);
        let mut pair = Pair::new(
            client(&client_store, ExpectedPeer::Exactly(spiffe_id(SERVER))),
            server(
                &server_store,
                ClientAuth::Required(ExpectedPeer::Exactly(spiffe_id(CLIENT))),
            ),
        );
        pair.handshake().expect("handshake");

        assert_eq!(
            peer_svid(pair.client.peer_certificates()).map(|info| info.id),
            Some(spiffe_id(SERVER))
        );
        assert_eq!(
            peer_svid(pair.server.peer_certificates()).map(|info| info.id),
            Some(spiffe_id(CLIENT))
        );
        assert_eq!(
            pair.client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(pair.client_to_server(b"ping"), b"ping");
        assert_eq!(pair.server_to_client(b"pong"), b"pong");
    }

    #[test]
    fn unexpected_peer_id_fails_the_handshake() {
        let root = Ca::root("Latch Root");
        let server_store = store(&root, SERVER, &root);
        let client_store = store(&root, CLIENT, &root);
        let other = spiffe_id("/ns/demo/sa/other");

        // The client wants another server.
        let err = Pair::new(
            client(&client_store, ExpectedPeer::Exactly(other.clone())),
            server(
                &server_store,
                ClientAuth::Required(ExpectedPeer::AnyInBundle),
            ),
        )
        .handshake()
        .unwrap_err()
        .by_client();
        assert!(
            matches!(svid_error(&err), Some(SvidError::UnexpectedId { expected, got })
                if *expected == other.to_string() && *got == spiffe_id(SERVER)),
            "{err:?}"
        );

        // The server wants another client.
        let err = Pair::new(
            client(&client_store, ExpectedPeer::AnyInBundle),
            server(
                &server_store,
                ClientAuth::Required(ExpectedPeer::Exactly(other)),
            ),
        )
        .handshake()
        .unwrap_err()
        .by_server();
        assert!(
            matches!(svid_error(&err), Some(SvidError::UnexpectedId { got, .. })
                if *got == spiffe_id(CLIENT)),
            "{err:?}"
        );
    }

    #[test]
    fn required_client_auth_refuses_missing_and_foreign_certs() {
        let root = Ca::root("Latch Root");
        let foreign = Ca::root("Latch Root");
        let server_store = store(&root, SERVER, &root);
        let required = || {
            server(
                &server_store,
                ClientAuth::Required(ExpectedPeer::AnyInBundle),
            )
        };

        let err = Pair::new(
            anonymous_client(&server_store, ExpectedPeer::AnyInBundle),
            required(),
        )
        .handshake()
        .unwrap_err()
        .by_server();
        assert_eq!(err, rustls::Error::NoCertificatesPresented);

        // The foreign client trusts our root, so only the server's check can stop it.
        let foreign_store = store(&foreign, CLIENT, &root);
        let err = Pair::new(
            client(&foreign_store, ExpectedPeer::AnyInBundle),
            required(),
        )
        .handshake()
        .unwrap_err()
        .by_server();
        assert!(
            matches!(svid_error(&err), Some(SvidError::Chain { id, .. }) if *id == spiffe_id(CLIENT)),
            "{err:?}"
        );
    }

    #[test]
    fn deferred_client_auth_hands_any_cert_to_the_application() {
        let root = Ca::root("Latch Root");
        let foreign = Ca::root("Latch Root");
        let server_store = store(&root, SERVER, &root);
        let foreign_store = store(&foreign, CLIENT, &root);

        let mut pair = Pair::new(
            client(&foreign_store, ExpectedPeer::AnyInBundle),
            server(&server_store, ClientAuth::Deferred),
        );
        pair.handshake()
            .expect("deferred auth lets a foreign cert through");
        let presented = pair
            .server
            .peer_certificates()
            .expect("client cert")
            .to_vec();
        let foreign_svid = foreign_store.svid().unwrap();
        assert_eq!(presented, foreign_svid.chain());
        assert_eq!(pair.client_to_server(b"renew me"), b"renew me");
        // ...and the application's own check refuses it with a precise error.
        let err = verify_svid(
            &presented,
            &server_store.bundle(),
            SystemTime::now(),
            PeerRole::Client,
        )
        .unwrap_err();
        assert!(matches!(err, SvidError::Chain { .. }), "{err:?}");

        // Without a client certificate the handshake succeeds and there is no peer ID.
        let mut pair = Pair::new(
            anonymous_client(&server_store, ExpectedPeer::AnyInBundle),
            server(&server_store, ClientAuth::Deferred),
        );
        pair.handshake()
            .expect("deferred auth allows no client cert");
        assert_eq!(
            peer_svid(pair.server.peer_certificates()).map(|info| info.id),
            None
        );
        assert_eq!(
            peer_svid(pair.client.peer_certificates()).map(|info| info.id),
            Some(spiffe_id(SERVER))
        );
    }
}
