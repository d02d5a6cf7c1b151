//! The mesh's boundary on a real network (issue 17): what a meshed peer (A3) or an unmeshed pod
//! (A2) can reach through a pod's proxy. Pods in network namespaces with transparent capture,
//! nginx as the apps: a service bound to the pod's loopback stays private, the proxy's own
//! ports are never a target, and plaintext aimed at the capture ports is refused without the
//! proxy connecting to itself. Needs root (see crates/testkit/src/netns.rs).

use std::time::Duration;

use latch_testkit::netns::{
    PROXY_ADMIN, Pod, PodControlPlane, PodProcess, TestNet, logs, require_netns,
};
use latch_testkit::spiffe_id;

/// What the app on the pod's address answers.
const PUBLIC: &str = "public app on the pod address";
/// What the loopback-only service answers; it must never cross the mesh.
const PRIVATE: &str = "loopback-only service, latch-private-marker";
/// The loopback-only service's port.
const PRIVATE_PORT: u16 = 8081;

/// One metric's value from the proxy's /metrics in `pod` (0 when absent): the first line that
/// starts with `name` and contains every one of `labels`.
fn metric(pod: &Pod, name: &str, labels: &[&str]) -> f64 {
    let text = pod
        .curl(&format!("http://{PROXY_ADMIN}/metrics"))
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next()
        .unwrap_or(0.0)
}

fn proxy_port_refusals(pod: &Pod, direction: &str) -> f64 {
    metric(
        pod,
        "latch_proxy_tcp_connections_refused_total",
        &[
            &format!("direction=\"{direction}\""),
            "reason=\"proxy_port\"",
        ],
    )
}

/// Open descriptors of `process` (/proc/<pid>/fd).
fn open_fds(process: &PodProcess) -> usize {
    let pid = process.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "latch-proxy", "pid {pid} is not the proxy");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .count()
}

#[test]
fn loopback_services_and_the_proxy_admin_are_unreachable_through_the_mesh() {
    if !require_netns() {
        return;
    }
    let net = TestNet::new("bound");
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let c = net.add_pod("c");
    let public = b.start_nginx(PUBLIC);
    let private = b.start_nginx_on(&format!("127.0.0.1:{PRIVATE_PORT}"), PRIVATE);
    let control = PodControlPlane::start(&net);
    let proxy_a = control.mesh(&a, &b);
    let proxy_b = control.mesh(&b, &a);
    let public_url = format!("http://{}/", b.ip);
    let private_url = format!("http://{}:{PRIVATE_PORT}/", b.ip);
    let all_logs = |proxy_b: &PodProcess| logs(&[&proxy_a, proxy_b, &public, &private]);

    // STRICT: the meshed peer reaches the app on b's address, so every refusal below is the
    // boundary, not a broken setup.
    assert_eq!(
        a.curl(&public_url).as_deref(),
        Ok(PUBLIC),
        "{}",
        all_logs(&proxy_b)
    );
    let reply = a.curl(&private_url);
    assert!(
        reply.is_err(),
        "a meshed peer reached b's loopback-only service: {reply:?}"
    );

    // The transport header names b's admin port (and the capture port): refused and counted,
    // logged with the peer's ID.
    for port in [15020, 15006] {
        let reply = a.curl(&format!("http://{}:{port}/debug/config", b.ip));
        assert!(
            reply.is_err(),
            "a reached b's proxy on port {port} through the tunnel: {reply:?}"
        );
    }
    let refused = proxy_port_refusals(&b, "inbound");
    assert!(refused >= 2.0, "refusals counted: {refused}");
    let log = proxy_b.log();
    assert!(
        log.contains("proxy's own port") && log.contains(&spiffe_id("a")),
        "the refusal is logged with the peer's ID:\n{log}"
    );

    // PERMISSIVE: neither the meshed peer nor an unmeshed pod reaches the loopback service;
    // both reach the app on b's address.
    drop(proxy_b);
    let proxy_b = control.start_proxy(&b, Some(&a), &["--inbound-mode", "permissive"]);
    assert_eq!(
        c.curl(&public_url).as_deref(),
        Ok(PUBLIC),
        "{}",
        all_logs(&proxy_b)
    );
    assert_eq!(a.curl(&public_url).as_deref(), Ok(PUBLIC));
    for (who, pod) in [("meshed a", &a), ("unmeshed c", &c)] {
        let reply = pod.curl(&private_url);
        assert!(
            reply.is_err(),
            "permissive: {who} reached b's loopback-only service: {reply:?}"
        );
    }
    let reply = c.curl(&format!("http://{}:15020/metrics", b.ip));
    assert!(reply.is_err(), "c reached b's admin port: {reply:?}");

    // The operator can still deliver one port to loopback, explicitly.
    drop(proxy_b);
    let proxy_b = control.start_proxy(
        &b,
        Some(&a),
        &["--inbound-loopback-port", &PRIVATE_PORT.to_string()],
    );
    assert_eq!(
        a.curl(&private_url).as_deref(),
        Ok(PRIVATE),
        "--inbound-loopback-port delivers to loopback; {}",
        all_logs(&proxy_b)
    );
}

