//! latch-cni run the way a container runtime runs a chained CNI plugin (issue 21): a real
//! network namespace per pod, the `CNI_*` environment, the network configuration on stdin with
//! the `prevResult` a bridge plugin returns. Asserts the rules with iptables-save and
//! ip6tables-save inside the namespace, the traffic through them (nginx on the capture ports
//! stands in for the proxy), the result and error JSON the specification prescribes, DEL after a
//! failed ADD, and CHECK after the rules were removed by hand. The last test installs it with
//! its own installer into a conflist after the reference `bridge` plugin and runs the chain as
//! libcni does (the real bridge's result as `prevResult`). Needs root (see
//! crates/testkit/src/netns.rs) and, for the last test, Debian's containernetworking-plugins.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use latch_testkit::binaries::workspace_binary;
use latch_testkit::netns::{Pod, Stack, TestNet, require_netns_with};
use serde_json::{Value, json};

const CONTAINER_ID: &str = "5c4ba7cbb1e6a3d1e0b7e1c2f1a9d2c3";
/// What the stand-ins for the proxy's capture listeners answer.
const OUTBOUND: &str = "outbound capture listener";
const INBOUND: &str = "inbound capture listener";
const PEER: &str = "peer app";
const PEER_EXCLUDED: &str = "peer app on an excluded port";
const DIRECT: &str = "app port excluded from inbound capture";

/// One invocation of latch-cni as a runtime makes it.
struct Invocation<'a> {
    command: &'a str,
    netns: String,
    args: String,
    stdin: Value,
    /// Folders searched before the runtime's PATH (a broken tool, to make ADD fail).
    path_prefix: Option<&'a Path>,
    /// Search only `path_prefix` (a node without iptables).
    only_prefix: bool,
}

impl<'a> Invocation<'a> {
    fn new(command: &'a str, pod: &Pod, namespace: &str, stdin: Value) -> Self {
        Self {
            command,
            netns: netns_path(pod),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={};\
                 K8S_POD_INFRA_CONTAINER_ID={CONTAINER_ID};LATCH_EXCLUDE_OUTBOUND_PORTS=8081",
                pod.name
            ),
            stdin,
            path_prefix: None,
            only_prefix: false,
        }
    }

    fn run(&self) -> Output {
        let path = std::env::var("PATH").unwrap_or_default();
        let path = match self.path_prefix {
            Some(dir) if self.only_prefix => dir.display().to_string(),
            Some(dir) => format!("{}:{path}", dir.display()),
            None => path,
        };
        let mut child = Command::new(workspace_binary("latch-cni"))
            .env_clear()
            .env("PATH", path)
            .env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", CONTAINER_ID)
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", &self.args)
            .env("CNI_PATH", "/opt/cni/bin:/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run latch-cni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(self.stdin.to_string().as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait for latch-cni")
    }
}

fn netns_path(pod: &Pod) -> String {
    format!("/var/run/netns/{}", pod.netns)
}

/// The result a bridge plugin (with host-local IPAM) returns for `pod`, CNI 1.0.0.
fn bridge_result(pod: &Pod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "8e:2a:3c:01:02:03"},
            {"name": "veth1a2b3c4d", "mac": "ae:51:c0:04:05:06"},
            {"name": "eth0", "mac": "0a:58:0a:f4:00:0a", "sandbox": netns_path(pod)},
        ],
        "ips": pod.ips.iter().map(|ip| json!({
            "address": format!("{ip}/{}", if ip.is_ipv4() { 24 } else { 64 }),
            "interface": 2,
        })).collect::<Vec<_>>(),
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        "dns": {},
    })
}

/// The conflist entry as the runtime passes it: the list's version and name, our fields, the
/// previous plugin's result.
fn config(prev_result: Option<Value>) -> Value {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "latch-cni",
        "captureNamespaces": ["shop"],
        "excludeInboundPorts": [9090],
    });
    if let Some(prev) = prev_result {
        conf["prevResult"] = prev;
    }
    conf
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "latch-cni's stdout is not JSON ({e}): {:?}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn describe(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// The Latch lines of `tool -t nat` (iptables-save or ip6tables-save) inside `pod`.
fn latch_rules(pod: &Pod, tool: &str) -> Vec<String> {
    pod.run(tool, &["-t", "nat"])
        .lines()
        .filter(|l| l.contains("LATCH"))
        .map(str::to_string)
        .collect()
}

