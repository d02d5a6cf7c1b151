//! The mesh bench's driver. `latch-bench mesh` (as root) installs missing tools, creates a
//! private network namespace and runs itself inside it (`--inside`, fd limit raised); the inner
//! run starts the control plane, the servers and every alternative, runs each workload against
//! each alternative in turn, repetition after repetition, and reports medians and ratios.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::latch::{CLIENT_ID, ControlPlane, SERVER_ID, SvidFiles};
use super::netns;
use super::report::{Facts, MESH_SECTION, Results, generated_section, update_doc};
use super::tunnel::{Alt, App, Tunnel};
use super::workloads::{Settings, Workload};
use super::{apps, haproxy, stunnel};
use latch_testkit::binaries::workspace_root;

/// Tools the bench runs, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("stunnel", "stunnel4"),
    ("haproxy", "haproxy"),
    ("iperf3", "iperf3"),
    ("redis-server", "redis-server"),
    ("redis-benchmark", "redis-tools"),
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
];

/// `latch-bench mesh`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Repetitions of each measurement.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Idle connection counts for the memory rows (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,9000")]
    idle_connections: Vec<usize>,
    /// The TLS 1.3 suite of the alternative rows.
    #[arg(long, default_value = "TLS_AES_128_GCM_SHA256")]
    alt_suite: String,
    /// Only these alternatives besides the direct path (comma-separated: latch, latch-hbone,
    /// stunnel, haproxy); a partial run never updates the docs.
    #[arg(long, value_delimiter = ',')]
    alts: Vec<String>,
    /// Only these workloads (comma-separated: iperf1, iperf4, redis50, redis1, http, newconn,
    /// memory); a partial run never updates the docs.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// One short run: --reps 1 --seconds 2 --idle-connections 1000 --no-docs.
    #[arg(long)]
    quick: bool,
    /// Print the report without updating docs/benchmarks.md.
    #[arg(long = "no-docs", action = clap::ArgAction::SetFalse)]
    write_docs: bool,
    /// Set on the inner run: the namespace it runs in.
    #[arg(long, hide = true)]
    inside: Option<String>,
    /// The arguments as given, to pass on to the inner run and to print in the doc.
    #[arg(skip)]
    args: Vec<String>,
}

impl Options {
    /// Applies --quick and keeps `raw` (the arguments as given, without --inside).
    pub fn with_args(mut self, raw: &[String]) -> Self {
        if self.quick {
            self.reps = 1;
            self.seconds = 2;
            self.idle_connections = vec![1000];
            self.write_docs = false;
        }
        if !self.alts.is_empty() || !self.workloads.is_empty() {
            self.write_docs = false;
        }
        self.args = crate::outer_args(raw, self.inside.as_deref());
        self
    }

    fn wants_alt(&self, alt: Alt) -> bool {
        alt == Alt::Direct || self.alts.is_empty() || self.alts.iter().any(|a| a == alt.key())
    }

    fn wants_workload(&self, workload: Workload) -> bool {
        self.workloads.is_empty() || self.workloads.iter().any(|w| w == workload.key())
    }
}

pub async fn run(options: Options) -> Result<()> {
    let alts: Vec<_> = Alt::ALL.iter().map(|a| a.key()).collect();
    if let Some(unknown) = options.alts.iter().find(|a| !alts.contains(&a.as_str())) {
        bail!(
            "--alts: unknown alternative {unknown:?}; known: {}",
            alts.join(", ")
        );
    }
    let workloads: Vec<_> = Workload::ALL.iter().map(|w| w.key()).collect();
    if let Some(unknown) = options
        .workloads
        .iter()
        .find(|w| !workloads.contains(&w.as_str()))
    {
        bail!(
            "--workloads: unknown workload {unknown:?}; known: {}",
            workloads.join(", ")
        );
    }
    match options.inside.clone() {
        Some(_) => run_inside(options).await,
        None => run_outside(options).await,
    }
}

/// As root: tools, the namespace, the inner run; the namespace goes away whatever happens.
async fn run_outside(options: Options) -> Result<()> {
    if !latch_testkit::is_root() {
        bail!(
            "the mesh bench needs root: to install its tools and for a private network namespace"
        );
    }
    netns::install_missing(TOOLS)?;
    netns::run_inside("mesh", &options.args).await
}

