//! The proxy's command line; every flag also reads a LATCH_* environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "latch-proxy",
    version,
    about = "Latch sidecar proxy: workload identity and mTLS"
)]
pub struct Args {
    /// The control plane's gRPC address (host:port).
    #[arg(long, env = "LATCH_CONTROL_PLANE", default_value = "127.0.0.1:15010")]
    pub control_plane: String,
    /// Trust bundle (PEM) that the control plane's certificate chains to.
    #[arg(long, env = "LATCH_CA_BUNDLE")]
    pub ca_bundle: PathBuf,
    /// Trust domain; the control plane must present
    /// spiffe://<trust-domain>/ns/latch-system/sa/latch-control.
    #[arg(long, env = "LATCH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// File holding a join token (or set LATCH_JOIN_TOKEN).
    #[arg(long, env = "LATCH_JOIN_TOKEN_FILE", conflicts_with_all = ["join_token", "token_file"])]
    pub join_token_file: Option<PathBuf>,
    /// A join token. Prefer the environment variable: command lines are visible to other users.
    #[arg(
        long,
        env = "LATCH_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub join_token: Option<String>,
    /// Kubernetes projected service-account token file (audience `latch`), re-read at every
    /// request because the kubelet rotates it.
    #[arg(long, env = "LATCH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Requested SVID lifetime (the control plane's default when absent).
    #[arg(long, env = "LATCH_SVID_TTL", value_parser = humantime::parse_duration)]
    pub svid_ttl: Option<Duration>,
    /// Serve the SPIFFE Workload API on this Unix socket (unix:///path).
    #[arg(long, env = "LATCH_WORKLOAD_API")]
    pub workload_api: Option<String>,
    /// Admin HTTP: /healthz, /ready, /metrics, /debug/certs.
    #[arg(long, env = "LATCH_ADMIN", default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
    /// Log format: text or json.
    #[arg(long, env = "LATCH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}
