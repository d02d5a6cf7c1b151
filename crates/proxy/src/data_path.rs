//! The data path's shared context and plumbing: the mesh TLS configs, the mesh state, the
//! authorizer, limits, socket options, its listeners' policy for the shared serve loop (one
//! connection cap for all of them), the
//! per-connection bookkeeping (metrics, drain, endpoint load) and the table of open inbound
//! connections that is re-authorized after every snapshot change, where inbound connections are
//! delivered (`Delivery`) and which destinations are the proxy's own (`ProxyPorts`, never a
//! target). `inbound.rs` and `outbound.rs` hold the handlers.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use latch_admin::serve::{
    AtCap, Cap, Drain, Handshake, ListenerPolicy, Slot, Throttled, io_failure_reason,
};
use latch_identity::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::authorizer::{Authorizer, Decision};
use crate::balance::{ActiveConnections, ActiveGuard};
use crate::copy::{self, CopyEnd};
use crate::metrics::{ConnLabels, Metrics};
use crate::state::{MeshState, Route};
use crate::transport::MeshTls;

/// Timeouts and caps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Once one direction of a pair ended with EOF, how long the other may move nothing.
    pub half_closed_timeout: Duration,
    pub max_connections: usize,
    pub keepalive: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            half_closed_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            keepalive: Duration::from_secs(60),
        }
    }
}

/// Where inbound connections reach the app. By default the workload's own address, the one the
/// peer meant (the local address of the mTLS connection, or the original destination of a
/// captured one), so only what the app exposes to the network is reachable through the mesh,
/// never a service bound to loopback. Loopback (or another host) only when the operator asks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// `--app-host`: every inbound connection goes to this address instead.
    pub app_host: Option<IpAddr>,
    /// `--inbound-loopback-port`: these target ports go to loopback (127.0.0.1 or ::1, the
    /// workload address's family).
    pub loopback_ports: Vec<u16>,
}

impl Delivery {
    /// The app's address for a connection that meant `workload:port`.
    pub fn app_address(&self, workload: IpAddr, port: u16) -> SocketAddr {
        let workload = workload.to_canonical();
        let host = if let Some(host) = self.app_host {
            host
        } else if self.loopback_ports.contains(&port) {
            match workload {
                IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            }
        } else {
            workload
        };
        SocketAddr::new(host, port)
    }
}

/// The proxy's own ports: the well-known ones (`latch_mesh::ports::PROXY_PORTS`) and every
/// listener it has bound (admin, inbound, capture, explicit outbound). Never a target on the
/// proxy's own addresses, whatever a transport header or an original destination says: that
/// would expose the admin server to peers, or loop the proxy into itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPorts {
    ports: BTreeSet<u16>,
    listeners: Vec<SocketAddr>,
}

impl ProxyPorts {
    /// The well-known ports plus `listeners` (bound addresses).
    pub fn new(listeners: &[SocketAddr]) -> Self {
        let mut ports: BTreeSet<u16> = latch_mesh::ports::PROXY_PORTS.into_iter().collect();
        ports.extend(listeners.iter().map(SocketAddr::port));
        Self {
            ports,
            listeners: listeners.to_vec(),
        }
    }

    /// True when `port` is one of the proxy's: an inbound connection to it on the workload's
    /// own address would reach the proxy, not the app.
    pub fn is_proxy_port(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    /// True when `destination` is the proxy itself: one of its bound listeners, or one of its
    /// ports on a loopback address or on `local`, an address of this host (a captured
    /// connection's source, or the address it was accepted on).
    pub fn is_own(&self, destination: SocketAddr, local: &[IpAddr]) -> bool {
        let ip = destination.ip().to_canonical();
        let on_this_host =
            ip.is_loopback() || ip.is_unspecified() || local.iter().any(|l| l.to_canonical() == ip);
        (on_this_host && self.is_proxy_port(destination.port()))
            || self
                .listeners
                .iter()
                .any(|l| l.port() == destination.port() && l.ip().to_canonical() == ip)
    }
}

/// An open mTLS connection, re-checked when the mesh changes: an inbound one against the
/// policies and revocations, an outbound one against revocations (its authorization is the
/// server's to decide).
#[derive(Debug)]
pub struct LiveConnection {
    pub outbound: bool,
    pub peer: SpiffeId,
    /// When the peer's SVID was issued, for revocations.
    pub peer_issued_at: SystemTime,
    pub target_port: u16,
    /// Cancelling it closes the connection.
    pub close: CancellationToken,
}

/// Removes a connection from the live table when it ends.
pub struct LiveGuard<'a> {
    table: &'a DashMap<u64, LiveConnection>,
    key: u64,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.table.remove(&self.key);
    }
}

