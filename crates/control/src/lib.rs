//! latch-control: the Latch control plane. Owns the CA, the certificate service and the
//! discovery server (both gRPC over TLS), the mesh model fed by the config file or the
//! Kubernetes API, the admin HTTP server and, when asked, the sidecar injector webhook and
//! service-account token authentication through the Kubernetes API; `ControlPlane::start`
//! wires them together for the binary and for the in-process test harness.

pub mod admin;
pub mod bundle_configmaps;
pub mod ca;
pub mod ca_secret;
pub mod certificate_service;
pub mod config;
pub mod discovery;
pub mod identity;
pub mod jwt_authority;
pub mod kubernetes;
pub mod mesh;
pub mod metrics;
pub mod revocation_secret;
pub mod revocations;
pub mod shared_secret;
pub mod tls_incoming;
pub mod token_secrets;
pub mod tokens;
pub mod webhook;
pub mod webhook_ca_bundle;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use latch_identity::{ClientAuth, SpiffeClientVerifier, files};
use latch_proto::ca::certificate_service_server::CertificateServiceServer;
use latch_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config};

use crate::bundle_configmaps::BundleConfigMaps;
use crate::ca::Ca;
use crate::certificate_service::{CertificateServer, MAX_REQUEST_BYTES};
use crate::discovery::{BundleAcks, DiscoveryServer, MAX_DISCOVERY_REQUEST_BYTES};
use crate::kubernetes::{KubeTokenReviewer, ServiceAccountAuthenticator};
use crate::mesh::Mesh;
use crate::mesh::file_source::{self, FileSource};
use crate::mesh::kube_source::KubeSource;
use crate::metrics::Metrics;
use crate::revocations::{Issued, Revocations};
use crate::tokens::JoinTokens;
use crate::webhook_ca_bundle::WebhookCaBundle;

/// Why the control plane could not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error(transparent)]
    CaSecret(#[from] ca_secret::CaSecretError),
    #[error(transparent)]
    Tokens(#[from] tokens::TokenError),
    #[error(transparent)]
    Revocations(#[from] revocations::RevocationError),
    #[error(transparent)]
    JwtKeys(#[from] jwt_authority::JwtAuthorityError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Bind(#[from] latch_admin::serve::BindError),
    #[error(
        "data dir file {path}: {error} (check that the data dir is writable and has free space)"
    )]
    DataDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A running control plane.
pub struct ControlPlane {
    /// Where the certificate service listens.
    pub grpc_addr: SocketAddr,
    /// Where the admin HTTP server listens.
    pub admin_addr: SocketAddr,
    /// Where the injector webhook listens, when it is served.
    pub webhook_addr: Option<SocketAddr>,
    /// The trust bundle file (PEM) clients need to trust the control plane.
    pub bundle_path: PathBuf,
    /// The admin credential file (0600) latchctl reads.
    pub admin_token_path: PathBuf,
    pub ca: Arc<Ca>,
    /// The JWT-SVID signing keys and their bundle.
    pub jwt: Arc<jwt_authority::JwtAuthority>,
    pub tokens: Arc<JoinTokens>,
    pub revocations: Arc<Revocations>,
    pub metrics: Arc<Metrics>,
    /// The mesh being served: `mesh.snapshot()` now, `mesh.subscribe()` for every change.
    pub mesh: Arc<Mesh>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// How often expired revocations are dropped.
const REVOCATION_PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves the revocations in the MeshConfig: now, after every revocation, and as they expire.
fn follow_revocations(
    revocations: &Arc<Revocations>,
    mesh: &Arc<Mesh>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let now = std::time::SystemTime::now();
    if !revocations.list(now).is_empty() {
        mesh.set_revocations(revocations.for_discovery(now));
    }
    let (revocations, mesh) = (revocations.clone(), mesh.clone());
    let mut changes = revocations.subscribe();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(REVOCATION_PRUNE_INTERVAL) => {
                    // Dropping one changes `changes`, which republishes on the next turn.
                    let _ = revocations.prune(std::time::SystemTime::now());
                    continue;
                }
            }
            mesh.set_revocations(revocations.for_discovery(std::time::SystemTime::now()));
        }
    });
}

