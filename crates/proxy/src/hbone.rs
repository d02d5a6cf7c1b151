//! HBONE: application connections carried as HTTP/2 CONNECT streams over pooled mTLS
//! connections between proxies, as Istio's ambient mesh defines it (ALPN `h2` on the mTLS port,
//! one CONNECT per application connection, `:authority` = the destination `ip:port`). One TLS
//! handshake then serves many connections: a new connection to a peer costs a stream, not a
//! handshake, and an idle one a stream's state, not a TLS session.
//!
//! Server side (`serve`): every stream is checked as a `latch/1` connection is (the destination
//! must be this workload and not the proxy, the peer's ID authorized for the port, re-checked
//! while the stream is open) and answered 200 only once the app has accepted the connection;
//! then bytes are copied as for any connection, so metrics, draining and closing on a policy
//! change or a revocation work per stream.
//!
//! Client side (`Tunnels`): tunnels are pooled by (this proxy's SVID serial, the peer's expected
//! SPIFFE ID, the peer's address), so identities are never mixed and a rotated SVID opens new
//! tunnels while the old ones drain. A tunnel carries at most `MAX_STREAMS` streams; one with no
//! stream for `IDLE` is closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use latch_identity::SpiffeId;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::authorizer::Decision;
use crate::data_path::{DataPath, connect_failure_reason};

/// ALPN of HBONE: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// Streams one tunnel carries at once (the server's SETTINGS_MAX_CONCURRENT_STREAMS, and where
/// the client opens another tunnel).
pub const MAX_STREAMS: usize = 100;
/// A tunnel without streams for this long is closed.
pub const IDLE: Duration = Duration::from_secs(60);
/// Flow-control windows: a stream may have 4 MiB in flight (one stream can fill a fast link
/// between two proxies), the whole tunnel 16 MiB. Measured with `cargo xtask bench mesh`: with
/// 1 MiB / 4 MiB windows and 16 KiB frames one iperf3 stream ran at 40% of `latch/1`.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// DATA frames of up to 256 KiB: fewer frames, and fewer wake-ups, per byte of bulk data.
const MAX_FRAME: u32 = 256 << 10;

const DIRECTION_IN: &str = "inbound";
const DIRECTION_OUT: &str = "outbound";

type Body = Empty<Bytes>;

fn answer(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::new());
    *response.status_mut() = status;
    response
}

/// Serves HBONE on an accepted mTLS connection from `peer` (ALPN `h2`): one CONNECT stream per
/// application connection, until the peer closes the tunnel or the proxy drains.
pub async fn serve(
    dp: Arc<DataPath>,
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SpiffeId,
    peer_issued_at: SystemTime,
    workload: IpAddr,
    remote: SocketAddr,
) {
    let (draining, closing) = (dp.draining.clone(), dp.close_connections.clone());
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (dp, peer) = (dp.clone(), peer.clone());
        async move {
            Ok::<_, Infallible>(stream(dp, request, peer, peer_issued_at, workload, remote).await)
        }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS as u32)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buf_size(MAX_FRAME as usize * 4)
        .max_header_list_size(16 << 10)
        .serve_connection(TokioIo::new(tls), service);
    let mut connection = std::pin::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = draining.cancelled() => {
            // GOAWAY: the peer opens no new stream here; the open ones finish, or are closed
            // when the drain times out.
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                ended = connection.as_mut() => ended,
                () = closing.cancelled() => Ok(()),
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%remote, "HBONE tunnel ended: {e}");
    }
}