/// Everything a connection handler needs.
pub struct DataPath {
    pub tls: MeshTls,
    /// The mesh snapshot (discovery and flags); read at every new connection.
    pub mesh: Arc<MeshState>,
    pub authorizer: Authorizer,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Where inbound connections reach the local app.
    pub delivery: Delivery,
    /// Destinations that are the proxy itself; refused.
    pub proxy_ports: ProxyPorts,
    /// Throttles the log of refused connections to the proxy's own ports.
    proxy_port_log: Mutex<Throttled>,
    /// Active connections per service endpoint, for load balancing.
    pub endpoints: Arc<ActiveConnections>,
    /// Open mTLS connections, both directions, by a local sequence number.
    pub live_connections: DashMap<u64, LiveConnection>,
    next_connection: AtomicU64,
    /// `--max-connections`, shared by every data-path listener.
    cap: Cap,
    /// Fires when draining is over: open connections are closed.
    pub close_connections: CancellationToken,
    /// With `--hbone`, the pooled tunnels outbound connections to peer proxies ride on.
    pub tunnels: Option<Arc<crate::hbone::Tunnels>>,
    /// Fires when draining starts (the listeners stop accepting): HBONE tunnels then refuse
    /// new streams (GOAWAY) and close once their streams have.
    pub draining: CancellationToken,
    /// Copy buffers, lent to connections only while their bytes move.
    pub buffers: copy::BufferPool,
}

impl DataPath {
    pub fn new(
        tls: MeshTls,
        mesh: Arc<MeshState>,
        authorizer: Authorizer,
        metrics: Arc<Metrics>,
        limits: Limits,
        delivery: Delivery,
        proxy_ports: ProxyPorts,
    ) -> Self {
        let data_path = Self {
            tls,
            mesh,
            authorizer,
            metrics,
            limits,
            delivery,
            proxy_ports,
            proxy_port_log: Mutex::new(Throttled::default()),
            endpoints: Arc::new(ActiveConnections::default()),
            live_connections: DashMap::new(),
            next_connection: AtomicU64::new(0),
            cap: Cap::new(limits.max_connections),
            close_connections: CancellationToken::new(),
            tunnels: None,
            draining: CancellationToken::new(),
            buffers: copy::BufferPool::default(),
        };
        data_path.check_open_files_limit();
        data_path
    }

    /// Carries outbound connections to peer proxies as HBONE streams over pooled tunnels.
    pub fn with_hbone(mut self, enabled: bool) -> Self {
        self.tunnels = enabled.then(Default::default);
        self
    }

    /// Draining starts when `stop_accepting` fires.
    pub fn with_drain(mut self, stop_accepting: &CancellationToken) -> Self {
        self.draining = stop_accepting.child_token();
        self
    }

    /// `resolve`, after an on-demand lookup of a destination the snapshot does not know
    /// (bounded by the lookup timeout; counted by result). The first connection to a
    /// destination is then routed exactly as the later ones; one whose lookup went unanswered
    /// (timeout, no stream, table full) is refused instead of passed through.
    pub async fn resolve_on_demand(&self, destination: SocketAddr) -> (Route, Option<ActiveGuard>) {
        let Some(result) = self.mesh.wait_for(destination.ip()).await else {
            return self.resolve(destination);
        };
        self.metrics.lookup(result);
        let (route, guard) = self.resolve(destination);
        // Not knowing whether a destination is meshed is not knowing it is outside the mesh:
        // passing it through could send a meshed peer's bytes in clear. Fail closed.
        if matches!(result, "timeout" | "discovery_down" | "table_full")
            && route == Route::Passthrough(destination)
        {
            tracing::warn!(%destination, result, "refusing a connection to a destination discovery has not answered for (lookup {result})");
            return (
                Route::Refused {
                    reason: "discovery_unanswered",
                    why: format!(
                        "{destination}: discovery has not said whether it is in the mesh \
                         (lookup {result}); refused rather than sent in clear"
                    ),
                },
                guard,
            );
        }
        (route, guard)
    }

