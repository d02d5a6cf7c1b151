//! The mesh's boundary on a real network (issue 17): what a meshed peer (A3) or an unmeshed pod
//! (A2) can reach through a pod's proxy, over IPv4 and IPv6. Dual-stack and IPv6-only pods in
//! network namespaces with transparent capture (iptables and ip6tables), nginx as the apps: a
//! service bound to the pod's loopback stays private, the proxy's own ports are never a target,
//! its admin answers `/debug/*` on loopback only, plaintext aimed at the capture ports is
//! refused without the proxy connecting to itself, and no IPv6 connection goes around the
//! proxy. Needs root (see crates/testkit/src/netns.rs).

use std::net::IpAddr;
use std::time::Duration;

use latch_testkit::binaries::workspace_binary;
use latch_testkit::netns::{
    PROXY_ADMIN, Pod, PodControlPlane, PodProcess, Stack, TestNet, logs, require_netns,
    require_netns_with, which,
};
use latch_testkit::spiffe_id;

/// What the app on the pod's addresses answers.
const PUBLIC: &str = "public app on the pod address";
/// What the loopback-only service answers; it must never cross the mesh.
const PRIVATE: &str = "loopback-only service, latch-private-marker";
/// The loopback-only service's port.
const PRIVATE_PORT: u16 = 8081;

