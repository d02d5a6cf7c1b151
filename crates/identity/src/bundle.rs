//! The trust bundle: the root certificates of a trust domain, possibly several at once while a
//! root is being rotated. Owns the parsed webpki trust anchors so that every handshake
//! verifies against ready-made anchors; read through `CertStore::bundle`.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BundleError {
    #[error("trust bundle is empty: it needs at least one root certificate")]
    Empty,
    #[error("trust bundle PEM is malformed: {0}")]
    Pem(String),
    #[error(
        "root certificate #{index} in the trust bundle cannot be used as a trust anchor: {reason}"
    )]
    BadRoot { index: usize, reason: String },
}

/// Root certificates (DER) and the trust anchors parsed from them.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from DER root certificates.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::BadRoot {
                        index,
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { roots, anchors })
    }

    /// Parses one or more PEM `CERTIFICATE` blocks.
    pub fn from_pem(pem: &[u8]) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        Self::new(roots)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The bundle as concatenated PEM blocks.
    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|c| crate::pem::encode("CERTIFICATE", c))
            .collect()
    }

    /// SHA-256 fingerprints of the roots, as lowercase hex, for logs and debug endpoints.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|c| sha256_hex(c)).collect()
    }
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    crate::hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}
