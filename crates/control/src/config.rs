//! The control plane's configuration: command-line flags (each with a LATCH_* environment
//! variable) and the optional YAML config file: join tokens and the mesh (settings,
//! workloads, services, policies), which `mesh::file_source` watches for edits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use latch_identity::{SpiffeId, TrustDomain};
use latch_mesh::MeshError;
use latch_mesh::ports::{CONTROL_ADMIN, CONTROL_GRPC};
use serde::Deserialize;

use crate::ca::{PluginFiles, TtlPolicy};
use crate::ca_secret::SecretRef;
use crate::kubernetes::KubernetesAccess;
use crate::mesh::MeshModel;
use crate::mesh::spec::{MeshSettingsSpec, PolicySpec, ServiceSpec, WorkloadSpec};
use crate::tls_incoming::AcceptLimits;
use crate::tokens::{JoinTokens, TokenRecord};
use crate::webhook::WebhookConfig;

/// `latch-control` command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "latch-control",
    version,
    about = "Latch control plane: SPIFFE certificate authority"
)]
pub struct Args {
    /// Trust domain of the SPIFFE IDs this control plane issues.
    #[arg(long, env = "LATCH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Folder for the CA key and certificate, the trust bundle, the admin credential and
    /// join-token state. Created 0700.
    #[arg(long, env = "LATCH_DATA_DIR", default_value = "./latch-data")]
    pub data_dir: PathBuf,
    /// gRPC over TLS (certificate service).
    #[arg(long, env = "LATCH_LISTEN", default_value_t = SocketAddr::from(([127, 0, 0, 1], CONTROL_GRPC)))]
    pub listen: SocketAddr,
    /// Admin HTTP: /healthz, /ready, /metrics, join-token creation.
    #[arg(long, env = "LATCH_ADMIN", default_value_t = SocketAddr::from(([127, 0, 0, 1], CONTROL_ADMIN)))]
    pub admin: SocketAddr,
    /// YAML config file (join tokens, mesh settings, workloads, services, policies); edits
    /// are applied while running.
    #[arg(long, env = "LATCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Lifetime of an SVID when the caller does not ask for one.
    #[arg(long, env = "LATCH_DEFAULT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub default_ttl: Duration,
    /// Longest lifetime a caller may ask for.
    #[arg(long, env = "LATCH_MAX_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_ttl: Duration,
    /// How often the JWT-SVID signing key is replaced. The new key is published 2 minutes
    /// before it signs, and the replaced key stays in the JWT bundle until its tokens have
    /// expired; at least 10s. With --kubernetes the keys are shared by the replicas (Secret
    /// latch-jwt-keys).
    #[arg(long, env = "LATCH_JWT_KEY_ROTATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub jwt_key_rotation: Duration,
    /// Plug-in CA: the signing certificate (root or intermediate), PEM.
    #[arg(long, env = "LATCH_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Plug-in CA: the signing key, PEM (PKCS#8 or SEC1).
    #[arg(long, env = "LATCH_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Plug-in CA: intermediates between --ca-cert and the root, PEM.
    #[arg(long, env = "LATCH_CA_CHAIN", requires = "ca_cert")]
    pub ca_chain: Option<PathBuf>,
    /// Plug-in CA: the root certificate(s) to distribute as the trust bundle, PEM. Required
    /// when --ca-cert is an intermediate. (Its variable is not LATCH_CA_BUNDLE: for latch-proxy
    /// and latchctl that is the bundle they verify the control plane with.)
    #[arg(long, env = "LATCH_CONTROL_CA_BUNDLE", requires = "ca_cert")]
    pub ca_bundle: Option<PathBuf>,
    /// Most TLS connections (proxies, clients) served at once on --listen; more wait in the
    /// kernel's accept queue. Each needs a file descriptor.
    #[arg(long, env = "LATCH_MAX_CONNECTIONS", default_value_t = AcceptLimits::default().max_connections)]
    pub max_connections: usize,
    /// Most TLS connections from one source address at once on --listen; more are closed at
    /// once. Keeps one host from taking --max-connections.
    #[arg(long, env = "LATCH_MAX_CONNECTIONS_PER_SOURCE", default_value_t = AcceptLimits::default().max_per_source)]
    pub max_connections_per_source: usize,
    /// Most connections on --listen without a valid SVID (join-token and service-account-token
    /// callers) at once; default a quarter of --max-connections. When full, a new one closes
    /// the oldest with no request in flight, or is refused. Each is closed 30 s after its
    /// handshake.
    #[arg(long, env = "LATCH_MAX_UNAUTHENTICATED_CONNECTIONS")]
    pub max_unauthenticated_connections: Option<usize>,
    /// Serve the sidecar injector webhook (HTTPS, POST /inject) on this address, e.g.
    /// 0.0.0.0:15017. Off when absent.
    #[arg(long, env = "LATCH_WEBHOOK")]
    pub webhook: Option<SocketAddr>,
    /// The MutatingWebhookConfiguration naming the injector: with --kubernetes, the control
    /// plane keeps every webhooks[].clientConfig.caBundle in it equal to the CA's roots.
    #[arg(long, env = "LATCH_WEBHOOK_CONFIGURATION", default_value = crate::webhook_ca_bundle::DEFAULT_CONFIGURATION)]
    pub webhook_configuration: String,
    /// Image of the injected latch-proxy and latch-iptables containers.
    #[arg(long, env = "LATCH_INJECT_IMAGE", default_value = latch_inject::DEFAULT_IMAGE)]
    pub inject_image: String,
    /// The control plane's gRPC address as injected proxies reach it.
    #[arg(long, env = "LATCH_INJECT_CONTROL_PLANE", default_value = latch_inject::DEFAULT_CONTROL_PLANE)]
    pub inject_control_plane: String,
    #[command(flatten)]
    pub inject_proxy: latch_inject::settings::ProxyFlags,
    /// Run as part of a Kubernetes cluster: accept projected service-account tokens (audience
    /// `latch`) as proof of identity, checked with the API server through TokenReview, using
    /// the pod's own service account; and take workloads, services and policies from the API
    /// (Pods, Services, EndpointSlices, AuthorizationPolicy); and keep join-token state
    /// (created tokens, every use) in Secrets of its namespace, shared by the replicas, so a
    /// single-use token is used once across them all. The --config file still supplies
    /// join tokens and `mesh:` settings, and its workloads, services and policies (e.g. VMs
    /// outside the cluster) join the cluster's, the cluster winning a name or IP clash. Latch
    /// never turns this on by itself.
    #[arg(long, env = "LATCH_KUBERNETES")]
    pub kubernetes: bool,
    /// Keep the CA in this Kubernetes Secret, <namespace>/<name> (keys ca.crt, ca.key), shared
    /// by every replica: read it, or create it with a new root when there is none (one replica
    /// wins, the others use its root). Needs --kubernetes; instead of --ca-cert/--ca-key.
    #[arg(
        long,
        env = "LATCH_CA_SECRET",
        requires = "kubernetes",
        conflicts_with = "ca_cert"
    )]
    pub ca_secret: Option<SecretRef>,
    /// Log format: text or json.
    #[arg(long, env = "LATCH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Also write the trust bundle (PEM, mode 0644) to this file, at start and again on every
    /// root rotation step, for clients that cannot read the data dir: e.g. a volume mounted
    /// read-only by sidecars.
    #[arg(long, env = "LATCH_PUBLISH_BUNDLE")]
    pub publish_bundle: Option<PathBuf>,
}