fn proxy_port_refusals(pod: &Pod, direction: &str) -> f64 {
    pod.proxy_metric(
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

/// Asserts that `client` gets no answer from `url`.
fn assert_unreachable(client: &Pod, url: &str, what: &str) {
    let reply = client.curl(url);
    assert!(reply.is_err(), "{} reached {what}: {reply:?}", client.name);
}

#[test]
fn loopback_services_and_the_proxy_admin_are_unreachable_through_the_mesh() {
    if !require_netns_with(&["tshark"]) {
        return;
    }
    let net = TestNet::with_stack("bound", Stack::Dual);
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let c = net.add_pod("c");
    let public = b.start_nginx(PUBLIC);
    let private = b.start_nginx_on(
        &[
            &format!("127.0.0.1:{PRIVATE_PORT}"),
            &format!("[::1]:{PRIVATE_PORT}"),
        ],
        PRIVATE,
    );
    let control = PodControlPlane::start(&net);
    let proxy_a = control.mesh(&a, &b);
    let proxy_b = control.mesh(&b, &a);
    let all_logs = |proxy_b: &PodProcess| logs(&[&proxy_a, proxy_b, &public, &private]);

    // STRICT: the meshed peer reaches the app on both of b's addresses, so every refusal below
    // is the boundary, not a broken setup. Over IPv6 the wire shows TLS 1.3 on 15008 only.
    assert_eq!(
        a.curl(&Pod::url(b.ip(), 80)).as_deref(),
        Ok(PUBLIC),
        "{}",
        all_logs(&proxy_b)
    );
    let capture = b.capture();
    let reply = a.curl(&Pod::url(b.ip6(), 80));
    let pcap = capture.stop();
    assert_eq!(reply.as_deref(), Ok(PUBLIC), "{}", all_logs(&proxy_b));
    assert!(
        !pcap.text("ip6 and tcp port 15008").is_empty(),
        "the IPv6 request crossed the wire over IPv6:\n{}",
        pcap.text("")
    );
    pcap.assert_mesh_only(15008, 80, PUBLIC);

    // An unmeshed pod is refused over IPv6 as over IPv4.
    for ip in &b.ips {
        assert_unreachable(&c, &Pod::url(*ip, 80), "a STRICT app without mTLS");
    }
    for ip in &b.ips {
        assert_unreachable(
            &a,
            &Pod::url(*ip, PRIVATE_PORT),
            "b's loopback-only service",
        );
    }

    // The transport header names b's admin port (and the capture port): refused and counted,
    // logged with the peer's ID.
    for ip in &b.ips {
        for port in [15020, 15006] {
            let url = format!("{}debug/config", Pod::url(*ip, port));
            assert_unreachable(&a, &url, "b's proxy through the tunnel");
        }
    }
    let refused = proxy_port_refusals(&b, "inbound");
    assert!(refused >= 4.0, "refusals counted: {refused}");
    let log = proxy_b.log();
    assert!(
        log.contains("proxy's own port") && log.contains(&spiffe_id("a")),
        "the refusal is logged with the peer's ID:\n{log}"
    );

    // PERMISSIVE: neither the meshed peer nor an unmeshed pod reaches the loopback service;
    // both reach the app on b's addresses.
    drop(proxy_b);
    let proxy_b = control.start_proxy(&b, Some(&a), &["--inbound-mode", "permissive"]);
    for ip in &b.ips {
        let url = Pod::url(*ip, 80);
        assert_eq!(
            c.curl(&url).as_deref(),
            Ok(PUBLIC),
            "{}",
            all_logs(&proxy_b)
        );
        assert_eq!(a.curl(&url).as_deref(), Ok(PUBLIC));
        for pod in [&a, &c] {
            let url = Pod::url(*ip, PRIVATE_PORT);
            assert_unreachable(pod, &url, "b's loopback-only service (permissive)");
        }
    }

    // The operator can still deliver one port to loopback, explicitly.
    drop(proxy_b);
    let proxy_b = control.start_proxy(
        &b,
        Some(&a),
        &["--inbound-loopback-port", &PRIVATE_PORT.to_string()],
    );
    for ip in &b.ips {
        assert_eq!(
            a.curl(&Pod::url(*ip, PRIVATE_PORT)).as_deref(),
            Ok(PRIVATE),
            "--inbound-loopback-port delivers to loopback; {}",
            all_logs(&proxy_b)
        );
    }
}

#[test]
fn the_proxy_admin_serves_debug_on_loopback_only_and_survives_a_flood() {
    if !require_netns() {
        return;
    }
    let net = TestNet::with_stack("admin", Stack::Dual);
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let c = net.add_pod("c");
    let nginx = b.start_nginx(PUBLIC);
    let control = PodControlPlane::start(&net);
    let proxy_a = control.mesh(&a, &b);
    let proxy_b = control.mesh(&b, &a);
    let all_logs = || logs(&[&proxy_a, &proxy_b, &nginx]);

    // The admin listens on every address of the pod, as the injector sets it: the kubelet's
    // probes and Prometheus reach /ready and /metrics, another pod never reaches /debug.
    for ip in &b.ips {
        let admin = Pod::url(*ip, 15020);
        assert_eq!(c.curl(&format!("{admin}ready")).as_deref(), Ok("ready\n"));
        for path in ["debug/config", "debug/certs"] {
            assert_unreachable(
                &c,
                &format!("{admin}{path}"),
                "b's /debug over the pod network",
            );
        }
    }
    let config = b
        .curl(&format!("http://{PROXY_ADMIN}/debug/config"))
        .unwrap_or_else(|e| panic!("/debug/config from b's loopback: {e}\n{}", all_logs()));
    assert!(
        config.contains(&spiffe_id("a")),
        "b's peers are in its config: {config}"
    );

    // 10,000 connections to b's admin from one client in c, held open: the per-source cap
    // refuses all but a few, real traffic and /ready carry on, and b's descriptors stay flat.
    let before = open_fds(&proxy_b);
    let flood = c.spawn(
        "python3",
        &["-c", FLOOD, &b.ip().to_string(), "15020", "10000"],
        None,
        &net.dir().join("flood.log"),
    );
    flood.wait_until(Duration::from_secs(60), "the flood's connections", || {
        flood.log().contains("attempted 10000")
    });
    eprintln!("{}", flood.log().trim());
    let during = open_fds(&proxy_b);
    assert_eq!(
        a.curl(&Pod::url(b.ip(), 80)).as_deref(),
        Ok(PUBLIC),
        "real traffic under the admin flood; {}",
        all_logs()
    );
    // The kubelet probes from the node: here the router namespace.
    let kubelet = net.router();
    for ip in &b.ips {
        assert_eq!(
            kubelet
                .curl(&format!("{}ready", Pod::url(*ip, 15020)))
                .as_deref(),
            Ok("ready\n"),
            "/ready under the admin flood"
        );
    }
    eprintln!("b's proxy descriptors: {before} before the flood, {during} during it");
    assert!(
        during < before + 100,
        "the admin flood held {during} descriptors of b's proxy (from {before})"
    );
    drop(flood);
}

/// Opens argv[3] TCP connections to argv[1]:argv[2] from one process and holds every one that
/// connects, then waits to be killed; prints how many connected and how many the server has
/// closed (EOF) after a second.
const FLOOD: &str = r#"
import resource, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, count + 100))
held = []
for _ in range(count):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        continue
    held.append(s)
