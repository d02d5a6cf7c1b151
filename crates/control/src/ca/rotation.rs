//! Root rotation for the self-made root, in three steps driven by `latchctl ca rotate` through
//! the admin API: `prepare` (a new root joins the bundle), `activate` (it signs; the old one
//! stays trusted) and `retire` (the old one leaves once no leaf it signed can be valid). Owns
//! the on-disk rotation state (`next/`, `previous.crt.pem`, `rotation.json`) and its recovery.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use latch_identity::bundle::sha256_hex;
use latch_identity::svid::format_time;
use latch_identity::{TrustBundle, TrustDomain, files};
use rcgen::PublicKeyData;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::sign::Signer;
use super::storage::{
    PluginFiles, RootFiles, ca_cert_facts, load_key, load_signer, parse_cert_pem, write_err,
};
use super::{Ca, CaError, TtlPolicy};

/// When the root that signs now was activated, and when its predecessor may leave the bundle.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct RotationRecord {
    pub(super) activated_at: u64,
    pub(super) retire_after: u64,
}

/// The roots beside the signing one during a rotation.
#[derive(Debug, Default)]
pub(super) struct Rotation {
    /// Prepared: in the bundle, not signing yet.
    pub(super) next: Option<CertificateDer<'static>>,
    /// Replaced: in the bundle until retired.
    pub(super) previous: Option<CertificateDer<'static>>,
    pub(super) record: Option<RotationRecord>,
}

/// Where a root rotation stands (`latchctl ca status`).
#[derive(Debug, Clone, Serialize)]
pub struct RotationStatus {
    /// `idle`, `prepared` or `activated`.
    pub phase: &'static str,
    pub certificates: Vec<CaCertificateView>,
    /// Unix seconds.
    pub activated_at: Option<u64>,
    /// Unix seconds: the previous root can be retired from then on.
    pub retire_after: Option<u64>,
    /// The longest leaf lifetime the CA issues, seconds.
    pub max_leaf_ttl_seconds: u64,
}

/// `CaCertificate` as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct CaCertificateView {
    pub role: &'static str,
    pub fingerprint: String,
    pub not_after: String,
}

/// Why a rotation step was refused.
#[derive(Debug, Error)]
pub enum RotationError {
    #[error(
        "root rotation through latchctl manages the control plane's own root in its data dir; \
         this CA is {0}: put the new root in the bundle yourself (--ca-bundle or the Secret), \
         reach every proxy, then switch the signing certificate"
    )]
    NotSelfManaged(&'static str),
    #[error(
        "a new root ({fingerprint}) is already prepared; activate it with `latchctl ca rotate \
         activate`"
    )]
    AlreadyPrepared { fingerprint: String },
    #[error(
        "the previous root ({fingerprint}) is still in the bundle; retire it first (possible from \
         {retire_after}) with `latchctl ca rotate retire`"
    )]
    PreviousStillTrusted {
        fingerprint: String,
        retire_after: String,
    },
    #[error("no new root is prepared; run `latchctl ca rotate prepare` first")]
    NothingPrepared,
    #[error("there is no previous root to retire")]
    NothingToRetire,
    #[error(
        "the previous root may still anchor live leaves until {retire_after} (activation at \
         {activated_at} plus the longest leaf lifetime, {max_ttl:?}); retire it after that"
    )]
    TooEarly {
        activated_at: String,
        retire_after: String,
        max_ttl: Duration,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
}

fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(super) fn from_unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

impl Ca {
    /// A crash between the two renames of `activate` leaves the new key as root.key.pem and the
    /// new certificate still in next/: finish the move.
    pub(super) fn finish_interrupted_activation(root: &RootFiles) -> Result<(), CaError> {
        let (next_cert, key_path) = (root.next_cert(), root.key());
        if !next_cert.exists() || root.next_key().exists() || !key_path.exists() {
            return Ok(());
        }
        let key = load_key(&key_path)?;
        let certs = parse_cert_pem(&next_cert)?;
        let facts = ca_cert_facts(&next_cert, &certs[0])?;
        if key.subject_public_key_info() != facts.spki {
            return Ok(());
        }
        tracing::warn!(dir = %root.dir.display(), "completing a root activation interrupted by a crash");
        std::fs::rename(&next_cert, root.cert()).map_err(write_err(&root.cert()))?;
        std::fs::remove_dir(root.next_dir()).map_err(write_err(&root.next_dir()))?;
        Ok(())
    }

