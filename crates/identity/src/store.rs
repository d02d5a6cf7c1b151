//! The hot-swappable certificate store: the workload's current SVID and the trust bundle, each
//! behind an `ArcSwap`. Rotation writes here; rustls reads here at every handshake through
//! `SvidResolver` and the SPIFFE verifiers, so open connections are never touched.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::bundle::TrustBundle;
use crate::svid::Svid;

/// Current SVID (if any yet) and trust bundle.
pub struct CertStore {
    svid: ArcSwapOption<Svid>,
    bundle: ArcSwap<TrustBundle>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let svid = self.svid();
        f.debug_struct("CertStore")
            .field("svid", &svid.as_ref().map(|s| s.info()))
            .field("bundle_roots", &self.bundle().roots().len())
            .finish()
    }
}

impl CertStore {
    /// A store with a bundle and no SVID yet (handshakes needing one fail until it is set).
    pub fn new(bundle: TrustBundle) -> Self {
        Self {
            svid: ArcSwapOption::empty(),
            bundle: ArcSwap::from_pointee(bundle),
        }
    }

    pub fn with_svid(svid: Svid, bundle: TrustBundle) -> Self {
        let store = Self::new(bundle);
        store.set_svid(svid);
        store
    }

    /// The latest SVID, expired or not.
    pub fn svid(&self) -> Option<Arc<Svid>> {
        self.svid.load_full()
    }

    /// The latest SVID if it is still valid at `now`: what handshakes present.
    pub fn valid_svid(&self, now: SystemTime) -> Option<Arc<Svid>> {
        self.svid().filter(|s| !s.info().is_expired_at(now))
    }

    /// Swaps in a new SVID; handshakes from now on present it.
    pub fn set_svid(&self, svid: Svid) {
        self.svid.store(Some(Arc::new(svid)));
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// Swaps in a new trust bundle; verification from now on uses it.
    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.store(Arc::new(bundle));
    }

    fn current_certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.valid_svid(SystemTime::now())
            .map(|s| s.certified_key().clone())
    }
}

/// rustls resolver for both ends: hands out the store's current, unexpired SVID. With none
/// (or only an expired one) the handshake fails closed.
#[derive(Debug)]
pub struct SvidResolver {
    store: Arc<CertStore>,
}

impl SvidResolver {
    pub fn new(store: Arc<CertStore>) -> Self {
        Self { store }
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.current_certified_key()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.current_certified_key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
