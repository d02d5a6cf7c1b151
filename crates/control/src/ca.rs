//! The certificate authority: loads or creates the signing key and certificate (a self-made
//! root persisted in the data dir, or an operator's plugged-in root/intermediate), and issues
//! leaf X509-SVIDs. The certificate service calls `Ca::issue` after authenticating the caller.
//! The self-made root rotates in three steps (`prepare`, `activate`, `retire`, driven by
//! `latchctl ca rotate` through the admin API); each step republishes the trust bundle to
//! whoever follows `subscribe_bundle`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use latch_identity::bundle::sha256_hex;

use latch_identity::svid::format_time;
use latch_identity::{PeerRole, SpiffeId, SvidInfo, TrustBundle, TrustDomain, files};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Lifetime of a root the control plane makes for itself.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far NotBefore is backdated, for clock skew between peers.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// Shortest TTL a caller may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
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

/// Where an operator's own CA material lives (plug-in mode).
#[derive(Debug, Clone)]
pub struct PluginFiles {
    /// The signing certificate: a root, or an intermediate issued by the operator's root.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Intermediates between `cert` and the root, PEM, nearest first.
    pub chain: Option<PathBuf>,
    /// The root(s) to distribute as the trust bundle; defaults to `cert` when it is a root.
    pub bundle: Option<PathBuf>,
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

/// The key and certificate that sign leaves.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate.
    cert: CertificateDer<'static>,
    /// Certificates sent after the leaf: empty for a root, else the intermediate(s).
    chain_tail: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    /// The earliest NotAfter from the signing certificate up to the root that anchors it: no
    /// leaf is issued beyond it.
    not_after: SystemTime,
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

/// Where the self-made root and its rotation live: `<data-dir>/ca/`.
#[derive(Debug, Clone)]
struct RootFiles {
    dir: PathBuf,
}

impl RootFiles {
    fn cert(&self) -> PathBuf {
        self.dir.join("root.crt.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("root.key.pem")
    }
    fn next_dir(&self) -> PathBuf {
        self.dir.join("next")
    }
    fn next_cert(&self) -> PathBuf {
        self.next_dir().join("root.crt.pem")
    }
    fn next_key(&self) -> PathBuf {
        self.next_dir().join("root.key.pem")
    }
    fn previous_cert(&self) -> PathBuf {
        self.dir.join("previous.crt.pem")
    }
    fn rotation_record(&self) -> PathBuf {
        self.dir.join("rotation.json")
    }
}

/// When the root that signs now was activated, and when its predecessor may leave the bundle.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct RotationRecord {
    activated_at: u64,
    retire_after: u64,
}

/// The roots beside the signing one during a rotation.
#[derive(Debug, Default)]
struct Rotation {
    /// Prepared: in the bundle, not signing yet.
    next: Option<CertificateDer<'static>>,
    /// Replaced: in the bundle until retired.
    previous: Option<CertificateDer<'static>>,
    record: Option<RotationRecord>,
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

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_path_buf();
    move |source| CaError::Write { path, source }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // SystemRandom only fails when the OS has no entropy source; fall back to the clock so we
    // never issue a fixed serial, and keep the serial positive and 128 bits long.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = nanos.to_be_bytes();
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x40;
    SerialNumber::from_slice(&bytes)
}

fn parse_cert_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::CorruptCert {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CaError::CorruptCert {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = read(path)?;
    let text = String::from_utf8(pem).map_err(|_| CaError::CorruptKey {
        path: path.to_path_buf(),
        reason: "not UTF-8 PEM text".into(),
    })?;
    let key = KeyPair::from_pem(&text).map_err(|e| CaError::CorruptKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if files::is_exposed(path).unwrap_or(false) {
        tracing::warn!(path = %path.display(), "CA key file is readable by group or others; chmod 600 it");
    }
    Ok(key)
}

fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn from_unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// Facts about a CA certificate read with x509-parser.
struct CaCertFacts {
    not_before: SystemTime,
    not_after: SystemTime,
    self_signed: bool,
    spki: Vec<u8>,
    trust_domain: Option<String>,
}

fn ca_cert_facts(path: &Path, der: &CertificateDer<'_>) -> Result<CaCertFacts, CaError> {
    let not_ca = |reason: &str| CaError::NotACa {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CaError::CorruptCert {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| not_ca(&e.to_string()))?;
    if !bc.is_some_and(|bc| bc.value.ca) {
        return Err(not_ca("basicConstraints CA is not true"));
    }
    let ku = cert.key_usage().map_err(|e| not_ca(&e.to_string()))?;
    if ku.is_some_and(|ku| !ku.value.key_cert_sign()) {
        return Err(not_ca("keyUsage lacks keyCertSign"));
    }
    let trust_domain = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => SpiffeId::parse(u).ok(),
                _ => None,
            })
        })
        .map(|id| id.trust_domain_name().to_string());
    Ok(CaCertFacts {
        not_before: asn1_time(cert.validity().not_before),
        not_after: asn1_time(cert.validity().not_after),
        self_signed: cert.subject() == cert.issuer(),
        spki: cert.public_key().raw.to_vec(),
        trust_domain,
    })
}

