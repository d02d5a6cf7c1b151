//! The mesh model the control plane serves: config sources (`file_source` from YAML through
//! `spec` -> `model`, `kube_source` from the Kubernetes API through `kube_translate`) publish
//! immutable `MeshSnapshot`s through `Mesh`, a watch channel the discovery streams read. Zero
//! configuration is an empty mesh holding only the MeshConfig.

pub mod file_source;
pub mod kube_source;
pub mod kube_translate;
pub mod model;
pub mod snapshot;
pub mod spec;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use latch_identity::SpiffeId;

use tokio::sync::watch;

pub use model::MeshModel;
pub use snapshot::{MeshSnapshot, ResourceMap, ResourceType, VersionedResource};

use crate::metrics::Metrics;

/// A source's problem; one with `until` is dropped from /ready once that passes (for failures
/// that are retried and whose recovery may produce no event, such as a Kubernetes watch).
#[derive(Debug)]
struct Problem {
    text: String,
    until: Option<std::time::Instant>,
}

/// The current mesh and everyone waiting for the next one.
#[derive(Debug)]
pub struct Mesh {
    /// The MeshConfig's trust bundle; replaced by `set_trust_bundle` during a root rotation.
    trust_bundle_pem: Mutex<String>,
    /// The MeshConfig's JWT bundle (JWKS JSON); replaced by `set_jwt_bundle` on key rotation.
    jwt_bundle_jwks: Mutex<String>,
    /// The MeshConfig's revocations; replaced by `set_revocations`.
    revocations: Mutex<BTreeMap<SpiffeId, SystemTime>>,
    snapshots: watch::Sender<Arc<MeshSnapshot>>,
    /// Serializes `publish`, so each snapshot is built on top of the one before it.
    publishing: Mutex<()>,
    /// Why what is served may differ from what a source holds, by source (`config`,
    /// `kubernetes Pod`, ...); shown in /ready's body.
    problems: Mutex<BTreeMap<String, Problem>>,
    /// False until the source published its first model (the Kubernetes source lists every
    /// kind first); until then /ready fails and discovery streams are refused.
    synced: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Mesh {
    /// An empty mesh: only the MeshConfig, carrying `trust_bundle_pem`. `synced` says whether
    /// it may be served as it is (false: wait for the source's first `publish`).
    pub fn new(trust_bundle_pem: String, metrics: Arc<Metrics>, synced: bool) -> Self {
        Self::with_jwt_bundle(trust_bundle_pem, String::new(), metrics, synced)
    }

    /// `new`, with the JWT bundle (JWKS JSON) in the MeshConfig from the first snapshot on.
    pub fn with_jwt_bundle(
        trust_bundle_pem: String,
        jwt_bundle_jwks: String,
        metrics: Arc<Metrics>,
        synced: bool,
    ) -> Self {
        let empty = MeshSnapshot::build_with_jwt(
            MeshModel::default(),
            &trust_bundle_pem,
            &jwt_bundle_jwks,
            &BTreeMap::new(),
            None,
            0,
        );
        metrics.mesh_generation.set(0);
        Self {
            trust_bundle_pem: Mutex::new(trust_bundle_pem),
            jwt_bundle_jwks: Mutex::new(jwt_bundle_jwks),
            revocations: Mutex::new(BTreeMap::new()),
            snapshots: watch::Sender::new(Arc::new(empty)),
            publishing: Mutex::new(()),
            problems: Mutex::new(BTreeMap::new()),
            synced: AtomicBool::new(synced),
            metrics,
        }
    }

    /// The mesh as it is now.
    pub fn snapshot(&self) -> Arc<MeshSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// A receiver that is marked changed whenever a new snapshot is published. A slow reader
    /// only ever sees the newest one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshSnapshot>> {
        self.snapshots.subscribe()
    }

    /// Publishes `model` unless it holds exactly what is served already. Returns whether a
    /// new snapshot was published.
    pub fn publish(&self, model: MeshModel) -> bool {
        self.publish_model(Some(model))
    }

    /// Publishes `model` (a source's; it is synced from now on), or the current model again
    /// (`None`: the trust bundle changed).
    fn publish_model(&self, model: Option<MeshModel>) -> bool {
        let _guard = self
            .publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.snapshot();
        let model = match model {
            Some(model) => {
                self.synced.store(true, Ordering::Release);
                model
            }
            None => current.model.as_ref().clone(),
        };
        let bundle = self
            .trust_bundle_pem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let jwks = self
            .jwt_bundle_jwks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let revocations = self
            .revocations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let next = MeshSnapshot::build_with_jwt(
            model,
            &bundle,
            &jwks,
            &revocations,
            Some(&current),
            current.generation + 1,
        );
        if next.same_content(&current) {
            return false;
        }
        tracing::info!(
            generation = next.generation,
            version = %next.version,
            workloads = next.model.workloads.len(),
            services = next.model.services.len(),
            policies = next.model.policies.len(),
            "publishing mesh model"
        );
        self.metrics
            .mesh_generation
            .set(i64::try_from(next.generation).unwrap_or(i64::MAX));
        self.snapshots.send_replace(Arc::new(next));
        true
    }

    /// Serves `revocations` in the MeshConfig from now on, republishing the current model.
    pub fn set_revocations(&self, revocations: BTreeMap<SpiffeId, SystemTime>) {
        *self
            .revocations
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = revocations;
        if self.publish_model(None) {
            tracing::info!("revocations republished to the proxies");
        }
    }

    /// Serves `pem` as the MeshConfig's trust bundle from now on (a root rotation step),
    /// republishing the current model with it. Does not count as the source's first model.
    pub fn set_trust_bundle(&self, pem: String) {
        *self
            .trust_bundle_pem
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = pem;
        if self.publish_model(None) {
            tracing::info!("trust bundle republished to the proxies");
        }
    }

    /// Serves `jwks` as the MeshConfig's JWT bundle from now on (at start and after every
    /// signing-key rotation or prune), republishing the current model with it. Does not count
    /// as the source's first model.
    pub fn set_jwt_bundle(&self, jwks: String) {
        *self
            .jwt_bundle_jwks
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = jwks;
        if self.publish_model(None) {
            tracing::info!("JWT bundle republished to the proxies");
        }
    }

    /// Whether the source has published its first model.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Every source's current problem, one line each ("<source>: <problem>").
    pub fn problems(&self) -> Vec<String> {
        let now = std::time::Instant::now();
        self.problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, problem)| problem.until.is_none_or(|until| now < until))
            .map(|(source, problem)| format!("{source}: {}", problem.text))
            .collect()
    }

    /// Sets (or clears, with `None`) the problem of `source` until it is set again.
    pub(crate) fn set_problem(&self, source: &str, problem: Option<String>) {
        self.set_problem_until(source, problem, None);
    }

    /// Sets (or clears) the problem of `source`, shown until `until` at most.
    pub(crate) fn set_problem_until(
        &self,
        source: &str,
        problem: Option<String>,
        until: Option<std::time::Instant>,
    ) {
        let mut problems = self.problems.lock().unwrap_or_else(PoisonError::into_inner);
        match problem {
            Some(text) => problems.insert(source.to_string(), Problem { text, until }),
            None => problems.remove(source),
        };
    }
}
