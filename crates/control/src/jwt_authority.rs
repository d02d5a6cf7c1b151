//! The trust domain's JWT-SVID signing keys. Exactly one key signs at a time; a new key is
//! published in the JWT bundle `publish_ahead` before it starts signing, so that every verifier
//! (proxies of every replica, apps that cached the bundle) holds it before the first token it
//! signs, and a replaced key stays published until the last token it signed has expired.
//!
//! Where the keys live: without `--kubernetes`, `<data-dir>/jwt/keys.json` (0600, written
//! atomically, like the CA's key). With `--kubernetes`, the Secret `latch-jwt-keys` in the
//! control plane's namespace, shared by the replicas (`shared_secret.rs`): the first replica
//! creates the first key, a rotation is taken by one replica (compare-and-swap on the Secret),
//! and every replica follows the Secret through a watch. Otherwise a token signed by one replica
//! would not validate with the bundle another replica serves.
//!
//! Rotation is on a schedule (`--jwt-key-rotation`, counted from the newest key's activation)
//! or by hand (`latchctl jwt rotate`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use latch_identity::jwt::{JwtBundle, JwtError, JwtSigningKey};
use latch_identity::{SpiffeId, TrustDomain, files};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::shared_secret::{Change, SecretError, SharedSecret};

/// How long a JWT-SVID is valid: short, since it cannot be revoked once issued.
pub const JWT_SVID_TTL: Duration = Duration::from_secs(5 * 60);
/// Clock skew allowed to verifiers: a replaced key stays published this much longer than the
/// last token it signed.
const SKEW: Duration = Duration::from_secs(60);
/// Default `--jwt-key-rotation`.
pub const DEFAULT_ROTATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Default time a new key is published before it signs: long enough for a watch to reach every
/// replica and discovery to reach every proxy, including one that is reconnecting.
pub const DEFAULT_PUBLISH_AHEAD: Duration = Duration::from_secs(2 * 60);
/// Audiences one JWT-SVID may name, and the length of each (bytes).
pub const MAX_AUDIENCES: usize = 16;
pub const MAX_AUDIENCE_BYTES: usize = 256;
/// The Secret holding the keys with `--kubernetes`, and its data key.
pub const SECRET_NAME: &str = "latch-jwt-keys";
const SECRET_KEY: &str = "keys.json";

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
        "JWT signing keys {place} are corrupt: {why}; restore them from a backup, or delete them \
         to make new keys (tokens signed by the old ones then stop validating)"
    )]
    Corrupt { place: String, why: String },
    #[error(
        "JWT signing keys in Secret {}: cannot {} it through the Kubernetes API: {} (check \
         latch-control's RBAC on Secrets of its namespace)",
        .0.secret, .0.action, .0.reason
    )]
    Shared(SecretError),
    #[error(
        "the JWT signing keys have not been read from the Kubernetes API yet (Secret \
         {SECRET_NAME}): {0}; retry"
    )]
    NotLoaded(String),
    #[error(transparent)]
    Key(#[from] JwtError),
}

impl From<SecretError> for JwtAuthorityError {
    fn from(e: SecretError) -> Self {
        Self::Shared(e)
    }
}

/// One key as stored.
#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    /// PKCS#8 DER, base64.
    pkcs8: String,
    /// Unix seconds when it starts (or started) signing.
    activated_at: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredKeys {
    /// Newest activation first.
    keys: Vec<StoredKey>,
}

#[derive(Clone)]
struct Key {
    signing: Arc<JwtSigningKey>,
    activated_at: SystemTime,
}

impl Key {
    /// A new key signing from `activated_at`, in whole seconds as stored (rounded down: the
    /// first key signs at once; a rotation rounds its time up first).
    fn generate(activated_at: SystemTime) -> Result<Self, JwtError> {
        Ok(Self {
            signing: Arc::new(JwtSigningKey::generate()?),
            activated_at: from_unix(unix(activated_at)),
        })
    }
}

