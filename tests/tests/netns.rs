//! End-to-end tests on a real network: pods in their own network namespaces on a bridge, nginx
//! and curl as the apps, tcpdump watching the wire. The first test proves the capture sees
//! plaintext; the mesh tests run latch-control and a transparent latch-proxy (iptables
//! capture) in every meshed pod and assert what crosses the wire and who gets in. Need root.

use std::time::Duration;

use latch_testkit::binaries::workspace_binary;
use latch_testkit::netns::{
    Pod, PodControlPlane, PodProcess, Stack, TestNet, logs, netns_list, require_netns,
    require_netns_with,
};
use latch_testkit::spiffe_id;

/// What nginx answers; the tests look for it on the wire.
const BODY: &str = "hello from nginx in pod b, latch-plaintext-marker";

#[test]
fn plaintext_between_pods_is_visible_on_the_wire() {
    if !require_netns() {
        return;
    }
    let net = TestNet::new("plain");
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let nginx = b.start_nginx(BODY);

    let capture = b.capture();
    let reply = a.curl(&format!("http://{}/", b.ip()));
    let pcap = capture.stop();

    assert_eq!(reply.as_deref(), Ok(BODY), "nginx log:\n{}", nginx.log());
    let http = pcap.text("tcp port 80");
    assert!(
        http.contains(BODY),
        "the capture on b's cable should show the response in clear:\n{http}"
    );

    let created = net.namespaces();
    let nginx_pid = nginx.pid();
    drop(nginx);
    drop(net);
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|ns| created.contains(ns))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{nginx_pid}")).exists(),
        "nginx (pid {nginx_pid}) outlived the test network"
    );
}

#[test]
fn curl_reaches_nginx_across_pods_over_mtls() {
    if !require_netns_with(&["tshark"]) {
        return;
    }
    let net = TestNet::new("mtls");
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let nginx = b.start_nginx(BODY);
    let control = PodControlPlane::start(&net);
    let proxy_a = control.mesh(&a, &b);
    let proxy_b = control.mesh(&b, &a);

    let capture = b.capture();
    let reply = a.curl(&format!("http://{}/", b.ip()));
    let pcap = capture.stop();

    let logs = || logs(&[&proxy_a, &proxy_b, &nginx]);
    assert_eq!(reply.as_deref(), Ok(BODY), "{}", logs());
    pcap.assert_mesh_only(15008, 80, BODY);
}

#[test]
fn strict_refuses_unmeshed_clients_permissive_admits_them() {
    if !require_netns() {
        return;
    }
    let net = TestNet::new("strict");
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let c = net.add_pod("c");
    let nginx = b.start_nginx(BODY);
    let control = PodControlPlane::start(&net);
    let proxy_a = control.mesh(&a, &b);
    let proxy_b = control.mesh(&b, &a);
    let url = format!("http://{}/", b.ip());

    // B serves its meshed peer, so a refusal below is B's policy, not a broken setup.
    let meshed = a.curl(&url);
    assert_eq!(
        meshed.as_deref(),
        Ok(BODY),
        "{}",
        logs(&[&proxy_a, &proxy_b, &nginx])
    );
    let unmeshed = c.curl(&url);
    assert!(
        unmeshed.is_err(),
        "strict b answered c, which has no proxy: {unmeshed:?}"
    );

    drop(proxy_b);
    let proxy_b = control.start_proxy(&b, Some(&a), &["--inbound-mode", "permissive"]);
    assert_eq!(
        c.curl(&url).as_deref(),
        Ok(BODY),
        "permissive b should admit c in plaintext; {}",
        logs(&[&proxy_b, &nginx])
    );
}

