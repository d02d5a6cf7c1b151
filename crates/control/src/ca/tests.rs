//! Tests of the CA through its API: the root on disk and its refusals, plugged-in CAs, leaf
//! signing (SANs, lifetimes, backdating, chains) and root rotation across restarts.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, digest};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyIdMethod,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use tempfile::TempDir;
use x509_parser::extensions::{ExtendedKeyUsage, GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::rotation::from_unix;
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
fn plug_in(dir: &Path, signer: &OperatorCa, bundle: Option<&OperatorCa>) -> Result<Ca, CaError> {
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

    assert_eq!(leaf.validity().not_before.timestamp(), unix(now - BACKDATE));
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

/// Peers' clocks differ from the CA's by up to two minutes either way (docs/architecture.md, "The CA"): a leaf
/// issued by a young root at any of those clocks is valid for every peer from the moment it
/// is issued, starts no earlier than its issuer and ends no later.
#[test]
fn leaves_are_valid_for_peers_two_minutes_behind_and_never_outlive_their_issuer() {
    let skew = Duration::from_secs(120);
    // A root made just now, and a plugged-in root about to expire.
    let (_dir, young) = data_dir_with_root(TD);
    let dir = tempfile::tempdir().unwrap();
    let ending = plug_in(
        dir.path(),
        &OperatorCa::root("Ending root", Duration::from_secs(600)),
        None,
    )
    .unwrap();
    for ca in [&young, &ending] {
        let bundle = ca.bundle();
        let (_, root) = X509Certificate::from_der(&bundle.roots()[0]).unwrap();
        let root_not_before = root.validity().not_before.timestamp();
        // The CA's clock behind, right, and ahead of true time.
        for ca_now in [now() - skew, now(), now() + skew] {
            let issued = ca
                .issue(&workload_id(), &workload_spki(), HOUR, ca_now)
                .unwrap();
            let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
            assert!(leaf.validity().not_before.timestamp() >= root_not_before);
            assert!(
                issued.info.not_after <= ca.not_after(),
                "outlives its issuer"
            );
            // A peer whose clock is two minutes behind the CA's accepts it at once.
            latch_identity::verify_svid(
                &issued.chain,
                &ca.bundle(),
                ca_now - skew,
                PeerRole::Client,
            )
            .unwrap();
        }
    }
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
    let key = KeyPair::from_pem(&fs::read_to_string(root_key_path(dir.path())).unwrap()).unwrap();
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
fn a_half_prepared_rotation_is_dropped_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), &td(TD), TtlPolicy::default()).unwrap();
    ca.prepare_rotation().unwrap();
    drop(ca);
    // What a full disk leaves when the certificate write fails after the key's.
    fs::remove_file(dir.path().join("ca/next/root.crt.pem")).unwrap();
    let ca = Ca::load_or_create(dir.path(), &td(TD), TtlPolicy::default()).unwrap();
    assert_eq!(ca.rotation_status().phase, "idle");
    assert_eq!(ca.bundle().roots().len(), 1);
    assert!(!dir.path().join("ca/next").exists());
    ca.prepare_rotation().expect("prepare can run again");
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
    let before = now() - ROOT_BACKDATE - HOUR;
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