/// The keys at one moment: replaced as a whole on every change.
pub struct JwtKeys {
    /// Newest activation first; empty only while shared keys have not been read yet.
    keys: Vec<Key>,
    bundle: JwtBundle,
}

impl JwtKeys {
    fn new(mut keys: Vec<Key>) -> Self {
        keys.sort_by_key(|k| std::cmp::Reverse(k.activated_at));
        let mut bundle = JwtBundle::default();
        for key in &keys {
            bundle.add(&key.signing);
        }
        Self { keys, bundle }
    }

    /// Every published key: the signing one, the ones waiting to sign and the replaced ones
    /// whose tokens may still be valid.
    pub fn bundle(&self) -> &JwtBundle {
        &self.bundle
    }

    fn signing(&self, now: SystemTime) -> Option<&Key> {
        self.keys
            .iter()
            .find(|k| k.activated_at <= now)
            // Every key starts in the future only when the clock went back; sign with the
            // oldest rather than not at all (it is published like the others).
            .or_else(|| self.keys.last())
    }

    /// The id of the key that signs at `now` (None before shared keys are read).
    pub fn signing_kid(&self, now: SystemTime) -> Option<&str> {
        self.signing(now).map(|k| k.signing.kid())
    }

    fn newest_activation(&self) -> Option<SystemTime> {
        self.keys.first().map(|k| k.activated_at)
    }

    /// Without the replaced keys whose tokens have all expired at `now`, or None when there are
    /// none. A key is replaced when the next newer one starts signing.
    fn pruned(&self, now: SystemTime) -> Option<Self> {
        let kept: Vec<Key> = self
            .keys
            .first()
            .into_iter()
            .chain(
                self.keys
                    .windows(2)
                    .filter(|pair| pair[0].activated_at + JWT_SVID_TTL + SKEW > now)
                    .map(|pair| &pair[1]),
            )
            .cloned()
            .collect();
        (kept.len() < self.keys.len()).then(|| Self::new(kept))
    }

    /// With a new key that signs from `activates_at`.
    fn with_new_key(&self, activates_at: SystemTime) -> Result<Self, JwtError> {
        let mut keys = self.keys.clone();
        keys.push(Key::generate(activates_at)?);
        Ok(Self::new(keys))
    }

    fn encode(&self) -> Vec<u8> {
        let stored = StoredKeys {
            keys: self
                .keys
                .iter()
                .map(|k| StoredKey {
                    kid: k.signing.kid().to_string(),
                    pkcs8: B64.encode(k.signing.pkcs8()),
                    activated_at: unix(k.activated_at),
                })
                .collect(),
        };
        serde_json::to_vec_pretty(&stored).expect("plain data serializes")
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let stored: StoredKeys =
            serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        if stored.keys.is_empty() {
            return Err("it holds no key".into());
        }
        let mut keys = Vec::with_capacity(stored.keys.len());
        for k in stored.keys {
            let der = B64
                .decode(&k.pkcs8)
                .map_err(|e| format!("key {}: not base64: {e}", k.kid))?;
            let signing = JwtSigningKey::from_pkcs8(&k.kid, &der)
                .map_err(|e| format!("key {}: {e}", k.kid))?;
            keys.push(Key {
                signing: Arc::new(signing),
                activated_at: from_unix(k.activated_at),
            });
        }
        Ok(Self::new(keys))
    }
}

/// A signed JWT-SVID.
pub struct IssuedJwt {
    pub token: String,
    pub expires_at: SystemTime,
}

/// What a rotation did.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The new key, in the bundle from now on.
    pub kid: String,
    /// When it starts signing.
    pub signs_from: SystemTime,
}

enum Storage {
    File(PathBuf),
    Secret(Box<SharedSecret>),
}

