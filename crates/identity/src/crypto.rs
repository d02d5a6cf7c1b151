//! The process-wide rustls crypto provider: aws-lc-rs, TLS 1.3 cipher suites only and the
//! key-exchange groups, each in Latch's order of preference. The bottom layer of the crate: certificate validation (`svid`,
//! `verifier`) and the TLS configs (`tls`) take their algorithms from here, so neither has to
//! import the other.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// Key-exchange groups in order of preference. A rustls server takes the first group of the
/// client's list that it supports, so two Latch endpoints agree on the first one:
/// - X25519MLKEM768 (0x11ec), the hybrid of X25519 and ML-KEM-768: a recording of today's
///   traffic stays closed to a future quantum computer as long as either half holds. About
///   2.3 KB more on the wire per full handshake (docs/benchmarks.md).
/// - X25519, for peers without ML-KEM (a proxy of an older release during an upgrade,
///   `openssl s_client -groups X25519`). The rustls client sends its key share next to the
///   hybrid one (the X25519 half is shared), so such a server needs no HelloRetryRequest.
/// - secp256r1 last, for clients held to NIST curves (a FIPS-mode client of the control plane
///   or the webhook, e.g. a kube-apiserver built with BoringCrypto). It costs two bytes in our
///   ClientHello and is never chosen between Latch endpoints. secp384r1 and the pure ML-KEM
///   groups are left out: nothing here needs them.
pub static KX_GROUPS: &[&dyn rustls::crypto::SupportedKxGroup] = &[
    rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
    rustls::crypto::aws_lc_rs::kx_group::X25519,
    rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
];

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
            provider.kx_groups = KX_GROUPS.to_vec();
            Arc::new(provider)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hybrid_post_quantum_key_exchange_first_then_x25519_then_p256() {
        let groups: Vec<_> = super::provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(
            groups,
            [
                rustls::NamedGroup::X25519MLKEM768,
                rustls::NamedGroup::X25519,
                rustls::NamedGroup::secp256r1,
            ]
        );
        assert_eq!(u16::from(groups[0]), 0x11ec);
    }

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
