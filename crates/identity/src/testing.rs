//! Fixtures for this crate's unit tests: throwaway CAs and X509-SVID leaves built with rcgen
//! (spec-conforming by default, with every knob open so a test can break one rule), and an
//! in-memory pump that drives real rustls handshakes between two connections without sockets.
//! Compiled only for tests; used by the `svid`, `verifier` and `store` test modules.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{ClientConnection, Connection, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use crate::bundle::TrustBundle;
use crate::spiffe_id::SpiffeId;
use crate::store::CertStore;
use crate::svid::{Svid, SvidError};
use crate::tls;
use crate::verifier::{ClientAuth, ExpectedPeer, SpiffeClientVerifier, SpiffeServerVerifier};

pub(crate) const TRUST_DOMAIN: &str = "test.latch";
pub(crate) const HOUR: i64 = 3600;

/// `spiffe://test.latch<path>`.
pub(crate) fn spiffe_id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}{path}")).expect("test SPIFFE ID")
}

/// Now plus `offset_secs`, in whole seconds (X.509 times have one-second precision).
pub(crate) fn at(offset_secs: i64) -> SystemTime {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    UNIX_EPOCH + Duration::from_secs(now.saturating_add_signed(offset_secs))
}

/// URI SANs exactly as given (no validation, so tests can write bad ones).
pub(crate) fn uri_sans(uris: &[&str]) -> Vec<SanType> {
    uris.iter()
        .map(|u| SanType::URI((*u).try_into().expect("ASCII URI")))
        .collect()
}

/// A leaf that follows the X509-SVID spec: one URI SAN `spiffe://test.latch<path>`,
/// CA:false, critical keyUsage digitalSignature, extKeyUsage serverAuth + clientAuth, valid
/// from an hour ago to an hour from now.
pub(crate) fn leaf_params(path: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uri_sans(&[spiffe_id(path).as_str()]);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = at(-HOUR).into();
    params.not_after = at(HOUR).into();
    params
}

/// A certificate authority (root or intermediate) that can sign leaves and sub-CAs.
pub(crate) struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert: CertificateDer<'static>,
}

impl Ca {
    /// A self-signed root. Two roots may share a name (as during a root rotation); they
    /// differ by key.
    pub(crate) fn root(name: &str) -> Self {
        let (params, key) = ca_params(name);
        let cert = params
            .self_signed(&key)
            .expect("self-sign root")
            .der()
            .clone();
        Self { params, key, cert }
    }

    /// An intermediate CA signed by this one.
    pub(crate) fn intermediate(&self, name: &str) -> Self {
        let (params, key) = ca_params(name);
        let cert = params
            .signed_by(&key, &self.issuer())
            .expect("sign intermediate")
            .der()
            .clone();
        Self { params, key, cert }
    }

    pub(crate) fn cert(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// A trust bundle holding only this CA.
    pub(crate) fn bundle(&self) -> TrustBundle {
        TrustBundle::new(vec![self.cert()]).expect("bundle of one root")
    }

    /// Signs `params` for a fresh ECDSA P-256 key.
    pub(crate) fn sign(&self, params: &CertificateParams) -> Leaf {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate key");
        let cert = params
            .signed_by(&key, &self.issuer())
            .expect("sign leaf")
            .der()
            .clone();
        Leaf { cert, key }
    }

    /// A spec-conforming SVID for `spiffe://test.latch<path>`, chain = leaf only.
    pub(crate) fn svid(&self, path: &str) -> Svid {
        self.sign(&leaf_params(path)).svid(&[])
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }
}

fn ca_params(name: &str) -> (CertificateParams, KeyPair) {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = uri_sans(&[&format!("spiffe://{TRUST_DOMAIN}")]);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = at(-24 * HOUR).into();
    params.not_after = at(24 * HOUR).into();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate CA key");
    (params, key)
}

/// A signed leaf certificate and its key.
pub(crate) struct Leaf {
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) key: KeyPair,
}

impl Leaf {
    pub(crate) fn key_der(&self) -> PrivatePkcs8KeyDer<'static> {
        self.key.serialize_der().into()
    }

    /// Leaf first, then `intermediates`.
    pub(crate) fn chain(&self, intermediates: &[&Ca]) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.cert.clone())
            .chain(intermediates.iter().map(|ca| ca.cert()))
            .collect()
    }

    pub(crate) fn svid(&self, intermediates: &[&Ca]) -> Svid {
        Svid::new(self.chain(intermediates), self.key_der()).expect("valid test SVID")
    }
}

