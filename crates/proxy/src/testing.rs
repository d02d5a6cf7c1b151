//! Fixtures for this crate's unit tests: a throwaway root CA (rcgen) and an X509-SVID it signed,
//! so discovery's bundle checks and the data path's TLS setup have real certificates.
//! Compiled only for tests.

use latch_identity::{CertStore, Svid, TrustBundle};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

/// A new root CA's PEM and an SVID for `id` it signed.
pub(crate) fn ca_and_svid(id: &str) -> (String, Svid) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("self-signed CA");
    let key = KeyPair::generate().expect("leaf key");
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(id.try_into().expect("ASCII ID"))];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf_cert = leaf
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .expect("signed leaf");
    let svid = Svid::new(
        vec![CertificateDer::from(leaf_cert.der().to_vec())],
        PrivatePkcs8KeyDer::from(key.serialize_der()),
    )
    .expect("valid SVID");
    (ca_cert.pem(), svid)
}

/// A store holding an SVID for `id`, and the PEM of the CA that signed it.
pub(crate) fn store_with_svid(id: &str) -> (CertStore, String) {
    let (pem, svid) = ca_and_svid(id);
    let bundle = TrustBundle::from_pem(pem.as_bytes()).expect("bundle");
    (CertStore::with_svid(svid, bundle), pem)
}
