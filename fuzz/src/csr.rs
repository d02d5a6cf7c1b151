//! CSR handling as the control plane does it: `certificate_service::check_csr` (parse, key type,
//! self-signature, requested ID) for a caller authenticated as `fixtures::AUTHENTICATED`, then
//! `Ca::issue`. Whatever is accepted must be issuable, and the certificate must carry exactly
//! the authenticated SPIFFE ID as its only SAN and exactly the public key that signed the CSR.
//!
//! Input: a mode byte, then bytes. Even mode: the bytes are the CSR. Odd mode: the bytes are a
//! CertificationRequestInfo that the harness signs with a fixed Ed25519 key, so mutations of the
//! signed part (SANs, extensions, key) reach the checks behind the signature.

use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use latch_control::certificate_service::check_csr;
use latch_identity::csr::KeyType;
use latch_identity::{PeerRole, SpiffeId, verify_svid};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::fixtures;

/// The harness's signing key (a constant seed: the corpus stays valid across runs).
fn signer() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[0x5e; 32]).expect("Ed25519 key from a 32-byte seed")
}

/// DER tag-length-value.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match u8::try_from(content.len()) {
        Ok(len) if len < 0x80 => out.push(len),
        _ => {
            let len = content.len().to_be_bytes();
            let skip = len.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | u8::try_from(len.len() - skip).unwrap_or(0));
            out.extend_from_slice(&len[skip..]);
        }
    }
    out.extend_from_slice(content);
    out
}

/// A PKCS#10 CSR around `info`, signed with the harness's key.
fn signed(info: &[u8]) -> Vec<u8> {
    let ed25519 = tlv(0x30, &tlv(0x06, &[0x2b, 0x65, 0x70]));
    let signature = signer().sign(info);
    let bits = tlv(0x03, &[&[0u8][..], signature.as_ref()].concat());
    tlv(0x30, &[info, &ed25519, &bits].concat())
}

pub fn check(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let (der, signed_by_harness) = if mode % 2 == 0 {
        (bytes.to_vec(), false)
    } else {
        (signed(bytes), true)
    };
    let id = fixtures::authenticated();
    let Ok(csr) = check_csr(&der, id) else {
        return;
    };
    assert!(
        csr.requested_uris.iter().all(|u| u == id.as_str()),
        "accepted a CSR asking for {:?}",
        csr.requested_uris
    );
    let (rest, spki) = SubjectPublicKeyInfo::from_der(&csr.public_key_spki)
        .expect("the accepted public key is a SubjectPublicKeyInfo");
    assert!(rest.is_empty());
    let (_, request) = X509CertificationRequest::from_der(&der).expect("accepted CSR parses");
    assert_eq!(
        request.certification_request_info.subject_pki.raw,
        csr.public_key_spki.as_slice(),
        "the public key taken is not the CSR's"
    );
    let algorithm = spki.algorithm.algorithm.to_id_string();
    let expected_algorithm = match csr.key_type {
        KeyType::EcdsaP256 | KeyType::EcdsaP384 => "1.2.840.10045.2.1",
        KeyType::Ed25519 => "1.3.101.112",
    };
    assert_eq!(algorithm, expected_algorithm, "{:?}", csr.key_type);
    if signed_by_harness {
        // The self-signature verified, so the key must be the one that signed.
        assert_eq!(csr.key_type, KeyType::Ed25519);
        assert_eq!(
            &*spki.subject_public_key.data,
            signer().public_key().as_ref(),
            "accepted a CSR whose key did not sign it"
        );
    }

    let now = SystemTime::now();
    let issued = fixtures::ca()
        .issue(id, &csr.public_key_spki, Duration::from_secs(600), now)
        .unwrap_or_else(|e| panic!("an accepted CSR could not be issued: {e}"));
    let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).expect("issued leaf parses");
    assert_eq!(
        leaf.public_key().raw,
        csr.public_key_spki.as_slice(),
        "the leaf's key is not the CSR's"
    );
    let mut sans = Vec::new();
    for ext in leaf.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            sans.extend(san.general_names.iter().cloned());
        }
    }
    assert_eq!(
        sans,
        vec![GeneralName::URI(id.as_str())],
        "the leaf names more or other than the authenticated ID"
    );
    let info = verify_svid(
        &issued.chain,
        &fixtures::ca().bundle(),
        now,
        PeerRole::Client,
    )
    .unwrap_or_else(|e| panic!("the issued leaf is not a valid SVID: {e}"));
    assert_eq!(&info.id, id);
}

/// A CSR made by rcgen with `key`, asking for the URI SANs `uris` and DNS name `dns`.
fn rcgen_csr(key: &rcgen::KeyPair, uris: &[&str], dns: Option<&str>, is_ca: bool) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().expect("ASCII URI")))
        .chain(dns.map(|d| rcgen::SanType::DnsName(d.try_into().expect("ASCII DNS name"))))
        .collect();
    if is_ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    }
    params
        .serialize_request(key)
        .expect("rcgen CSR")
        .der()
        .to_vec()
}

/// The signed part of a CSR.
fn info_of(csr: &[u8]) -> Vec<u8> {
    let (_, request) = X509CertificationRequest::from_der(csr).expect("rcgen CSR parses");
    request.certification_request_info.raw.to_vec()
}

pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let id = fixtures::AUTHENTICATED;
    let other = "spiffe://fuzz.latch/ns/demo/sa/db";
    let raw = |csr: Vec<u8>| [vec![0u8], csr].concat();
    let to_sign = |csr: Vec<u8>| [vec![1u8], info_of(&csr)].concat();
    let p256 = |alg| rcgen::KeyPair::generate_for(alg).expect("key");
    let ed25519 = rcgen::KeyPair::try_from(
        signer()
            .to_pkcs8v1()
            .expect("PKCS#8 of the harness key")
            .as_ref(),
    )
    .expect("rcgen reads the harness key");
    let spiffe = SpiffeId::parse(id).expect("valid ID");
    let generated = latch_identity::csr::generate_csr(Some(&spiffe))
        .expect("generate_csr")
        .csr_der;
    vec![
        ("raw-generated-p256".into(), raw(generated)),
        (
            "raw-no-san-p256".into(),
            raw(rcgen_csr(
                &p256(&rcgen::PKCS_ECDSA_P256_SHA256),
                &[],
                None,
                false,
            )),
        ),
        (
            "raw-p384".into(),
            raw(rcgen_csr(
                &p256(&rcgen::PKCS_ECDSA_P384_SHA384),
                &[id],
                None,
                false,
            )),
        ),
        (
            "raw-other-id".into(),
            raw(rcgen_csr(
                &p256(&rcgen::PKCS_ECDSA_P256_SHA256),
                &[other],
                None,
                false,
            )),
        ),
        ("raw-garbage".into(), raw(b"not a csr".to_vec())),
        (
            "signed-id".into(),
            to_sign(rcgen_csr(&ed25519, &[id], None, false)),
        ),
        (
            "signed-no-san".into(),
            to_sign(rcgen_csr(&ed25519, &[], None, false)),
        ),
        (
            "signed-id-and-other".into(),
            to_sign(rcgen_csr(&ed25519, &[id, other], None, false)),
        ),
        (
            "signed-id-twice-and-dns".into(),
            to_sign(rcgen_csr(&ed25519, &[id, id], Some("evil.example"), false)),
        ),
        (
            "signed-asks-for-ca".into(),
            to_sign(rcgen_csr(&ed25519, &[id], None, true)),
        ),
    ]
}
