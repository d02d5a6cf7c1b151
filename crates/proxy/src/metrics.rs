//! The proxy's Prometheus metrics. The identity agent, the discovery client and the data path
//! record; the admin server renders.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// "inbound", "inbound_plaintext", "outbound" or "passthrough".
    pub direction: &'static str,
    /// The peer's SPIFFE ID, or "unknown" for plaintext peers.
    pub peer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptLabels {
    /// "inbound", "outbound" or "inbound_plaintext".
    pub listener: &'static str,
    /// "fd_limit" (EMFILE/ENFILE), "out_of_memory" (ENOBUFS/ENOMEM) or "other".
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    /// "full" or "resumed".
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

/// Handshake durations: 0.5 ms to about 1 s, doubling.
fn handshake_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 12))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// The resource type's short name: "MeshConfig", "Workload", "Service",
    /// "AuthorizationPolicy" (or "unknown").
    pub r#type: &'static str,
}

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub svid_expiry: Gauge,
    pub rotations: Counter,
    pub rotation_failures: Family<ReasonLabel, Counter>,
    pub connections_opened: Family<ConnLabels, Counter>,
    pub connections_closed: Family<ConnLabels, Counter>,
    pub connections_active: Family<ConnLabels, Gauge>,
    pub bytes_sent: Family<ConnLabels, Counter>,
    pub bytes_received: Family<ConnLabels, Counter>,
    pub handshake_failures: Family<FailureLabels, Counter>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub handshake_duration: Family<DirectionLabel, Histogram, fn() -> Histogram>,
    pub connections_refused: Family<FailureLabels, Counter>,
    pub accept_errors: Family<AcceptLabels, Counter>,
    pub authorization_denials: Family<ConnLabels, Counter>,
    pub connections_closed_by_policy: Counter,
    pub admin_debug_refused: Counter,
    pub workload_api_refused: Counter,
    pub uid_shared_processes: Gauge,
    pub discovery_connected: Gauge,
    pub discovery_applied: Family<TypeLabel, Counter>,
    pub discovery_rejected: Family<TypeLabel, Counter>,
    pub discovery_resources: Family<TypeLabel, Counter>,
    pub discovery_reconnects: Counter,
    /// HBONE tunnels (mTLS connections carrying streams), by direction and peer.
    pub tunnels_opened: Family<ConnLabels, Counter>,
    pub tunnels_active: Family<ConnLabels, Gauge>,
    /// On-demand lookups of destinations, by result.
    pub discovery_lookups: Family<ResultLabel, Counter>,
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
        let connections_opened = Family::<ConnLabels, Counter>::default();
        let connections_closed = Family::<ConnLabels, Counter>::default();
        let connections_active = Family::<ConnLabels, Gauge>::default();
        let bytes_sent = Family::<ConnLabels, Counter>::default();
        let bytes_received = Family::<ConnLabels, Counter>::default();
        let handshake_failures = Family::<FailureLabels, Counter>::default();
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        let connections_refused = Family::<FailureLabels, Counter>::default();
        let handshake_duration =
            Family::<DirectionLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                handshake_histogram,
            );
        registry.register(
            "latch_proxy_tls_handshake_duration_seconds",
            "Completed mTLS handshakes between proxies: inbound from the accepted TCP connection \
             to the finished handshake, outbound from the connected TCP connection",
            handshake_duration.clone(),
        );
        let authorization_denials = Family::<ConnLabels, Counter>::default();
        for (name, help, metric) in [
            (
                "latch_proxy_tcp_connections_opened",
                "Proxied connections opened",
                &connections_opened,
            ),
            (
                "latch_proxy_tcp_connections_closed",
                "Proxied connections closed",
                &connections_closed,
            ),
            (
                "latch_proxy_tcp_sent_bytes",
                "Bytes sent towards the peer",
                &bytes_sent,
            ),
            (
                "latch_proxy_tcp_received_bytes",
                "Bytes received from the peer",
                &bytes_received,
            ),
            (
                "latch_proxy_authorization_denials",
                "Inbound connections denied by policy",
                &authorization_denials,
            ),
        ] {
            registry.register(name, help, metric.clone());
        }
        registry.register(
            "latch_proxy_tcp_connections_active",
            "Proxied connections open now",
            connections_active.clone(),
        );
        registry.register(
            "latch_proxy_tls_handshake_failures",
            "mTLS handshakes that failed, by direction and reason",
            handshake_failures.clone(),
        );
        registry.register(
            "latch_proxy_tls_handshakes",
            "Completed mTLS handshakes, full or resumed",
            handshakes.clone(),
        );
        registry.register(
            "latch_proxy_tcp_connections_refused",
            "Connections refused before proxying (limit, policy, bad transport header...)",
            connections_refused.clone(),
        );
        let accept_errors = Family::<AcceptLabels, Counter>::default();
        registry.register(
            "latch_proxy_tcp_accept_errors",
            "Failed accepts on a listener, by reason (fd_limit: out of file descriptors); \
             retried after 50 ms",
            accept_errors.clone(),
        );
        let connections_closed_by_policy = Counter::default();
        registry.register(
            "latch_proxy_tcp_connections_closed_by_policy",
            "Open inbound connections closed because a policy change no longer allows them",
            connections_closed_by_policy.clone(),
        );
        let admin_debug_refused = Counter::default();
        registry.register(
            "latch_proxy_admin_debug_refused",
            "Requests for /debug/* on the admin port refused because they did not come from \
             loopback",
            admin_debug_refused.clone(),
        );
        let workload_api_refused = Counter::default();
        registry.register(
            "latch_proxy_workload_api_connections_refused",
            "Workload API connections closed at accept because the peer's uid \
             (SO_PEERCRED) is not allowed (--workload-api-allow-uid)",
            workload_api_refused.clone(),
        );
        let uid_shared_processes = Gauge::default();
        registry.register(
            "latch_proxy_uid_shared_processes",
            "Other processes running as the proxy's uid in its network namespace (checked at \
             start in transparent mode): their traffic is exempt from capture",
            uid_shared_processes.clone(),
        );
        let discovery_connected = Gauge::default();
        registry.register(
            "latch_proxy_discovery_connected",
            "1 while the discovery stream to the control plane is open",
            discovery_connected.clone(),
        );
        let discovery_applied = Family::<TypeLabel, Counter>::default();
        registry.register(
            "latch_proxy_discovery_responses_applied",
            "Discovery responses applied (and ACKed), by resource type",
            discovery_applied.clone(),
        );
        let discovery_rejected = Family::<TypeLabel, Counter>::default();
        registry.register(
            "latch_proxy_discovery_responses_rejected",
            "Discovery responses rejected (NACKed) as invalid, by resource type",
            discovery_rejected.clone(),
        );
        let discovery_resources = Family::<TypeLabel, Counter>::default();
        registry.register(
            "latch_proxy_discovery_resources_received",
            "Resources received, and held resources removed, in applied discovery responses, by resource type",
            discovery_resources.clone(),
        );
        let discovery_reconnects = Counter::default();
        registry.register(
            "latch_proxy_discovery_reconnects",
            "Discovery streams re-opened after a failure or an end",
            discovery_reconnects.clone(),
        );
        let tunnels_opened = Family::<ConnLabels, Counter>::default();
        registry.register(
            "latch_proxy_hbone_tunnels_opened",
            "HBONE tunnels opened (one mTLS connection each, carrying many connections as \
             streams), by direction and peer",
            tunnels_opened.clone(),
        );
        let tunnels_active = Family::<ConnLabels, Gauge>::default();
        registry.register(
            "latch_proxy_hbone_tunnels_active",
            "HBONE tunnels open now, by direction and peer; their streams are counted in \
             latch_proxy_tcp_connections_active",
            tunnels_active.clone(),
        );
        let discovery_lookups = Family::<ResultLabel, Counter>::default();
        registry.register(
            "latch_proxy_discovery_lookups",
            "On-demand lookups of a destination the proxy did not know, by result: found, \
             not_found (the mesh has no such address), timeout (no answer in time), \
             discovery_down (no stream open to ask), table_full (2,048 addresses subscribed \
             already: not looked up); after the last three a destination the proxy does not know \
             is refused, not passed through in clear",
            discovery_lookups.clone(),
        );
        Self {
            registry,
            svid_expiry,
            rotations,
            rotation_failures,
            connections_opened,
            connections_closed,
            connections_active,
            bytes_sent,
            bytes_received,
            handshake_failures,
            handshakes,
            handshake_duration,
            connections_refused,
            accept_errors,
            authorization_denials,
            connections_closed_by_policy,
            admin_debug_refused,
            workload_api_refused,
            uid_shared_processes,
            discovery_connected,
            discovery_applied,
            discovery_rejected,
            discovery_resources,
            discovery_reconnects,
            tunnels_opened,
            tunnels_active,
            discovery_lookups,
        }
    }

    /// Counts an on-demand lookup that ended with `result`.
    pub fn lookup(&self, result: &'static str) {
        self.discovery_lookups
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn failed(&self, reason: &'static str) {
        self.rotation_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn handshake_failed(&self, direction: &'static str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&FailureLabels { direction, reason })
            .inc();
    }

    /// Records how long a completed handshake took.
    pub fn handshake_took(&self, direction: &'static str, took: std::time::Duration) {
        self.handshake_duration
            .get_or_create(&DirectionLabel { direction })
            .observe(took.as_secs_f64());
    }

    /// Counts a completed handshake; returns whether it was resumed.
    pub fn handshake_done(
        &self,
        direction: &'static str,
        kind: Option<rustls::HandshakeKind>,
    ) -> bool {
        let resumed = kind == Some(rustls::HandshakeKind::Resumed);
        let kind = if resumed { "resumed" } else { "full" };
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, kind })
            .inc();
        resumed
    }

    pub fn refused(&self, direction: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&FailureLabels { direction, reason })
            .inc();
    }

    pub fn accept_failed(&self, listener: &'static str, reason: &'static str) {
        self.accept_errors
            .get_or_create(&AcceptLabels { listener, reason })
            .inc();
    }

    /// Counts an HBONE tunnel as open until the returned guard drops.
    pub fn tunnel_open(&self, direction: &'static str, peer: &str) -> TunnelGauge {
        let labels = ConnLabels {
            direction,
            peer: peer.to_string(),
        };
        self.tunnels_opened.get_or_create(&labels).inc();
        let active = self.tunnels_active.get_or_create(&labels).clone();
        active.inc();
        TunnelGauge(active)
    }

    /// Failures counted so far under `reason`.
    pub fn failures(&self, reason: &'static str) -> u64 {
        self.rotation_failures
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// The registry every metric is in, for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// An open tunnel's place in `latch_proxy_hbone_tunnels_active`.
pub struct TunnelGauge(Gauge);

impl Drop for TunnelGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the serve loop counts, under the data path's names: refusals as
/// `latch_proxy_tcp_connections_refused_total{direction=<listener>}`, failed accepts as
/// `latch_proxy_tcp_accept_errors_total{listener}`.
impl latch_admin::serve::ServeMetrics for Metrics {
    fn refused(&self, listener: &'static str, reason: &'static str) {
        Metrics::refused(self, listener, reason);
    }
    fn accept_failed(&self, listener: &'static str, reason: &'static str) {
        Metrics::accept_failed(self, listener, reason);
    }
}