/// Everything `ControlPlane::start` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub trust_domain: TrustDomain,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config_file: Option<PathBuf>,
    pub ttl: TtlPolicy,
    pub plugin: Option<PluginFiles>,
    pub limits: AcceptLimits,
    /// Longest a gRPC handler may take to answer (unary calls; a discovery stream answers at
    /// once, so this does not limit how long it stays open).
    pub request_timeout: Duration,
    /// The injector webhook, when served.
    pub webhook: Option<WebhookConfig>,
    /// The Kubernetes API server, when service-account tokens are accepted.
    pub kubernetes: Option<KubernetesAccess>,
    /// The Secret the CA lives in (needs `kubernetes`; instead of `plugin`).
    pub ca_secret: Option<SecretRef>,
    /// Take workloads, services and policies from the cluster (needs `kubernetes`; the config
    /// file then supplies only join tokens and `mesh:` settings). `--kubernetes` sets both.
    pub kubernetes_mesh: bool,
    /// Where to keep a world-readable copy of the trust bundle (`--publish-bundle`), rewritten
    /// whenever the bundle changes.
    pub publish_bundle: Option<PathBuf>,
    /// Runs in a Kubernetes pod (KUBERNETES_SERVICE_HOST is set). Without `kubernetes`, its
    /// data dir is then its own and not its replicas': single-use join tokens are refused.
    pub in_pod: bool,
    /// How often the JWT-SVID signing key is replaced.
    pub jwt_key_rotation: Duration,
    /// How long a new JWT signing key is published before it signs (not a flag: tests shorten
    /// it).
    pub jwt_publish_ahead: Duration,
}

