//! `cargo xtask bench jwt`: JWT-SVIDs issued per second, side by side in one run, from the floor
//! up: ES256 signing alone in this process (no network: what a token costs at least), the
//! control plane's `CreateJwtSvid` called directly over mTLS, and an app's `FetchJWTSVID` on a
//! `latch-proxy`'s Workload API socket, uncached (a new audience per request, so every one
//! reaches the control plane) and cached (one audience per client, answered from the proxy's
//! cache). Real processes: `latch-control` and `latch-proxy` from the release build.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use latch_identity::client::{CaClient, control_plane_id};
use latch_identity::jwt::JwtSigningKey;
use latch_identity::{CertStore, ExpectedPeer, SpiffeId, TrustBundle, TrustDomain};
use latch_proto::ca::CreateJwtSvidRequest;
use latch_proto::workload::JwtsvidRequest;
use latch_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use latch_testkit::Child;

use crate::latch::{self, CLIENT_ID, ControlPlane};

/// `latch-bench jwt`: clients and seconds per row.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Client counts, one row each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Seconds per row.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// CreateJwtSvid on the control plane, over mTLS with the client's X509-SVID.
    Direct,
    /// FetchJWTSVID on the proxy's Workload API, a new audience per request.
    Uncached,
    /// FetchJWTSVID on the proxy's Workload API, the same audience each time.
    Cached,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "control plane CreateJwtSvid (mTLS)",
            Route::Uncached => "Workload API FetchJWTSVID, uncached",
            Route::Cached => "Workload API FetchJWTSVID, cached",
        }
    }
}

/// One client's connection, for the path it measures.
enum Client {
    Direct(CaClient),
    WorkloadApi(SpiffeWorkloadApiClient<tonic::transport::Channel>),
}

