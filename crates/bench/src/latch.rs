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
        // The ports are bound before the CA and the admin credential are written (a taken port
        // then stops start-up with nothing on disk): a port that answers is not yet a control
        // plane latchctl can use.
        let ready = [data_dir.join("admin.token"), data_dir.join("bundle.pem")];
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !ready.iter().all(|file| file.exists()) {
            proc.check_running()?;
            if std::time::Instant::now() > deadline {
                anyhow::bail!("latch-control wrote no {} within 15 s", ready[0].display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        proc.check_running()?;
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

/// Starts both latch-proxy sidecars and waits until each holds an SVID and listens.
pub fn start(dir: &Path, control: &ControlPlane) -> Result<Tunnel> {
    // Room for the memory rows whatever their size (the default limit is 10,000).
    start_with(dir, control, 30_000)
}

/// `start` with `--max-connections max_connections` on both sidecars.
pub fn start_with(dir: &Path, control: &ControlPlane, max_connections: usize) -> Result<Tunnel> {
    let server_side = proxy(
        dir,
        control,
        "latch-server",
        SERVER_ID,
        SERVER_MESH,
        SERVER_ADMIN,
        &[],
        max_connections,
    )?;
    let outbound: Vec<String> = App::ALL
        .iter()
        .flat_map(|app| {
            [
                "--outbound".to_string(),
                format!(
                    "127.0.0.1:{}={SERVER_ID}@{SERVER_MESH}/{}",
                    app.port_in(ENTRY_BASE),
                    app.port()
                ),
            ]
        })
        .collect();
    let client_side = proxy(
        dir,
        control,
        "latch-client",
        CLIENT_ID,
        CLIENT_MESH,
        CLIENT_ADMIN,
        &outbound,
        max_connections,
    )?;
    for app in App::ALL {
        wait_port(app.port_in(ENTRY_BASE), Duration::from_secs(10))?;
    }
    Ok(Tunnel::proxied(
        Alt::Latch,
        ENTRY_BASE,
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
