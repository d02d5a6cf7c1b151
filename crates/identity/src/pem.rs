//! PEM encoding of DER blobs (certificates, keys) for the files Latch writes. Decoding goes
//! through rustls-pki-types' `PemObject`.

/// Encodes `der` as one PEM block with the given label (e.g. "CERTIFICATE"), LF line endings.
pub fn encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn round_trips_through_pki_types() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = encode("CERTIFICATE", &der);
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n"));
        let back = CertificateDer::from_pem_slice(text.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), der.as_slice());
    }
}