    /// Reads the next and previous roots of a rotation in progress.
    pub(super) fn load_rotation(
        root: &RootFiles,
        signer: &Signer,
        trust_domain: &TrustDomain,
        ttl: TtlPolicy,
    ) -> Result<Rotation, CaError> {
        let mut rotation = Rotation::default();
        if root.next_key().exists() && !root.next_cert().exists() {
            // `prepare` failed between its two writes (a full disk): nothing trusts or was
            // signed by that key, so the half-made root is dropped and prepare can run again.
            tracing::warn!(dir = %root.next_dir().display(), "removing a root rotation that was only half prepared");
            std::fs::remove_dir_all(root.next_dir()).map_err(write_err(&root.next_dir()))?;
        }
        if root.next_cert().exists() || root.next_key().exists() {
            // Validates the pair (and its trust domain) the same way as the active root.
            let (next, _) = load_signer(
                &PluginFiles {
                    cert: root.next_cert(),
                    key: root.next_key(),
                    chain: None,
                    bundle: None,
                },
                trust_domain,
            )?;
            rotation.next = Some(next.cert);
        }
        let previous_path = root.previous_cert();
        if previous_path.exists() {
            let previous = parse_cert_pem(&previous_path)?.remove(0);
            if previous == signer.cert {
                // A crash before `activate` renamed anything: the activation did not happen.
                std::fs::remove_file(&previous_path).map_err(write_err(&previous_path))?;
                let _ = std::fs::remove_file(root.rotation_record());
            } else {
                let record = std::fs::read(root.rotation_record())
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<RotationRecord>(&bytes).ok());
                let record = match record {
                    Some(record) => record,
                    None => {
                        // Lost or unreadable: count from now, which keeps the old root longest.
                        let now = to_unix(SystemTime::now());
                        let record = RotationRecord {
                            activated_at: now,
                            retire_after: now + ttl.max.as_secs(),
                        };
                        Self::write_record(root, &record)?;
                        record
                    }
                };
                rotation.previous = Some(previous);
                rotation.record = Some(record);
            }
        }
        Ok(rotation)
    }

    fn write_record(root: &RootFiles, record: &RotationRecord) -> Result<(), CaError> {
        let path = root.rotation_record();
        let json = serde_json::to_vec_pretty(record).map_err(|e| CaError::Sign(e.to_string()))?;
        files::write_private(&path, &json).map_err(write_err(&path))
    }

    /// Where a root rotation stands.
    pub fn rotation_status(&self) -> RotationStatus {
        let certificates = self
            .certificates()
            .into_iter()
            .map(|c| CaCertificateView {
                role: c.role,
                fingerprint: c.fingerprint,
                not_after: format_time(c.not_after),
            })
            .collect();
        let rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
        RotationStatus {
            phase: match (&rotation.next, &rotation.previous) {
                (Some(_), _) => "prepared",
                (None, Some(_)) => "activated",
                (None, None) => "idle",
            },
            certificates,
            activated_at: rotation.record.map(|r| r.activated_at),
            retire_after: rotation.record.map(|r| r.retire_after),
            max_leaf_ttl_seconds: self.ttl.max.as_secs(),
        }
    }

    fn self_managed(&self) -> Result<&RootFiles, RotationError> {
        self.files.as_ref().ok_or(RotationError::NotSelfManaged(
            "an operator's (--ca-cert) or a Kubernetes Secret's (--ca-secret)",
        ))
    }

    /// Rotation step 1: makes a new root and adds it to the bundle. It signs nothing until
    /// `activate_rotation`.
    pub fn prepare_rotation(&self) -> Result<RotationStatus, RotationError> {
        let root = self.self_managed()?;
        {
            let mut rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(next) = &rotation.next {
                return Err(RotationError::AlreadyPrepared {
                    fingerprint: sha256_hex(next),
                });
            }
            if let Some(previous) = &rotation.previous {
                return Err(RotationError::PreviousStillTrusted {
                    fingerprint: sha256_hex(previous),
                    retire_after: rotation
                        .record
                        .map(|r| format_time(from_unix(r.retire_after)))
                        .unwrap_or_default(),
                });
            }
            let next_dir = root.next_dir();
            files::ensure_private_dir(&next_dir).map_err(write_err(&next_dir))?;
            let (cert_pem, key_pem) = Self::generate_root(&self.trust_domain)?;
            let written = files::write_private(&root.next_key(), key_pem.as_bytes())
                .map_err(write_err(&root.next_key()))
                .and_then(|()| {
                    files::write_public(&root.next_cert(), cert_pem.as_bytes())
                        .map_err(write_err(&root.next_cert()))
                });
            if let Err(e) = written {
                // Leave no half-made root behind (see `load_rotation`).
                let _ = std::fs::remove_dir_all(&next_dir);
                return Err(e.into());
            }
            let next = parse_cert_pem(&root.next_cert())?.remove(0);
            tracing::info!(fingerprint = %sha256_hex(&next), "prepared a new root: in the trust bundle, not signing yet");
            rotation.next = Some(next);
            self.publish_bundle(&rotation)?;
        }
        Ok(self.rotation_status())
    }

    /// Rotation step 2: the prepared root signs from now on; the old one stays in the bundle
    /// (as the previous root) and its key is deleted.
    pub fn activate_rotation(&self) -> Result<RotationStatus, RotationError> {
        let root = self.self_managed()?;
        {
            let mut rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(next) = rotation.next.clone() else {
                return Err(RotationError::NothingPrepared);
            };
            let old = self.signer.load().cert.clone();
            let previous_path = root.previous_cert();
            let old_pem = TrustBundle::new(vec![old.clone()])
                .map_err(CaError::from)?
                .to_pem();
            files::write_public(&previous_path, old_pem.as_bytes())
                .map_err(write_err(&previous_path))?;
            let now = to_unix(SystemTime::now());
            let record = RotationRecord {
                activated_at: now,
                retire_after: now + self.ttl.max.as_secs(),
            };
            Self::write_record(root, &record)?;
            // Key, then certificate: `finish_interrupted_activation` completes a crash between.
            std::fs::rename(root.next_key(), root.key()).map_err(write_err(&root.key()))?;
            std::fs::rename(root.next_cert(), root.cert()).map_err(write_err(&root.cert()))?;
            std::fs::remove_dir(root.next_dir()).map_err(write_err(&root.next_dir()))?;
            let (signer, _) = load_signer(
                &PluginFiles {
                    cert: root.cert(),
                    key: root.key(),
                    chain: None,
                    bundle: None,
                },
                &self.trust_domain,
            )?;
            tracing::info!(
                fingerprint = %sha256_hex(&next),
                retire_after = %format_time(from_unix(record.retire_after)),
                "activated the new root: it signs from now on; the previous root stays trusted"
            );
            self.signer.store(Arc::new(signer));
            rotation.next = None;
            rotation.previous = Some(old);
            rotation.record = Some(record);
            // The fixed root is the signer's own certificate for a self-made CA.
            self.publish_bundle_with(&rotation, vec![next])?;
        }
        Ok(self.rotation_status())
    }

    /// Rotation step 3: drops the previous root from the bundle, once no leaf it signed can
    /// still be valid (activation + the longest leaf lifetime).
    pub fn retire_rotation(&self, now: SystemTime) -> Result<RotationStatus, RotationError> {
        let root = self.self_managed()?;
        {
            let mut rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
            let (Some(_), Some(record)) = (&rotation.previous, rotation.record) else {
                return Err(RotationError::NothingToRetire);
            };
            if to_unix(now) < record.retire_after {
                return Err(RotationError::TooEarly {
                    activated_at: format_time(from_unix(record.activated_at)),
                    retire_after: format_time(from_unix(record.retire_after)),
                    max_ttl: self.ttl.max,
                });
            }
            std::fs::remove_file(root.previous_cert()).map_err(write_err(&root.previous_cert()))?;
            let _ = std::fs::remove_file(root.rotation_record());
            tracing::info!("retired the previous root: it left the trust bundle");
            rotation.previous = None;
            rotation.record = None;
            self.publish_bundle(&rotation)?;
        }
        Ok(self.rotation_status())
    }
}
