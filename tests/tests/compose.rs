//! The docker-compose mesh of deploy/compose against a real Docker engine: builds both images
//! from this workspace's binaries, starts the project under a unique name, and checks what a
//! user would see: the client's request is answered and crosses the compose network only as
//! TLS 1.3 on port 15008, a container without a sidecar is refused, the server's SVID rotates
//! under traffic, and `down` leaves no container, network or volume behind. Skips without a
//! Docker engine unless LATCH_REQUIRE_DOCKER=1 (CI sets it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use latch_testkit::binaries::{workspace_binary, workspace_root};
use latch_testkit::netns::{Pcap, on_path};
use latch_testkit::wait_for;
use xtask::compose::{Images, Project, build_images, engine_available, image_size};

/// What the demo server answers (deploy/compose/demo-app.Dockerfile).
const BODY: &str = "hello from the demo server, through the Latch mesh";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
const REQUIRE_ENV: &str = "LATCH_REQUIRE_DOCKER";
/// Short, so that a rotation happens within the test (renewal at about half of it).
const SVID_TTL: &str = "20s";

#[test]
fn compose_mesh_serves_over_mtls_refuses_outsiders_rotates_and_cleans_up() {
    if !require_docker() {
        return;
    }
    let started = Instant::now();
    let root = workspace_root();
    let work = tempfile::tempdir().expect("temp dir");
    let binaries = workspace_binary("latch-proxy")
        .parent()
        .map(Path::to_path_buf)
        .expect("binaries folder");
    let images = Images::tagged("e2e");
    build_images(&root, &binaries, work.path(), &images).expect("building the images");
    eprintln!(
        "images built in {:.1} s: {} {:.0} MB, {} {:.0} MB",
        started.elapsed().as_secs_f64(),
        images.latch,
        image_size(&images.latch).unwrap_or(0) as f64 / 1e6,
        images.demo,
        image_size(&images.demo).unwrap_or(0) as f64 / 1e6,
    );

    let project = Project::new(
        &root,
        &format!("latch-e2e-{}", std::process::id()),
        images.clone(),
    )
    .with_env("LATCH_SVID_TTL", SVID_TTL)
    .with_free_subnet()
    .expect("a free subnet for the project");
    // The server's fixed address in docker-compose.yml, in the project's /24.
    let server_url = format!("http://{}:8080/", project.address(20));
    let mesh = Mesh::new(project.clone(), images);
    let up_at = Instant::now();
    project
        .up(Duration::from_secs(120))
        .expect("the compose project comes up healthy");
    eprintln!(
        "project up on {} in {:.1} s",
        project.subnet(),
        up_at.elapsed().as_secs_f64()
    );
    let client = mesh.container("client");
    let server = mesh.container("server");
    let server_proxy = mesh.container("server-proxy");

    // 1. The client's plain HTTP request is answered, and on the server's cable there is only
    //    TLS 1.3 on the mesh port: no byte of the page, nothing on port 8080.
    let capture = HostCapture::start(&host_interface(&server), work.path());
    let reply = curl(&client, &server_url);
    let pcap = capture.stop();
    assert_eq!(reply.as_deref(), Ok(BODY), "{}", mesh.logs());
    pcap.assert_mesh_only(15008, 8080, BODY);
    // The server's proxy saw the client's SPIFFE ID on the connection.
    let peer = format!("peer=\"{CLIENT_ID}\"");
    assert!(
        metric(
            &server_proxy,
            "latch_proxy_tcp_connections_opened",
            &[&peer]
        ) >= 1.0,
        "the server's proxy counted no connection from {CLIENT_ID}:\n{}",
        admin(&server_proxy, "/metrics")
    );

    // The client pod's SPIFFE-aware app (uid 4242) printed its SPIFFE ID, fetched over the
    // Workload API of its proxy.
    let printed = |logs: &str| {
        logs.lines()
            .any(|l| l.starts_with(&format!("{CLIENT_ID} serial ")))
    };
    let waited = Instant::now();
    let mut identity = mesh.project.logs("client-identity");
    while !printed(&identity) && waited.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(500));
        identity = mesh.project.logs("client-identity");
    }
    assert!(
        printed(&identity),
        "client-identity printed no SVID for {CLIENT_ID}:\n{identity}"
    );

    // Docker's embedded DNS (127.0.0.11, left alone by the capture rules) still answers in a
    // meshed namespace: the service name reaches the same server, through the mesh.
    assert_eq!(
        curl(&client, "http://server:8080/").as_deref(),
        Ok(BODY),
        "{}",
        mesh.logs()
    );

    // 2. A container on the same network without a sidecar gets no answer: the server's proxy
    //    is STRICT and refuses its plaintext.
    let strict = ["reason=\"strict_mtls\""];
    let refused_before = metric(
        &server_proxy,
        "latch_proxy_tcp_connections_refused",
        &strict,
    );
    let outsider = mesh.outsider(&["curl", "-sS", "-f", "--max-time", "5", &server_url]);
    assert!(
        !outsider.status.success(),
        "a container without a sidecar got an answer: {}",
        String::from_utf8_lossy(&outsider.stdout)
    );
    assert!(
        !String::from_utf8_lossy(&outsider.stdout).contains(BODY),
        "the page reached a container without a sidecar"
    );
    let refused = metric(
        &server_proxy,
        "latch_proxy_tcp_connections_refused",
        &strict,
    );
    assert!(
        refused > refused_before,
        "the outsider's request should be refused by the server's proxy (STRICT); curl said: \
         {}\n{}",
        String::from_utf8_lossy(&outsider.stderr).trim(),
        mesh.logs()
    );

    // 3. The server's SVID rotates (TTL 20 s, renewed at about half), and traffic still flows.
    let certs = |container: &str| -> serde_json::Value {
        serde_json::from_str(&admin(container, "/debug/certs")).unwrap_or_default()
    };
    let first = certs(&server_proxy);
    assert_eq!(first["spiffe_id"], SERVER_ID, "{first}");
    let first_serial = first["serial"].as_str().unwrap_or_default().to_string();
    assert!(!first_serial.is_empty(), "{first}");
    let rotated = wait_for(Duration::from_secs(45), || {
        let now = certs(&server_proxy);
        now["serial"].as_str().is_some_and(|s| s != first_serial)
    });
    assert!(
        rotated,
        "the server's SVID (serial {first_serial}) did not rotate within 45 s with a {SVID_TTL} \
         TTL:\n{}",
        mesh.logs()
    );
    assert_eq!(
        certs(&server_proxy)["spiffe_id"],
        SERVER_ID,
        "the renewed SVID keeps the ID"
    );
    assert_eq!(
        curl(&client, &server_url).as_deref(),
        Ok(BODY),
        "{}",
        mesh.logs()
    );

    // 4. down removes everything the project made.
    let name = project.name.clone();
    mesh.down();
    let left = project.leftovers().expect("listing what is left");
    assert!(
        left.is_empty(),
        "docker-compose down left behind, for project {name}: {left:?}"
    );
    eprintln!(
        "compose test done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// True when a Docker engine answers and the host tools are here; otherwise a loud SKIPPED
/// line, or a panic when LATCH_REQUIRE_DOCKER=1.
fn require_docker() -> bool {
    let mut missing: Vec<String> = ["docker-compose", "tcpdump", "tshark", "strip"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .map(str::to_string)
        .collect();
    if let Err(e) = engine_available() {
        missing.push(format!("{e:#}"));
    }
    if missing.is_empty() {
        return true;
    }
    let missing = missing.join("; ");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but this machine lacks: {missing}");
    }
    latch_testkit::skip::skipped(&format!(
        "the compose test needs a Docker engine, docker-compose, tcpdump, tshark and strip; \
         missing: {missing} (set {REQUIRE_ENV}=1 to fail instead)"
    ));
    false
}

/// `docker <args>`, its output whatever the exit status.
fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running docker {args:?}: {e}"))
}