/// Shortest `--jwt-key-rotation`: bounds the replaced keys the JWT bundle holds at once.
pub const MIN_JWT_KEY_ROTATION: Duration = Duration::from_secs(10);

/// Default for `Config::request_timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Config {
    /// Defaults for a trust domain and data dir, listening on the given addresses.
    pub fn new(
        trust_domain: TrustDomain,
        data_dir: PathBuf,
        listen: SocketAddr,
        admin: SocketAddr,
    ) -> Self {
        Self {
            trust_domain,
            data_dir,
            listen,
            admin,
            config_file: None,
            ttl: TtlPolicy::default(),
            plugin: None,
            limits: AcceptLimits::default(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            webhook: None,
            kubernetes: None,
            ca_secret: None,
            kubernetes_mesh: false,
            publish_bundle: None,
            in_pod: false,
            jwt_key_rotation: crate::jwt_authority::DEFAULT_ROTATION,
            jwt_publish_ahead: crate::jwt_authority::DEFAULT_PUBLISH_AHEAD,
        }
    }
}

/// Refuses a start that relies on a variable latch-control no longer reads: LATCH_CA_BUNDLE
/// (now LATCH_CONTROL_CA_BUNDLE, since for latch-proxy and latchctl LATCH_CA_BUNDLE is the
/// bundle they verify the control plane with). Only in plug-in mode without --ca-bundle, where
/// it would have been read; `env` reads a variable (`std::env::var_os` in the binary).
pub fn check_renamed_variables(
    args: &Args,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(), String> {
    match env("LATCH_CA_BUNDLE") {
        Some(value) if args.ca_cert.is_some() && args.ca_bundle.is_none() => Err(format!(
            "LATCH_CA_BUNDLE is set ({}) but latch-control does not read it: for latch-proxy \
             and latchctl it names the bundle they verify the control plane with. Give the \
             plug-in CA's roots with --ca-bundle or LATCH_CONTROL_CA_BUNDLE",
            value.to_string_lossy()
        )),
        _ => Ok(()),
    }
}

impl TryFrom<Args> for Config {
    type Error = String;
    fn try_from(args: Args) -> Result<Self, String> {
        let trust_domain = TrustDomain::new(&args.trust_domain)
            .map_err(|e| format!("--trust-domain {:?}: {e}", args.trust_domain))?;
        if args.default_ttl > args.max_ttl {
            return Err(format!(
                "--default-ttl {:?} is over --max-ttl {:?}",
                args.default_ttl, args.max_ttl
            ));
        }
        if args.jwt_key_rotation < MIN_JWT_KEY_ROTATION {
            return Err(format!(
                "--jwt-key-rotation {:?} is under the minimum of {MIN_JWT_KEY_ROTATION:?}: every \
                 replaced key stays in the JWT bundle for the lifetime of its tokens",
                args.jwt_key_rotation
            ));
        }
        if args.max_connections_per_source == 0 || args.max_unauthenticated_connections == Some(0) {
            return Err(
                "--max-connections-per-source and --max-unauthenticated-connections must be at \
                 least 1"
                    .into(),
            );
        }
        let plugin = match (args.ca_cert, args.ca_key) {
            (Some(cert), Some(key)) => Some(PluginFiles {
                cert,
                key,
                chain: args.ca_chain,
                bundle: args.ca_bundle,
            }),
            _ => None,
        };
        let proxy = args.inject_proxy.settings()?;
        let webhook = args.webhook.map(|listen| WebhookConfig {
            listen,
            inject: latch_inject::InjectConfig {
                image: args.inject_image,
                control_plane: args.inject_control_plane,
                trust_domain: trust_domain.to_string(),
                proxy,
            },
            configuration: args.webhook_configuration,
        });
        Ok(Self {
            trust_domain,
            data_dir: args.data_dir,
            listen: args.listen,
            admin: args.admin,
            config_file: args.config,
            ttl: TtlPolicy {
                default: args.default_ttl,
                max: args.max_ttl,
            },
            plugin,
            limits: AcceptLimits {
                max_connections: args.max_connections,
                max_per_source: args.max_connections_per_source,
                max_unauthenticated: args.max_unauthenticated_connections,
                ..AcceptLimits::default()
            },
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            webhook,
            kubernetes: args.kubernetes.then_some(KubernetesAccess::InCluster),
            ca_secret: args.ca_secret,
            kubernetes_mesh: args.kubernetes,
            publish_bundle: args.publish_bundle,
            in_pod: std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
            jwt_key_rotation: args.jwt_key_rotation,
            jwt_publish_ahead: crate::jwt_authority::DEFAULT_PUBLISH_AHEAD,
        })
    }
}

/// The YAML config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub join_tokens: Vec<ConfiguredToken>,
    #[serde(default)]
    pub mesh: MeshSettingsSpec,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
}

