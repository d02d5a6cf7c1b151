//! latch-control and latch-proxy as processes of the workspace's binaries, on loopback: a
//! control plane with a data dir and a watched mesh config, restartable on the same ports, and
//! proxies in explicit mode with join-token files, started and waited for until /ready. Each
//! run is a `Child`, killed when dropped. Used by the fault and limit tests of tests/.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::admin::is_ready;
use crate::binaries::{latchctl, outcome, workspace_binary};
use crate::files::{utf8, write_token};
use crate::net::free_loopback;
use crate::{Child, TRUST_DOMAIN, spiffe_id};

/// How long a process may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts workspace binary `binary` with `args` and extra `env`, output to `log`.
pub fn spawn(binary: &str, args: &[&str], env: &[(String, String)], log: &Path) -> Child {
    let mut command = Command::new(workspace_binary(binary));
    command.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    Child::spawn(binary, command, log).unwrap_or_else(|e| panic!("{e:#}"))
}

/// latch-control on loopback with a data dir and a mesh config file (empty at first: every
/// peer of the trust domain may connect), restartable on the same ports and dir.
pub struct ControlProcess {
    dir: PathBuf,
    pub data_dir: PathBuf,
    pub grpc: String,
    pub admin: String,
    /// Extra environment (e.g. libfaketime).
    pub env: Vec<(String, String)>,
    starts: u32,
}

impl ControlProcess {
    /// A control plane whose logs and config live in `dir`, its state in `data_dir`.
    pub fn new(dir: &Path, data_dir: &Path) -> Self {
        std::fs::write(dir.join("mesh.yaml"), "{}\n").expect("mesh config");
        Self {
            dir: dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            grpc: free_loopback(),
            admin: free_loopback(),
            env: Vec::new(),
            starts: 0,
        }
    }

    /// Starts latch-control; does not wait. Each start logs to `control-<n>.log`.
    pub fn spawn(&mut self) -> Child {
        self.starts += 1;
        let config = self.dir.join("mesh.yaml");
        let log = self.dir.join(format!("control-{}.log", self.starts));
        spawn(
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
            &self.env,
            &log,
        )
    }

    /// Starts latch-control and waits until it serves.
    pub fn start(&mut self) -> Child {
        let process = self.spawn();
        process.wait_until(START_TIMEOUT, "latch-control started", || {
            process.log().contains("control plane started")
        });
        process
    }

    /// Its trust bundle file.
    pub fn bundle(&self) -> PathBuf {
        self.data_dir.join("bundle.pem")
    }

    /// Its admin credential.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("admin credential")
            .trim()
            .to_string()
    }

    /// `latchctl token create` for workload `name`: Ok(token) or Err(latchctl's stderr).
    pub fn create_token(&self, name: &str, reusable: bool) -> Result<String, String> {
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
        outcome(&latchctl(&args))
    }

    /// `latchctl cert request` with `token` into `out`: Ok(()) or Err(stderr).
    pub fn request_cert(&self, token: &str, out: &Path) -> Result<(), String> {
        outcome(&latchctl(&[
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
        ]))
        .map(drop)
    }
}

/// A latch-proxy on loopback in explicit mode: inbound mTLS on its own port, apps on
/// 127.0.0.1, optional explicit outbound listeners and extra flags.
pub struct ProxySpec {
    pub name: String,
    pub inbound: String,
    pub admin: String,
    /// `--svid-ttl`.
    pub ttl: String,
    pub outbound: Vec<String>,
    /// More flags (e.g. `--discovery=false`, limits).
    pub flags: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A command and arguments the proxy runs under (e.g. `prlimit --nofile=N:N --`).
    pub wrapper: Vec<String>,
}

impl ProxySpec {
    /// Workload `name` (`spiffe://cluster.local/ns/demo/sa/<name>`) asking for `ttl` SVIDs.
    pub fn new(name: &str, ttl: &str) -> Self {
        Self {
            name: name.to_string(),
            inbound: free_loopback(),
            admin: free_loopback(),
            ttl: ttl.to_string(),
            outbound: Vec::new(),
            flags: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    /// Adds an outbound listener on a free loopback port to `peer`'s app on `app_port`;
    /// returns the listener's address.
    pub fn to(&mut self, peer: &ProxySpec, app_port: u16) -> String {
        let listen = free_loopback();
        self.outbound.push(format!(
            "{listen}={}@{}/{app_port}",
            spiffe_id(&peer.name),
            peer.inbound
        ));
        listen
    }

    /// Starts the proxy with a reusable join token for its ID from `control` (written once
    /// into `dir`, so a restart authenticates again), and waits until /ready.
    pub fn start(&self, control: &ControlProcess, dir: &Path) -> Child {
        let token_file = dir.join(format!("{}.token", self.name));
        if !token_file.exists() {
            let token = control
                .create_token(&self.name, true)
                .unwrap_or_else(|e| panic!("token for {}: {e}", self.name));
            write_token(&token_file, &token);
        }
        self.start_with(&control.grpc, &control.bundle(), &token_file, dir)
    }

    /// Starts the proxy against the control plane at `control_plane` with this bundle and
    /// join-token file, logging into `dir`, and waits until /ready.
    pub fn start_with(
        &self,
        control_plane: &str,
        bundle: &Path,
        token_file: &Path,
        dir: &Path,
    ) -> Child {
        let log = dir.join(format!("proxy-{}.log", self.name));
        let proxy = workspace_binary("latch-proxy");
        let mut args = vec![
            "--control-plane",
            control_plane,
            "--ca-bundle",
            utf8(bundle),
            "--join-token-file",
            utf8(token_file),
            "--trust-domain",
            TRUST_DOMAIN,
            "--admin",
            &self.admin,
            "--inbound",
            &self.inbound,
            "--svid-ttl",
            &self.ttl,
        ];
        for outbound in &self.outbound {
            args.extend(["--outbound", outbound.as_str()]);
        }
        args.extend(self.flags.iter().map(String::as_str));
        let mut command = match self.wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(&proxy);
                command
            }
            None => Command::new(&proxy),
        };
        command
            .args(&args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child =
            Child::spawn("latch-proxy", command, &log).unwrap_or_else(|e| panic!("{e:#}"));
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        while !is_ready(&self.admin) {
            child.assert_running();
            assert!(
                std::time::Instant::now() < deadline,
                "latch-proxy not ready after {START_TIMEOUT:?}\n{}",
                child.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }
}

/// Waits until the proxy at `admin` (run by `proxy`) has installed another SVID; how long it
/// took.
pub fn wait_for_rotation(proxy: &Child, admin: &str) -> Duration {
    let rotations =
        || crate::admin::metric_blocking(admin, "latch_proxy_svid_rotations_total", &[]);
    let before = rotations();
    let started = std::time::Instant::now();
    proxy.wait_until(START_TIMEOUT, "an SVID renewal", || rotations() > before);
    started.elapsed()
}
