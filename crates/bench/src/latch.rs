//! Latch in the bench: a `latch-control` process (whose CA also issues the SVIDs stunnel and
//! HAProxy use), join tokens and SVID files through `latchctl`, and the two `latch-proxy`
//! sidecars in explicit mode: `--outbound` per app on the client side, `--inbound` on the server.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use latch_mesh::ports;

use super::tunnel::{Alt, App, Tunnel};
use latch_testkit::Child as Proc;
use latch_testkit::binaries::sibling_binary;
use latch_testkit::child::{log_tail, run_output};
use latch_testkit::net::wait_port;

pub const ENTRY_BASE: u16 = 11000;
pub const CONTROL_GRPC: &str = "127.0.0.1:15010";
const CONTROL_ADMIN: &str = "127.0.0.1:15014";
const SERVER_MESH: &str = "127.0.0.1:15008";
pub const SERVER_ADMIN: &str = "127.0.0.1:15020";
pub const CLIENT_MESH: &str = "127.0.0.1:15108";
pub const CLIENT_ADMIN: &str = "127.0.0.1:15120";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";

/// A running control plane.
pub struct ControlPlane {
    proc: Proc,
    data_dir: PathBuf,
}

/// An SVID written by `latchctl cert request`.
pub struct SvidFiles {
    pub chain: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

impl ControlPlane {
    pub fn start(dir: &Path) -> Result<Self> {
        let data_dir = dir.join("control");
        let log = dir.join("latch-control.log");
        let mut command = Command::new(sibling_binary("latch-control"));
        command.arg("--data-dir").arg(&data_dir).args([
            "--listen",
            CONTROL_GRPC,
            "--admin",
            CONTROL_ADMIN,
        ]);
        let mut proc = crate::spawn("latch-control", command, &log)
            .context("starting latch-control (cargo build --release --bins)")?;
        wait_port(ports::CONTROL_GRPC, Duration::from_secs(15))?;
        wait_port(ports::CONTROL_ADMIN, Duration::from_secs(15))?;
        // The ports are bound before the CA and the admin credential are made.
        let made = latch_testkit::wait_for(Duration::from_secs(15), || {
            ["admin.token", "bundle.pem"]
                .iter()
                .all(|f| data_dir.join(f).exists())
        });
        proc.check_running()?;
        if !made {
            bail!(
                "latch-control made no admin credential and bundle within 15 s; see {}",
                log.display()
            );
        }
        Ok(Self { proc, data_dir })
    }

    /// CPU time the control plane has used.
    pub fn cpu_time(&self) -> Result<Duration> {
        self.proc.cpu_time()
    }

    pub fn bundle(&self) -> PathBuf {
        self.data_dir.join("bundle.pem")
    }

    /// A new single-use join token for `id`.
    pub fn token(&self, id: &str) -> Result<String> {
        let data_dir = self
            .data_dir
            .to_str()
            .context("the bench's data dir is not UTF-8")?;
        let mut command = Command::new(sibling_binary("latchctl"));
        command.args(latch_testkit::binaries::token_create_args(
            id,
            CONTROL_ADMIN,
            data_dir,
            false,
        ));
        Ok(run_output(command)?.trim().to_string())
    }

