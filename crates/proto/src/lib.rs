//! Generated protobuf messages and gRPC stubs for every Latch wire protocol. The code under
//! `generated/` is checked in and rewritten only by `cargo xtask codegen`; xtask's
//! `codegen_fresh` test fails when it no longer matches proto/.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod latch {
    pub mod ca {
        pub mod v1 {
            include!("generated/latch.ca.v1.rs");
        }
    }
    pub mod mesh {
        pub mod v1 {
            include!("generated/latch.mesh.v1.rs");
        }
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                include!("generated/envoy.config.core.v3.rs");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!("generated/envoy.service.discovery.v3.rs");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        include!("generated/google.rpc.rs");
    }
}

/// The SPIFFE Workload API. Its .proto has no package, so prost writes it to `_.rs` and the
/// gRPC paths are `/SpiffeWorkloadAPI/<Method>`.
pub mod workload {
    include!("generated/_.rs");
}

pub use envoy::service::discovery::v3 as discovery;
pub use latch::ca::v1 as ca;
pub use latch::mesh::v1 as mesh;

/// Type URLs of the mesh resources carried in `google.protobuf.Any`.
pub mod type_url {
    pub const WORKLOAD: &str = "type.googleapis.com/latch.mesh.v1.Workload";
    pub const SERVICE: &str = "type.googleapis.com/latch.mesh.v1.Service";
    pub const AUTHORIZATION_POLICY: &str = "type.googleapis.com/latch.mesh.v1.AuthorizationPolicy";
    pub const MESH_CONFIG: &str = "type.googleapis.com/latch.mesh.v1.MeshConfig";
    /// Every type a proxy subscribes to, in the order a proxy applies them.
    pub const ALL: [&str; 4] = [MESH_CONFIG, WORKLOAD, SERVICE, AUTHORIZATION_POLICY];
}

/// The single MeshConfig resource's name.
pub const MESH_CONFIG_NAME: &str = "mesh";

impl discovery::Resource {
    /// A discovery resource named `name` at `version` whose body is `message` as an Any of
    /// `type_url`: how tests and fuzz targets build what a control plane would send.
    pub fn of(type_url: &str, name: &str, version: &str, message: &impl prost::Message) -> Self {
        discovery::Resource {
            version: version.into(),
            name: name.into(),
            resource: Some(prost_types::Any {
                type_url: type_url.into(),
                value: message.encode_to_vec(),
            }),
        }
    }
}