#[test]
fn permissive_plaintext_to_the_capture_ports_is_refused_and_holds_no_descriptors() {
    if !require_netns() {
        return;
    }
    let net = TestNet::new("loop");
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let c = net.add_pod("c");
    let d = net.add_pod("d");
    let nginx = b.start_nginx(PUBLIC);
    let _nginx_d = d.start_nginx(PUBLIC);
    let control = PodControlPlane::start(&net);
    let proxy_a = control.mesh(&a, &b);
    let proxy_b = control.start_proxy(&b, Some(&a), &["--inbound-mode", "permissive"]);
    control.capture(&b);
    let url = format!("http://{}/", b.ip);
    assert_eq!(
        c.curl(&url).as_deref(),
        Ok(PUBLIC),
        "{}",
        logs(&[&proxy_a, &proxy_b, &nginx])
    );
    // Settle: the connections of the request above are closed.
    std::thread::sleep(Duration::from_millis(500));
    let before = open_fds(&proxy_b);

    // Plaintext straight at the capture listeners, from an unmeshed pod: before the fix one
    // such connection made the proxy connect to its own listener until it ran out of
    // descriptors.
    for _ in 0..5 {
        for port in [15006, 15001] {
            let reply = c.curl(&format!("http://{}:{port}/", b.ip));
            assert!(
                reply.is_err(),
                "c got an answer from b's port {port}: {reply:?}"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = open_fds(&proxy_b);
    eprintln!(
        "b's proxy descriptors: {before} before, {after} after 10 connections to 15006/15001"
    );
    assert!(
        after <= before + 2,
        "descriptors grew from {before} to {after}; {}",
        proxy_b.log()
    );
    assert!(proxy_port_refusals(&b, "inbound_plaintext") >= 5.0);
    assert!(proxy_port_refusals(&b, "outbound") >= 5.0);

    // A packet for another host's address sent to b (c routes d's address via b): PREROUTING
    // captures it with d's address as the original destination. The proxy is no relay.
    let relay_target = format!("http://{}/", d.ip);
    assert_eq!(
        c.curl(&relay_target).as_deref(),
        Ok(PUBLIC),
        "d answers c directly"
    );
    c.run(
        "ip",
        &[
            "route",
            "add",
            &format!("{}/32", d.ip),
            "via",
            &b.ip.to_string(),
        ],
    );
    let relayed = c.curl(&relay_target);
    assert!(relayed.is_err(), "b's proxy relayed c to d: {relayed:?}");
    let not_local = metric(
        &b,
        "latch_proxy_tcp_connections_refused_total",
        &[
            "direction=\"inbound_plaintext\"",
            "reason=\"not_local_destination\"",
        ],
    );
    assert!(not_local >= 1.0, "counted: {not_local}; {}", proxy_b.log());

    // Real traffic is unaffected, meshed and plaintext.
    assert_eq!(a.curl(&url).as_deref(), Ok(PUBLIC));
    assert_eq!(c.curl(&url).as_deref(), Ok(PUBLIC));
    let settled = open_fds(&proxy_b);
    eprintln!("b's proxy descriptors after real traffic: {settled}");
}