/// A TLS server verifying clients with `auth`, presenting `store`'s SVID.
pub(crate) fn server(store: &Arc<CertStore>, auth: ClientAuth) -> Connection {
    let verifier = Arc::new(SpiffeClientVerifier::new(store.clone(), auth));
    let config = tls::server_config(store.clone(), verifier, &[]).expect("server config");
    Connection::Server(ServerConnection::new(Arc::new(config)).expect("server connection"))
}

/// A TLS client verifying the server against `store`'s bundle and presenting its SVID.
pub(crate) fn client(store: &Arc<CertStore>, expected: ExpectedPeer) -> Connection {
    client_with(store, Some(store.clone()), expected)
}

/// A TLS client verifying the server against `store`'s bundle that presents no certificate.
pub(crate) fn anonymous_client(store: &Arc<CertStore>, expected: ExpectedPeer) -> Connection {
    client_with(store, None, expected)
}

fn client_with(
    verify_with: &Arc<CertStore>,
    present: Option<Arc<CertStore>>,
    expected: ExpectedPeer,
) -> Connection {
    let verifier = Arc::new(SpiffeServerVerifier::new(verify_with.clone(), expected));
    let config = tls::client_config(present, verifier, &[]).expect("client config");
    let conn = ClientConnection::new(Arc::new(config), tls::placeholder_server_name())
        .expect("client connection");
    Connection::Client(conn)
}

/// Which side gave up on the handshake, and why.
#[derive(Debug)]
pub(crate) enum Failed {
    Client(rustls::Error),
    Server(rustls::Error),
}

impl Failed {
    pub(crate) fn by_client(self) -> rustls::Error {
        match self {
            Failed::Client(e) => e,
            Failed::Server(e) => panic!("expected the client to fail, the server did: {e}"),
        }
    }

    pub(crate) fn by_server(self) -> rustls::Error {
        match self {
            Failed::Server(e) => e,
            Failed::Client(e) => panic!("expected the server to fail, the client did: {e}"),
        }
    }
}

/// The `SvidError` a SPIFFE verifier wrapped into a rustls error, if that is what it is.
pub(crate) fn svid_error(e: &rustls::Error) -> Option<&SvidError> {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

/// A client and a server connection wired back to back through memory.
pub(crate) struct Pair {
    pub(crate) client: Connection,
    pub(crate) server: Connection,
}

impl Pair {
    pub(crate) fn new(client: Connection, server: Connection) -> Self {
        Self { client, server }
    }

    /// Moves records both ways until both sides finish the handshake or one of them fails.
    pub(crate) fn handshake(&mut self) -> Result<(), Failed> {
        for _ in 0..10 {
            transfer(&mut self.client, &mut self.server);
            self.server.process_new_packets().map_err(Failed::Server)?;
            transfer(&mut self.server, &mut self.client);
            self.client.process_new_packets().map_err(Failed::Client)?;
            if !self.client.is_handshaking() && !self.server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake neither finished nor failed after 10 round trips")
    }

    /// Sends `msg` client -> server and returns the plaintext the server read.
    pub(crate) fn client_to_server(&mut self, msg: &[u8]) -> Vec<u8> {
        send(&mut self.client, &mut self.server, msg)
    }

    /// Sends `msg` server -> client and returns the plaintext the client read.
    pub(crate) fn server_to_client(&mut self, msg: &[u8]) -> Vec<u8> {
        send(&mut self.server, &mut self.client, msg)
    }
}

fn transfer(from: &mut Connection, to: &mut Connection) {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).expect("write to Vec");
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("read from slice");
    }
}

fn send(from: &mut Connection, to: &mut Connection, msg: &[u8]) -> Vec<u8> {
    from.writer().write_all(msg).expect("buffer plaintext");
    transfer(from, to);
    to.process_new_packets().expect("decrypt records");
    let mut got = vec![0; msg.len() + 64];
    let n = to.reader().read(&mut got).expect("plaintext available");
    got.truncate(n);
    got
}
