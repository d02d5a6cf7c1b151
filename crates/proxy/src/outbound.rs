//! Outbound: connections from the local app to other services, captured transparently (15001,
//! original destination looked up in the mesh snapshot) or on explicit `--outbound` listeners.
//! Service VIPs are balanced over their endpoints; meshed destinations go over mTLS to the peer
//! proxy, which must present exactly the expected SPIFFE ID; unknown ones pass through or are
//! refused, per the outbound policy.

use std::net::SocketAddr;
use std::sync::Arc;

use latch_admin::serve::Slot;
use latch_identity::SpiffeId;
use tokio::net::TcpStream;

use crate::data_path::{DataPath, connect_failure_reason};
use crate::inbound::handshake_failure_reason;
use crate::state::Route;
use crate::transport::{ALPN_LATCH, TransportHeader, resumed_peer_still_valid};

const DIRECTION: &str = "outbound";

/// An explicit listener (`--outbound`): a local address that stands for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplicitTarget {
    pub listen: SocketAddr,
    pub to: ExplicitDestination,
}

/// Where an explicit listener's connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExplicitDestination {
    /// A fixed peer proxy and identity, no discovery involved.
    Fixed {
        id: SpiffeId,
        mesh_addr: SocketAddr,
        target_port: u16,
    },
    /// A destination routed through the mesh snapshot exactly as if transparent capture had
    /// seen a connection to it (a service VIP or a workload IP). Destinations the mesh does not
    /// know are refused: an explicit listener exists to reach the mesh, so it never falls back
    /// to plain TCP.
    Routed(SocketAddr),
}

impl std::str::FromStr for ExplicitTarget {
    type Err = String;
    /// `LISTEN=SPIFFE_ID@MESH_HOST:MESH_PORT/TARGET_PORT`, e.g.
    /// `127.0.0.1:18080=spiffe://cluster.local/ns/demo/sa/api@127.0.0.1:15008/8080`, or
    /// `LISTEN=DESTINATION` routed by discovery, e.g. `127.0.0.1:18080=10.96.0.10:80`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "expected LISTEN=IP:PORT (routed by discovery) or \
                     LISTEN=SPIFFE_ID@MESH_HOST:MESH_PORT/TARGET_PORT";
        let (listen, rest) = s.split_once('=').ok_or_else(|| format!("{s:?}: {usage}"))?;
        let listen = listen
            .parse()
            .map_err(|e| format!("{s:?}: listen address {listen:?}: {e}"))?;
        if !rest.starts_with("spiffe://") {
            let destination = rest
                .parse()
                .map_err(|e| format!("{s:?}: destination {rest:?}: {e}; {usage}"))?;
            return Ok(Self {
                listen,
                to: ExplicitDestination::Routed(destination),
            });
        }
        let (id, target) = rest
            .split_once('@')
            .ok_or_else(|| format!("{s:?}: {usage}"))?;
        let (mesh, port) = target
            .rsplit_once('/')
            .ok_or_else(|| format!("{s:?}: {usage}"))?;
        Ok(Self {
            listen,
            to: ExplicitDestination::Fixed {
                id: SpiffeId::parse(id).map_err(|e| format!("{s:?}: {id:?}: {e}"))?,
                mesh_addr: mesh
                    .parse()
                    .map_err(|e| format!("{s:?}: mesh address {mesh:?}: {e}"))?,
                target_port: port
                    .parse()
                    .map_err(|e| format!("{s:?}: target port {port:?}: {e}"))?,
            },
        })
    }
}

/// Why `connect_mesh` gave up (already logged and counted).
enum MeshConnectError {
    /// A resumed session's server certificate has expired: retry with a full handshake.
    ResumedExpired,
    Failed,
}

/// How `connect_mesh` connects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// `latch/1`, offering a cached session.
    Resume,
    /// `latch/1`, a full handshake.
    Full,
    /// An HBONE tunnel: ALPN h2, a full handshake.
    Tunnel,
}

