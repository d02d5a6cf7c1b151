//! A mesh of in-process proxies on loopback for end-to-end tests: workloads get their own
//! loopback addresses (127.0.0.X) and mesh ports, so proxies route by destination IP as with
//! transparent capture. Used by the discovery and rotation tests in tests/tests; the apps and
//! load that go with it are in `apps`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::Harness;
use crate::admin::wait_ready;

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

/// A free port on loopback address `ip` (127.0.0.X).
pub fn free_port(ip: &str) -> u16 {
    crate::net::free_port_on(ip.parse().expect("ip")).expect("free port")
}

/// Starts a proxy for `demo/<name>` with discovery on, inbound mTLS on `ip:mesh_port` (so
/// inbound reaches the apps on `ip`, the workload's address), and `outbound` explicit listeners; waits until /ready (SVID + first sync).
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
    start_member_with(harness, member, outbound, ttl, |_| {}).await
}

/// `start_member_with_ttl`, letting the test adjust the proxy's config last.
pub async fn start_member_with(
    harness: &Harness,
    member: &Member,
    outbound: &[String],
    ttl: Option<Duration>,
    adjust: impl FnOnce(&mut latch_proxy::Config),
) -> latch_proxy::Proxy {
    let id = harness.id("demo", member.name);
    let mut config = harness.mesh_proxy_config(&id, ttl);
    let ip: IpAddr = member.ip.parse().expect("ip");
    config.data.inbound = Some(SocketAddr::new(ip, member.mesh_port));
    config.data.explicit = outbound
        .iter()
        .map(|o| o.parse().expect("outbound target"))
        .collect();
    if let Some(discovery) = config.discovery.as_mut() {
        discovery.workload_name = Some(format!("demo/{}", member.name));
    }
    adjust(&mut config);
    let proxy = crate::start_proxy(config).await;
    wait_ready(proxy.admin_addr, Duration::from_secs(15)).await;
    proxy
}