/// One CONNECT stream: checked, authorized and connected to the app by a task of its own that
/// then carries the bytes; the response waits for its verdict.
async fn stream(
    dp: Arc<DataPath>,
    request: Request<Incoming>,
    peer: SpiffeId,
    peer_issued_at: SystemTime,
    workload: IpAddr,
    remote: SocketAddr,
) -> Response<Body> {
    if request.method() != Method::CONNECT {
        dp.metrics.refused(DIRECTION_IN, "hbone_not_connect");
        return answer(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        dp.metrics.refused(DIRECTION_IN, "hbone_bad_authority");
        return answer(StatusCode::BAD_REQUEST);
    };
    // The peer meant this workload, at the address it connected to: the proxy is no relay.
    if target.ip().to_canonical() != workload {
        dp.metrics.refused(DIRECTION_IN, "not_local_destination");
        tracing::info!(%remote, peer = %peer, %target, "refused an HBONE stream to an address that is not this workload's");
        return answer(StatusCode::FORBIDDEN);
    }
    if dp.proxy_ports.is_proxy_port(target.port()) {
        dp.refuse_proxy_port(DIRECTION_IN, remote, peer.as_str(), target);
        return answer(StatusCode::FORBIDDEN);
    }
    let (verdict, decided) = oneshot::channel();
    tokio::spawn(carry(
        dp,
        request,
        peer,
        peer_issued_at,
        SocketAddr::new(workload, target.port()),
        verdict,
    ));
    decided
        .await
        .unwrap_or_else(|_| answer(StatusCode::INTERNAL_SERVER_ERROR))
}

/// Authorizes and connects one stream, sends the verdict, then copies until either side ends.
async fn carry(
    dp: Arc<DataPath>,
    request: Request<Incoming>,
    peer: SpiffeId,
    peer_issued_at: SystemTime,
    target: SocketAddr,
    verdict: oneshot::Sender<Response<Body>>,
) {
    let (_live, close) = match dp.admit(&peer, peer_issued_at, target.port()) {
        Ok(admitted) => admitted,
        Err(decision) => {
            dp.metrics
                .authorization_denials
                .get_or_create(&crate::metrics::ConnLabels {
                    direction: DIRECTION_IN,
                    peer: peer.to_string(),
                })
                .inc();
            if let Decision::Deny { by, why } = decision {
                tracing::warn!(peer = %peer, port = target.port(), policy = %by, "denied: {why}");
            }
            let _ = verdict.send(answer(StatusCode::FORBIDDEN));
            return;
        }
    };
    let app = dp.delivery.app_address(target.ip(), target.port());
    let upstream = match dp.connect(app).await {
        Ok(upstream) => upstream,
        Err(e) => {
            dp.metrics
                .refused(DIRECTION_IN, connect_failure_reason(&e, "app_unreachable"));
            tracing::warn!(peer = %peer, %app, "cannot reach the local app: {e}");
            let _ = verdict.send(answer(StatusCode::SERVICE_UNAVAILABLE));
            return;
        }
    };
    if verdict.send(answer(StatusCode::OK)).is_err() {
        return;
    }
    let tunnel = match hyper::upgrade::on(request).await {
        Ok(upgraded) => TokioIo::new(upgraded),
        Err(e) => {
            tracing::debug!(peer = %peer, "HBONE stream ended before it was established: {e}");
            return;
        }
    };
    tracing::debug!(peer = %peer, %app, "inbound HBONE stream");
    dp.proxy(DIRECTION_IN, peer.to_string(), upstream, tunnel, &close)
        .await;
}

/// What a pooled tunnel is keyed by: identity is never mixed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// This proxy's SVID serial: after a rotation, new tunnels.
    local_serial: String,
    peer: SpiffeId,
    mesh_addr: SocketAddr,
}

/// One mTLS connection to a peer proxy, speaking HTTP/2.
struct Tunnel {
    sender: hyper::client::conn::http2::SendRequest<Body>,
    /// When the peer's SVID was issued (for revocations).
    peer_issued_at: SystemTime,
    /// When it expires: no new stream rides a tunnel whose peer's certificate has expired.
    peer_not_after: SystemTime,
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Tunnel {
    fn usable(&self, now: SystemTime) -> bool {
        !self.sender.is_closed()
            && self.streams.load(Ordering::Acquire) < MAX_STREAMS
            && now < self.peer_not_after
    }
}

/// A stream's hold on its tunnel: counted while it lives.
pub struct StreamGuard(Arc<Tunnel>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// An established stream to a peer: the bytes, when the peer's SVID was issued, and the guard.
pub struct Stream {
    pub io: TokioIo<hyper::upgrade::Upgraded>,
    pub peer_issued_at: SystemTime,
    pub guard: StreamGuard,
}

/// The outbound tunnel pool.
#[derive(Default)]
pub struct Tunnels {
    pools: Mutex<HashMap<Key, Vec<Arc<Tunnel>>>>,
}

impl Tunnels {
    /// A tunnel of `key` with room for one more stream, counted as taken.
    fn take(&self, key: &Key) -> Option<StreamGuard> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let tunnels = pools.get_mut(key)?;
        tunnels.retain(|t| !t.sender.is_closed());
        let now = SystemTime::now();
        let tunnel = tunnels
            .iter()
            .filter(|t| t.usable(now))
            .min_by_key(|t| t.streams.load(Ordering::Acquire))?
            .clone();
        tunnel.streams.fetch_add(1, Ordering::AcqRel);
        Some(StreamGuard(tunnel))
    }

    /// Opens a stream to `target` (the destination `ip:port` the peer proxy delivers to)
    /// through a tunnel to the peer at `mesh_addr` presenting exactly `peer`.
    pub async fn stream(
        self: &Arc<Self>,
        dp: &DataPath,
        mesh_addr: SocketAddr,
        peer: &SpiffeId,
        target: SocketAddr,
    ) -> Result<Stream, ()> {
        let key = Key {
            local_serial: dp
                .tls
                .store()
                .svid()
                .map(|s| s.info().serial.clone())
                .unwrap_or_default(),
            peer: peer.clone(),
            mesh_addr,
        };
        let connect = || {
            Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .body(Body::new())
                .map_err(|_| ())
        };
        // A pooled tunnel may have been closed by the peer meanwhile (idle, GOAWAY on its
        // drain): then once more on a new one.
        let (guard, response) = match self.take(&key) {
            Some(guard) => match guard.0.sender.clone().send_request(connect()?).await {
                Ok(response) => (guard, response),
                Err(e) => {
                    tracing::debug!(peer = %peer, %mesh_addr, "pooled HBONE tunnel failed ({e}); opening another");
                    drop(guard);
                    self.connect_on_new(dp, key, connect()?).await?
                }
            },
            None => self.connect_on_new(dp, key, connect()?).await?,
        };
        if response.status() != StatusCode::OK {
            let reason = match response.status() {
                StatusCode::FORBIDDEN => "peer_refused",
                StatusCode::SERVICE_UNAVAILABLE => "peer_app_unreachable",
                _ => "hbone_status",
            };
            dp.metrics.refused(DIRECTION_OUT, reason);
            tracing::info!(peer = %peer, %target, status = %response.status(), "the peer proxy refused the HBONE stream");
            return Err(());
        }
        let io = match hyper::upgrade::on(response).await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(e) => {
                dp.metrics.refused(DIRECTION_OUT, "hbone_stream");
                tracing::warn!(peer = %peer, "HBONE stream not established: {e}");
                return Err(());
            }
        };
        Ok(Stream {
            io,
            peer_issued_at: guard.0.peer_issued_at,
            guard,
        })
    }

