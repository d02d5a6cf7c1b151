//! Revoked identities: an operator takes a SPIFFE ID back (`latchctl revoke`). A revocation
//! covers every SVID of that ID issued at or before it: the certificate service refuses to
//! renew one or to issue on a proof that predates it, and proxies, which receive the list over
//! discovery, refuse handshakes presenting one and close the connections that did. A workload
//! registered again afterwards (a new join token) gets an SVID that is not covered. Kept in
//! `<data-dir>/revocations.json` (0600); a revocation is dropped once no SVID it covers can
//! still be valid (its time plus the longest TTL the CA issues).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use latch_identity::SpiffeId;
use latch_identity::svid::format_time;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;

use crate::revocation_secret::RevocationSecret;

/// Longest reason kept (characters).
pub const MAX_REASON_CHARS: usize = 256;

#[derive(Debug, Error)]
pub enum RevocationError {
    #[error(
        "cannot record revocations in {path}: {source}; nothing was revoked (check that the \
         data dir is writable and has free space, then retry)"
    )]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("revocation state file {path} is unreadable or corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "cannot {action} the revocations Secret {secret} in the Kubernetes API: {reason}; \
         nothing was revoked, retry (and check latch-control's RBAC on Secrets of its namespace)"
    )]
    Shared {
        secret: String,
        action: &'static str,
        reason: String,
    },
}

/// One revoked identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revocation {
    pub spiffe_id: String,
    /// Unix milliseconds: SVIDs of this ID issued, and tokens for it created, at or before this
    /// are revoked.
    pub revoked_at_ms: u64,
    pub reason: String,
    /// Unix seconds after which no covered SVID can be valid; the revocation is dropped then.
    pub expires_at: u64,
}

impl Revocation {
    fn revoked_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.revoked_at_ms)
    }

    /// The revocation time as proxies get it: whole seconds, as SVID times are. Nothing is
    /// issued for the ID before the next second starts (`holds_off`), so an SVID issued in this
    /// second was issued before the revocation.
    fn revoked_at_second(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.revoked_at_ms / 1000)
    }

    /// What a refusal says: the ID, when, why, and how to come back.
    pub fn refusal(&self) -> String {
        format!(
            "{} was revoked at {} ({}); register the workload again (a new join token) to get \
             a new SVID",
            self.spiffe_id,
            format_time(self.revoked_at()),
            latch_admin::untrusted(&self.reason, MAX_REASON_CHARS)
        )
    }
}

/// What `revocations.json` (and, with `--kubernetes`, the revocations Secret) holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct StateFile {
    version: u32,
    pub(crate) revocations: BTreeMap<String, Revocation>,
}

impl StateFile {
    pub(crate) fn new(revocations: BTreeMap<String, Revocation>) -> Self {
        Self {
            version: 1,
            revocations,
        }
    }
}