    /// An SVID for `id`, written to `out` by `latchctl cert request`.
    pub fn svid_files(&self, id: &str, out: &Path) -> Result<SvidFiles> {
        let token = self.token(id)?;
        let mut command = Command::new(sibling_binary("latchctl"));
        command
            .args(["cert", "request", "--token", &token])
            .args(["--control-plane", CONTROL_GRPC, "--bundle"])
            .arg(self.bundle())
            .arg("--out")
            .arg(out);
        run_output(command)?;
        Ok(SvidFiles {
            chain: out.join("svid.pem"),
            key: out.join("svid.key"),
            bundle: out.join("bundle.pem"),
        })
    }
}

/// Starts both latch-proxy sidecars and waits until each holds an SVID and listens; with
/// `hbone`, the client side carries connections as streams of pooled tunnels (`--hbone`).
pub fn start(dir: &Path, control: &ControlPlane, hbone: bool) -> Result<Tunnel> {
    // Room for the memory rows whatever their size (the default limit is 10,000).
    start_with(dir, control, 30_000, hbone)
}

/// Where one Latch alternative listens: its own ports, so that the `latch/1` and HBONE
/// alternatives run side by side.
struct Ports {
    name: &'static str,
    entry_base: u16,
    server_mesh: &'static str,
    server_admin: &'static str,
    client_mesh: &'static str,
    client_admin: &'static str,
}

const LATCH1_PORTS: Ports = Ports {
    name: "latch",
    entry_base: ENTRY_BASE,
    server_mesh: SERVER_MESH,
    server_admin: SERVER_ADMIN,
    client_mesh: CLIENT_MESH,
    client_admin: CLIENT_ADMIN,
};

const HBONE_PORTS: Ports = Ports {
    name: "latch-hbone",
    entry_base: 14000,
    server_mesh: "127.0.0.1:15208",
    server_admin: "127.0.0.1:15220",
    client_mesh: "127.0.0.1:15308",
    client_admin: "127.0.0.1:15320",
};

/// `start` with `--max-connections max_connections` on both sidecars.
pub fn start_with(
    dir: &Path,
    control: &ControlPlane,
    max_connections: usize,
    hbone: bool,
) -> Result<Tunnel> {
    let ports = if hbone { &HBONE_PORTS } else { &LATCH1_PORTS };
    let server_side = proxy(
        dir,
        control,
        &format!("{}-server", ports.name),
        SERVER_ID,
        ports.server_mesh,
        ports.server_admin,
        &[],
        max_connections,
    )?;
    let outbound: Vec<String> = App::ALL
        .iter()
        .flat_map(|app| {
            [
                "--outbound".to_string(),
                format!(
                    "127.0.0.1:{}={SERVER_ID}@{}/{}",
                    app.port_in(ports.entry_base),
                    ports.server_mesh,
                    app.port()
                ),
            ]
        })
        .chain(hbone.then(|| "--hbone".to_string()))
        .collect();
    let client_side = proxy(
        dir,
        control,
        &format!("{}-client", ports.name),
        CLIENT_ID,
        ports.client_mesh,
        ports.client_admin,
        &outbound,
        max_connections,
    )?;
    for app in App::ALL {
        wait_port(app.port_in(ports.entry_base), Duration::from_secs(10))?;
    }
    Ok(Tunnel::proxied(
        if hbone { Alt::LatchHbone } else { Alt::Latch },
        ports.entry_base,
        client_side,
        server_side,
    ))
}

/// Starts a latch-proxy for `id` in explicit mode, with `extra` arguments, and waits until it
/// is ready.
#[allow(clippy::too_many_arguments)]
pub fn proxy(
    dir: &Path,
    control: &ControlPlane,
    name: &str,
    id: &str,
    inbound: &str,
    admin: &str,
    extra: &[String],
    max_connections: usize,
) -> Result<Proc> {
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, control.token(id)?)?;
    let log = dir.join(format!("{name}.log"));
    let mut command = Command::new(sibling_binary("latch-proxy"));
    command
        .arg("--join-token-file")
        .arg(&token_file)
        .arg("--ca-bundle")
        .arg(control.bundle())
        .args([
            "--control-plane",
            CONTROL_GRPC,
            "--admin",
            admin,
            "--inbound",
            inbound,
            // Explicit routes only; and /ready must not wait for a discovery sync.
            "--discovery=false",
        ])
        .args(["--max-connections", &max_connections.to_string()]);
    command.args(extra);
    let mut proc = crate::spawn(name, command, &log)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_ready(admin) {
        proc.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{name} not ready after 20 s; its log:\n{}",
                log_tail(proc.log_path())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Ready on its admin port, and alive: not another process answering on that port.
    std::thread::sleep(Duration::from_millis(200));
    proc.check_running()?;
    Ok(proc)
}

/// GET /ready on an admin endpoint answers 200.
fn is_ready(admin: &str) -> bool {
    let Ok(mut tcp) = std::net::TcpStream::connect(admin) else {
        return false;
    };
    let request = format!("GET /ready HTTP/1.0\r\nHost: {admin}\r\n\r\n");
    let mut response = String::new();
    if tcp.write_all(request.as_bytes()).is_err() || tcp.read_to_string(&mut response).is_err() {
        return false;
    }
    // "HTTP/1.x 200 ..."
    response.split_whitespace().nth(1) == Some("200")
}
