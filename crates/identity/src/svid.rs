//! X509-SVIDs: validation per the SPIFFE X509-SVID specification, and `Svid`, a private key with
//! its certificate chain ready for rustls. The verifiers, the control plane's renewal check and
//! the proxy's identity agent all validate through `verify_svid`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use thiserror::Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::TrustBundle;
use crate::spiffe_id::{SpiffeId, SpiffeIdError};

/// Why a certificate chain is not an acceptable X509-SVID.
#[derive(Debug, Clone, Error)]
pub enum SvidError {
    #[error("no certificate was presented")]
    EmptyChain,
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("leaf certificate has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    #[error("leaf certificate has {0} URI SANs; an X509-SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("leaf certificate's URI SAN {uri:?} is not a SPIFFE ID: {source}")]
    BadSpiffeId { uri: String, source: SpiffeIdError },
    #[error("a CA certificate (basicConstraints CA:true) is not accepted as a leaf SVID")]
    LeafIsCa,
    #[error("leaf certificate has no keyUsage extension; an X509-SVID needs digitalSignature")]
    MissingKeyUsage,
    #[error("leaf certificate's keyUsage extension is not marked critical")]
    KeyUsageNotCritical,
    #[error("leaf certificate's keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error(
        "leaf certificate's keyUsage allows keyCertSign or cRLSign, which a leaf SVID must not"
    )]
    LeafCanSign,
    #[error("certificate for {id} expired at {not_after}")]
    Expired { id: SpiffeId, not_after: String },
    #[error("certificate for {id} is not valid before {not_before} (check the clocks)")]
    NotYetValid { id: SpiffeId, not_before: String },
    #[error("certificate for {id} does not chain to the trust bundle: {reason}")]
    Chain { id: SpiffeId, reason: String },
    #[error("peer presented {got}, expected {expected}")]
    UnexpectedId { expected: String, got: SpiffeId },
}

impl SvidError {
    /// The closest rustls error, so TLS alerts stay meaningful on the wire.
    pub fn to_rustls(&self) -> rustls::Error {
        use rustls::CertificateError as C;
        let cert_error = match self {
            SvidError::Expired { .. } => C::Expired,
            SvidError::NotYetValid { .. } => C::NotValidYet,
            SvidError::Malformed(_) | SvidError::EmptyChain => C::BadEncoding,
            other => C::Other(rustls::OtherError(Arc::new(other.clone()))),
        };
        rustls::Error::InvalidCertificate(cert_error)
    }
}

/// Which end of a TLS connection the SVID authenticates (checked against extKeyUsage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Server,
    Client,
}

/// What a leaf certificate says about itself: its identity and validity window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    pub id: SpiffeId,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl SvidInfo {
    /// Parses a leaf certificate and checks the X509-SVID leaf rules (one SPIFFE URI SAN,
    /// CA:false, critical keyUsage with digitalSignature and without keyCertSign/cRLSign).
    /// Does not check the chain or the time.
    pub fn from_leaf(der: &[u8]) -> Result<Self, SvidError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
        let id = leaf_spiffe_id(&cert)?;
        check_leaf_extensions(&cert)?;
        let validity = cert.validity();
        Ok(Self {
            id,
            serial: hex(cert.raw_serial()),
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
        })
    }

    /// True once `now` is past NotAfter.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now > self.not_after
    }

    /// Total validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }
}

fn to_system_time(unix_seconds: i64) -> SystemTime {
    if unix_seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix_seconds.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs())
    }
}

/// RFC 3339 text for a time, for operator-facing messages.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn leaf_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(|source| SvidError::BadSpiffeId {
            uri: uri.to_string(),
            source,
        }),
        many => Err(SvidError::MultipleUriSans(many.len())),
    }
}

fn check_leaf_extensions(cert: &X509Certificate<'_>) -> Result<(), SvidError> {
    let malformed = |e: x509_parser::error::X509Error| SvidError::Malformed(e.to_string());
    if let Some(bc) = cert.basic_constraints().map_err(malformed)?
        && bc.value.ca
    {
        return Err(SvidError::LeafIsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(malformed)?
        .ok_or(SvidError::MissingKeyUsage)?;
    if !ku.critical {
        return Err(SvidError::KeyUsageNotCritical);
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(SvidError::LeafCanSign);
    }
    Ok(())
}

/// Validates `chain` (leaf first, then intermediates) as an X509-SVID at `now`: leaf rules,
/// validity window, and a path to one of the bundle's roots with the extKeyUsage `role` needs.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
    role: PeerRole,
) -> Result<SvidInfo, SvidError> {
    let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
    let info = SvidInfo::from_leaf(leaf)?;
    if now > info.not_after {
        return Err(SvidError::Expired {
            id: info.id,
            not_after: format_time(info.not_after),
        });
    }
    if now < info.not_before {
        return Err(SvidError::NotYetValid {
            id: info.id,
            not_before: format_time(info.not_before),
        });
    }
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| SvidError::Chain {
        id: info.id.clone(),
        reason: e.to_string(),
    })?;
    let usage = match role {
        PeerRole::Server => webpki::KeyUsage::server_auth(),
        PeerRole::Client => webpki::KeyUsage::client_auth(),
    };
    let seconds = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    ee.verify_for_usage(
        crate::tls::provider().signature_verification_algorithms.all,
        bundle.anchors(),
        &chain[1..],
        UnixTime::since_unix_epoch(seconds),
        usage,
        None,
        None,
    )
    .map_err(|e| SvidError::Chain {
        id: info.id.clone(),
        reason: chain_reason(&e),
    })?;
    Ok(info)
}

fn chain_reason(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => {
            "issuer is not in the trust bundle (signed by another CA, or the bundle is stale)"
                .to_string()
        }
        webpki::Error::CertExpired { .. } => "an intermediate certificate has expired".to_string(),
        other => other.to_string(),
    }
}

/// A workload's own X509-SVID: the private key (PKCS#8, never written anywhere by Latch unless
/// an operator asks for files) and the certificate chain, leaf first.
#[derive(Debug)]
pub struct Svid {
    info: SvidInfo,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    certified: Arc<CertifiedKey>,
}

impl Svid {
    /// Pairs a key with its chain, checking that the key matches the leaf and that the leaf is
    /// a well-formed SVID.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
    ) -> Result<Self, SvidError> {
        let info = SvidInfo::from_leaf(chain.first().ok_or(SvidError::EmptyChain)?)?;
        let certified = CertifiedKey::from_der(
            chain.clone(),
            PrivateKeyDer::Pkcs8(key.clone_key()),
            &crate::tls::provider(),
        )
        .map_err(|e| {
            SvidError::Malformed(format!("private key does not fit the certificate: {e}"))
        })?;
        Ok(Self {
            info,
            chain,
            key,
            certified: Arc::new(certified),
        })
    }

    pub fn info(&self) -> &SvidInfo {
        &self.info
    }

    pub fn id(&self) -> &SpiffeId {
        &self.info.id
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key as unencrypted PKCS#8 DER.
    pub fn private_key(&self) -> &PrivatePkcs8KeyDer<'static> {
        &self.key
    }

    /// The key and chain in the form rustls resolvers hand out.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    /// The chain as concatenated PEM blocks, leaf first.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| crate::pem::encode("CERTIFICATE", c))
            .collect()
    }

    /// The private key as a PKCS#8 PEM block.
    pub fn key_pem(&self) -> String {
        crate::pem::encode("PRIVATE KEY", self.key.secret_pkcs8_der())
    }
}
