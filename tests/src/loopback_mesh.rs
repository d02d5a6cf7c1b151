//! A mesh of in-process proxies on loopback for end-to-end tests: workloads get their own
//! loopback addresses (127.0.0.X) and mesh ports, so proxies route by destination IP as with
//! transparent capture. Used by the discovery, rotation and fault tests in tests/tests.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{Harness, http_get};

/// A workload in the generated YAML: name (also its service account), loopback IP, mesh port.
pub struct Member {
    pub name: &'static str,
    pub ip: &'static str,
    pub mesh_port: u16,
}

pub fn workloads_yaml(members: &[&Member]) -> String {
    let mut out = String::from("workloads:\n");
    for m in members {
        out.push_str(&format!(
            "  - name: {0}\n    namespace: demo\n    service_account: {0}\n    ips: [\"{1}\"]\n    mesh_port: {2}\n    labels: {{app: {0}}}\n",
            m.name, m.ip, m.mesh_port
        ));
    }
    out
}

pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip.parse::<IpAddr>().expect("ip"), 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Starts a proxy for `demo/<name>` with discovery on, inbound mTLS on `ip:mesh_port`, apps on
/// `ip`, and `outbound` explicit listeners; waits until /ready (SVID + first sync).
pub async fn start_member(
    harness: &Harness,
    member: &Member,
    outbound: &[String],
) -> latch_proxy::Proxy {
    start_member_with_ttl(harness, member, outbound, None).await
}

/// `start_member` asking for SVIDs of `ttl` (short ones make renewals happen within a test).
pub async fn start_member_with_ttl(
    harness: &Harness,
    member: &Member,
    outbound: &[String],
    ttl: Option<Duration>,
) -> latch_proxy::Proxy {
    let id = harness.id("demo", member.name);
    let mut config = harness.mesh_proxy_config(&id, ttl);
    let ip: IpAddr = member.ip.parse().expect("ip");
    config.data.inbound = Some(SocketAddr::new(ip, member.mesh_port));
    config.data.app_host = ip;
    config.data.explicit = outbound
        .iter()
        .map(|o| o.parse().expect("outbound target"))
        .collect();
    if let Some(discovery) = config.discovery.as_mut() {
        discovery.workload_name = Some(format!("demo/{}", member.name));
    }
    let proxy = crate::start_proxy(config).await;
    wait_ready(&proxy.admin_addr.to_string()).await;
    proxy
}

pub async fn wait_ready(admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match http_get(admin, "/ready").await {
            Ok((200, _)) => return,
            other if Instant::now() > deadline => panic!("proxy at {admin} not ready: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Sum of a proxy metric's samples whose line contains every one of `labels`.
pub async fn metric(admin: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let (_, text) = http_get(&admin.to_string(), "/metrics")
        .await
        .expect("metrics");
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An app that answers every chunk it reads with `name: <chunk>`.
pub async fn echo_app(ip: &str, name: &'static str) -> u16 {
    let listener = TcpListener::bind((ip.parse::<IpAddr>().expect("ip"), 0))
        .await
        .expect("bind app");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let reply = format!("{name}: {}", String::from_utf8_lossy(&buf[..n]));
                    if tcp.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// One request over a new connection to `entry`; the app's answer.
pub async fn call(entry: SocketAddr, text: &str) -> std::io::Result<String> {
    let mut tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(entry))
        .await
        .map_err(|_| std::io::Error::other("connect timeout"))??;
    tcp.write_all(text.as_bytes()).await?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("read timeout"))??;
    if n == 0 {
        return Err(std::io::Error::other("closed without an answer"));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Back-to-back calls through `entry` until stopped, every answer checked against `expect`.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    pub fn start(entry: SocketAddr, text: &'static str, expect: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let task = {
            let (stop, ok) = (stop.clone(), ok.clone());
            tokio::spawn(async move {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match call(entry, text).await {
                        Ok(reply) if reply == expect => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            errors.push(format!("{:?} {other:?}", std::time::SystemTime::now()))
                        }
                    }
                }
                errors
            })
        };
        Self { stop, ok, task }
    }

    /// Successful calls so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the load: (successful calls, the failures).
    pub async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.expect("load task");
        (self.ok.load(Ordering::Relaxed), errors)
    }
}
