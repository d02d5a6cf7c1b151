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
//!
//! Built on the `h2` crate directly rather than on hyper: a stream is opened from the
//! application connection's own task and carried by it (`H2Io`), one task per tunnel drives the
//! frames, and nothing else is spawned or allocated per stream beyond h2's stream state.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use latch_identity::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

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
/// DATA frames of up to 64 KiB, the copy buffer's size: a receiver reassembles each frame in a
/// buffer of its own, and 256 KiB ones went to the allocator as fresh mappings (page faults on
/// every frame: `cargo xtask bench mesh`, one iperf3 stream at 3.3 s of CPU per GB).
const MAX_FRAME: u32 = 64 << 10;
/// Bytes a stream may queue for sending before its writer waits.
const SEND_BUFFER: usize = 1 << 20;
/// Request headers a peer may send: a CONNECT needs a few dozen bytes.
const MAX_HEADER_LIST: u32 = 16 << 10;

const DIRECTION_IN: &str = "inbound";
const DIRECTION_OUT: &str = "outbound";

fn answer(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

/// Serves HBONE on an accepted mTLS connection from `peer` (ALPN `h2`): one CONNECT stream per
/// application connection, each handled by a task of its own, until the peer closes the tunnel
/// or the proxy drains. This task drives the connection: it reads and writes every frame.
pub async fn serve(
    dp: Arc<DataPath>,
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SpiffeId,
    peer_issued_at: SystemTime,
    workload: IpAddr,
    remote: SocketAddr,
) {
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS as u32)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(SEND_BUFFER)
        .handshake::<_, Bytes>(tls);
    let mut connection = match tokio::time::timeout(dp.limits.header_timeout, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            dp.metrics.refused(DIRECTION_IN, "h2");
            tracing::info!(%remote, peer = %peer, "HTTP/2 handshake on an HBONE tunnel failed: {e}");
            return;
        }
        Err(_) => {
            dp.metrics.refused(DIRECTION_IN, "header_timeout");
            tracing::info!(%remote, peer = %peer, "no HTTP/2 preface on an HBONE tunnel in time");
            return;
        }
    };
    let _open = dp.metrics.tunnel_open(DIRECTION_IN, peer.as_str());
    let (draining, closing) = (dp.draining.clone(), dp.close_connections.clone());
    let mut shutting_down = false;
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = draining.cancelled(), if !shutting_down => {
                // GOAWAY: the peer opens no new stream here; the open ones finish, or are
                // closed when the drain times out.
                connection.graceful_shutdown();
                shutting_down = true;
                continue;
            }
            // The end of a drain, or the proxy stopping: the tunnel closes with its streams.
            () = closing.cancelled() => return,
        };
        match next {
            Some(Ok((request, respond))) => {
                tokio::spawn(stream(
                    dp.clone(),
                    request,
                    respond,
                    peer.clone(),
                    peer_issued_at,
                    workload,
                    remote,
                ));
            }
            Some(Err(e)) => {
                tracing::debug!(%remote, "HBONE tunnel ended: {e}");
                return;
            }
            None => return,
        }
    }
}

