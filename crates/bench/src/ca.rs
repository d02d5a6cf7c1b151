//! `cargo xtask bench ca`: SVIDs issued per second end to end. A real `latch-control` process
//! serves; N clients (one TLS connection each) send CreateCertificate in a loop. Two modes:
//! "full" (each request generates a key and CSR and validates the returned chain, as a proxy
//! does) and "capacity" (CSRs made before the clock starts, every 16th answer validated), which
//! measures what the CA can serve when its clients run on other machines.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use latch_identity::client::{CaClient, control_plane_id};
use latch_identity::{CertStore, ExpectedPeer, TrustBundle, TrustDomain};
use latch_testkit::binaries::sibling_binary;
use latch_testkit::net::free_port;
use latch_testkit::wait_for;

const TOKEN: &str = "latch-bench-reusable-token-0123456789";

/// `latch-bench ca`: clients and seconds per row.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Client counts, one row each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    clients: Vec<usize>,
    /// Seconds per row.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

#[derive(Default)]
struct RunResult {
    issued: u64,
    errors: u64,
    latencies: Vec<Duration>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Full,
    Capacity,
}

/// CSRs shared by the capacity-mode clients, made before the clock starts.
fn csr_pool(size: usize) -> Result<Arc<Vec<Vec<u8>>>> {
    let pool = (0..size)
        .map(|_| Ok(latch_identity::csr::generate_csr(None)?.csr_der))
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(pool))
}

/// One request; in capacity mode a pre-made CSR, with every 16th answer validated.
async fn one_request(
    client: &mut CaClient,
    mode: Mode,
    pool: &[Vec<u8>],
    n: usize,
    bundle: &TrustBundle,
) -> Result<()> {
    match mode {
        Mode::Full => {
            client
                .fetch_svid(None, None, Some(TOKEN.to_string()))
                .await?;
        }
        Mode::Capacity => {
            let response = client
                .create_certificate(latch_proto::ca::CreateCertificateRequest {
                    csr: pool[n % pool.len()].clone(),
                    ttl: None,
                    proof: Some(
                        latch_proto::ca::create_certificate_request::Proof::JoinToken(
                            TOKEN.to_string(),
                        ),
                    ),
                })
                .await?;
            if n.is_multiple_of(16) {
                let chain: Vec<_> = response
                    .certificate_chain
                    .into_iter()
                    .map(rustls_pki_types::CertificateDer::from)
                    .collect();
                latch_identity::verify_svid(
                    &chain,
                    bundle,
                    std::time::SystemTime::now(),
                    latch_identity::PeerRole::Client,
                )?;
            }
        }
    }
    Ok(())
}

async fn run_clients(
    addr: &str,
    bundle: &TrustBundle,
    clients: usize,
    seconds: u64,
    mode: Mode,
    pool: &Arc<Vec<Vec<u8>>>,
) -> Result<(RunResult, Duration)> {
    let trust_domain = TrustDomain::new("cluster.local")?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let store = Arc::new(CertStore::new(bundle.clone()));
        let mut client = CaClient::connect(
            addr,
            store,
            ExpectedPeer::Exactly(control_plane_id(&trust_domain)),
            false,
        )
        .await?;
        let stop = stop.clone();
        let (pool, bundle) = (pool.clone(), bundle.clone());
        let offset = tasks.len() * 7919;
        tasks.push(tokio::spawn(async move {
            let mut result = RunResult::default();
            let mut n = offset;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                n += 1;
                match one_request(&mut client, mode, &pool, n, &bundle).await {
                    Ok(_) => {
                        result.issued += 1;
                        result.latencies.push(start.elapsed());
                    }
                    Err(_) => result.errors += 1,
                }
            }
            result
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = RunResult::default();
    for task in tasks {
        let r = task.await?;
        total.issued += r.issued;
        total.errors += r.errors;
        total.latencies.extend(r.latencies);
    }
    Ok((total, started.elapsed()))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

pub async fn run(options: Options) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "join_tokens:\n  - spiffe_id: spiffe://cluster.local/ns/bench/sa/client\n    token: {TOKEN}\n    reusable: true\n"
        ),
    )?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let admin = format!("127.0.0.1:{}", free_port()?);
    let log = dir.path().join("control.log");
    let mut command = std::process::Command::new(sibling_binary("latch-control"));
    command
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--listen", &listen, "--admin", &admin, "--config"])
        .arg(&config);
    let server = crate::spawn("latch-control", command, &log)
        .context("starting latch-control (build it with cargo build --release)")?;
    let bundle_path = data_dir.join("bundle.pem");
    let up = wait_for(Duration::from_secs(15), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("control plane started"))
    });
    if !up {
        bail!(
            "latch-control did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let bundle = TrustBundle::from_pem(&std::fs::read(&bundle_path)?)?;

    println!(
        "SVID issuance over gRPC/TLS 1.3, one latch-control process, {} s per row, {} cores shared by server and clients",
        options.seconds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    println!("mode: capacity = CSRs made before the clock starts, every 16th chain validated;");
    println!("      full     = every request generates a P-256 key + CSR and validates the chain");
    println!();
    println!("| mode | clients | SVIDs/s | p50 ms | p99 ms | errors | server CPU µs/SVID |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let pool = csr_pool(4096)?;
    // Warm-up: connections, page cache, CPU frequency.
    run_clients(&listen, &bundle, 2, 1, Mode::Full, &pool).await?;
    let rows = [Mode::Capacity, Mode::Full]
        .into_iter()
        .flat_map(|mode| options.clients.iter().map(move |&clients| (mode, clients)));
    for (mode, clients) in rows {
        let cpu_before = server.cpu_time().unwrap_or_default();
        let (mut result, elapsed) =
            run_clients(&listen, &bundle, clients, options.seconds, mode, &pool).await?;
        let cpu = server
            .cpu_time()
            .unwrap_or_default()
            .saturating_sub(cpu_before);
        result.latencies.sort();
        let rate = result.issued as f64 / elapsed.as_secs_f64();
        let cpu_per = if result.issued > 0 {
            cpu.as_secs_f64() * 1e6 / result.issued as f64
        } else {
            0.0
        };
        let mode = if mode == Mode::Full {
            "full"
        } else {
            "capacity"
        };
        println!(
            "| {mode} | {clients} | {rate:.0} | {:.2} | {:.2} | {} | {cpu_per:.0} |",
            percentile(&result.latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&result.latencies, 0.99).as_secs_f64() * 1e3,
            result.errors,
        );
    }
    drop(server);
    Ok(())
}
