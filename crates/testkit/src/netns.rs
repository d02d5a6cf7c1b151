//! Test networks made of Linux network namespaces: a "router" namespace holding a bridge, and
//! one namespace per pod joined to it by a veth pair. Nothing touches the host's interfaces;
//! dropping the `TestNet` deletes every namespace it made. Pods run real tools (nginx, curl,
//! tcpdump, our binaries) through `ip netns exec`. Also latch-control in the router namespace
//! (`PodControlPlane`). Used by tests/tests/netns.rs and faults_kill.rs; needs root.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::Child;
use crate::binaries::workspace_binary;
use crate::files::{replace_file, utf8, write_token};

/// Tools every namespace test needs, besides root.
const TOOLS: &[&str] = &["ip", "iptables", "nginx", "curl", "tcpdump"];

/// Set to 1 (CI does) to turn a missing prerequisite into a failure instead of a skip.
const REQUIRE_ENV: &str = "LATCH_REQUIRE_NETNS";

/// The bridge's name and address suffix inside the router namespace.
const BRIDGE: &str = "br0";
const ROUTER_HOST: u8 = 1;
/// Pods get 10.X.0.10, 10.X.0.11, ... (and fd00:X::10, fd00:X::11, ...) in the order they
/// are added.
const FIRST_POD_HOST: u8 = 10;

/// The address families of a test network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// 10.X.0.0/24 only.
    Ipv4,
    /// 10.X.0.0/24 and fd00:X::/64 on every pod, the router and the bridge.
    Dual,
    /// fd00:X::/64 only.
    Ipv6,
}

impl Stack {
    fn has_v4(self) -> bool {
        self != Stack::Ipv6
    }
    fn has_v6(self) -> bool {
        self != Stack::Ipv4
    }
}

/// Numbers the networks of this process, for unique names and subnets.
static NETS_CREATED: AtomicU32 = AtomicU32::new(0);

/// True when this process can build test networks: root, and `ip`, `iptables`, `nginx`, `curl`
/// and `tcpdump` on PATH. Otherwise prints a loud SKIPPED line and returns false, or panics
/// when `LATCH_REQUIRE_NETNS=1`. Tests start with `if !require_netns() { return; }`.
pub fn require_netns() -> bool {
    require_netns_with(&[])
}

/// `require_netns`, plus `extra_tools` that one test needs (e.g. `tshark`).
pub fn require_netns_with(extra_tools: &[&str]) -> bool {
    let mut missing: Vec<&str> = if crate::is_root() {
        vec![]
    } else {
        vec!["root"]
    };
    let tools = TOOLS.iter().chain(extra_tools);
    missing.extend(tools.clone().filter(|tool| !on_path(tool)));
    if missing.is_empty() {
        return true;
    }
    let needs = std::iter::once(&"root")
        .chain(tools)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    let missing = missing.join(", ");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but this machine lacks: {missing} (this test needs {needs})");
    }
    crate::skip::skipped(&format!(
        "needs {needs}; missing: {missing} (set {REQUIRE_ENV}=1 to fail instead)"
    ));
    false
}

/// True when an executable `tool` is on PATH.
pub fn on_path(tool: &str) -> bool {
    which(tool).is_some()
}

/// The full path of the executable `tool` on PATH, if there is one.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|file| std::fs::metadata(file).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

