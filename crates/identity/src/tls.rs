//! rustls configuration shared by every Latch TLS endpoint: one crypto provider (aws-lc-rs),
//! TLS 1.3 only, certificates from a `CertStore`, SPIFFE verifiers instead of DNS names.
//! Used by the control plane's gRPC server, its clients, and the proxy's data path.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;

use crate::store::{CertStore, SvidResolver};

/// ALPN for gRPC over TLS (control plane).
pub const ALPN_H2: &[u8] = b"h2";

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

/// The ServerName handed to rustls: identity is checked by SPIFFE ID, SNI is disabled, so this
/// name is neither sent nor verified.
pub fn placeholder_server_name() -> ServerName<'static> {
    ServerName::try_from("latch.invalid").unwrap_or(ServerName::IpAddress(
        std::net::Ipv4Addr::UNSPECIFIED.into(),
    ))
}

/// A TLS 1.3 server config presenting the store's current SVID.
pub fn server_config(
    store: Arc<CertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(Arc::new(SvidResolver::new(store)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS 1.3 client config; presents the store's SVID when one is given.
pub fn client_config(
    store: Option<Arc<CertStore>>,
    server_verifier: Arc<dyn ServerCertVerifier>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, rustls::Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier);
    let mut config = match store {
        Some(store) => builder.with_client_cert_resolver(Arc::new(SvidResolver::new(store))),
        None => builder.with_no_client_auth(),
    };
    config.enable_sni = false;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
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
