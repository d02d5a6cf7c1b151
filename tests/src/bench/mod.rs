//! `cargo xtask bench mesh`: the same client -> sidecar -> mTLS -> sidecar -> server path through
//! Latch, stunnel, HAProxy and no proxy at all, inside one private network namespace, with the
//! workloads of docs/benchmarks.md ("Mesh"); `cargo xtask bench load`: idle connections and churn
//! through a pair (docs/benchmarks.md, "Load"). Called from the `latch-bench` binary; one module
//! per concern.

pub mod apps;
pub mod discovery;
pub mod haproxy;
pub mod latch;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod proc;
pub mod report;
pub mod stunnel;
pub mod tunnel;
pub mod workloads;