/// The namespaces that exist now (`ip netns list`, names only).
pub fn netns_list() -> Vec<String> {
    let output = ip(&["netns", "list"]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Runs `ip args`, returning its output whatever the exit status.
fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {}: {e}", args.join(" ")))
}

/// Runs `ip args` and panics, with ip's message, if it fails.
fn ip_ok(args: &[&str]) {
    let output = ip(args);
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// A private network: namespace `<name>-br` holds bridge `br0` at 10.X.0.1/24 (and/or
/// fd00:X::1/64, by `Stack`), and each pod namespace `<name>-<pod>` has `eth0` on the same
/// subnets, cabled to the bridge by veth `v-<pod>`.
/// `<name>` is `latch-<prefix>-<pid>-<n>`, so tests run in parallel without clashing and
/// leftovers of a killed run are easy to spot (`ip netns list | grep ^latch-`).
pub struct TestNet {
    name: String,
    subnet: u8,
    stack: Stack,
    dir: tempfile::TempDir,
    /// Namespaces created so far, router first; deleted in reverse order on drop.
    namespaces: RefCell<Vec<String>>,
}

impl TestNet {
    /// An IPv4 network.
    pub fn new(prefix: &str) -> Self {
        Self::with_stack(prefix, Stack::Ipv4)
    }

    /// A network of the families `stack` names.
    pub fn with_stack(prefix: &str, stack: Stack) -> Self {
        let n = NETS_CREATED.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new()
            .prefix("latch-netns-")
            .tempdir()
            .expect("temp dir");
        // Processes that run as another uid (the proxy) must reach their own subfolders.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        let net = Self {
            name: format!("latch-{prefix}-{}-{n}", std::process::id()),
            subnet: u8::try_from(1 + n % 250).expect("below 251"),
            stack,
            dir,
            namespaces: RefCell::new(Vec::new()),
        };
        let router = net.add_namespace("br");
        ip_ok(&["-n", &router, "link", "add", BRIDGE, "type", "bridge"]);
        net.add_addresses(&router, BRIDGE, ROUTER_HOST);
        ip_ok(&["-n", &router, "link", "set", BRIDGE, "up"]);
        net
    }

    /// Adds a pod: its own namespace, cabled to the bridge, with the next free address.
    pub fn add_pod(&self, name: &str) -> Pod<'_> {
        let port = format!("v-{name}");
        assert!(
            name != "br" && port.len() <= 15,
            "pod name {name:?} is reserved or too long (interface names hold 15 bytes)"
        );
        let pods_so_far = self.namespaces.borrow().len() - 1;
        let host = FIRST_POD_HOST + u8::try_from(pods_so_far).expect("fewer than 245 pods");
        let netns = self.add_namespace(name);
        let router = self.router_netns();
        // Created inside the router namespace with the peer moved straight into the pod's, so
        // neither end ever appears in the host's namespace.
        ip_ok(&[
            "-n", &router, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ]);
        ip_ok(&["-n", &router, "link", "set", &port, "master", BRIDGE, "up"]);
        self.add_addresses(&netns, "eth0", host);
        ip_ok(&["-n", &netns, "link", "set", "eth0", "up"]);
        // A default route through the bridge, so service VIPs (addresses no pod owns) are
        // routable and the capture sees connections to them.
        for gateway in self.addresses(ROUTER_HOST) {
            let family = if gateway.is_ipv4() { "-4" } else { "-6" };
            let gateway = gateway.to_string();
            ip_ok(&[
                family, "-n", &netns, "route", "add", "default", "via", &gateway,
            ]);
        }
        Pod {
            net: self,
            name: name.to_string(),
            netns,
            ips: self.addresses(host),
            port,
        }
    }

    /// Host number `host`'s addresses on this network, IPv4 first.
    fn addresses(&self, host: u8) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        if self.stack.has_v4() {
            ips.push(Ipv4Addr::new(10, self.subnet, 0, host).into());
        }
        if self.stack.has_v6() {
            let v6 = Ipv6Addr::new(0xfd00, self.subnet.into(), 0, 0, 0, 0, 0, host.into());
            ips.push(v6.into());
        }
        ips
    }

    /// Gives `dev` in `netns` host number `host`'s addresses. IPv6 ones skip duplicate address
    /// detection, so they are usable at once rather than "tentative" for a second or two.
    fn add_addresses(&self, netns: &str, dev: &str, host: u8) {
        for ip in self.addresses(host) {
            let cidr = match ip {
                IpAddr::V4(_) => format!("{ip}/24"),
                IpAddr::V6(_) => format!("{ip}/64"),
            };
            let mut args = vec!["-n", netns, "addr", "add", &cidr, "dev", dev];
            if ip.is_ipv6() {
                args.push("nodad");
            }
            ip_ok(&args);
        }
    }

    /// The router namespace as a pod: it owns the bridge's address (10.X.0.1), so shared
    /// services (the control plane) run here; `capture()` on it sees traffic to and from that
    /// address only (on `br0`), not what the bridge forwards between pods.
    pub fn router(&self) -> Pod<'_> {
        Pod {
            net: self,
            name: "router".to_string(),
            netns: self.router_netns(),
            ips: self.addresses(ROUTER_HOST),
            port: BRIDGE.to_string(),
        }
    }

    /// A temp folder for configs, logs and captures, removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The namespaces this network made (all deleted on drop).
    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces.borrow().clone()
    }

    fn router_netns(&self) -> String {
        self.namespaces.borrow()[0].clone()
    }

    /// Creates namespace `<name>-<suffix>` with `lo` up and records it for deletion.
    fn add_namespace(&self, suffix: &str) -> String {
        let netns = format!("{}-{suffix}", self.name);
        ip_ok(&["netns", "add", &netns]);
        self.namespaces.borrow_mut().push(netns.clone());
        ip_ok(&["-n", &netns, "link", "set", "lo", "up"]);
        netns
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Processes are gone already: a PodProcess borrows the net, so it is dropped first.
        // Deleting a pod's namespace destroys its veth pair; the router's takes the bridge.
        for netns in self.namespaces.get_mut().drain(..).rev() {
            let pids = ip(&["netns", "pids", &netns]);
            if !pids.stdout.is_empty() {
                eprintln!(
                    "warning: processes still in {netns}: {}",
                    String::from_utf8_lossy(&pids.stdout).trim()
                );
            }
            let output = ip(&["netns", "del", &netns]);
            if !output.status.success() {
                eprintln!(
                    "warning: ip netns del {netns}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
    }
}

/// A namespace on the test network with its addresses. Cheap to clone.
#[derive(Clone)]
pub struct Pod<'n> {
    net: &'n TestNet,
    pub name: String,
    pub netns: String,
    /// IPv4 first, then IPv6, as the network's `Stack` gives them.
    pub ips: Vec<IpAddr>,
    /// This pod's interface on the bridge side (in the router namespace).
    port: String,
}

impl<'n> Pod<'n> {
    /// The pod's first address: IPv4 unless the network is IPv6-only.
    pub fn ip(&self) -> IpAddr {
        self.ips[0]
    }

    /// The pod's IPv6 address; panics on an IPv4 network.
    pub fn ip6(&self) -> IpAddr {
        *self
            .ips
            .iter()
            .find(|ip| ip.is_ipv6())
            .unwrap_or_else(|| panic!("{} has no IPv6 address", self.name))
    }

    /// `http://<ip>:<port>/`, with the brackets an IPv6 address needs.
    pub fn url(ip: IpAddr, port: u16) -> String {
        format!("http://{}/", SocketAddr::new(ip, port))
    }

    /// `ip netns exec <netns> [setpriv --reuid U --regid U --clear-groups] cmd args`.
    fn command(&self, cmd: impl AsRef<OsStr>, args: &[&str], uid: Option<u32>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns]);
        if let Some(uid) = uid {
            let uid = uid.to_string();
            command.args([
                "setpriv",
                "--reuid",
                &uid,
                "--regid",
                &uid,
                "--clear-groups",
            ]);
        }
        command.arg(cmd).args(args);
        command
    }

    /// Starts `cmd args` in this pod, as `uid` when given (root otherwise), stdout and stderr
    /// to `log`. The process is killed when the returned handle is dropped.
    pub fn spawn(
        &self,
        cmd: impl AsRef<OsStr>,
        args: &[&str],
        uid: Option<u32>,
        log: &Path,
    ) -> PodProcess<'n> {
        let name = format!("{} in {}", cmd.as_ref().to_string_lossy(), self.name);
        let child = Child::spawn(&name, self.command(cmd, args, uid), log)
            .unwrap_or_else(|e| panic!("{e:#}"));
        PodProcess {
            child,
            _net: PhantomData,
        }
    }

    /// Runs `cmd args` in this pod as root, to completion.
    pub fn exec(&self, cmd: impl AsRef<OsStr>, args: &[&str]) -> Output {
        let what = format!("{} in {}", cmd.as_ref().to_string_lossy(), self.name);
        self.command(cmd, args, None)
            .output()
            .unwrap_or_else(|e| panic!("running {what}: {e}"))
    }

    /// One metric's value from this pod's latch-proxy /metrics (0 when absent): the first line
    /// that starts with `name` and contains every one of `labels`.
    pub fn proxy_metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self
            .curl(&format!("http://{PROXY_ADMIN}/metrics"))
            .unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .next()
            .unwrap_or(0.0)
    }

    /// `exec`, panicking with stderr unless it succeeds; returns stdout, trimmed.
    pub fn run(&self, cmd: impl AsRef<OsStr>, args: &[&str]) -> String {
        let what = format!("{} {}", cmd.as_ref().to_string_lossy(), args.join(" "));
        let output = self.exec(cmd, args);
        assert!(
            output.status.success(),
            "`{what}` in {} failed ({}): {}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// GETs `url` with curl from this pod (as root, 5 s timeout, HTTP errors count as
    /// failures). Ok(body), or Err(curl's exit status and message).
    pub fn curl(&self, url: &str) -> Result<String, String> {
        // -g: brackets are an IPv6 address, not a URL glob.
        let output = self.exec("curl", &["-sS", "-f", "-g", "--max-time", "5", url]);
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "curl {url} from {}: {}: {}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// Starts nginx in this pod answering every request on port 80 of every address (IPv4
    /// and IPv6) with `body` (printable ASCII, no quotes or backslashes), and waits until it
    /// does. Its config, pid and temp paths live in the net's temp dir; one process
    /// (`master_process off`), so dropping the handle stops all of nginx.
    pub fn start_nginx(&self, body: &str) -> PodProcess<'n> {
        self.start_nginx_on(&["80", "[::]:80"], body)
    }

    /// `start_nginx` listening on `listen` (nginx's syntax: "80", "127.0.0.1:8081",
    /// "[::1]:8081"), e.g. a service the pod exposes on loopback only.
    pub fn start_nginx_on(&self, listen: &[&str], body: &str) -> PodProcess<'n> {
        for listen in listen {
            assert!(
                listen
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']')),
                "nginx listen {listen:?}: an IP address and port, or a port"
            );
        }
        assert!(
            body.chars()
                .all(|c| c == ' ' || (c.is_ascii_graphic() && !matches!(c, '"' | '\\'))),
            "nginx body {body:?} needs quoting this helper does not do"
        );
        let dir = self.net.dir().join(format!(
            "nginx-{}-{}",
            self.name,
            listen[0].replace([':', '.', '[', ']'], "-")
        ));
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let d = dir.display();
        let listen_lines: String = listen.iter().map(|l| format!("listen {l}; ")).collect();
        let config = format!(
            "daemon off;\n\
             master_process off;\n\
             pid {d}/nginx.pid;\n\
             error_log stderr;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
             \x20 access_log /dev/stderr;\n\
             \x20 client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             \x20 server {{ {listen_lines}default_type text/plain; location / {{ return 200 \"{body}\"; }} }}\n\
             }}\n"
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).expect("nginx.conf");
        let conf = conf.to_str().expect("utf-8 temp path");
        let prefix = dir.to_str().expect("utf-8 temp path");
        let nginx = self.spawn(
            "nginx",
            &["-e", "stderr", "-p", prefix, "-c", conf],
            None,
            &dir.join("nginx.log"),
        );
        let url = match listen[0].rsplit_once(':') {
            Some((host, port)) => format!("http://{host}:{port}/"),
            None => format!("http://127.0.0.1:{}/", listen[0]),
        };
        nginx.wait_until(Duration::from_secs(10), "nginx answers", || {
            self.curl(&url).is_ok()
        });
        nginx
    }

    /// Starts tcpdump on this pod's cable at the bridge (so it sees exactly what crosses the
    /// wire, not what the pod's own iptables rewrites), and waits until it is listening.
    pub fn capture(&self) -> Capture<'n> {
        let file = self.net.dir().join(format!("{}.pcap", self.port));
        let log = self.net.dir().join(format!("tcpdump-{}.log", self.port));
        let path = file.to_str().expect("utf-8 temp path");
        // --immediate-mode: without it libpcap's TPACKET_V3 ring hands packets over in blocks,
        // and those in the unfinished block are lost when tcpdump is interrupted. -Z root:
        // tcpdump would otherwise switch to user tcpdump, who cannot write in the temp dir.
        let process = self.net.router().spawn(
            "tcpdump",
            &[
                "--immediate-mode",
                "-U",
                "-Z",
                "root",
                "-i",
                &self.port,
                "-w",
                path,
            ],
            None,
            &log,
        );
        process.wait_until(Duration::from_secs(10), "tcpdump is listening", || {
            process.log().contains("listening on")
        });
        Capture { process, file }
    }
}

/// A process started in a pod: killed (SIGKILL, by its PID) when dropped. It borrows the
/// `TestNet`, so it always ends before the namespaces are deleted.
pub struct PodProcess<'n> {
    child: Child,
    _net: PhantomData<&'n TestNet>,
}