    /// Sends `request` on a new tunnel.
    async fn connect_on_new(
        self: &Arc<Self>,
        dp: &DataPath,
        key: Key,
        request: Request<Body>,
    ) -> Result<(StreamGuard, Response<Incoming>), ()> {
        let (peer, mesh_addr) = (key.peer.clone(), key.mesh_addr);
        let guard = self.open_tunnel(dp, key).await?;
        match guard.0.sender.clone().send_request(request).await {
            Ok(response) => Ok((guard, response)),
            Err(e) => {
                dp.metrics.refused(DIRECTION_OUT, "hbone_stream");
                tracing::warn!(peer = %peer, %mesh_addr, "HBONE CONNECT failed: {e}");
                Err(())
            }
        }
    }

    /// Opens a tunnel (a full handshake requiring exactly `key.peer`), adds it to the pool and
    /// takes one stream on it. A task closes it once it has been idle for `IDLE`.
    async fn open_tunnel(self: &Arc<Self>, dp: &DataPath, key: Key) -> Result<StreamGuard, ()> {
        let tls = crate::outbound::connect_tunnel(dp, key.mesh_addr, &key.peer).await?;
        let Some(server) = latch_identity::verifier::peer_svid(tls.get_ref().1.peer_certificates())
        else {
            dp.metrics.handshake_failed(DIRECTION_OUT, "bad_cert");
            return Err(());
        };
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buf_size(MAX_FRAME as usize * 4)
            .max_concurrent_reset_streams(MAX_STREAMS)
            .keep_alive_interval(dp.limits.keepalive)
            .keep_alive_while_idle(false);
        let (sender, connection) = match builder.handshake(TokioIo::new(tls)).await {
            Ok(pair) => pair,
            Err(e) => {
                dp.metrics.handshake_failed(DIRECTION_OUT, "h2");
                tracing::warn!(peer = %key.peer, mesh_addr = %key.mesh_addr, "HTTP/2 handshake with the peer proxy failed: {e}");
                return Err(());
            }
        };
        let (peer, mesh_addr) = (key.peer.clone(), key.mesh_addr);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(peer = %peer, %mesh_addr, "HBONE tunnel ended: {e}");
            }
        });
        let tunnel = Arc::new(Tunnel {
            sender,
            peer_issued_at: server.issued_at(),
            peer_not_after: server.not_after,
            streams: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
        });
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(tunnel.clone());
        tracing::debug!(peer = %key.peer, mesh_addr = %key.mesh_addr, "opened an HBONE tunnel");
        tokio::spawn(self.clone().close_when_idle(key, Arc::downgrade(&tunnel)));
        Ok(StreamGuard(tunnel))
    }

    /// Removes the tunnel from the pool once it has had no stream for `IDLE` (or has closed);
    /// with the pool's reference gone, the connection closes when its last stream does.
    async fn close_when_idle(self: Arc<Self>, key: Key, tunnel: std::sync::Weak<Tunnel>) {
        loop {
            tokio::time::sleep(IDLE / 4).await;
            let Some(held) = tunnel.upgrade() else { return };
            let idle = held.streams.load(Ordering::Acquire) == 0
                && held
                    .idle_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed()
                    >= IDLE;
            if idle || held.sender.is_closed() {
                let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(tunnels) = pools.get_mut(&key) {
                    tunnels.retain(|t| !Arc::ptr_eq(t, &held));
                    if tunnels.is_empty() {
                        pools.remove(&key);
                    }
                }
                return;
            }
        }
    }
}
