//! The gRPC listener's front door: states its policy (connection cap, handshake deadline) for
//! the shared serve loop (`latch_admin::serve`), which accepts and completes TLS handshakes off
//! the loop, and hands finished connections to tonic. Each connection carries its peer's
//! certificate chain, which handlers read from the request extensions as `PeerConn`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use latch_admin::serve::{AtCap, Drain, ListenerPolicy, NoMetrics, Slot, Tls};
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

/// Limits for the TLS front door.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    pub handshake_timeout: Duration,
    pub max_connections: usize,
}

impl AcceptLimits {
    /// The gRPC listener's policy: `--max-connections` TLS connections (more wait in the
    /// kernel's listen queue), each handshake within `handshake_timeout`. Per-connection request
    /// limits and the request deadline are tonic's (`ControlPlane::start`).
    pub fn policy(&self) -> ListenerPolicy {
        ListenerPolicy {
            cap_flag: Some("--max-connections"),
            handshake_timeout: Some(self.handshake_timeout),
            ..ListenerPolicy::new("grpc", self.max_connections, AtCap::Wait)
        }
    }
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 4096,
        }
    }
}

/// What a handler knows about the connection a request came in on.
#[derive(Debug, Clone)]
pub struct PeerConn {
    pub remote: SocketAddr,
    /// The client's certificate chain, leaf first, if it presented one. Only proof of key
    /// possession was checked at the handshake; handlers validate the chain themselves.
    pub certs: Option<Arc<[CertificateDer<'static>]>>,
}

/// A TLS connection ready for tonic. Holds a connection-cap permit until dropped.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerConn,
    _slot: Slot,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerConn;
    fn connect_info(&self) -> PeerConn {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Runs the accept loop on `listener` until `cancel` fires; returns the stream of finished
/// TLS connections for `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: AcceptLimits,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    latch_admin::serve::serve(
        listener,
        limits.policy(),
        &Drain::immediate(tracker, &cancel),
        Arc::new(NoMetrics),
        Tls(TlsAcceptor::from(config)),
        move |conn| {
            let tx = tx.clone();
            async move {
                let certs = conn
                    .stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
                let conn = TlsConn {
                    stream: conn.stream,
                    peer: PeerConn {
                        remote: conn.remote,
                        certs,
                    },
                    _slot: conn.slot,
                };
                let _ = tx.send(Ok(conn)).await;
            }
        },
    );
    ReceiverStream::new(rx)
}