impl PodProcess<'_> {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// "<command> in <pod>".
    pub fn name(&self) -> &str {
        self.child.name()
    }

    /// What the process wrote so far (stdout and stderr).
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Waits for `ready`, panicking with the process's log if it is not within `timeout`.
    pub fn wait_until(&self, timeout: Duration, what: &str, ready: impl FnMut() -> bool) {
        self.child.wait_until(timeout, what, ready);
    }

    /// Sends SIGINT (with `kill -INT <pid>`) and waits up to `timeout` for the process to exit.
    pub fn interrupt(&mut self, timeout: Duration) -> bool {
        self.child.signal("INT") && self.child.wait_exit(timeout).is_some()
    }
}

/// The logs of `processes`, for assertion messages.
pub fn logs(processes: &[&PodProcess]) -> String {
    processes.iter().map(|p| p.child.logs()).collect()
}

/// A running tcpdump on one bridge port.
pub struct Capture<'n> {
    process: PodProcess<'n>,
    file: PathBuf,
}

impl Capture<'_> {
    /// Stops tcpdump cleanly (SIGINT, so it flushes the file) and returns the capture.
    pub fn stop(mut self) -> Pcap {
        assert!(
            self.process.interrupt(Duration::from_secs(10)),
            "tcpdump did not stop on SIGINT; its log:\n{}",
            self.process.log()
        );
        Pcap {
            file: self.file.clone(),
        }
    }
}

