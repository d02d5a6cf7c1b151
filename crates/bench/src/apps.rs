//! The servers behind the tunnels: iperf3, redis-server, nginx (a small static page), and a
//! "hold" server in this process that accepts connections, greets each with one byte and keeps
//! it open until the client closes (for the idle-connection memory rows).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::tunnel::App;
use latch_testkit::Child as Proc;
use latch_testkit::net::wait_port;

/// The running servers; stopped when dropped.
pub struct Apps {
    _procs: Vec<Proc>,
    hold: tokio::task::JoinHandle<()>,
}

impl Drop for Apps {
    fn drop(&mut self) {
        self.hold.abort();
    }
}

/// Starts every server and waits for its port.
pub async fn start(dir: &Path) -> Result<Apps> {
    let mut iperf = Command::new("iperf3");
    iperf.args(["-s", "--forceflush", "-p", &App::Iperf.port().to_string()]);
    let mut redis = Command::new("redis-server");
    redis
        .args(["--port", &App::Redis.port().to_string()])
        .args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxclients",
            "20000",
        ]);
    let mut procs = vec![
        crate::spawn("iperf3 -s", iperf, &dir.join("iperf3.log"))?,
        crate::spawn("redis-server", redis, &dir.join("redis.log"))?,
        nginx(dir)?,
    ];
    let hold = hold_server().await?;
    // Not a connect() probe for iperf3: it takes any connection for a test's control
    // connection, and a client arriving while it cleans up an aborted one is reset.
    wait_for_log(&procs[0], "Server listening", Duration::from_secs(10))?;
    for app in [App::Redis, App::Http] {
        wait_port(app.port(), Duration::from_secs(10))?;
    }
    for proc in &mut procs {
        proc.check_running()?;
    }
    Ok(Apps {
        _procs: procs,
        hold,
    })
}

/// Waits until `proc`'s log contains `text`.
fn wait_for_log(proc: &Proc, text: &str, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !std::fs::read_to_string(proc.log_path()).is_ok_and(|log| log.contains(text)) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{} did not log {text:?} within {timeout:?}", proc.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// nginx serving a 612-byte page (the size of Debian's default index) with keep-alive.
fn nginx(dir: &Path) -> Result<Proc> {
    let root = dir.join("nginx");
    std::fs::create_dir_all(root.join("html"))?;
    std::fs::write(root.join("html/index.html"), "x".repeat(612))?;
    let config = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {root}/nginx.pid;\n\
         error_log {root}/error.log;\nworker_rlimit_nofile 65536;\n\
         events {{ worker_connections 20000; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
         \x20 client_body_temp_path {root}/tmp;\n  proxy_temp_path {root}/tmp;\n\
         \x20 fastcgi_temp_path {root}/tmp;\n  uwsgi_temp_path {root}/tmp;\n  scgi_temp_path {root}/tmp;\n\
         \x20 server {{ listen 127.0.0.1:{port}; root {root}/html; }}\n}}\n",
        root = root.display(),
        port = App::Http.port(),
    );
    let config_path = root.join("nginx.conf");
    std::fs::write(&config_path, config)?;
    let mut command = Command::new("nginx");
    command.arg("-c").arg(&config_path).arg("-p").arg(&root);
    crate::spawn("nginx", command, &dir.join("nginx.log"))
}

/// Accepts on the hold port; greets each connection with one byte and holds it until EOF.
async fn hold_server() -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", App::Hold.port()))
        .await
        .context("binding the hold server")?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if stream.write_all(b"x").await.is_ok() {
                    let mut buf = [0u8; 64];
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            });
        }
    }))
}
