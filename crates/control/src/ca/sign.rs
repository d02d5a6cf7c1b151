//! Leaf signing: the `Signer` (key, certificate and chain that sign now) and the one place a
//! certificate is made from a caller's public key, `Ca::issue` for X509-SVIDs (called by the
//! certificate service after it authenticated the caller) and `Ca::issue_server_cert` for the
//! webhook's DNS-named serving certificate.

use std::time::{Duration, SystemTime};

use latch_identity::svid::format_time;
use latch_identity::{SpiffeId, SvidInfo};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;

use super::{BACKDATE, Ca, CaError, IssuedSvid};

/// The key and certificate that sign leaves.
pub(super) struct Signer {
    pub(super) issuer: Issuer<'static, KeyPair>,
    /// The signing certificate.
    pub(super) cert: CertificateDer<'static>,
    /// Certificates sent after the leaf: empty for a root, else the intermediate(s).
    pub(super) chain_tail: Vec<CertificateDer<'static>>,
    pub(super) not_before: SystemTime,
    /// The earliest NotAfter from the signing certificate up to the root that anchors it: no
    /// leaf is issued beyond it.
    pub(super) not_after: SystemTime,
}

pub(super) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // SystemRandom only fails when the OS has no entropy source; fall back to the clock so we
    // never issue a fixed serial, and keep the serial positive and 128 bits long.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = nanos.to_be_bytes();
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x40;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// Issues a leaf X509-SVID for `id` over the public key `spki_der` (a DER
    /// SubjectPublicKeyInfo). The caller has authenticated `id`; nothing else from the request
    /// reaches the certificate.
    pub fn issue(
        &self,
        id: &SpiffeId,
        spki_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        self.issue_with_unit(id, None, spki_der, ttl, now)
    }

    /// `issue`, with `unit` as the subject's one organizationalUnitName: where the SVID was
    /// issued to (`kubernetes::PodBinding`), for the certificate service to check at renewal.
    pub fn issue_with_unit(
        &self,
        id: &SpiffeId,
        unit: Option<&str>,
        spki_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        let san = SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        );
        let mut subject = DistinguishedName::new();
        if let Some(unit) = unit {
            subject.push(DnType::OrganizationalUnitName, unit);
        }
        let (chain, _) = self.sign_leaf(
            subject,
            vec![san],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            spki_der,
            ttl,
            now,
        )?;
        let info = SvidInfo::from_leaf(&chain[0]).map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(IssuedSvid { chain, info })
    }

    /// Issues a TLS server certificate for `dns_names` over `spki_der`, for the one endpoint
    /// whose clients verify a DNS name rather than a SPIFFE ID: the admission webhook, which
    /// the Kubernetes API server reaches as `<service>.<namespace>.svc`. Not an SVID: DNS SANs
    /// only, serverAuth only. Returns the chain (leaf first) and the leaf's NotAfter.
    pub fn issue_server_cert(
        &self,
        dns_names: &[&str],
        spki_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), CaError> {
        let sans = dns_names
            .iter()
            .map(|name| {
                (*name)
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e: rcgen::Error| CaError::Sign(format!("DNS name {name:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.sign_leaf(
            DistinguishedName::new(),
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            spki_der,
            ttl,
            now,
        )
    }

    /// Signs a leaf with the given subject (usually empty), SANs and extended key usages:
    /// CA:false, keyUsage digitalSignature, AKI, a random serial, NotBefore backdated and
    /// NotAfter within the validity of every certificate up to the root. Returns the chain and
    /// the leaf's NotAfter.
    fn sign_leaf(
        &self,
        subject: DistinguishedName,
        sans: Vec<SanType>,
        extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
        spki_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), CaError> {
        let signer = self.signer.load();
        if now >= signer.not_after {
            return Err(CaError::IssuerExpired(format_time(signer.not_after)));
        }
        if now < signer.not_before {
            return Err(CaError::IssuerNotYetValid(format_time(signer.not_before)));
        }
        let public_key = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| CaError::PublicKey(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = extended_key_usages;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let not_after = (now + ttl).min(signer.not_after);
        params.not_before = (now - BACKDATE).max(signer.not_before).into();
        params.not_after = not_after.into();
        let leaf = params
            .signed_by(&public_key, &signer.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + signer.chain_tail.len());
        chain.push(leaf.der().clone());
        chain.extend(signer.chain_tail.iter().cloned());
        Ok((chain, not_after))
    }
}