/// Reads the admin credential, creating a random one (0600) on first start.
fn admin_credential(path: &std::path::Path) -> Result<String, StartError> {
    let data_dir_err = |error| StartError::DataDir {
        path: path.to_path_buf(),
        error,
    };
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_string()),
        Ok(_) => Err(StartError::Config(format!(
            "admin credential file {} is empty; delete it to have a new one generated",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            aws_lc_rs::rand::fill(&mut bytes)
                .map_err(|_| data_dir_err(std::io::Error::other("system RNG failed")))?;
            let credential = latch_identity::hex::encode(&bytes);
            files::write_private(path, format!("{credential}\n").as_bytes())
                .map_err(data_dir_err)?;
            Ok(credential)
        }
        Err(e) => Err(data_dir_err(e)),
    }
}

/// Writes the trust bundle to `paths` (the data dir's bundle.pem, `--publish-bundle`), and again
/// with every change a root rotation step makes, which is also republished to the proxies
/// (MeshConfig) and handed out through the returned receiver (ConfigMaps, webhook caBundle).
/// Keeps the CA expiry metrics current.
fn follow_bundle(
    ca: &Arc<Ca>,
    mesh: &Arc<Mesh>,
    metrics: &Arc<Metrics>,
    paths: [Option<PathBuf>; 2],
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<watch::Receiver<String>, (PathBuf, std::io::Error)> {
    let mut bundles = ca.subscribe_bundle();
    let pem = bundles.borrow_and_update().to_pem();
    let [data_dir_copy, published] = paths;
    let paths: Vec<PathBuf> = data_dir_copy.into_iter().chain(published.clone()).collect();
    for path in &paths {
        write_bundle(path, &pem).map_err(|e| (path.clone(), e))?;
    }
    if let Some(path) = published {
        tracing::info!(path = %path.display(), "trust bundle published (--publish-bundle)");
    }
    metrics.set_ca_certificates(&ca.certificates(), ca.not_after());
    let (sender, receiver) = watch::channel(pem);
    let (ca, mesh, metrics) = (ca.clone(), mesh.clone(), metrics.clone());
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = bundles.changed() => if changed.is_err() { return },
            }
            let pem = bundles.borrow_and_update().to_pem();
            for path in &paths {
                if let Err(e) = write_bundle(path, &pem) {
                    tracing::error!(path = %path.display(), "cannot write the new trust bundle: {e}; clients reading this file keep the old one");
                }
            }
            metrics.set_ca_certificates(&ca.certificates(), ca.not_after());
            mesh.set_trust_bundle(pem.clone());
            sender.send_replace(pem);
        }
    });
    Ok(receiver)
}

/// Writes a bundle file, only when it does not hold `pem` already: a control plane with an
/// existing CA then starts on a read-only or full data dir, and serves what needs no writes
/// (renewals).
fn write_bundle(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(pem.as_bytes()) {
        return Ok(());
    }
    files::write_public(path, pem.as_bytes())
}