/// The revocations, in memory and on disk (or, with `--kubernetes`, in a Secret shared by the
/// replicas: `revocation_secret`); `subscribe` wakes on every change.
#[derive(Debug)]
pub struct Revocations {
    entries: Mutex<BTreeMap<String, Revocation>>,
    state_path: Option<PathBuf>,
    shared: Option<RevocationSecret>,
    /// False while shared revocations could not be read yet: nothing is issued meanwhile.
    loaded: std::sync::atomic::AtomicBool,
    changes: watch::Sender<u64>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Revocations {
    /// An in-memory store (tests, or a control plane without a data dir).
    pub fn in_memory() -> Self {
        Self {
            entries: Mutex::new(BTreeMap::new()),
            state_path: None,
            shared: None,
            loaded: true.into(),
            changes: watch::Sender::new(0),
        }
    }

    /// Revocations kept in the Kubernetes API, starting from `entries`, what the Secret held at
    /// start (`None` when it could not be read: `is_loaded` is false until the watch has read
    /// it); `RevocationSecret::follow` keeps them current.
    pub fn shared(secret: RevocationSecret, entries: Option<BTreeMap<String, Revocation>>) -> Self {
        Self {
            loaded: entries.is_some().into(),
            entries: Mutex::new(entries.unwrap_or_default()),
            state_path: None,
            shared: Some(secret),
            changes: watch::Sender::new(0),
        }
    }

    /// Whether the revocations are known: false while shared ones have not been read yet.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Replaces every revocation with `entries` (what the shared Secret holds now); wakes the
    /// subscribers when that is a change.
    pub fn replace_all(&self, entries: BTreeMap<String, Revocation>) {
        let mut current = self.lock();
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
        if *current == entries {
            return;
        }
        *current = entries;
        drop(current);
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Loads the state file if present; later changes are written back to it.
    pub fn open(state_path: PathBuf) -> Result<Self, RevocationError> {
        let entries = match std::fs::read(&state_path) {
            Ok(bytes) => {
                let state: StateFile =
                    serde_json::from_slice(&bytes).map_err(|e| RevocationError::Corrupt {
                        path: state_path.clone(),
                        reason: e.to_string(),
                    })?;
                state.revocations
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(RevocationError::Corrupt {
                    path: state_path,
                    reason: e.to_string(),
                });
            }
        };
        Ok(Self {
            entries: Mutex::new(entries),
            state_path: Some(state_path),
            shared: None,
            loaded: true.into(),
            changes: watch::Sender::new(0),
        })
    }

    /// Revokes every SVID of `id` issued up to `now`, for `reason`; kept until `now + cover`
    /// (the longest SVID lifetime plus the backdate). Revoking an ID again moves its time on.
    /// Recorded (on disk, or in the shared Secret) before it is returned.
    pub async fn revoke(
        &self,
        id: &SpiffeId,
        reason: &str,
        now: SystemTime,
        cover: Duration,
    ) -> Result<Revocation, RevocationError> {
        let revocation = Revocation {
            spiffe_id: id.to_string(),
            // Rounded up: whatever happened at `now` itself is covered.
            revoked_at_ms: now.duration_since(UNIX_EPOCH).map_or(0, |d| {
                u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
            }),
            reason: reason.chars().take(MAX_REASON_CHARS).collect(),
            expires_at: unix(now + cover),
        };
        if let Some(secret) = &self.shared {
            let entries = secret.add(&revocation, now).await?;
            self.replace_all(entries);
            return Ok(revocation);
        }
        let mut entries = self.lock();
        let previous = entries.insert(id.to_string(), revocation.clone());
        if let Err(e) = self.persist(&entries) {
            // Not on disk, so not revoked: a restart would forget it.
            match previous {
                Some(previous) => entries.insert(id.to_string(), previous),
                None => entries.remove(id.as_str()),
            };
            return Err(e);
        }
        drop(entries);
        self.changes.send_modify(|generation| *generation += 1);
        Ok(revocation)
    }

    /// The revocations still in force at `now`.
    pub fn list(&self, now: SystemTime) -> Vec<Revocation> {
        self.lock()
            .values()
            .filter(|r| r.expires_at > unix(now))
            .cloned()
            .collect()
    }

    /// What the MeshConfig carries: each revoked ID still in force with its time.
    pub fn for_discovery(&self, now: SystemTime) -> BTreeMap<SpiffeId, SystemTime> {
        self.list(now)
            .into_iter()
            .filter_map(|r| Some((SpiffeId::parse(&r.spiffe_id).ok()?, r.revoked_at_second())))
            .collect()
    }

    /// The revocation covering an SVID (or a proof) of `id` issued at `issued_at`, if any.
    pub fn covering(&self, id: &SpiffeId, issued_at: SystemTime) -> Option<Revocation> {
        self.lock()
            .get(id.as_str())
            .filter(|r| issued_at <= r.revoked_at() && r.expires_at > unix(SystemTime::now()))
            .cloned()
    }

    /// True while no SVID may be issued for `id` because it was revoked within the second
    /// `now` is in: the SVID would carry that second as its issue time, which proxies read as
    /// "issued before the revocation".
    pub fn holds_off(&self, id: &SpiffeId, now: SystemTime) -> bool {
        self.lock()
            .get(id.as_str())
            .is_some_and(|r| unix(now) <= r.revoked_at_ms / 1000)
    }

    /// Drops the revocations that have expired at `now`; returns how many.
    pub fn prune(&self, now: SystemTime) -> Result<usize, RevocationError> {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|_, r| r.expires_at > unix(now));
        let dropped = before - entries.len();
        if dropped > 0 {
            // Dropped in memory even if the write fails: they have expired, and the next write
            // (or start) drops them on disk too.
            let _ = self.persist(&entries);
            drop(entries);
            self.changes.send_modify(|generation| *generation += 1);
        }
        Ok(dropped)
    }

    /// A receiver marked changed on every revocation or expiry.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Revocation>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn persist(&self, entries: &BTreeMap<String, Revocation>) -> Result<(), RevocationError> {
        let Some(path) = &self.state_path else {
            return Ok(());
        };
        let state = StateFile::new(entries.clone());
        let persist_err = |source| RevocationError::Persist {
            path: path.clone(),
            source,
        };
        let json =
            serde_json::to_vec_pretty(&state).map_err(|e| persist_err(std::io::Error::other(e)))?;
        latch_identity::files::write_private(path, &json).map_err(persist_err)
    }
}