/// A join token listed in the config file: the token itself, or its SHA-256 (hex) so the
/// file need not hold the secret.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfiguredToken {
    pub spiffe_id: String,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_sha256: Option<String>,
    #[serde(default)]
    pub reusable: bool,
    /// RFC 3339 time, e.g. 2027-01-01T00:00:00Z; absent never expires.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// YAML nodes a config file may hold: about 25 per workload, so some 160,000 workloads.
const MAX_CONFIG_NODES: usize = 4_000_000;

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Parses the YAML text of a config file (an empty file is an empty config).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        // YAML 1.2 booleans only (`yes`/`on` are not `true`), as with serde_yaml before. The
        // parser's budget (nodes, events) stays bounded, but above its defaults (250,000 nodes,
        // about 10,000 workloads): a mesh file may list tens of thousands of workloads.
        let options = serde_saphyr::options! {
            strict_booleans: true,
            budget: serde_saphyr::budget! {
                max_nodes: MAX_CONFIG_NODES,
                max_events: 4 * MAX_CONFIG_NODES,
            },
        };
        serde_saphyr::from_str_with_options(text, options).map_err(|e| e.to_string())
    }

    /// Validates the mesh sections into the model proxies are served.
    pub fn mesh_model(&self, trust_domain: &TrustDomain) -> Result<MeshModel, MeshError> {
        MeshModel::build(
            trust_domain,
            &self.mesh,
            &self.workloads,
            &self.services,
            &self.policies,
        )
    }

    /// Registers the configured join tokens.
    pub fn apply_tokens(
        &self,
        trust_domain: &TrustDomain,
        tokens: &JoinTokens,
    ) -> Result<(), String> {
        let mut listed = std::collections::HashSet::new();
        for (i, entry) in self.join_tokens.iter().enumerate() {
            let at = format!("join_tokens[{i}]");
            let id = SpiffeId::parse(&entry.spiffe_id)
                .map_err(|e| format!("{at}.spiffe_id {:?}: {e}", entry.spiffe_id))?;
            if !id.is_member_of(trust_domain) {
                return Err(format!(
                    "{at}.spiffe_id {id} is not in trust domain {trust_domain}"
                ));
            }
            if latch_identity::client::is_reserved(&id) {
                return Err(format!(
                    "{at}.spiffe_id: {}",
                    latch_identity::client::reserved_refusal(&id)
                ));
            }
            if entry.token.is_some() == entry.token_sha256.is_some() {
                return Err(format!("{at}: give exactly one of token and token_sha256"));
            }
            let expires_at = entry
                .expires_at
                .as_deref()
                .map(|t| {
                    humantime::parse_rfc3339(t)
                        .map_err(|e| format!("{at}.expires_at {t:?}: {e}"))
                        .map(|t| {
                            t.duration_since(std::time::UNIX_EPOCH)
                                .unwrap_or_default()
                                .as_secs()
                        })
                })
                .transpose()?;
            let hash = tokens
                .add_configured(
                    entry.token.as_deref(),
                    entry.token_sha256.as_deref(),
                    TokenRecord {
                        spiffe_id: id.to_string(),
                        expires_at,
                        reusable: entry.reusable,
                        used_at: None,
                        configured: true,
                        created_at_ms: None,
                    },
                )
                .map_err(|e| format!("{at}: {e}"))?;
            listed.insert(hash);
        }
        forget_unlisted_tokens(tokens, &listed)
    }
}

/// Forgets the configured join tokens not in `listed` (see
/// `JoinTokens::forget_unlisted_configured`), saying which in the log.
pub fn forget_unlisted_tokens(
    tokens: &JoinTokens,
    listed: &std::collections::HashSet<String>,
) -> Result<(), String> {
    let forgotten = tokens
        .forget_unlisted_configured(listed)
        .map_err(|e| e.to_string())?;
    for id in forgotten {
        tracing::warn!(spiffe_id = %id, "a join token removed from the config file no longer works");
    }
    Ok(())
}