/// One CONNECT stream: checked, authorized and connected to the app, answered 200 only once the
/// app has accepted the connection, then carried until either side ends.
async fn stream(
    dp: Arc<DataPath>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SpiffeId,
    peer_issued_at: SystemTime,
    workload: IpAddr,
    remote: SocketAddr,
) {
    let mut refuse = |status: StatusCode| {
        let _ = respond.send_response(answer(status), true);
    };
    if request.method() != Method::CONNECT {
        dp.metrics.refused(DIRECTION_IN, "hbone_not_connect");
        refuse(StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        dp.metrics.refused(DIRECTION_IN, "hbone_bad_authority");
        refuse(StatusCode::BAD_REQUEST);
        return;
    };
    // The peer meant this workload, at the address it connected to: the proxy is no relay.
    if target.ip().to_canonical() != workload {
        dp.metrics.refused(DIRECTION_IN, "not_local_destination");
        tracing::info!(%remote, peer = %peer, %target, "refused an HBONE stream to an address that is not this workload's");
        refuse(StatusCode::FORBIDDEN);
        return;
    }
    if dp.proxy_ports.is_proxy_port(target.port()) {
        dp.refuse_proxy_port(DIRECTION_IN, remote, peer.as_str(), target);
        refuse(StatusCode::FORBIDDEN);
        return;
    }
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
            refuse(StatusCode::FORBIDDEN);
            return;
        }
    };
    let app = dp.delivery.app_address(workload, target.port());
    let upstream = match dp.connect_app(app).await {
        Ok(upstream) => upstream,
        Err(e) => {
            dp.metrics
                .refused(DIRECTION_IN, connect_failure_reason(&e, "app_unreachable"));
            tracing::warn!(peer = %peer, %app, "cannot reach the local app: {e}");
            refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let send = match respond.send_response(answer(StatusCode::OK), false) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(peer = %peer, "HBONE stream ended before it was established: {e}");
            return;
        }
    };
    tracing::debug!(peer = %peer, %app, "inbound HBONE stream");
    let tunnel = H2Io::new(send, request.into_body());
    dp.proxy(DIRECTION_IN, peer.to_string(), upstream, tunnel, &close)
        .await;
}

/// One HBONE stream as a byte stream: reads take the peer's DATA frames (their flow-control
/// window is given back as the bytes are read, so a peer can have at most a window in flight
/// that nobody reads), writes wait for window and send DATA, shutdown sends END_STREAM. Dropped
/// before both ends finished, h2 resets the stream (RST_STREAM CANCEL): a reset crosses.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not read yet.
    unread: Bytes,
    ended: bool,
}

impl H2Io {
    fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            ended: false,
        }
    }
}

fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::CANCEL) | Some(h2::Reason::NO_ERROR) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => this.unread = chunk,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread.split_to(n));
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let send = &mut this.send;
        send.reserve_capacity(buf.len());
        loop {
            let window = send.capacity();
            if window > 0 {
                let n = window.min(buf.len());
                let chunk = Bytes::copy_from_slice(&buf[..n]);
                return Poll::Ready(send.send_data(chunk, false).map(|()| n).map_err(io_error));
            }
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the HBONE stream was closed",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The tunnel's connection task writes queued frames as soon as it can.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// What a pooled tunnel is keyed by: identity is never mixed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// This proxy's SVID serial: after a rotation, new tunnels.
    local_serial: String,
    peer: SpiffeId,
    mesh_addr: SocketAddr,
}

/// One mTLS connection to a peer proxy, speaking HTTP/2. A task of its own drives it.
struct Tunnel {
    sender: h2::client::SendRequest<Bytes>,
    /// Set when the connection ended, or a stream could not be opened on it (GOAWAY): no new
    /// stream rides it.
    closed: Arc<AtomicBool>,
    /// When the peer's SVID was issued (for revocations).
    peer_issued_at: SystemTime,
    /// When it expires: no new stream rides a tunnel whose peer's certificate has expired.
    peer_not_after: SystemTime,
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Tunnel {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn usable(&self, now: SystemTime) -> bool {
        !self.is_closed()
            && self.streams.load(Ordering::Acquire) < MAX_STREAMS
            && now < self.peer_not_after
    }

    /// Sends a CONNECT for `target` and waits for the peer's answer.
    async fn connect(
        &self,
        target: SocketAddr,
    ) -> Result<(Response<RecvStream>, SendStream<Bytes>), h2::Error> {
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = hyper::Uri::builder()
            .authority(target.to_string())
            .build()
            .expect("an ip:port is a valid authority");
        let mut sender = self.sender.clone().ready().await?;
        let (response, send) = sender.send_request(request, false)?;
        Ok((response.await?, send))
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
    pub io: H2Io,
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
        tunnels.retain(|t| !t.is_closed());
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
    /// through a tunnel to the peer at `mesh_addr` presenting exactly `peer`. The CONNECT is
    /// sent from the caller's task: no hop through another task on the way.
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
        // The peer's answer comes once it has connected to its app: within its connect timeout.
        let deadline = dp.limits.handshake_timeout + dp.limits.connect_timeout;
        // A pooled tunnel may have been closed by the peer meanwhile (idle, GOAWAY on its
        // drain): then once more on a new one.
        let pooled = match self.take(&key) {
            Some(guard) => match tokio::time::timeout(deadline, guard.0.connect(target)).await {
                Ok(Ok(answered)) => Some((guard, answered)),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, %mesh_addr, "pooled HBONE tunnel failed ({e}); opening another");
                    guard.0.closed.store(true, Ordering::Release);
                    None
                }
                Err(_) => {
                    dp.metrics.refused(DIRECTION_OUT, "hbone_timeout");
                    tracing::warn!(peer = %peer, %target, "the peer proxy did not answer an HBONE CONNECT in {deadline:?}");
                    return Err(());
                }
            },
            None => None,
        };
        let (guard, (response, send)) = match pooled {
            Some(answered) => answered,
            None => {
                let guard = self.open_tunnel(dp, key).await?;
                match tokio::time::timeout(deadline, guard.0.connect(target)).await {
                    Ok(Ok(answered)) => (guard, answered),
                    Ok(Err(e)) => {
                        dp.metrics.refused(DIRECTION_OUT, "hbone_stream");
                        tracing::warn!(peer = %peer, %mesh_addr, "HBONE CONNECT failed: {e}");
                        return Err(());
                    }
                    Err(_) => {
                        dp.metrics.refused(DIRECTION_OUT, "hbone_timeout");
                        tracing::warn!(peer = %peer, %target, "the peer proxy did not answer an HBONE CONNECT in {deadline:?}");
                        return Err(());
                    }
                }
            }
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
        Ok(Stream {
            io: H2Io::new(send, response.into_body()),
            peer_issued_at: guard.0.peer_issued_at,
            guard,
        })
    }

