//! latch-control and latch-proxy in-process: `Harness` starts a control plane on ephemeral
//! ports with a temporary data dir (optionally a watched mesh config), makes join tokens,
//! SVIDs, proxy configs and certificate-service clients presenting whatever a test needs.
//! Used by the in-process tests of tests/, crates/control/tests and crates/cli/tests.

use std::sync::Arc;
use std::time::Duration;

use latch_control::{Config, ControlPlane};
use latch_identity::client::{CaClient, control_plane_id};
use latch_identity::{CertStore, ExpectedPeer, SpiffeId, Svid, TrustBundle, TrustDomain};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::files::replace_file;
use crate::net::any_loopback;

/// Asserts that `status` refuses a request with `code` and a message mentioning `message_part`.
pub fn assert_status(status: &tonic::Status, code: tonic::Code, message_part: &str) {
    assert_eq!(status.code(), code, "message: {}", status.message());
    assert!(
        status.message().contains(message_part),
        "message {:?} should mention {message_part:?}",
        status.message()
    );
}

/// A control-plane config as tests use it: the test trust domain, data in `data_dir`, the
/// gRPC and admin listeners on loopback port 0.
pub fn loopback_config(data_dir: impl Into<std::path::PathBuf>) -> Config {
    let trust_domain = TrustDomain::new(crate::TRUST_DOMAIN).expect("trust domain");
    let mut config = Config::new(
        trust_domain,
        data_dir.into(),
        any_loopback(),
        any_loopback(),
    );
    // A new JWT signing key signs one second after it is published, not two minutes.
    config.jwt_publish_ahead = std::time::Duration::from_secs(1);
    config
}

/// A control plane running in this process.
pub struct Harness {
    pub control_plane: ControlPlane,
    pub trust_domain: TrustDomain,
    pub data_dir: tempfile::TempDir,
    /// What it was started with (addresses as configured, maybe port 0).
    config: Config,
}

/// A stopped control plane that can be started again on the same addresses and data dir.
pub struct Paused {
    config: Config,
    trust_domain: TrustDomain,
    data_dir: tempfile::TempDir,
}

impl Paused {
    /// Starts the control plane again: same CA, same ports.
    pub async fn resume(self) -> Harness {
        let control_plane = ControlPlane::start(self.config.clone())
            .await
            .expect("control plane restarts");
        Harness {
            control_plane,
            trust_domain: self.trust_domain,
            data_dir: self.data_dir,
            config: self.config,
        }
    }
}

