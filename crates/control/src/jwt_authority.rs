//! The trust domain's JWT-SVID signing keys: one current ES256 key that signs, and the keys it
//! replaced, kept in the JWT bundle until every token they signed has expired. Kept in
//! `<data-dir>/jwt/keys.json` (0600, written atomically, like the CA's key); generated on first
//! start, rotated on a schedule (`--jwt-key-rotation`). The certificate service signs with it;
//! the bundle goes out with every SVID and JWT-SVID issued.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use latch_identity::jwt::{JwtBundle, JwtError, JwtSigningKey};
use latch_identity::{SpiffeId, TrustDomain, files};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How long a JWT-SVID is valid: short, since it cannot be revoked once issued.
pub const JWT_SVID_TTL: Duration = Duration::from_secs(5 * 60);
/// Clock skew allowed to verifiers: a replaced key stays published this much longer than the
/// last token it signed.
const SKEW: Duration = Duration::from_secs(60);
/// Default `--jwt-key-rotation`.
pub const DEFAULT_ROTATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Audiences one JWT-SVID may name, and the length of each (bytes).
pub const MAX_AUDIENCES: usize = 16;
pub const MAX_AUDIENCE_BYTES: usize = 256;

#[derive(Debug, Error)]
pub enum JwtAuthorityError {
    #[error("JWT signing keys {path}: cannot read: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "JWT signing keys {path}: cannot write: {error} (check that the data dir is writable and \
         has free space)"
    )]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "JWT signing keys {path} are corrupt: {why}; restore the file from a backup, or move it \
         away to make new keys (tokens signed by the old ones then stop validating)"
    )]
    Corrupt { path: PathBuf, why: String },
    #[error(transparent)]
    Key(#[from] JwtError),
}

/// One key as stored.
#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    /// PKCS#8 DER, base64.
    pkcs8: String,
    /// Unix seconds when it started signing.
    activated_at: u64,
    /// Unix seconds after which it leaves the bundle; absent while it is the current key.
    published_until: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct StoredKeys {
    /// The current key first.
    keys: Vec<StoredKey>,
}

struct Key {
    signing: JwtSigningKey,
    activated_at: SystemTime,
    published_until: Option<SystemTime>,
}

/// What signing and publishing read: replaced as a whole on rotation.
pub struct JwtKeys {
    current: Key,
    previous: Vec<Key>,
    bundle: JwtBundle,
}

impl JwtKeys {
    fn new(current: Key, previous: Vec<Key>) -> Self {
        let mut bundle = JwtBundle::default();
        bundle.add(&current.signing);
        for key in &previous {
            bundle.add(&key.signing);
        }
        Self {
            current,
            previous,
            bundle,
        }
    }

    pub fn bundle(&self) -> &JwtBundle {
        &self.bundle
    }

    pub fn current_kid(&self) -> &str {
        self.current.signing.kid()
    }
}

/// A signed JWT-SVID.
pub struct IssuedJwt {
    pub token: String,
    pub expires_at: SystemTime,
}

