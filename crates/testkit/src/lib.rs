//! The test kit: everything Latch's tests, benchmarks and demo share, in one place. One owner
//! of child processes (`child`), the workspace binaries (`binaries`), latch-control and
//! latch-proxy as processes (`processes`) or in-process (`harness`, `loopback_mesh`), one admin
//! HTTP client (`admin`), ports and temp files (`net`, `files`), test certificates (`certs`),
//! pods in network namespaces (`netns`), and skips reported at the end of a run (`skip`).
//! Used by tests/, crates/*/tests, latch-bench, the demo.

use std::time::{Duration, Instant};

pub mod admin;
pub mod apps;
pub mod binaries;
pub mod certs;
pub mod child;
pub mod files;
pub mod harness;
pub mod loopback_mesh;
pub mod net;
pub mod netns;
pub mod processes;
pub mod skip;

pub use child::Child;
pub use harness::{Harness, Paused, loopback_config, start_proxy};
pub use latch_identity;

/// The trust domain every test and the demo use.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// `spiffe://cluster.local/ns/demo/sa/<name>`: the ID of workload `name` in the tests' namespace.
pub fn spiffe_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/{name}")
}

/// Waits until `check` returns true or `timeout` passes (polling every 50 ms, blocking).
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// Calls `check` every 50 ms until it yields a value or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (asynchronously) until `check` returns true, panicking with `what` after `timeout`.
pub async fn until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether this process runs as root (network namespaces, mounts, installing tools).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
