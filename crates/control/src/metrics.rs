//! The control plane's Prometheus metrics: SVIDs issued by proof, refusals by reason, CA expiry,
//! discovery streams, responses and NACKs, config reloads, the mesh model generation, the
//! injector webhook's reviews and its caBundle sync failures, connections refused by listener
//! and reason. The
//! certificate service, the discovery server and the mesh record; the admin server renders
//! `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProofLabel {
    /// "join_token", "service_account_token" or "renewal".
    pub proof: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// grpc, webhook or admin.
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// Resource type: mesh_config, workload, service or authorization_policy.
    pub r#type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Kubernetes kind: Pod, Service, EndpointSlice or AuthorizationPolicy.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaCertLabel {
    /// root, intermediate, next root or previous root.
    pub role: &'static str,
    /// SHA-256 of the certificate, hex.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerLabel {
    /// The SPIFFE ID of the caller's certificate (verified, so bounded and of a known
    /// alphabet); never a string the caller merely sent, like a node id.
    pub spiffe_id: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Config reloads: applied, unchanged or rejected; webhook reviews: see the metric.
    pub result: &'static str,
}

/// Every metric the control plane exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub svids_issued: Family<ProofLabel, Counter>,
    pub svid_refusals: Family<ReasonLabel, Counter>,
    pub jwt_svids_issued: Counter,
    pub join_tokens_created: Counter,
    pub ca_expiry: Gauge,
    pub ca_certificate_expiry: Family<CaCertLabel, Gauge>,
    pub discovery_streams: Gauge,
    /// Names subscribed on demand, all streams and types together.
    pub discovery_subscriptions: Gauge,
    pub discovery_responses: Family<TypeLabel, Counter>,
    pub discovery_nacks: Family<CallerLabel, Counter>,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub mesh_generation: Gauge,
    pub webhook_reviews: Family<ResultLabel, Counter>,
    pub kubernetes_skipped: Family<KindLabel, Gauge>,
    pub kubernetes_watch_failures: Family<KindLabel, Counter>,
    pub webhook_ca_bundle_sync_failures: Counter,
    pub connections_refused: Family<RefusedLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let svids_issued = Family::<ProofLabel, Counter>::default();
        let svid_refusals = Family::<ReasonLabel, Counter>::default();
        let join_tokens_created = Counter::default();
        let jwt_svids_issued = Counter::default();
        registry.register(
            "latch_control_jwt_svids_issued",
            "JWT-SVIDs issued",
            jwt_svids_issued.clone(),
        );
        let ca_expiry = Gauge::default();
        registry.register(
            "latch_control_svids_issued",
            "X509-SVIDs issued, by the kind of proof the caller presented",
            svids_issued.clone(),
        );
        registry.register(
            "latch_control_svid_refusals",
            "Certificate requests refused, by reason",
            svid_refusals.clone(),
        );
        registry.register(
            "latch_control_join_tokens_created",
            "Join tokens created through the admin API",
            join_tokens_created.clone(),
        );
        registry.register(
            "latch_control_ca_expiry_timestamp_seconds",
            "The latest NotAfter a leaf can get: the earliest NotAfter from the signing CA \
             certificate up to its root, Unix seconds",
            ca_expiry.clone(),
        );
        let ca_certificate_expiry = Family::<CaCertLabel, Gauge>::default();
        registry.register(
            "latch_control_ca_certificate_expiry_timestamp_seconds",
            "NotAfter of every CA certificate in use (roots, intermediates, and the next or \
             previous root during a rotation), Unix seconds; /ready warns 30 days ahead",
            ca_certificate_expiry.clone(),
        );
        let discovery_streams = Gauge::default();
        let discovery_subscriptions = Gauge::default();
        registry.register(
            "latch_control_discovery_subscriptions",
            "Resource names subscribed on demand now (addresses or names), all streams and types",
            discovery_subscriptions.clone(),
        );
        let discovery_responses = Family::<TypeLabel, Counter>::default();
        let discovery_nacks = Family::<CallerLabel, Counter>::default();
        let config_reloads = Family::<ResultLabel, Counter>::default();
        let mesh_generation = Gauge::default();
        registry.register(
            "latch_control_discovery_streams",
            "Discovery (delta ADS) streams open now",
            discovery_streams.clone(),
        );
        registry.register(
            "latch_control_discovery_responses",
            "Discovery responses sent, by resource type",
            discovery_responses.clone(),
        );
        registry.register(
            "latch_control_discovery_nacks",
            "Discovery responses a proxy rejected, by the proxy's SPIFFE ID",
            discovery_nacks.clone(),
        );
        registry.register(
            "latch_control_config_reloads",
            "Config file edits processed: applied (new model served), unchanged, or rejected (last good model kept)",
            config_reloads.clone(),
        );
        registry.register(
            "latch_control_mesh_generation",
            "Generation of the mesh model being served; grows by one per published change",
            mesh_generation.clone(),
        );
        let webhook_reviews = Family::<ResultLabel, Counter>::default();
        registry.register(
            "latch_control_webhook_reviews",
            "AdmissionReviews answered by the injector webhook: injected, skipped (opted out, already injected, hostNetwork), ignored (not a pod creation), refused (pod denied), invalid (HTTP 400/413)",
            webhook_reviews.clone(),
        );
        let kubernetes_skipped = Family::<KindLabel, Gauge>::default();
        registry.register(
            "latch_control_kubernetes_objects_skipped",
            "Kubernetes objects left out of the mesh model now (malformed AuthorizationPolicy, unresolvable named target port, IP clash), by kind; the log names each",
            kubernetes_skipped.clone(),
        );
        let kubernetes_watch_failures = Family::<KindLabel, Counter>::default();
        registry.register(
            "latch_control_kubernetes_watch_failures",
            "Failed list or watch requests to the Kubernetes API (retried with backoff), by kind",
            kubernetes_watch_failures.clone(),
        );
        let webhook_ca_bundle_sync_failures = Counter::default();
        registry.register(
            "latch_control_webhook_ca_bundle_sync_failures",
            "Failed attempts to set the MutatingWebhookConfiguration's caBundle to the CA's roots (missing object, API error; retried every 5 s)",
            webhook_ca_bundle_sync_failures.clone(),
        );
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "latch_control_connections_refused",
            "Connections closed before or instead of being served, by listener and reason: \
             connection_limit, source_connection_limit (--max-connections-per-source), \
             handshake_timeout, first_request_timeout, unauthenticated_limit, \
             unauthenticated_evicted, unauthenticated_lifetime (--max-unauthenticated-connections), \
             request_header_timeout (webhook)",
            connections_refused.clone(),
        );
        Self {
            registry,
            svids_issued,
            svid_refusals,
            jwt_svids_issued,
            join_tokens_created,
            ca_expiry,
            ca_certificate_expiry,
            discovery_streams,
            discovery_subscriptions,
            discovery_responses,
            discovery_nacks,
            config_reloads,
            mesh_generation,
            webhook_reviews,
            kubernetes_skipped,
            kubernetes_watch_failures,
            webhook_ca_bundle_sync_failures,
            connections_refused,
        }
    }

    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }

    /// Connections `listener` closed so far for `reason`.
    pub fn connections_refused(&self, listener: &'static str, reason: &'static str) -> u64 {
        self.connections_refused
            .get_or_create(&RefusedLabels { listener, reason })
            .get()
    }

    /// Records the CA certificates in use and the latest NotAfter a leaf can get.
    pub fn set_ca_certificates(
        &self,
        certificates: &[crate::ca::CaCertificate],
        leaf_limit: std::time::SystemTime,
    ) {
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0)
        };
        self.ca_expiry.set(unix(leaf_limit));
        self.ca_certificate_expiry.clear();
        for cert in certificates {
            self.ca_certificate_expiry
                .get_or_create(&CaCertLabel {
                    role: cert.role,
                    fingerprint: cert.fingerprint.clone(),
                })
                .set(unix(cert.not_after));
        }
    }

    /// Sets how many objects of `kind` the Kubernetes source leaves out of the model now.
    pub fn kubernetes_skipped_now(&self, kind: &'static str, count: i64) {
        self.kubernetes_skipped
            .get_or_create(&KindLabel { kind })
            .set(count);
    }

    /// Objects of `kind` the Kubernetes source leaves out of the model now.
    pub fn kubernetes_skipped_count(&self, kind: &'static str) -> i64 {
        self.kubernetes_skipped
            .get_or_create(&KindLabel { kind })
            .get()
    }

    pub fn kubernetes_watch_failed(&self, kind: &'static str) {
        self.kubernetes_watch_failures
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.svid_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// SVIDs issued so far, all proofs together.
    pub fn issued_total(&self) -> u64 {
        ["join_token", "service_account_token", "renewal"]
            .into_iter()
            .map(|proof| self.svids_issued.get_or_create(&ProofLabel { proof }).get())
            .sum()
    }

    /// Refusals counted so far under `reason`.
    pub fn refusals(&self, reason: &'static str) -> u64 {
        self.svid_refusals
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    pub fn config_reloaded(&self, result: &'static str) {
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Config reloads counted so far with `result`.
    pub fn config_reloads(&self, result: &'static str) -> u64 {
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .get()
    }

    pub fn webhook_reviewed(&self, result: &'static str) {
        self.webhook_reviews
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// NACKs counted so far from proxies of `spiffe_id`.
    pub fn nacks(&self, spiffe_id: &str) -> u64 {
        self.discovery_nacks
            .get_or_create(&CallerLabel {
                spiffe_id: spiffe_id.to_string(),
            })
            .get()
    }

    /// The registry every metric is in, for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// The serve loop's refusals (connection caps) as `latch_control_connections_refused_total`; the
/// gRPC front door adds its own reasons there.
impl latch_admin::serve::ServeMetrics for Metrics {
    fn refused(&self, listener: &'static str, reason: &'static str) {
        self.connection_refused(listener, reason);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
