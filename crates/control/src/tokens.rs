//! Join tokens: one-time (or reusable) credentials bound to one SPIFFE ID, for workloads outside
//! Kubernetes. Only SHA-256 hashes are kept, in memory and in `<data-dir>/join-tokens.json`
//! (0600); the token itself is shown once, to whoever created it, and never logged.
//!
//! With `--kubernetes` the state every replica must share lives in the Kubernetes API instead
//! (`token_secrets`): created tokens, and the use of every token. The config file's tokens are
//! still read from the file, which every replica has. A control plane that runs in a pod
//! without `--kubernetes` has only its own data dir, so it refuses single-use tokens rather than
//! accept each once per replica and once more after every restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use latch_identity::SpiffeId;
use latch_identity::bundle::sha256_hex;
use latch_identity::svid::format_time;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::token_secrets::TokenSecrets;

const TOKEN_PREFIX: &str = "latch-jt-";
/// Configured tokens shorter than this are refused: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Error)]
pub enum TokenError {
    #[error(
        "join token is not known to this control plane (mistyped, or created against another \
         data dir); create one with `latchctl token create`"
    )]
    Unknown,
    #[error("join token for {id} expired {ago} ago; create a new one with `latchctl token create`")]
    Expired { id: String, ago: String },
    #[error(
        "join token for {id} is single-use and was already used at {at}; create a new one, or \
         a --reusable one for workloads that restart"
    )]
    AlreadyUsed { id: String, at: String },
    #[error(
        "cannot record join tokens in {path}: {source}; nothing was changed (check that the data \
         dir is writable and has free space, then retry)"
    )]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("join token state file {path} is unreadable or corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("join token is {0} characters; at least {MIN_TOKEN_LEN} are required")]
    TooShort(usize),
    #[error("token_sha256 {0:?} is not 64 lowercase hex characters")]
    BadHash(String),
    #[error(
        "cannot {action} join-token state in the Kubernetes API (Secrets of namespace \
         {namespace}): {reason}; nothing was changed, retry (and check latch-control's RBAC: \
         get, list, create, update and delete of Secrets in its namespace)"
    )]
    Shared {
        namespace: String,
        action: &'static str,
        reason: String,
    },
    #[error("join-token Secret {secret} is corrupt: {reason}")]
    SharedCorrupt { secret: String, reason: String },
    #[error(
        "single-use join tokens are refused: this control plane runs in a Kubernetes pod without \
         --kubernetes, so it records token uses only in its own data dir, which other replicas \
         and the pod that replaces it do not see, and cannot guarantee a single use; run it with \
         --kubernetes (token state in the Kubernetes API), or use a reusable token"
    )]
    SingleUseUnguaranteed,
}

impl TokenError {
    pub fn already_used(id: &str, at: u64) -> Self {
        TokenError::AlreadyUsed {
            id: id.to_string(),
            at: format_time(from_unix(at)),
        }
    }
}

/// One token's record, keyed by the token's SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub spiffe_id: String,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<u64>,
    pub reusable: bool,
    /// Unix seconds of the first use.
    pub used_at: Option<u64>,
    /// Listed in the config file (rather than made with `latchctl token create`): removed from
    /// the state when it is no longer listed there, which is how an operator revokes it.
    #[serde(default)]
    pub configured: bool,
    /// Unix milliseconds of its creation (or first listing in the config file); a revocation of
    /// its ID covers it when it is older. Absent in state files from before revocations:
    /// covered.
    #[serde(default)]
    pub created_at_ms: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    tokens: BTreeMap<String, TokenRecord>,
}

/// A token that authenticated a request; `JoinTokens::consume` spends it.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    hash: String,
    /// Its record when it comes from the config file (or, without shared state, the data dir);
    /// `None` for a token whose record is in the Kubernetes API.
    local: Option<TokenRecord>,
    pub id: SpiffeId,
    pub reusable: bool,
    /// When the token was created (the epoch when unknown).
    pub created_at: SystemTime,
}

