//! The proxy's command line; every flag also reads a LATCH_* environment variable.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use latch_identity::SpiffeId;
use latch_mesh::ports::{
    CONTROL_GRPC, INBOUND_CAPTURE, INBOUND_MTLS, OUTBOUND_CAPTURE, PROXY_ADMIN,
};

use crate::outbound::ExplicitTarget;
use crate::state::MeshPeer;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "latch-proxy",
    version,
    about = "Latch sidecar proxy: workload identity and mTLS",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: Args,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Manage the iptables rules that capture the app's TCP (run as root in the pod's netns).
    Iptables {
        #[arg(value_enum)]
        action: IptablesAction,
        /// The uid the proxy runs as; its traffic is not captured.
        #[arg(long, env = "LATCH_PROXY_UID", default_value_t = latch_mesh::ports::PROXY_UID)]
        proxy_uid: u32,
        /// Destination ports the app reaches directly (comma-separated).
        #[arg(long, env = "LATCH_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
        exclude_outbound_ports: Vec<u16>,
        /// Local ports reachable directly from outside (comma-separated).
        #[arg(long, env = "LATCH_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
        exclude_inbound_ports: Vec<u16>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IptablesAction {
    Install,
    Uninstall,
    Print,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InboundModeArg {
    Strict,
    Permissive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutboundPolicyArg {
    Passthrough,
    RegistryOnly,
}

/// A `--peer IP=SPIFFE_ID` or `--peer IP:PORT=SPIFFE_ID` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFlag {
    pub ip: IpAddr,
    pub peer: MeshPeer,
}

impl std::str::FromStr for PeerFlag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, id) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected IP=SPIFFE_ID or IP:MESH_PORT=SPIFFE_ID"))?;
        let (ip, mesh_port) = match addr.parse::<SocketAddr>() {
            Ok(sa) => (sa.ip(), sa.port()),
            Err(_) => (
                addr.parse::<IpAddr>()
                    .map_err(|e| format!("{s:?}: {addr:?}: {e}"))?,
                INBOUND_MTLS,
            ),
        };
        let id = SpiffeId::parse(id).map_err(|e| format!("{s:?}: {id:?}: {e}"))?;
        Ok(Self {
            ip,
            peer: MeshPeer { id, mesh_port },
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The control plane's gRPC address (host:port).
    #[arg(long, env = "LATCH_CONTROL_PLANE", default_value_t = format!("127.0.0.1:{CONTROL_GRPC}"))]
    pub control_plane: String,
    /// Required: the trust bundle (PEM) that the control plane's certificate chains to, the
    /// control plane's <data-dir>/bundle.pem.
    #[arg(long, env = "LATCH_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
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
    /// The app's kubelet probes, as the injector rewrote them to the admin port's
    /// /app-health/<container>/<kind> (JSON: {"<container>/<kind>": <Kubernetes probe with
    /// httpGet, tcpSocket or grpc, ports as numbers>}); the proxy runs each against the app on
    /// loopback when the kubelet asks. Injected pods get it from their latch.dev/app-probes
    /// annotation.
    #[arg(long, env = "LATCH_APP_PROBES")]
    pub app_probes: Option<String>,
    /// Also let this uid use the Workload API (checked with SO_PEERCRED; the proxy's own uid
    /// and root always may); repeatable. `any` lets every uid in, for a socket in a directory
    /// private to one pod. With other uids allowed the socket is mode 0666.
    #[arg(long = "workload-api-allow-uid", env = "LATCH_WORKLOAD_API_ALLOW_UID", value_delimiter = ',', value_parser = parse_allowed_uid)]
    pub workload_api_allow_uid: Vec<AllowedUid>,
    /// Learn workloads, services, policies and mesh settings from the control plane
    /// (`--discovery=false`: only the flags describe the mesh).
    #[arg(long, env = "LATCH_DISCOVERY", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub discovery: bool,
    /// Subscribe to every workload and service in the mesh at start (small meshes,
    /// debugging), instead of learning the destinations the app connects to on demand.
    #[arg(long, env = "LATCH_DISCOVERY_WILDCARD")]
    pub discovery_wildcard: bool,
    /// This proxy's workload as the control plane names it, <namespace>/<name>; sent as the
    /// discovery node id so policies select it even when several workloads share an ID.
    #[arg(long, env = "LATCH_WORKLOAD_NAME", value_parser = parse_workload_name)]
    pub workload_name: Option<String>,
    /// Discovery server address when it is not --control-plane (it must present the control
    /// plane's SPIFFE ID all the same).
    #[arg(long, env = "LATCH_DISCOVERY_ADDRESS")]
    pub discovery_address: Option<String>,
    /// This proxy's admin HTTP: /healthz, /ready, /metrics, /debug/certs, /debug/config. (Its
    /// variable is not LATCH_ADMIN: for latch-control and latchctl that is the control plane's.)
    #[arg(long, env = "LATCH_PROXY_ADMIN", default_value_t = SocketAddr::from(([127, 0, 0, 1], PROXY_ADMIN)))]
    pub admin: SocketAddr,
    /// Inbound mTLS listener for other proxies. `[::]` is both IPv4 and IPv6 (IPv4 only on a
    /// kernel without IPv6).
    #[arg(long, env = "LATCH_INBOUND", default_value_t = SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_MTLS)))]
    pub inbound: SocketAddr,
    /// Run the transparent-capture listeners (outbound 15001, inbound plaintext 15006); use
    /// with `latch-proxy iptables install`.
    #[arg(long, env = "LATCH_TRANSPARENT")]
    pub transparent: bool,
    /// Outbound capture listener (with --transparent).
    #[arg(long, env = "LATCH_OUTBOUND_CAPTURE", default_value_t = SocketAddr::from((Ipv6Addr::UNSPECIFIED, OUTBOUND_CAPTURE)))]
    pub outbound_capture: SocketAddr,
    /// Inbound plaintext capture listener (with --transparent).
    #[arg(long, env = "LATCH_INBOUND_PLAINTEXT", default_value_t = SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_CAPTURE)))]
    pub inbound_plaintext: SocketAddr,
    /// Plaintext arriving for the app: refused (strict) or passed to it (permissive). When
    /// set, overrides the control plane's mTLS modes; when absent they decide (strict without
    /// discovery).
    #[arg(long, env = "LATCH_INBOUND_MODE", value_enum)]
    pub inbound_mode: Option<InboundModeArg>,
    /// A meshed peer: IP=SPIFFE_ID (mesh port 15008) or IP:PORT=SPIFFE_ID; repeatable.
    #[arg(long = "peer", env = "LATCH_PEERS", value_delimiter = ',')]
    pub peers: Vec<PeerFlag>,
    /// Traffic to destinations outside the mesh: passed through or refused. When set,
    /// overrides the control plane's outbound policy; when absent it decides (passthrough
    /// without discovery).
    #[arg(long, env = "LATCH_OUTBOUND_POLICY", value_enum)]
    pub outbound_policy: Option<OutboundPolicyArg>,
    /// Explicit outbound listener; repeatable. LISTEN=IP:PORT: routed by discovery as if
    /// captured (a service VIP or workload IP; never plain TCP). Or fixed:
    /// LISTEN=SPIFFE_ID@MESH_HOST:MESH_PORT/TARGET_PORT.
    #[arg(long = "outbound", env = "LATCH_OUTBOUND", value_delimiter = ',')]
    pub outbound: Vec<ExplicitTarget>,
    /// Inbound allow-list of SPIFFE IDs, an extra restriction on top of the control plane's
    /// policies (both must allow); default: no extra restriction. Repeatable.
    #[arg(long = "allow", env = "LATCH_ALLOW", value_delimiter = ',')]
    pub allow: Vec<SpiffeId>,
    /// Deliver every inbound connection to this address instead of the workload's own (the
    /// address the peer connected to). 127.0.0.1 exposes the pod's loopback-only services to
    /// every allowed peer: prefer --inbound-loopback-port for the ports that need it.
    #[arg(long, env = "LATCH_APP_HOST")]
    pub app_host: Option<IpAddr>,
    /// Deliver inbound connections for this port to loopback (127.0.0.1 or ::1) instead of the
    /// workload's address, for an app that listens on loopback only; repeatable.
    #[arg(
        long = "inbound-loopback-port",
        env = "LATCH_INBOUND_LOOPBACK_PORTS",
        value_delimiter = ','
    )]
    pub inbound_loopback_ports: Vec<u16>,
    /// Most proxied connections at once; more are refused.
    #[arg(long, env = "LATCH_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Timeout for connecting to peers and apps.
    #[arg(long, env = "LATCH_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Timeout for TLS handshakes and the transport header.
    #[arg(long, env = "LATCH_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Close connections with no bytes in either direction for this long.
    #[arg(long, env = "LATCH_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Once one direction of a proxied connection has ended (EOF), close the pair when a write
    /// in the other direction waits this long (its destination stopped reading).
    #[arg(long, env = "LATCH_HALF_CLOSED_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub half_closed_timeout: Duration,
    /// On SIGTERM, how long open connections may take to finish.
    #[arg(long, env = "LATCH_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Carry outbound connections to peer proxies as HTTP/2 CONNECT streams over pooled mTLS
    /// tunnels (HBONE, ALPN h2) instead of one mTLS connection each (latch/1). The inbound
    /// listener accepts both either way.
    #[arg(long, env = "LATCH_HBONE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub hbone: bool,
    /// Threads of the async runtime that run the data path, discovery and the admin server.
    /// Default: 2, or 1 where only one CPU is available (a sidecar shares its pod's CPU limit,
    /// 2 for injected pods, and more threads than CPUs only add context switches).
    #[arg(long, env = "LATCH_WORKER_THREADS", default_value_t = default_worker_threads(), value_parser = parse_worker_threads)]
    pub worker_threads: usize,
    /// Log format: text or json.
    #[arg(long, env = "LATCH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Most `--worker-threads`: far beyond any sidecar's CPU limit, so a value above it is a typo.
pub const MAX_WORKER_THREADS: usize = 256;

/// The `--worker-threads` default: 2 (Istio's sidecar runs Envoy with concurrency 2, and
/// injected pods get a CPU limit of 2), fewer when the process may use fewer CPUs (its
/// affinity mask or cgroup quota, as `available_parallelism` reads them).
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(2))
}