impl ControlPlane {
    /// Loads or creates the CA, then serves the certificate service and the admin API.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let data_dir = &config.data_dir;
        files::ensure_private_dir(data_dir).map_err(|error| StartError::DataDir {
            path: data_dir.clone(),
            error,
        })?;
        // Read the config file first: a typo in it must not leave a new CA behind.
        let loaded = config
            .config_file
            .as_deref()
            .map(|path| file_source::load(path, &config.trust_domain))
            .transpose()
            .map_err(StartError::Config)?;
        // Bind before the CA is touched: a port that is taken must not leave a new CA behind.
        let (grpc_listener, grpc_addr) =
            latch_admin::serve::bind(config.listen, "--listen").await?;
        let (admin_listener, admin_addr) =
            latch_admin::serve::bind(config.admin, "--admin").await?;
        let webhook_listener = match &config.webhook {
            Some(webhook) => Some(latch_admin::serve::bind(webhook.listen, "--webhook").await?),
            None => None,
        };
        let kube_client = config
            .kubernetes
            .as_ref()
            .map(|access| access.client())
            .transpose()
            .map_err(StartError::Config)?;
        let ca = Arc::new(match (&config.plugin, &config.ca_secret, &kube_client) {
            (Some(_), Some(_), _) => {
                return Err(StartError::Config(
                    "give either --ca-cert/--ca-key or --ca-secret, not both".into(),
                ));
            }
            (None, Some(_), None) => {
                return Err(StartError::Config("--ca-secret needs --kubernetes".into()));
            }
            (Some(plugin), None, _) => Ca::from_files(plugin, &config.trust_domain, config.ttl)?,
            (None, Some(secret), Some(client)) => {
                let (ca, origin) = ca_secret::load_or_create(
                    client.clone(),
                    secret,
                    data_dir,
                    &config.trust_domain,
                    config.ttl,
                )
                .await?;
                tracing::info!(secret = %secret, ?origin, "CA from Kubernetes Secret");
                ca
            }
            (None, None, _) => Ca::load_or_create(data_dir, &config.trust_domain, config.ttl)?,
        });
        let jwt = Arc::new(match &kube_client {
            Some(client) => {
                // Shared by the replicas. Unreadable now, it is retried: X509-SVIDs do not
                // wait for JWT keys, and CreateJwtSvid answers UNAVAILABLE meanwhile.
                let jwt = jwt_authority::JwtAuthority::shared(
                    client.clone(),
                    &config.trust_domain,
                    config.jwt_publish_ahead,
                );
                if let Err(e) = jwt.load(std::time::SystemTime::now()).await {
                    tracing::warn!("{e}; retrying, and issuing no JWT-SVID until then");
                }
                jwt
            }
            None => jwt_authority::JwtAuthority::load_or_create(
                data_dir,
                &config.trust_domain,
                config.jwt_publish_ahead,
                std::time::SystemTime::now(),
            )?,
        });
        let bundle_path = data_dir.join("bundle.pem");
        let admin_token_path = data_dir.join("admin.token");
        let credential = admin_credential(&admin_token_path)?;

        let tokens = JoinTokens::open(data_dir.join("join-tokens.json"))?;
        let tokens = Arc::new(match (&kube_client, config.in_pod) {
            (Some(client), _) => {
                let secrets = token_secrets::TokenSecrets::new(client.clone());
                tracing::info!(
                    namespace = secrets.namespace(),
                    "join-token state in the Kubernetes API (Secrets labelled {})",
                    token_secrets::LABEL
                );
                tokens.shared_in(secrets)
            }
            (None, true) => {
                tracing::warn!(
                    "running in a Kubernetes pod without --kubernetes: single-use join tokens \
                     are refused (this replica's data dir is not shared); reusable ones work"
                );
                tokens.unguaranteed()
            }
            (None, false) => tokens,
        });
        match &loaded {
            Some(loaded) => loaded.file.apply_tokens(&config.trust_domain, &tokens),
            // No config file (any more): none of its tokens work.
            None => config::forget_unlisted_tokens(&tokens, &Default::default()),
        }
        .map_err(StartError::Config)?;
        let metrics = Arc::new(Metrics::new());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        // The Kubernetes source's mesh is served once every kind has been listed.
        let mesh = Arc::new(Mesh::with_jwt_bundle(
            ca.bundle().to_pem(),
            jwt.bundle_jwks(),
            metrics.clone(),
            !config.kubernetes_mesh,
        ));

        let revocations = match (&kube_client, &config.kubernetes) {
            (Some(client), Some(access)) => {
                // Shared by the replicas, and read before anything is issued: while the API
                // cannot be read, issuance waits rather than forget a revocation.
                let secret = revocation_secret::RevocationSecret::new(client.clone());
                let entries = secret
                    .load()
                    .await
                    .inspect_err(|e| {
                        tracing::warn!("{e}; no SVID is issued until the watch has read them")
                    })
                    .ok();
                let revocations = Arc::new(Revocations::shared(secret.clone(), entries));
                let watch_client = access.watch_client().map_err(StartError::Config)?;
                secret.follow(watch_client, revocations.clone(), &tracker, cancel.clone());
                revocations
            }
            _ => Arc::new(Revocations::open(data_dir.join("revocations.json"))?),
        };
        let issued = Arc::new(Issued::default());
        follow_revocations(&revocations, &mesh, &tracker, cancel.clone());

        let service_accounts = match kube_client {
            Some(client) => {
                tracing::info!(
                    "accepting Kubernetes service-account tokens (TokenReview, audience {})",
                    kubernetes::AUDIENCE
                );
                Some(Arc::new(ServiceAccountAuthenticator::new(
                    Arc::new(KubeTokenReviewer::new(client)),
                    config.trust_domain.clone(),
                )))
            }
            None => None,
        };

