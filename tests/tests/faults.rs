//! Fault injection (docs/reliability.md, "Faults"): the real binaries under kill -9 (control plane
//! under load, a transparent proxy in a network namespace), a control plane on a read-only or full
//! data dir, and a proxy whose clock is two minutes off (libfaketime). Each test asserts what an
//! operator or an app would observe and prints the numbers docs/reliability.md reports. The mount
//! and namespace tests need root, the clock tests libfaketime; they skip without (or fail with
//! LATCH_REQUIRE_NETNS=1 / LATCH_REQUIRE_FAKETIME=1, as CI sets).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use latch_identity::bundle::sha256_hex;
use latch_tests::netns::{Pod, PodProcess, TestNet, require_netns};
use latch_tests::procs::{free_port, wait_for, workspace_binary};

const TRUST_DOMAIN: &str = "cluster.local";

fn spiffe_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/{name}")
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A process of ours that is SIGKILLed (by its PID, through `Child`) when dropped.
struct Process {
    child: std::process::Child,
    name: String,
    log: PathBuf,
}

impl Process {
    /// Starts `binary` (built if needed) with `args` and extra `env`, output to `log`.
    fn spawn(binary: &str, args: &[&str], env: &[(&str, &str)], log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("log file");
        let child = Command::new(workspace_binary(binary))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        Self {
            child,
            name: binary.to_string(),
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn logs(&self) -> String {
        format!("--- {} ---\n{}", self.name, self.log())
    }

    /// kill -9, then reap it.
    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{} ended by SIGKILL", self.name);
    }

    /// Waits for the process to exit by itself; its exit status.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {timeout:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_until(&self, timeout: Duration, what: &str, check: impl FnMut() -> bool) {
        assert!(
            wait_for(timeout, check),
            "timed out after {timeout:?} waiting until {what}\n{}",
            self.logs()
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP/1.0 request; (status, body). `None` when nothing answers.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut tcp = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = auth
        .map(|a| format!("Authorization: Bearer {a}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    http(addr, "GET", path, None, "")
}

/// The sum of a metric's samples (lines starting with `name`, containing every label) from
/// an admin endpoint's /metrics; 0 when absent.
fn metric(admin: &str, name: &str, labels: &[&str]) -> f64 {
    let text = get(admin, "/metrics").map(|(_, b)| b).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn ready(admin: &str) -> bool {
    get(admin, "/ready").is_some_and(|(status, _)| status == 200)
}

/// Runs latchctl to completion.
fn latchctl(args: &[&str]) -> Output {
    Command::new(workspace_binary("latchctl"))
        .args(args)
        .output()
        .expect("running latchctl")
}

/// An app speaking one exchange per connection: reads until EOF, answers "<name>: <request>".
struct EchoApp {
    port: u16,
}

impl EchoApp {
    fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo app");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut request = String::new();
                    if stream.read_to_string(&mut request).is_ok() {
                        let _ = stream.write_all(format!("{name}: {request}").as_bytes());
                    }
                });
            }
        });
        Self { port }
    }
}

/// One exchange with an app through `addr`: the answer, or what went wrong.
fn call(addr: &str, request: &str) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{e}"))?;
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    tcp.write_all(request.as_bytes())
        .and_then(|()| tcp.shutdown(Shutdown::Write))
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    Ok(answer)
}

/// latch-control on loopback with a data dir and an empty mesh config (every peer of the
/// trust domain may connect), restartable on the same ports and dir.
struct Control {
    dir: PathBuf,
    data_dir: PathBuf,
    grpc: String,
    admin: String,
    /// Extra environment (libfaketime).
    env: Vec<(String, String)>,
    starts: u32,
}

impl Control {
    fn new(dir: &Path, data_dir: &Path) -> Self {
        std::fs::write(dir.join("mesh.yaml"), "{}\n").expect("mesh config");
        Self {
            dir: dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            grpc: loopback(free_port().expect("port")),
            admin: loopback(free_port().expect("port")),
            env: Vec::new(),
            starts: 0,
        }
    }

    /// Starts latch-control; does not wait.
    fn spawn(&mut self) -> Process {
        self.starts += 1;
        let config = self.dir.join("mesh.yaml");
        let log = self.dir.join(format!("control-{}.log", self.starts));
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Process::spawn(
            "latch-control",
            &[
                "--data-dir",
                utf8(&self.data_dir),
                "--listen",
                &self.grpc,
                "--admin",
                &self.admin,
                "--config",
                utf8(&config),
                "--default-ttl",
                "1h",
            ],
            &env,
            &log,
        )
    }

    /// Starts latch-control and waits until it serves.
    fn start(&mut self) -> Process {
        let process = self.spawn();
        process.wait_until(Duration::from_secs(20), "latch-control started", || {
            process.log().contains("control plane started")
        });
        process
    }

    fn bundle(&self) -> PathBuf {
        self.data_dir.join("bundle.pem")
    }

