//! latch-proxy: the sidecar. It keeps the workload's identity alive (identity agent), serves it
//! to SPIFFE-aware apps (Workload API), learns the mesh from the control plane (`xds`),
//! carries the app's TCP over mTLS to other proxies (outbound, inbound, capture) and reports on
//! all of it (admin). `Proxy::start` wires the parts for the binary and the tests.

pub mod admin;
pub mod app_probes;
pub mod authorizer;
pub mod balance;
pub mod capture;
pub mod config;
pub mod copy;
pub mod data_path;
pub mod hbone;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod shared_uid;
pub mod state;
#[cfg(test)]
mod testing;
pub mod transport;
pub mod workload_api;
pub mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use latch_admin::serve::{Drain, Plain};
use latch_identity::client::control_plane_id;
use latch_identity::{CertStore, ExpectedPeer, SpiffeId, TrustBundle, TrustDomain};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Cli};
pub use data_path::{Delivery, Limits};
pub use identity::{AgentConfig, Credential, IdentityAgent};
pub use latch_mesh::{MtlsMode, OutboundPolicy};
pub use metrics::Metrics;
pub use outbound::{ExplicitDestination, ExplicitTarget};
pub use state::{Demand, DemandConfig, LocalConfig, MeshPeer, MeshSnapshot, MeshState};
pub use xds::{DiscoveryClient, DiscoveryConfig};

#[derive(Debug, Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot read the CA bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error(transparent)]
    Bind(#[from] latch_admin::serve::BindError),
    #[error(transparent)]
    WorkloadApi(#[from] workload_api::WorkloadApiError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The data path's listeners and rules. With no listener configured, the proxy only manages
/// identity.
#[derive(Debug, Clone)]
pub struct DataPathConfig {
    pub trust_domain: TrustDomain,
    /// Inbound mTLS listener (15008).
    pub inbound: Option<SocketAddr>,
    /// Transparent capture listeners: outbound (15001) and inbound plaintext (15006).
    pub transparent: Option<(SocketAddr, SocketAddr)>,
    pub explicit: Vec<ExplicitTarget>,
    pub peers: Vec<(std::net::IpAddr, MeshPeer)>,
    /// Local override of the MeshConfig's outbound policy (default without either:
    /// passthrough).
    pub outbound_policy: Option<OutboundPolicy>,
    /// Local override of the MeshConfig's mTLS modes (default without either: STRICT).
    pub inbound_mode: Option<MtlsMode>,
    /// Extra inbound restriction on top of the policies: only these IDs (when not empty).
    pub allow: Vec<SpiffeId>,
    /// Where inbound connections reach the app (default: the workload's own address).
    pub delivery: Delivery,
    pub limits: Limits,
    pub drain_timeout: Duration,
    /// `--hbone`: outbound connections to peers as streams of pooled HBONE tunnels.
    pub hbone: bool,
}

impl DataPathConfig {
    /// What the flags set, as JSON, for /debug/config's `flags`: listeners (with every
    /// `--outbound` route), `--peer`, `--allow`, the local overrides and the effective limits,
    /// timeouts and delivery.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let duration = |d: Duration| humantime::format_duration(d).to_string();
        let outbound: Vec<_> = self
            .explicit
            .iter()
            .map(|target| match &target.to {
                ExplicitDestination::Fixed {
                    id,
                    mesh_addr,
                    target_port,
                } => json!({
                    "listen": target.listen.to_string(),
                    "spiffe_id": id.as_str(),
                    "mesh_address": mesh_addr.to_string(),
                    "target_port": target_port,
                }),
                ExplicitDestination::Routed(destination) => json!({
                    "listen": target.listen.to_string(),
                    "routed_to": destination.to_string(),
                }),
            })
            .collect();
        let peers: Vec<_> = self
            .peers
            .iter()
            .map(|(ip, peer)| {
                json!({"ip": ip.to_string(), "spiffe_id": peer.id.as_str(), "mesh_port": peer.mesh_port})
            })
            .collect();
        json!({
            "trust_domain": self.trust_domain.to_string(),
            "inbound": self.inbound.map(|a| a.to_string()),
            "transparent": self.transparent.map(|(outbound, inbound)| json!({
                "outbound_capture": outbound.to_string(),
                "inbound_plaintext": inbound.to_string(),
            })),
            "outbound": outbound,
            "peers": peers,
            "allow": self.allow.iter().map(SpiffeId::as_str).collect::<Vec<_>>(),
            "inbound_mode_override": self.inbound_mode.map(|m| m.as_str()),
            "outbound_policy_override": self.outbound_policy.map(|p| p.as_str()),
            "delivery": {
                "app_host": self.delivery.app_host.map(|ip| ip.to_string()),
                "inbound_loopback_ports": self.delivery.loopback_ports,
            },
            "max_connections": self.limits.max_connections,
            "timeouts": {
                "connect": duration(self.limits.connect_timeout),
                "handshake": duration(self.limits.handshake_timeout),
                "idle": duration(self.limits.idle_timeout),
                "half_closed": duration(self.limits.half_closed_timeout),
                "drain": duration(self.drain_timeout),
            },
        })
    }

    /// No listeners: identity only.
    pub fn none(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            inbound: None,
            transparent: None,
            explicit: Vec::new(),
            peers: Vec::new(),
            outbound_policy: None,
            inbound_mode: None,
            allow: Vec::new(),
            delivery: Delivery::default(),
            limits: Limits::default(),
            drain_timeout: Duration::from_secs(10),
            hbone: false,
        }
    }
}

