//! Fixtures for this crate's unit tests: a store holding an SVID of a throwaway root CA (the
//! test kit's `certs`), so discovery's bundle checks and the data path's TLS setup have real
//! certificates. Compiled only for tests.

use latch_identity::{CertStore, TrustBundle};
pub(crate) use latch_testkit::certs::ca_and_svid;

/// A store holding an SVID for `id`, and the PEM of the CA that signed it.
pub(crate) fn store_with_svid(id: &str) -> (CertStore, String) {
    let (pem, svid) = ca_and_svid(id);
    let bundle = TrustBundle::from_pem(pem.as_bytes()).expect("bundle");
    (CertStore::with_svid(svid, bundle), pem)
}
