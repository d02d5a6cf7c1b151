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
}

/// The SPIFFE Workload API. Its .proto has no package, so prost writes it to `_.rs` and the
/// gRPC paths are `/SpiffeWorkloadAPI/<Method>`.
pub mod workload {
    include!("generated/_.rs");
}

pub use latch::ca::v1 as ca;
