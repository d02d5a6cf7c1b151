//! The CA's material on disk: the self-made root in `<data-dir>/ca/` (generated on first
//! start, key first and 0600), an operator's plugged-in certificate, key, chain and bundle,
//! and the checks that refuse a corrupt, half-present or foreign CA. `Ca::load_or_create` and
//! `Ca::from_files` start here; rotation and signing use the loaders.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use latch_identity::{SpiffeId, TrustDomain, files};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::rotation::Rotation;
use super::sign::{Signer, random_serial};
use super::{Ca, CaError, ROOT_BACKDATE, ROOT_LIFETIME, TtlPolicy};

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

/// Where the self-made root and its rotation live: `<data-dir>/ca/`.
#[derive(Debug, Clone)]
pub(super) struct RootFiles {
    pub(super) dir: PathBuf,
}

impl RootFiles {
    pub(super) fn cert(&self) -> PathBuf {
        self.dir.join("root.crt.pem")
    }
    pub(super) fn key(&self) -> PathBuf {
        self.dir.join("root.key.pem")
    }
    pub(super) fn next_dir(&self) -> PathBuf {
        self.dir.join("next")
    }
    pub(super) fn next_cert(&self) -> PathBuf {
        self.next_dir().join("root.crt.pem")
    }
    pub(super) fn next_key(&self) -> PathBuf {
        self.next_dir().join("root.key.pem")
    }
    pub(super) fn previous_cert(&self) -> PathBuf {
        self.dir.join("previous.crt.pem")
    }
    pub(super) fn rotation_record(&self) -> PathBuf {
        self.dir.join("rotation.json")
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|error| CaError::Read {
        path: path.to_path_buf(),
        error,
    })
}

pub(super) fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_path_buf();
    move |error| CaError::Write { path, error }
}

pub(super) fn parse_cert_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
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

pub(super) fn load_key(path: &Path) -> Result<KeyPair, CaError> {
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
pub(super) struct CaCertFacts {
    pub(super) not_before: SystemTime,
    pub(super) not_after: SystemTime,
    pub(super) self_signed: bool,
    pub(super) spki: Vec<u8>,
    pub(super) trust_domain: Option<String>,
}

pub(super) fn ca_cert_facts(path: &Path, der: &CertificateDer<'_>) -> Result<CaCertFacts, CaError> {
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
pub(super) fn cert_not_after(der: &CertificateDer<'_>) -> Option<SystemTime> {
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
pub(super) fn load_signer(
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
        if let Err(error) = files::write_public(cert_path, cert_pem.as_bytes()) {
            // The key was written by this very call and nothing signed with it has left the
            // process: remove it, so that once the disk has room again (full, read-only) the next
            // start creates a root instead of refusing a half-present CA dir.
            let _ = std::fs::remove_file(key_path);
            return Err(CaError::Write {
                path: cert_path.to_path_buf(),
                error,
            });
        }
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
        params.not_before = (now - ROOT_BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}