/// GETs `url` from `pod` as uid `uid`.
fn curl_as(pod: &Pod, uid: u32, url: &str) -> Result<String, String> {
    let uid = uid.to_string();
    let out = pod.exec(
        "setpriv",
        &[
            "--reuid",
            &uid,
            "--regid",
            &uid,
            "--clear-groups",
            "curl",
            "-sS",
            "-f",
            "-g",
            "--max-time",
            "5",
            url,
        ],
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(describe(&out))
    }
}

/// A folder with an `ip6tables-restore` that always fails, as on a node whose IPv6 NAT
/// module is missing.
fn broken_ip6tables(dir: &Path) -> PathBuf {
    let bin = dir.join("broken-bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let tool = bin.join("ip6tables-restore");
    std::fs::write(
        &tool,
        "#!/bin/sh\necho \"ip6tables-restore: can't initialize ip6tables table 'nat'\" >&2\nexit 1\n",
    )
    .expect("write tool");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

#[test]
fn latch_cni_captures_a_pod_as_a_runtime_runs_it() {
    if !require_netns_with(&["iptables-save", "ip6tables-save", "setpriv"]) {
        return;
    }
    let net = TestNet::with_stack("cni", Stack::Dual);
    let app = net.add_pod("app");
    let peer = net.add_pod("peer");
    let _outbound = app.start_nginx_on(&["15001", "[::]:15001"], OUTBOUND);
    let _inbound = app.start_nginx_on(&["15006", "[::]:15006"], INBOUND);
    let _direct = app.start_nginx_on(&["9090", "[::]:9090"], DIRECT);
    let _peer = peer.start_nginx_on(&["80", "[::]:80"], PEER);
    let _peer_excluded = peer.start_nginx_on(&["8081", "[::]:8081"], PEER_EXCLUDED);
    let prev = bridge_result(&app);

    // VERSION lists every supported version.
    let mut version = Invocation::new("VERSION", &app, "shop", json!({"cniVersion": "1.0.0"}));
    version.args = "malformed".into();
    let out = version.run();
    assert!(out.status.success(), "{}", describe(&out));
    let version = stdout_json(&out);
    assert_eq!(version["cniVersion"], "1.0.0");
    assert_eq!(
        version["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );

    // ADD: the previous result comes back unchanged, and the rules are in the pod's namespace.
    let add = Invocation::new("ADD", &app, "shop", config(Some(prev.clone())));
    let out = add.run();
    assert!(out.status.success(), "ADD: {}", describe(&out));
    assert_eq!(stdout_json(&out), prev, "ADD must pass prevResult through");
    let v4 = latch_rules(&app, "iptables-save");
    let v6 = latch_rules(&app, "ip6tables-save");
    for (rules, loopback) in [(&v4, "127.0.0.0/8"), (&v6, "::1/128")] {
        for expected in [
            "-A OUTPUT -p tcp -j LATCH_OUTPUT".to_string(),
            "-A PREROUTING -p tcp -j LATCH_INBOUND".to_string(),
            "-A LATCH_OUTPUT -m owner --uid-owner 1337 -j RETURN".to_string(),
            format!("-A LATCH_OUTPUT -d {loopback} -j RETURN"),
            "-A LATCH_OUTPUT -p tcp -m tcp --dport 8081 -j RETURN".to_string(),
            "-A LATCH_INBOUND -p tcp -m tcp --dport 9090 -j RETURN".to_string(),
        ] {
            assert!(rules.contains(&expected), "{expected:?} not in {rules:#?}");
        }
        assert!(
            rules
                .iter()
                .any(|r| r.starts_with("-A LATCH_OUTPUT") && r.ends_with("--to-ports 15001")),
            "{rules:#?}"
        );
        assert!(
            rules
                .iter()
                .any(|r| r.starts_with("-A LATCH_INBOUND") && r.ends_with("--to-ports 15006")),
            "{rules:#?}"
        );
    }
    let host_rules = Command::new("iptables-save").args(["-t", "nat"]).output();
    if let Ok(host) = host_rules {
        assert!(
            !String::from_utf8_lossy(&host.stdout).contains("LATCH_"),
            "latch-cni wrote rules into the host's namespace"
        );
    }

    // Traffic: the app's connections go to the outbound listener over IPv4 and IPv6, except
    // the excluded port and the proxy's own uid; the peer's go to the inbound listener, except
    // the excluded inbound port.
    for ip in &peer.ips {
        assert_eq!(
            app.curl(&Pod::url(*ip, 80)).as_deref(),
            Ok(OUTBOUND),
            "to {ip}"
        );
        assert_eq!(
            app.curl(&Pod::url(*ip, 8081)).as_deref(),
            Ok(PEER_EXCLUDED),
            "to {ip}:8081"
        );
        assert_eq!(
            curl_as(&app, 1337, &Pod::url(*ip, 80)).as_deref(),
            Ok(PEER),
            "uid 1337 to {ip}"
        );
    }
    for ip in &app.ips {
        assert_eq!(
            peer.curl(&Pod::url(*ip, 8080)).as_deref(),
            Ok(INBOUND),
            "to {ip}"
        );
        assert_eq!(
            peer.curl(&Pod::url(*ip, 9090)).as_deref(),
            Ok(DIRECT),
            "to {ip}:9090"
        );
    }

    // ADD again changes nothing; CHECK passes and prints nothing.
    let out = add.run();
    assert!(out.status.success(), "second ADD: {}", describe(&out));
    assert_eq!(latch_rules(&app, "iptables-save"), v4, "ADD is idempotent");
    assert_eq!(latch_rules(&app, "ip6tables-save"), v6, "ADD is idempotent");
    let check = Invocation::new("CHECK", &app, "shop", config(Some(prev.clone())));
    let out = check.run();
    assert!(out.status.success(), "CHECK: {}", describe(&out));
    assert!(out.stdout.is_empty(), "CHECK prints nothing on success");

    // A RETURN slipped in ahead of the REDIRECT keeps every expected rule in place but lets
    // the app's traffic around the "proxy": CHECK fails on it too.
    app.run(
        "iptables",
        &["-t", "nat", "-I", "LATCH_OUTPUT", "1", "-j", "RETURN"],
    );
    assert_eq!(app.curl(&Pod::url(peer.ip(), 80)).as_deref(), Ok(PEER));
    let out = check.run();
    assert!(!out.status.success(), "CHECK passed with a bypass rule");
    let error = stdout_json(&out);
    assert_eq!(error["code"], 101, "{error}");
    assert!(
        error["details"]
            .as_str()
            .unwrap_or_default()
            .contains("LATCH_OUTPUT: it holds 1 rule(s) Latch did not write"),
        "{error}"
    );
    app.run("iptables", &["-t", "nat", "-D", "LATCH_OUTPUT", "1"]);
    let out = check.run();
    assert!(
        out.status.success(),
        "CHECK after the repair: {}",
        describe(&out)
    );

    // Someone removes the outbound REDIRECT by hand: the app's traffic now bypasses the
    // "proxy", and CHECK says so with the spec's error object.
    app.run(
        "iptables",
        &[
            "-t",
            "nat",
            "-D",
            "LATCH_OUTPUT",
            "-p",
            "tcp",
            "--syn",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    );
    assert_eq!(app.curl(&Pod::url(peer.ip(), 80)).as_deref(), Ok(PEER));
    let out = check.run();
    assert!(!out.status.success(), "CHECK passed without the rule");
    let error = stdout_json(&out);
    assert_eq!(error["cniVersion"], "1.0.0", "{error}");
    assert_eq!(error["code"], 101, "{error}");
    let msg = error["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("missing") && msg.contains("pod shop/app"),
        "{error}"
    );
    let details = error["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("IPv4: -A LATCH_OUTPUT -p tcp --syn -j REDIRECT --to-ports 15001"),
        "{error}"
    );
    assert!(
        !details.contains("IPv6"),
        "only the IPv4 rule was removed: {error}"
    );

    // DEL removes everything and prints nothing; the traffic flows directly again.
    let del = Invocation::new("DEL", &app, "shop", config(None));
    let out = del.run();
    assert!(out.status.success(), "DEL: {}", describe(&out));
    assert!(out.stdout.is_empty(), "DEL prints nothing on success");
    assert_eq!(latch_rules(&app, "iptables-save"), Vec::<String>::new());
    assert_eq!(latch_rules(&app, "ip6tables-save"), Vec::<String>::new());
    assert_eq!(app.curl(&Pod::url(peer.ip6(), 80)).as_deref(), Ok(PEER));
    assert!(
        peer.curl(&Pod::url(app.ip(), 8080)).is_err(),
        "inbound connections are still redirected after DEL"
    );
    let out = del.run();
    assert!(out.status.success(), "a second DEL: {}", describe(&out));

    // A failed ADD (ip6tables-restore fails on a pod with an IPv6 address) leaves no rule of
    // either family, reports the spec's error, and the DEL the runtime sends next succeeds.
    let broken = broken_ip6tables(net.dir());
    let mut failing = Invocation::new("ADD", &app, "shop", config(Some(prev.clone())));
    failing.path_prefix = Some(&broken);
    let out = failing.run();
    assert!(
        !out.status.success(),
        "ADD with a broken ip6tables succeeded"
    );
    let error = stdout_json(&out);
    assert_eq!(error["code"], 100, "{error}");
    assert_eq!(error["cniVersion"], "1.0.0", "{error}");
    let details = error["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("IPv6 address") && details.contains("can't initialize"),
        "{error}"
    );
    assert_eq!(
        latch_rules(&app, "iptables-save"),
        Vec::<String>::new(),
        "a failed ADD left IPv4 rules"
    );
    assert_eq!(latch_rules(&app, "ip6tables-save"), Vec::<String>::new());
    let out = del.run();
    assert!(
        out.status.success(),
        "DEL after a failed ADD: {}",
        describe(&out)
    );

    // CHECK of a captured pod that has no rules at all names every missing rule.
    let out = check.run();
    assert!(!out.status.success(), "CHECK passed on a pod without rules");
    assert_eq!(stdout_json(&out)["code"], 101);
}

#[test]
fn latch_cni_leaves_unmeshed_pods_alone_and_follows_the_spec_at_the_edges() {
    if !require_netns_with(&["iptables-save", "ip6tables-save"]) {
        return;
    }
    let net = TestNet::with_stack("cni-edge", Stack::Dual);
    let app = net.add_pod("app");
    let prev = bridge_result(&app);

    // Namespaces not listed, and kube-system even when listed, are passed through untouched.
    for namespace in ["legacy", "kube-system"] {
        let mut conf = config(Some(prev.clone()));
        conf["captureNamespaces"] = json!(["shop", "kube-system"]);
        let out = Invocation::new("ADD", &app, namespace, conf).run();
        assert!(out.status.success(), "{namespace}: {}", describe(&out));
        assert_eq!(stdout_json(&out), prev);
        assert_eq!(latch_rules(&app, "iptables-save"), Vec::<String>::new());
    }

    // An IPv4-only pod on a node whose ip6tables-restore fails: no IPv6 traffic can get
    // around the proxy, so ADD installs the IPv4 rules and says why on stderr.
    let v4_net = TestNet::new("cni-v4");
    let v4_pod = v4_net.add_pod("app");
    let broken = broken_ip6tables(v4_net.dir());
    let mut add = Invocation::new("ADD", &v4_pod, "shop", config(Some(bridge_result(&v4_pod))));
    add.path_prefix = Some(&broken);
    let out = add.run();
    assert!(
        out.status.success(),
        "ADD on an IPv4-only pod: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("IPv4 capture rules only"),
        "{}",
        describe(&out)
    );
    assert!(!latch_rules(&v4_pod, "iptables-save").is_empty());
    assert_eq!(latch_rules(&v4_pod, "ip6tables-save"), Vec::<String>::new());
    let out = Invocation::new(
        "CHECK",
        &v4_pod,
        "shop",
        config(Some(bridge_result(&v4_pod))),
    )
    .run();
    assert!(
        out.status.success(),
        "CHECK on an IPv4-only pod: {}",
        describe(&out)
    );

    // `latch-cni wait`, as the unprivileged init container of the pod would run it: it fails
    // while the pod is not captured and says what to check; the proxy's uid is refused.
    let binary = workspace_binary("latch-cni");
    let binary = binary.to_str().expect("utf-8 path");
    let wait = |uid: &str| {
        app.exec(
            "setpriv",
            &[
                "--reuid",
                uid,
                "--regid",
                uid,
                "--clear-groups",
                binary,
                "wait",
                "--timeout",
                "2s",
            ],
        )
    };
    let out = wait("65532");
    assert!(!out.status.success(), "wait passed without rules");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the capture rules are not in place"),
        "{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&wait("1337").stderr).contains("the proxy's"),
        "wait as the proxy's uid must be refused"
    );

    // An older configuration version gets its result back in that version.
    let mut old = prev.clone();
    old["cniVersion"] = json!("0.4.0");
    let mut conf = config(Some(old.clone()));
    conf["cniVersion"] = json!("0.4.0");
    let out = Invocation::new("ADD", &app, "shop", conf.clone()).run();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout_json(&out), old);
    assert!(!latch_rules(&app, "iptables-save").is_empty());
    let out = wait("65532");
    assert!(
        out.status.success(),
        "wait with the rules: {}",
        describe(&out)
    );
    let out = Invocation::new("DEL", &app, "shop", conf).run();
    assert!(out.status.success(), "{}", describe(&out));

    // Not chained: no prevResult is an invalid configuration (code 7), nothing installed.
    let out = Invocation::new("ADD", &app, "shop", config(None)).run();
    assert!(!out.status.success());
    let error = stdout_json(&out);
    assert_eq!(error["code"], 7, "{error}");
    assert!(
        error["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("chained")
    );
    assert_eq!(latch_rules(&app, "iptables-save"), Vec::<String>::new());

    // An unsupported version is code 1 and names the supported ones.
    let mut conf = config(Some(prev.clone()));
    conf["cniVersion"] = json!("0.2.0");
    let out = Invocation::new("ADD", &app, "shop", conf).run();
    let error = stdout_json(&out);
    assert_eq!(error["code"], 1, "{error}");
    assert!(
        error["details"]
            .as_str()
            .unwrap_or_default()
            .contains("1.1.0")
    );

    // DEL when the namespace is gone, or not given, succeeds (the spec demands it).
    let mut gone = Invocation::new("DEL", &app, "shop", config(None));
    gone.netns = "/var/run/netns/latch-cni-test-no-such-namespace".into();
    let out = gone.run();
    assert!(
        out.status.success(),
        "DEL of a gone namespace: {}",
        describe(&out)
    );
    gone.netns = String::new();
    let out = gone.run();
    assert!(
        out.status.success(),
        "DEL without CNI_NETNS: {}",
        describe(&out)
    );

    // A malformed CNI_ARGS is code 4, in the configuration's version.
    let mut malformed = Invocation::new("DEL", &app, "shop", config(None));
    malformed.args = "K8S_POD_NAMESPACE=shop;oops".into();
    let error = stdout_json(&malformed.run());
    assert_eq!(error["code"], 4, "{error}");
    assert_eq!(error["cniVersion"], "1.0.0", "{error}");

    // DEL on a node without iptables: no rule can have been installed, so it succeeds.
    let empty = tempfile::tempdir().expect("temp dir");
    let mut no_iptables = Invocation::new("DEL", &app, "shop", config(None));
    no_iptables.path_prefix = Some(empty.path());
    no_iptables.only_prefix = true;
    let out = no_iptables.run();
    assert!(
        out.status.success(),
        "DEL without iptables: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("iptables is not installed"),
        "{}",
        describe(&out)
    );

    // STATUS and GC (1.1.0 only): ready when the node has iptables-restore, not otherwise.
    let mut v11 = config(None);
    v11["cniVersion"] = json!("1.1.0");
    for command in ["STATUS", "GC"] {
        let out = Invocation::new(command, &app, "shop", v11.clone()).run();
        assert!(out.status.success(), "{command}: {}", describe(&out));
        let out = Invocation::new(command, &app, "shop", config(None)).run();
        assert_eq!(stdout_json(&out)["code"], 1, "{command} with 1.0.0");
    }
    let mut status = Invocation::new("STATUS", &app, "shop", v11);
    status.path_prefix = Some(empty.path());
    status.only_prefix = true;
    let out = status.run();
    let error = stdout_json(&out);
    assert_eq!(error["code"], 50, "STATUS without iptables: {error}");
    assert_eq!(error["cniVersion"], "1.1.0", "{error}");

    // ADD into a namespace that does not exist fails with code 3 ("container unknown").
    let mut missing = Invocation::new("ADD", &app, "shop", config(Some(prev)));
    missing.netns = "/var/run/netns/latch-cni-test-no-such-namespace".into();
    let out = missing.run();
    assert_eq!(stdout_json(&out)["code"], 3, "{}", describe(&out));
}

/// Where Debian's containernetworking-plugins puts the reference plugins.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A network namespace made by this test, deleted (with its interfaces) on drop.
struct Netns(String);

impl Netns {
    fn new(role: &str) -> Self {
        let name = format!("latch-cnirt-{role}-{}", std::process::id());
        let ok = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {}", describe(&out));
        };
        ok(&["netns", "add", &name]);
        let netns = Self(name);
        ok(&["-n", &netns.0, "link", "set", "lo", "up"]);
        netns
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }

    /// `ip netns exec <ns> cmd`, as root.
    fn command(&self, cmd: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0]).arg(cmd);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs one plugin of `list` as libcni does: the plugin's entry with the list's `name` and
/// `cniVersion`, the previous plugin's result as `prevResult`, the binary found on CNI_PATH;
/// in the `node` namespace, so the bridge it makes is not on the host.
fn run_listed_plugin(
    node: &Netns,
    cni_path: &[&Path],
    list: &Value,
    plugin: &Value,
    command: &str,
    pod: &Netns,
    prev: Option<&Value>,
) -> Output {
    let mut conf = plugin.clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    let kind = plugin["type"].as_str().expect("plugin type");
    let binary = cni_path
        .iter()
        .map(|dir| dir.join(kind))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("plugin {kind} not on CNI_PATH {cni_path:?}"));
    let joined = cni_path
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut child = node
        .command(&binary)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", CONTAINER_ID)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
        )
        .env("CNI_PATH", &joined)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for plugin")
}

#[test]
fn latch_cni_installed_by_its_installer_chains_after_the_reference_bridge_plugin() {
    if !require_netns_with(&["iptables-save", "python3"]) {
        return;
    }
    if !Path::new(REFERENCE_PLUGINS).join("bridge").exists() {
        let why = format!(
            "needs the reference CNI plugins in {REFERENCE_PLUGINS} (Debian: \
             containernetworking-plugins)"
        );
        if std::env::var("LATCH_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
            panic!("LATCH_REQUIRE_NETNS=1 but this machine lacks them: {why}");
        }
        latch_testkit::skip::skipped(&why);
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (bin_dir, conf_dir) = (dir.path().join("bin"), dir.path().join("net.d"));
    std::fs::create_dir_all(&bin_dir).expect("mkdir");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    // The node's network: a bridge plugin with host-local addresses, as many clusters have.
    let bridge_list = json!({
        "cniVersion": "1.0.0",
        "name": "latch-test-net",
        "plugins": [{
            "type": "bridge", "bridge": "cni-ltest", "isGateway": true, "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.251.0.0/24"}]],
                "dataDir": dir.path().join("ipam"),
            },
        }],
    });
    let conflist = conf_dir.join("10-bridge.conflist");
    std::fs::write(&conflist, bridge_list.to_string()).expect("write conflist");
    let entry = dir.path().join("plugin.json");
    std::fs::write(&entry, r#"{"captureNamespaces": ["shop"]}"#).expect("write entry");

    // The DaemonSet's installer, once.
    let dirs = |command: &str| {
        let mut c = Command::new(workspace_binary("latch-cni"));
        c.env_remove("CNI_COMMAND")
            .arg(command)
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--conf-dir")
            .arg(&conf_dir);
        c
    };
    let out = dirs("install")
        .arg("--plugin-config")
        .arg(&entry)
        .output()
        .expect("latch-cni install");
    assert!(out.status.success(), "install: {}", describe(&out));
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).expect("read")).expect("json");
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    assert_eq!(types, ["bridge", "latch-cni"], "{list}");

    // The runtime's ADD: each plugin in order, each given the previous one's result.
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let cni_path = [bin_dir.as_path(), Path::new(REFERENCE_PLUGINS)];
    let plugins = list["plugins"].as_array().expect("plugins").clone();
    let mut results: Vec<Value> = Vec::new();
    for plugin in &plugins {
        let out = run_listed_plugin(&node, &cni_path, &list, plugin, "ADD", &pod, results.last());
        assert!(
            out.status.success(),
            "ADD {}: {}",
            plugin["type"],
            describe(&out)
        );
        results.push(stdout_json(&out));
    }
    let (bridge, latch) = (&results[0], &results[1]);
    assert_eq!(
        latch, bridge,
        "latch-cni must return the bridge's result unchanged"
    );
    let address = bridge["ips"][0]["address"].as_str().unwrap_or_default();
    assert!(address.starts_with("10.251.0."), "{bridge}");
    let rules = pod
        .command("iptables-save")
        .args(["-t", "nat"])
        .output()
        .expect("save");
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    assert!(rules.contains("-j REDIRECT --to-ports 15001"), "{rules}");

    // The pod's connection to the node's bridge address reaches a listener on 15001 in the
    // pod (nothing listens on the node).
    let mut listener = pod.command("python3");
    listener.args([
        "-c",
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', 15001)); s.listen(8); print('listening', flush=True)\n\
         while True:\n\
         \x20   c, _ = s.accept(); c.recv(4096)\n\
         \x20   c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: 8\\r\\n\\r\\ncaptured'); c.close()\n",
    ]);
    let listener = latch_testkit::Child::spawn(
        "capture listener",
        listener,
        &dir.path().join("listener.log"),
    )
    .expect("start the listener");
    listener.wait_until(std::time::Duration::from_secs(10), "listening", || {
        listener.log().contains("listening")
    });
    let curl = pod
        .command("curl")
        .args(["-sS", "--max-time", "5", "http://10.251.0.1:80/"])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "captured",
        "{}",
        describe(&curl)
    );
    drop(listener);

    // The runtime's DEL: in reverse order, with the cached result.
    for plugin in plugins.iter().rev() {
        let out = run_listed_plugin(&node, &cni_path, &list, plugin, "DEL", &pod, Some(latch));
        assert!(
            out.status.success(),
            "DEL {}: {}",
            plugin["type"],
            describe(&out)
        );
    }
    let rules = pod
        .command("iptables-save")
        .args(["-t", "nat"])
        .output()
        .expect("save");
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("LATCH"));

    // The installer's uninstall leaves the node as it was.
    let out = dirs("uninstall").output().expect("latch-cni uninstall");
    assert!(out.status.success(), "uninstall: {}", describe(&out));
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).expect("read")).expect("json");
    assert_eq!(list["plugins"], bridge_list["plugins"]);
    assert!(!bin_dir.join("latch-cni").exists());
}