/// Connects an HBONE tunnel to the peer proxy at `mesh_addr`, requiring exactly `id`.
pub(crate) async fn connect_tunnel(
    dp: &DataPath,
    mesh_addr: SocketAddr,
    id: &SpiffeId,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ()> {
    connect_mesh(dp, mesh_addr, id, Handshake::Tunnel)
        .await
        .map_err(|_| ())
}

/// Connects to the peer proxy at `mesh_addr` over mTLS, requiring exactly `id`.
async fn connect_mesh(
    dp: &DataPath,
    mesh_addr: SocketAddr,
    id: &SpiffeId,
    handshake: Handshake,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, MeshConnectError> {
    let (config, alpn) = match handshake {
        Handshake::Resume => (dp.tls.client(id), ALPN_LATCH),
        Handshake::Full => (dp.tls.client_without_resumption(id), ALPN_LATCH),
        Handshake::Tunnel => (dp.tls.tunnel_client(id), crate::hbone::ALPN_H2),
    };
    let Ok(config) = config else {
        dp.metrics.refused(DIRECTION, "tls_config");
        return Err(MeshConnectError::Failed);
    };
    let tcp = match dp.connect(mesh_addr).await {
        Ok(t) => t,
        Err(e) => {
            let reason = connect_failure_reason(&e, "peer_unreachable");
            dp.metrics.refused(DIRECTION, reason);
            tracing::warn!(peer = %id, %mesh_addr, "cannot reach the peer proxy: {e}");
            return Err(MeshConnectError::Failed);
        }
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let started = std::time::Instant::now();
    let handshake = tokio::time::timeout(
        dp.limits.handshake_timeout,
        connector.connect(dp.tls.session_name(id), tcp),
    )
    .await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = handshake_failure_reason(&e);
            dp.metrics.handshake_failed(DIRECTION, reason);
            tracing::warn!(expected = %id, %mesh_addr, reason, "outbound mTLS handshake failed: {e}");
            return Err(MeshConnectError::Failed);
        }
        Err(_) => {
            dp.metrics.handshake_failed(DIRECTION, "timeout");
            tracing::warn!(expected = %id, %mesh_addr, "outbound mTLS handshake timed out");
            return Err(MeshConnectError::Failed);
        }
    };
    dp.metrics.handshake_took(DIRECTION, started.elapsed());
    let conn = tls.get_ref().1;
    let resumed = dp.metrics.handshake_done(DIRECTION, conn.handshake_kind());
    let expected = latch_identity::ExpectedPeer::Exactly(id.clone());
    if resumed
        && !resumed_peer_still_valid(
            conn.peer_certificates(),
            &expected,
            &dp.tls.store().revocations(),
            std::time::SystemTime::now(),
        )
    {
        dp.metrics.handshake_failed(DIRECTION, "resumed_expired");
        tracing::debug!(expected = %id, "resumed session's server certificate is no longer valid; retrying with a full handshake");
        return Err(MeshConnectError::ResumedExpired);
    }
    if conn.alpn_protocol() != Some(alpn) {
        dp.metrics.handshake_failed(DIRECTION, "alpn");
        tracing::warn!(expected = %id, %mesh_addr, "peer did not negotiate ALPN {}", String::from_utf8_lossy(alpn));
        return Err(MeshConnectError::Failed);
    }
    Ok(tls)
}

/// Carries `app` to `route`. Each way is a future of its own on the heap, so that a connection
/// holds the state of the way it took, not that of the largest (a TLS handshake's is kilobytes,
/// an idle stream's a fraction of that).
async fn forward(dp: &DataPath, app: TcpStream, route: Route) {
    match route {
        Route::Mesh {
            mesh_addr,
            id,
            target_port,
        } => match &dp.tunnels {
            Some(tunnels) => {
                Box::pin(over_tunnel(dp, tunnels, app, mesh_addr, id, target_port)).await
            }
            None => Box::pin(over_connection(dp, app, mesh_addr, id, target_port)).await,
        },
        Route::Passthrough(destination) => Box::pin(passthrough(dp, app, destination)).await,
        Route::Refused { reason, why } => {
            dp.metrics.refused(DIRECTION, reason);
            tracing::info!(reason, "refused outbound connection: {why}");
        }
    }
}

/// As a stream of a pooled HBONE tunnel to the peer proxy.
async fn over_tunnel(
    dp: &DataPath,
    tunnels: &Arc<crate::hbone::Tunnels>,
    app: TcpStream,
    mesh_addr: SocketAddr,
    id: SpiffeId,
    target_port: u16,
) {
    // The peer proxy listens on its workload's address: the destination is that address on
    // the target port.
    let target = SocketAddr::new(mesh_addr.ip(), target_port);
    // Opening a tunnel (a handshake) is the large part: on the heap only while it runs.
    let Ok(stream) = Box::pin(tunnels.stream(dp, mesh_addr, &id, target)).await else {
        return;
    };
    let Some((_live, close)) = dp.track_outbound(&id, stream.peer_issued_at, target_port) else {
        tracing::warn!(peer = %id, "the server's certificate was revoked since the tunnel opened");
        return;
    };
    let _guard = stream.guard;
    dp.proxy(DIRECTION, id.to_string(), app, stream.io, &close)
        .await;
}

/// Over an mTLS connection of its own (`latch/1`).
async fn over_connection(
    dp: &DataPath,
    app: TcpStream,
    mesh_addr: SocketAddr,
    id: SpiffeId,
    target_port: u16,
) {
    // A resumed session whose server certificate expired meanwhile (the ticket was issued just
    // before the peer rotated) is dropped before any app byte is sent, so one full handshake
    // can take its place without the app noticing.
    let connected = match Box::pin(connect_mesh(dp, mesh_addr, &id, Handshake::Resume)).await {
        Err(MeshConnectError::ResumedExpired) => {
            Box::pin(connect_mesh(dp, mesh_addr, &id, Handshake::Full)).await
        }
        other => other,
    };
    let Ok(mut tls) = connected else { return };
    // The server's SVID, for revocations: one revoked later closes this connection.
    let server = latch_identity::verifier::peer_svid(tls.get_ref().1.peer_certificates());
    let Some((_live, close)) =
        server.and_then(|server| dp.track_outbound(&id, server.issued_at(), target_port))
    else {
        dp.metrics.handshake_failed(DIRECTION, "bad_cert");
        tracing::warn!(peer = %id, "the server's certificate is unreadable or was revoked since the handshake");
        return;
    };
    if let Err(e) = (TransportHeader { target_port }).write_to(&mut tls).await {
        dp.metrics.refused(DIRECTION, "header_write");
        tracing::warn!(peer = %id, "sending the transport header failed: {e}");
        return;
    }
    dp.proxy(DIRECTION, id.to_string(), app, tls, &close).await;
}

/// In plain TCP to a destination outside the mesh.
async fn passthrough(dp: &DataPath, app: TcpStream, destination: SocketAddr) {
    match dp.connect(destination).await {
        Ok(upstream) => {
            dp.proxy(
                "passthrough",
                "unknown".into(),
                app,
                upstream,
                &dp.close_connections,
            )
            .await
        }
        Err(e) => {
            let reason = connect_failure_reason(&e, "destination_unreachable");
            dp.metrics.refused("passthrough", reason);
            tracing::debug!(%destination, "passthrough connect failed: {e}");
        }
    }
}

/// Handles a connection on an explicit listener.
pub async fn explicit(dp: Arc<DataPath>, target: ExplicitTarget, app: TcpStream, _slot: Slot) {
    match target.to {
        ExplicitDestination::Fixed {
            id,
            mesh_addr,
            target_port,
        } => {
            let route = Route::Mesh {
                mesh_addr,
                id,
                target_port,
            };
            forward(&dp, app, route).await;
        }
        ExplicitDestination::Routed(destination) => {
            let (route, _endpoint) = Box::pin(dp.resolve_on_demand(destination)).await;
            let route = match route {
                Route::Passthrough(addr) if addr == destination => Route::Refused {
                    reason: "not_in_mesh",
                    why: format!(
                        "{destination} (explicit listener {}) is not a meshed workload or \
                         service; explicit listeners never send plain TCP",
                        target.listen
                    ),
                },
                other => other,
            };
            forward(&dp, app, route).await;
        }
    }
}

/// Handles a connection captured by iptables on the transparent listener.
pub async fn transparent(dp: Arc<DataPath>, app: TcpStream, remote: SocketAddr, _slot: Slot) {
    let destination = match crate::capture::original_dst(&app) {
        Ok(d) => d,
        Err(e) => {
            dp.metrics.refused(DIRECTION, "no_original_dst");
            tracing::warn!(%remote, "no original destination on a captured connection: {e}");
            return;
        }
    };
    // The proxy itself is never a destination: connecting straight to a capture port would
    // loop back into its listener, and the rest are the proxy's, not the app's. The app's own
    // source address is this pod's, and so is the address the connection was accepted on.
    let mut local = vec![remote.ip()];
    local.extend(app.local_addr().ok().map(|a| a.ip()));
    if dp.proxy_ports.is_own(destination, &local) {
        dp.refuse_proxy_port(DIRECTION, remote, "local app", destination);
        return;
    }
    // The guard counts the connection against the chosen service endpoint while it lasts. A
    // lookup (waiting on discovery) is boxed: the connection holds it only while it waits.
    let (route, _endpoint) = Box::pin(dp.resolve_on_demand(destination)).await;
    forward(&dp, app, route).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_targets_parse() {
        let t: ExplicitTarget =
            "127.0.0.1:18080=spiffe://cluster.local/ns/demo/sa/api@127.0.0.1:25008/8080"
                .parse()
                .unwrap();
        assert_eq!(t.listen, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(
            t.to,
            ExplicitDestination::Fixed {
                id: SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/api").unwrap(),
                mesh_addr: "127.0.0.1:25008".parse().unwrap(),
                target_port: 8080
            }
        );
        let routed: ExplicitTarget = "127.0.0.1:18080=10.96.0.10:80".parse().unwrap();
        assert_eq!(
            routed.to,
            ExplicitDestination::Routed("10.96.0.10:80".parse().unwrap())
        );
        for bad in [
            "127.0.0.1:18080=10.96.0.10",
            "127.0.0.1:18080=api.demo:80",
            "127.0.0.1:18080",
            "127.0.0.1:18080=spiffe://cluster.local/x",
            "127.0.0.1:18080=spiffe://cluster.local/x@127.0.0.1:15008",
            "nope=spiffe://cluster.local/x@127.0.0.1:15008/80",
            "127.0.0.1:1=spiffe://Bad/x@127.0.0.1:15008/80",
        ] {
            assert!(bad.parse::<ExplicitTarget>().is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod idle_state {
    use super::*;
    use std::future::Future;

    /// The size of the future `f` returns: what its task holds for it.
    fn size<A, F: Future>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle HBONE connection is its task and its copy state; what connecting needed (a TLS
    /// handshake: kilobytes) lives on the heap only while it runs. These bounds keep it so: the
    /// outbound task held 7.7 KiB before setup was boxed.
    #[test]
    fn an_idle_hbone_connection_holds_no_setup_state() {
        let task = size(
            |(dp, app, remote, slot): (Arc<DataPath>, TcpStream, SocketAddr, Slot)| {
                transparent(dp, app, remote, slot)
            },
        )
        .max(size(
            |(dp, target, app, slot): (Arc<DataPath>, ExplicitTarget, TcpStream, Slot)| {
                explicit(dp, target, app, slot)
            },
        ));
        type Args<'a> = (
            &'a DataPath,
            &'a Arc<crate::hbone::Tunnels>,
            TcpStream,
            SocketAddr,
            SpiffeId,
        );
        let stream =
            size(|(dp, tunnels, app, mesh, id): Args| over_tunnel(dp, tunnels, app, mesh, id, 80));
        assert!(task <= 1024, "outbound task: {task} bytes");
        assert!(stream <= 2048, "outbound HBONE stream: {stream} bytes");
        let inbound = crate::hbone::stream_future_size();
        assert!(inbound <= 2560, "inbound HBONE stream: {inbound} bytes");
    }
}