/// A finished capture file.
pub struct Pcap {
    pub file: PathBuf,
}

impl Pcap {
    /// Asserts what an eavesdropper on the wire saw of a meshed request: traffic on
    /// `mesh_port`, nothing on `app_port`, no `secret` anywhere in clear, and every ServerHello
    /// on `mesh_port` negotiating TLS 1.3 (needs tshark).
    pub fn assert_mesh_only(&self, mesh_port: u16, app_port: u16, secret: &str) {
        assert!(
            !self.text(&format!("tcp port {mesh_port}")).is_empty(),
            "the request should cross the wire to the mTLS port {mesh_port}:\n{}",
            self.text("")
        );
        assert_eq!(
            self.text(&format!("tcp port {app_port}")),
            "",
            "nothing should reach the app's port {app_port} over the wire"
        );
        let everything = self.text("");
        assert!(
            !everything.contains(secret),
            "{secret:?} crossed the wire in clear:\n{everything}"
        );
        // supported_versions = 0x0304
        let versions = self.server_hello_versions(mesh_port);
        assert!(
            !versions.is_empty() && versions.iter().all(|v| *v == "0x0304"),
            "expected TLS 1.3 ServerHellos on port {mesh_port}, got {versions:?}"
        );
    }

    /// `tcpdump -r <file> -A -nn <filter>`: one summary line per packet, then its payload as
    /// ASCII. `filter` is a pcap filter ("tcp port 80"), or "" for every packet.
    pub fn text(&self, filter: &str) -> String {
        let mut command = Command::new("tcpdump");
        command.arg("-r").arg(&self.file).args(["-A", "-nn"]);
        if !filter.is_empty() {
            command.arg(filter);
        }
        self.read_with(command)
    }

