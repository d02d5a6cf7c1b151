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
    /// NotAfter within the issuer's validity. Returns the chain and the leaf's NotAfter.
    fn sign_leaf(
        &self,
        sans: Vec<SanType>,
        extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
        spki_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), CaError> {
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
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = extended_key_usages;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let not_after = (now + ttl).min(self.not_after);
        params.not_before = (now - BACKDATE).max(self.not_before).into();
        params.not_after = not_after.into();
        let leaf = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + self.chain_tail.len());
        chain.push(leaf.der().clone());
        chain.extend(self.chain_tail.iter().cloned());
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
            latch_identity::verify_svid(&issued.chain, ca.bundle(), now, role).unwrap();
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
