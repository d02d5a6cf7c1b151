//! Inbound: the mTLS listener (15008) that other proxies connect to, and the plaintext capture
//! listener (15006). mTLS: handshake (client SVID of the trust domain required) -> ALPN check ->
//! transport header -> refuse the proxy's own ports -> authorize the peer's SPIFFE ID (and keep
//! re-checking it while the connection is open) -> connect to the app on the workload's own
//! address (the one the peer connected to) -> copy. Plaintext: the original destination must be
//! this workload and not the proxy; then the snapshot's mTLS mode for its port decides.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use latch_admin::serve::{Handshake, HandshakeFailure, Slot};
use latch_identity::SvidError;
use latch_mesh::MtlsMode;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::authorizer::Decision;
use crate::data_path::{DataPath, connect_failure_reason};
use crate::transport::{ALPN_LATCH, HeaderError, TransportHeader, resumed_peer_still_valid};

const DIRECTION: &str = "inbound";

/// A short, stable reason for a failed handshake, for metrics.
pub fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(rustls::CertificateError::Expired) => "expired_cert",
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet) => {
            "not_yet_valid_cert"
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            match other.0.downcast_ref::<SvidError>() {
                Some(SvidError::Chain { .. }) => "untrusted_cert",
                Some(SvidError::UnexpectedId { .. }) => "unexpected_peer",
                _ => "bad_cert",
            }
        }
        rustls::Error::InvalidCertificate(_) => "bad_cert",
        rustls::Error::PeerIncompatible(_) => "incompatible_peer",
        rustls::Error::NoApplicationProtocol => "alpn",
        rustls::Error::AlertReceived(_) => "alert_received",
        _ => "other",
    }
}

/// The mTLS listener's handshake, run by the serve loop under `--handshake-timeout`: a failure
/// is counted (`latch_proxy_tls_handshake_failures_total{direction="inbound",reason}`) and
/// logged.
pub struct MtlsHandshake(pub Arc<DataPath>);

impl Handshake<TcpStream> for MtlsHandshake {
    type Stream = TlsStream<TcpStream>;

    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl Future<Output = std::io::Result<TlsStream<TcpStream>>> + Send {
        let (dp, started) = (self.0.clone(), std::time::Instant::now());
        let accept = tokio_rustls::TlsAcceptor::from(self.0.tls.server()).accept(tcp);
        async move {
            let tls = accept.await?;
            dp.metrics.handshake_took(DIRECTION, started.elapsed());
            Ok(tls)
        }
    }

    fn failed(&self, _listener: &'static str, remote: &dyn fmt::Debug, failure: HandshakeFailure) {
        match failure {
            HandshakeFailure::Failed(e) => {
                let reason = handshake_failure_reason(&e);
                self.0.metrics.handshake_failed(DIRECTION, reason);
                tracing::info!(?remote, reason, "inbound mTLS handshake failed: {e}");
            }
            HandshakeFailure::TimedOut => {
                self.0.metrics.handshake_failed(DIRECTION, "timeout");
                tracing::info!(?remote, "inbound mTLS handshake timed out");
            }
        }
    }
}