impl Harness {
    /// Starts a control plane for `cluster.local` with default settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a control plane after letting the test adjust its config.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_in(tempfile::tempdir().expect("temp dir"), adjust).await
    }

    async fn start_in(data_dir: tempfile::TempDir, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = loopback_config(data_dir.path().join("data"));
        adjust(&mut config);
        let trust_domain = config.trust_domain.clone();
        let control_plane = ControlPlane::start(config.clone())
            .await
            .expect("control plane starts");
        Self {
            control_plane,
            trust_domain,
            data_dir,
            config,
        }
    }

    /// Starts a control plane whose config file (watched for changes) holds `yaml`.
    pub async fn start_with_mesh(yaml: &str) -> Self {
        Self::start_with_mesh_and(yaml, |_| {}).await
    }

    /// `start_with_mesh`, letting the test adjust the rest of the config.
    pub async fn start_with_mesh_and(yaml: &str, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("mesh.yaml");
        std::fs::write(&file, yaml).expect("write mesh config");
        Self::start_in(dir, |c| {
            c.config_file = Some(file);
            adjust(c);
        })
        .await
    }

    /// The control plane's data dir (admin.token, bundle.pem, ca/).
    pub fn control_data_dir(&self) -> &std::path::Path {
        &self.config.data_dir
    }

    /// Replaces the config file the way an editor does (write aside, rename over it).
    pub fn write_mesh(&self, yaml: &str) {
        replace_file(&self.data_dir.path().join("mesh.yaml"), yaml).expect("replace mesh config");
    }

    pub fn bundle(&self) -> TrustBundle {
        self.control_plane.ca.bundle().as_ref().clone()
    }

    pub fn grpc_addr(&self) -> String {
        self.control_plane.grpc_addr.to_string()
    }

    pub fn id(&self, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId::workload(&self.trust_domain, namespace, service_account).expect("valid id")
    }

    /// Creates a join token for `id`. Synchronous: the harness's control plane keeps tokens in
    /// its data dir (no Kubernetes API), so creating one never waits.
    pub fn token(&self, id: &SpiffeId, ttl: Duration, reusable: bool) -> String {
        let mut create = std::pin::pin!(self.control_plane.tokens.create(id, ttl, reusable));
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match create.as_mut().poll(&mut context) {
            std::task::Poll::Ready(created) => created.expect("token created").token,
            std::task::Poll::Pending => panic!("a data-dir token store does not wait"),
        }
    }

    /// An SVID for `id` (fetched with a fresh single-use join token) and the trust bundle.
    pub async fn svid(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> (Svid, latch_identity::TrustBundle) {
        let token = self.token(id, Duration::from_secs(3600), false);
        self.client()
            .await
            .fetch_svid(None, ttl, Some(token))
            .await
            .expect("SVID issued")
    }

    /// A client that presents no certificate.
    pub async fn client(&self) -> CaClient {
        let store = Arc::new(CertStore::new(self.bundle()));
        CaClient::connect(
            &self.grpc_addr(),
            store,
            ExpectedPeer::Exactly(control_plane_id(&self.trust_domain)),
            false,
        )
        .await
        .expect("client connects")
    }

    /// A client that presents `svid` as its TLS client certificate.
    pub async fn client_presenting(&self, svid: &Svid) -> CaClient {
        self.client_presenting_raw(svid.chain().to_vec(), svid.private_key().clone_key())
            .await
    }

    /// A client that presents an arbitrary chain and key, valid or not.
    pub async fn client_presenting_raw(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
    ) -> CaClient {
        let store = Arc::new(CertStore::new(self.bundle()));
        let verifier = Arc::new(latch_identity::SpiffeServerVerifier::new(
            store.clone(),
            ExpectedPeer::Exactly(control_plane_id(&self.trust_domain)),
        ));
        let tls = rustls::ClientConfig::builder_with_provider(latch_identity::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(key))
            .expect("client cert");
        let mut tls = tls;
        tls.enable_sni = false;
        tls.alpn_protocols = vec![latch_identity::tls::ALPN_H2.to_vec()];
        CaClient::connect_with(&self.grpc_addr(), tls, store)
            .await
            .expect("client connects")
    }

    /// SVIDs issued so far.
    pub fn issued(&self) -> u64 {
        self.control_plane.metrics.issued_total()
    }

    pub async fn stop(self) {
        self.control_plane.shutdown().await;
    }

    /// Stops the control plane, keeping what is needed to start it again where it was.
    pub async fn pause(self) -> Paused {
        let mut config = self.config;
        config.listen = self.control_plane.grpc_addr;
        config.admin = self.control_plane.admin_addr;
        self.control_plane.shutdown().await;
        Paused {
            config,
            trust_domain: self.trust_domain,
            data_dir: self.data_dir,
        }
    }

    /// A latch-proxy config for this control plane with a new join token for `id`.
    pub fn proxy_config(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        workload_api: Option<std::path::PathBuf>,
        reusable_token: bool,
    ) -> latch_proxy::Config {
        let token = self.token(id, Duration::from_secs(3600), reusable_token);
        latch_proxy::Config {
            agent: latch_proxy::AgentConfig {
                control_plane: self.grpc_addr(),
                control_plane_id: ExpectedPeer::Exactly(control_plane_id(&self.trust_domain)),
                credential: latch_proxy::Credential::JoinToken(token),
                ttl,
            },
            bundle: self.bundle(),
            workload_api: workload_api.map(|socket| latch_proxy::workload_api::WorkloadApiConfig {
                socket,
                allowed: latch_proxy::workload_api::AllowedPeers::owner_only(),
            }),
            admin: any_loopback(),
            app_probes: Default::default(),
            data: latch_proxy::DataPathConfig::none(self.trust_domain.clone()),
            discovery: Some(latch_proxy::DiscoveryConfig::default()),
        }
    }

    /// Like `proxy_config`, with discovery off: /ready then waits only for the SVID. For tests
    /// that need /ready 200 while this control plane serves no discovery.
    pub fn proxy_config_without_discovery(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        reusable_token: bool,
    ) -> latch_proxy::Config {
        let mut config = self.proxy_config(id, ttl, None, reusable_token);
        config.discovery = None;
        config
    }

    /// A proxy config with an inbound mTLS listener on an ephemeral loopback port, apps reached
    /// on 127.0.0.1 (tests add explicit outbound listeners or change limits as they need).
    pub fn mesh_proxy_config(&self, id: &SpiffeId, ttl: Option<Duration>) -> latch_proxy::Config {
        let mut config = self.proxy_config(id, ttl, None, false);
        config.data.inbound = Some(any_loopback());
        config
    }

    /// Starts an in-process latch-proxy with a single-use join token for `id` and waits for its
    /// first SVID.
    pub async fn start_proxy(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        workload_api: Option<std::path::PathBuf>,
    ) -> latch_proxy::Proxy {
        start_proxy(self.proxy_config(id, ttl, workload_api, false)).await
    }
}

/// Starts an in-process latch-proxy and waits for its first SVID.
pub async fn start_proxy(config: latch_proxy::Config) -> latch_proxy::Proxy {
    let proxy = latch_proxy::Proxy::start(config)
        .await
        .expect("proxy starts");
    assert!(
        proxy.wait_for_svid(Duration::from_secs(10)).await,
        "proxy obtained its first SVID"
    );
    proxy
}
