//! The hot-swappable certificate store: the workload's current SVID and the trust bundle, each
//! behind an `ArcSwap`. Rotation writes here; rustls reads here at every handshake through
//! `SvidResolver` and the SPIFFE verifiers, so open connections are never touched.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::bundle::TrustBundle;
use crate::jwt::JwtBundle;
use crate::spiffe_id::SpiffeId;
use crate::svid::{Svid, SvidError, SvidInfo};

/// SPIFFE IDs the operator revoked, each with the time of its revocation: an SVID of that ID
/// issued at or before it is refused (a later one, after the workload was registered again, is
/// not).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revocations(pub BTreeMap<SpiffeId, SystemTime>);

impl Revocations {
    /// The revocation time, when `info`'s SVID was issued at or before it.
    pub fn covers(&self, info: &SvidInfo) -> Option<SystemTime> {
        self.covers_issued(&info.id, info.issued_at())
    }

    /// The revocation time, when an SVID of `id` issued at `issued_at` was issued at or before
    /// it.
    pub fn covers_issued(&self, id: &SpiffeId, issued_at: SystemTime) -> Option<SystemTime> {
        self.0
            .get(id)
            .copied()
            .filter(|revoked_at| issued_at <= *revoked_at)
    }

    /// `Err(SvidError::Revoked)` when `covers`.
    pub fn check(&self, info: &SvidInfo) -> Result<(), SvidError> {
        match self.covers(info) {
            None => Ok(()),
            Some(at) => Err(SvidError::Revoked {
                id: info.id.clone(),
                revoked_at: crate::svid::format_time(at),
            }),
        }
    }
}