/// Parses `--worker-threads`: a whole number from 1 to `MAX_WORKER_THREADS`.
pub fn parse_worker_threads(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(
            "0 worker threads cannot run the proxy: give at least 1 (the default is \
                      2, or 1 on a single CPU)"
                .into(),
        ),
        Ok(n) if n > MAX_WORKER_THREADS => Err(format!(
            "{n} is more than {MAX_WORKER_THREADS} worker threads; a sidecar needs about as many \
             as the CPUs it may use (the default is 2)"
        )),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of threads (e.g. 2)")),
    }
}

/// One `--workload-api-allow-uid` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowedUid {
    Uid(u32),
    Any,
}

/// Parses `any` or a numeric uid (names are not looked up: a container's /etc/passwd is not the
/// app's).
pub fn parse_allowed_uid(s: &str) -> Result<AllowedUid, String> {
    if s == "any" {
        return Ok(AllowedUid::Any);
    }
    s.parse()
        .map(AllowedUid::Uid)
        .map_err(|_| format!("{s:?}: a numeric uid or `any`"))
}

/// Checks a `<namespace>/<name>` workload name: two non-empty segments of letters, digits,
/// '.', '-' and '_'.
pub fn parse_workload_name(s: &str) -> Result<String, String> {
    if latch_mesh::validate::is_workload_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not <namespace>/<name> (letters, digits, '.', '-', '_'), e.g. demo/web"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(["latch-proxy"].iter().chain(args)).map(|cli| cli.run)
    }

    #[test]
    fn worker_threads_default_to_at_most_two_and_refuse_zero() {
        let default = parse(&[]).unwrap().worker_threads;
        assert!((1..=2).contains(&default), "{default}");
        assert_eq!(parse(&["--worker-threads", "4"]).unwrap().worker_threads, 4);
        for (bad, says) in [
            ("0", "0 worker threads cannot run the proxy"),
            ("257", "more than 256"),
            ("two", "not a number"),
            ("1.5", "not a number"),
        ] {
            let e = parse(&["--worker-threads", bad]).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn discovery_flags() {
        let args = parse(&[]).unwrap();
        assert!(args.discovery, "discovery is on by default");
        assert_eq!(args.workload_name, None);
        assert_eq!(args.inbound_mode, None, "no override unless given");
        assert_eq!(args.outbound_policy, None);
        assert!(!parse(&["--discovery=false"]).unwrap().discovery);
        assert!(!parse(&["--discovery", "false"]).unwrap().discovery);
        assert!(parse(&["--discovery"]).unwrap().discovery);
        let args = parse(&[
            "--workload-name",
            "demo/web",
            "--inbound-mode",
            "permissive",
            "--outbound-policy",
            "registry-only",
        ])
        .unwrap();
        assert_eq!(args.workload_name.as_deref(), Some("demo/web"));
        assert_eq!(args.inbound_mode, Some(InboundModeArg::Permissive));
        assert_eq!(args.outbound_policy, Some(OutboundPolicyArg::RegistryOnly));
        for bad in ["web", "demo/", "/web", "demo/web/x", "demo/w b", ""] {
            assert!(
                parse(&["--workload-name", bad]).is_err(),
                "{bad:?} is refused"
            );
        }
    }

    #[test]
    fn workload_api_allow_uid_flags() {
        assert!(parse(&[]).unwrap().workload_api_allow_uid.is_empty());
        let args = parse(&[
            "--workload-api-allow-uid",
            "4242",
            "--workload-api-allow-uid",
            "any",
            "--workload-api-allow-uid",
            "7,8",
        ])
        .unwrap();
        assert_eq!(
            args.workload_api_allow_uid,
            [
                AllowedUid::Uid(4242),
                AllowedUid::Any,
                AllowedUid::Uid(7),
                AllowedUid::Uid(8)
            ]
        );
        for bad in ["root", "-1", "", "4294967296", "ANY"] {
            assert!(
                parse(&["--workload-api-allow-uid", bad]).is_err(),
                "{bad:?} is refused"
            );
        }
    }

    #[test]
    fn inbound_delivery_flags() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.app_host, None, "the workload's own address by default");
        assert!(args.inbound_loopback_ports.is_empty());
        let args = parse(&[
            "--inbound-loopback-port",
            "8080",
            "--inbound-loopback-port",
            "9090,9091",
        ])
        .unwrap();
        assert_eq!(args.inbound_loopback_ports, vec![8080, 9090, 9091]);
        assert!(parse(&["--inbound-loopback-port", "0x"]).is_err());
    }

    #[test]
    fn peer_flags_parse() {
        let p: PeerFlag = "10.0.0.2=spiffe://cluster.local/ns/a/sa/web"
            .parse()
            .unwrap();
        assert_eq!(
            (p.ip.to_string(), p.peer.mesh_port),
            ("10.0.0.2".into(), 15008)
        );
        let p: PeerFlag = "10.0.0.2:25008=spiffe://cluster.local/ns/a/sa/web"
            .parse()
            .unwrap();
        assert_eq!(p.peer.mesh_port, 25008);
        assert!("10.0.0.2".parse::<PeerFlag>().is_err());
        assert!("nope=spiffe://cluster.local/x".parse::<PeerFlag>().is_err());
        assert!(
            "10.0.0.2=spiffe://cluster.local/"
                .parse::<PeerFlag>()
                .is_err()
        );
    }
}