impl Client {
    async fn one(&mut self, audience: String) -> Result<()> {
        match self {
            Client::Direct(client) => {
                client
                    .create_jwt_svid(CreateJwtSvidRequest {
                        audience: vec![audience],
                    })
                    .await?;
            }
            Client::WorkloadApi(client) => {
                let mut request = tonic::Request::new(JwtsvidRequest {
                    audience: vec![audience],
                    spiffe_id: String::new(),
                });
                request.metadata_mut().insert(
                    "workload.spiffe.io",
                    tonic::metadata::MetadataValue::from_static("true"),
                );
                let svids = client.fetch_jwtsvid(request).await?.into_inner().svids;
                anyhow::ensure!(!svids.is_empty(), "no JWT-SVID in the answer");
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Row {
    issued: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Vec<Duration>,
}

async fn run_clients(clients: Vec<Client>, path: Route, seconds: u64) -> Result<(Row, Duration)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut row = Row::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let audience = match path {
                    Route::Cached => format!("bench-{i}"),
                    _ => format!("bench-{i}-{n}"),
                };
                let start = Instant::now();
                match client.one(audience).await {
                    Ok(()) => {
                        row.issued += 1;
                        row.latencies.push(start.elapsed());
                    }
                    Err(e) => {
                        row.errors += 1;
                        row.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            row
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Row::default();
    for task in tasks {
        let row = task.await?;
        total.issued += row.issued;
        total.errors += row.errors;
        total.first_error = total.first_error.or(row.first_error);
        total.latencies.extend(row.latencies);
    }
    Ok((total, started.elapsed()))
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// ES256 signing alone, one thread, for `seconds`: tokens per second.
fn sign_only(seconds: u64) -> Result<f64> {
    let key = JwtSigningKey::generate()?;
    let subject = SpiffeId::parse(CLIENT_ID)?;
    let audience = ["bench".to_string()];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let now = SystemTime::now();
        key.sign(&subject, &audience, now, now + Duration::from_secs(300))?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn connect(path: Route, store: &Arc<CertStore>, socket: &str) -> Result<Client> {
    Ok(match path {
        Route::Direct => Client::Direct(
            CaClient::connect(
                latch::CONTROL_GRPC,
                store.clone(),
                ExpectedPeer::Exactly(control_plane_id(&TrustDomain::new("cluster.local")?)),
                true,
            )
            .await?,
        ),
        Route::Uncached | Route::Cached => {
            let channel = tonic::transport::Endpoint::from_shared(socket.to_string())?
                .connect()
                .await
                .with_context(|| format!("connecting to the Workload API at {socket}"))?;
            Client::WorkloadApi(SpiffeWorkloadApiClient::new(channel))
        }
    })
}

fn cpu(process: &dyn Fn() -> Result<Duration>) -> Duration {
    process().unwrap_or_default()
}

pub async fn run(options: Options) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let control = ControlPlane::start(dir.path())?;
    let bundle = TrustBundle::from_pem(
        &std::fs::read(control.bundle())
            .with_context(|| format!("reading {}", control.bundle().display()))?,
    )?;

    // The direct clients' X509-SVID, fetched once with a join token and shared.
    let store = Arc::new(CertStore::new(bundle.clone()));
    let mut enrol = CaClient::connect(
        latch::CONTROL_GRPC,
        store.clone(),
        ExpectedPeer::Exactly(control_plane_id(&TrustDomain::new("cluster.local")?)),
        false,
    )
    .await?;
    let (svid, _) = enrol
        .fetch_svid(None, None, Some(control.token(CLIENT_ID)?))
        .await?;
    store.set_svid(svid);

    let socket_path = dir.path().join("workload-api/socket");
    let socket = format!("unix://{}", socket_path.display());
    let proxy: Child = latch::proxy(
        dir.path(),
        &control,
        "latch-jwt",
        "spiffe://cluster.local/ns/bench/sa/app",
        latch::CLIENT_MESH,
        latch::CLIENT_ADMIN,
        &["--workload-api".to_string(), socket.clone()],
        1000,
    )?;
    latch_testkit::wait_for(Duration::from_secs(10), || socket_path.exists());

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "JWT-SVIDs issued per second, {} s per row, {cores} cores shared by latch-control, \
         latch-proxy and the clients",
        options.seconds
    );
    println!();
    let floor = sign_only(options.seconds)?;
    println!("ES256 signing alone in one thread, no network: {floor:.0} tokens/s");
    println!();
    println!(
        "| path | clients | JWT-SVIDs/s | p50 ms | p99 ms | errors | control CPU µs/token | proxy CPU µs/token |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let control_cpu = || control.cpu_time();
    let proxy_cpu = || proxy.cpu_time();
    for path in [Route::Direct, Route::Uncached, Route::Cached] {
        for &clients in &options.clients {
            let mut connections = Vec::with_capacity(clients);
            for _ in 0..clients {
                connections.push(connect(path, &store, &socket).await?);
            }
            let (control_before, proxy_before) = (cpu(&control_cpu), cpu(&proxy_cpu));
            let (mut row, elapsed) = run_clients(connections, path, options.seconds).await?;
            let per_token = |used: Duration| {
                if row.issued == 0 {
                    0.0
                } else {
                    used.as_secs_f64() * 1e6 / row.issued as f64
                }
            };
            let control_used = per_token(cpu(&control_cpu).saturating_sub(control_before));
            let proxy_used = per_token(cpu(&proxy_cpu).saturating_sub(proxy_before));
            row.latencies.sort();
            println!(
                "| {} | {clients} | {:.0} | {:.2} | {:.2} | {} | {control_used:.0} | {} |",
                path.name(),
                row.issued as f64 / elapsed.as_secs_f64(),
                percentile_ms(&row.latencies, 0.50),
                percentile_ms(&row.latencies, 0.99),
                row.errors,
                if path == Route::Direct {
                    "–".to_string()
                } else {
                    format!("{proxy_used:.0}")
                },
            );
            if let Some(e) = row.first_error {
                eprintln!("  first error: {e}");
            }
        }
    }
    drop((proxy, control, dir));
    Ok(())
}