    /// Where a connection to `destination` goes under the current snapshot; for a service
    /// endpoint, also the guard that counts the connection against it.
    pub fn resolve(&self, destination: SocketAddr) -> (Route, Option<ActiveGuard>) {
        let mut chosen = None;
        let route = self.mesh.load().route(destination, |candidates| {
            let i = self.endpoints.pick(candidates);
            chosen = candidates.get(i).copied();
            i
        });
        (route, chosen.map(|endpoint| self.endpoints.track(endpoint)))
    }

    /// Registers an inbound connection from `peer` for `target_port`, then authorizes it
    /// against the current snapshot. Registering first means a snapshot swapped in meanwhile
    /// is either seen here or re-checked by `reauthorize`. On allow, returns the guard that
    /// unregisters it and the token that closes it.
    pub fn admit(
        &self,
        peer: &SpiffeId,
        peer_issued_at: SystemTime,
        target_port: u16,
    ) -> Result<(LiveGuard<'_>, CancellationToken), Decision> {
        let (guard, close) = self.register(false, peer, peer_issued_at, target_port);
        match self.authorize(peer, peer_issued_at, target_port) {
            Decision::Allow => Ok((guard, close)),
            deny => Err(deny),
        }
    }

    /// Registers an outbound connection to the server `peer` (its SVID issued at
    /// `peer_issued_at`), so that a revocation of that SVID closes it, as `reauthorize` closes
    /// inbound ones. Returns the guard that unregisters it and the token that closes it; `None`
    /// when the SVID was revoked since the handshake (registering first means a revocation
    /// landing meanwhile is either seen here or by `reauthorize`).
    pub fn track_outbound(
        &self,
        peer: &SpiffeId,
        peer_issued_at: SystemTime,
        target_port: u16,
    ) -> Option<(LiveGuard<'_>, CancellationToken)> {
        let registered = self.register(true, peer, peer_issued_at, target_port);
        self.revoked(peer, peer_issued_at)
            .is_none()
            .then_some(registered)
    }

    fn register(
        &self,
        outbound: bool,
        peer: &SpiffeId,
        peer_issued_at: SystemTime,
        target_port: u16,
    ) -> (LiveGuard<'_>, CancellationToken) {
        let key = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let close = self.close_connections.child_token();
        self.live_connections.insert(
            key,
            LiveConnection {
                outbound,
                peer: peer.clone(),
                peer_issued_at,
                target_port,
                close: close.clone(),
            },
        );
        let guard = LiveGuard {
            table: &self.live_connections,
            key,
        };
        (guard, close)
    }

    /// Whether `peer`'s SVID issued at `issued_at` is revoked: when, if so.
    fn revoked(&self, peer: &SpiffeId, issued_at: SystemTime) -> Option<SystemTime> {
        self.tls
            .store()
            .revocations()
            .covers_issued(peer, issued_at)
    }

    /// The policy decision for `peer` (its SVID issued at `issued_at`) on `target_port` under
    /// the current snapshot, after the revocations: a revoked SVID is denied whatever the
    /// policies say.
    fn authorize(&self, peer: &SpiffeId, issued_at: SystemTime, target_port: u16) -> Decision {
        if let Some(revoked_at) = self.revoked(peer, issued_at) {
            return Decision::Deny {
                by: "revocation".into(),
                why: format!(
                    "{peer} was revoked at {}",
                    latch_identity::svid::format_time(revoked_at)
                ),
            };
        }
        self.authorizer
            .authorize(&self.mesh.load(), peer, target_port)
    }

