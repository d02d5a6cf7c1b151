//! The Kubernetes config source (`--kubernetes`): kube-rs watchers on Pods, Services,
//! EndpointSlices and latch.dev `AuthorizationPolicy` objects keep a copy of them; once every
//! kind has been listed, each change is applied ~100 ms after it arrives (changes in that window
//! are applied together) by `kube_translate::translate` and `Mesh::publish`. The config file's
//! model arrives through a watch channel: its `mesh:` settings apply, and its workloads, services
//! and policies (machines outside the cluster) join the cluster's unless they conflict. A kind
//! that cannot be listed or watched is named in /ready's body until it can. Started by
//! `ControlPlane::start`.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource};
use latch_identity::TrustDomain;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Mesh;
use super::kube_translate::{ClusterObjects, Skipped, add_file_entries, is_meshed, translate};
use super::model::MeshModel;
use crate::metrics::Metrics;

/// How long after a change the model is rebuilt; changes arriving meanwhile join it.
pub const SETTLE: Duration = Duration::from_millis(100);
/// How long /ready names a failed list or watch after its last failure. The watchers retry
/// with backoff capped at 30 s, so a failure that persists is reported again before this ends.
/// Objects per list page when a watcher lists (and relists) a kind: a cluster with 50,000 pods is
/// read in pages of this many, never in one response held whole by the API server and here.
/// (kube-runtime's default too, and client-go's; set here so it does not change under us. A 1.29
/// API server answers the watcher's `resourceVersion=0` lists from its watch cache, which does
/// not page; newer ones and lists from etcd do.)
pub const LIST_PAGE_SIZE: u32 = 500;

const FAILURE_SHOWN: Duration = Duration::from_secs(65);

/// The `AuthorizationPolicy` custom resource (deploy/kubernetes/10-crd-authorizationpolicy.yaml).
pub fn authorization_policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("latch.dev", "v1alpha1", "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

/// The objects of one kind, as the watcher last reported them.
struct Table<K> {
    kind: &'static str,
    objects: BTreeMap<String, K>,
    /// Objects of a (re)list in progress; they replace `objects` when it is complete.
    relisting: Option<BTreeMap<String, K>>,
    listed: bool,
}

fn key<K: Resource>(object: &K) -> String {
    let meta = object.meta();
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

impl<K: Resource> Table<K> {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            objects: BTreeMap::new(),
            relisting: None,
            listed: false,
        }
    }

    /// Applies one watcher event; true when `objects` changed.
    fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Apply(object) => {
                self.objects.insert(key(&object), object);
                true
            }
            Event::Delete(object) => self.objects.remove(&key(&object)).is_some(),
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                self.relisting
                    .get_or_insert_default()
                    .insert(key(&object), object);
                false
            }
            Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                if !self.listed {
                    tracing::info!(kind = self.kind, count = self.objects.len(), "listed");
                }
                self.listed = true;
                true
            }
        }
    }
}

/// What a watcher yields, boxed: objects differ much in size.
type Watched<K> = Box<Result<Event<K>, watcher::Error>>;

/// One watcher's output, tagged with its kind.
enum Update {
    Pod(Watched<Pod>),
    Service(Watched<KubeService>),
    EndpointSlice(Watched<EndpointSlice>),
    Policy(Watched<DynamicObject>),
}

type Updates = Pin<Box<dyn Stream<Item = Update> + Send>>;

/// Feeds the mesh from the Kubernetes API.
pub struct KubeSource {
    /// A client made for watches (`KubernetesAccess::watch_client`).
    pub client: kube::Client,
    pub trust_domain: TrustDomain,
    /// The config file's model (empty without a file); rebuilt with the cluster's when it
    /// changes.
    pub file: watch::Receiver<MeshModel>,
    pub mesh: Arc<Mesh>,
    pub metrics: Arc<Metrics>,
    /// Told the namespaces holding injected pods (any phase: a pending proxy needs its trust
    /// bundle ConfigMap to start), for `bundle_configmaps`.
    pub meshed_namespaces: Option<watch::Sender<BTreeSet<String>>>,
}

impl KubeSource {
    /// Watches the cluster until `cancel` fires.
    pub fn spawn(self, tracker: &TaskTracker, cancel: CancellationToken) {
        for kind in KINDS {
            self.mesh
                .set_problem(&problem_source(kind), Some("not listed yet".into()));
        }
        tracker.spawn(self.run(cancel));
    }

    fn updates(&self) -> Updates {
        let config = || watcher::Config::default().page_size(LIST_PAGE_SIZE);
        let pods = watcher::watcher(Api::<Pod>::all(self.client.clone()), config())
            .default_backoff()
            .map(|event| Update::Pod(Box::new(event)));
        let services = watcher::watcher(Api::<KubeService>::all(self.client.clone()), config())
            .default_backoff()
            .map(|event| Update::Service(Box::new(event)));
        let slices = watcher::watcher(Api::<EndpointSlice>::all(self.client.clone()), config())
            .default_backoff()
            .map(|event| Update::EndpointSlice(Box::new(event)));
        let policies = watcher::watcher(
            Api::<DynamicObject>::all_with(self.client.clone(), &authorization_policy_resource()),
            config(),
        )
        .default_backoff()
        .map(|event| Update::Policy(Box::new(event)));
        Box::pin(
            Box::pin(pods)
                .merge(Box::pin(services))
                .merge(Box::pin(slices))
                .merge(Box::pin(policies)),
        )
    }