fn asn1_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0).unsigned_abs())
}

/// NotAfter of a certificate, if it parses.
fn cert_not_after(der: &CertificateDer<'_>) -> Option<SystemTime> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| asn1_time(c.validity().not_after))
}

/// The earliest NotAfter on the path from `certs` (signing certificate first, then its
/// intermediates) to the root in `roots` that issued the last of them.
fn chain_not_after(
    certs: &[&CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Option<SystemTime> {
    let mut earliest = certs.iter().filter_map(|c| cert_not_after(c)).min()?;
    let (_, top) = X509Certificate::from_der(certs.last()?).ok()?;
    if top.subject() != top.issuer() {
        let anchors = roots.iter().filter_map(|root| {
            let (_, parsed) = X509Certificate::from_der(root).ok()?;
            (parsed.subject() == top.issuer()).then(|| asn1_time(parsed.validity().not_after))
        });
        if let Some(anchor) = anchors.min() {
            earliest = earliest.min(anchor);
        }
    }
    Some(earliest)
}

/// Loads a signing certificate and key; returns the signer and the roots its chain leads to
/// (the certificate itself when it is a root).
fn load_signer(
    files: &PluginFiles,
    trust_domain: &TrustDomain,
) -> Result<(Signer, Vec<CertificateDer<'static>>), CaError> {
    let certs = parse_cert_pem(&files.cert)?;
    let signing_cert = certs[0].clone();
    let facts = ca_cert_facts(&files.cert, &signing_cert)?;
    if let Some(found) = &facts.trust_domain
        && found != trust_domain.as_str()
    {
        return Err(CaError::TrustDomainMismatch {
            found: found.clone(),
            configured: trust_domain.to_string(),
        });
    }
    let key = load_key(&files.key)?;
    if key.subject_public_key_info() != facts.spki {
        return Err(CaError::KeyMismatch);
    }
    let mut chain_tail = Vec::new();
    if !facts.self_signed {
        chain_tail.push(signing_cert.clone());
        // Extra certificates in the cert file are treated as the rest of the chain.
        chain_tail.extend(certs.into_iter().skip(1));
    }
    if let Some(chain) = &files.chain {
        chain_tail.extend(parse_cert_pem(chain)?);
    }
    let roots = match (&files.bundle, facts.self_signed) {
        (Some(path), _) => parse_cert_pem(path)?,
        (None, true) => vec![signing_cert.clone()],
        (None, false) => {
            return Err(CaError::SelfTest(
                "the CA certificate is an intermediate and no --ca-bundle (root) was given".into(),
            ));
        }
    };
    let path: Vec<&CertificateDer<'static>> = if facts.self_signed {
        vec![&signing_cert]
    } else {
        chain_tail.iter().collect()
    };
    let not_after = chain_not_after(&path, &roots).unwrap_or(facts.not_after);
    let issuer =
        Issuer::from_ca_cert_der(&signing_cert, key).map_err(|e| CaError::CorruptCert {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    Ok((
        Signer {
            issuer,
            cert: signing_cert,
            chain_tail,
            not_before: facts.not_before,
            not_after,
        },
        roots,
    ))
}

impl Ca {
    /// Loads the CA from `<data_dir>/ca/`, creating a new root on first start. A missing half,
    /// an unreadable or corrupt file is an error: a silently regenerated root would break every
    /// workload's trust. A rotation in progress (a prepared `next/` root, a `previous.crt.pem`
    /// still trusted) is picked up; a crash in the middle of `activate` is completed.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        ttl: TtlPolicy,
    ) -> Result<Self, CaError> {
        let root = RootFiles {
            dir: data_dir.join("ca"),
        };
        let (cert_path, key_path) = (root.cert(), root.key());
        Self::finish_interrupted_activation(&root)?;
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {}
            (false, false) => {
                Self::create_root(&root.dir, &cert_path, &key_path, trust_domain)?;
            }
            (true, false) => {
                return Err(CaError::HalfPresent {
                    present: cert_path,
                    missing: key_path,
                    dir: root.dir,
                });
            }
            (false, true) => {
                return Err(CaError::HalfPresent {
                    present: key_path,
                    missing: cert_path,
                    dir: root.dir,
                });
            }
        }
        let (signer, roots) = load_signer(
            &PluginFiles {
                cert: cert_path,
                key: key_path,
                chain: None,
                bundle: None,
            },
            trust_domain,
        )?;
        let rotation = Self::load_rotation(&root, &signer, trust_domain, ttl)?;
        Self::assemble(trust_domain, ttl, signer, roots, Some(root), rotation)
    }

    /// Loads an operator-provided CA (plug-in mode).
    pub fn from_files(
        files: &PluginFiles,
        trust_domain: &TrustDomain,
        ttl: TtlPolicy,
    ) -> Result<Self, CaError> {
        let (signer, roots) = load_signer(files, trust_domain)?;
        Self::assemble(trust_domain, ttl, signer, roots, None, Rotation::default())
    }

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

    /// A crash between the two renames of `activate` leaves the new key as root.key.pem and the
    /// new certificate still in next/: finish the move.
    fn finish_interrupted_activation(root: &RootFiles) -> Result<(), CaError> {
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
    fn load_rotation(
        root: &RootFiles,
        signer: &Signer,
        trust_domain: &TrustDomain,
        ttl: TtlPolicy,
    ) -> Result<Rotation, CaError> {
        let mut rotation = Rotation::default();
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

    fn create_root(
        dir: &Path,
        cert_path: &Path,
        key_path: &Path,
        trust_domain: &TrustDomain,
    ) -> Result<(), CaError> {
        files::ensure_private_dir(dir).map_err(write_err(dir))?;
        let (cert_pem, key_pem) = Self::generate_root(trust_domain)?;
        // Key first: a crash between the two writes leaves a key without a cert, which the next
        // start reports instead of silently replacing.
        files::write_private(key_path, key_pem.as_bytes()).map_err(write_err(key_path))?;
        files::write_public(cert_path, cert_pem.as_bytes()).map_err(write_err(cert_path))?;
        tracing::info!(cert = %cert_path.display(), "generated a new root CA for {trust_domain}");
        Ok(())
    }

    /// A new self-signed root for `trust_domain`: (certificate PEM, PKCS#8 key PEM).
    pub(crate) fn generate_root(trust_domain: &TrustDomain) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Latch");
        dn.push(
            DnType::CommonName,
            format!("Latch root CA for {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            trust_domain
                .id()
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem()))
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
            files::write_private(&root.next_key(), key_pem.as_bytes())
                .map_err(write_err(&root.next_key()))?;
            files::write_public(&root.next_cert(), cert_pem.as_bytes())
                .map_err(write_err(&root.next_cert()))?;
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

    /// Issues a leaf X509-SVID for `id` over the public key `spki_der` (a DER
    /// SubjectPublicKeyInfo). The caller has authenticated `id`; nothing else from the request
    /// reaches the certificate.
    pub fn issue(
        &self,
        id: &SpiffeId,
        spki_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        let san = SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        );
        let (chain, _) = self.sign_leaf(
            vec![san],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            spki_der,
            ttl,
            now,
        )?;
        let info = SvidInfo::from_leaf(&chain[0]).map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(IssuedSvid { chain, info })
    }

    /// Issues a TLS server certificate for `dns_names` over `spki_der`, for the one endpoint
    /// whose clients verify a DNS name rather than a SPIFFE ID: the admission webhook, which
    /// the Kubernetes API server reaches as `<service>.<namespace>.svc`. Not an SVID: DNS SANs
    /// only, serverAuth only. Returns the chain (leaf first) and the leaf's NotAfter.
    pub fn issue_server_cert(
        &self,
        dns_names: &[&str],
        spki_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), CaError> {
        let sans = dns_names
            .iter()
            .map(|name| {
                (*name)
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e: rcgen::Error| CaError::Sign(format!("DNS name {name:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.sign_leaf(
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            spki_der,
            ttl,
            now,
        )
    }

    /// Signs a leaf with the given SANs and extended key usages: CA:false, keyUsage
    /// digitalSignature, AKI, a random serial, an empty subject, NotBefore backdated and
    /// NotAfter within the validity of every certificate up to the root. Returns the chain and
    /// the leaf's NotAfter.
    fn sign_leaf(
        &self,
        sans: Vec<SanType>,
        extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
        spki_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), CaError> {
        let signer = self.signer.load();
        if now >= signer.not_after {
            return Err(CaError::IssuerExpired(format_time(signer.not_after)));
        }
        if now < signer.not_before {
            return Err(CaError::IssuerNotYetValid(format_time(signer.not_before)));
        }
        let public_key = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| CaError::PublicKey(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = extended_key_usages;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let not_after = (now + ttl).min(signer.not_after);
        params.not_before = (now - BACKDATE).max(signer.not_before).into();
        params.not_after = not_after.into();
        let leaf = params
            .signed_by(&public_key, &signer.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + signer.chain_tail.len());
        chain.push(leaf.der().clone());
        chain.extend(signer.chain_tail.iter().cloned());
        Ok((chain, not_after))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, digest};
    use rcgen::KeyIdMethod;
    use tempfile::TempDir;
    use x509_parser::extensions::{ExtendedKeyUsage, GeneralName, ParsedExtension};

    use super::*;

    const TD: &str = "test.latch";
    const HOUR: Duration = Duration::from_secs(3600);

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    /// Now in whole seconds: X.509 times have one-second precision.
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix(SystemTime::now()).unsigned_abs())
    }

    fn unix(t: SystemTime) -> i64 {
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        i64::try_from(secs).unwrap()
    }

    fn workload_id() -> SpiffeId {
        SpiffeId::workload(&td(TD), "demo", "web").unwrap()
    }

    /// The DER SubjectPublicKeyInfo of a fresh workload key.
    fn workload_spki() -> Vec<u8> {
        KeyPair::generate().unwrap().subject_public_key_info()
    }

    /// A data dir holding a root the control plane made for `trust_domain`.
    fn data_dir_with_root(trust_domain: &str) -> (TempDir, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), &td(trust_domain), TtlPolicy::default()).unwrap();
        (dir, ca)
    }

    fn root_cert_path(data_dir: &Path) -> PathBuf {
        data_dir.join("ca/root.crt.pem")
    }

    fn root_key_path(data_dir: &Path) -> PathBuf {
        data_dir.join("ca/root.key.pem")
    }

    /// Every entry of `<data_dir>/ca` with its bytes (`None` for a folder).
    fn ca_dir_contents(data_dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
        fs::read_dir(data_dir.join("ca"))
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                (name, fs::read(entry.path()).ok())
            })
            .collect()
    }

    /// Loads `data_dir` for `trust_domain`, expecting a refusal that leaves `<data_dir>/ca`
    /// exactly as it was: no new root, no rewritten file.
    fn refused_load(data_dir: &Path, trust_domain: &str) -> CaError {
        let before = ca_dir_contents(data_dir);
        let err = Ca::load_or_create(data_dir, &td(trust_domain), TtlPolicy::default())
            .expect_err("the load must be refused");
        assert_eq!(
            ca_dir_contents(data_dir),
            before,
            "a refused load changed the CA files ({err})"
        );
        err
    }

    /// The subject and authority key identifiers of a certificate.
    fn key_ids(der: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let mut ids = (None, None);
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => ids.0 = Some(id.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    ids.1 = aki.key_identifier.as_ref().map(|id| id.0.to_vec());
                }
                _ => {}
            }
        }
        ids
    }

    fn not_after(der: &[u8]) -> i64 {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        cert.validity().not_after.timestamp()
    }

    /// CA material an operator made outside Latch (plug-in mode). Its key identifier is a
    /// SHA-1 hash, as OpenSSL makes it, rather than rcgen's default, so a leaf's AKI shows
    /// whether it was copied from the issuer.
    struct OperatorCa {
        cert_pem: String,
        key_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl OperatorCa {
        /// A certificate named `name`, valid from an hour ago until `lifetime` from now,
        /// signed by `parent` or else self-signed.
        fn new(name: &str, is_ca: IsCa, lifetime: Duration, parent: Option<&OperatorCa>) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = is_ca;
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.subject_alt_names = vec![SanType::URI(td(TD).id().as_str().try_into().unwrap())];
            let ski = digest(&SHA1_FOR_LEGACY_USE_ONLY, &key.subject_public_key_info());
            params.key_identifier_method = KeyIdMethod::PreSpecified(ski.as_ref().to_vec());
            params.use_authority_key_identifier_extension = parent.is_some();
            params.not_before = (now() - HOUR).into();
            params.not_after = (now() + lifetime).into();
            let cert = match parent {
                Some(parent) => params.signed_by(&key, &parent.issuer),
                None => params.self_signed(&key),
            }
            .unwrap();
            Self {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                issuer: Issuer::new(params, key),
            }
        }

        fn root(name: &str, lifetime: Duration) -> Self {
            Self::new(
                name,
                IsCa::Ca(BasicConstraints::Unconstrained),
                lifetime,
                None,
            )
        }

        fn der(&self) -> CertificateDer<'static> {
            CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()
        }
    }

    /// Writes `signer` (certificate and key) and `bundle` to `dir` and loads them as a
    /// plug-in CA.
    fn plug_in(
        dir: &Path,
        signer: &OperatorCa,
        bundle: Option<&OperatorCa>,
    ) -> Result<Ca, CaError> {
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            fs::write(&path, pem).unwrap();
            path
        };
        let files = PluginFiles {
            cert: write("ca.crt.pem", &signer.cert_pem),
            key: write("ca.key.pem", &signer.key_pem),
            chain: None,
            bundle: bundle.map(|root| write("roots.pem", &root.cert_pem)),
        };
        Ca::from_files(&files, &td(TD), TtlPolicy::default())
    }

    #[test]
    fn first_start_creates_a_private_root_and_restart_keeps_it() {
        let (dir, first) = data_dir_with_root(TD);
        let key_path = root_key_path(dir.path());
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key_path), 0o600, "CA key must be private");
        assert_eq!(mode(&dir.path().join("ca")), 0o700);
        let cert_pem = fs::read(root_cert_path(dir.path())).unwrap();
        assert_eq!(
            first.bundle().roots(),
            [CertificateDer::from_pem_slice(&cert_pem).unwrap()],
            "the bundle is the persisted root"
        );
        let key_pem = fs::read(&key_path).unwrap();

        let second = Ca::load_or_create(dir.path(), &td(TD), TtlPolicy::default()).unwrap();
        assert_eq!(second.bundle().roots(), first.bundle().roots());
        assert_eq!(fs::read(root_cert_path(dir.path())).unwrap(), cert_pem);
        assert_eq!(fs::read(&key_path).unwrap(), key_pem);
    }

    #[test]
    fn corrupt_key_is_refused_naming_the_file() {
        let garbage: [&[u8]; 3] = [
            b"\xff\xfe\x00garbage",
            b"not a key at all\n",
            b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        ];
        for contents in garbage {
            let (dir, _) = data_dir_with_root(TD);
            let key_path = root_key_path(dir.path());
            fs::write(&key_path, contents).unwrap();
            match refused_load(dir.path(), TD) {
                CaError::CorruptKey { path, .. } => assert_eq!(path, key_path),
                other => panic!("{contents:?}: expected CorruptKey, got {other:?}"),
            }
        }
    }

    #[test]
    fn half_present_ca_dir_is_refused() {
        for (remove, keep) in [
            (
                root_key_path as fn(&Path) -> PathBuf,
                root_cert_path as fn(&Path) -> PathBuf,
            ),
            (root_cert_path, root_key_path),
        ] {
            let (dir, _) = data_dir_with_root(TD);
            fs::remove_file(remove(dir.path())).unwrap();
            match refused_load(dir.path(), TD) {
                CaError::HalfPresent {
                    present, missing, ..
                } => {
                    assert_eq!(present, keep(dir.path()));
                    assert_eq!(missing, remove(dir.path()));
                }
                other => panic!("expected HalfPresent, got {other:?}"),
            }
        }
    }

    #[test]
    fn unreadable_key_is_refused() {
        let (dir, _) = data_dir_with_root(TD);
        let key_path = root_key_path(dir.path());
        fs::remove_file(&key_path).unwrap();
        fs::create_dir(&key_path).unwrap();
        match refused_load(dir.path(), TD) {
            CaError::Read { path, .. } => assert_eq!(path, key_path),
            other => panic!("expected Read, got {other:?}"),
        }
    }

    #[test]
    fn key_of_another_ca_is_refused() {
        let (dir, _) = data_dir_with_root(TD);
        let (other, _) = data_dir_with_root(TD);
        fs::copy(root_key_path(other.path()), root_key_path(dir.path())).unwrap();
        let err = refused_load(dir.path(), TD);
        assert!(matches!(err, CaError::KeyMismatch), "got {err:?}");
    }

    #[test]
    fn root_of_another_trust_domain_is_refused() {
        let (dir, _) = data_dir_with_root("a.example");
        match refused_load(dir.path(), "b.example") {
            CaError::TrustDomainMismatch { found, configured } => {
                assert_eq!(
                    (found.as_str(), configured.as_str()),
                    ("a.example", "b.example")
                );
            }
            other => panic!("expected TrustDomainMismatch, got {other:?}"),
        }
    }

    #[test]
    fn issued_leaf_is_an_x509_svid_for_exactly_the_given_id() {
        let (_dir, ca) = data_dir_with_root(TD);
        // Well after the root's own NotBefore, so the backdated NotBefore is not clamped to it.
        let now = now() + HOUR;
        let ttl = Duration::from_secs(600);
        let issued = ca
            .issue(&workload_id(), &workload_spki(), ttl, now)
            .unwrap();
        assert_eq!(issued.chain.len(), 1, "a root CA sends the leaf alone");
        let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();

        let san = leaf.subject_alternative_name().unwrap().expect("SAN");
        assert_eq!(
            san.value.general_names,
            [GeneralName::URI(workload_id().as_str())]
        );
        let bc = leaf.basic_constraints().unwrap().expect("basicConstraints");
        assert!(bc.critical && !bc.value.ca, "{bc:?}");
        let ku = leaf.key_usage().unwrap().expect("keyUsage");
        assert!(ku.critical);
        assert_eq!(ku.value.flags, 1, "keyUsage is {}", ku.value);
        let eku = leaf.extended_key_usage().unwrap().expect("extKeyUsage");
        assert_eq!(
            *eku.value,
            ExtendedKeyUsage {
                any: false,
                server_auth: true,
                client_auth: true,
                code_signing: false,
                email_protection: false,
                time_stamping: false,
                ocsp_signing: false,
                other: vec![],
            }
        );

        let (ski, aki) = key_ids(&issued.chain[0]);
        let (root_ski, _) = key_ids(&ca.bundle().roots()[0]);
        assert!(ski.is_some_and(|id| !id.is_empty()), "leaf lacks an SKI");
        assert!(root_ski.is_some());
        assert_eq!(aki, root_ski, "AKI must name the issuer's SKI");

        let serial = leaf.raw_serial();
        assert_eq!(serial.len(), 16);
        assert!(serial[0] & 0x80 == 0, "serial must be positive");
        let again = ca
            .issue(&workload_id(), &workload_spki(), ttl, now)
            .unwrap();
        assert_ne!(again.info.serial, issued.info.serial);

        assert_eq!(leaf.validity().not_before.timestamp(), unix(now) - 60);
        assert_eq!(leaf.validity().not_after.timestamp(), unix(now + ttl));
        assert_eq!(issued.info.id, workload_id());
        for role in [PeerRole::Server, PeerRole::Client] {
            latch_identity::verify_svid(&issued.chain, &ca.bundle(), now, role).unwrap();
        }
    }

    #[test]
    fn leaf_never_outlives_its_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let root = OperatorCa::root("Short-lived root", Duration::from_secs(600));
        let ca = plug_in(dir.path(), &root, None).unwrap();
        let issued = ca
            .issue(&workload_id(), &workload_spki(), HOUR, now())
            .unwrap();
        assert_eq!(issued.info.not_after, ca.not_after());
        assert_eq!(not_after(&issued.chain[0]), not_after(&root.der()));
        assert!(
            issued.info.lifetime() < HOUR,
            "{:?}",
            issued.info.lifetime()
        );
    }

    #[test]
    fn leaf_never_outlives_the_root_above_a_longer_lived_intermediate() {
        let dir = tempfile::tempdir().unwrap();
        let root = OperatorCa::root("Root expiring soon", Duration::from_secs(600));
        let intermediate = OperatorCa::new(
            "Intermediate outliving its root",
            IsCa::Ca(BasicConstraints::Unconstrained),
            Duration::from_secs(30 * 24 * 3600),
            Some(&root),
        );
        let ca = plug_in(dir.path(), &intermediate, Some(&root)).unwrap();
        let issued = ca
            .issue(&workload_id(), &workload_spki(), HOUR, now())
            .unwrap();
        assert_eq!(not_after(&issued.chain[0]), not_after(&root.der()));
        assert_eq!(issued.info.not_after, ca.not_after());
        let roles: Vec<&str> = ca.certificates().iter().map(|c| c.role).collect();
        assert_eq!(roles, ["root", "intermediate"]);
    }

    /// Issues a leaf and verifies it against `bundle`.
    fn issue_and_verify(ca: &Ca, bundle: &TrustBundle) -> Result<(), String> {
        let issued = ca
            .issue(&workload_id(), &workload_spki(), HOUR, now())
            .unwrap();
        latch_identity::verify_svid(&issued.chain, bundle, now(), PeerRole::Client)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn root_rotation_prepare_activate_retire_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = TtlPolicy {
            default: Duration::from_secs(60),
            max: HOUR,
        };
        let ca = Ca::load_or_create(dir.path(), &td(TD), ttl).unwrap();
        let old_root = ca.bundle().roots()[0].clone();
        let only_old = TrustBundle::new(vec![old_root.clone()]).unwrap();
        let old_leaf = ca
            .issue(&workload_id(), &workload_spki(), HOUR, now())
            .unwrap();
        let mut bundles = ca.subscribe_bundle();
        bundles.borrow_and_update();

        // prepare: the new root joins the bundle (announced) and signs nothing.
        let status = ca.prepare_rotation().unwrap();
        assert_eq!(status.phase, "prepared");
        assert!(bundles.has_changed().unwrap(), "subscribers are told");
        assert_eq!(ca.bundle().roots().len(), 2);
        let new_root = ca.bundle().roots()[1].clone();
        issue_and_verify(&ca, &only_old).expect("still signed by the old root");
        let next_key = dir.path().join("ca/next/root.key.pem");
        assert_eq!(
            fs::metadata(&next_key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            ca.prepare_rotation(),
            Err(RotationError::AlreadyPrepared { .. })
        ));
        drop(ca);
        let ca = Ca::load_or_create(dir.path(), &td(TD), ttl).unwrap();
        assert_eq!(
            ca.rotation_status().phase,
            "prepared",
            "kept across a restart"
        );
        assert_eq!(ca.bundle().roots(), [old_root.clone(), new_root.clone()]);

        // activate: the new root signs; leaves of either root verify against the bundle.
        let status = ca.activate_rotation().unwrap();
        assert_eq!(status.phase, "activated");
        let only_new = TrustBundle::new(vec![new_root.clone()]).unwrap();
        issue_and_verify(&ca, &only_new).expect("signed by the new root");
        assert!(issue_and_verify(&ca, &only_old).is_err());
        latch_identity::verify_svid(&old_leaf.chain, &ca.bundle(), now(), PeerRole::Client)
            .expect("leaves of the old root stay valid");
        let key =
            KeyPair::from_pem(&fs::read_to_string(root_key_path(dir.path())).unwrap()).unwrap();
        let (_, new_cert) = X509Certificate::from_der(&new_root).unwrap();
        assert_eq!(
            key.subject_public_key_info(),
            new_cert.public_key().raw,
            "the old root's key is gone: root.key.pem is the new root's"
        );
        assert!(!dir.path().join("ca/next").exists());
        let retire_after = status.retire_after.unwrap();
        assert_eq!(retire_after, status.activated_at.unwrap() + 3600);

        // retire: refused until the longest leaf lifetime has passed, also after a restart.
        drop(ca);
        let ca = Ca::load_or_create(dir.path(), &td(TD), ttl).unwrap();
        assert_eq!(ca.rotation_status().retire_after, Some(retire_after));
        assert_eq!(ca.bundle().roots(), [new_root.clone(), old_root.clone()]);
        let err = ca.retire_rotation(now()).unwrap_err();
        assert!(matches!(err, RotationError::TooEarly { .. }), "{err}");
        assert!(ca.prepare_rotation().is_err(), "one rotation at a time");
        ca.retire_rotation(from_unix(retire_after)).unwrap();
        assert_eq!(ca.bundle().roots(), std::slice::from_ref(&new_root));
        assert!(matches!(
            ca.retire_rotation(from_unix(retire_after)),
            Err(RotationError::NothingToRetire)
        ));
        drop(ca);
        let ca = Ca::load_or_create(dir.path(), &td(TD), ttl).unwrap();
        assert_eq!(ca.rotation_status().phase, "idle");
        assert_eq!(ca.bundle().roots(), [new_root]);
    }

    #[test]
    fn an_activation_interrupted_between_its_renames_is_completed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), &td(TD), TtlPolicy::default()).unwrap();
        let old_root = ca.bundle().roots()[0].clone();
        ca.prepare_rotation().unwrap();
        let new_root = ca.bundle().roots()[1].clone();
        drop(ca);
        // What `activate` wrote before the crash: the previous root, the record, the key.
        let ca_dir = dir.path().join("ca");
        fs::copy(ca_dir.join("root.crt.pem"), ca_dir.join("previous.crt.pem")).unwrap();
        fs::write(
            ca_dir.join("rotation.json"),
            r#"{"activated_at": 1, "retire_after": 2}"#,
        )
        .unwrap();
        fs::rename(
            ca_dir.join("next/root.key.pem"),
            ca_dir.join("root.key.pem"),
        )
        .unwrap();

        let ca = Ca::load_or_create(dir.path(), &td(TD), TtlPolicy::default()).unwrap();
        assert_eq!(ca.rotation_status().phase, "activated");
        assert_eq!(ca.bundle().roots(), [new_root.clone(), old_root]);
        issue_and_verify(&ca, &TrustBundle::new(vec![new_root]).unwrap()).unwrap();
        assert!(!ca_dir.join("next").exists());
    }

    #[test]
    fn plugged_in_cas_are_not_rotated_through_latchctl() {
        let dir = tempfile::tempdir().unwrap();
        let root = OperatorCa::root("Operator root", HOUR);
        let ca = plug_in(dir.path(), &root, None).unwrap();
        let err = ca.prepare_rotation().unwrap_err();
        assert!(matches!(err, RotationError::NotSelfManaged(_)), "{err}");
        assert!(err.to_string().contains("--ca-cert"), "{err}");
        assert_eq!(ca.bundle().roots().len(), 1);
    }

    #[test]
    fn signing_is_refused_outside_the_issuers_validity() {
        let (_dir, ca) = data_dir_with_root(TD);
        let after = ca.not_after() + Duration::from_secs(1);
        let err = ca
            .issue(&workload_id(), &workload_spki(), HOUR, after)
            .unwrap_err();
        assert!(
            matches!(&err, CaError::IssuerExpired(at) if *at == format_time(ca.not_after())),
            "got {err:?}"
        );
        let before = now() - HOUR;
        let err = ca
            .issue(&workload_id(), &workload_spki(), HOUR, before)
            .unwrap_err();
        assert!(matches!(err, CaError::IssuerNotYetValid(_)), "got {err:?}");
    }

    #[test]
    fn plugged_in_intermediate_is_sent_with_the_leaf_and_chains_to_the_operator_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = OperatorCa::root("Operator root", 10 * HOUR);
        let intermediate = OperatorCa::new(
            "Operator intermediate",
            IsCa::Ca(BasicConstraints::Constrained(0)),
            5 * HOUR,
            Some(&root),
        );
        let ca = plug_in(dir.path(), &intermediate, Some(&root)).unwrap();
        assert_eq!(ca.bundle().roots(), [root.der()]);
        let issued = ca
            .issue(&workload_id(), &workload_spki(), HOUR, now())
            .unwrap();
        assert_eq!(issued.chain.len(), 2);
        assert_eq!(issued.chain[1], intermediate.der());
        assert_eq!(key_ids(&issued.chain[0]).1, key_ids(&intermediate.der()).0);
        let operator_bundle = TrustBundle::new(vec![root.der()]).unwrap();
        let info =
            latch_identity::verify_svid(&issued.chain, &operator_bundle, now(), PeerRole::Client)
                .unwrap();
        assert_eq!(info.id, workload_id());
    }

    #[test]
    fn plugged_in_intermediate_without_its_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = OperatorCa::root("Operator root", 10 * HOUR);
        let intermediate = OperatorCa::new(
            "Operator intermediate",
            IsCa::Ca(BasicConstraints::Unconstrained),
            5 * HOUR,
            Some(&root),
        );
        let err = plug_in(dir.path(), &intermediate, None).unwrap_err();
        assert!(matches!(err, CaError::SelfTest(_)), "got {err:?}");
        // A bundle that is not the intermediate's root fails the self-test too.
        let stranger = OperatorCa::root("Another root", 10 * HOUR);
        let err = plug_in(dir.path(), &intermediate, Some(&stranger)).unwrap_err();
        assert!(matches!(err, CaError::SelfTest(_)), "got {err:?}");
    }

    #[test]
    fn plugged_in_certificate_that_is_not_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_ca = OperatorCa::new("Not a CA", IsCa::ExplicitNoCa, HOUR, None);
        match plug_in(dir.path(), &not_a_ca, None).unwrap_err() {
            CaError::NotACa { path, .. } => assert_eq!(path, dir.path().join("ca.crt.pem")),
            other => panic!("expected NotACa, got {other:?}"),
        }
    }

    #[test]
    fn ttl_policy_resolves_requests() {
        let policy = TtlPolicy {
            default: HOUR,
            max: 2 * HOUR,
        };
        let secs = Duration::from_secs;
        let cases = [
            (None, Ok(HOUR)),
            (Some(secs(1)), Ok(secs(1))),
            (Some(2 * HOUR), Ok(2 * HOUR)),
            (
                Some(2 * HOUR + secs(1)),
                Err(TtlError::TooLong {
                    requested: 2 * HOUR + secs(1),
                    max: 2 * HOUR,
                }),
            ),
            (
                Some(secs(0)),
                Err(TtlError::TooShort { requested: secs(0) }),
            ),
        ];
        for (requested, expected) in cases {
            assert_eq!(policy.resolve(requested), expected, "{requested:?}");
        }
    }
}