#[test]
fn iptables_install_is_idempotent_and_uninstall_restores_the_table() {
    if !require_netns() {
        return;
    }
    let net = TestNet::with_stack("ipt", Stack::Dual);
    let pod = net.add_pod("a");
    let proxy = workspace_binary("latch-proxy");
    // Both families' nat tables, rules only: iptables-save prints counters and a timestamp.
    let nat = || -> Vec<String> {
        ["iptables-save", "ip6tables-save"]
            .iter()
            .flat_map(|save| {
                pod.run(save, &["-t", "nat"])
                    .lines()
                    .filter(|l| l.starts_with('-') || l.starts_with(':'))
                    .map(|l| format!("{save}: {}", l.split(" [").next().unwrap_or(l)))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let install = ["iptables", "install", "--exclude-outbound-ports", "22"];
    let before = nat();
    pod.run(&proxy, &install);
    let once = nat();
    pod.run(&proxy, &install);
    let twice = nat();
    assert_eq!(once, twice, "a second install changes nothing");
    for save in ["iptables-save", "ip6tables-save"] {
        for rule in [
            "-A LATCH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
            "-A LATCH_OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports 15001",
            "-A LATCH_INBOUND -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports 15006",
        ] {
            let rule = format!("{save}: {rule}");
            assert!(once.contains(&rule), "{rule} missing in {once:#?}");
        }
    }
    let printed = pod.run(
        &proxy,
        &["iptables", "print", "--exclude-outbound-ports", "22"],
    );
    assert_eq!(
        printed
            .matches("-A LATCH_OUTPUT -p tcp --dport 22 -j RETURN")
            .count(),
        2,
        "{printed}"
    );
    pod.run(&proxy, &["iptables", "uninstall"]);
    assert_eq!(
        nat(),
        before,
        "uninstall leaves both nat tables as they were"
    );
    pod.run(&proxy, &["iptables", "uninstall"]); // and is harmless when nothing is installed
}

#[test]
fn registry_only_refuses_unmeshed_destinations() {
    if !require_netns() {
        return;
    }
    let net = TestNet::new("reg");
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let c = net.add_pod("c");
    let _nginx_b = b.start_nginx(BODY);
    let _nginx_c = c.start_nginx(BODY);
    let control = PodControlPlane::start(&net);
    let proxy_b = control.mesh(&b, &a);
    let proxy_a = control.start_proxy(&a, Some(&b), &["--outbound-policy", "registry-only"]);
    a.run(workspace_binary("latch-proxy"), &["iptables", "install"]);
    // b is meshed: allowed. c is not: refused, where passthrough would have let it through.
    assert_eq!(
        a.curl(&format!("http://{}/", b.ip())).as_deref(),
        Ok(BODY),
        "{}",
        logs(&[&proxy_a, &proxy_b])
    );
    let outside = a.curl(&format!("http://{}/", c.ip()));
    assert!(
        outside.is_err(),
        "registry-only let a reach unmeshed c: {outside:?}"
    );
    assert!(proxy_a.log().contains("registry-only"), "{}", proxy_a.log());
}

/// A mesh config listing `pods` as workloads of namespace demo (service account and label
/// `app` = the pod's name, `role` = the name without digits), followed by `rest`.
fn mesh_yaml(pods: &[&Pod], rest: &str) -> String {
    let mut out = String::from("workloads:\n");
    for pod in pods {
        let role = pod.name.trim_end_matches(|c: char| c.is_ascii_digit());
        out.push_str(&format!(
            "  - name: {0}\n    namespace: demo\n    service_account: {0}\n    ips: [\"{1}\"]\n    labels: {{app: {0}, role: {role}}}\n",
            pod.name, pod.ip()
        ));
    }
    out + rest
}

const ALLOW_ONLY_A: &str = "policies:\n  - name: b-callers\n    namespace: demo\n    selector: {app: b}\n    action: ALLOW\n    rules:\n      - principals: [{exact: \"spiffe://cluster.local/ns/demo/sa/a\"}]\n";
const ALLOW_ONLY_C: &str = "policies:\n  - name: b-callers\n    namespace: demo\n    selector: {app: b}\n    action: ALLOW\n    rules:\n      - principals: [{exact: \"spiffe://cluster.local/ns/demo/sa/c\"}]\n";

#[test]
fn policies_from_discovery_allow_deny_and_cut_live_connections() {
    if !require_netns() {
        return;
    }
    let net = TestNet::new("authz");
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let c = net.add_pod("c");
    let nginx = b.start_nginx(BODY);
    let control = PodControlPlane::start_with(&net, &mesh_yaml(&[&a, &b, &c], ALLOW_ONLY_A));
    let proxy_b = control.mesh_discovered(&b);
    let proxy_a = control.mesh_discovered(&a);
    let proxy_c = control.mesh_discovered(&c);
    let logs = || logs(&[&proxy_a, &proxy_b, &proxy_c, &nginx, &control.process]);
    let url = format!("http://{}/", b.ip());

    // The policy selecting b allows a only; c is a meshed peer with a valid SVID all the same.
    assert_eq!(a.curl(&url).as_deref(), Ok(BODY), "{}", logs());
    let refused = c.curl(&url);
    assert!(refused.is_err(), "b's policy let c in: {refused:?}");
    let c_label = format!("peer=\"{}\"", spiffe_id("c"));
    assert_eq!(
        b.proxy_metric("latch_proxy_authorization_denials", &[&c_label]),
        1.0,
        "{}",
        logs()
    );
    assert!(
        proxy_b.log().contains("denied") && proxy_b.log().contains(&spiffe_id("c")),
        "b's proxy should log the denial with c's ID:\n{}",
        proxy_b.log()
    );

    // A live connection from a: one request answered, then it waits on the open socket.
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/80 || exit 1\n\
         printf 'GET / HTTP/1.1\\r\\nHost: b\\r\\n\\r\\n' >&3\n\
         IFS= read -r -t 5 status <&3 && echo \"FIRST $status\"\n\
         while IFS= read -r -t 1 line <&3; do :; done\n\
         IFS= read -r -t 60 line <&3; echo \"END rc=$?\"\n",
        ip = b.ip()
    );
    let live = a.spawn("bash", &["-c", &script], None, &net.dir().join("live.log"));
    live.wait_until(
        Duration::from_secs(10),
        "the live connection's first answer",
        || live.log().contains("FIRST HTTP/1.1 200"),
    );
    // The policy changes to allow c only: a's open connection is cut, c gets in.
    control.write_config(&mesh_yaml(&[&a, &b, &c], ALLOW_ONLY_C));
    live.wait_until(
        Duration::from_secs(15),
        "the live connection closed by b",
        || live.log().contains("END rc="),
    );
    assert!(
        live.log().contains("END rc=1"),
        "the connection should end with EOF (rc=1), not a read timeout: {}\n{}",
        live.log(),
        logs()
    );
    assert_eq!(c.curl(&url).as_deref(), Ok(BODY), "{}", logs());
    assert!(a.curl(&url).is_err(), "a is no longer allowed");
    assert!(
        b.proxy_metric("latch_proxy_tcp_connections_closed_by_policy", &[]) >= 1.0,
        "{}",
        logs()
    );
}

#[test]
fn service_vip_spreads_over_endpoints_and_skips_removed_ones() {
    if !require_netns() {
        return;
    }
    const VIP: &str = "10.96.0.10";
    let net = TestNet::new("vip");
    let a = net.add_pod("a");
    let backends = [
        net.add_pod("web1"),
        net.add_pod("web2"),
        net.add_pod("web3"),
    ];
    let servers: Vec<PodProcess> = backends
        .iter()
        .map(|pod| pod.start_nginx(&format!("served by {}", pod.name)))
        .collect();
    let pods: Vec<&Pod> = std::iter::once(&a).chain(backends.iter()).collect();
    let service = |endpoints: &[&Pod]| {
        let ips: Vec<String> = endpoints
            .iter()
            .map(|p| format!("\"{}\"", p.ip()))
            .collect();
        format!(
            "services:\n  - name: web\n    namespace: demo\n    vips: [\"{VIP}\"]\n    ports: [{{port: 80, target_port: 80}}]\n    endpoints: [{}]\n",
            ips.join(", ")
        )
    };
    let all: Vec<&Pod> = backends.iter().collect();
    let control = PodControlPlane::start_with(&net, &mesh_yaml(&pods, &service(&all)));
    let mut proxies: Vec<PodProcess> = backends
        .iter()
        .map(|p| control.mesh_discovered(p))
        .collect();
    proxies.push(control.mesh_discovered(&a));
    let logs = || {
        let mut all: Vec<&PodProcess> = proxies.iter().collect();
        all.extend(servers.iter());
        logs(&all)
    };
    let tally = |n: usize| {
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..n {
            let body = a
                .curl(&format!("http://{VIP}/"))
                .unwrap_or_else(|e| format!("error: {e}"));
            *counts.entry(body).or_insert(0) += 1;
        }
        counts
    };
    let first = tally(30);
    for pod in &backends {
        assert!(
            first
                .get(&format!("served by {}", pod.name))
                .copied()
                .unwrap_or(0)
                > 0,
            "30 connections to the VIP never reached {}: {first:?}\n{}",
            pod.name,
            logs()
        );
    }
    assert_eq!(first.values().sum::<i32>(), 30, "{first:?}");

    // web3 leaves the service; once a's proxy has the change, no new connection goes there.
    let applied =
        |pod: &Pod| pod.proxy_metric("latch_proxy_discovery_responses_applied", &["Service"]);
    let before = applied(&a);
    control.write_config(&mesh_yaml(&pods, &service(&all[..2])));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while applied(&a) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "a's proxy never applied the service change ({before} Service responses applied \
             before the edit)\n{}\n{}",
            logs(),
            control.process.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = tally(30);
    assert_eq!(
        second.get("served by web3"),
        None,
        "a removed endpoint got new connections: {second:?}"
    );
    assert_eq!(
        second.get("served by web1").copied().unwrap_or(0)
            + second.get("served by web2").copied().unwrap_or(0),
        30,
        "{second:?}\n{}",
        logs()
    );
}
