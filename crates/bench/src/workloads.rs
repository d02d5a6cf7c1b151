//! The mesh benchmark's workloads (docs/benchmarks.md, "Mesh"), each run against one tunnel's entry
//! port: iperf3 (bulk), redis-benchmark (request/response), wrk against nginx (HTTP keep-alive and
//! a new connection per request), and idle connections held open for the memory rows. Each returns
//! `(metric key, value)` samples.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::tunnel::{App, Tunnel};

/// One measurement's samples: metric key and value.
pub type Samples = Vec<(String, f64)>;

#[derive(Clone, Copy, Debug)]
pub enum Workload {
    Iperf { streams: u32 },
    Redis { clients: u32 },
    Http { close: bool },
    Memory,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::Iperf { streams: 1 },
        Workload::Iperf { streams: 4 },
        Workload::Redis { clients: 50 },
        Workload::Redis { clients: 1 },
        Workload::Http { close: false },
        Workload::Http { close: true },
        Workload::Memory,
    ];

    pub fn name(self) -> String {
        match self {
            Workload::Iperf { streams } => format!("iperf3 -P {streams}"),
            Workload::Redis { clients } => format!("redis-benchmark -c {clients}"),
            Workload::Http { close: false } => "wrk keep-alive".into(),
            Workload::Http { close: true } => "wrk Connection: close".into(),
            Workload::Memory => "idle connections".into(),
        }
    }

    /// The short name `--workloads` selects it by.
    pub fn key(self) -> &'static str {
        match self {
            Workload::Iperf { streams: 1 } => "iperf1",
            Workload::Iperf { .. } => "iperf4",
            Workload::Redis { clients: 1 } => "redis1",
            Workload::Redis { .. } => "redis50",
            Workload::Http { close: false } => "http",
            Workload::Http { close: true } => "newconn",
            Workload::Memory => "memory",
        }
    }

    pub async fn run(self, tunnel: &Tunnel, settings: &Settings) -> Result<Samples> {
        match self {
            Workload::Iperf { streams } => iperf(tunnel, settings, streams).await,
            Workload::Redis { clients } => redis(tunnel, settings, clients).await,
            Workload::Http { close } => http(tunnel, settings, close).await,
            Workload::Memory => memory(tunnel, &settings.idle_connections).await,
        }
    }
}

/// How long and how big each measurement is.
pub struct Settings {
    pub seconds: u64,
    pub idle_connections: Vec<usize>,
}

/// Runs a tool to completion (killed if it overruns) and returns its stdout.
async fn run_tool(command: &mut Command, limit: Duration) -> Result<String> {
    command.kill_on_drop(true);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .with_context(|| format!("{command:?} did not finish within {limit:?}"))?
        .with_context(|| format!("running {command:?}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            stdout.trim()
        );
    }
    Ok(stdout)
}

fn limit(settings: &Settings) -> Duration {
    Duration::from_secs(settings.seconds * 4 + 30)
}

async fn iperf(tunnel: &Tunnel, settings: &Settings, streams: u32) -> Result<Samples> {
    let port = tunnel.entry_port(App::Iperf).to_string();
    let seconds = settings.seconds.to_string();
    let mut command = Command::new("iperf3");
    command.args(["-c", "127.0.0.1", "-p", &port, "-t", &seconds, "-J"]);
    command.args(["-P", &streams.to_string()]);
    let cpu_before = tunnel.cpu_time()?;
    let out = run_tool(&mut command, limit(settings)).await?;
    let cpu = tunnel.cpu_time()?.saturating_sub(cpu_before);
    let (bits_per_second, bytes) = parse_iperf(&out)?;
    let key = format!("iperf{streams}");
    let mut samples = vec![(format!("{key}_gbps"), bits_per_second / 1e9)];
    if tunnel.rss_mib()?.is_some() {
        samples.push((
            format!("{key}_cpu_s_per_gb"),
            cpu.as_secs_f64() / (bytes / 1e9),
        ));
    }
    Ok(samples)
}

/// Receiver-side bits/s and bytes from `iperf3 -J`.
pub fn parse_iperf(json: &str) -> Result<(f64, f64)> {
    let value: serde_json::Value = serde_json::from_str(json).context("iperf3 -J output")?;
    if let Some(error) = value.get("error") {
        bail!("iperf3: {error}");
    }
    let sum = &value["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second")?;
    let bytes = sum["bytes"].as_f64().context("no end.sum_received.bytes")?;
    Ok((bps, bytes))
}

async fn redis(tunnel: &Tunnel, settings: &Settings, clients: u32) -> Result<Samples> {
    let port = tunnel.entry_port(App::Redis).to_string();
    // Sized for roughly `seconds` through a tunnel; the direct path finishes sooner.
    let per_second = if clients == 1 { 4_000 } else { 25_000 };
    let requests = (per_second * settings.seconds).to_string();
    let mut command = Command::new("redis-benchmark");
    command.args(["-h", "127.0.0.1", "-p", &port, "-t", "get", "--csv"]);
    command.args(["-c", &clients.to_string(), "-n", &requests]);
    let out = run_tool(&mut command, limit(settings)).await?;
    let row = parse_redis_csv(&out)?;
    let key = format!("redis{clients}");
    Ok(vec![
        (format!("{key}_rps"), row.rps),
        (format!("{key}_p50_ms"), row.p50_ms),
        (format!("{key}_p99_ms"), row.p99_ms),
    ])
}

