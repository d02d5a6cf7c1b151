//! Certificate signing requests, both ends: workloads generate an ECDSA P-256 key and a PKCS#10
//! CSR (`generate_csr`); the CA checks a CSR's self-signature and key type (`verify_csr`) and
//! takes nothing from it but the public key and the URI SANs it asks for.

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::PrivatePkcs8KeyDer;
use thiserror::Error;
use x509_parser::der_parser::oid;
use x509_parser::der_parser::oid::Oid;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509CertificationRequest};

use crate::spiffe_id::SpiffeId;

#[derive(Debug, Error)]
pub enum CsrError {
    #[error("CSR is not valid DER PKCS#10: {0}")]
    Malformed(String),
    #[error("CSR has trailing bytes after the PKCS#10 structure")]
    TrailingBytes,
    #[error("CSR key type {0} is not allowed; use ECDSA P-256, ECDSA P-384 or Ed25519")]
    DisallowedKeyType(String),
    #[error("CSR signature algorithm {algorithm} does not match its {key} key")]
    AlgorithmMismatch { algorithm: String, key: String },
    #[error("CSR self-signature does not verify: the CSR was altered or signed with another key")]
    BadSignature,
    #[error("key generation or CSR encoding failed: {0}")]
    Generate(String),
}

/// Key types a CSR may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ECDSA P-256",
            KeyType::EcdsaP384 => "ECDSA P-384",
            KeyType::Ed25519 => "Ed25519",
        }
    }
}

/// What a verified CSR offers: a public key of an allowed type, and the URI SANs it requests.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    /// DER SubjectPublicKeyInfo.
    pub public_key_spki: Vec<u8>,
    pub key_type: KeyType,
    /// URI SANs requested in the CSR's extensionRequest (possibly none).
    pub requested_uris: Vec<String>,
}

const OID_EC_PUBLIC_KEY: Oid<'static> = oid!(1.2.840.10045.2.1);
const OID_P256: Oid<'static> = oid!(1.2.840.10045.3.1.7);
const OID_P384: Oid<'static> = oid!(1.3.132.0.34);
const OID_ED25519: Oid<'static> = oid!(1.3.101.112);
const OID_ECDSA_SHA256: Oid<'static> = oid!(1.2.840.10045.4.3.2);
const OID_ECDSA_SHA384: Oid<'static> = oid!(1.2.840.10045.4.3.3);

/// The DER SubjectPublicKeyInfo of a `key_type` key up to the key bytes: SEQUENCE, the
/// AlgorithmIdentifier, BIT STRING header (RFC 5480 for ECDSA with uncompressed points, RFC 8410
/// for Ed25519).
fn spki_der_prefix(key_type: KeyType) -> &'static [u8] {
    match key_type {
        KeyType::EcdsaP256 => &[
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ],
        KeyType::EcdsaP384 => &[
            0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x05, 0x2b, 0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
        ],
        KeyType::Ed25519 => &[
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ],
    }
}

/// Parses a DER CSR, checks its key type against the allow-list and its self-signature.
pub fn verify_csr(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingBytes);
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let key_type = if spki.algorithm.algorithm == OID_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_P256 => KeyType::EcdsaP256,
            Some(c) if c == OID_P384 => KeyType::EcdsaP384,
            Some(c) => return Err(CsrError::DisallowedKeyType(format!("EC curve {c}"))),
            None => {
                return Err(CsrError::DisallowedKeyType(
                    "EC key without a named curve".into(),
                ));
            }
        }
    } else if spki.algorithm.algorithm == OID_ED25519 {
        KeyType::Ed25519
    } else {
        return Err(CsrError::DisallowedKeyType(format!(
            "with algorithm OID {}",
            spki.algorithm.algorithm
        )));
    };
    // x509-parser tolerates some non-DER encodings of the SubjectPublicKeyInfo (e.g. another
    // tag where the algorithm OID belongs); the CA re-encodes the key it certifies, so anything
    // but the one DER form of the key type would be signed as something it was not. (Found by
    // the csr fuzz target.)
    let mut der_form = spki_der_prefix(key_type).to_vec();
    der_form.extend_from_slice(&spki.subject_public_key.data);
    if spki.raw != der_form.as_slice() {
        return Err(CsrError::Malformed(format!(
            "the public key is not in the DER form of an {} key",
            key_type.as_str()
        )));
    }
    let sig_oid = &csr.signature_algorithm.algorithm;
    let algorithm: &'static dyn VerificationAlgorithm = match key_type {
        KeyType::EcdsaP256 if *sig_oid == OID_ECDSA_SHA256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyType::EcdsaP384 if *sig_oid == OID_ECDSA_SHA384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyType::Ed25519 if *sig_oid == OID_ED25519 => &signature::ED25519,
        _ => {
            return Err(CsrError::AlgorithmMismatch {
                algorithm: sig_oid.to_string(),
                key: key_type.as_str().to_string(),
            });
        }
    };
    UnparsedPublicKey::new(algorithm, &spki.subject_public_key.data)
        .verify(info.raw, &csr.signature_value.data)
        .map_err(|_| CsrError::BadSignature)?;

    let requested_uris = csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|ext| match ext {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect();
    Ok(VerifiedCsr {
        public_key_spki: spki.raw.to_vec(),
        key_type,
        requested_uris,
    })
}