/// `curl` from inside `container` (its network namespace, and so its iptables capture).
fn curl(container: &str, url: &str) -> Result<String, String> {
    let output = docker(&[
        "exec",
        container,
        "curl",
        "-sS",
        "-f",
        "--max-time",
        "10",
        url,
    ]);
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(format!(
            "curl {url} in {container}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A path of a proxy's admin endpoint (127.0.0.1:15020 in its network namespace).
fn admin(proxy: &str, path: &str) -> String {
    curl(proxy, &format!("http://127.0.0.1:15020{path}")).unwrap_or_else(|e| e)
}

/// A counter from a proxy's /metrics: the sum over lines of `name` (plus `_total`) that carry
/// every one of `labels`.
fn metric(proxy: &str, name: &str, labels: &[&str]) -> f64 {
    admin(proxy, "/metrics")
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The host side of `container`'s network cable (its eth0's veth peer).
fn host_interface(container: &str) -> String {
    let output = docker(&["exec", container, "cat", "/sys/class/net/eth0/iflink"]);
    let index = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        output.status.success() && !index.is_empty(),
        "cannot read {container}'s eth0 iflink: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let interfaces = std::fs::read_dir("/sys/class/net").expect("/sys/class/net");
    for entry in interfaces.flatten() {
        let ifindex = std::fs::read_to_string(entry.path().join("ifindex")).unwrap_or_default();
        if ifindex.trim() == index {
            return entry.file_name().to_string_lossy().into_owned();
        }
    }
    panic!("no host interface has index {index} ({container}'s veth peer)");
}

/// tcpdump on a host interface, writing a pcap file.
struct HostCapture {
    child: Child,
    file: PathBuf,
    log: PathBuf,
}

impl HostCapture {
    fn start(interface: &str, dir: &Path) -> Self {
        let file = dir.join(format!("{interface}.pcap"));
        let log = dir.join(format!("tcpdump-{interface}.log"));
        // --immediate-mode and -U so that nothing is lost in a buffer when it stops; -Z root so
        // it may write in the temp dir.
        let child = Command::new("tcpdump")
            .args([
                "--immediate-mode",
                "-U",
                "-Z",
                "root",
                "-i",
                interface,
                "-w",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("tcpdump log"))
            .spawn()
            .expect("starting tcpdump");
        let capture = Self { child, file, log };
        let listening = wait_for(Duration::from_secs(10), || {
            capture.log_text().contains("listening on")
        });
        assert!(listening, "tcpdump did not start: {}", capture.log_text());
        capture
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops tcpdump with SIGINT (so it flushes the file) and returns the capture.
    fn stop(mut self) -> Pcap {
        let pid = self.child.id().to_string();
        let signalled = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .is_ok_and(|s| s.success());
        let exited = signalled
            && wait_for(Duration::from_secs(10), || {
                self.child.try_wait().is_ok_and(|s| s.is_some())
            });
        assert!(
            exited,
            "tcpdump did not stop on SIGINT: {}",
            self.log_text()
        );
        Pcap {
            file: self.file.clone(),
        }
    }
}

impl Drop for HostCapture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The running project: taken down (and the test's images removed) when dropped, so a failed
/// assertion leaves nothing running either.
struct Mesh {
    project: Project,
    images: Images,
    down: bool,
}

impl Mesh {
    fn new(project: Project, images: Images) -> Self {
        Self {
            project,
            images,
            down: false,
        }
    }

    fn container(&self, service: &str) -> String {
        self.project
            .container(service)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The last log lines of every service, for assertion messages.
    fn logs(&self) -> String {
        [
            "control",
            "server",
            "server-proxy",
            "client",
            "client-proxy",
            "client-identity",
        ]
        .iter()
        .map(|s| format!("--- {s} ---\n{}", self.project.logs(s)))
        .collect()
    }

    /// Runs `command` in a throwaway container on the project's network, without a sidecar.
    fn outsider(&self, command: &[&str]) -> Output {
        let network = self.project.network().unwrap_or_else(|e| panic!("{e:#}"));
        let mut args = vec!["run", "--rm", "--network", &network, &self.images.demo];
        args.extend_from_slice(command);
        docker(&args)
    }

    fn down(mut self) {
        self.down = true;
        if let Err(e) = self.project.down() {
            panic!("{e:#}");
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if !self.down
            && let Err(e) = self.project.down()
        {
            eprintln!("cleaning up after a failure: {e:#}");
        }
        for image in [&self.images.latch, &self.images.demo] {
            let _ = Command::new("docker")
                .args(["image", "rm", image])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
