//! The certificate authority: the `Ca` that the certificate service, the webhook and the
//! control plane's own identity ask for certificates, its errors, TTL policy and trust bundle.
//! Where the root is kept on disk is `storage`, how it is rotated is `rotation`, how a leaf is
//! signed is `sign`; docs/architecture.md ("The CA") describes all three.

mod rotation;
mod sign;
mod storage;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use latch_identity::bundle::sha256_hex;
use latch_identity::svid::format_time;
use latch_identity::{PeerRole, SpiffeId, SvidInfo, TrustBundle, TrustDomain};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls_pki_types::CertificateDer;
use thiserror::Error;
use tokio::sync::watch;

use rotation::Rotation;
pub use rotation::{CaCertificateView, RotationError, RotationStatus};
use sign::Signer;
pub use storage::PluginFiles;
use storage::{RootFiles, cert_not_after};

/// Lifetime of a root the control plane makes for itself.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far a leaf's NotBefore is backdated, so that a peer whose clock is behind the CA's
/// (minutes of skew between machines happen) does not see a freshly issued SVID as "not yet
/// valid". Never before the issuer's own NotBefore. See docs/architecture.md.
pub const BACKDATE: Duration = latch_identity::svid::LEAF_BACKDATE;
/// How far a root the control plane makes is backdated: well beyond `BACKDATE`, so the leaves
/// of a young root are not clamped to its NotBefore (which would undo their backdating).
pub const ROOT_BACKDATE: Duration = Duration::from_secs(3600);
/// Shortest TTL a caller may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum CaError {
    // The I/O error is part of the message, not a `source`: the binary prints the chain, which
    // would repeat it.
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "cannot write {path}: {error} (check that the data dir is writable and has free space)"
    )]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "CA key file {path} is corrupt or not a private key ({reason}); refusing to start. \
         Restore it from backup: generating a new root would break trust mesh-wide"
    )]
    CorruptKey { path: PathBuf, reason: String },
    #[error(
        "CA certificate file {path} is corrupt ({reason}); refusing to start. Restore it from backup"
    )]
    CorruptCert { path: PathBuf, reason: String },
    #[error(
        "found {present} but not {missing}; refusing to generate a new root, which would break \
         trust mesh-wide. Restore the missing file, or move {dir} away to start a new trust domain"
    )]
    HalfPresent {
        present: PathBuf,
        missing: PathBuf,
        dir: PathBuf,
    },
    #[error("CA certificate {path} is not a CA: {reason}")]
    NotACa { path: PathBuf, reason: String },
    #[error("CA key does not match the CA certificate's public key")]
    KeyMismatch,
    #[error(
        "CA certificate belongs to trust domain {found}, but the control plane is configured for {configured}"
    )]
    TrustDomainMismatch { found: String, configured: String },
    #[error("{0}")]
    Bundle(#[from] latch_identity::bundle::BundleError),
    #[error(
        "the CA cannot produce SVIDs that verify against its trust bundle: {0}. Check that \
         --ca-chain and --ca-bundle lead from --ca-cert to a root"
    )]
    SelfTest(String),
    #[error("CA certificate expired at {0}; rotate the CA before issuing")]
    IssuerExpired(String),
    #[error("CA certificate is not valid before {0}; check the clock")]
    IssuerNotYetValid(String),
    #[error("public key in the CSR cannot be used: {0}")]
    PublicKey(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Requested TTL rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TtlError {
    #[error(
        "requested TTL {requested:?} is over the maximum {max:?} (configurable with --max-ttl)"
    )]
    TooLong { requested: Duration, max: Duration },
    #[error("requested TTL {requested:?} is under the minimum {MIN_TTL:?}")]
    TooShort { requested: Duration },
}

/// TTL policy for leaves.
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    pub default: Duration,
    pub max: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(3600),
            max: Duration::from_secs(24 * 3600),
        }
    }
}

impl TtlPolicy {
    /// The TTL to issue with for a request that asked for `requested`.
    pub fn resolve(&self, requested: Option<Duration>) -> Result<Duration, TtlError> {
        match requested {
            None => Ok(self.default.min(self.max)),
            Some(ttl) if ttl > self.max => Err(TtlError::TooLong {
                requested: ttl,
                max: self.max,
            }),
            Some(ttl) if ttl < MIN_TTL => Err(TtlError::TooShort { requested: ttl }),
            Some(ttl) => Ok(ttl),
        }
    }
}

/// A freshly issued leaf and the chain to send with it.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// Leaf first, then the CA's intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub info: SvidInfo,
}

/// A CA certificate as /ready, metrics and `latchctl ca status` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertificate {
    /// `root`, `intermediate`, `next root` (prepared, trusted, not signing) or `previous root`
    /// (trusted until retired, not signing).
    pub role: &'static str,
    /// SHA-256 of the DER certificate, hex.
    pub fingerprint: String,
    pub not_after: SystemTime,
}

