//! End-to-end tests on a real network: pods in their own network namespaces on a bridge, nginx
//! and curl as the apps, tcpdump watching the wire. The first test proves the capture sees
//! plaintext; the mesh tests run latch-control and a transparent latch-proxy (iptables
//! capture) in every meshed pod and assert what crosses the wire and who gets in. Need root.

use std::path::PathBuf;
use std::time::Duration;

use latch_identity::files::{ensure_private_dir, write_private};
use latch_tests::netns::{Pod, PodProcess, TestNet, netns_list, require_netns, require_netns_with};
use latch_tests::procs::workspace_binary;

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
    let reply = a.curl(&format!("http://{}/", b.ip));
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
    let control = ControlPlane::start(&net);
    let proxy_a = control.mesh(&a, &b);
    let proxy_b = control.mesh(&b, &a);

    let capture = b.capture();
    let reply = a.curl(&format!("http://{}/", b.ip));
    let pcap = capture.stop();

    let logs = || logs(&[&proxy_a, &proxy_b, &nginx]);
    assert_eq!(reply.as_deref(), Ok(BODY), "{}", logs());
    assert!(
        !pcap.text("tcp port 15008").is_empty(),
        "the request should cross the wire to b's mTLS port 15008:\n{}",
        pcap.text("")
    );
    assert_eq!(
        pcap.text("tcp port 80"),
        "",
        "nothing should reach b's port 80 over the wire"
    );
    let everything = pcap.text("");
    assert!(
        !everything.contains(BODY),
        "the response crossed the wire in clear:\n{everything}"
    );
    // Every ServerHello on the mesh port negotiates TLS 1.3 (supported_versions = 0x0304).
    let versions = pcap.tshark(&[
        "-d",
        "tcp.port==15008,tls",
        "-Y",
        "tls.handshake.type == 2",
        "-T",
        "fields",
        "-e",
        "tls.handshake.extensions.supported_version",
    ]);
    let versions: Vec<&str> = versions.lines().collect();
    assert!(
        !versions.is_empty() && versions.iter().all(|v| *v == "0x0304"),
        "expected TLS 1.3 ServerHellos on port 15008, got {versions:?}"
    );
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
    let control = ControlPlane::start(&net);
    let proxy_a = control.mesh(&a, &b);
    let proxy_b = control.mesh(&b, &a);
    let url = format!("http://{}/", b.ip);

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
    let proxy_b = control.start_proxy(&b, &a, &["--inbound-mode", "permissive"]);
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
    let net = TestNet::new("ipt");
    let pod = net.add_pod("a");
    let proxy = workspace_binary("latch-proxy");
    let nat = || pod.run("iptables-save", &["-t", "nat"]);
    // iptables-save prints counters and a timestamp; compare the rules only.
    let rules = |dump: String| -> Vec<String> {
        dump.lines()
            .filter(|l| l.starts_with('-') || l.starts_with(':'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_string())
            .collect()
    };
    let before = rules(nat());
    pod.run(
        &proxy,
        &["iptables", "install", "--exclude-outbound-ports", "22"],
    );
    let once = rules(nat());
    pod.run(
        &proxy,
        &["iptables", "install", "--exclude-outbound-ports", "22"],
    );
    let twice = rules(nat());
    assert_eq!(once, twice, "a second install changes nothing");
    assert!(
        once.iter()
            .any(|l| l == "-A LATCH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN"),
        "{once:#?}"
    );
    assert!(
        once.iter().any(|l| l.contains("REDIRECT --to-ports 15001")),
        "{once:#?}"
    );
    assert!(
        once.iter().any(|l| l.contains("REDIRECT --to-ports 15006")),
        "{once:#?}"
    );
    let printed = pod.run(
        &proxy,
        &["iptables", "print", "--exclude-outbound-ports", "22"],
    );
    assert!(
        printed.contains("-A LATCH_OUTPUT -p tcp --dport 22 -j RETURN"),
        "{printed}"
    );
    pod.run(&proxy, &["iptables", "uninstall"]);
    assert_eq!(
        rules(nat()),
        before,
        "uninstall leaves the nat table as it was"
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
    let control = ControlPlane::start(&net);
    let proxy_b = control.mesh(&b, &a);
    let proxy_a = control.start_proxy(&a, &b, &["--outbound-policy", "registry-only"]);
    a.run(workspace_binary("latch-proxy"), &["iptables", "install"]);
    // b is meshed: allowed. c is not: refused, where passthrough would have let it through.
    assert_eq!(
        a.curl(&format!("http://{}/", b.ip)).as_deref(),
        Ok(BODY),
        "{}",
        logs(&[&proxy_a, &proxy_b])
    );
    let outside = a.curl(&format!("http://{}/", c.ip));
    assert!(
        outside.is_err(),
        "registry-only let a reach unmeshed c: {outside:?}"
    );
    assert!(proxy_a.log().contains("registry-only"), "{}", proxy_a.log());
}

/// The uid latch-proxy runs as; `latch-proxy iptables install` never captures its traffic.
const PROXY_UID: u32 = 1337;
const PROXY_ADMIN: &str = "127.0.0.1:15020";
/// latch-control's admin API, on the router namespace's loopback (latchctl runs there too).
const CONTROL_ADMIN: &str = "127.0.0.1:15014";

/// The SPIFFE ID of pod `name`.
fn spiffe_id(name: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{name}")
}

/// The logs of `processes`, for assertion messages.
fn logs(processes: &[&PodProcess]) -> String {
    processes
        .iter()
        .map(|p| format!("--- {} ---\n{}", p.name(), p.log()))
        .collect()
}

fn utf8(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// latch-control in the router namespace: pods reach it at 10.X.0.1:15010.
struct ControlPlane<'n> {
    net: &'n TestNet,
    router: Pod<'n>,
    data_dir: PathBuf,
    listen: String,
    _process: PodProcess<'n>,
}

impl<'n> ControlPlane<'n> {
    fn start(net: &'n TestNet) -> Self {
        let router = net.router();
        let data_dir = net.dir().join("control");
        let listen = format!("{}:15010", router.ip);
        let process = router.spawn(
            workspace_binary("latch-control"),
            &[
                "--data-dir",
                utf8(&data_dir),
                "--listen",
                &listen,
                "--admin",
                CONTROL_ADMIN,
            ],
            None,
            &net.dir().join("control.log"),
        );
        process.wait_until(Duration::from_secs(15), "latch-control started", || {
            process.log().contains("control plane started")
        });
        Self {
            net,
            router,
            data_dir,
            listen,
            _process: process,
        }
    }

    /// A new single-use join token for `id`, from `latchctl token create`.
    fn join_token(&self, id: &str) -> String {
        self.router.run(
            workspace_binary("latchctl"),
            &[
                "token",
                "create",
                "--spiffe-id",
                id,
                "--admin",
                CONTROL_ADMIN,
                "--data-dir",
                utf8(&self.data_dir),
            ],
        )
    }

    /// Meshes `pod`: a transparent proxy that knows `peer`, then the iptables capture.
    fn mesh(&self, pod: &Pod<'n>, peer: &Pod) -> PodProcess<'n> {
        let proxy = self.start_proxy(pod, peer, &[]);
        let capture = ["iptables", "install", "--proxy-uid", &PROXY_UID.to_string()];
        pod.run(workspace_binary("latch-proxy"), &capture);
        proxy
    }

    /// Starts a transparent latch-proxy in `pod` as uid 1337 with a fresh join token for
    /// `pod`'s SPIFFE ID, `peer` as its one meshed peer and `extra` flags, and waits until it
    /// holds an SVID.
    fn start_proxy(&self, pod: &Pod<'n>, peer: &Pod, extra: &[&str]) -> PodProcess<'n> {
        let dir = self.net.dir().join(format!("proxy-{}", pod.name));
        let bundle = dir.join("bundle.pem");
        let token = dir.join("join-token");
        let token_value = self.join_token(&spiffe_id(&pod.name));
        ensure_private_dir(&dir).expect("proxy dir");
        std::fs::copy(self.data_dir.join("bundle.pem"), &bundle).expect("copy bundle");
        write_private(&token, token_value.as_bytes()).expect("token file");
        for path in [&dir, &bundle, &token] {
            std::os::unix::fs::chown(path, Some(PROXY_UID), Some(PROXY_UID)).expect("chown");
        }

        let peer = format!("{}={}", peer.ip, spiffe_id(&peer.name));
        let mut args = vec![
            "--control-plane",
            &self.listen,
            "--ca-bundle",
            utf8(&bundle),
            "--join-token-file",
            utf8(&token),
            "--trust-domain",
            "cluster.local",
            "--admin",
            PROXY_ADMIN,
            "--transparent",
            "--peer",
            &peer,
            // The mesh comes from --peer; /ready must not wait for a discovery sync.
            "--discovery=false",
        ];
        args.extend_from_slice(extra);
        let proxy = pod.spawn(
            workspace_binary("latch-proxy"),
            &args,
            Some(PROXY_UID),
            &dir.join("proxy.log"),
        );
        let ready = format!("http://{PROXY_ADMIN}/ready");
        proxy.wait_until(Duration::from_secs(20), "latch-proxy holds an SVID", || {
            pod.curl(&ready).is_ok()
        });
        proxy
    }
}