    /// `latchctl token create` for `name`: Ok(token) or Err(latchctl's stderr).
    fn create_token(&self, name: &str, reusable: bool) -> Result<String, String> {
        let id = spiffe_id(name);
        let mut args = vec![
            "token",
            "create",
            "--spiffe-id",
            &id,
            "--admin",
            &self.admin,
            "--data-dir",
            utf8(&self.data_dir),
        ];
        if reusable {
            args.push("--reusable");
        }
        let out = latchctl(&args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// `latchctl cert request` with `token` into `out`: Ok(()) or Err(stderr).
    fn request_cert(&self, token: &str, out: &Path) -> Result<(), String> {
        let output = latchctl(&[
            "cert",
            "request",
            "--token",
            token,
            "--control-plane",
            &self.grpc,
            "--bundle",
            utf8(&self.bundle()),
            "--out",
            utf8(out),
        ]);
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
        }
    }
}

/// A latch-proxy on loopback in explicit mode: inbound mTLS on its own port, apps on
/// 127.0.0.1, optional explicit outbound listeners.
struct ProxySpec {
    name: &'static str,
    inbound: String,
    admin: String,
    ttl: &'static str,
    outbound: Vec<String>,
    env: Vec<(String, String)>,
}

impl ProxySpec {
    fn new(name: &'static str, ttl: &'static str) -> Self {
        Self {
            name,
            inbound: loopback(free_port().expect("port")),
            admin: loopback(free_port().expect("port")),
            ttl,
            outbound: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Adds an outbound listener on a free loopback port to `peer`'s app on `app_port`;
    /// returns the listener's address.
    fn to(&mut self, peer: &ProxySpec, app_port: u16) -> String {
        let listen = loopback(free_port().expect("port"));
        self.outbound.push(format!(
            "{listen}={}@{}/{app_port}",
            spiffe_id(peer.name),
            peer.inbound
        ));
        listen
    }

    /// Starts the proxy with a reusable join token file for its ID (so it can restart), and
    /// waits until /ready.
    fn start(&self, control: &Control, dir: &Path) -> Process {
        let token_file = dir.join(format!("{}.token", self.name));
        if !token_file.exists() {
            let token = control
                .create_token(self.name, true)
                .unwrap_or_else(|e| panic!("token for {}: {e}", self.name));
            latch_identity::files::write_private(&token_file, token.as_bytes())
                .expect("token file");
        }
        let log = dir.join(format!("proxy-{}.log", self.name));
        let bundle = control.bundle();
        let mut args = vec![
            "--control-plane",
            &control.grpc,
            "--ca-bundle",
            utf8(&bundle),
            "--join-token-file",
            utf8(&token_file),
            "--trust-domain",
            TRUST_DOMAIN,
            "--admin",
            &self.admin,
            "--inbound",
            &self.inbound,
            "--svid-ttl",
            self.ttl,
        ];
        for outbound in &self.outbound {
            args.extend(["--outbound", outbound.as_str()]);
        }
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let proxy = Process::spawn("latch-proxy", &args, &env, &log);
        proxy.wait_until(Duration::from_secs(20), "latch-proxy is ready", || {
            ready(&self.admin)
        });
        proxy
    }
}

/// Back-to-back exchanges through `entries` on `threads` threads until stopped; every failure
/// is kept.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(entries: &[(String, &'static str)], per_entry: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for (entry, app) in entries {
            for _ in 0..per_entry {
                let (stop, ok, entry, app) = (stop.clone(), ok.clone(), entry.clone(), *app);
                threads.push(std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match call(&entry, "ping") {
                            Ok(answer) if answer == format!("{app}: ping") => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => errors.push(format!("{entry}: {other:?}")),
                        }
                    }
                    errors
                }));
            }
        }
        Self { stop, ok, threads }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the load: (successful exchanges, failures).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread"))
            .collect();
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

/// The SHA-256 hashes of the join tokens recorded in `<data_dir>/join-tokens.json`.
fn recorded_token_hashes(data_dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(data_dir.join("join-tokens.json")).expect("token state");
    let state: serde_json::Value = serde_json::from_str(&text).expect("token state is JSON");
    state["tokens"]
        .as_object()
        .map(|tokens| tokens.keys().cloned().collect())
        .unwrap_or_default()
}