/// A token just created: the only time its value exists outside the caller.
#[derive(Debug, Clone, Serialize)]
pub struct NewToken {
    pub token: String,
    pub spiffe_id: String,
    pub expires_at: Option<u64>,
    pub reusable: bool,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// The hash under which a token is stored.
pub fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// Where uses are recorded so that a single-use token is used once.
enum Sharing {
    /// The data dir: this process is the only control plane using it.
    Local,
    /// The Kubernetes API, shared by every replica (`--kubernetes`).
    Kubernetes(Box<TokenSecrets>),
    /// A pod without `--kubernetes`: the data dir is this replica's alone, so single use cannot
    /// be guaranteed and single-use tokens are refused.
    Unguaranteed,
}

/// All known join tokens.
pub struct JoinTokens {
    /// Configured tokens, and (without the Kubernetes API) created ones.
    entries: DashMap<String, TokenRecord>,
    state_path: Option<PathBuf>,
    /// Serializes writes of the state file.
    persist_lock: Mutex<()>,
    sharing: Sharing,
}

impl std::fmt::Debug for JoinTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokens")
            .field("entries", &self.entries.len())
            .field("state_path", &self.state_path)
            .finish_non_exhaustive()
    }
}

impl JoinTokens {
    /// An in-memory store (tests, or a control plane without a data dir).
    pub fn in_memory() -> Self {
        Self {
            entries: DashMap::new(),
            state_path: None,
            persist_lock: Mutex::new(()),
            sharing: Sharing::Local,
        }
    }

    /// Keeps created tokens and every use in the Kubernetes API (`--kubernetes`).
    pub fn shared_in(mut self, secrets: TokenSecrets) -> Self {
        self.sharing = Sharing::Kubernetes(Box::new(secrets));
        self
    }

    /// Refuses single-use tokens: this control plane runs in a pod whose data dir other
    /// replicas do not share, without the Kubernetes API to share state in.
    pub fn unguaranteed(mut self) -> Self {
        self.sharing = Sharing::Unguaranteed;
        self
    }

    /// Loads the state file if present; later changes are written back to it.
    pub fn open(state_path: PathBuf) -> Result<Self, TokenError> {
        let mut entries = DashMap::new();
        match std::fs::read(&state_path) {
            Ok(bytes) => {
                let state: StateFile =
                    serde_json::from_slice(&bytes).map_err(|e| TokenError::Corrupt {
                        path: state_path.clone(),
                        reason: e.to_string(),
                    })?;
                entries.extend(state.tokens);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(TokenError::Corrupt {
                    path: state_path,
                    reason: e.to_string(),
                });
            }
        }
        Ok(Self {
            entries,
            state_path: Some(state_path),
            persist_lock: Mutex::new(()),
            sharing: Sharing::Local,
        })
    }