/// The identities issued for since this process started, each with the proof and serial of its
/// latest SVID: what an operator looks at before revoking (`latchctl identities`). In memory
/// only; one entry per SPIFFE ID, and only a caller with a valid proof adds one.
#[derive(Debug, Default)]
pub struct Issued(dashmap::DashMap<String, IssuedRecord>);

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IssuedRecord {
    pub spiffe_id: String,
    /// join_token, service_account_token or renewal.
    pub proof: &'static str,
    pub serial: String,
    /// Unix seconds.
    pub last_issued_at: u64,
    pub count: u64,
}

impl Issued {
    pub fn record(&self, id: &SpiffeId, proof: &'static str, serial: &str, now: SystemTime) {
        let mut entry = self
            .0
            .entry(id.to_string())
            .or_insert_with(|| IssuedRecord {
                spiffe_id: id.to_string(),
                proof,
                serial: String::new(),
                last_issued_at: 0,
                count: 0,
            });
        entry.proof = proof;
        entry.serial = serial.to_string();
        entry.last_issued_at = unix(now);
        entry.count += 1;
    }

    /// Every entry, by SPIFFE ID.
    pub fn list(&self) -> Vec<IssuedRecord> {
        let mut list: Vec<IssuedRecord> = self.0.iter().map(|e| e.value().clone()).collect();
        list.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn a_revocation_covers_what_was_issued_before_it_survives_a_restart_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revocations.json");
        let revocations = Revocations::open(path.clone()).unwrap();
        let now = SystemTime::now();
        let mut changes = revocations.subscribe();
        let r = revocations
            .revoke(&id(), "key leaked\nINFO forged", now, HOUR)
            .await
            .unwrap();
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert!(revocations.covering(&id(), now - HOUR).is_some());
        assert!(revocations.covering(&id(), now).is_some());
        assert!(
            revocations
                .covering(&id(), now + Duration::from_secs(2))
                .is_none(),
            "an SVID issued after the revocation (registered again) is not covered"
        );
        let other = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/api").unwrap();
        assert!(revocations.covering(&other, now).is_none());
        assert!(
            r.refusal().contains(r#""key leaked\nINFO forged""#),
            "{}",
            r.refusal()
        );

        let reopened = Revocations::open(path.clone()).unwrap();
        assert_eq!(reopened.list(now), [r]);
        assert_eq!(reopened.for_discovery(now).len(), 1);

        // Once every SVID it covers has expired, it is dropped, on disk too.
        assert_eq!(reopened.prune(now + 2 * HOUR).unwrap(), 1);
        assert!(reopened.list(now).is_empty());
        assert!(Revocations::open(path).unwrap().list(now).is_empty());
    }

    #[tokio::test]
    async fn a_revocation_that_cannot_be_written_is_not_made() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: every write fails.
        let path = dir.path().join("revocations.json");
        std::fs::create_dir(&path).unwrap();
        let revocations = Revocations {
            entries: Mutex::new(BTreeMap::new()),
            state_path: Some(path),
            shared: None,
            loaded: true.into(),
            changes: watch::Sender::new(0),
        };
        let err = revocations
            .revoke(&id(), "test", SystemTime::now(), HOUR)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nothing was revoked"), "{err}");
        assert!(revocations.list(SystemTime::now()).is_empty());
    }
}
