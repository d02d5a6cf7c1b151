//! The proxy's admin HTTP endpoints: /healthz, /ready (a valid SVID is held and, with
//! discovery on, the first sync is done), /metrics, /debug/certs (the SVID and bundle as JSON)
//! and /debug/config (the mesh snapshot the data path uses, as JSON).

use std::sync::Arc;
use std::time::SystemTime;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use latch_admin::{HttpResponse, error, json, text};
use latch_identity::svid::format_time;
use serde::Serialize;

use crate::identity::IdentityAgent;
use crate::metrics::Metrics;
use crate::state::MeshState;
use crate::xds::DiscoveryClient;

pub struct AdminState {
    pub agent: Arc<IdentityAgent>,
    pub metrics: Arc<Metrics>,
    pub mesh: Arc<MeshState>,
    pub discovery: Option<Arc<DiscoveryClient>>,
}

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
            }),
        };
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

    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> HttpResponse {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/ready") => latch_admin::readiness(self.ready()),
            (&Method::GET, "/metrics") => latch_admin::metrics(self.metrics.registry()),
            (&Method::GET, "/debug/certs") => json(StatusCode::OK, &self.certs()),
            (&Method::GET, "/debug/config") => json(StatusCode::OK, &self.config()),
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

    #[test]
    fn debug_config_shows_the_snapshot_and_the_sync_state() {
        let view = admin(true).config();
        assert_eq!(view["discovery"]["synced"], false);
        assert_eq!(view["mtls"]["default"], "STRICT");
        assert_eq!(view["outbound_policy"], "PASSTHROUGH");
        assert_eq!(admin(false).config()["discovery"]["enabled"], false);
    }
}