    /// Opens a tunnel (a full handshake requiring exactly `key.peer`), adds it to the pool and
    /// takes one stream on it. A task drives the connection; another closes it once it has
    /// been idle for `IDLE`.
    async fn open_tunnel(self: &Arc<Self>, dp: &DataPath, key: Key) -> Result<StreamGuard, ()> {
        let tls = crate::outbound::connect_tunnel(dp, key.mesh_addr, &key.peer).await?;
        let Some(server) = latch_identity::verifier::peer_svid(tls.get_ref().1.peer_certificates())
        else {
            dp.metrics.handshake_failed(DIRECTION_OUT, "bad_cert");
            return Err(());
        };
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .max_concurrent_reset_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Bytes>(tls);
        let (sender, connection) = match tokio::time::timeout(
            dp.limits.handshake_timeout,
            handshake,
        )
        .await
        {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                dp.metrics.handshake_failed(DIRECTION_OUT, "h2");
                tracing::warn!(peer = %key.peer, mesh_addr = %key.mesh_addr, "HTTP/2 handshake with the peer proxy failed: {e}");
                return Err(());
            }
            Err(_) => {
                dp.metrics.handshake_failed(DIRECTION_OUT, "timeout");
                tracing::warn!(peer = %key.peer, mesh_addr = %key.mesh_addr, "HTTP/2 handshake with the peer proxy timed out");
                return Err(());
            }
        };
        let closed = Arc::new(AtomicBool::new(false));
        let (peer, mesh_addr, ended) = (key.peer.clone(), key.mesh_addr, closed.clone());
        let open = dp.metrics.tunnel_open(DIRECTION_OUT, peer.as_str());
        // Ends when the peer closes, or once the pool and every stream have let go of it.
        tokio::spawn(async move {
            let _open = open;
            if let Err(e) = connection.await {
                tracing::debug!(peer = %peer, %mesh_addr, "HBONE tunnel ended: {e}");
            }
            ended.store(true, Ordering::Release);
        });
        let tunnel = Arc::new(Tunnel {
            sender,
            closed,
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
            if idle || held.is_closed() {
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

#[cfg(test)]
pub(crate) fn stream_future_size() -> usize {
    fn size<A, F: std::future::Future>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    size(
        |(dp, rq, rs, p, t, w, r): (
            Arc<DataPath>,
            Request<RecvStream>,
            SendResponse<Bytes>,
            SpiffeId,
            SystemTime,
            IpAddr,
            SocketAddr,
        )| stream(dp, rq, rs, p, t, w, r),
    )
}