    /// The TLS version each ServerHello on `port` negotiated (supported_versions, e.g. "0x0304"
    /// for TLS 1.3), one per handshake.
    pub fn server_hello_versions(&self, port: u16) -> Vec<String> {
        let decode = format!("tcp.port=={port},tls");
        self.tshark(&[
            "-d",
            &decode,
            "-Y",
            "tls.handshake.type == 2",
            "-T",
            "fields",
            "-e",
            "tls.handshake.extensions.supported_version",
        ])
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// `tshark -r <file> args`, stdout.
    pub fn tshark(&self, args: &[&str]) -> String {
        let mut command = Command::new("tshark");
        command.arg("-r").arg(&self.file).args(args);
        self.read_with(command)
    }

    fn read_with(&self, mut command: Command) -> String {
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.file.display()));
        assert!(
            output.status.success(),
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// The uid latch-proxy runs as in a pod; `latch-proxy iptables install` never captures its
/// traffic.
pub use latch_mesh::ports::PROXY_UID;
/// A pod's latch-proxy admin endpoint, as reached from the pod itself (its loopback).
pub const PROXY_ADMIN: &str = "127.0.0.1:15020";
/// Where a pod's latch-proxy admin listens: every address of the pod, as the injector sets it
/// (the kubelet and Prometheus reach it on the pod IP; `/debug/*` answers loopback only).
pub const POD_PROXY_ADMIN: &str = "[::]:15020";
/// latch-control's admin API, on the router namespace's loopback (latchctl runs there too).
pub const CONTROL_ADMIN: &str = "127.0.0.1:15014";

/// latch-control in the router namespace: pods reach it at the router's first address, port
/// 15010 (10.X.0.1:15010, or [fd00:X::1]:15010 on an IPv6-only network).
pub struct PodControlPlane<'n> {
    net: &'n TestNet,
    router: Pod<'n>,
    pub data_dir: PathBuf,
    config: PathBuf,
    /// Its gRPC address, as pods reach it.
    pub listen: String,
    pub process: PodProcess<'n>,
}

impl<'n> PodControlPlane<'n> {
    /// latch-control with an empty mesh config file.
    pub fn start(net: &'n TestNet) -> Self {
        Self::start_with(net, "{}\n")
    }