/// The trust domain's JWT signing keys.
pub struct JwtAuthority {
    path: PathBuf,
    trust_domain: TrustDomain,
    keys: ArcSwap<JwtKeys>,
    /// Serializes rotations (and their writes); signing never takes it.
    rotating: Mutex<()>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn from_unix(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

impl JwtAuthority {
    /// Loads `<data_dir>/jwt/keys.json`, or makes the first key and writes it (0600) when the
    /// file does not exist. A file that exists but cannot be read or parsed is an error: new
    /// keys would silently invalidate every token in flight.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        now: SystemTime,
    ) -> Result<Self, JwtAuthorityError> {
        let dir = data_dir.join("jwt");
        let path = dir.join("keys.json");
        let keys = match std::fs::read(&path) {
            Ok(bytes) => Self::parse(&path, &bytes)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                files::ensure_private_dir(&dir).map_err(|error| JwtAuthorityError::Write {
                    path: dir.clone(),
                    error,
                })?;
                let keys = JwtKeys::new(
                    Key {
                        signing: JwtSigningKey::generate()?,
                        activated_at: now,
                        published_until: None,
                    },
                    Vec::new(),
                );
                Self::store(&path, &keys)?;
                tracing::info!(kid = keys.current_kid(), path = %path.display(), "created JWT signing key");
                keys
            }
            Err(error) => return Err(JwtAuthorityError::Read { path, error }),
        };
        Ok(Self {
            path,
            trust_domain: trust_domain.clone(),
            keys: ArcSwap::from_pointee(keys),
            rotating: Mutex::new(()),
        })
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<JwtKeys, JwtAuthorityError> {
        let corrupt = |why: String| JwtAuthorityError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        let stored: StoredKeys =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not JSON: {e}")))?;
        let mut keys = Vec::with_capacity(stored.keys.len());
        for k in stored.keys {
            let der = B64
                .decode(&k.pkcs8)
                .map_err(|e| corrupt(format!("key {}: not base64: {e}", k.kid)))?;
            let signing = JwtSigningKey::from_pkcs8(&k.kid, &der)
                .map_err(|e| corrupt(format!("key {}: {e}", k.kid)))?;
            keys.push(Key {
                signing,
                activated_at: from_unix(k.activated_at),
                published_until: k.published_until.map(from_unix),
            });
        }
        let mut keys = keys.into_iter();
        let current = keys
            .next()
            .ok_or_else(|| corrupt("it holds no key".into()))?;
        if current.published_until.is_some() {
            return Err(corrupt("its first key is not the current one".into()));
        }
        Ok(JwtKeys::new(current, keys.collect()))
    }

    fn store(path: &Path, keys: &JwtKeys) -> Result<(), JwtAuthorityError> {
        let stored = StoredKeys {
            keys: std::iter::once(&keys.current)
                .chain(&keys.previous)
                .map(|k| StoredKey {
                    kid: k.signing.kid().to_string(),
                    pkcs8: B64.encode(k.signing.pkcs8()),
                    activated_at: unix(k.activated_at),
                    published_until: k.published_until.map(unix),
                })
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| JwtAuthorityError::Write {
            path: path.to_path_buf(),
            error: std::io::Error::other(e),
        })?;
        files::write_private(path, &json).map_err(|error| JwtAuthorityError::Write {
            path: path.to_path_buf(),
            error,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The current keys (for the bundle and the current key id).
    pub fn keys(&self) -> Arc<JwtKeys> {
        self.keys.load_full()
    }

    /// The JWT bundle as JWKS JSON, the SPIFFE bundle format's JWT part.
    pub fn bundle_jwks(&self) -> String {
        self.keys.load().bundle.to_jwks().to_string()
    }

    /// Signs a JWT-SVID for `subject` and `audience` (already checked by the caller), valid
    /// from `now` for `JWT_SVID_TTL`.
    pub fn sign(
        &self,
        subject: &SpiffeId,
        audience: &[String],
        now: SystemTime,
    ) -> Result<IssuedJwt, JwtError> {
        // Whole seconds: `exp` is in seconds, and the response's expiry must match it.
        let expires_at = from_unix(unix(now)) + JWT_SVID_TTL;
        let token = self
            .keys
            .load()
            .current
            .signing
            .sign(subject, audience, now, expires_at)?;
        Ok(IssuedJwt { token, expires_at })
    }

    /// Replaces the current key with a new one. The replaced key stays in the bundle until the
    /// last token it may have signed has expired (plus clock skew); keys past that are dropped.
    /// Written to disk before it takes effect.
    pub fn rotate(&self, now: SystemTime) -> Result<String, JwtAuthorityError> {
        let _guard = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.keys.load_full();
        let new = Key {
            signing: JwtSigningKey::generate()?,
            activated_at: now,
            published_until: None,
        };
        let mut previous = vec![Key {
            signing: JwtSigningKey::from_pkcs8(
                old.current.signing.kid(),
                old.current.signing.pkcs8(),
            )?,
            activated_at: old.current.activated_at,
            published_until: Some(now + JWT_SVID_TTL + SKEW),
        }];
        for k in &old.previous {
            if k.published_until.is_some_and(|until| until > now) {
                previous.push(Key {
                    signing: JwtSigningKey::from_pkcs8(k.signing.kid(), k.signing.pkcs8())?,
                    activated_at: k.activated_at,
                    published_until: k.published_until,
                });
            }
        }
        let keys = JwtKeys::new(new, previous);
        Self::store(&self.path, &keys)?;
        let kid = keys.current_kid().to_string();
        tracing::info!(
            kid = %kid,
            replaced = old.current_kid(),
            "rotated JWT signing key; the replaced key stays in the JWT bundle until its tokens expire"
        );
        self.keys.store(Arc::new(keys));
        Ok(kid)
    }

    /// Drops replaced keys whose tokens have all expired. True when the bundle changed.
    pub fn prune(&self, now: SystemTime) -> Result<bool, JwtAuthorityError> {
        let _guard = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.keys.load_full();
        if !old
            .previous
            .iter()
            .any(|k| k.published_until.is_some_and(|until| until <= now))
        {
            return Ok(false);
        }
        let copy = |k: &Key| -> Result<Key, JwtError> {
            Ok(Key {
                signing: JwtSigningKey::from_pkcs8(k.signing.kid(), k.signing.pkcs8())?,
                activated_at: k.activated_at,
                published_until: k.published_until,
            })
        };
        let previous = old
            .previous
            .iter()
            .filter(|k| k.published_until.is_some_and(|until| until > now))
            .map(copy)
            .collect::<Result<Vec<_>, _>>()?;
        let keys = JwtKeys::new(copy(&old.current)?, previous);
        Self::store(&self.path, &keys)?;
        self.keys.store(Arc::new(keys));
        Ok(true)
    }

    /// When the current key is due for replacement under `every`.
    pub fn rotate_at(&self, every: Duration) -> SystemTime {
        self.keys.load().current.activated_at + every
    }
}

/// Rotates the signing key every `every` and prunes replaced keys, until cancelled; after each
/// change `publish` gets the new bundle (JWKS JSON). A failed write is logged and retried within
/// a minute; the current key keeps signing meanwhile.
pub async fn run_rotation(
    authority: Arc<JwtAuthority>,
    every: Duration,
    publish: impl Fn(String) + Send + 'static,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let now = SystemTime::now();
        let due = authority.rotate_at(every);
        let result = if due <= now {
            authority.rotate(now).map(|_| true)
        } else {
            authority.prune(now)
        };
        match result {
            Ok(true) => publish(authority.bundle_jwks()),
            Ok(false) => {}
            Err(e) => tracing::error!("JWT signing key: {e}"),
        }
        let next_due = authority
            .rotate_at(every)
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        // Wake for the rotation, or within a minute to drop expired keys.
        let wait = next_due.clamp(Duration::from_secs(1), Duration::from_secs(60));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Checks the audiences a caller asks for: at least one, at most `MAX_AUDIENCES`, each
/// non-empty, at most `MAX_AUDIENCE_BYTES` and without control characters.
pub fn check_audiences(audience: &[String]) -> Result<(), String> {
    if audience.is_empty() {
        return Err("no audience: a JWT-SVID names at least one audience".into());
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(format!(
            "{} audiences asked for; at most {MAX_AUDIENCES}",
            audience.len()
        ));
    }
    for a in audience {
        if a.is_empty() {
            return Err("an audience is empty".into());
        }
        if a.len() > MAX_AUDIENCE_BYTES {
            return Err(format!(
                "an audience of {} bytes is over the {MAX_AUDIENCE_BYTES}-byte limit",
                a.len()
            ));
        }
        if a.chars().any(char::is_control) {
            return Err("an audience holds control characters".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use latch_identity::jwt::validate;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn web() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/web").unwrap()
    }

    #[test]
    fn the_first_key_is_written_0600_and_read_back_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let first = JwtAuthority::load_or_create(dir.path(), &td(), now).unwrap();
        let path = dir.path().join("jwt/keys.json");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let token = first.sign(&web(), &["db".into()], now).unwrap().token;
        let again = JwtAuthority::load_or_create(dir.path(), &td(), now).unwrap();
        assert_eq!(again.keys().current_kid(), first.keys().current_kid());
        let claims = validate(&token, &td(), again.keys().bundle(), "db", now).unwrap();
        assert_eq!(claims.subject, web());
    }

    #[test]
    fn a_corrupt_key_file_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("jwt")).unwrap();
        std::fs::write(dir.path().join("jwt/keys.json"), b"{\"keys\": []}").unwrap();
        let e = JwtAuthority::load_or_create(dir.path(), &td(), SystemTime::now())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("keys.json") && e.contains("holds no key"), "{e}");
    }

    #[test]
    fn a_replaced_key_validates_its_tokens_until_they_expire_then_leaves_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let authority = JwtAuthority::load_or_create(dir.path(), &td(), t0).unwrap();
        let old_kid = authority.keys().current_kid().to_string();
        let before = authority.sign(&web(), &["db".into()], t0).unwrap();
        let new_kid = authority.rotate(t0).unwrap();
        assert_ne!(new_kid, old_kid);
        let after = authority.sign(&web(), &["db".into()], t0).unwrap();
        let kids: Vec<String> = authority.keys().bundle().kids().map(String::from).collect();
        assert!(
            kids.contains(&old_kid) && kids.contains(&new_kid),
            "{kids:?}"
        );
        for token in [&before.token, &after.token] {
            validate(token, &td(), authority.keys().bundle(), "db", t0).unwrap();
        }
        // The rotation is on disk: a restart keeps both keys.
        let restarted = JwtAuthority::load_or_create(dir.path(), &td(), t0).unwrap();
        assert_eq!(restarted.keys().current_kid(), new_kid);
        validate(&before.token, &td(), restarted.keys().bundle(), "db", t0).unwrap();
        // Not yet: the old key's last token may still be valid.
        assert!(!authority.prune(t0 + JWT_SVID_TTL).unwrap());
        assert!(authority.prune(t0 + JWT_SVID_TTL + SKEW).unwrap());
        let kids: Vec<String> = authority.keys().bundle().kids().map(String::from).collect();
        assert_eq!(kids, vec![new_kid]);
    }

    #[test]
    fn audiences_are_bounded() {
        assert!(check_audiences(&["db".into()]).is_ok());
        for (audience, why) in [
            (vec![], "no audience"),
            (vec![String::new()], "empty"),
            (vec!["a".repeat(MAX_AUDIENCE_BYTES + 1)], "byte limit"),
            (vec!["a\nb".into()], "control characters"),
            (vec!["a".to_string(); MAX_AUDIENCES + 1], "at most"),
        ] {
            let e = check_audiences(&audience).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