        let bundle_pem = follow_bundle(
            &ca,
            &mesh,
            &metrics,
            [Some(bundle_path.clone()), config.publish_bundle.clone()],
            &tracker,
            cancel.clone(),
        )
        .map_err(|(path, e)| {
            let flag = if Some(&path) == config.publish_bundle.as_ref() {
                "--publish-bundle: "
            } else {
                ""
            };
            StartError::Config(format!(
                "{flag}cannot write the trust bundle to {}: {e} (does its folder exist and is it \
                 writable?)",
                path.display()
            ))
        })?;
        // With the Kubernetes source the file's model is joined with the cluster's there.
        let to_cluster = match (&config.kubernetes, config.kubernetes_mesh) {
            (Some(access), true) => {
                let client = access.watch_client().map_err(StartError::Config)?;
                let file_model = loaded.as_ref().map(|l| l.model.clone()).unwrap_or_default();
                let (sender, receiver) = watch::channel(file_model);
                let (namespaces, meshed_namespaces) = watch::channel(BTreeSet::new());
                BundleConfigMaps {
                    client: access.client().map_err(StartError::Config)?,
                    bundle_pem: bundle_pem.clone(),
                    retry: bundle_configmaps::RETRY,
                    resync: bundle_configmaps::RESYNC,
                }
                .spawn(meshed_namespaces, &tracker, cancel.clone());
                KubeSource {
                    client,
                    trust_domain: config.trust_domain.clone(),
                    file: receiver,
                    mesh: mesh.clone(),
                    metrics: metrics.clone(),
                    meshed_namespaces: Some(namespaces),
                }
                .spawn(&tracker, cancel.clone());
                tracing::info!(
                    "mesh model from the Kubernetes API (Pods, Services, EndpointSlices, \
                     AuthorizationPolicies) and the config file's entries"
                );
                Some(sender)
            }
            (None, true) => {
                return Err(StartError::Config(
                    "the Kubernetes mesh source needs --kubernetes".into(),
                ));
            }
            (_, false) => None,
        };
        if let (Some(mut loaded), Some(path)) = (loaded, &config.config_file) {
            if to_cluster.is_none() {
                mesh.publish(std::mem::take(&mut loaded.model));
            }
            let source = FileSource {
                path: path.clone(),
                trust_domain: config.trust_domain.clone(),
                tokens: tokens.clone(),
                mesh: mesh.clone(),
                metrics: metrics.clone(),
                to_cluster,
            };
            source.spawn(&loaded, &tracker, cancel.clone());
        }
        let own_identity = identity::serving_identity(&ca, &tracker, cancel.clone())?;

        let mut tls = latch_identity::tls::server_config(
            own_identity.clone(),
            Arc::new(SpiffeClientVerifier::new(
                own_identity.clone(),
                ClientAuth::Deferred,
            )),
            &[latch_identity::tls::ALPN_H2],
        )?;
        // Renewal re-validates the presented chain on every request; resumption would only
        // save a handshake per (rare) connection, so keep every session fresh.
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;

        let webhook_addr = match (&config.webhook, webhook_listener) {
            (Some(webhook), Some((listener, addr))) => {
                webhook::serve(
                    listener,
                    webhook,
                    ca.clone(),
                    metrics.clone(),
                    &tracker,
                    cancel.clone(),
                )?;
                match &config.kubernetes {
                    Some(access) => {
                        WebhookCaBundle {
                            client: access.client().map_err(StartError::Config)?,
                            name: webhook.configuration.clone(),
                            bundle_pem: bundle_pem.clone(),
                            metrics: metrics.clone(),
                            retry: webhook_ca_bundle::RETRY,
                            resync: webhook_ca_bundle::RESYNC,
                        }
                        .spawn(&tracker, cancel.clone());
                        tracing::info!(
                            webhook = %addr,
                            dns_name = webhook::WEBHOOK_DNS_NAME,
                            image = %webhook.inject.image,
                            configuration = %webhook.configuration,
                            "sidecar injector serving POST /inject; keeping the \
                             MutatingWebhookConfiguration's caBundle equal to the CA's roots"
                        );
                    }
                    None => tracing::info!(
                        webhook = %addr,
                        dns_name = webhook::WEBHOOK_DNS_NAME,
                        image = %webhook.inject.image,
                        "sidecar injector serving POST /inject; the MutatingWebhookConfiguration's \
                         caBundle must hold the roots in {} (`latchctl webhook ca-bundle`)",
                        bundle_path.display()
                    ),
                }
                Some(addr)
            }
            _ => None,
        };