/// Where logs and configs go: `target/latch-bench-mesh`, recreated on each run.
fn work_dir() -> Result<PathBuf> {
    let dir = workspace_root().join("target/latch-bench-mesh");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Inside the namespace: start everything, measure, report.
async fn run_inside(options: Options) -> Result<()> {
    let dir = work_dir()?;
    // Before anything runs: the commit and date are those of the measured binaries.
    let command = format!("cargo xtask bench mesh {}", options.args.join(" "));
    let mut facts = Facts::collect(
        command.trim().to_string(),
        tls_description(&options.alt_suite),
        options.seconds,
    );
    eprintln!("logs and configs: {}", dir.display());
    let control = ControlPlane::start(&dir)?;
    let client_svid = control.svid_files(CLIENT_ID, &dir.join("svid-client"))?;
    let server_svid = control.svid_files(SERVER_ID, &dir.join("svid-server"))?;
    let _apps = apps::start(&dir).await?;

    let mut results = Results::default();
    let bed = TestBed {
        dir: &dir,
        control: &control,
        client: &client_svid,
        server: &server_svid,
        suite: &options.alt_suite,
    };
    let mut tunnels: Vec<(Alt, Option<Tunnel>)> = Vec::new();
    for alt in Alt::ALL.into_iter().filter(|a| options.wants_alt(*a)) {
        match bed.start(alt).await {
            Ok(tunnel) => tunnels.push((alt, Some(tunnel))),
            Err(e) => fail(
                &mut results,
                format!("{}: did not start: {e:#}", alt.label()),
            ),
        }
    }

    let settings = Settings {
        seconds: options.seconds,
        idle_connections: options.idle_connections.clone(),
    };
    for rep in 1..=options.reps {
        for workload in Workload::ALL
            .into_iter()
            .filter(|w| options.wants_workload(*w))
        {
            for (alt, slot) in &mut tunnels {
                let what = format!(
                    "rep {rep}/{}: {} via {}",
                    options.reps,
                    workload.name(),
                    alt.label()
                );
                if matches!(workload, Workload::Memory) && *alt != Alt::Direct {
                    // Fresh sidecars, so that memory left behind by earlier traffic (allocators
                    // keep what they had) does not count. Stop the old ones first: same ports.
                    *slot = None;
                    match bed.start(*alt).await {
                        Ok(tunnel) => *slot = Some(tunnel),
                        Err(e) => fail(&mut results, format!("{what}: restart failed: {e:#}")),
                    }
                }
                let Some(tunnel) = slot else { continue };
                eprintln!("{what}");
                match workload.run(tunnel, &settings).await {
                    Ok(samples) => results.record(*alt, samples),
                    Err(e) => fail(&mut results, format!("{what}: {e:#}")),
                }
                // Let TIME_WAIT sockets and sidecar buffers settle between measurements.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    facts.record_load();
    let section = generated_section(&results, &facts);
    println!("\n{section}");
    if options.write_docs {
        let docs = workspace_root().join("docs");
        update_doc(&docs.join("benchmarks.md"), &MESH_SECTION, &section)?;
        let json = serde_json::to_string_pretty(&results.to_json(&facts, options.reps))?;
        std::fs::write(docs.join("benchmarks-mesh.json"), json + "\n")?;
        eprintln!("wrote docs/benchmarks.md and docs/benchmarks-mesh.json");
    }
    Ok(())
}

/// What starting an alternative needs.
struct TestBed<'a> {
    dir: &'a Path,
    control: &'a ControlPlane,
    client: &'a SvidFiles,
    server: &'a SvidFiles,
    /// The cipher suite of stunnel and HAProxy.
    suite: &'a str,
}

impl TestBed<'_> {
    /// Starts one alternative's sidecars (nothing for the direct path) and checks that a
    /// connection through them reaches the hold server.
    async fn start(&self, alt: Alt) -> Result<Tunnel> {
        let (dir, suite) = (self.dir, self.suite);
        let tunnel = match alt {
            Alt::Direct => Tunnel::direct(),
            Alt::Latch => super::latch::start(dir, self.control, false)?,
            Alt::LatchHbone => super::latch::start(dir, self.control, true)?,
            Alt::Stunnel => stunnel::start(dir, self.client, self.server, suite)?,
            Alt::Haproxy => haproxy::start(dir, self.client, self.server, suite)?,
        };
        check(tunnel, dir).await
    }
}

/// One end-to-end round trip through the tunnel to the hold server before measuring.
async fn check(tunnel: Tunnel, dir: &Path) -> Result<Tunnel> {
    let port = tunnel.entry_port(App::Hold);
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut byte = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut byte).await?;
        std::io::Result::Ok(())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), probe).await;
    let error = match outcome {
        Ok(Ok(())) => return Ok(tunnel),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_string(),
    };
    bail!(
        "{} carries no traffic to the hold server ({error}; logs in {})",
        tunnel.alt.label(),
        dir.display()
    )
}

fn fail(results: &mut Results, message: String) {
    eprintln!("FAILED: {message}");
    results.failures.push(message);
}

fn tls_description(suite: &str) -> String {
    format!(
        "stunnel and HAProxy: TLS 1.3 only, {suite} (OpenSSL), ECDSA P-256 SVIDs from Latch's CA, \
         chain verified on both sides (neither checks the SPIFFE ID). Latch: TLS 1.3 with the \
         suites and order of `latch_identity::tls::provider()` (rustls, aws-lc-rs), the peer's \
         SPIFFE ID checked on both sides."
    )
}
