//! The proxy's Prometheus metrics. The identity agent records; the admin server renders.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub svid_expiry: Gauge,
    pub rotations: Counter,
    pub rotation_failures: Family<ReasonLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let svid_expiry = Gauge::default();
        let rotations = Counter::default();
        let rotation_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "latch_proxy_svid_expiry_timestamp_seconds",
            "NotAfter of the SVID the proxy presents, Unix seconds",
            svid_expiry.clone(),
        );
        registry.register(
            "latch_proxy_svid_rotations",
            "SVIDs obtained (first issuance and every renewal)",
            rotations.clone(),
        );
        registry.register(
            "latch_proxy_svid_rotation_failures",
            "Failed attempts to obtain or renew the SVID, by reason",
            rotation_failures.clone(),
        );
        Self {
            registry,
            svid_expiry,
            rotations,
            rotation_failures,
        }
    }

    pub fn failed(&self, reason: &'static str) {
        self.rotation_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Failures counted so far under `reason`.
    pub fn failures(&self, reason: &'static str) -> u64 {
        self.rotation_failures
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