/// Handles one connection on the mTLS listener, once `MtlsHandshake` is done.
pub async fn mtls(
    dp: Arc<DataPath>,
    mut tls: TlsStream<TcpStream>,
    remote: SocketAddr,
    _slot: Slot,
) {
    let (_, conn) = tls.get_ref();
    let resumed = dp.metrics.handshake_done(DIRECTION, conn.handshake_kind());
    // A resumed session ran no verifier: its stored client certificate must still be valid.
    if resumed
        && !resumed_peer_still_valid(
            conn.peer_certificates(),
            &dp.tls.inbound_peer(),
            &dp.tls.store().revocations(),
            SystemTime::now(),
        )
    {
        dp.metrics.handshake_failed(DIRECTION, "resumed_expired");
        tracing::info!(%remote, "resumed session's client certificate is no longer valid; closing");
        return;
    }
    let hbone = conn.alpn_protocol() == Some(crate::hbone::ALPN_H2);
    if !hbone && conn.alpn_protocol() != Some(ALPN_LATCH) {
        dp.metrics.handshake_failed(DIRECTION, "alpn");
        tracing::info!(%remote, "peer negotiated neither ALPN latch/1 nor h2; closing");
        return;
    }
    // The verifier required a valid SVID, so the leaf carries the peer's ID.
    let Some(peer) = latch_identity::verifier::peer_svid(conn.peer_certificates()) else {
        dp.metrics.handshake_failed(DIRECTION, "bad_cert");
        return;
    };
    let peer_issued_at = peer.issued_at();
    let peer = peer.id;
    // The peer meant this workload: the address it connected to.
    let workload = match tls.get_ref().0.local_addr() {
        Ok(local) => local.ip().to_canonical(),
        Err(e) => {
            dp.metrics.refused(DIRECTION, "io");
            tracing::info!(%remote, peer = %peer, "no local address on the connection: {e}");
            return;
        }
    };
    if hbone {
        Box::pin(crate::hbone::serve(
            dp,
            tls,
            peer,
            peer_issued_at,
            workload,
            remote,
        ))
        .await;
        return;
    }
    let header = match TransportHeader::read_from(&mut tls, dp.limits.header_timeout).await {
        Ok(h) => h,
        Err(e) => {
            let reason = match e {
                HeaderError::Timeout(_) => "header_timeout",
                HeaderError::TooLong(_) => "header_too_long",
                _ => "header_invalid",
            };
            dp.metrics.refused(DIRECTION, reason);
            tracing::info!(%remote, peer = %peer, "refusing connection: {e}");
            return;
        }
    };
    if dp.proxy_ports.is_proxy_port(header.target_port) {
        let target = SocketAddr::new(workload, header.target_port);
        dp.refuse_proxy_port(DIRECTION, remote, peer.as_str(), target);
        return;
    }
    let (_live, close) = match dp.admit(&peer, peer_issued_at, header.target_port) {
        Ok(admitted) => admitted,
        Err(decision) => {
            dp.metrics
                .authorization_denials
                .get_or_create(&crate::metrics::ConnLabels {
                    direction: DIRECTION,
                    peer: peer.to_string(),
                })
                .inc();
            if let Decision::Deny { by, why } = decision {
                tracing::warn!(%remote, peer = %peer, port = header.target_port, policy = %by, "denied: {why}");
            }
            return;
        }
    };
    let app = dp.delivery.app_address(workload, header.target_port);
    let upstream = match dp.connect_app(app).await {
        Ok(s) => s,
        Err(e) => {
            let reason = connect_failure_reason(&e, "app_unreachable");
            dp.metrics.refused(DIRECTION, reason);
            tracing::warn!(peer = %peer, %app, "cannot reach the local app: {e}");
            return;
        }
    };
    tracing::debug!(peer = %peer, %app, "inbound connection");
    dp.proxy(DIRECTION, peer.to_string(), upstream, tls, &close)
        .await;
}

/// Handles one connection captured on the plaintext inbound listener: refused when the
/// original destination is the proxy itself (a direct connection to 15006 would otherwise
/// loop into this listener until the descriptors run out) or not this workload's address, or
/// its port is STRICT; forwarded to the app at the original destination when PERMISSIVE.
pub async fn plaintext(dp: Arc<DataPath>, tcp: TcpStream, remote: SocketAddr, _slot: Slot) {
    const PLAINTEXT: &str = "inbound_plaintext";
    let original = match crate::capture::original_dst(&tcp) {
        Ok(dst) => dst,
        Err(e) => {
            dp.metrics.refused(PLAINTEXT, "no_original_dst");
            tracing::warn!(%remote, "no original destination on a captured connection: {e}");
            return;
        }
    };
    let port = original.port();
    let local = match tcp.local_addr() {
        Ok(local) => local,
        Err(e) => {
            dp.metrics.refused(PLAINTEXT, "io");
            tracing::info!(%remote, "no local address on a captured connection: {e}");
            return;
        }
    };
    if dp.proxy_ports.is_proxy_port(port) || dp.proxy_ports.is_own(original, &[local.ip()]) {
        dp.refuse_proxy_port(PLAINTEXT, remote, "unknown", original);
        return;
    }
    // REDIRECT rewrote the destination to an address of the interface the packet arrived on;
    // an original address that is not this pod's (another host's, sent to this pod on
    // purpose) would make the proxy a relay. Loopback never arrives through PREROUTING.
    let original_is_local = original.ip() == local.ip().to_canonical()
        || crate::capture::is_local_address(original.ip());
    if original.ip().is_loopback() || !original_is_local {
        dp.metrics.refused(PLAINTEXT, "not_local_destination");
        tracing::info!(%remote, %original, %local, "refused a captured connection whose original destination is not this workload's address");
        return;
    }
    if dp.mesh.load().settings.mtls_for_port(port) == MtlsMode::Strict {
        dp.metrics.refused(PLAINTEXT, "strict_mtls");
        tracing::info!(%remote, port, "refused plaintext connection: port {port} is STRICT (mTLS only)");
        return;
    }
    let app = dp.delivery.app_address(original.ip(), port);
    match dp.connect_app(app).await {
        Ok(upstream) => {
            dp.proxy(
                PLAINTEXT,
                "unknown".into(),
                upstream,
                tcp,
                &dp.close_connections,
            )
            .await
        }
        Err(e) => {
            let reason = connect_failure_reason(&e, "app_unreachable");
            dp.metrics.refused(PLAINTEXT, reason);
            tracing::warn!(%remote, %app, "cannot reach the local app: {e}");
        }
    }
}