/// A signing CA.
pub struct Ca {
    trust_domain: TrustDomain,
    ttl: TtlPolicy,
    signer: ArcSwap<Signer>,
    /// The roots clients trust: the signer's, plus the next or previous one during a rotation.
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// For plug-in CAs: the roots given with --ca-bundle (no rotation through latchctl).
    fixed_roots: Vec<CertificateDer<'static>>,
    /// The self-made root's files; `None` for plug-in and Secret CAs.
    files: Option<RootFiles>,
    /// Serializes rotation steps; the roots beside the signing one.
    rotation: Mutex<Rotation>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let signer = self.signer.load();
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &format_time(signer.not_after))
            .field("intermediates", &signer.chain_tail.len())
            .finish()
    }
}

impl Ca {
    fn assemble(
        trust_domain: &TrustDomain,
        ttl: TtlPolicy,
        signer: Signer,
        fixed_roots: Vec<CertificateDer<'static>>,
        files: Option<RootFiles>,
        rotation: Rotation,
    ) -> Result<Self, CaError> {
        let bundle = Self::bundle_of(&fixed_roots, &rotation)?;
        let ca = Self {
            trust_domain: trust_domain.clone(),
            ttl,
            signer: ArcSwap::from_pointee(signer),
            bundle: watch::Sender::new(Arc::new(bundle)),
            fixed_roots,
            files,
            rotation: Mutex::new(rotation),
        };
        ca.self_test()?;
        Ok(ca)
    }

    /// The signing roots, then the next or previous root of a rotation.
    fn bundle_of(
        fixed_roots: &[CertificateDer<'static>],
        rotation: &Rotation,
    ) -> Result<TrustBundle, CaError> {
        let mut roots = fixed_roots.to_vec();
        roots.extend(rotation.next.iter().cloned());
        roots.extend(rotation.previous.iter().cloned());
        Ok(TrustBundle::new(roots)?)
    }

    /// Issues a throwaway leaf and verifies it against the bundle, proving that key, chain and
    /// bundle fit together before any workload depends on them.
    fn self_test(&self) -> Result<(), CaError> {
        let probe = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let spki = probe.subject_public_key_info();
        let id = SpiffeId::workload(&self.trust_domain, "latch-system", "ca-self-test")
            .map_err(|e| CaError::SelfTest(e.to_string()))?;
        let issued = self.issue(&id, &spki, Duration::from_secs(60), SystemTime::now())?;
        latch_identity::verify_svid(
            &issued.chain,
            &self.bundle(),
            SystemTime::now(),
            PeerRole::Client,
        )
        .map_err(|e| CaError::SelfTest(e.to_string()))?;
        Ok(())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The roots clients trust now.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.borrow().clone()
    }

    /// Marked changed whenever the bundle or the signing root changes (each rotation step).
    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle.subscribe()
    }

    /// No leaf is issued beyond this: the earliest NotAfter from the signing certificate to its
    /// root.
    pub fn not_after(&self) -> SystemTime {
        self.signer.load().not_after
    }

    pub fn ttl_policy(&self) -> TtlPolicy {
        self.ttl
    }

    /// Every CA certificate in use: signing roots or intermediates, and the next or previous
    /// root of a rotation.
    pub fn certificates(&self) -> Vec<CaCertificate> {
        let signer = self.signer.load();
        let rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = |role, cert: &CertificateDer<'_>| {
            cert_not_after(cert).map(|not_after| CaCertificate {
                role,
                fingerprint: sha256_hex(cert),
                not_after,
            })
        };
        let mut out: Vec<CaCertificate> = Vec::new();
        out.extend(self.fixed_roots.iter().filter_map(|c| entry("root", c)));
        out.extend(
            signer
                .chain_tail
                .iter()
                .filter_map(|c| entry("intermediate", c)),
        );
        out.extend(rotation.next.iter().filter_map(|c| entry("next root", c)));
        out.extend(
            rotation
                .previous
                .iter()
                .filter_map(|c| entry("previous root", c)),
        );
        out
    }

    fn publish_bundle(&self, rotation: &Rotation) -> Result<(), CaError> {
        let roots = vec![self.signer.load().cert.clone()];
        self.publish_bundle_with(rotation, roots)
    }

    fn publish_bundle_with(
        &self,
        rotation: &Rotation,
        signing_roots: Vec<CertificateDer<'static>>,
    ) -> Result<(), CaError> {
        let bundle = Self::bundle_of(&signing_roots, rotation)?;
        self.bundle.send_replace(Arc::new(bundle));
        Ok(())
    }
}