/// Current SVID (if any yet) and trust bundle. Every change bumps a generation number that
/// `subscribe` watchers see (the Workload API streams a new message on each).
pub struct CertStore {
    svid: ArcSwapOption<Svid>,
    bundle: ArcSwap<TrustBundle>,
    revocations: ArcSwap<Revocations>,
    /// The trust domain's JWT bundle, once discovery delivered one.
    jwt_bundle: ArcSwapOption<JwtBundle>,
    changes: tokio::sync::watch::Sender<u64>,
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
            revocations: ArcSwap::from_pointee(Revocations::default()),
            jwt_bundle: ArcSwapOption::empty(),
            changes: tokio::sync::watch::Sender::new(0),
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
        self.changes.send_modify(|generation| *generation += 1);
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// Swaps in a new trust bundle; verification from now on uses it.
    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.store(Arc::new(bundle));
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Swaps in a new SVID and, if given, a new bundle, waking subscribers once.
    pub fn rotate(&self, svid: Svid, bundle: Option<TrustBundle>) {
        if let Some(bundle) = bundle {
            self.bundle.store(Arc::new(bundle));
        }
        self.svid.store(Some(Arc::new(svid)));
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// The identities the control plane has taken back, as discovery last said.
    pub fn revocations(&self) -> Arc<Revocations> {
        self.revocations.load_full()
    }

    /// Swaps in the revocations; every handshake from now on checks them.
    pub fn set_revocations(&self, revocations: Revocations) {
        self.revocations.store(Arc::new(revocations));
    }

    /// The JWT bundle (public keys JWT-SVIDs are validated with), if one was delivered.
    pub fn jwt_bundle(&self) -> Option<Arc<JwtBundle>> {
        self.jwt_bundle.load_full()
    }

    /// Swaps in the JWT bundle, waking subscribers when it changed.
    pub fn set_jwt_bundle(&self, bundle: JwtBundle) {
        if self.jwt_bundle().as_deref() == Some(&bundle) {
            return;
        }
        self.jwt_bundle.store(Some(Arc::new(bundle)));
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// A receiver that wakes on every `set_svid` / `set_bundle` / `rotate` / `set_jwt_bundle`.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SvidError;
    use crate::svid::SvidInfo;
    use crate::testing::{Ca, HOUR, Pair, at, client, leaf_params, server, spiffe_id, svid_error};
    use crate::verifier::{ClientAuth, ExpectedPeer};

    const SERVER: &str = "/ns/demo/sa/server";
    const CLIENT: &str = "/ns/demo/sa/client";

    fn expired_svid(ca: &Ca, path: &str) -> Svid {
        let mut params = leaf_params(path);
        params.not_before = at(-2 * HOUR).into();
        params.not_after = at(-HOUR).into();
        ca.sign(&params).svid(&[])
    }

    /// Handshakes a fresh client (trusting `client_store`) with a fresh server (presenting
    /// `server_store`'s SVID) and returns the pair.
    fn connect(client_store: &Arc<CertStore>, server_store: &Arc<CertStore>) -> Pair {
        let mut pair = Pair::new(
            client(client_store, ExpectedPeer::AnyInBundle),
            server(
                server_store,
                ClientAuth::Required(ExpectedPeer::AnyInBundle),
            ),
        );
        pair.handshake().expect("handshake");
        pair
    }

    fn presented_serial(pair: &Pair) -> String {
        let certs = pair.client.peer_certificates().expect("server cert");
        SvidInfo::from_leaf(&certs[0]).expect("server SVID").serial
    }

    #[test]
    fn valid_svid_hides_an_expired_svid() {
        let root = Ca::root("Latch Root");
        let store = CertStore::new(root.bundle());
        assert!(store.svid().is_none());
        assert!(store.valid_svid(SystemTime::now()).is_none());

        store.set_svid(root.svid(SERVER));
        let not_after = store.svid().unwrap().info().not_after;
        assert!(store.valid_svid(not_after).is_some());
        assert!(
            store
                .valid_svid(not_after + std::time::Duration::from_secs(1))
                .is_none()
        );
        assert!(
            store.svid().is_some(),
            "svid() still returns the expired SVID"
        );
    }

    #[test]
    fn set_svid_and_set_bundle_replace_what_readers_load() {
        let (old_root, new_root) = (Ca::root("Latch Root"), Ca::root("Latch Root"));
        let store = CertStore::with_svid(old_root.svid(SERVER), old_root.bundle());
        let before = store.svid().unwrap();
        let new = new_root.svid(SERVER);
        let new_serial = new.info().serial.clone();

        store.set_svid(new);
        store.set_bundle(new_root.bundle());
        assert_eq!(store.svid().unwrap().info().serial, new_serial);
        assert_ne!(before.info().serial, new_serial);
        assert_eq!(store.bundle().roots(), &[new_root.cert()]);
    }

    #[test]
    fn new_svid_is_presented_to_new_connections_while_old_ones_keep_working() {
        let root = Ca::root("Latch Root");
        let server_store = Arc::new(CertStore::with_svid(root.svid(SERVER), root.bundle()));
        let client_store = Arc::new(CertStore::with_svid(root.svid(CLIENT), root.bundle()));
        let old_serial = server_store.svid().unwrap().info().serial.clone();

        let mut established = connect(&client_store, &server_store);
        assert_eq!(presented_serial(&established), old_serial);

        server_store.set_svid(root.svid(SERVER));
        let new_serial = server_store.svid().unwrap().info().serial.clone();
        assert_ne!(new_serial, old_serial);

        let fresh = connect(&client_store, &server_store);
        assert_eq!(presented_serial(&fresh), new_serial);

        assert_eq!(established.client_to_server(b"still here"), b"still here");
        assert_eq!(established.server_to_client(b"me too"), b"me too");
        assert_eq!(presented_serial(&established), old_serial);
    }

    #[test]
    fn new_bundle_is_used_by_the_next_handshake() {
        let (old_root, new_root) = (Ca::root("Latch Root"), Ca::root("Latch Root"));
        let server_store = Arc::new(CertStore::with_svid(
            old_root.svid(SERVER),
            old_root.bundle(),
        ));
        let client_store = Arc::new(CertStore::with_svid(
            old_root.svid(CLIENT),
            old_root.bundle(),
        ));
        connect(&client_store, &server_store);

        client_store.set_bundle(new_root.bundle());
        let err = Pair::new(
            client(&client_store, ExpectedPeer::AnyInBundle),
            server(
                &server_store,
                ClientAuth::Required(ExpectedPeer::AnyInBundle),
            ),
        )
        .handshake()
        .unwrap_err()
        .by_client();
        assert!(
            matches!(svid_error(&err), Some(SvidError::Chain { id, .. }) if *id == spiffe_id(SERVER)),
            "{err:?}"
        );

        // A server that moved to the new root is accepted again.
        server_store.set_svid(new_root.svid(SERVER));
        let pair = connect(&client_store, &server_store);
        assert_eq!(
            presented_serial(&pair),
            server_store.svid().unwrap().info().serial
        );
    }

    #[test]
    fn expired_svid_fails_closed() {
        let root = Ca::root("Latch Root");
        let good = Arc::new(CertStore::with_svid(root.svid(CLIENT), root.bundle()));
        let stale_server = Arc::new(CertStore::with_svid(
            expired_svid(&root, SERVER),
            root.bundle(),
        ));
        let no_svid = Arc::new(CertStore::new(root.bundle()));

        // A server with nothing valid to present refuses the handshake.
        for store in [&stale_server, &no_svid] {
            let err = Pair::new(
                client(&good, ExpectedPeer::AnyInBundle),
                server(store, ClientAuth::Required(ExpectedPeer::AnyInBundle)),
            )
            .handshake()
            .unwrap_err()
            .by_server();
            assert!(
                matches!(err, rustls::Error::General(_)),
                "{store:?}: {err:?}"
            );
        }

        // A client with only an expired SVID presents none, and required auth refuses it.
        let stale_client = Arc::new(CertStore::with_svid(
            expired_svid(&root, CLIENT),
            root.bundle(),
        ));
        let server_store = Arc::new(CertStore::with_svid(root.svid(SERVER), root.bundle()));
        let err = Pair::new(
            client(&stale_client, ExpectedPeer::AnyInBundle),
            server(
                &server_store,
                ClientAuth::Required(ExpectedPeer::AnyInBundle),
            ),
        )
        .handshake()
        .unwrap_err()
        .by_server();
        assert_eq!(err, rustls::Error::NoCertificatesPresented);
    }
}
