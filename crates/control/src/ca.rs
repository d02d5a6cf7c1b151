//! The certificate authority: loads or creates the signing key and certificate (a self-made
//! root persisted in the data dir, or an operator's plugged-in root/intermediate), and issues
//! leaf X509-SVIDs. The certificate service calls `Ca::issue` after authenticating the caller.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use latch_identity::svid::format_time;
use latch_identity::{PeerRole, SpiffeId, SvidInfo, TrustBundle, TrustDomain, files};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use thiserror::Error;
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

/// A signing CA.
pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// Certificates sent after the leaf: empty for a root, else the intermediate(s).
    chain_tail: Vec<CertificateDer<'static>>,
    bundle: TrustBundle,
    not_before: SystemTime,
    not_after: SystemTime,
    ttl: TtlPolicy,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &format_time(self.not_after))
            .field("intermediates", &self.chain_tail.len())
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
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
    let to_time = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0).unsigned_abs());
    Ok(CaCertFacts {
        not_before: to_time(cert.validity().not_before.timestamp()),
        not_after: to_time(cert.validity().not_after.timestamp()),
        self_signed: cert.subject() == cert.issuer(),
        spki: cert.public_key().raw.to_vec(),
        trust_domain,
    })
}

impl Ca {
    /// Loads the CA from `<data_dir>/ca/`, creating a new root on first start. A missing half,
    /// an unreadable or corrupt file is an error: a silently regenerated root would break every
    /// workload's trust.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        ttl: TtlPolicy,
    ) -> Result<Self, CaError> {
        let dir = data_dir.join("ca");
        let cert_path = dir.join("root.crt.pem");
        let key_path = dir.join("root.key.pem");
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {}
            (false, false) => {
                Self::create_root(&dir, &cert_path, &key_path, trust_domain)?;
            }
            (true, false) => {
                return Err(CaError::HalfPresent {
                    present: cert_path,
                    missing: key_path,
                    dir,
                });
            }
            (false, true) => {
                return Err(CaError::HalfPresent {
                    present: key_path,
                    missing: cert_path,
                    dir,
                });
            }
        }
        Self::from_files(
            &PluginFiles {
                cert: cert_path,
                key: key_path,
                chain: None,
                bundle: None,
            },
            trust_domain,
            ttl,
        )
    }

    fn create_root(
        dir: &Path,
        cert_path: &Path,
        key_path: &Path,
        trust_domain: &TrustDomain,
    ) -> Result<(), CaError> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Write { path, source }
        };
        files::ensure_private_dir(dir).map_err(write_err(dir))?;
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
        // Key first: a crash between the two writes leaves a key without a cert, which the next
        // start reports instead of silently replacing.
        files::write_private(key_path, key.serialize_pem().as_bytes())
            .map_err(write_err(key_path))?;
        files::write_public(cert_path, cert.pem().as_bytes()).map_err(write_err(cert_path))?;
        tracing::info!(cert = %cert_path.display(), "generated a new root CA for {trust_domain}");
        Ok(())
    }

    /// Loads an operator-provided CA (plug-in mode), or the persisted root.
    pub fn from_files(
        files: &PluginFiles,
        trust_domain: &TrustDomain,
        ttl: TtlPolicy,
    ) -> Result<Self, CaError> {
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
        let bundle = match (&files.bundle, facts.self_signed) {
            (Some(path), _) => TrustBundle::new(parse_cert_pem(path)?)?,
            (None, true) => TrustBundle::new(vec![signing_cert.clone()])?,
            (None, false) => {
                return Err(CaError::SelfTest(
                    "the CA certificate is an intermediate and no --ca-bundle (root) was given"
                        .into(),
                ));
            }
        };
        let issuer =
            Issuer::from_ca_cert_der(&signing_cert, key).map_err(|e| CaError::CorruptCert {
                path: files.cert.clone(),
                reason: e.to_string(),
            })?;
        let ca = Self {
            trust_domain: trust_domain.clone(),
            issuer,
            chain_tail,
            bundle,
            not_before: facts.not_before,
            not_after: facts.not_after,
            ttl,
        };
        ca.self_test()?;
        Ok(ca)
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
            &self.bundle,
            SystemTime::now(),
            PeerRole::Client,
        )
        .map_err(|e| CaError::SelfTest(e.to_string()))?;
        Ok(())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn ttl_policy(&self) -> TtlPolicy {
        self.ttl
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
        if now >= self.not_after {
            return Err(CaError::IssuerExpired(format_time(self.not_after)));
        }
        if now < self.not_before {
            return Err(CaError::IssuerNotYetValid(format_time(self.not_before)));
        }
        let public_key = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| CaError::PublicKey(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = (now - BACKDATE).max(self.not_before).into();
        params.not_after = (now + ttl).min(self.not_after).into();
        let leaf = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let leaf_der = leaf.der().clone();
        let info = SvidInfo::from_leaf(&leaf_der).map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + self.chain_tail.len());
        chain.push(leaf_der);
        chain.extend(self.chain_tail.iter().cloned());
        Ok(IssuedSvid { chain, info })
    }
}