/// Creates join tokens back to back through the admin API until stopped; the tokens the API
/// confirmed (201) and how many attempts failed.
fn token_creator(
    control: &Control,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, u64)> {
    let admin = control.admin.clone();
    let credential = std::fs::read_to_string(control.data_dir.join("admin.token"))
        .expect("admin credential")
        .trim()
        .to_string();
    let body = format!(
        r#"{{"spiffe_id":"{}","ttl_seconds":3600}}"#,
        spiffe_id("later")
    );
    std::thread::spawn(move || {
        let (mut created, mut failed) = (Vec::new(), 0);
        while !stop.load(Ordering::Relaxed) {
            match http(&admin, "POST", "/v1/join-tokens", Some(&credential), &body) {
                Some((201, json)) => {
                    let value: serde_json::Value =
                        serde_json::from_str(&json).expect("token answer is JSON");
                    created.push(value["token"].as_str().expect("token").to_string());
                }
                _ => {
                    failed += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        (created, failed)
    })
}

#[test]
fn control_plane_kill_9_under_load_loses_no_request_and_no_state() {
    let dir = tempfile::Builder::new()
        .prefix("lf-kill-cp-")
        .tempdir()
        .expect("dir");
    let mut control = Control::new(dir.path(), &dir.path().join("data"));
    let mut process = control.start();
    let app = EchoApp::start("server");
    // Short SVIDs (renewed every ~6 s) so renewals span the outage and follow the restart.
    let server = ProxySpec::new("server", "12s");
    let mut client = ProxySpec::new("client", "12s");
    let entry = client.to(&server, app.port);
    let server_proxy = server.start(&control, dir.path());
    let client_proxy = client.start(&control, dir.path());
    let logs = |process: &Process| {
        format!(
            "{}\n{}\n{}",
            process.logs(),
            server_proxy.logs(),
            client_proxy.logs()
        )
    };
    assert_eq!(
        call(&entry, "hello").as_deref(),
        Ok("server: hello"),
        "{}",
        logs(&process)
    );

    // What must survive: the root, the bundle, the admin credential, and the join tokens (one
    // unused single-use token, and every token the API confirms while the kill happens).
    let root_cert = std::fs::read(control.data_dir.join("ca/root.crt.pem")).expect("root");
    let root_key = std::fs::read(control.data_dir.join("ca/root.key.pem")).expect("key");
    let bundle = std::fs::read(control.bundle()).expect("bundle");
    let credential = std::fs::read(control.data_dir.join("admin.token")).expect("credential");
    let unused = control.create_token("spare", false).expect("token");

    let load = Load::start(&[(entry.clone(), "server")], 2);
    let stop_tokens = Arc::new(AtomicBool::new(false));
    let tokens = token_creator(&control, stop_tokens.clone());
    std::thread::sleep(Duration::from_secs(1));
    let metric_of = |admin: &str, name: &str| metric(admin, name, &[]);
    let reconnects = |p: &ProxySpec| metric_of(&p.admin, "latch_proxy_discovery_reconnects");
    let rotations = |p: &ProxySpec| metric_of(&p.admin, "latch_proxy_svid_rotations_total");
    let reconnects_before = (reconnects(&server), reconnects(&client));

    process.kill9();
    let killed_at = Instant::now();
    let ok_at_kill = load.ok();
    std::thread::sleep(Duration::from_secs(2));
    let ok_while_down = load.ok() - ok_at_kill;
    let rotations_at_restart = (rotations(&server), rotations(&client));
    let mut process = control.start();
    let restarted_after = killed_at.elapsed();

    // Both proxies reconnect discovery to the new process and renew their SVIDs through it.
    let resynced = wait_for(Duration::from_secs(20), || {
        reconnects(&server) > reconnects_before.0
            && reconnects(&client) > reconnects_before.1
            && metric_of(&server.admin, "latch_proxy_discovery_connected") == 1.0
            && metric_of(&client.admin, "latch_proxy_discovery_connected") == 1.0
    });
    assert!(
        resynced,
        "the proxies did not reconnect\n{}",
        logs(&process)
    );
    let reconnected_after = killed_at.elapsed();
    let renewed = wait_for(Duration::from_secs(20), || {
        rotations(&server) > rotations_at_restart.0
            && rotations(&client) > rotations_at_restart.1
            && metric(
                &control.admin,
                "latch_control_svids_issued_total",
                &["renewal"],
            ) >= 2.0
    });
    assert!(
        renewed,
        "no SVID renewal after the restart\n{}",
        logs(&process)
    );
    let renewed_after = killed_at.elapsed();
    assert!(
        ready(&server.admin) && ready(&client.admin),
        "{}",
        logs(&process)
    );
    std::thread::sleep(Duration::from_millis(500));
    stop_tokens.store(true, Ordering::Relaxed);
    let (created, token_failures) = tokens.join().expect("token thread");
    let (ok, errors) = load.finish();

    assert!(
        errors.is_empty(),
        "{} exchanges failed: {errors:?}\n{}",
        errors.len(),
        logs(&process)
    );
    assert!(
        ok_while_down > 0,
        "no traffic while the control plane was down"
    );
    assert!(ok > 100, "too little traffic to mean anything: {ok}");

    // Nothing lost: CA, bundle and credential untouched; every confirmed token is on disk and
    // works; the spare single-use token was not spent by the crash and works once.
    assert_eq!(
        std::fs::read(control.data_dir.join("ca/root.crt.pem")).expect("root"),
        root_cert
    );
    assert_eq!(
        std::fs::read(control.data_dir.join("ca/root.key.pem")).expect("key"),
        root_key
    );
    assert_eq!(std::fs::read(control.bundle()).expect("bundle"), bundle);
    assert_eq!(
        std::fs::read(control.data_dir.join("admin.token")).expect("cred"),
        credential
    );
    let recorded = recorded_token_hashes(&control.data_dir);
    let missing: Vec<&String> = created
        .iter()
        .filter(|t| !recorded.contains(&sha256_hex(t.as_bytes())))
        .collect();
    assert!(!created.is_empty(), "no token was created around the kill");
    assert!(
        missing.is_empty(),
        "{} confirmed tokens lost: {missing:?}",
        missing.len()
    );
    let last = created.last().expect("a token");
    control
        .request_cert(last, &dir.path().join("last"))
        .expect("the last token confirmed before/after the kill works");
    control
        .request_cert(&unused, &dir.path().join("spare"))
        .expect("the unused single-use token survived the kill");
    assert!(
        control
            .request_cert(&unused, &dir.path().join("spare2"))
            .is_err(),
        "a single-use token worked twice"
    );
    let control_ready = get(&control.admin, "/ready").expect("admin answers");
    assert_eq!(control_ready.0, 200, "{}", control_ready.1);
    process.kill9();
    println!(
        "kill -9 of latch-control under load: {ok} exchanges, {} failed ({ok_while_down} while it \
         was down for 2 s); restarted {:.1} s after the kill, both proxies reconnected {:.1} s \
         and renewed {:.1} s after it; {} join tokens confirmed around the kill ({} attempts \
         refused while down), all on disk",
        errors.len(),
        restarted_after.as_secs_f64(),
        reconnected_after.as_secs_f64(),
        renewed_after.as_secs_f64(),
        created.len(),
        token_failures
    );
}

/// Set to 1 (CI does) to fail, not skip, the mount and namespace tests without root or tools.
const REQUIRE_ROOT_ENV: &str = "LATCH_REQUIRE_NETNS";

/// True when this process may mount (root, `mount` and `umount` on PATH); otherwise a loud
/// SKIPPED line, or a panic under LATCH_REQUIRE_NETNS=1.
fn require_mounts() -> bool {
    let tools = ["mount", "umount"];
    let mut missing: Vec<&str> = if latch_tests::procs::is_root() {
        vec![]
    } else {
        vec!["root"]
    };
    missing.extend(tools.iter().filter(|t| !latch_tests::netns::on_path(t)));
    if missing.is_empty() {
        return true;
    }
    if std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| v == "1") {
        panic!(
            "{REQUIRE_ROOT_ENV}=1 but this machine lacks: {}",
            missing.join(", ")
        );
    }
    eprintln!(
        "\n*** SKIPPED: needs root, mount, umount; missing: {} (set {REQUIRE_ROOT_ENV}=1 to fail instead) ***\n",
        missing.join(", ")
    );
    false
}

/// Runs `mount args`, panicking with its message on failure.
fn mount(args: &[&str]) {
    let out = Command::new("mount")
        .args(args)
        .output()
        .expect("running mount");
    assert!(
        out.status.success(),
        "mount {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A mount made by a test, unmounted (lazily if busy) when dropped, also when the test fails.
struct Mounted {
    path: PathBuf,
}

impl Mounted {
    /// `src` bind-mounted on `path`, then made read-only.
    fn read_only_bind(src: &Path, path: &Path) -> Self {
        mount(&["--bind", utf8(src), utf8(path)]);
        let mounted = Self {
            path: path.to_path_buf(),
        };
        mounted.set_read_only(true);
        mounted
    }

    /// A tmpfs of `size` bytes on `path`.
    fn tmpfs(path: &Path, size: usize) -> Self {
        let options = format!("size={size},mode=0700");
        mount(&["-t", "tmpfs", "-o", &options, "lf-faults", utf8(path)]);
        Self {
            path: path.to_path_buf(),
        }
    }

    fn set_read_only(&self, read_only: bool) {
        let options = if read_only {
            "remount,ro,bind"
        } else {
            "remount,rw,bind"
        };
        mount(&["-o", options, utf8(&self.path)]);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Every file under `dir` (relative path and bytes), recursively.
fn files_under(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("read dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                folders.push(path);
            } else {
                let name = path.strip_prefix(dir).expect("under dir");
                files.insert(
                    name.display().to_string(),
                    std::fs::read(&path).expect("read file"),
                );
            }
        }
    }
    files
}

/// Writes zeros to `path` until the file system is full; the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = [0u8; 4096];
    let mut written = 0;
    while file.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    let _ = file.sync_all();
    written
}

/// Start-up of a fresh control plane on an unwritable data dir: it exits with an error naming
/// the path and the reason, and leaves nothing behind.
fn assert_refused_start(control: &mut Control, reason: &str) -> String {
    let mut process = control.spawn();
    let status = process.wait_exit(Duration::from_secs(20));
    let log = process.log();
    assert!(!status.success(), "latch-control started anyway:\n{log}");
    let ca_dir = control.data_dir.join("ca");
    let error = log
        .lines()
        .find(|l| l.contains("could not start"))
        .unwrap_or_else(|| panic!("no start-up error in the log:\n{log}"))
        .to_string();
    assert!(
        error.contains(utf8(&ca_dir)) && error.contains(reason),
        "the error should name {} and say {reason:?}: {error}",
        ca_dir.display()
    );
    error
}

/// Waits until the proxy at `admin` has installed another SVID.
fn wait_for_rotation(proxy: &Process, admin: &str) -> Duration {
    let before = metric(admin, "latch_proxy_svid_rotations_total", &[]);
    let started = Instant::now();
    proxy.wait_until(Duration::from_secs(20), "an SVID renewal", || {
        metric(admin, "latch_proxy_svid_rotations_total", &[]) > before
    });
    started.elapsed()
}

#[test]
fn data_dir_read_only_refuses_writes_clearly_and_keeps_issuing() {
    if !require_mounts() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("lf-ro-")
        .tempdir()
        .expect("dir");
    let (src, data) = (dir.path().join("src"), dir.path().join("data"));
    std::fs::create_dir(&src).expect("src");
    std::fs::create_dir(&data).expect("data");
    let mut control = Control::new(dir.path(), &data);

    // Fresh and read-only: no CA can be made. Root ignores file modes, not a read-only mount.
    let mounted = Mounted::read_only_bind(&src, &data);
    assert!(
        std::fs::write(data.join("probe"), b"x").is_err(),
        "the mount is writable"
    );
    let error = assert_refused_start(&mut control, "Read-only file system");
    assert!(
        files_under(&src).is_empty(),
        "a refused start wrote {:?}",
        files_under(&src)
    );

    // Writable: a CA, a proxy holding a short SVID, a spare single-use token. Then read-only.
    mounted.set_read_only(false);
    let mut process = control.start();
    let proxy_spec = ProxySpec::new("web", "6s");
    let proxy = proxy_spec.start(&control, dir.path());
    let spare = control.create_token("spare", false).expect("token");
    process.kill9();
    mounted.set_read_only(true);
    let before = files_under(&data);

    // The existing CA starts, renews the proxy's SVID, issues for a reusable token ...
    let process = control.start();
    let renewed_in = wait_for_rotation(&proxy, &proxy_spec.admin);
    let reusable = std::fs::read_to_string(dir.path().join("web.token")).expect("token");
    control
        .request_cert(reusable.trim(), &dir.path().join("reusable"))
        .unwrap_or_else(|e| {
            panic!(
                "a reusable token works on a read-only data dir: {e}\n{}",
                process.logs()
            )
        });
    // ... and refuses what it must record, with the file and the reason.
    let token_error = control
        .create_token("new", false)
        .expect_err("token created on a read-only dir");
    let tokens_file = data.join("join-tokens.json");
    for needle in [utf8(&tokens_file), "Read-only file system", "503"] {
        assert!(
            token_error.contains(needle),
            "latchctl should say {needle:?}: {token_error}"
        );
    }
    let spend_error = control
        .request_cert(&spare, &dir.path().join("spare"))
        .expect_err("a single-use token was spent without being recorded");
    assert!(
        spend_error.contains(utf8(&tokens_file)) && spend_error.contains("Read-only file system"),
        "{spend_error}"
    );
    assert_eq!(
        files_under(&data),
        before,
        "files changed on a read-only data dir"
    );
    assert!(ready(&control.admin), "{}", process.logs());

    // Writable again: tokens are created and the refused single-use token was not spent.
    mounted.set_read_only(false);
    control
        .create_token("new", false)
        .expect("token after the fix");
    control
        .request_cert(&spare, &dir.path().join("spare"))
        .expect("the single-use token refused earlier still works");
    println!(
        "read-only data dir: fresh start refused ({error}); with an existing CA: started, SVID \
         renewed {:.1} s later, `latchctl token create` refused: {token_error}; single-use token \
         refused: {spend_error}; recovered on remount rw",
        renewed_in.as_secs_f64()
    );
}

#[test]
fn data_dir_full_refuses_writes_clearly_leaves_no_partial_file_and_recovers() {
    if !require_mounts() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("lf-full-")
        .tempdir()
        .expect("dir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data");
    // Room for a dozen small files; each takes a 4 KiB page.
    let _mounted = Mounted::tmpfs(&data, 64 * 1024);
    let mut control = Control::new(dir.path(), &data);
    let filler = data.join("filler");

    // Fresh, with one free page: the CA key fits, its certificate does not. The start fails,
    // and neither a lone key nor a temp file is left to block the next start.
    fill(&filler);
    let len = std::fs::metadata(&filler).expect("filler").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .and_then(|f| f.set_len(len - 4096))
        .expect("free one page");
    let error = assert_refused_start(&mut control, "No space left on device");
    let left: Vec<String> = files_under(&data)
        .into_keys()
        .filter(|f| f != "filler")
        .collect();
    assert!(left.is_empty(), "a failed start left {left:?}");
    std::fs::remove_file(&filler).expect("free the space");
    let mut process = control.start();
    let root = std::fs::read(data.join("ca/root.crt.pem")).expect("root");

    // Running, then the disk fills up.
    let proxy_spec = ProxySpec::new("web", "6s");
    let proxy = proxy_spec.start(&control, dir.path());
    let spare = control.create_token("spare", false).expect("token");
    let filled = fill(&filler);
    let before = files_under(&data);
    let token_error = control
        .create_token("new", false)
        .expect_err("token created on a full disk");
    let tokens_file = data.join("join-tokens.json");
    for needle in [utf8(&tokens_file), "No space left on device", "503"] {
        assert!(
            token_error.contains(needle),
            "latchctl should say {needle:?}: {token_error}"
        );
    }
    let spend_error = control
        .request_cert(&spare, &dir.path().join("spare"))
        .expect_err("a single-use token was spent without being recorded");
    assert!(
        spend_error.contains("No space left on device"),
        "{spend_error}"
    );
    let renewed_in = wait_for_rotation(&proxy, &proxy_spec.admin);
    assert_eq!(
        files_under(&data),
        before,
        "a failed write changed or left a file"
    );

    // A restart on the full disk keeps the CA and serves.
    process.kill9();
    let process = control.start();
    wait_for_rotation(&proxy, &proxy_spec.admin);
    assert_eq!(
        std::fs::read(data.join("ca/root.crt.pem")).expect("root"),
        root
    );
    assert!(ready(&control.admin), "{}", process.logs());

    // Space back: tokens again, and the refused single-use token was not spent.
    std::fs::remove_file(&filler).expect("free the space");
    control
        .create_token("new", false)
        .expect("token once there is room");
    control
        .request_cert(&spare, &dir.path().join("spare"))
        .expect("the single-use token refused earlier still works");
    println!(
        "full data dir (tmpfs 64 KiB, {filled} bytes of filler): fresh start refused ({error}), \
         nothing left behind, started once space returned; running: `latchctl token create` \
         refused: {token_error}; single-use token refused: {spend_error}; SVID renewed {:.1} s \
         into the full disk; restart on the full disk kept the CA; recovered once space returned",
        renewed_in.as_secs_f64()
    );
}

/// Set to 1 (CI does) to fail, not skip, the clock-skew tests when libfaketime is missing.
const REQUIRE_FAKETIME_ENV: &str = "LATCH_REQUIRE_FAKETIME";

/// libfaketime's preload library (Debian package `faketime`), or a SKIPPED line / a panic
/// under LATCH_REQUIRE_FAKETIME=1.
fn libfaketime() -> Option<PathBuf> {
    let found = ["x86_64-linux-gnu", "aarch64-linux-gnu", ""]
        .iter()
        .flat_map(|arch| {
            ["/usr/lib", "/usr/local/lib"]
                .map(|lib| Path::new(lib).join(arch).join("faketime/libfaketime.so.1"))
        })
        .find(|path| path.is_file());
    if found.is_none() {
        if std::env::var(REQUIRE_FAKETIME_ENV).is_ok_and(|v| v == "1") {
            panic!(
                "{REQUIRE_FAKETIME_ENV}=1 but libfaketime.so.1 is missing (apt-get install faketime)"
            );
        }
        eprintln!(
            "\n*** SKIPPED: needs libfaketime (apt-get install faketime); set {REQUIRE_FAKETIME_ENV}=1 to fail instead ***\n"
        );
    }
    found
}

/// The first RFC 3339 UTC timestamp in a log (tracing's text format), as a SystemTime.
fn first_log_time(log: &str) -> Option<SystemTime> {
    let bytes = log.as_bytes();
    (0..bytes.len().saturating_sub(19)).find_map(|i| {
        let candidate = log.get(i..i + 19)?;
        let shape = candidate.bytes().enumerate().all(|(j, b)| match j {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            _ => b.is_ascii_digit(),
        });
        if !shape {
            return None;
        }
        humantime::parse_rfc3339(&format!("{candidate}Z")).ok()
    })
}

/// Two proxies and the control plane; proxy "skewed" runs with its clock `offset_secs` off
/// (libfaketime: SystemTime and the monotonic clock). Traffic flows both ways through both
/// proxies while the SVID named `renewing` renews; no exchange may fail.
fn skewed_peers(
    offset_secs: i64,
    skewed_ttl: &'static str,
    plain_ttl: &'static str,
    renewing: &str,
) {
    let Some(lib) = libfaketime() else { return };
    let dir = tempfile::Builder::new()
        .prefix("lf-skew-")
        .tempdir()
        .expect("dir");
    let mut control = Control::new(dir.path(), &dir.path().join("data"));
    let process = control.start();
    let (plain_app, skewed_app) = (EchoApp::start("plain"), EchoApp::start("skewed"));
    let mut plain = ProxySpec::new("plain", plain_ttl);
    let mut skewed = ProxySpec::new("skewed", skewed_ttl);
    skewed.env = vec![
        ("LD_PRELOAD".into(), utf8(&lib).into()),
        ("FAKETIME".into(), format!("{offset_secs:+}")),
    ];
    let to_skewed = plain.to(&skewed, skewed_app.port);
    let to_plain = skewed.to(&plain, plain_app.port);
    let plain_proxy = plain.start(&control, dir.path());
    let started = SystemTime::now();
    let skewed_proxy = skewed.start(&control, dir.path());
    let logs = || {
        format!(
            "{}\n{}\n{}",
            process.logs(),
            plain_proxy.logs(),
            skewed_proxy.logs()
        )
    };

    // The fault is real: the skewed proxy's own clock (its log timestamps) is off by the offset.
    let seen = first_log_time(&skewed_proxy.log()).expect("a timestamp in the skewed log");
    let skew = match seen.duration_since(started) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    };
    assert!(
        (skew - offset_secs as f64).abs() < 10.0,
        "the skewed proxy's clock is {skew:.0} s off, not {offset_secs} s"
    );

    let load = Load::start(&[(to_skewed, "skewed"), (to_plain, "plain")], 1);
    let (renewer, renewer_admin) = match renewing {
        "skewed" => (&skewed_proxy, skewed.admin.as_str()),
        _ => (&plain_proxy, plain.admin.as_str()),
    };
    let renewed_in = wait_for_rotation(renewer, renewer_admin);
    // A few exchanges more on new connections, so handshakes see the renewed SVID.
    let after = load.ok();
    assert!(
        wait_for(Duration::from_secs(10), || load.ok() > after + 20),
        "traffic stopped after the renewal\n{}",
        logs()
    );
    let (ok, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} exchanges failed: {:?}\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        logs()
    );
    assert!(ready(&skewed.admin) && ready(&plain.admin), "{}", logs());
    println!(
        "clock of one proxy {offset_secs:+} s: {ok} exchanges both ways between the skewed and \
         the unskewed proxy, 0 failed; {renewing}'s SVID renewed after {:.1} s",
        renewed_in.as_secs_f64()
    );
}

/// Its clock ahead, the skewed proxy sees its SVIDs 120 s shorter: with a 135 s TTL it renews
/// after ~7 s of the 15 s it sees. The other proxy's SVID must outlive the skew to be accepted.
#[test]
fn clock_skew_proxy_two_minutes_ahead_keeps_mtls_and_renews() {
    skewed_peers(120, "135s", "10m", "skewed");
}

/// Its clock behind, the skewed proxy must accept SVIDs issued "in its future": the unskewed
/// proxy renews a 6 s SVID every ~3 s, and each new one is checked by the skewed proxy at every
/// handshake. (Its own SVID needs a TTL over the skew: it renews at half of TTL + 120 s.)
#[test]
fn clock_skew_proxy_two_minutes_behind_keeps_mtls_and_renews() {
    skewed_peers(-120, "10m", "6s", "plain");
}

/// The uid latch-proxy runs as in a pod; the capture never redirects its own traffic.
use latch_mesh::ports::PROXY_UID;
const POD_PROXY_ADMIN: &str = "127.0.0.1:15020";
const CONTROL_ADMIN: &str = "127.0.0.1:15014";
/// The connect timeout the app (curl) uses: a fault must surface well before it.
const APP_CONNECT_TIMEOUT_SECS: u64 = 5;

/// A transparent latch-proxy in `pod` (uid 1337, reusable join token in `dir`, `peer` as a
/// flag-configured meshed peer), started and waited for until /ready; returns it and how long
/// it took to become ready.
fn start_pod_proxy<'n>(
    pod: &Pod<'n>,
    peer: &Pod,
    control_addr: &str,
    dir: &Path,
) -> (PodProcess<'n>, Duration) {
    let peer = format!("{}={}", peer.ip, spiffe_id(&peer.name));
    let workload = format!("demo/{}", pod.name);
    // Each start logs to its own file, so a restarted proxy's log is its own.
    static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let (bundle, token) = (dir.join("bundle.pem"), dir.join("join-token"));
    let started = Instant::now();
    let proxy = pod.spawn(
        workspace_binary("latch-proxy"),
        &[
            "--control-plane",
            control_addr,
            "--ca-bundle",
            utf8(&bundle),
            "--join-token-file",
            utf8(&token),
            "--admin",
            POD_PROXY_ADMIN,
            "--transparent",
            "--workload-name",
            &workload,
            "--peer",
            &peer,
        ],
        Some(PROXY_UID),
        &dir.join(format!(
            "proxy-{}.log",
            STARTS.fetch_add(1, Ordering::Relaxed)
        )),
    );
    let ready_url = format!("http://{POD_PROXY_ADMIN}/ready");
    proxy.wait_until(Duration::from_secs(20), "latch-proxy is ready", || {
        pod.curl(&ready_url).is_ok()
    });
    (proxy, started.elapsed())
}

