//! What the data path knows about the mesh: an immutable `MeshSnapshot` behind an `ArcSwap`,
//! read at every new connection. Today built from `--peer` flags; discovery will build and swap
//! it the same way.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use latch_identity::SpiffeId;

/// Default port of the inbound mTLS listener.
pub const MESH_PORT: u16 = 15008;

/// A meshed workload reachable at an IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeer {
    pub id: SpiffeId,
    pub mesh_port: u16,
}

/// What to do with traffic for unknown destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundPolicy {
    /// Forward in plain TCP.
    Passthrough,
    /// Refuse anything that is not in the mesh.
    RegistryOnly,
}

/// Where an outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Over mTLS to `mesh_addr`, expecting `id`, for the app port `target_port`.
    Mesh {
        mesh_addr: SocketAddr,
        id: SpiffeId,
        target_port: u16,
    },
    /// Plain TCP to the original destination.
    Passthrough(SocketAddr),
    /// Refused by the outbound policy.
    Refused(String),
}

/// The mesh as the data path sees it.
#[derive(Debug, Clone)]
pub struct MeshSnapshot {
    pub peers: HashMap<IpAddr, MeshPeer>,
    pub outbound_policy: OutboundPolicy,
}

impl MeshSnapshot {
    /// Decides where a connection to `destination` goes.
    pub fn route(&self, destination: SocketAddr) -> Route {
        match self.peers.get(&destination.ip()) {
            Some(peer) => Route::Mesh {
                mesh_addr: SocketAddr::new(destination.ip(), peer.mesh_port),
                id: peer.id.clone(),
                target_port: destination.port(),
            },
            None => match self.outbound_policy {
                OutboundPolicy::Passthrough => Route::Passthrough(destination),
                OutboundPolicy::RegistryOnly => Route::Refused(format!(
                    "{destination} is not a meshed workload and the outbound policy is registry-only"
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let web = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/web").unwrap();
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        let mut snapshot = MeshSnapshot {
            peers: [(
                ip,
                MeshPeer {
                    id: web.clone(),
                    mesh_port: MESH_PORT,
                },
            )]
            .into(),
            outbound_policy: OutboundPolicy::Passthrough,
        };
        assert_eq!(
            snapshot.route("10.0.0.2:80".parse().unwrap()),
            Route::Mesh {
                mesh_addr: "10.0.0.2:15008".parse().unwrap(),
                id: web,
                target_port: 80
            }
        );
        let other: SocketAddr = "10.0.0.3:80".parse().unwrap();
        assert_eq!(snapshot.route(other), Route::Passthrough(other));
        snapshot.outbound_policy = OutboundPolicy::RegistryOnly;
        assert!(matches!(snapshot.route(other), Route::Refused(_)));
    }
}
