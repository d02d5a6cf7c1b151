//! The config-file source: loads the `--config` YAML at start-up, then polls it (metadata every
//! 100 ms, content hash to confirm) and applies a change once the content has been stable for
//! 100 ms. Polling follows renames and Kubernetes ConfigMap symlink swaps alike. A bad edit
//! keeps the last good model; the error is logged, counted and shown on /ready.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use latch_identity::TrustDomain;
use latch_identity::bundle::sha256_hex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Mesh, MeshModel};
use crate::config::FileConfig;
use crate::metrics::Metrics;
use crate::tokens::JoinTokens;

/// How often the file's metadata is checked.
pub const POLL_PERIOD: Duration = Duration::from_millis(100);
/// How long new content must stay the same before it is applied (editors write in steps).
pub const SETTLE: Duration = Duration::from_millis(100);
/// The content is re-read this often even when the metadata looks unchanged, for file systems
/// with coarse timestamps.
const REREAD_EVERY: u32 = 10;

/// What the file looked like: `metadata` follows symlinks, so a ConfigMap swap changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fingerprint {
    File {
        len: u64,
        modified: Option<SystemTime>,
        inode: (u64, u64),
    },
    Unreadable(String),
}

fn fingerprint(path: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => Fingerprint::File {
            len: m.len(),
            modified: m.modified().ok(),
            inode: (m.dev(), m.ino()),
        },
        Err(e) => Fingerprint::Unreadable(e.kind().to_string()),
    }
}

/// The file's content, or why it could not be read; `hash` tells contents apart.
#[derive(Debug, Clone)]
struct Content {
    hash: String,
    text: Result<String, String>,
}

fn read(path: &Path) -> Content {
    match std::fs::read(path) {
        Ok(bytes) => Content {
            hash: sha256_hex(&bytes),
            text: String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_string()),
        },
        Err(e) => Content {
            hash: format!("unreadable: {e}"),
            text: Err(format!("cannot read it: {e}")),
        },
    }
}

/// Parses and validates a config file's text: the file's own sections and the mesh model.
fn parse(text: &str, trust_domain: &TrustDomain) -> Result<(FileConfig, MeshModel), String> {
    let file = FileConfig::parse(text)?;
    let model = file.mesh_model(trust_domain).map_err(|e| e.to_string())?;
    Ok((file, model))
}

/// The config file as loaded at start-up.
pub struct Loaded {
    pub file: FileConfig,
    pub model: MeshModel,
    fingerprint: Fingerprint,
    hash: String,
}

/// Reads and validates the config file; at start-up an error here stops the control plane.
pub fn load(path: &Path, trust_domain: &TrustDomain) -> Result<Loaded, String> {
    // Fingerprint first: a change racing with this read is then seen by the first poll.
    let fingerprint = fingerprint(path);
    let content = read(path);
    let text = content
        .text
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    let (file, model) =
        parse(&text, trust_domain).map_err(|e| format!("config file {}: {e}", path.display()))?;
    Ok(Loaded {
        file,
        model,
        fingerprint,
        hash: content.hash,
    })
}

/// Applies later edits of the config file to the mesh and the join tokens.
pub struct FileSource {
    pub path: PathBuf,
    pub trust_domain: TrustDomain,
    pub tokens: Arc<JoinTokens>,
    pub mesh: Arc<Mesh>,
    pub metrics: Arc<Metrics>,
    /// With the Kubernetes source the file's model goes here, to be joined with the cluster's,
    /// instead of being published.
    pub to_cluster: Option<watch::Sender<MeshModel>>,
}

/// A content seen on disk, waiting to be stable for `SETTLE`.
struct Candidate {
    content: Content,
    since: Instant,
}

impl FileSource {
    /// Polls the file until `cancel` fires, starting from what `loaded` saw.
    pub fn spawn(self, loaded: &Loaded, tracker: &TaskTracker, cancel: CancellationToken) {
        let mut seen = loaded.fingerprint.clone();
        let mut tried = loaded.hash.clone();
        tracker.spawn(async move {
            let mut ticker = tokio::time::interval(POLL_PERIOD);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut candidate: Option<Candidate> = None;
            let mut ticks: u32 = 0;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                ticks = ticks.wrapping_add(1);
                let now = Instant::now();
                let current = fingerprint(&self.path);
                if current != seen || ticks.is_multiple_of(REREAD_EVERY) {
                    seen = current;
                    let content = read(&self.path);
                    let same = candidate
                        .as_ref()
                        .map(|c| c.content.hash.as_str())
                        .unwrap_or(tried.as_str())
                        == content.hash;
                    if !same {
                        candidate = Some(Candidate {
                            content,
                            since: now,
                        });
                    }
                }
                if let Some(c) = candidate.take_if(|c| now.duration_since(c.since) >= SETTLE)
                    && c.content.hash != tried
                {
                    tried = c.content.hash.clone();
                    self.apply(c.content.text);
                }
            }
        });
    }

    /// Applies one settled content of the file.
    fn apply(&self, text: Result<String, String>) {
        let outcome = text.and_then(|text| {
            let (file, model) = parse(&text, &self.trust_domain)?;
            file.apply_tokens(&self.trust_domain, &self.tokens)?;
            Ok(match &self.to_cluster {
                Some(cluster) => cluster.send_if_modified(|current| {
                    let changed = *current != model;
                    *current = model;
                    changed
                }),
                None => self.mesh.publish(model),
            })
        });
        match outcome {
            Ok(changed) => {
                let result = if changed { "applied" } else { "unchanged" };
                tracing::info!(path = %self.path.display(), result, "reloaded config file");
                self.metrics.config_reloaded(result);
                self.mesh.set_problem("config", None);
            }
            Err(e) => {
                let served = self.mesh.snapshot();
                // /ready stays 200 on purpose: the control plane still serves the last good
                // model, and failing readiness would take every replica out of its Service
                // for one typo. The body names the problem so operators and probes see it.
                let problem = format!(
                    "{}: {e}; serving the model loaded at {}",
                    self.path.display(),
                    latch_identity::svid::format_time(served.loaded_at)
                );
                tracing::warn!(
                    "config file {} rejected, keeping the model loaded at {} (generation {}): {e}",
                    self.path.display(),
                    latch_identity::svid::format_time(served.loaded_at),
                    served.generation
                );
                self.metrics.config_reloaded("rejected");
                self.mesh.set_problem("config", Some(problem));
            }
        }
    }
}