/// The trust domain's JWT signing keys.
pub struct JwtAuthority {
    storage: Storage,
    trust_domain: TrustDomain,
    publish_ahead: Duration,
    keys: ArcSwap<JwtKeys>,
    /// Why shared keys are not read yet (the last error), while they are not.
    unloaded: std::sync::Mutex<Option<String>>,
    /// Serializes this replica's changes (and their writes); signing never takes it.
    changing: tokio::sync::Mutex<()>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn from_unix(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

/// `t` rounded up to a whole second.
fn ceil_seconds(t: SystemTime) -> SystemTime {
    let down = from_unix(unix(t));
    if down < t {
        down + Duration::from_secs(1)
    } else {
        down
    }
}

impl JwtAuthority {
    /// Loads `<data_dir>/jwt/keys.json`, or makes the first key (signing at once) and writes it
    /// (0600) when the file does not exist. A file that exists but cannot be read or parsed is
    /// an error: new keys would silently invalidate every token in flight.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        publish_ahead: Duration,
        now: SystemTime,
    ) -> Result<Self, JwtAuthorityError> {
        let dir = data_dir.join("jwt");
        let path = dir.join("keys.json");
        let keys = match std::fs::read(&path) {
            Ok(bytes) => JwtKeys::decode(&bytes).map_err(|why| JwtAuthorityError::Corrupt {
                place: path.display().to_string(),
                why,
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                files::ensure_private_dir(&dir).map_err(|error| JwtAuthorityError::Write {
                    path: dir.clone(),
                    error,
                })?;
                let keys = JwtKeys::new(vec![Key::generate(now)?]);
                write_file(&path, &keys)?;
                tracing::info!(kid = keys.signing_kid(now), path = %path.display(), "created JWT signing key");
                keys
            }
            Err(error) => return Err(JwtAuthorityError::Read { path, error }),
        };
        Ok(Self::with(
            Storage::File(path),
            trust_domain,
            publish_ahead,
            keys,
            None,
        ))
    }

    /// Keys in the Secret `latch-jwt-keys` of the client's namespace, not read yet: `load`
    /// reads them (creating the Secret with a first key when there is none; of replicas
    /// starting together one creates it, the others read it), `follow` keeps them current.
    /// Until they are read nothing is signed (UNAVAILABLE) and the JWT bundle is empty.
    pub fn shared(
        client: kube::Client,
        trust_domain: &TrustDomain,
        publish_ahead: Duration,
    ) -> Self {
        Self::with(
            Storage::Secret(Box::new(SharedSecret::new(client, SECRET_NAME, SECRET_KEY))),
            trust_domain,
            publish_ahead,
            JwtKeys::new(Vec::new()),
            Some("not read yet".into()),
        )
    }

    /// Reads the shared keys (see `shared`).
    pub async fn load(&self, now: SystemTime) -> Result<(), JwtAuthorityError> {
        let Storage::Secret(secret) = &self.storage else {
            return Ok(());
        };
        let place = secret.display();
        let read = secret
            .update(|current| match current {
                Some(bytes) => JwtKeys::decode(bytes).map(Change::Keep).map_err(|why| {
                    JwtAuthorityError::Corrupt {
                        place: format!("in Secret {place}"),
                        why,
                    }
                }),
                None => {
                    let keys = JwtKeys::new(vec![Key::generate(now)?]);
                    Ok(Change::Write(keys.encode(), keys))
                }
            })
            .await;
        match read {
            Ok(keys) => {
                tracing::info!(secret = %place, kid = keys.signing_kid(now), "JWT signing keys from Kubernetes Secret");
                self.keys.store(Arc::new(keys));
                self.set_unloaded(None);
                Ok(())
            }
            Err(e) => {
                self.set_unloaded(Some(e.to_string()));
                Err(e)
            }
        }
    }

    fn set_unloaded(&self, why: Option<String>) {
        *self.unloaded.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    fn with(
        storage: Storage,
        trust_domain: &TrustDomain,
        publish_ahead: Duration,
        keys: JwtKeys,
        unloaded: Option<String>,
    ) -> Self {
        Self {
            storage,
            trust_domain: trust_domain.clone(),
            publish_ahead,
            keys: ArcSwap::from_pointee(keys),
            unloaded: std::sync::Mutex::new(unloaded),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The current keys (for the bundle and the signing key's id).
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
    ) -> Result<IssuedJwt, JwtAuthorityError> {
        // Whole seconds: `exp` is in seconds, and the response's expiry must match it.
        let expires_at = from_unix(unix(now)) + JWT_SVID_TTL;
        let keys = self.keys.load();
        let Some(key) = keys.signing(now) else {
            let why = self
                .unloaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Err(JwtAuthorityError::NotLoaded(
                why.unwrap_or_else(|| "not read yet".into()),
            ));
        };
        let token = key.signing.sign(subject, audience, now, expires_at)?;
        Ok(IssuedJwt { token, expires_at })
    }

    /// Applies `change` to the stored keys (the Secret's, re-read, when shared) and serves the
    /// result. `change` returns None to leave the keys as they are.
    async fn change<T>(
        &self,
        change: impl Fn(&JwtKeys) -> Result<Option<(JwtKeys, T)>, JwtError>,
    ) -> Result<Option<T>, JwtAuthorityError> {
        let _guard = self.changing.lock().await;
        match &self.storage {
            Storage::File(path) => {
                let Some((keys, result)) = change(&self.keys.load())? else {
                    return Ok(None);
                };
                // On disk before it takes effect.
                write_file(path, &keys)?;
                self.keys.store(Arc::new(keys));
                Ok(Some(result))
            }
            Storage::Secret(secret) => {
                let place = secret.display();
                let outcome = secret
                    .update(|current| {
                        let stored = match current {
                            Some(bytes) => JwtKeys::decode(bytes).map_err(|why| {
                                JwtAuthorityError::Corrupt {
                                    place: format!("in Secret {place}"),
                                    why,
                                }
                            })?,
                            None => {
                                return Err(JwtAuthorityError::Shared(
                                    secret.error("read", "it was deleted"),
                                ));
                            }
                        };
                        Ok(match change(&stored)? {
                            Some((keys, result)) => {
                                Change::Write(keys.encode(), (keys, Some(result)))
                            }
                            None => Change::Keep((stored, None)),
                        })
                    })
                    .await?;
                // What the Secret holds now, whoever wrote it (the watch brings it too).
                let (keys, result) = outcome;
                self.keys.store(Arc::new(keys));
                self.set_unloaded(None);
                Ok(result)
            }
        }
    }

    /// Publishes a new key now, signing from `now + publish_ahead`; the key it replaces stays
    /// published until its last token has expired.
    pub async fn rotate(&self, now: SystemTime) -> Result<Rotation, JwtAuthorityError> {
        let signs_from = ceil_seconds(now + self.publish_ahead);
        let rotation = self
            .change(|keys| {
                let keys = keys.with_new_key(signs_from)?;
                let kid = keys.keys[0].signing.kid().to_string();
                Ok(Some((keys, kid)))
            })
            .await?
            .map(|kid| Rotation { kid, signs_from })
            .expect("a rotation always changes the keys");
        tracing::info!(
            kid = %rotation.kid,
            publish_ahead = ?self.publish_ahead,
            "new JWT signing key published; it signs once every verifier has it, and the key it \
             replaces stays published until its tokens expire"
        );
        Ok(rotation)
    }

    /// Rotates when the newest key is older than `every`, unless another replica did first.
    async fn rotate_if_due(
        &self,
        every: Duration,
        now: SystemTime,
    ) -> Result<Option<Rotation>, JwtAuthorityError> {
        let signs_from = ceil_seconds(now + self.publish_ahead);
        let rotated = self
            .change(|keys| {
                if keys.newest_activation().is_some_and(|at| at + every > now) {
                    return Ok(None);
                }
                let keys = keys.with_new_key(signs_from)?;
                let kid = keys.keys[0].signing.kid().to_string();
                Ok(Some((keys, kid)))
            })
            .await?;
        Ok(rotated.map(|kid| Rotation { kid, signs_from }))
    }

    /// Drops replaced keys whose tokens have all expired. True when the bundle changed.
    pub async fn prune(&self, now: SystemTime) -> Result<bool, JwtAuthorityError> {
        Ok(self
            .change(|keys| Ok(keys.pruned(now).map(|keys| (keys, ()))))
            .await?
            .is_some())
    }

    /// When the next scheduled rotation is due under `every` (None before shared keys are
    /// read).
    fn rotate_at(&self, every: Duration) -> Option<SystemTime> {
        self.keys.load().newest_activation().map(|at| at + every)
    }

    /// With shared keys, keeps them equal to the Secret through a watch until `cancel`, calling
    /// `publish` with the bundle after each change another replica made. Nothing to follow for
    /// keys in the data dir.
    pub fn follow(
        self: &Arc<Self>,
        watch_client: kube::Client,
        publish: impl Fn(String) + Send + 'static,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) {
        let Storage::Secret(secret) = &self.storage else {
            return;
        };
        let this = self.clone();
        let place = secret.display();
        let secret = (**secret).clone();
        let follow_tracker = tracker.clone();
        tracker.spawn(async move {
            // Keys not read at start-up (the API unreachable, RBAC): retried here, since a
            // missing Secret must be created, which the watch cannot do.
            let mut wait = Duration::from_secs(1);
            while this.keys().signing_kid(SystemTime::now()).is_none() {
                match this.load(SystemTime::now()).await {
                    Ok(()) => publish(this.bundle_jwks()),
                    Err(e) => tracing::warn!("{e}; retrying in {wait:?}"),
                }
                if this.keys().signing_kid(SystemTime::now()).is_some() {
                    break;
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            Self::watch(
                this,
                secret,
                place,
                watch_client,
                publish,
                &follow_tracker,
                cancel,
            );
        });
    }

    fn watch(
        this: Arc<Self>,
        secret: SharedSecret,
        place: String,
        watch_client: kube::Client,
        publish: impl Fn(String) + Send + 'static,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) {
        secret.follow(
            watch_client,
            move |document| {
                let Some(bytes) = document else {
                    tracing::error!(
                        secret = %place,
                        "the JWT signing keys Secret is gone; signing on with the keys held, and \
                         the next rotation fails until it is restored (from a backup, or by \
                         restarting every replica, which makes new keys)"
                    );
                    return;
                };
                match JwtKeys::decode(bytes) {
                    Ok(keys) => {
                        let before = this.bundle_jwks();
                        this.keys.store(Arc::new(keys));
                        let after = this.bundle_jwks();
                        if after != before {
                            publish(after);
                        }
                    }
                    Err(why) => {
                        tracing::error!(secret = %place, "JWT signing keys not updated: {why}")
                    }
                }
            },
            tracker,
            cancel,
        );
    }
}

fn write_file(path: &Path, keys: &JwtKeys) -> Result<(), JwtAuthorityError> {
    files::write_private(path, &keys.encode()).map_err(|error| JwtAuthorityError::Write {
        path: path.to_path_buf(),
        error,
    })
}

/// Rotates the signing key every `every` and prunes replaced keys, until cancelled; after each
/// change `publish` gets the new bundle (JWKS JSON). A failed write is logged and retried within
/// a minute; the signing key keeps signing meanwhile.
pub async fn run_rotation(
    authority: Arc<JwtAuthority>,
    every: Duration,
    publish: impl Fn(String) + Send + 'static,
    cancel: CancellationToken,
) {
    loop {
        let now = SystemTime::now();
        let before = authority.bundle_jwks();
        let result = if authority.rotate_at(every).is_some_and(|at| at <= now) {
            authority.rotate_if_due(every, now).await.map(|_| ())
        } else {
            authority.prune(now).await.map(|_| ())
        };
        if let Err(e) = result {
            tracing::error!("JWT signing key: {e}");
        }
        let after = authority.bundle_jwks();
        if after != before {
            publish(after);
        }
        let next_due = authority
            .rotate_at(every)
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
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

    const AHEAD: Duration = Duration::from_secs(30);

    #[test]
    fn the_first_key_is_written_0600_and_read_back_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let first = JwtAuthority::load_or_create(dir.path(), &td(), AHEAD, now).unwrap();
        let path = dir.path().join("jwt/keys.json");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let token = first.sign(&web(), &["db".into()], now).unwrap().token;
        let again = JwtAuthority::load_or_create(dir.path(), &td(), AHEAD, now).unwrap();
        assert_eq!(
            again.keys().signing_kid(now).unwrap(),
            first.keys().signing_kid(now).unwrap()
        );
        let claims = validate(&token, &td(), again.keys().bundle(), "db", now).unwrap();
        assert_eq!(claims.subject, web());
    }

    #[test]
    fn a_corrupt_key_file_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("jwt")).unwrap();
        std::fs::write(dir.path().join("jwt/keys.json"), b"{\"keys\": []}").unwrap();
        let e = JwtAuthority::load_or_create(dir.path(), &td(), AHEAD, SystemTime::now())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("keys.json") && e.contains("holds no key"), "{e}");
    }

    fn kids(authority: &JwtAuthority) -> Vec<String> {
        let mut kids: Vec<String> = authority.keys().bundle().kids().map(String::from).collect();
        kids.sort();
        kids
    }

    #[tokio::test]
    async fn a_new_key_is_published_before_it_signs_and_the_old_one_until_its_tokens_expire() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let authority = JwtAuthority::load_or_create(dir.path(), &td(), AHEAD, t0).unwrap();
        let old_kid = authority.keys().signing_kid(t0).unwrap().to_string();
        let rotation = authority.rotate(t0).await.unwrap();
        assert_ne!(rotation.kid, old_kid);
        assert!(rotation.signs_from >= t0 + AHEAD);
        assert!(rotation.signs_from < t0 + AHEAD + Duration::from_secs(1));
        let mut both = vec![old_kid.clone(), rotation.kid.clone()];
        both.sort();
        assert_eq!(kids(&authority), both, "the new key is published at once");
        // Until it activates, the old key signs.
        let before = authority.sign(&web(), &["db".into()], t0).unwrap();
        assert_eq!(authority.keys().signing_kid(t0).unwrap(), old_kid);
        let t1 = rotation.signs_from;
        assert_eq!(authority.keys().signing_kid(t1).unwrap(), rotation.kid);
        let just_before = t1 - Duration::from_millis(1);
        assert_eq!(authority.keys().signing_kid(just_before).unwrap(), old_kid);
        let after = authority.sign(&web(), &["db".into()], t1).unwrap();
        for token in [&before.token, &after.token] {
            validate(token, &td(), authority.keys().bundle(), "db", t0).unwrap();
        }
        // The rotation is on disk: a restart keeps both keys and the schedule.
        let restarted = JwtAuthority::load_or_create(dir.path(), &td(), AHEAD, t0).unwrap();
        assert_eq!(restarted.keys().signing_kid(t0).unwrap(), old_kid);
        assert_eq!(restarted.keys().signing_kid(t1).unwrap(), rotation.kid);
        assert_eq!(kids(&restarted), both);
        // The old key stops signing at t1: its last token expires at t1 + TTL, plus skew.
        assert!(!authority.prune(t1 + JWT_SVID_TTL).await.unwrap());
        assert!(authority.prune(t1 + JWT_SVID_TTL + SKEW).await.unwrap());
        assert_eq!(kids(&authority), vec![rotation.kid.clone()]);
    }

    #[tokio::test]
    async fn the_schedule_counts_from_the_newest_key() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let every = Duration::from_secs(600);
        let authority = JwtAuthority::load_or_create(dir.path(), &td(), AHEAD, t0).unwrap();
        assert!(authority.rotate_if_due(every, t0).await.unwrap().is_none());
        let first = authority
            .rotate_if_due(every, t0 + every)
            .await
            .unwrap()
            .unwrap();
        // The new key activates AHEAD later; the next rotation is `every` after that.
        let t1 = first.signs_from;
        assert!(
            authority
                .rotate_if_due(every, t1 + every - Duration::from_secs(1))
                .await
                .unwrap()
                .is_none()
        );
        let second = authority
            .rotate_if_due(every, t1 + every)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(first.kid, second.kid);
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
