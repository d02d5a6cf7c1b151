//! X509-SVIDs: validation per the SPIFFE X509-SVID specification, and `Svid`, a private key with
//! its certificate chain ready for rustls. The verifiers, the control plane's renewal check and
//! the proxy's identity agent all validate through `verify_svid`.

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
    #[error("certificate for {id} was issued before {id} was revoked at {revoked_at}")]
    Revoked { id: SpiffeId, revoked_at: String },
}

/// How far the control plane backdates a leaf's NotBefore against clock skew (docs/architecture.md,
/// "The CA"): a leaf was issued at its NotBefore plus this.
pub const LEAF_BACKDATE: Duration = Duration::from_secs(5 * 60);

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
    /// When the control plane issued it: NotBefore plus `LEAF_BACKDATE`. What a revocation
    /// is compared with.
    pub fn issued_at(&self) -> SystemTime {
        self.not_before + LEAF_BACKDATE
    }

    /// Parses a leaf certificate and checks the X509-SVID leaf rules (one SPIFFE URI SAN,
    /// CA:false, critical keyUsage with digitalSignature and without keyCertSign/cRLSign).
    /// Does not check the chain or the time.
    pub fn from_leaf(der: &[u8]) -> Result<Self, SvidError> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(SvidError::Malformed(format!(
                "{} bytes of trailing data after the certificate",
                rest.len()
            )));
        }
        let id = leaf_spiffe_id(&cert)?;
        check_leaf_extensions(&cert)?;
        let validity = cert.validity();
        Ok(Self {
            id,
            serial: crate::hex::encode(cert.raw_serial()),
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
        crate::crypto::provider()
            .signature_verification_algorithms
            .all,
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
            &crate::crypto::provider(),
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

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa,
        KeyUsagePurpose, SanType, SerialNumber,
    };

    use super::*;
    use crate::spiffe_id::SpiffeIdError;
    use crate::testing::{Ca, HOUR, at, leaf_params, spiffe_id, uri_sans};

    const PATH: &str = "/ns/demo/sa/web";

    fn verify(chain: &[CertificateDer<'_>], bundle: &TrustBundle, role: PeerRole) -> SvidResult {
        verify_svid(chain, bundle, SystemTime::now(), role)
    }

    type SvidResult = Result<SvidInfo, SvidError>;

    #[test]
    fn conforming_leaf_verifies_for_both_roles() {
        let root = Ca::root("Latch Root");
        let (not_before, not_after) = (at(-HOUR), at(2 * HOUR));
        let mut params = leaf_params(PATH);
        params.serial_number = Some(SerialNumber::from_slice(&[0x0a, 0x1b, 0x2c]));
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let leaf = root.sign(&params);
        let want = SvidInfo {
            id: spiffe_id(PATH),
            serial: "0a1b2c".to_string(),
            not_before,
            not_after,
        };

        assert_eq!(SvidInfo::from_leaf(&leaf.cert).unwrap(), want);
        for role in [PeerRole::Server, PeerRole::Client] {
            let info = verify(&leaf.chain(&[]), &root.bundle(), role)
                .unwrap_or_else(|e| panic!("{role:?}: {e}"));
            assert_eq!(info, want, "{role:?}");
        }
        assert_eq!(want.lifetime(), Duration::from_secs(3 * 3600));
    }

    #[test]
    fn chain_through_intermediate_needs_the_intermediate() {
        let root = Ca::root("Latch Root");
        let intermediate = root.intermediate("Latch Intermediate");
        let leaf = intermediate.sign(&leaf_params(PATH));

        let info = verify(
            &leaf.chain(&[&intermediate]),
            &root.bundle(),
            PeerRole::Server,
        )
        .expect("leaf + intermediate chains to the root");
        assert_eq!(info.id, spiffe_id(PATH));

        let err = verify(&leaf.chain(&[]), &root.bundle(), PeerRole::Server).unwrap_err();
        assert!(
            matches!(&err, SvidError::Chain { id, .. } if *id == spiffe_id(PATH)),
            "{err:?}"
        );
    }

    #[test]
    fn bundle_with_two_roots_accepts_leaves_of_either() {
        // Same subject name, as when a root is rotated; only the keys differ.
        let old = Ca::root("Latch Root");
        let new = Ca::root("Latch Root");
        let bundle = TrustBundle::new(vec![old.cert(), new.cert()]).unwrap();
        for (name, ca) in [("old", &old), ("new", &new)] {
            let leaf = ca.sign(&leaf_params(PATH));
            let info = verify(&leaf.chain(&[]), &bundle, PeerRole::Client)
                .unwrap_or_else(|e| panic!("leaf from {name} root: {e}"));
            assert_eq!(info.id, spiffe_id(PATH));
        }
    }

    #[test]
    fn leaf_from_foreign_root_is_refused() {
        let root = Ca::root("Latch Root");
        let foreign = Ca::root("Latch Root"); // same name, different key
        let leaf = foreign.sign(&leaf_params(PATH));
        let err = verify(&leaf.chain(&[]), &root.bundle(), PeerRole::Server).unwrap_err();
        assert!(
            matches!(&err, SvidError::Chain { id, .. } if *id == spiffe_id(PATH)),
            "{err:?}"
        );
    }

    fn leaf_valid_between(
        root: &Ca,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Vec<CertificateDer<'static>> {
        let mut params = leaf_params(PATH);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        root.sign(&params).chain(&[])
    }

    #[test]
    fn expired_and_not_yet_valid_leaves_are_refused() {
        let root = Ca::root("Latch Root");

        let not_after = at(-HOUR);
        let expired = leaf_valid_between(&root, at(-2 * HOUR), not_after);
        let err = verify(&expired, &root.bundle(), PeerRole::Server).unwrap_err();
        assert!(
            matches!(&err, SvidError::Expired { id, not_after: t }
                if *id == spiffe_id(PATH) && *t == format_time(not_after)),
            "{err:?}"
        );

        let not_before = at(HOUR);
        let early = leaf_valid_between(&root, not_before, at(2 * HOUR));
        let err = verify(&early, &root.bundle(), PeerRole::Server).unwrap_err();
        assert!(
            matches!(&err, SvidError::NotYetValid { id, not_before: t }
                if *id == spiffe_id(PATH) && *t == format_time(not_before)),
            "{err:?}"
        );
    }

    #[test]
    fn validity_window_is_inclusive_at_both_ends() {
        let root = Ca::root("Latch Root");
        let (not_before, not_after) = (at(-HOUR), at(HOUR));
        let chain = leaf_valid_between(&root, not_before, not_after);
        let second = Duration::from_secs(1);
        let check = |now| verify_svid(&chain, &root.bundle(), now, PeerRole::Server);

        assert!(check(not_before).is_ok());
        assert!(check(not_after).is_ok());
        assert!(matches!(
            check(not_before - second),
            Err(SvidError::NotYetValid { .. })
        ));
        assert!(matches!(
            check(not_after + second),
            Err(SvidError::Expired { .. })
        ));
    }

    /// A keyUsage extension with only digitalSignature, left non-critical (rcgen always
    /// marks its own keyUsage critical).
    fn non_critical_key_usage(params: &mut CertificateParams) {
        params.key_usages.clear();
        // BIT STRING, 7 unused bits, bit 0 (digitalSignature) set.
        let ext = CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
        assert!(!ext.criticality());
        params.custom_extensions.push(ext);
    }

    #[test]
    fn leaf_rules_are_enforced() {
        type Case = (
            &'static str,
            fn(&mut CertificateParams),
            fn(&SvidError) -> bool,
        );
        let cases: Vec<Case> = vec![
            (
                "leaf is a CA",
                |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
                |e| matches!(e, SvidError::LeafIsCa),
            ),
            (
                "DNS SAN only",
                |p| p.subject_alt_names = vec![SanType::DnsName("web.test".try_into().unwrap())],
                |e| matches!(e, SvidError::NoUriSan),
            ),
            (
                "no SAN at all",
                |p| p.subject_alt_names.clear(),
                |e| matches!(e, SvidError::NoUriSan),
            ),
            (
                "two URI SANs",
                |p| {
                    p.subject_alt_names =
                        uri_sans(&["spiffe://test.latch/a", "spiffe://test.latch/b"])
                },
                |e| matches!(e, SvidError::MultipleUriSans(2)),
            ),
            (
                "uppercase trust domain",
                |p| p.subject_alt_names = uri_sans(&["spiffe://TD/x"]),
                |e| {
                    matches!(e, SvidError::BadSpiffeId { uri, source }
                    if uri == "spiffe://TD/x"
                        && *source == SpiffeIdError::BadTrustDomainChar { ch: 'T', pos: 9 })
                },
            ),
            (
                "not a spiffe URI",
                |p| p.subject_alt_names = uri_sans(&["https://x"]),
                |e| {
                    matches!(e, SvidError::BadSpiffeId { uri, source }
                    if uri == "https://x" && *source == SpiffeIdError::WrongScheme)
                },
            ),
            (
                "no keyUsage",
                |p| p.key_usages.clear(),
                |e| matches!(e, SvidError::MissingKeyUsage),
            ),
            ("keyUsage not critical", non_critical_key_usage, |e| {
                matches!(e, SvidError::KeyUsageNotCritical)
            }),
            (
                "keyUsage keyCertSign",
                |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign),
                |e| matches!(e, SvidError::LeafCanSign),
            ),
            (
                "keyUsage cRLSign",
                |p| p.key_usages.push(KeyUsagePurpose::CrlSign),
                |e| matches!(e, SvidError::LeafCanSign),
            ),
            (
                "keyUsage without digitalSignature",
                |p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment],
                |e| matches!(e, SvidError::NoDigitalSignature),
            ),
        ];
        let root = Ca::root("Latch Root");
        for (name, break_rule, is_expected) in cases {
            let mut params = leaf_params(PATH);
            break_rule(&mut params);
            let leaf = root.sign(&params);

            let err = SvidInfo::from_leaf(&leaf.cert).expect_err(name);
            assert!(is_expected(&err), "{name}: from_leaf gave {err:?}");
            let err = verify(&leaf.chain(&[]), &root.bundle(), PeerRole::Server).expect_err(name);
            assert!(is_expected(&err), "{name}: verify_svid gave {err:?}");
        }
    }

    #[test]
    fn empty_and_malformed_chains_are_refused() {
        let root = Ca::root("Latch Root");
        let bundle = root.bundle();
        let err = verify(&[], &bundle, PeerRole::Server).unwrap_err();
        assert!(matches!(err, SvidError::EmptyChain), "{err:?}");

        let good = root.sign(&leaf_params(PATH)).cert;
        let truncated = CertificateDer::from(good[..good.len() / 2].to_vec());
        let garbage = CertificateDer::from(b"not a certificate".to_vec());
        let trailing = CertificateDer::from([&good[..], b"junk"].concat());
        for (name, der) in [
            ("garbage", garbage),
            ("truncated", truncated),
            ("trailing data", trailing),
        ] {
            let err = SvidInfo::from_leaf(&der).unwrap_err();
            assert!(matches!(err, SvidError::Malformed(_)), "{name}: {err:?}");
            let err = verify(&[der], &bundle, PeerRole::Server).unwrap_err();
            assert!(matches!(err, SvidError::Malformed(_)), "{name}: {err:?}");
        }
    }

    #[test]
    fn extended_key_usage_must_match_the_role() {
        let root = Ca::root("Latch Root");
        for (only, refused_as) in [
            (ExtendedKeyUsagePurpose::ServerAuth, PeerRole::Client),
            (ExtendedKeyUsagePurpose::ClientAuth, PeerRole::Server),
        ] {
            let mut params = leaf_params(PATH);
            params.extended_key_usages = vec![only.clone()];
            let chain = root.sign(&params).chain(&[]);
            let allowed_as = match refused_as {
                PeerRole::Client => PeerRole::Server,
                PeerRole::Server => PeerRole::Client,
            };
            assert!(
                verify(&chain, &root.bundle(), allowed_as).is_ok(),
                "{only:?} as {allowed_as:?}"
            );
            let err = verify(&chain, &root.bundle(), refused_as).unwrap_err();
            assert!(
                matches!(err, SvidError::Chain { .. }),
                "{only:?} as {refused_as:?}: {err:?}"
            );
        }
    }

    #[test]
    fn svid_new_pairs_key_and_chain() {
        let root = Ca::root("Latch Root");
        let intermediate = root.intermediate("Latch Intermediate");
        let leaf = intermediate.sign(&leaf_params(PATH));
        let svid = Svid::new(leaf.chain(&[&intermediate]), leaf.key_der()).unwrap();
        assert_eq!(svid.id(), &spiffe_id(PATH));
        assert_eq!(svid.chain(), leaf.chain(&[&intermediate]).as_slice());
        assert_eq!(svid.certified_key().cert, svid.chain());
        assert_eq!(
            svid.chain_pem()
                .matches("-----BEGIN CERTIFICATE-----")
                .count(),
            2
        );
        assert!(svid.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn svid_new_refuses_a_key_that_does_not_match_the_leaf() {
        let root = Ca::root("Latch Root");
        let leaf = root.sign(&leaf_params(PATH));
        let other = root.sign(&leaf_params(PATH));
        let err = Svid::new(leaf.chain(&[]), other.key_der()).unwrap_err();
        assert!(
            matches!(&err, SvidError::Malformed(m) if m.contains("does not fit")),
            "{err:?}"
        );

        let err = Svid::new(Vec::new(), leaf.key_der()).unwrap_err();
        assert!(matches!(err, SvidError::EmptyChain), "{err:?}");
    }

    #[test]
    fn svid_new_refuses_a_leaf_that_is_not_an_svid() {
        let root = Ca::root("Latch Root");
        let mut params = leaf_params(PATH);
        params.subject_alt_names.clear();
        let leaf = root.sign(&params);
        let err = Svid::new(leaf.chain(&[]), leaf.key_der()).unwrap_err();
        assert!(matches!(err, SvidError::NoUriSan), "{err:?}");
    }

    #[test]
    fn rustls_errors_keep_the_meaning() {
        use rustls::CertificateError as C;
        let id = spiffe_id(PATH);
        let cert_error = |e: SvidError| match e.to_rustls() {
            rustls::Error::InvalidCertificate(c) => c,
            other => panic!("{other:?}"),
        };
        let expired = SvidError::Expired {
            id: id.clone(),
            not_after: String::new(),
        };
        assert_eq!(cert_error(expired), C::Expired);
        let early = SvidError::NotYetValid {
            id: id.clone(),
            not_before: String::new(),
        };
        assert_eq!(cert_error(early), C::NotValidYet);
        assert_eq!(cert_error(SvidError::EmptyChain), C::BadEncoding);
        assert_eq!(
            cert_error(SvidError::Malformed(String::new())),
            C::BadEncoding
        );

        let chain = SvidError::Chain {
            id: id.clone(),
            reason: "r".into(),
        };
        let C::Other(other) = cert_error(chain) else {
            panic!("Chain should map to Other")
        };
        let inner = other.0.downcast_ref::<SvidError>();
        assert!(
            matches!(inner, Some(SvidError::Chain { id: got, .. }) if *got == id),
            "{inner:?}"
        );
    }
}
