//! `latch-bench`, behind `cargo xtask bench`: `ca` (SVIDs issued per second), `jwt` (JWT-SVIDs
//! issued per second), `mesh` (Latch
//! against stunnel, HAProxy and no proxy in a private network namespace), `discovery` (a config
//! change reaching 1,000+ proxies), `handshake` (bytes and CPU of a full mTLS handshake, with
//! and without ML-KEM), `load` (idle connections and churn through a proxy pair).
//! Parses the command line (clap) and runs one bench; one module per concern.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use latch_testkit::Child;

mod apps;
mod ca;
mod discovery;
mod handshake;
mod haproxy;
mod jwt;
mod latch;
mod load;
mod mesh;
mod netns;
mod report;
mod stunnel;
mod tunnel;
mod workloads;

/// Benchmarks of Latch, reported side by side with the alternatives.
#[derive(Debug, Parser)]
#[command(name = "latch-bench")]
enum Bench {
    /// SVIDs issued per second by one latch-control process.
    Ca(ca::Options),
    /// Latch, stunnel, HAProxy and no proxy on the same path (root: a private namespace).
    Mesh(mesh::Options),
    /// JWT-SVIDs issued per second: signing alone, the control plane, the Workload API.
    Jwt(jwt::Options),
    /// A config change reaching every connected proxy.
    Discovery(discovery::Options),
    /// Full mTLS handshakes with and without ML-KEM: bytes on the wire and CPU.
    Handshake(handshake::Options),
    /// Idle connections and connection churn through a proxy pair, Latch and HAProxy (root).
    Load(load::Options),
    /// The load bench's echo server, a process of its own.
    #[command(name = "load-echo", hide = true)]
    LoadEcho { addr: String },
}

/// How long a process the bench started gets to stop after SIGTERM (so that e.g. nginx's
/// master takes its workers with it) before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Starts `command` as a process of the bench, stopped politely when dropped.
pub(crate) fn spawn(name: &str, command: Command, log: &Path) -> Result<Child> {
    Ok(Child::spawn(name, command, log)?.with_grace(STOP_GRACE))
}

/// The arguments after the bench's name, as given, without `--inside <netns>`: what the outer
/// run passes on to the inner one and prints in the doc.
pub(crate) fn outer_args(raw: &[String], inside: Option<&str>) -> Vec<String> {
    raw.iter()
        .filter(|a| *a != "--inside" && Some(a.as_str()) != inside)
        .cloned()
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let raw: Vec<String> = std::env::args().skip(2).collect();
    match Bench::parse() {
        Bench::Ca(options) => ca::run(options).await,
        Bench::Mesh(options) => mesh::run(options.with_args(&raw)).await,
        Bench::Jwt(options) => jwt::run(options).await,
        Bench::Handshake(options) => handshake::run(options),
        Bench::Discovery(options) => discovery::run(options.with_args(&raw)).await,
        Bench::Load(options) => load::run(options.with_args(&raw)).await,
        Bench::LoadEcho { addr } => load::echo_server(&addr).await,
    }
}