/// Everything `Proxy::start` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub agent: AgentConfig,
    /// Trust anchor for the control plane until the first SVID brings the bundle.
    pub bundle: TrustBundle,
    pub workload_api: Option<workload_api::WorkloadApiConfig>,
    pub admin: SocketAddr,
    /// The app's probes, answered on the admin port (`--app-probes`).
    pub app_probes: Arc<app_probes::AppProbes>,
    pub data: DataPathConfig,
    /// Learn the mesh from the control plane; `None` keeps the flag-only mesh
    /// (`--discovery=false`) and /ready then waits only for the SVID.
    pub discovery: Option<DiscoveryConfig>,
}

/// Refuses a start that relies on LATCH_ADMIN, which latch-proxy no longer reads (for
/// latch-control and latchctl it is the control plane's admin address; the proxy's own is
/// LATCH_PROXY_ADMIN), when `--admin` is not given otherwise: the proxy would silently listen
/// on its default instead. `env` reads a variable (`std::env::var_os` in the binary).
pub fn check_renamed_variables(
    admin_given: bool,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(), StartError> {
    match env("LATCH_ADMIN") {
        Some(value) if !admin_given => Err(StartError::Config(format!(
            "LATCH_ADMIN is set ({}) but latch-proxy does not read it: for latch-control and \
             latchctl it names the control plane's admin address. Give this proxy's admin \
             address with --admin or LATCH_PROXY_ADMIN",
            value.to_string_lossy()
        ))),
        _ => Ok(()),
    }
}

impl Config {
    /// Builds the config from parsed flags, reading the bundle file.
    pub fn from_args(args: &Args) -> Result<Self, StartError> {
        let trust_domain = TrustDomain::new(&args.trust_domain).map_err(|e| {
            StartError::Config(format!("--trust-domain {:?}: {e}", args.trust_domain))
        })?;
        let bundle_path = args.ca_bundle.clone().ok_or_else(|| {
            StartError::Config(
                "--ca-bundle (LATCH_CA_BUNDLE) is required: the control plane's bundle.pem".into(),
            )
        })?;
        let bundle = std::fs::read(&bundle_path)
            .map_err(|e| e.to_string())
            .and_then(|pem| TrustBundle::from_pem(&pem).map_err(|e| e.to_string()))
            .map_err(|reason| StartError::Bundle {
                path: bundle_path.clone(),
                reason,
            })?;
        let credential = match (&args.join_token, &args.join_token_file, &args.token_file) {
            (Some(token), _, _) => Credential::JoinToken(token.trim().to_string()),
            (None, Some(path), _) => Credential::JoinTokenFile(path.clone()),
            (None, None, Some(path)) => Credential::ServiceAccountTokenFile(path.clone()),
            (None, None, None) => {
                return Err(StartError::Config(
                    "no credential: give --join-token-file, LATCH_JOIN_TOKEN or --token-file"
                        .into(),
                ));
            }
        };
        let workload_api = args
            .workload_api
            .as_deref()
            .map(workload_api::socket_path)
            .transpose()?
            .map(|socket| workload_api::WorkloadApiConfig {
                socket,
                allowed: workload_api::AllowedPeers::new(
                    rustix::process::getuid().as_raw(),
                    &args.workload_api_allow_uid,
                ),
            });
        let data = DataPathConfig {
            trust_domain: trust_domain.clone(),
            inbound: Some(args.inbound),
            transparent: args
                .transparent
                .then_some((args.outbound_capture, args.inbound_plaintext)),
            explicit: args.outbound.clone(),
            peers: args.peers.iter().map(|p| (p.ip, p.peer.clone())).collect(),
            outbound_policy: args.outbound_policy.map(|p| match p {
                config::OutboundPolicyArg::Passthrough => OutboundPolicy::Passthrough,
                config::OutboundPolicyArg::RegistryOnly => OutboundPolicy::RegistryOnly,
            }),
            inbound_mode: args.inbound_mode.map(|m| match m {
                config::InboundModeArg::Strict => MtlsMode::Strict,
                config::InboundModeArg::Permissive => MtlsMode::Permissive,
            }),
            allow: args.allow.clone(),
            delivery: Delivery {
                app_host: args.app_host,
                loopback_ports: args.inbound_loopback_ports.clone(),
            },
            limits: Limits {
                connect_timeout: args.connect_timeout,
                handshake_timeout: args.handshake_timeout,
                header_timeout: args.handshake_timeout,
                idle_timeout: args.idle_timeout,
                half_closed_timeout: args.half_closed_timeout,
                max_connections: args.max_connections,
                ..Limits::default()
            },
            drain_timeout: args.drain_timeout,
            hbone: args.hbone,
        };
        Ok(Self {
            agent: AgentConfig {
                control_plane: args.control_plane.clone(),
                control_plane_id: ExpectedPeer::Exactly(control_plane_id(&trust_domain)),
                credential,
                ttl: args.svid_ttl,
            },
            bundle,
            workload_api,
            admin: args.admin,
            app_probes: Arc::new(match args.app_probes.as_deref() {
                Some(json) => app_probes::AppProbes::parse(json).map_err(StartError::Config)?,
                None => app_probes::AppProbes::default(),
            }),
            data,
            discovery: args.discovery.then(|| DiscoveryConfig {
                workload_name: args.workload_name.clone(),
                address: args.discovery_address.clone(),
                wildcard: args.discovery_wildcard,
                ..DiscoveryConfig::default()
            }),
        })
    }
}

/// A running proxy.
pub struct Proxy {
    pub admin_addr: SocketAddr,
    /// Bound address of the inbound mTLS listener, if any.
    pub inbound_addr: Option<SocketAddr>,
    /// Bound addresses of the transparent listeners (outbound, inbound plaintext), if any.
    pub capture_addrs: Option<(SocketAddr, SocketAddr)>,
    /// Bound addresses of the explicit outbound listeners, in flag order.
    pub explicit_addrs: Vec<SocketAddr>,
    pub agent: Arc<IdentityAgent>,
    pub metrics: Arc<Metrics>,
    /// The mesh snapshot the data path reads.
    pub mesh: Arc<MeshState>,
    /// The discovery client, when discovery is on.
    pub discovery: Option<Arc<DiscoveryClient>>,
    data_path: Option<Arc<data_path::DataPath>>,
    drain_timeout: Duration,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The data path's listeners and connections; its `close` is the data path's.
    drain: Drain,
}

impl Proxy {
    /// Starts the identity agent, the Workload API (if configured), the discovery client (if
    /// on), the admin server and the data path. The first SVID and the first discovery sync
    /// arrive in the background; /ready turns true once both did. Traffic does not wait for
    /// the sync: until then the flag-only snapshot routes it.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(CertStore::new(config.bundle));
        let control_plane = (
            config.agent.control_plane.clone(),
            config.agent.control_plane_id.clone(),
        );
        let agent = Arc::new(IdentityAgent::new(
            store.clone(),
            config.agent,
            metrics.clone(),
        ));

        let data = config.data;
        let flags = data.to_json();
        let local = LocalConfig {
            peers: data.peers.clone(),
            inbound_mode: data.inbound_mode,
            outbound_policy: data.outbound_policy,
        };
        if config.discovery.is_some() {
            if let Some(mode) = local.inbound_mode {
                tracing::info!(
                    ?mode,
                    "--inbound-mode is set: it overrides the mTLS modes from the control plane"
                );
            }
            if let Some(policy) = local.outbound_policy {
                tracing::info!(
                    ?policy,
                    "--outbound-policy is set: it overrides the outbound policy from the control plane"
                );
            }
        }
        let mesh = Arc::new(match &config.discovery {
            Some(discovery) if !discovery.wildcard => {
                // What the explicit listeners name is subscribed at start and never dropped.
                let configured = data.explicit.iter().filter_map(|t| match t.to {
                    ExplicitDestination::Routed(destination) => Some(destination.ip()),
                    ExplicitDestination::Fixed { .. } => None,
                });
                MeshState::on_demand(local, Demand::new(discovery.demand, configured))
            }
            _ => MeshState::new(local),
        });
        let discovery_address = config.discovery.as_ref().and_then(|d| d.address.clone());
        let discovery = config.discovery.map(|discovery| {
            Arc::new(DiscoveryClient::new(
                store.clone(),
                mesh.clone(),
                metrics.clone(),
                discovery,
            ))
        });

        let (admin_listener, admin_addr) =
            latch_admin::serve::bind(config.admin, "--admin").await?;
        if let Some(api) = &config.workload_api {
            let jwt = Arc::new(workload_api::jwt::JwtSvids::new(
                store.clone(),
                control_plane.0.clone(),
                control_plane.1.clone(),
            ));
            workload_api::serve(
                api,
                store.clone(),
                jwt,
                metrics.clone(),
                &tracker,
                cancel.clone(),
            )?;
        }
        let state = Arc::new(admin::AdminState {
            agent: agent.clone(),
            metrics: metrics.clone(),
            mesh: mesh.clone(),
            discovery: discovery.clone(),
            flags,
            app_probes: config.app_probes.clone(),
            debug_refusals: Default::default(),
        });
        latch_admin::serve(
            admin_listener,
            move |peer, request| state.clone().handle(peer, request),
            &tracker,
            cancel.clone(),
        );
        tracker.spawn(agent.clone().run(cancel.clone()));
        if let Some(client) = &discovery {
            let (certificates, id) = control_plane;
            let address = discovery_address.unwrap_or(certificates);
            tracker.spawn(client.clone().run(address, id, cancel.clone()));
        }

        let any_listener =
            data.inbound.is_some() || data.transparent.is_some() || !data.explicit.is_empty();
        let mut proxy = Self {
            admin_addr,
            inbound_addr: None,
            capture_addrs: None,
            explicit_addrs: Vec::new(),
            agent,
            metrics: metrics.clone(),
            mesh,
            discovery,
            data_path: None,
            drain_timeout: data.drain_timeout,
            drain: Drain {
                tracker: tracker.clone(),
                ..Drain::default()
            },
            cancel,
            tracker,
        };
        if any_listener {
            proxy
                .start_data_path(data, store, metrics, admin_addr)
                .await?;
        }
        tracing::info!(admin = %admin_addr, inbound = ?proxy.inbound_addr, "proxy started");
        Ok(proxy)
    }

    async fn start_data_path(
        &mut self,
        data: DataPathConfig,
        store: Arc<CertStore>,
        metrics: Arc<Metrics>,
        admin_addr: SocketAddr,
    ) -> Result<(), StartError> {
        // Every listener is bound first: the data path must know all of them, since none may
        // ever be a target (`ProxyPorts`).
        let mut bound = vec![admin_addr];
        let inbound = match data.inbound {
            Some(addr) => Some(latch_admin::serve::bind(addr, "--inbound").await?),
            None => None,
        };
        let transparent = match data.transparent {
            Some((outbound, plaintext)) => Some((
                latch_admin::serve::bind(outbound, "--outbound-capture").await?,
                latch_admin::serve::bind(plaintext, "--inbound-plaintext").await?,
            )),
            None => None,
        };
        let mut explicit = Vec::new();
        for target in data.explicit {
            let listener = latch_admin::serve::bind(target.listen, "--outbound").await?;
            explicit.push((target, listener));
        }
        bound.extend(inbound.iter().map(|(_, local)| *local));
        bound.extend(
            transparent
                .iter()
                .flat_map(|((_, out), (_, plain))| [*out, *plain]),
        );
        bound.extend(explicit.iter().map(|(_, (_, local))| *local));

        let authorizer = authorizer::Authorizer::new(data.trust_domain.clone(), data.allow);
        let dp = Arc::new(
            data_path::DataPath::new(
                transport::MeshTls::new(store, data.trust_domain)?,
                self.mesh.clone(),
                authorizer,
                metrics,
                data.limits,
                data.delivery,
                data_path::ProxyPorts::new(&bound),
            )
            .with_hbone(data.hbone)
            .with_drain(&self.drain.stop_accepting),
        );
        self.tracker
            .spawn(dp.clone().watch_mesh(self.cancel.clone()));
        self.drain.close = dp.close_connections.clone();
        let drain = &self.drain;
        if let Some((listener, local)) = inbound {
            let handshake = inbound::MtlsHandshake(dp.clone());
            dp.serve("inbound", listener, drain, handshake, inbound::mtls);
            self.inbound_addr = Some(local);
        }
        if let Some(((out_listener, out_local), (in_listener, in_local))) = transparent {
            shared_uid::check(&self.metrics);
            dp.serve(
                "outbound",
                out_listener,
                drain,
                Plain,
                outbound::transparent,
            );
            dp.serve(
                "inbound_plaintext",
                in_listener,
                drain,
                Plain,
                inbound::plaintext,
            );
            self.capture_addrs = Some((out_local, in_local));
        }
        for (target, (listener, local)) in explicit {
            dp.serve(
                "outbound",
                listener,
                drain,
                Plain,
                move |dp, app, _, slot| outbound::explicit(dp, target.clone(), app, slot),
            );
            self.explicit_addrs.push(local);
        }
        self.data_path = Some(dp);
        Ok(())
    }

    pub fn store(&self) -> &Arc<CertStore> {
        self.agent.store()
    }

    /// Waits until the first SVID is held, up to `timeout`.
    pub async fn wait_for_svid(&self, timeout: Duration) -> bool {
        let mut changes = self.store().subscribe();
        tokio::time::timeout(timeout, async {
            while self.store().svid().is_none() {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
            && self.store().svid().is_some()
    }

    /// Drains: stops accepting, lets open connections finish for up to the drain timeout,
    /// closes what is left, then stops every task.
    pub async fn shutdown(self) {
        self.drain.shutdown(self.drain_timeout).await;
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
