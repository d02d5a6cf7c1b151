//! latch-proxy: the sidecar. For now it keeps the workload's identity alive (identity agent),
//! serves it to SPIFFE-aware apps (Workload API) and reports on it (admin); the mTLS data path
//! builds on the same `CertStore`. `Proxy::start` wires the parts for the binary and the tests.

pub mod admin;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod workload_api;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use latch_identity::client::control_plane_id;
use latch_identity::{CertStore, ExpectedPeer, TrustBundle, TrustDomain};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Args;
pub use identity::{AgentConfig, Credential, IdentityAgent};
pub use metrics::Metrics;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot read the CA bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    WorkloadApi(#[from] workload_api::WorkloadApiError),
}

/// Everything `Proxy::start` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub agent: AgentConfig,
    /// Trust anchor for the control plane until the first SVID brings the bundle.
    pub bundle: TrustBundle,
    pub workload_api: Option<PathBuf>,
    pub admin: SocketAddr,
}

impl Config {
    /// Builds the config from parsed flags, reading the bundle file.
    pub fn from_args(args: &Args) -> Result<Self, StartError> {
        let trust_domain = TrustDomain::new(&args.trust_domain).map_err(|e| {
            StartError::Config(format!("--trust-domain {:?}: {e}", args.trust_domain))
        })?;
        let bundle = std::fs::read(&args.ca_bundle)
            .map_err(|e| e.to_string())
            .and_then(|pem| TrustBundle::from_pem(&pem).map_err(|e| e.to_string()))
            .map_err(|reason| StartError::Bundle {
                path: args.ca_bundle.clone(),
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
            .transpose()?;
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
        })
    }
}

/// A running proxy.
pub struct Proxy {
    pub admin_addr: SocketAddr,
    pub agent: Arc<IdentityAgent>,
    pub metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Proxy {
    /// Starts the identity agent, the Workload API (if configured) and the admin server. The
    /// first SVID arrives in the background; /ready turns true once it does.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(CertStore::new(config.bundle));
        let agent = Arc::new(IdentityAgent::new(
            store.clone(),
            config.agent,
            metrics.clone(),
        ));

        let admin_listener =
            TcpListener::bind(config.admin)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.admin,
                    what: "admin (--admin)",
                    source,
                })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: config.admin,
                what: "admin (--admin)",
                source,
            })?;
        if let Some(path) = &config.workload_api {
            workload_api::serve(path, store.clone(), &tracker, cancel.clone())?;
            tracing::info!(socket = %path.display(), "serving the SPIFFE Workload API");
        }
        let state = Arc::new(admin::AdminState {
            agent: agent.clone(),
            metrics: metrics.clone(),
        });
        latch_admin::serve(
            admin_listener,
            move |request| state.clone().handle(request),
            &tracker,
            cancel.clone(),
        );
        tracker.spawn(agent.clone().run(cancel.clone()));
        tracing::info!(admin = %admin_addr, "proxy started");
        Ok(Self {
            admin_addr,
            agent,
            metrics,
            cancel,
            tracker,
        })
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

    /// Stops every task and waits for them.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