    /// Re-authorizes every open inbound connection under the current snapshot, and checks
    /// every outbound one against the revocations; closes the ones no longer allowed and
    /// returns how many.
    pub fn reauthorize(&self) -> usize {
        let mut closed = 0;
        for entry in self.live_connections.iter() {
            let conn = entry.value();
            if conn.close.is_cancelled() {
                continue;
            }
            let decision = if conn.outbound {
                match self.revoked(&conn.peer, conn.peer_issued_at) {
                    Some(revoked_at) => Decision::Deny {
                        by: "revocation".into(),
                        why: format!(
                            "the server {} was revoked at {}",
                            conn.peer,
                            latch_identity::svid::format_time(revoked_at)
                        ),
                    },
                    None => Decision::Allow,
                }
            } else {
                self.authorize(&conn.peer, conn.peer_issued_at, conn.target_port)
            };
            if let Decision::Deny { by, why } = decision {
                conn.close.cancel();
                closed += 1;
                self.metrics.connections_closed_by_policy.inc();
                tracing::warn!(
                    peer = %conn.peer,
                    port = conn.target_port,
                    policy = %by,
                    "closing an open connection no longer allowed: {why}"
                );
            }
        }
        closed
    }

    /// Re-authorizes open connections after every mesh change, until `cancel`. Subscribes
    /// before returning the future, so no change published after this call is missed.
    pub fn watch_mesh(
        self: Arc<Self>,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut changes = self.mesh.subscribe();
        async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
                self.reauthorize();
            }
        }
    }

    /// Refuses a connection whose target is the proxy itself: counted as
    /// `latch_proxy_tcp_connections_refused_total{direction,reason="proxy_port"}` and logged
    /// with the peer (at most once a second, with the count since the last line).
    pub fn refuse_proxy_port(
        &self,
        direction: &'static str,
        remote: SocketAddr,
        peer: &str,
        target: SocketAddr,
    ) {
        self.metrics.refused(direction, "proxy_port");
        let count = match self.proxy_port_log.lock() {
            Ok(mut log) => log.note(),
            Err(_) => Some(1),
        };
        if let Some(count) = count {
            tracing::warn!(
                direction,
                %remote,
                peer,
                %target,
                refused = count,
                "refused a connection to the proxy's own port {}: the proxy's listeners \
                 (latch_mesh::ports, --admin, --inbound, capture and --outbound listeners) are \
                 never a target",
                target.port()
            );
        }
    }

    /// TCP_NODELAY and keepalive on a proxied socket.
    pub fn tune(&self, stream: &TcpStream) {
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.limits.keepalive)
            .with_interval(self.limits.keepalive / 4);
        let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
    }

    /// Connects to `addr` within the connect timeout, with keepalive: a peer proxy or a
    /// destination on another host.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let stream = self.connect_within_timeout(addr).await?;
        self.tune(&stream);
        Ok(stream)
    }

    /// Connects to this workload's app at `addr`: TCP_NODELAY only when the app is on this host
    /// (keepalive probes to a local socket are answered by this host's kernel and would detect
    /// nothing), with keepalive too when `--app-host` puts it elsewhere.
    pub async fn connect_app(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let stream = self.connect_within_timeout(addr).await?;
        match self.delivery.app_host {
            Some(host) if !host.is_loopback() => self.tune(&stream),
            _ => {
                let _ = stream.set_nodelay(true);
            }
        }
        Ok(stream)
    }

    async fn connect_within_timeout(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let stream = tokio::time::timeout(self.limits.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {addr} timed out after {:?}",
                        self.limits.connect_timeout
                    ),
                )
            })??;
        Ok(stream)
    }

    /// Copies between the two ends with bookkeeping: opened/closed/active and bytes by
    /// direction and peer. `local` is the side facing this proxy's app. `close` ends the copy
    /// early (drain, or a policy change).
    pub async fn proxy<L, R>(
        &self,
        direction: &'static str,
        peer: String,
        local: L,
        remote: R,
        close: &CancellationToken,
    ) where
        L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
        R: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
    {
        let labels = ConnLabels { direction, peer };
        let m = &self.metrics;
        m.connections_opened.get_or_create(&labels).inc();
        m.connections_active.get_or_create(&labels).inc();
        let end = copy::bidirectional(
            local,
            remote,
            self.limits.idle_timeout,
            self.limits.half_closed_timeout,
            close,
            &self.buffers,
        )
        .await;
        let moved = match &end {
            CopyEnd::Done(t)
            | CopyEnd::Idle(t)
            | CopyEnd::HalfClosedStalled(t)
            | CopyEnd::Cancelled(t)
            | CopyEnd::Failed(_, t) => *t,
        };
        m.bytes_sent.get_or_create(&labels).inc_by(moved.forward);
        m.bytes_received
            .get_or_create(&labels)
            .inc_by(moved.backward);
        m.connections_active.get_or_create(&labels).dec();
        m.connections_closed.get_or_create(&labels).inc();
        match end {
            CopyEnd::Idle(_) => {
                tracing::debug!(direction, peer = %labels.peer, "closed idle connection")
            }
            CopyEnd::HalfClosedStalled(_) => tracing::debug!(
                direction,
                peer = %labels.peer,
                "closed a half-closed connection whose other direction stalled"
            ),
            CopyEnd::Failed(e, _) => {
                tracing::debug!(direction, peer = %labels.peer, "connection ended: {e}")
            }
            _ => {}
        }
    }

    /// The policy of every data-path listener: one `--max-connections` cap for all of them
    /// (over it, a connection is closed at once, counted as
    /// `latch_proxy_tcp_connections_refused_total{reason="connection_limit"}` and logged at most
    /// once a second), `--handshake-timeout` for the TLS handshake where there is one, TCP
    /// keepalive. The transport header and idle deadlines are the handlers' (`Limits`).
    pub fn policy(&self, name: &'static str) -> ListenerPolicy {
        ListenerPolicy {
            name,
            cap: self.cap.clone(),
            at_cap: AtCap::Refuse,
            per_source: None,
            cap_flag: Some("--max-connections"),
            handshake_timeout: Some(self.limits.handshake_timeout),
            request_header_timeout: None,
            keepalive: Some(self.limits.keepalive),
        }
    }

    /// Serves `listener` with the data-path policy until `drain.stop_accepting` fires: after
    /// `handshake`, `handle` runs for each connection on `drain.connections`. A failed accept
    /// (e.g. out of file descriptors) is counted (`latch_proxy_tcp_accept_errors_total`),
    /// logged at most once a second and retried after a pause.
    pub fn serve<H, F, Fut>(
        self: &Arc<Self>,
        name: &'static str,
        listener: TcpListener,
        drain: &Drain,
        handshake: H,
        handle: F,
    ) where
        H: Handshake<TcpStream>,
        F: Fn(Arc<DataPath>, H::Stream, SocketAddr, Slot) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let data_path = self.clone();
        latch_admin::serve::serve(
            listener,
            self.policy(name),
            drain,
            self.metrics.clone(),
            handshake,
            move |conn| handle(data_path.clone(), conn.stream, conn.remote, conn.slot),
        );
    }

    /// Warns at start when the open-file limit cannot hold `--max-connections` proxied
    /// connections (two descriptors each, plus the listeners and the control plane's).
    fn check_open_files_limit(&self) {
        let needed = self.limits.max_connections as u64 * 2 + FD_RESERVE;
        match latch_admin::serve::open_files_limit() {
            Some(limit) if limit < needed => tracing::warn!(
                limit,
                needed,
                "the open-file limit (RLIMIT_NOFILE {limit}) is below what --max-connections {} \
                 needs ({needed}: two per connection plus {FD_RESERVE}); beyond about {} \
                 connections accepts fail with \"too many open files\" (counted in \
                 latch_proxy_tcp_accept_errors_total{{reason=\"fd_limit\"}}). Raise the limit or \
                 lower --max-connections",
                self.limits.max_connections,
                limit.saturating_sub(FD_RESERVE) / 2,
            ),
            Some(limit) => tracing::debug!(limit, needed, "open-file limit"),
            None => {}
        }
    }
}

