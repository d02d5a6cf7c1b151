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

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

pub use model::{MeshError, MeshModel};
pub use snapshot::{MeshSnapshot, ResourceMap, ResourceType, VersionedResource};

use crate::metrics::Metrics;

/// The current mesh and everyone waiting for the next one.
#[derive(Debug)]
pub struct Mesh {
    trust_bundle_pem: String,
    snapshots: watch::Sender<Arc<MeshSnapshot>>,
    /// Serializes `publish`, so each snapshot is built on top of the one before it.
    publishing: Mutex<()>,
    /// Why the config source's latest content is not what is served; shown on /ready.
    source_problem: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

impl Mesh {
    /// An empty mesh: only the MeshConfig, carrying `trust_bundle_pem`.
    pub fn new(trust_bundle_pem: String, metrics: Arc<Metrics>) -> Self {
        let empty = MeshSnapshot::build(MeshModel::default(), &trust_bundle_pem, None, 0);
        metrics.mesh_generation.set(0);
        Self {
            trust_bundle_pem,
            snapshots: watch::Sender::new(Arc::new(empty)),
            publishing: Mutex::new(()),
            source_problem: Mutex::new(None),
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
        let _guard = self
            .publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.snapshot();
        let next = MeshSnapshot::build(
            model,
            &self.trust_bundle_pem,
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

    /// Why the latest config is not being served, if it is not.
    pub fn source_problem(&self) -> Option<String> {
        self.source_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_source_problem(&self, problem: Option<String>) {
        *self
            .source_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = problem;
    }
}