        let incoming = tls_incoming::incoming(
            grpc_listener,
            Arc::new(tls),
            config.limits,
            ca.clone(),
            metrics.clone(),
            &tracker,
            cancel.clone(),
        );
        if let Some(access) = &config.kubernetes {
            let jwt_mesh = mesh.clone();
            jwt.follow(
                access.watch_client().map_err(StartError::Config)?,
                move |jwks| jwt_mesh.set_jwt_bundle(jwks),
                &tracker,
                cancel.clone(),
            );
        }
        let jwt_mesh = mesh.clone();
        tracker.spawn(jwt_authority::run_rotation(
            jwt.clone(),
            config.jwt_key_rotation,
            move |jwks| jwt_mesh.set_jwt_bundle(jwks),
            cancel.clone(),
        ));
        let service = CertificateServiceServer::new(CertificateServer::new(
            ca.clone(),
            jwt.clone(),
            tokens.clone(),
            revocations.clone(),
            issued.clone(),
            service_accounts,
            metrics.clone(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let bundle_acks = Arc::new(BundleAcks::default());
        let discovery = AggregatedDiscoveryServiceServer::new(DiscoveryServer::new(
            ca.clone(),
            mesh.clone(),
            revocations.clone(),
            metrics.clone(),
            bundle_acks.clone(),
            tracker.clone(),
            cancel.clone(),
        ))
        .max_decoding_message_size(MAX_DISCOVERY_REQUEST_BYTES);
        // Each proxy holds one discovery stream on its own connection, so per-connection
        // limits stay small; the connection cap (AcceptLimits) bounds proxies in total.
        // The timeout covers a handler until it returns its response; discovery returns its
        // stream at once, so the timeout never ends a stream. Keepalive finds dead proxies.
        // SeeRequestsLayer tells the front door which connections sent requests (its
        // first-request deadline and unauthenticated budget).
        let server = tonic::transport::Server::builder()
            .layer(tls_incoming::SeeRequestsLayer)
            .concurrency_limit_per_connection(64)
            .max_concurrent_streams(Some(128))
            .timeout(config.request_timeout)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .add_service(service)
            .add_service(discovery);
        let shutdown = cancel.clone();
        tracker.spawn(async move {
            if let Err(e) = server
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
            {
                tracing::error!("gRPC server (certificate service, discovery) stopped: {e}");
            }
        });

        admin::serve(
            admin_listener,
            Arc::new(admin::AdminState {
                ca: ca.clone(),
                jwt: jwt.clone(),
                tokens: tokens.clone(),
                revocations: revocations.clone(),
                issued,
                metrics: metrics.clone(),
                mesh: mesh.clone(),
                bundle_acks,
                own_identity,
                admin_credential_hash: tokens::token_hash(&credential),
            }),
            &tracker,
            cancel.clone(),
        );
        tracing::info!(
            trust_domain = %config.trust_domain,
            grpc = %grpc_addr,
            admin = %admin_addr,
            bundle = %bundle_path.display(),
            "control plane started; clients trust it through the bundle file"
        );
        Ok(Self {
            grpc_addr,
            admin_addr,
            webhook_addr,
            bundle_path,
            admin_token_path,
            ca,
            jwt,
            tokens,
            revocations,
            metrics,
            mesh,
            cancel,
            tracker,
        })
    }

    /// Publishes a new JWT signing key now, as `--jwt-key-rotation` does on its schedule, and
    /// serves the new JWT bundle (the replaced key still in it) to the proxies. The new key
    /// signs from `Rotation::signs_from`.
    pub async fn rotate_jwt_key(
        &self,
    ) -> Result<jwt_authority::Rotation, jwt_authority::JwtAuthorityError> {
        let rotation = self.jwt.rotate(std::time::SystemTime::now()).await?;
        self.mesh.set_jwt_bundle(self.jwt.bundle_jwks());
        Ok(rotation)
    }

    /// Stops accepting, closes connections and waits for every task to finish.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
