//! The data path's shared context and plumbing: the mesh TLS configs, the mesh snapshot, the
//! authorizer, limits, socket options, the accept loops (with a global connection cap) and the
//! per-connection bookkeeping (metrics, drain). `inbound.rs` and `outbound.rs` hold the
//! handlers.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authorizer::Authorizer;
use crate::copy::{self, CopyEnd};
use crate::metrics::{ConnLabels, Metrics};
use crate::state::MeshSnapshot;
use crate::transport::MeshTls;

/// What the plaintext inbound listener (15006) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundMode {
    /// Refuse plaintext: only mTLS from other proxies reaches the app.
    Strict,
    /// Forward plaintext to the app (migration).
    Permissive,
}

/// Timeouts and caps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
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
            max_connections: 10_000,
            keepalive: Duration::from_secs(60),
        }
    }
}

/// Everything a connection handler needs.
pub struct DataPath {
    pub tls: MeshTls,
    pub snapshot: ArcSwap<MeshSnapshot>,
    pub authorizer: Arc<dyn Authorizer>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Where inbound connections reach the local app.
    pub app_host: IpAddr,
    pub inbound_mode: InboundMode,
    slots: Arc<Semaphore>,
    /// Fires when draining is over: open connections are closed.
    pub close_connections: CancellationToken,
}

impl DataPath {
    pub fn new(
        tls: MeshTls,
        snapshot: MeshSnapshot,
        authorizer: Arc<dyn Authorizer>,
        metrics: Arc<Metrics>,
        limits: Limits,
        app_host: IpAddr,
        inbound_mode: InboundMode,
    ) -> Self {
        Self {
            tls,
            snapshot: ArcSwap::from_pointee(snapshot),
            authorizer,
            metrics,
            limits,
            app_host,
            inbound_mode,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            close_connections: CancellationToken::new(),
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

    /// Connects to `addr` within the connect timeout.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
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
        self.tune(&stream);
        Ok(stream)
    }

    /// Copies between the two ends with bookkeeping: opened/closed/active and bytes by
    /// direction and peer. `local` is the side facing this proxy's app.
    pub async fn proxy<L, R>(&self, direction: &'static str, peer: String, local: L, remote: R)
    where
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
            &self.close_connections,
        )
        .await;
        let moved = match &end {
            CopyEnd::Done(t) | CopyEnd::Idle(t) | CopyEnd::Cancelled(t) | CopyEnd::Failed(_, t) => {
                *t
            }
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
            CopyEnd::Failed(e, _) => {
                tracing::debug!(direction, peer = %labels.peer, "connection ended: {e}")
            }
            _ => {}
        }
    }

    /// Accepts on `listener` until `stop_accepting` fires, running `handle` for each connection
    /// on `connections`. Over the connection cap, a connection is closed at once and counted.
    pub fn serve<F, Fut>(
        self: &Arc<Self>,
        name: &'static str,
        listener: TcpListener,
        tracker: &TaskTracker,
        connections: &TaskTracker,
        stop_accepting: CancellationToken,
        handle: F,
    ) where
        F: Fn(Arc<DataPath>, TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut
            + Send
            + Sync
            + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let data_path = self.clone();
        let connections = connections.clone();
        tracker.spawn(async move {
            loop {
                let (stream, remote) = tokio::select! {
                    _ = stop_accepting.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(listener = name, "accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let Ok(permit) = data_path.slots.clone().try_acquire_owned() else {
                    data_path.metrics.refused(name, "connection_limit");
                    tracing::warn!(
                        listener = name,
                        %remote,
                        limit = data_path.limits.max_connections,
                        "connection limit reached; refusing"
                    );
                    continue;
                };
                data_path.tune(&stream);
                connections.spawn(handle(data_path.clone(), stream, remote, permit));
            }
        });
    }
}
