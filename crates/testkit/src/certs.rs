//! Certificates for tests without a control plane: a throwaway root CA (rcgen) and an
//! X509-SVID it signed, for tests that need real certificates but no CA service. Used by
//! crates/proxy's unit tests and crates/proxy/tests/discovery_client.rs.

use latch_identity::Svid;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

/// A new root CA's PEM and an SVID for `id` it signed.
pub fn ca_and_svid(id: &str) -> (String, Svid) {
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
