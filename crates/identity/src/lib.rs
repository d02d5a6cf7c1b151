//! latch-identity: everything about who a workload is. SPIFFE IDs, X509-SVID validation, trust
//! bundles, CSRs, the SPIFFE-aware rustls verifiers and the hot-swappable certificate store.
//! The control plane, the proxy and latchctl all build on this crate.

pub mod bundle;
pub mod client;
pub mod crypto;
pub mod csr;
pub mod files;
pub mod hex;
pub mod jwt;
pub mod pem;
pub mod report;
pub mod spiffe_id;
pub mod store;
pub mod svid;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod verifier;

pub use bundle::TrustBundle;
pub use report::error_chain;
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use store::{CertStore, Revocations};
pub use svid::{PeerRole, Svid, SvidError, SvidInfo, verify_svid};
pub use verifier::{ClientAuth, ExpectedPeer, SpiffeClientVerifier, SpiffeServerVerifier};