    /// latch-control with `config` as its (watched) config file.
    pub fn start_with(net: &'n TestNet, config: &str) -> Self {
        let router = net.router();
        let data_dir = net.dir().join("control");
        let config_path = net.dir().join("mesh.yaml");
        std::fs::write(&config_path, config).expect("write config");
        let listen = SocketAddr::new(router.ip(), 15010).to_string();
        let process = router.spawn(
            workspace_binary("latch-control"),
            &[
                "--data-dir",
                utf8(&data_dir),
                "--listen",
                &listen,
                "--admin",
                CONTROL_ADMIN,
                "--config",
                utf8(&config_path),
            ],
            None,
            &net.dir().join("control.log"),
        );
        process.wait_until(Duration::from_secs(20), "latch-control started", || {
            process.log().contains("control plane started")
        });
        Self {
            net,
            router,
            data_dir,
            config: config_path,
            listen,
            process,
        }
    }

    /// Replaces the config file the way an editor does (write aside, rename over).
    pub fn write_config(&self, config: &str) {
        replace_file(&self.config, config).expect("replace config");
    }

    /// A new join token for `id` from `latchctl token create`, reusable when asked.
    pub fn join_token(&self, id: &str, reusable: bool) -> String {
        let args =
            crate::binaries::token_create_args(id, CONTROL_ADMIN, utf8(&self.data_dir), reusable);
        self.router.run(workspace_binary("latchctl"), &args)
    }

