//! The mesh domain model both halves of Latch share: workloads, services, authorization
//! policies and mesh settings (`model`), the one validation rule for each field (`validate`),
//! the conversions to and from the `latch.mesh.v1` messages carried by xDS (`resource`) and
//! the well-known ports (`ports`). The control plane validates its config with it and encodes
//! it; the proxy decodes discovery resources into it.

#![forbid(unsafe_code)]

pub mod error;
pub mod model;
pub mod ports;
pub mod resource;
pub mod validate;

pub use error::MeshError;
pub use model::{
    Action, MeshConfig, MeshSettings, MtlsMode, OutboundPolicy, Policy, Principal, Rule, Service,
    ServicePort, Workload, resource_name,
};
pub use resource::{Resource, from_resource};
