//! The proxy's admin HTTP endpoints: /healthz, /ready (a valid SVID is held and, with
//! discovery on, the first sync is done), /metrics, /debug/certs (the SVID and bundle as JSON)
//! and /debug/config (the mesh snapshot the data path uses and what the flags set, as JSON). The
//! port is reachable from
//! the pod network (the kubelet and Prometheus use the pod IP); /debug/* answers loopback only.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use latch_admin::{HttpResponse, error, json, text};
use latch_identity::svid::format_time;
use serde::Serialize;

use crate::app_probes::{AppProbes, PATH_PREFIX};
use crate::identity::IdentityAgent;
use crate::metrics::Metrics;
use crate::state::MeshState;
use crate::xds::DiscoveryClient;

pub struct AdminState {
    pub agent: Arc<IdentityAgent>,
    pub metrics: Arc<Metrics>,
    pub mesh: Arc<MeshState>,
    pub discovery: Option<Arc<DiscoveryClient>>,
    /// What the flags set (`DataPathConfig::to_json`), shown as /debug/config's `flags`.
    pub flags: serde_json::Value,
    /// The app's probes, answered on /app-health/<container>/<kind>.
    pub app_probes: Arc<AppProbes>,
    /// When a refused /debug request was last logged, and how many since.
    pub debug_refusals: Mutex<(Option<Instant>, u64)>,
}

/// What a /debug request from off the pod gets.
pub const DEBUG_LOOPBACK_ONLY: &str = "debug endpoints are served on loopback only: from inside \
     the pod (kubectl exec, or kubectl port-forward), use 127.0.0.1";

#[derive(Serialize)]
struct CertsView {
    spiffe_id: Option<String>,
    serial: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    expired: bool,
    next_rotation: Option<String>,
    bundle_fingerprints_sha256: Vec<String>,
}

