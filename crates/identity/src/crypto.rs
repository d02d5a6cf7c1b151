//! The process-wide rustls crypto provider: aws-lc-rs, TLS 1.3 cipher suites only, in Latch's
//! order of preference. The bottom layer of the crate: certificate validation (`svid`,
//! `verifier`) and the TLS configs (`tls`) take their algorithms from here, so neither has to
//! import the other.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The process-wide crypto provider: aws-lc-rs with only TLS 1.3 cipher suites, AES-128-GCM
/// preferred (as fast to break as AES-256 for any realistic attacker, and ~30% cheaper per
/// byte), then AES-256-GCM and ChaCha20-Poly1305 for peers that insist. Passed explicitly
/// everywhere, so no process default needs to be installed.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider
                .cipher_suites
                .retain(|suite| suite.version() == &rustls::version::TLS13);
            let preference = |suite: &rustls::SupportedCipherSuite| match suite.suite() {
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
                _ => 2,
            };
            provider.cipher_suites.sort_by_key(preference);
            Arc::new(provider)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_tls13_suites_with_aes_128_gcm_first() {
        let provider = super::provider();
        let suites: Vec<_> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites.first(),
            Some(&rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert!(
            provider
                .cipher_suites
                .iter()
                .all(|s| s.version() == &rustls::version::TLS13)
        );
    }
}