pub struct RedisRow {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The GET row of `redis-benchmark --csv` (header: "test","rps",...,"p50_latency_ms",...).
pub fn parse_redis_csv(csv: &str) -> Result<RedisRow> {
    let rows: Vec<Vec<String>> = csv
        .lines()
        .filter(|l| l.starts_with('"'))
        .map(|l| {
            l.split(',')
                .map(|f| f.trim_matches('"').to_string())
                .collect()
        })
        .collect();
    let header = rows.first().context("redis-benchmark printed no CSV")?;
    let row = rows
        .iter()
        .find(|r| r.first().is_some_and(|t| t.starts_with("GET")))
        .context("no GET row in redis-benchmark output")?;
    let field = |name: &str| -> Result<f64> {
        let i = header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no {name} column in {header:?}"))?;
        row.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad {name} in {row:?}"))
    };
    Ok(RedisRow {
        rps: field("rps")?,
        p50_ms: field("p50_latency_ms")?,
        p99_ms: field("p99_latency_ms")?,
    })
}

async fn http(tunnel: &Tunnel, settings: &Settings, close: bool) -> Result<Samples> {
    let url = format!("http://127.0.0.1:{}/", tunnel.entry_port(App::Http));
    let duration = format!("{}s", settings.seconds);
    let mut command = Command::new("wrk");
    command.args(["-t", "2", "-c", "50", "-d", &duration, "--latency"]);
    if close {
        command.args(["-H", "Connection: close"]);
    }
    command.arg(&url);
    let cpu_before = tunnel.cpu_time()?;
    let out = run_tool(&mut command, limit(settings)).await?;
    let cpu = tunnel.cpu_time()?.saturating_sub(cpu_before);
    let run = parse_wrk(&out)?;
    let key = if close { "churn" } else { "http" };
    let mut samples = vec![
        (format!("{key}_rps"), run.rps),
        (format!("{key}_p99_ms"), run.p99_ms),
        (format!("{key}_errors"), run.errors),
    ];
    if close && tunnel.rss_mib()?.is_some() && run.requests > 0.0 {
        samples.push((
            format!("{key}_cpu_us_per_conn"),
            cpu.as_secs_f64() * 1e6 / run.requests,
        ));
    }
    Ok(samples)
}

pub struct WrkRun {
    pub rps: f64,
    pub requests: f64,
    pub p99_ms: f64,
    pub errors: f64,
}

/// Requests/sec, total requests, the 99% latency and socket errors + non-2xx from `wrk --latency`.
pub fn parse_wrk(out: &str) -> Result<WrkRun> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
    let requests = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let p99_ms = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| parse_wrk_duration(v.trim()))
        .with_context(|| format!("no 99% latency in wrk output:\n{out}"))?;
    let mut errors = 0.0;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(WrkRun {
        rps,
        requests,
        p99_ms,
        errors,
    })
}

/// wrk's "1.23ms" / "850.00us" / "1.01s" as milliseconds.
fn parse_wrk_duration(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        (text.strip_suffix('s')?, 1000.0)
    };
    Some(number.parse::<f64>().ok()? * factor)
}

/// RSS of both sidecars idle, then holding each count of idle connections through them.
async fn memory(tunnel: &Tunnel, counts: &[usize]) -> Result<Samples> {
    let Some((client, server)) = tunnel.rss_mib()? else {
        return Ok(Vec::new());
    };
    let mut samples = vec![
        ("rss_idle_client_mib".to_string(), client),
        ("rss_idle_server_mib".to_string(), server),
    ];
    let port = tunnel.entry_port(App::Hold);
    for &count in counts {
        let held = hold_connections(port, count).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (client, server) = tunnel.rss_mib()?.context("sidecars gone")?;
        let label = if count % 1000 == 0 {
            format!("{}k", count / 1000)
        } else {
            count.to_string()
        };
        samples.push((format!("rss_{label}_client_mib"), client));
        samples.push((format!("rss_{label}_server_mib"), server));
        drop(held);
        // Let both sides see the closes before the next measurement.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(samples)
}

/// Opens `count` connections to the hold server through `port`; each is established end to end
/// once the server's greeting byte has arrived.
async fn hold_connections(port: u16, count: usize) -> Result<Vec<tokio::net::TcpStream>> {
    let open = |_| async move {
        let connect = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let mut greeting = [0u8; 1];
            stream.read_exact(&mut greeting).await?;
            std::io::Result::Ok(stream)
        };
        tokio::time::timeout(Duration::from_secs(20), connect)
            .await
            .map_err(|_| std::io::Error::other("timed out"))?
    };
    let results: Vec<_> = futures::stream::iter(0..count)
        .map(open)
        .buffer_unordered(64)
        .collect()
        .await;
    let total = results.len();
    let mut held = Vec::with_capacity(total);
    let mut first_error = None;
    for result in results {
        match result {
            Ok(stream) => held.push(stream),
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    if let Some(e) = first_error {
        bail!(
            "{} of {count} idle connections through port {port} failed; first: {e}",
            total - held.len()
        );
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "Running 2s test @ http://127.0.0.1:8080/\n  Latency Distribution\n     50%  310.00us\n     99%    1.21ms\n  12345 requests in 2.00s, 1.00MB read\n  Socket errors: connect 0, read 3, write 0, timeout 1\nRequests/sec:   6172.50\n";
        let run = parse_wrk(out).unwrap();
        assert_eq!(run.rps, 6172.5);
        assert_eq!(run.requests, 12345.0);
        assert!((run.p99_ms - 1.21).abs() < 1e-9);
        assert_eq!(run.errors, 4.0);
        assert_eq!(parse_wrk_duration("850.00us"), Some(0.85));
    }

    #[test]
    fn reads_redis_csv() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"GET\",\"90090.09\",\"0.297\",\"0.080\",\"0.279\",\"0.455\",\"0.607\",\"1.127\"\n";
        let row = parse_redis_csv(csv).unwrap();
        assert_eq!(row.rps, 90090.09);
        assert_eq!(row.p50_ms, 0.279);
        assert_eq!(row.p99_ms, 0.607);
    }
}