impl AdminState {
    fn ready(&self) -> Result<(), String> {
        let store = self.agent.store();
        let svid = match store.svid() {
            None => Err("no SVID yet".to_string()),
            Some(svid) if svid.info().is_expired_at(SystemTime::now()) => Err(format!(
                "SVID expired at {} and could not be renewed",
                format_time(svid.info().not_after)
            )),
            Some(_) => Ok(()),
        };
        let discovery = match &self.discovery {
            Some(client) if !client.is_synced() => Err(format!(
                "discovery not in sync yet: waiting for {}",
                client.missing_types().join(", ")
            )),
            _ => Ok(()),
        };
        match (svid, discovery) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(a), Err(b)) => Err(format!("{a}; {b}")),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        }
    }

    fn config(&self) -> serde_json::Value {
        let mut view = self.mesh.load().to_json();
        view["discovery"] = match &self.discovery {
            None => serde_json::json!({"enabled": false}),
            Some(client) => serde_json::json!({
                "enabled": true,
                "synced": client.is_synced(),
                "waiting_for": client.missing_types(),
                "mode": if self.mesh.demand().is_some() { "on-demand" } else { "wildcard" },
                "subscribed_addresses": self.mesh.demand().map(|d| d.len()),
            }),
        };
        view["flags"] = self.flags.clone();
        view
    }

    fn certs(&self) -> CertsView {
        let store = self.agent.store();
        let svid = store.svid();
        let info = svid.as_ref().map(|s| s.info());
        CertsView {
            spiffe_id: info.map(|i| i.id.to_string()),
            serial: info.map(|i| i.serial.clone()),
            not_before: info.map(|i| format_time(i.not_before)),
            not_after: info.map(|i| format_time(i.not_after)),
            expired: info.is_some_and(|i| i.is_expired_at(SystemTime::now())),
            next_rotation: self.agent.next_rotation().map(format_time),
            bundle_fingerprints_sha256: store.bundle().fingerprints(),
        }
    }

    /// Counts a /debug request from `peer`, off loopback, and logs it at most once a second
    /// with the number since the last line.
    fn refuse_debug(&self, peer: SocketAddr, path: &str) -> HttpResponse {
        self.metrics.admin_debug_refused.inc();
        let mut last = self
            .debug_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        last.1 += 1;
        let now = Instant::now();
        if last
            .0
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            // The path comes from the network: logged escaped and cut short.
            let path: String = path.chars().take(64).collect();
            tracing::warn!(
                %peer,
                path = ?path,
                refused = last.1,
                "admin: refused /debug request(s) from off loopback since the last report"
            );
            *last = (Some(now), 0);
        }
        error(StatusCode::FORBIDDEN, DEBUG_LOOPBACK_ONLY)
    }

    /// Routes one admin request from `peer`. /healthz, /ready and /metrics answer anyone who
    /// reaches the port; /debug/* (every workload, address, identity and policy of the mesh)
    /// only a process in the pod's network namespace, i.e. a loopback peer.
    pub async fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        request: Request<Incoming>,
    ) -> HttpResponse {
        let path = request.uri().path();
        if path.starts_with("/debug") && !latch_admin::is_loopback(peer) {
            return self.refuse_debug(peer, path);
        }
        match (request.method(), path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/ready") => latch_admin::readiness(self.ready()),
            (&Method::GET, "/metrics") => latch_admin::metrics(self.metrics.registry()),
            (&Method::GET, "/debug/certs") => json(StatusCode::OK, &self.certs()),
            (&Method::GET, "/debug/config") => json(StatusCode::OK, &self.config()),
            (&Method::GET, path) if path.starts_with(PATH_PREFIX) => {
                // The status is all the kubelet reads; the reason is short and names no more
                // than a kubelet event would.
                match self.app_probes.run(path).await {
                    Some(Ok(())) => text(StatusCode::OK, "ok\n"),
                    Some(Err(why)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    None => error(StatusCode::NOT_FOUND, "no such app probe"),
                }
            }
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AgentConfig, Credential};
    use crate::state::LocalConfig;
    use crate::xds::DiscoveryConfig;
    use latch_identity::ExpectedPeer;

    fn admin(discovery: bool) -> AdminState {
        let (store, _) = crate::testing::store_with_svid("spiffe://cluster.local/ns/demo/sa/web");
        let store = Arc::new(store);
        let metrics = Arc::new(Metrics::new());
        let mesh = Arc::new(MeshState::new(LocalConfig::default()));
        let agent = Arc::new(IdentityAgent::new(
            store.clone(),
            AgentConfig {
                control_plane: "127.0.0.1:1".into(),
                control_plane_id: ExpectedPeer::AnyInBundle,
                credential: Credential::None,
                ttl: None,
            },
            metrics.clone(),
        ));
        let discovery = discovery.then(|| {
            Arc::new(DiscoveryClient::new(
                store,
                mesh.clone(),
                metrics.clone(),
                DiscoveryConfig::default(),
            ))
        });
        AdminState {
            agent,
            metrics,
            mesh,
            discovery,
            flags: serde_json::Value::Null,
            app_probes: Default::default(),
            debug_refusals: Mutex::default(),
        }
    }

    #[test]
    fn ready_needs_the_discovery_sync_only_when_discovery_is_on() {
        assert_eq!(admin(false).ready(), Ok(()));
        let waiting = admin(true).ready().unwrap_err();
        assert_eq!(
            waiting,
            "discovery not in sync yet: waiting for MeshConfig, Workload, Service, AuthorizationPolicy"
        );
    }

    /// An IPv4 address of this machine other than loopback (`ip -o -4 addr show scope global`).
    fn non_loopback_address() -> std::net::IpAddr {
        let output = std::process::Command::new("ip")
            .args(["-o", "-4", "addr", "show", "scope", "global"])
            .output()
            .expect("ip runs");
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .skip_while(|word| *word != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next()?.parse().ok())
            .expect("this machine has a non-loopback IPv4 address")
    }

    #[tokio::test]
    async fn debug_answers_loopback_only_while_probes_and_metrics_answer_anyone() {
        let state = Arc::new(admin(false));
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tracker, cancel) = (
            tokio_util::task::TaskTracker::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        let serving = state.clone();
        latch_admin::serve(
            listener,
            move |peer, request| serving.clone().handle(peer, request),
            &tracker,
            cancel.clone(),
        );
        let pod_network = SocketAddr::new(non_loopback_address(), port);
        let loopback = SocketAddr::from(([127, 0, 0, 1], port));
        let get = latch_testkit::admin::get;

        for path in ["/debug/config", "/debug/certs"] {
            let (status, body) = get(pod_network, path).await.unwrap();
            assert_eq!(status, 403, "{path} from {pod_network}: {body}");
            assert!(
                body.contains("debug endpoints are served on loopback only"),
                "{body}"
            );
            assert!(
                !body.contains("STRICT"),
                "nothing of the config leaks: {body}"
            );
        }
        assert_eq!(state.metrics.admin_debug_refused.get(), 2);
        let (status, body) = get(loopback, "/debug/config").await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("STRICT"), "{body}");
        assert_eq!(get(loopback, "/debug/certs").await.unwrap().0, 200);
        for path in ["/healthz", "/ready", "/metrics"] {
            let (status, body) = get(pod_network, path).await.unwrap();
            assert_eq!(status, 200, "{path} from {pod_network}: {body}");
        }
        let (_, metrics) = get(pod_network, "/metrics").await.unwrap();
        assert!(
            metrics.contains("latch_proxy_admin_debug_refused_total 2"),
            "{metrics}"
        );
        cancel.cancel();
    }

    #[test]
    fn loopback_is_127_slash_8_and_v6_loopback_including_mapped() {
        for (peer, loopback) in [
            ("127.0.0.1:1", true),
            ("127.3.2.1:1", true),
            ("[::1]:1", true),
            ("[::ffff:127.0.0.1]:1", true),
            ("10.0.0.7:1", false),
            ("0.0.0.0:1", false),
            ("[::ffff:10.0.0.7]:1", false),
            ("[fd00::2]:1", false),
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(latch_admin::is_loopback(peer), loopback, "{peer}");
        }
    }

    #[test]
    fn debug_config_shows_the_snapshot_and_the_sync_state() {
        let view = admin(true).config();
        assert_eq!(view["discovery"]["synced"], false);
        assert_eq!(view["mtls"]["default"], "STRICT");
        assert_eq!(view["outbound_policy"], "PASSTHROUGH");
        assert_eq!(admin(false).config()["discovery"]["enabled"], false);
    }

    #[test]
    fn debug_config_shows_what_the_flags_set() {
        use crate::config::Cli;
        use clap::Parser;
        let (_, bundle_pem) =
            crate::testing::store_with_svid("spiffe://cluster.local/ns/demo/sa/web");
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, bundle_pem).unwrap();
        let cli = Cli::try_parse_from([
            "latch-proxy",
            "--ca-bundle",
            bundle.to_str().unwrap(),
            "--join-token",
            "a-join-token",
            "--outbound",
            "127.0.0.1:18080=spiffe://cluster.local/ns/demo/sa/api@127.0.0.1:25008/8080",
            "--outbound",
            "127.0.0.1:18081=10.96.0.10:80",
            "--peer",
            "10.0.0.3:15009=spiffe://cluster.local/ns/demo/sa/db",
            "--allow",
            "spiffe://cluster.local/ns/demo/sa/web",
            "--inbound-mode",
            "permissive",
            "--inbound-loopback-port",
            "9090",
            "--max-connections",
            "1234",
            "--idle-timeout",
            "90s",
        ])
        .unwrap();
        let mut state = admin(false);
        state.flags = crate::Config::from_args(&cli.run).unwrap().data.to_json();
        let flags = &state.config()["flags"];
        assert_eq!(
            flags["outbound"],
            serde_json::json!([
                {"listen": "127.0.0.1:18080", "spiffe_id": "spiffe://cluster.local/ns/demo/sa/api",
                 "mesh_address": "127.0.0.1:25008", "target_port": 8080},
                {"listen": "127.0.0.1:18081", "routed_to": "10.96.0.10:80"},
            ]),
            "{flags:#}"
        );
        assert_eq!(
            flags["peers"],
            serde_json::json!([{"ip": "10.0.0.3", "spiffe_id": "spiffe://cluster.local/ns/demo/sa/db", "mesh_port": 15009}])
        );
        assert_eq!(
            flags["allow"],
            serde_json::json!(["spiffe://cluster.local/ns/demo/sa/web"])
        );
        assert_eq!(flags["inbound_mode_override"], "PERMISSIVE");
        assert_eq!(flags["outbound_policy_override"], serde_json::Value::Null);
        assert_eq!(
            flags["delivery"]["inbound_loopback_ports"],
            serde_json::json!([9090])
        );
        assert_eq!(flags["max_connections"], 1234);
        assert_eq!(flags["timeouts"]["idle"], "1m 30s");
        assert_eq!(flags["timeouts"]["connect"], "5s");
        assert_eq!(flags["timeouts"]["drain"], "10s");
        assert_eq!(flags["inbound"], "[::]:15008");
    }
}