time.sleep(1)
closed = 0
for s in held:
    try:
        if s.recv(1) == b"":
            closed += 1
    except (BlockingIOError, OSError):
        pass
print(f"attempted {count}, closed by the server {closed}", flush=True)
time.sleep(600)
"#;

#[test]
fn permissive_plaintext_to_the_capture_ports_is_refused_and_holds_no_descriptors() {
    if !require_netns() {
        return;
    }
    let net = TestNet::with_stack("loop", Stack::Dual);
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
    for ip in &b.ips {
        assert_eq!(
            c.curl(&Pod::url(*ip, 80)).as_deref(),
            Ok(PUBLIC),
            "{}",
            logs(&[&proxy_a, &proxy_b, &nginx])
        );
    }
    // Settle: the connections of the requests above are closed.
    std::thread::sleep(Duration::from_millis(500));
    let before = open_fds(&proxy_b);

    // Plaintext straight at the capture listeners, from an unmeshed pod, over both families:
    // before the fix one such connection made the proxy connect to its own listener until it
    // ran out of descriptors.
    for _ in 0..3 {
        for ip in &b.ips {
            for port in [15006, 15001] {
                assert_unreachable(&c, &Pod::url(*ip, port), "a capture port");
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = open_fds(&proxy_b);
    eprintln!(
        "b's proxy descriptors: {before} before, {after} after 12 connections to 15006/15001"
    );
    assert!(
        after <= before + 2,
        "descriptors grew from {before} to {after}; {}",
        proxy_b.log()
    );
    assert!(proxy_port_refusals(&b, "inbound_plaintext") >= 6.0);
    assert!(proxy_port_refusals(&b, "outbound") >= 6.0);

    // A packet for another host's address sent to b (c routes d's addresses via b):
    // PREROUTING captures it with d's address as the original destination. The proxy is no
    // relay, over either family.
    for (d_ip, b_ip) in d.ips.iter().zip(&b.ips) {
        let relay_target = Pod::url(*d_ip, 80);
        assert_eq!(
            c.curl(&relay_target).as_deref(),
            Ok(PUBLIC),
            "d answers c directly"
        );
        let (family, prefix) = if d_ip.is_ipv4() {
            ("-4", 32)
        } else {
            ("-6", 128)
        };
        let route = format!("{d_ip}/{prefix}");
        c.run(
            "ip",
            &[family, "route", "add", &route, "via", &b_ip.to_string()],
        );
        assert_unreachable(&c, &relay_target, "d through b's proxy (a relay)");
    }
    let not_local = b.proxy_metric(
        "latch_proxy_tcp_connections_refused_total",
        &[
            "direction=\"inbound_plaintext\"",
            "reason=\"not_local_destination\"",
        ],
    );
    assert!(not_local >= 2.0, "counted: {not_local}; {}", proxy_b.log());

    // Real traffic is unaffected, meshed and plaintext.
    for ip in &b.ips {
        assert_eq!(a.curl(&Pod::url(*ip, 80)).as_deref(), Ok(PUBLIC));
        assert_eq!(c.curl(&Pod::url(*ip, 80)).as_deref(), Ok(PUBLIC));
    }
    let settled = open_fds(&proxy_b);
    eprintln!("b's proxy descriptors after real traffic: {settled}");
}

#[test]
fn an_ipv6_only_pair_of_pods_talks_mtls_and_refuses_the_unmeshed() {
    if !require_netns_with(&["tshark"]) {
        return;
    }
    let net = TestNet::with_stack("v6only", Stack::Ipv6);
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let c = net.add_pod("c");
    assert!(b.ips.iter().all(IpAddr::is_ipv6), "{:?}", b.ips);
    let nginx = b.start_nginx(PUBLIC);
    let control = PodControlPlane::start(&net);
    let proxy_a = control.mesh(&a, &b);
    let proxy_b = control.mesh(&b, &a);

    let capture = b.capture();
    let reply = a.curl(&Pod::url(b.ip(), 80));
    let pcap = capture.stop();
    assert_eq!(
        reply.as_deref(),
        Ok(PUBLIC),
        "{}",
        logs(&[&proxy_a, &proxy_b, &nginx, &control.process])
    );
    pcap.assert_mesh_only(15008, 80, PUBLIC);
    assert_unreachable(&c, &Pod::url(b.ip(), 80), "a STRICT app without mTLS");
}

#[test]
fn iptables_install_refuses_to_leave_ipv6_uncaptured() {
    if !require_netns() {
        return;
    }
    // A PATH with the IPv4 tools only: as in an image without ip6tables.
    let net = TestNet::with_stack("nov6", Stack::Dual);
    let bin = net.dir().join("ipv4-only-bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    for tool in ["iptables", "iptables-restore"] {
        let target = which(tool).unwrap_or_else(|| panic!("{tool} is not on PATH"));
        std::os::unix::fs::symlink(&target, bin.join(tool)).expect("symlink");
    }
    let path = format!("PATH={}", bin.display());
    let proxy = workspace_binary("latch-proxy");
    let proxy = proxy.to_str().expect("utf-8 path");
    let install = |pod: &Pod| pod.exec("env", &[&path, proxy, "iptables", "install"]);
    let latch_rules = |pod: &Pod| {
        pod.run("iptables-save", &["-t", "nat"])
            .lines()
            .filter(|l| l.contains("LATCH"))
            .count()
    };

    // A dual-stack pod: install fails, says why in one line, and leaves no rule behind.
    let dual = net.add_pod("dual");
    let output = install(&dual);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "install succeeded:\n{stderr}");
    assert!(
        stderr.contains(&format!("this pod has the IPv6 address {}", dual.ip6()))
            && stderr.contains("IPv6 traffic would bypass the proxy")
            && stderr.contains("ip6tables-restore"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "said once:\n{stderr}");
    assert_eq!(latch_rules(&dual), 0, "IPv4 rules left behind");

    // With ip6tables: both families' rules, and install stays idempotent.
    for _ in 0..2 {
        dual.run(proxy, &["iptables", "install"]);
    }
    let v6 = dual.run("ip6tables-save", &["-t", "nat"]);
    assert_eq!(
        v6.lines()
            .filter(|l| l.contains("REDIRECT --to-ports 15001"))
            .count(),
        1,
        "{v6}"
    );
    assert!(v6.contains("-d ::1/128 -j RETURN"), "{v6}");
    dual.run(proxy, &["iptables", "uninstall"]);
    assert!(
        !dual.run("ip6tables-save", &["-t", "nat"]).contains("LATCH"),
        "uninstall removes the IPv6 rules"
    );

    // An IPv4-only pod (no global IPv6 address): IPv4 rules, and a warning saying why that is
    // safe.
    let v4_net = TestNet::new("nov6b");
    let v4 = v4_net.add_pod("v4");
    let output = install(&v4);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("IPv4 only") && stderr.contains("no global IPv6 address"),
        "{stderr}"
    );
    assert!(latch_rules(&v4) > 0);
    v4.run(proxy, &["iptables", "uninstall"]);
}
