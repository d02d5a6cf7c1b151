//! rustls configuration shared by every Latch TLS endpoint: one crypto provider (aws-lc-rs),
//! TLS 1.3 only, certificates from a `CertStore`, SPIFFE verifiers instead of DNS names.
//! Used by the control plane's gRPC server, its clients, and the proxy's data path. The top
//! of the crate's layers: it builds on `store`, which builds on `svid`, which builds on
//! `crypto`; the provider is re-exported here for callers that configure rustls themselves.

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;

pub use crate::crypto::provider;
use crate::store::{CertStore, SvidResolver};

/// ALPN for gRPC over TLS (control plane).
pub const ALPN_H2: &[u8] = b"h2";

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