/// curl from `pod` with the app's connect timeout: Ok(body) or Err(curl's exit code and
/// message), and how long it took.
fn timed_curl(pod: &Pod, url: &str) -> (Result<String, String>, Duration) {
    let started = Instant::now();
    let timeout = APP_CONNECT_TIMEOUT_SECS.to_string();
    let out = pod.exec(
        "curl",
        &[
            "-sS",
            "-f",
            "--connect-timeout",
            &timeout,
            "--max-time",
            "10",
            url,
        ],
    );
    let elapsed = started.elapsed();
    let result = if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "exit {}: {}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    };
    (result, elapsed)
}

/// Polls `url` from `pod` until it answers `body`; how long that took.
fn until_served(pod: &Pod, url: &str, body: &str, logs: impl Fn() -> String) -> Duration {
    let started = Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || pod.curl(url).as_deref()
            == Ok(body)),
        "{url} never served again from {}\n{}",
        pod.name,
        logs()
    );
    started.elapsed()
}

#[test]
fn proxy_kill_9_fails_the_apps_connections_fast_and_they_recover_on_restart() {
    if !require_netns() {
        return;
    }
    const BODY: &str = "served by b through the mesh";
    let net = TestNet::new("lf-kill");
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let router = net.router();
    let nginx = b.start_nginx(BODY);

    // latch-control in the router namespace; each pod gets a reusable join token (a restarted
    // proxy authenticates again with it) and the bundle.
    let data_dir = net.dir().join("control");
    let config = net.dir().join("mesh.yaml");
    std::fs::write(&config, "{}\n").expect("config");
    let control_addr = format!("{}:15010", router.ip);
    let control = router.spawn(
        workspace_binary("latch-control"),
        &[
            "--data-dir",
            utf8(&data_dir),
            "--listen",
            &control_addr,
            "--admin",
            CONTROL_ADMIN,
            "--config",
            utf8(&config),
        ],
        None,
        &net.dir().join("control.log"),
    );
    control.wait_until(Duration::from_secs(20), "latch-control started", || {
        control.log().contains("control plane started")
    });
    let mut dirs = Vec::new();
    for pod in [&a, &b] {
        let token = router.run(
            workspace_binary("latchctl"),
            &[
                "token",
                "create",
                "--reusable",
                "--spiffe-id",
                &spiffe_id(&pod.name),
                "--admin",
                CONTROL_ADMIN,
                "--data-dir",
                utf8(&data_dir),
            ],
        );
        let dir = net.dir().join(format!("proxy-{}", pod.name));
        latch_identity::files::ensure_private_dir(&dir).expect("proxy dir");
        std::fs::copy(data_dir.join("bundle.pem"), dir.join("bundle.pem")).expect("bundle");
        latch_identity::files::write_private(&dir.join("join-token"), token.as_bytes())
            .expect("token");
        for path in [dir.clone(), dir.join("bundle.pem"), dir.join("join-token")] {
            std::os::unix::fs::chown(&path, Some(PROXY_UID), Some(PROXY_UID)).expect("chown");
        }
        dirs.push(dir);
    }
    let (proxy_a, _) = start_pod_proxy(&a, &b, &control_addr, &dirs[0]);
    let (proxy_b, _) = start_pod_proxy(&b, &a, &control_addr, &dirs[1]);
    for pod in [&a, &b] {
        let capture = ["iptables", "install", "--proxy-uid", &PROXY_UID.to_string()];
        pod.run(workspace_binary("latch-proxy"), &capture);
    }
    let url = format!("http://{}/", b.ip);
    let logs = |procs: &[&PodProcess]| -> String {
        procs
            .iter()
            .map(|p| format!("--- {} ---\n{}\n", p.name(), p.log()))
            .collect()
    };
    assert_eq!(
        a.curl(&url).as_deref(),
        Ok(BODY),
        "{}",
        logs(&[&proxy_a, &proxy_b, &nginx])
    );

    // kill -9 of a's proxy: a's connections are still captured, to a port nobody listens on.
    let pid = proxy_a.pid();
    drop(proxy_a); // SIGKILL, by PID
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "a's proxy survived SIGKILL"
    );
    let (outbound, outbound_took) = timed_curl(&a, &url);
    let outbound_error = outbound.expect_err("a reached b with its proxy dead");
    assert!(
        outbound_took < Duration::from_secs(APP_CONNECT_TIMEOUT_SECS),
        "a's app waited {outbound_took:?} to learn its proxy is gone: {outbound_error}"
    );
    let restarted = Instant::now();
    let (proxy_a, a_ready_in) = start_pod_proxy(&a, &b, &control_addr, &dirs[0]);
    let a_served_in = until_served(&a, &url, BODY, || logs(&[&proxy_a, &proxy_b]));
    let a_recovered_in = restarted.elapsed();

    // kill -9 of b's proxy: a's proxy finds nobody on b's mesh port and closes a's connection.
    drop(proxy_b);
    let (inbound, inbound_took) = timed_curl(&a, &url);
    let inbound_error = inbound.expect_err("a reached b with b's proxy dead");
    assert!(
        inbound_took < Duration::from_secs(APP_CONNECT_TIMEOUT_SECS),
        "a's app waited {inbound_took:?} for b's dead proxy: {inbound_error}"
    );
    let restarted = Instant::now();
    let (proxy_b, b_ready_in) = start_pod_proxy(&b, &a, &control_addr, &dirs[1]);
    until_served(&a, &url, BODY, || logs(&[&proxy_a, &proxy_b]));
    let b_recovered_in = restarted.elapsed();
    assert!(a.curl(&format!("http://{POD_PROXY_ADMIN}/ready")).is_ok());
    assert!(b.curl(&format!("http://{POD_PROXY_ADMIN}/ready")).is_ok());
    println!(
        "kill -9 of a's proxy: a's request failed after {:.0} ms ({outbound_error}); restarted \
         proxy ready in {:.1} s, a served again {:.1} s after the restart ({:.2} s after ready). \
         kill -9 of b's proxy: a's request failed after {:.0} ms ({inbound_error}); restarted \
         proxy ready in {:.1} s, a served again {:.1} s after the restart",
        outbound_took.as_secs_f64() * 1000.0,
        a_ready_in.as_secs_f64(),
        a_recovered_in.as_secs_f64(),
        a_served_in.as_secs_f64(),
        inbound_took.as_secs_f64() * 1000.0,
        b_ready_in.as_secs_f64(),
        b_recovered_in.as_secs_f64(),
    );
}
