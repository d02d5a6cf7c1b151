//! The well-known ports and the proxy's user id, defined once for every crate that listens on,
//! captures, injects or dials them (the iptables rules, the injector, the flags' defaults).
//! `xtask` repeats a few of them on purpose: it depends on no Latch crate.

/// The proxy's outbound capture listener (iptables REDIRECT target for app traffic).
pub const OUTBOUND_CAPTURE: u16 = 15001;
/// The proxy's plaintext inbound listener (iptables REDIRECT target for arriving traffic).
pub const INBOUND_CAPTURE: u16 = 15006;
/// The proxy's inbound mTLS listener, where peers' proxies connect; a workload's default
/// mesh port.
pub const INBOUND_MTLS: u16 = 15008;
/// The proxy's admin HTTP server (health, readiness, metrics, debug).
pub const PROXY_ADMIN: u16 = 15020;
/// The control plane's gRPC port: certificate service and discovery.
pub const CONTROL_GRPC: u16 = 15010;
/// The control plane's admin HTTP server.
pub const CONTROL_ADMIN: u16 = 15014;
/// The control plane's sidecar-injection webhook.
pub const WEBHOOK: u16 = 15017;
/// The ports the proxy itself listens on in a pod; an app must not use them.
pub const PROXY_PORTS: [u16; 4] = [OUTBOUND_CAPTURE, INBOUND_CAPTURE, INBOUND_MTLS, PROXY_ADMIN];

/// The uid the proxy runs as; the capture rules let its own traffic through.
pub const PROXY_UID: u32 = 1337;
