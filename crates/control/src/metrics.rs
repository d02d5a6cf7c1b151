//! The control plane's Prometheus metrics: SVIDs issued by proof, refusals by reason, CA expiry.
//! The certificate service records; the admin server renders `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProofLabel {
    /// "join_token" or "renewal".
    pub proof: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric the control plane exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub svids_issued: Family<ProofLabel, Counter>,
    pub svid_refusals: Family<ReasonLabel, Counter>,
    pub join_tokens_created: Counter,
    pub ca_expiry: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let svids_issued = Family::<ProofLabel, Counter>::default();
        let svid_refusals = Family::<ReasonLabel, Counter>::default();
        let join_tokens_created = Counter::default();
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
            "NotAfter of the signing CA certificate, Unix seconds",
            ca_expiry.clone(),
        );
        Self {
            registry,
            svids_issued,
            svid_refusals,
            join_tokens_created,
            ca_expiry,
        }
    }

    pub fn refused(&self, reason: &'static str) {
        self.svid_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// SVIDs issued so far, all proofs together.
    pub fn issued_total(&self) -> u64 {
        ["join_token", "renewal"]
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

    /// The registry every metric is in, for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