/// Raises this process's soft open-file limit (RLIMIT_NOFILE) to its hard limit, as servers
/// that hold many sockets do: the soft limit is often 1024 while the hard one allows far more.
/// Called once at the binary's start, before `DataPath::new` checks the limit against
/// `--max-connections`. Logs the raise at info; a refusal is logged and otherwise ignored.
pub fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is unlimited: nothing to raise, or no finite hard limit to raise to.
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        return;
    };
    if soft >= hard {
        return;
    }
    let raised = Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(
            from = soft,
            to = hard,
            "raised the soft open-file limit (RLIMIT_NOFILE) from {soft} to the hard limit {hard}"
        ),
        Err(e) => tracing::warn!(
            soft,
            hard,
            "could not raise the soft open-file limit (RLIMIT_NOFILE {soft}) to the hard limit \
             {hard}: {e}"
        ),
    }
}

/// Descriptors the proxy holds besides its proxied connections (listeners, admin, control
/// plane, logs), with room to spare.
const FD_RESERVE: u64 = 64;

/// The refusal reason for a failed connect: "fd_limit" when this process ran out of file
/// descriptors (not the destination's fault), else `otherwise`.
pub fn connect_failure_reason(e: &std::io::Error, otherwise: &'static str) -> &'static str {
    match io_failure_reason(e) {
        "fd_limit" => "fd_limit",
        _ => otherwise,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Discovered, Held, LocalConfig};
    use latch_identity::TrustDomain;
    use latch_mesh::{Action, Policy, Principal, Rule};

    const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
    const DB: &str = "spiffe://cluster.local/ns/demo/sa/db";

    fn data_path() -> DataPath {
        let (store, _) = crate::testing::store_with_svid("spiffe://cluster.local/ns/demo/sa/api");
        let td = TrustDomain::new("cluster.local").unwrap();
        DataPath::new(
            MeshTls::new(Arc::new(store), td.clone()).unwrap(),
            Arc::new(MeshState::new(LocalConfig::default())),
            Authorizer::new(td, vec![]),
            Arc::new(Metrics::new()),
            Limits::default(),
            Delivery::default(),
            ProxyPorts::new(&[]),
        )
    }

    fn deny(peer: &str) -> Discovered {
        let mut d = Discovered::default();
        d.policies.insert(
            "demo/deny".into(),
            Held {
                version: "1".into(),
                value: Policy {
                    name: "deny".into(),
                    namespace: "demo".into(),
                    selector: Default::default(),
                    action: Action::Deny,
                    rules: vec![Rule {
                        principals: vec![Principal::Exact(peer.into())],
                        ..Rule::default()
                    }],
                },
            },
        );
        d
    }

    #[test]
    fn a_policy_change_closes_the_open_connections_it_no_longer_allows() {
        let dp = data_path();
        let (web, db) = (SpiffeId::parse(WEB).unwrap(), SpiffeId::parse(DB).unwrap());
        let (web_guard, web_close) = dp
            .admit(&web, SystemTime::now(), 8080)
            .expect("allowed: mesh peer");
        let (_db_guard, db_close) = dp
            .admit(&db, SystemTime::now(), 8080)
            .expect("allowed: mesh peer");
        assert_eq!(dp.live_connections.len(), 2);

        dp.mesh.publish(&deny(WEB));
        assert_eq!(dp.reauthorize(), 1);
        assert!(web_close.is_cancelled(), "web's connection is closed");
        assert!(!db_close.is_cancelled(), "db's connection stays");
        assert_eq!(dp.metrics.connections_closed_by_policy.get(), 1);
        // Already closed connections are not counted again.
        assert_eq!(dp.reauthorize(), 0);
        // New connections from web are refused, naming the policy.
        assert!(matches!(
            dp.admit(&web, SystemTime::now(), 8080),
            Err(Decision::Deny { by, .. }) if by == "demo/deny"
        ));
        drop(web_guard);
        assert_eq!(dp.live_connections.len(), 1, "closed ones leave the table");
    }

    #[tokio::test]
    async fn watch_mesh_reauthorizes_after_every_publish() {
        let dp = Arc::new(data_path());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(dp.clone().watch_mesh(cancel.clone()));
        let web = SpiffeId::parse(WEB).unwrap();
        let (_guard, close) = dp.admit(&web, SystemTime::now(), 8080).unwrap();
        dp.mesh.publish(&deny(WEB));
        tokio::time::timeout(Duration::from_secs(5), close.cancelled())
            .await
            .expect("closed after the publish");
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn inbound_goes_to_the_workload_address_unless_asked_otherwise() {
        let pod: IpAddr = "10.0.0.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        let v6: IpAddr = "fd00::7".parse().unwrap();
        let table: [(Delivery, IpAddr, u16, &str); 6] = [
            (Delivery::default(), pod, 80, "10.0.0.7:80"),
            (Delivery::default(), mapped, 80, "10.0.0.7:80"),
            (
                Delivery::default(),
                "127.0.0.1".parse().unwrap(),
                80,
                "127.0.0.1:80",
            ),
            (
                Delivery {
                    loopback_ports: vec![8080],
                    ..Delivery::default()
                },
                pod,
                8080,
                "127.0.0.1:8080",
            ),
            (
                Delivery {
                    loopback_ports: vec![8080],
                    ..Delivery::default()
                },
                v6,
                8080,
                "[::1]:8080",
            ),
            (
                Delivery {
                    app_host: Some("10.0.0.9".parse().unwrap()),
                    loopback_ports: vec![],
                },
                pod,
                80,
                "10.0.0.9:80",
            ),
        ];
        for (i, (delivery, workload, port, expected)) in table.into_iter().enumerate() {
            assert_eq!(
                delivery.app_address(workload, port),
                expected.parse().unwrap(),
                "case {i}"
            );
        }
    }

    #[test]
    fn the_proxy_s_own_ports_and_listeners_are_recognised() {
        let own = ProxyPorts::new(&[
            "127.0.0.1:25020".parse().unwrap(),
            "0.0.0.0:25008".parse().unwrap(),
            "127.0.0.1:18080".parse().unwrap(),
        ]);
        for port in [15001, 15006, 15008, 15020, 25020, 25008, 18080] {
            assert!(own.is_proxy_port(port), "{port}");
        }
        assert!(!own.is_proxy_port(80));
        let pod: IpAddr = "10.0.0.7".parse().unwrap();
        let local = [pod];
        for (destination, expected) in [
            ("10.0.0.7:15006", true),
            ("127.0.0.1:15001", true),
            ("10.0.0.7:25008", true),
            ("10.0.0.8:25008", false), // another pod's proxy
            ("127.0.0.1:18080", true),
            ("10.0.0.7:18080", true),
            ("10.0.0.8:15008", false), // another pod's proxy
            ("10.0.0.8:18080", false),
            ("10.0.0.7:80", false),
        ] {
            assert_eq!(
                own.is_own(destination.parse().unwrap(), &local),
                expected,
                "{destination}"
            );
        }
    }

    #[test]
    fn connect_failures_name_the_fd_limit() {
        let emfile = std::io::Error::from_raw_os_error(24);
        assert_eq!(
            connect_failure_reason(&emfile, "peer_unreachable"),
            "fd_limit"
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            connect_failure_reason(&refused, "peer_unreachable"),
            "peer_unreachable"
        );
    }

    #[test]
    fn service_connections_count_against_the_chosen_endpoint() {
        let dp = data_path();
        let mut d = Discovered::default();
        d.services.insert(
            "demo/api".into(),
            Held {
                version: "1".into(),
                value: latch_mesh::Service {
                    name: "api".into(),
                    namespace: "demo".into(),
                    vips: vec!["10.96.0.1".parse().unwrap()],
                    hostnames: Vec::new(),
                    ports: vec![latch_mesh::ServicePort {
                        port: 80,
                        target_port: 8080,
                        name: "http".into(),
                    }],
                    endpoints: vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
                },
            },
        );
        dp.mesh.publish(&d);
        let (first, g1) = dp.resolve("10.96.0.1:80".parse().unwrap());
        let (second, g2) = dp.resolve("10.96.0.1:80".parse().unwrap());
        assert!(g1.is_some() && g2.is_some());
        assert_ne!(
            first, second,
            "the idle endpoint wins the second connection"
        );
        drop((g1, g2));
        assert_eq!(dp.endpoints.active(&"10.0.0.1:8080".parse().unwrap()), 0);
        let (_, none) = dp.resolve("10.9.9.9:80".parse().unwrap());
        assert!(none.is_none(), "only service endpoints are counted");
    }
}