    /// Meshes `pod`: a transparent proxy that knows `peer`, then the iptables capture.
    pub fn mesh(&self, pod: &Pod<'n>, peer: &Pod) -> PodProcess<'n> {
        let proxy = self.start_proxy(pod, Some(peer), &[]);
        self.capture(pod);
        proxy
    }

    /// Meshes `pod` with a proxy that learns its peers from discovery only.
    pub fn mesh_discovered(&self, pod: &Pod<'n>) -> PodProcess<'n> {
        let proxy = self.start_proxy(pod, None, &[]);
        self.capture(pod);
        proxy
    }

    /// `latch-proxy iptables install` in `pod`: its traffic goes through its proxy.
    pub fn capture(&self, pod: &Pod<'n>) {
        let capture = ["iptables", "install", "--proxy-uid", &PROXY_UID.to_string()];
        pod.run(workspace_binary("latch-proxy"), &capture);
    }

    /// The folder of `pod`'s proxy, owned by uid 1337, with the bundle and a join token for
    /// `pod`'s SPIFFE ID (reusable when asked, so that a restarted proxy can join again).
    pub fn proxy_dir(&self, pod: &Pod<'n>, reusable: bool) -> PathBuf {
        self.proxy_dir_as(pod, &pod.name, reusable)
    }

    /// `proxy_dir`, with a join token for workload `name`'s SPIFFE ID instead of the pod's
    /// (a workload that moved to another pod).
    pub fn proxy_dir_as(&self, pod: &Pod<'n>, name: &str, reusable: bool) -> PathBuf {
        let dir = self.net.dir().join(format!("proxy-{}", pod.name));
        let bundle = dir.join("bundle.pem");
        let token = dir.join("join-token");
        let token_value = self.join_token(&crate::spiffe_id(name), reusable);
        latch_identity::files::ensure_private_dir(&dir).expect("proxy dir");
        std::fs::copy(self.data_dir.join("bundle.pem"), &bundle).expect("copy bundle");
        write_token(&token, &token_value);
        for path in [&dir, &bundle, &token] {
            std::os::unix::fs::chown(path, Some(PROXY_UID), Some(PROXY_UID)).expect("chown");
        }
        dir
    }

    /// Starts a transparent latch-proxy in `pod` as uid 1337 with a fresh join token for
    /// `pod`'s SPIFFE ID, workload name demo/<pod>, `peer` (if any) as a flag-configured meshed
    /// peer and `extra` flags, and waits until it is ready (SVID held, discovery synced).
    pub fn start_proxy(&self, pod: &Pod<'n>, peer: Option<&Pod>, extra: &[&str]) -> PodProcess<'n> {
        let dir = self.proxy_dir(pod, false);
        self.run_proxy(pod, &dir, peer, extra, "proxy.log")
    }

    /// Starts a transparent latch-proxy in `pod` for workload demo/`name` (its SPIFFE ID and
    /// workload name, not the pod's: a workload that moved here), with discovery only, and
    /// waits until it is ready.
    pub fn start_proxy_as(&self, pod: &Pod<'n>, name: &str, extra: &[&str]) -> PodProcess<'n> {
        let dir = self.proxy_dir_as(pod, name, false);
        self.run_proxy_named(pod, &dir, name, None, extra, "proxy.log")
    }

    /// Starts latch-proxy in `pod` from `dir` (made by `proxy_dir`), logging to `dir/<log>`,
    /// and waits until it is ready.
    pub fn run_proxy(
        &self,
        pod: &Pod<'n>,
        dir: &Path,
        peer: Option<&Pod>,
        extra: &[&str],
        log: &str,
    ) -> PodProcess<'n> {
        self.run_proxy_named(pod, dir, &pod.name, peer, extra, log)
    }

    /// `run_proxy` for workload demo/`name`.
    pub fn run_proxy_named(
        &self,
        pod: &Pod<'n>,
        dir: &Path,
        name: &str,
        peer: Option<&Pod>,
        extra: &[&str],
        log: &str,
    ) -> PodProcess<'n> {
        let (bundle, token) = (dir.join("bundle.pem"), dir.join("join-token"));
        let workload = format!("demo/{name}");
        // The peer under each of its addresses, so its IPv6 address is meshed as its IPv4 one.
        let peers: Vec<String> = peer
            .map(|peer| {
                let id = crate::spiffe_id(&peer.name);
                peer.ips.iter().map(|ip| format!("{ip}={id}")).collect()
            })
            .unwrap_or_default();
        let mut args = vec![
            "--control-plane",
            &self.listen,
            "--ca-bundle",
            utf8(&bundle),
            "--join-token-file",
            utf8(&token),
            "--trust-domain",
            crate::TRUST_DOMAIN,
            "--admin",
            POD_PROXY_ADMIN,
            "--transparent",
            "--workload-name",
            &workload,
        ];
        for peer in &peers {
            args.extend(["--peer", peer.as_str()]);
        }
        args.extend_from_slice(extra);
        let proxy = pod.spawn(
            workspace_binary("latch-proxy"),
            &args,
            Some(PROXY_UID),
            &dir.join(log),
        );
        let ready = format!("http://{PROXY_ADMIN}/ready");
        proxy.wait_until(Duration::from_secs(20), "latch-proxy is ready", || {
            pod.curl(&ready).is_ok()
        });
        proxy
    }
}