/// A freshly generated key and the CSR that carries its public key.
pub struct KeyAndCsr {
    pub key: PrivatePkcs8KeyDer<'static>,
    pub csr_der: Vec<u8>,
}

/// Generates an ECDSA P-256 key and a CSR for it. The CSR has an empty subject and, when `id`
/// is given, that ID as its only URI SAN (the CA issues for the authenticated ID regardless).
pub fn generate_csr(id: Option<&SpiffeId>) -> Result<KeyAndCsr, CsrError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CsrError::Generate(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = id {
        let uri = id
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| CsrError::Generate(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    let csr = params
        .serialize_request(&key)
        .map_err(|e| CsrError::Generate(e.to_string()))?;
    Ok(KeyAndCsr {
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        csr_der: csr.der().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PKCS_RSA_SHA256};

    fn csr_with(alg: &'static rcgen::SignatureAlgorithm, uris: &[&str]) -> Vec<u8> {
        csr_with_key(&KeyPair::generate_for(alg).unwrap(), uris)
    }

    fn csr_with_key(key: &KeyPair, uris: &[&str]) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn generated_csr_verifies_and_carries_the_id() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let out = generate_csr(Some(&id)).unwrap();
        let csr = verify_csr(&out.csr_der).unwrap();
        assert_eq!(csr.key_type, KeyType::EcdsaP256);
        assert_eq!(csr.requested_uris, vec![id.to_string()]);
        let none = verify_csr(&generate_csr(None).unwrap().csr_der).unwrap();
        assert!(none.requested_uris.is_empty());
    }

    #[test]
    fn allowed_key_types() {
        assert_eq!(
            verify_csr(&csr_with(&PKCS_ECDSA_P384_SHA384, &[]))
                .unwrap()
                .key_type,
            KeyType::EcdsaP384
        );
        assert_eq!(
            verify_csr(&csr_with(&PKCS_ED25519, &[])).unwrap().key_type,
            KeyType::Ed25519
        );
    }

    #[test]
    fn rsa_is_refused() {
        let key = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        assert!(matches!(
            verify_csr(csr.der()),
            Err(CsrError::DisallowedKeyType(_))
        ));
    }

    #[test]
    fn tampered_csr_fails_signature() {
        let mut der = csr_with(&PKCS_ECDSA_P256_SHA256, &["spiffe://td/a"]);
        // Flip the last character of the requested URI ("a" -> "b") inside the signed part.
        let pos = der.windows(13).position(|w| w == b"spiffe://td/a").unwrap() + 12;
        der[pos] = b'b';
        assert!(matches!(verify_csr(&der), Err(CsrError::BadSignature)));
    }

    /// A PKCS#10 CSR around `info`, signed with the Ed25519 `key`.
    fn ed25519_csr_around(info: &[u8], key: &KeyPair) -> Vec<u8> {
        fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
            let len = u16::try_from(content.len()).unwrap().to_be_bytes();
            [&[tag, 0x82][..], &len, content].concat()
        }
        let algorithm = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
        let signature = rcgen::SigningKey::sign(key, info).unwrap();
        let bits = tlv(0x03, &[&[0][..], &signature].concat());
        tlv(0x30, &[info, &algorithm[..], &bits].concat())
    }

    #[test]
    fn a_self_signed_csr_with_a_non_der_key_is_malformed() {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let der = csr_with_key(&key, &["spiffe://td/a"]);
        let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
        let info = csr.certification_request_info.raw.to_vec();
        // Re-signed as it is, it verifies.
        assert!(verify_csr(&ed25519_csr_around(&info, &key)).is_ok());
        // The key's algorithm OID under another tag (0xd1 for 0x06): x509-parser still reads
        // Ed25519, the CA would certify the key re-encoded. The signature is valid.
        let oid = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
        let pos = info.windows(oid.len()).position(|w| w == oid).unwrap();
        let mut bent = info.clone();
        bent[pos + 2] = 0xd1;
        let err = verify_csr(&ed25519_csr_around(&bent, &key)).unwrap_err();
        assert!(
            matches!(&err, CsrError::Malformed(m) if m.contains("DER form of an Ed25519 key")),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            verify_csr(b"not a csr"),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(verify_csr(&[]), Err(CsrError::Malformed(_))));
        let mut der = csr_with(&PKCS_ECDSA_P256_SHA256, &[]);
        der.push(0);
        assert!(matches!(verify_csr(&der), Err(CsrError::TrailingBytes)));
    }
}