    async fn run(mut self, cancel: CancellationToken) {
        let mut updates = self.updates();
        let mut pods = Table::<Pod>::new("Pod");
        let mut services = Table::<KubeService>::new("Service");
        let mut slices = Table::<EndpointSlice>::new("EndpointSlice");
        let mut policies = Table::<DynamicObject>::new("AuthorizationPolicy");
        let mut file_open = true;
        // When the first change not yet in the served model arrived.
        let mut pending: Option<Instant> = None;
        let mut reported: BTreeSet<Skipped> = BTreeSet::new();
        loop {
            let deadline = pending.map(|since| since + SETTLE);
            let changed = tokio::select! {
                _ = cancel.cancelled() => break,
                update = updates.next() => {
                    let Some(update) = update else { break };
                    match update {
                        Update::Pod(event) => self.watched(&mut pods, *event),
                        Update::Service(event) => self.watched(&mut services, *event),
                        Update::EndpointSlice(event) => self.watched(&mut slices, *event),
                        Update::Policy(event) => self.watched(&mut policies, *event),
                    }
                }
                result = self.file.changed(), if file_open => {
                    file_open = result.is_ok();
                    file_open
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    pending = None;
                    if pods.listed && services.listed && slices.listed && policies.listed {
                        let objects = ClusterObjects {
                            pods: pods.objects.clone(),
                            services: services.objects.clone(),
                            endpoint_slices: slices.objects.clone(),
                            policies: policies.objects.clone(),
                        };
                        self.publish(&objects, &mut reported);
                    }
                    false
                }
            };
            if changed {
                pending.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Applies a watcher's event to its table; logs and counts its errors (the watcher retries
    /// with backoff and relists, so nothing else is needed).
    fn watched<K: Resource>(
        &self,
        table: &mut Table<K>,
        event: Result<Event<K>, watcher::Error>,
    ) -> bool {
        match event {
            Ok(event) => {
                // `Init` comes before the list request; anything else is an answer.
                if !matches!(event, Event::Init) {
                    self.mesh.set_problem(&problem_source(table.kind), None);
                }
                table.apply(event)
            }
            Err(e) => {
                tracing::warn!(
                    kind = table.kind,
                    "watching the Kubernetes API failed, retrying: {e} (does the latch-control \
                     ClusterRole allow list and watch on it? is the AuthorizationPolicy CRD \
                     installed?)"
                );
                self.metrics.kubernetes_watch_failed(table.kind);
                let problem = if table.listed {
                    format!(
                        "watch failed at {}, retrying; serving what was listed before: {e}",
                        latch_identity::svid::format_time(std::time::SystemTime::now())
                    )
                } else {
                    format!("cannot list, retrying: {e}")
                };
                // A watch that recovers produces no event until something changes, so the
                // problem fades after FAILURE_SHOWN: a failure that persists is retried (and
                // set again) well within it.
                self.mesh.set_problem_until(
                    &problem_source(table.kind),
                    Some(problem),
                    Some(std::time::Instant::now() + FAILURE_SHOWN),
                );
                false
            }
        }
    }

    fn publish(&self, objects: &ClusterObjects, reported: &mut BTreeSet<Skipped>) {
        let file = self.file.borrow().clone();
        let mut translation = translate(objects, &self.trust_domain, &file.settings);
        add_file_entries(&mut translation, &file);
        let skipped: BTreeSet<Skipped> = translation.skipped.into_iter().collect();
        for s in skipped.difference(reported) {
            tracing::warn!(
                kind = s.kind,
                object = %s.object,
                "left out of the mesh: {}",
                s.reason
            );
        }
        for kind in ["Pod", "Service", "AuthorizationPolicy", "ConfigFile"] {
            let count = skipped.iter().filter(|s| s.kind == kind).count();
            self.metrics
                .kubernetes_skipped_now(kind, i64::try_from(count).unwrap_or(i64::MAX));
        }
        *reported = skipped;
        self.mesh.publish(translation.model);
        if let Some(sender) = &self.meshed_namespaces {
            let namespaces: BTreeSet<String> = objects
                .pods
                .values()
                .filter(|pod| is_meshed(pod))
                .filter_map(|pod| pod.metadata.namespace.clone())
                .collect();
            sender.send_if_modified(|current| {
                let changed = *current != namespaces;
                *current = namespaces;
                changed
            });
        }
    }
}

/// The kinds watched, as tables and /ready name them.
const KINDS: [&str; 4] = ["Pod", "Service", "EndpointSlice", "AuthorizationPolicy"];

/// The /ready source name of a watched kind.
fn problem_source(kind: &str) -> String {
    format!("kubernetes {kind}")
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