    /// Adds a token listed in the config file, given either as the token or as its SHA-256;
    /// returns its hash. A use already recorded in the state file is kept: a restart does not
    /// revive a spent single-use token.
    pub fn add_configured(
        &self,
        token: Option<&str>,
        token_sha256: Option<&str>,
        record: TokenRecord,
    ) -> Result<String, TokenError> {
        let record = TokenRecord {
            configured: true,
            ..record
        };
        let hash = match (token, token_sha256) {
            (Some(t), _) if t.len() < MIN_TOKEN_LEN => return Err(TokenError::TooShort(t.len())),
            (Some(t), _) => token_hash(t),
            (None, Some(h))
                if h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                h.to_string()
            }
            (None, Some(h)) => return Err(TokenError::BadHash(h.to_string())),
            (None, None) => return Err(TokenError::BadHash(String::new())),
        };
        match self.entries.entry(hash.clone()) {
            Entry::Occupied(mut e) => {
                let (used_at, created_at_ms) = (e.get().used_at, e.get().created_at_ms);
                *e.get_mut() = TokenRecord {
                    used_at,
                    created_at_ms: created_at_ms.or_else(|| Some(unix_ms(SystemTime::now()))),
                    ..record
                };
            }
            Entry::Vacant(e) => {
                e.insert(TokenRecord {
                    created_at_ms: Some(unix_ms(SystemTime::now())),
                    ..record
                });
            }
        }
        Ok(hash)
    }

    /// Forgets every configured token whose hash is not in `listed` (the config file's tokens
    /// now), so a token deleted from the file stops working at the next reload or start;
    /// returns the SPIFFE IDs of the tokens forgotten. Created tokens are left alone.
    pub fn forget_unlisted_configured(
        &self,
        listed: &std::collections::HashSet<String>,
    ) -> Result<Vec<String>, TokenError> {
        let unlisted: Vec<(String, String)> = self
            .entries
            .iter()
            .filter(|e| e.configured && !listed.contains(e.key()))
            .map(|e| (e.key().clone(), e.spiffe_id.clone()))
            .collect();
        if unlisted.is_empty() {
            return Ok(Vec::new());
        }
        let removed: Vec<(String, TokenRecord)> = unlisted
            .iter()
            .filter_map(|(hash, _)| self.entries.remove(hash))
            .collect();
        if let Err(e) = self.persist() {
            // Still on disk: keep them in memory too, so memory and disk agree; the next
            // reload tries again.
            for (hash, record) in removed {
                self.entries.insert(hash, record);
            }
            return Err(e);
        }
        Ok(unlisted.into_iter().map(|(_, id)| id).collect())
    }

    /// Creates a random token for `id`, valid for `ttl`: in the Kubernetes API when shared,
    /// otherwise in the data dir. When it cannot be recorded there is no token.
    pub async fn create(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        reusable: bool,
    ) -> Result<NewToken, TokenError> {
        if !reusable && matches!(self.sharing, Sharing::Unguaranteed) {
            return Err(TokenError::SingleUseUnguaranteed);
        }
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| TokenError::Persist {
            path: PathBuf::from("<random>"),
            source: std::io::Error::other("the system random number generator failed"),
        })?;
        let token = format!("{TOKEN_PREFIX}{}", latch_identity::hex::encode(&bytes));
        let now = SystemTime::now();
        let expires_at = Some(unix(now + ttl));
        let hash = token_hash(&token);
        let record = TokenRecord {
            spiffe_id: id.to_string(),
            expires_at,
            reusable,
            used_at: None,
            configured: false,
            created_at_ms: Some(unix_ms(now)),
        };
        if let Sharing::Kubernetes(secrets) = &self.sharing {
            secrets.create(&hash, &record).await?;
            // Tokens nobody used pile up otherwise; a failure here costs nothing but space.
            match secrets.sweep_expired(now).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("deleted {n} expired join-token Secrets"),
                Err(e) => tracing::warn!("expired join-token Secrets not deleted: {e}"),
            }
        } else {
            self.entries.insert(hash.clone(), record);
            if let Err(e) = self.persist() {
                // Not recorded on disk, so it would not survive a restart: the caller gets the
                // error instead of a token, and the token does not exist.
                self.entries.remove(&hash);
                return Err(e);
            }
        }
        Ok(NewToken {
            token,
            spiffe_id: id.to_string(),
            expires_at,
            reusable,
        })
    }

    /// Checks a presented token without spending it. The config file's tokens are looked up
    /// here; created ones, when shared, in the Kubernetes API.
    pub async fn authenticate(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<TokenGrant, TokenError> {
        let hash = token_hash(token);
        let local = self.entries.get(&hash).map(|e| e.value().clone());
        let record = match (&local, &self.sharing) {
            (Some(record), _) => record.clone(),
            (None, Sharing::Kubernetes(secrets)) => {
                secrets.get(&hash).await?.ok_or(TokenError::Unknown)?.record
            }
            (None, _) => return Err(TokenError::Unknown),
        };
        if let Some(expires_at) = record.expires_at
            && unix(now) >= expires_at
        {
            let ago = now
                .duration_since(from_unix(expires_at))
                .unwrap_or_default();
            return Err(TokenError::Expired {
                id: record.spiffe_id.clone(),
                ago: humantime::format_duration(Duration::from_secs(ago.as_secs())).to_string(),
            });
        }
        if !record.reusable {
            if matches!(self.sharing, Sharing::Unguaranteed) {
                return Err(TokenError::SingleUseUnguaranteed);
            }
            // A configured token's use, when shared, is in the API: `consume` finds it there.
            if let Some(at) = record.used_at {
                return Err(TokenError::already_used(&record.spiffe_id, at));
            }
        }
        let id = SpiffeId::parse(&record.spiffe_id).map_err(|_| TokenError::Unknown)?;
        Ok(TokenGrant {
            hash,
            local,
            id,
            reusable: record.reusable,
            created_at: UNIX_EPOCH + Duration::from_millis(record.created_at_ms.unwrap_or(0)),
        })
    }

    /// Spends a single-use token (atomically: of two concurrent uses, one fails, also across
    /// replicas when shared) and records the use before returning, so a restart cannot revive
    /// it: when the use cannot be recorded (data dir full or read-only, API unreachable) it is
    /// refused and the token stays unspent. Reusable tokens only record their first use, as a
    /// note for the operator: failing to write it is logged, not refused.
    pub async fn consume(&self, grant: &TokenGrant, now: SystemTime) -> Result<(), TokenError> {
        let Sharing::Kubernetes(secrets) = &self.sharing else {
            return self.consume_local(grant, now);
        };
        match secrets.spend(&grant.hash, grant.local.as_ref(), now).await {
            Err(e @ (TokenError::Shared { .. } | TokenError::SharedCorrupt { .. }))
                if grant.reusable =>
            {
                tracing::warn!(spiffe_id = %grant.id, "first use of a reusable join token not recorded: {e}");
                Ok(())
            }
            result => result,
        }
    }

    fn consume_local(&self, grant: &TokenGrant, now: SystemTime) -> Result<(), TokenError> {
        {
            let mut record = self
                .entries
                .get_mut(&grant.hash)
                .ok_or(TokenError::Unknown)?;
            match record.used_at {
                Some(at) if !record.reusable => {
                    return Err(TokenError::already_used(&record.spiffe_id, at));
                }
                Some(_) => return Ok(()),
                None => record.used_at = Some(unix(now)),
            }
        }
        if let Err(e) = self.persist() {
            // Not recorded: undo, so the caller may retry once the disk is fixed (and the next
            // write records a reusable token's first use).
            if let Some(mut record) = self.entries.get_mut(&grant.hash) {
                record.used_at = None;
            }
            if grant.reusable {
                tracing::warn!(spiffe_id = %grant.id, "first use of a reusable join token not recorded: {e}");
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Writes all records (hashes only) to the state file.
    fn persist(&self) -> Result<(), TokenError> {
        let Some(path) = &self.state_path else {
            return Ok(());
        };
        let _guard = self
            .persist_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = StateFile {
            version: 1,
            tokens: self
                .entries
                .iter()
                .map(|e| (e.key().clone(), e.value().clone()))
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&state).map_err(|e| TokenError::Persist {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        latch_identity::files::write_private(path, &json).map_err(|source| TokenError::Persist {
            path: path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap()
    }

    #[tokio::test]
    async fn single_use_token_is_spent_once_and_stays_spent_after_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("join-tokens.json");
        let tokens = JoinTokens::open(path.clone()).unwrap();
        let new = tokens
            .create(&id(), Duration::from_secs(60), false)
            .await
            .unwrap();
        assert!(new.token.starts_with(TOKEN_PREFIX));
        let grant = tokens
            .authenticate(&new.token, SystemTime::now())
            .await
            .unwrap();
        assert_eq!(grant.id, id());
        tokens.consume(&grant, SystemTime::now()).await.unwrap();
        assert!(matches!(
            tokens.consume(&grant, SystemTime::now()).await,
            Err(TokenError::AlreadyUsed { .. })
        ));
        let file = std::fs::read_to_string(&path).unwrap();
        assert!(
            !file.contains(&new.token),
            "the token itself must never be stored"
        );
        assert!(file.contains(&token_hash(&new.token)));

        let reloaded = JoinTokens::open(path).unwrap();
        assert!(matches!(
            reloaded.authenticate(&new.token, SystemTime::now()).await,
            Err(TokenError::AlreadyUsed { .. })
        ));
    }

    #[tokio::test]
    async fn reusable_token_survives_use_and_expiry_is_enforced() {
        let tokens = JoinTokens::in_memory();
        let new = tokens
            .create(&id(), Duration::from_secs(60), true)
            .await
            .unwrap();
        for _ in 0..3 {
            let grant = tokens
                .authenticate(&new.token, SystemTime::now())
                .await
                .unwrap();
            tokens.consume(&grant, SystemTime::now()).await.unwrap();
        }
        let later = SystemTime::now() + Duration::from_secs(120);
        let err = tokens.authenticate(&new.token, later).await.unwrap_err();
        assert!(matches!(err, TokenError::Expired { .. }), "{err}");
        assert!(matches!(
            tokens
                .authenticate("latch-jt-nope", SystemTime::now())
                .await,
            Err(TokenError::Unknown)
        ));
    }

    /// A reusable, never-expiring configured token's record for `id()`.
    fn configured_record() -> TokenRecord {
        TokenRecord {
            spiffe_id: id().to_string(),
            expires_at: None,
            reusable: true,
            used_at: None,
            configured: true,
            created_at_ms: None,
        }
    }

    #[tokio::test]
    async fn configured_tokens_by_value_or_hash() {
        let tokens = JoinTokens::in_memory();
        let record = configured_record();
        tokens
            .add_configured(Some("a-long-enough-token"), None, record.clone())
            .unwrap();
        tokens
            .add_configured(
                None,
                Some(&token_hash("another-long-token")),
                record.clone(),
            )
            .unwrap();
        assert!(
            tokens
                .authenticate("a-long-enough-token", SystemTime::now())
                .await
                .is_ok()
        );
        assert!(
            tokens
                .authenticate("another-long-token", SystemTime::now())
                .await
                .is_ok()
        );
        assert!(matches!(
            tokens.add_configured(Some("short"), None, record.clone()),
            Err(TokenError::TooShort(5))
        ));
        assert!(matches!(
            tokens.add_configured(None, Some("XYZ"), record),
            Err(TokenError::BadHash(_))
        ));
    }

    #[tokio::test]
    async fn a_token_removed_from_the_config_is_forgotten_and_created_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("join-tokens.json");
        let tokens = JoinTokens::open(state.clone()).unwrap();
        let record = configured_record();
        let kept = tokens
            .add_configured(Some("kept-configured-token"), None, record.clone())
            .unwrap();
        tokens
            .add_configured(Some("removed-configured-token"), None, record)
            .unwrap();
        let created = tokens
            .create(&id(), Duration::from_secs(60), true)
            .await
            .unwrap();
        let listed = std::collections::HashSet::from([kept]);
        assert_eq!(
            tokens.forget_unlisted_configured(&listed).unwrap(),
            [id().to_string()]
        );
        let now = SystemTime::now();
        assert!(matches!(
            tokens.authenticate("removed-configured-token", now).await,
            Err(TokenError::Unknown)
        ));
        assert!(
            tokens
                .authenticate("kept-configured-token", now)
                .await
                .is_ok()
        );
        assert!(tokens.authenticate(&created.token, now).await.is_ok());
        // And so after a restart: the state file no longer holds it.
        let reopened = JoinTokens::open(state).unwrap();
        assert!(
            reopened
                .authenticate("removed-configured-token", now)
                .await
                .is_err()
        );
        assert!(reopened.authenticate(&created.token, now).await.is_ok());
    }

    #[tokio::test]
    async fn a_pod_without_shared_state_refuses_single_use_tokens_and_says_why() {
        let tokens = JoinTokens::in_memory().unguaranteed();
        let err = tokens
            .create(&id(), Duration::from_secs(60), false)
            .await
            .unwrap_err();
        assert!(matches!(err, TokenError::SingleUseUnguaranteed), "{err}");
        assert!(err.to_string().contains("--kubernetes"), "{err}");
        // A configured single-use token is refused at use, a reusable one works.
        let single = TokenRecord {
            reusable: false,
            ..configured_record()
        };
        tokens
            .add_configured(Some("configured-single-use"), None, single)
            .unwrap();
        let now = SystemTime::now();
        assert!(matches!(
            tokens.authenticate("configured-single-use", now).await,
            Err(TokenError::SingleUseUnguaranteed)
        ));
        let reusable = tokens
            .create(&id(), Duration::from_secs(60), true)
            .await
            .unwrap();
        let grant = tokens.authenticate(&reusable.token, now).await.unwrap();
        tokens.consume(&grant, now).await.unwrap();
    }
}
