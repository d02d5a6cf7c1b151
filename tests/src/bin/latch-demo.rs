//! `cargo xtask demo`: the README's quick start. Runs the real binaries on loopback, no root and
//! no Docker: a control plane with a self-made CA, two latch-proxy sidecars in explicit mode,
//! and two small apps ("web" calls "api") that speak plain TCP while the proxies carry it over
//! mTLS. Shows the request crossing, the SPIFFE ID each proxy saw, and an SVID rotation; keeps
//! running until Ctrl-C when started from a terminal, which stops everything cleanly.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use latch_tests::procs::{ChildGuard, free_port, sibling_binary, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn step(text: &str) {
    println!("\n==> {text}");
}

/// Runs one of our binaries, echoing the command line (join tokens masked), and returns its
/// stdout.
fn run(binary: &str, args: &[&str]) -> Result<String> {
    let shown: Vec<&str> = args
        .iter()
        .map(|a| {
            if a.starts_with("latch-jt-") {
                "$TOKEN"
            } else {
                a
            }
        })
        .collect();
    println!("$ {binary} {}", shown.join(" "));
    let output = std::process::Command::new(sibling_binary(binary))
        .args(args)
        .output()?;
    if !output.status.success() {
        bail!(
            "{binary} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The "api" app: plain TCP, answers each line with a greeting.
async fn api_app() -> Result<(tokio::net::TcpListener, u16)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    Ok((listener, port))
}

async fn serve_api(listener: tokio::net::TcpListener) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut request = vec![0u8; 256];
            let Ok(n) = tcp.read(&mut request).await else {
                return;
            };
            let reply = format!(
                "api says hello; you sent {:?} (plain TCP here, mTLS between the proxies)",
                String::from_utf8_lossy(&request[..n]).trim()
            );
            let _ = tcp.write_all(reply.as_bytes()).await;
        });
    }
}

/// The "web" app: connects to its proxy's outbound listener as if it were api.
async fn call_api(entry: &str, request: &str) -> Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(entry).await?;
    tcp.write_all(request.as_bytes()).await?;
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await?;
    Ok(reply)
}

/// The admin endpoint's JSON or text, or an error.
async fn admin_get(addr: &str, path: &str) -> Result<String> {
    match latch_tests::http_get(addr, path).await? {
        (200, body) => Ok(body),
        (status, body) => bail!("GET {path} on {addr}: {status} {body}"),
    }
}

/// Lines of /metrics that name a peer's SPIFFE ID on proxied connections.
async fn peers_seen(admin: &str) -> Result<Vec<String>> {
    Ok(admin_get(admin, "/metrics")
        .await?
        .lines()
        .filter(|l| l.starts_with("latch_proxy_tcp_connections_opened_total"))
        .map(str::to_string)
        .collect())
}

/// Starts a latch-proxy with its own join token file; returns the guard.
async fn start_proxy(
    root: &Path,
    name: &str,
    control: &Control,
    extra: &[String],
) -> Result<(ChildGuard, String)> {
    let id = format!("spiffe://cluster.local/ns/demo/sa/{name}");
    let dir = root.join(format!("{name}-proxy"));
    latch_identity::files::ensure_private_dir(&dir)?;
    let token = run(
        "latchctl",
        &[
            "token",
            "create",
            "--spiffe-id",
            &id,
            "--admin",
            &control.admin,
            "--data-dir",
            &control.data,
        ],
    )?;
    let token_file = dir.join("join-token");
    latch_identity::files::write_private(&token_file, token.as_bytes())?;
    let admin = format!("127.0.0.1:{}", free_port()?);
    let mut args = vec![
        "--control-plane".to_string(),
        control.listen.clone(),
        "--ca-bundle".into(),
        control.bundle.clone(),
        "--join-token-file".into(),
        token_file.display().to_string(),
        "--svid-ttl".into(),
        "20s".into(),
        "--admin".into(),
        admin.clone(),
        // The demo's routes are explicit flags; without discovery /ready waits only for the SVID.
        "--discovery=false".into(),
    ];
    args.extend(extra.iter().cloned());
    let shown: Vec<&str> = args.iter().map(String::as_str).collect();
    println!("$ latch-proxy {}", shown.join(" "));
    let guard = ChildGuard::spawn("latch-proxy", &shown, &dir.join("proxy.log"))?;
    if !wait_for(Duration::from_secs(15), || {
        futures::executor::block_on(latch_tests::http_get(&admin, "/ready"))
            .is_ok_and(|(s, _)| s == 200)
    }) {
        bail!(
            "{name}'s proxy did not become ready:\n{}",
            std::fs::read_to_string(dir.join("proxy.log"))?
        );
    }
    Ok((guard, admin))
}

struct Control {
    data: String,
    listen: String,
    admin: String,
    bundle: String,
}

async fn demo(root: &Path) -> Result<()> {
    let data_dir = root.join("control");
    let control = Control {
        data: data_dir.display().to_string(),
        listen: format!("127.0.0.1:{}", free_port()?),
        admin: format!("127.0.0.1:{}", free_port()?),
        bundle: data_dir.join("bundle.pem").display().to_string(),
    };

    step("Start the control plane (a CA is created on first start)");
    println!(
        "$ latch-control --data-dir {} --listen {} --admin {}",
        control.data, control.listen, control.admin
    );
    let log = root.join("control.log");
    let _control = ChildGuard::spawn(
        "latch-control",
        &[
            "--data-dir",
            &control.data,
            "--listen",
            &control.listen,
            "--admin",
            &control.admin,
        ],
        &log,
    )?;
    if !wait_for(Duration::from_secs(15), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("control plane started"))
    }) {
        bail!(
            "latch-control did not start:\n{}",
            std::fs::read_to_string(&log)?
        );
    }
    println!("trust bundle: {}", control.bundle);

    step("Start the api app (plain TCP on loopback) and its sidecar, which accepts mTLS");
    let (api_listener, api_port) = api_app().await?;
    tokio::spawn(serve_api(api_listener));
    println!("api app listening on 127.0.0.1:{api_port}");
    let api_mesh = format!("127.0.0.1:{}", free_port()?);
    let (_api_proxy, api_admin) = start_proxy(
        root,
        "api",
        &control,
        &["--inbound".into(), api_mesh.clone()],
    )
    .await?;

    step("Start web's sidecar: its outbound listener stands for api, reached over mTLS");
    let entry = format!("127.0.0.1:{}", free_port()?);
    let web_mesh = format!("127.0.0.1:{}", free_port()?);
    let outbound = format!("{entry}=spiffe://cluster.local/ns/demo/sa/api@{api_mesh}/{api_port}");
    let socket = root.join("web-proxy/workload.sock");
    let (_web_proxy, web_admin) = start_proxy(
        root,
        "web",
        &control,
        &[
            "--inbound".into(),
            web_mesh,
            "--outbound".into(),
            outbound,
            "--workload-api".into(),
            format!("unix://{}", socket.display()),
        ],
    )
    .await?;
    println!(
        "$ curl http://{web_admin}/debug/certs\n{}",
        admin_get(&web_admin, "/debug/certs").await?
    );

    step("web sends a request to api through the mesh");
    println!(
        "web app -> {entry} (web's proxy) -> mTLS -> {api_mesh} (api's proxy) -> 127.0.0.1:{api_port} (api app)"
    );
    println!("web got: {}", call_api(&entry, "GET /hello").await?);
    println!("\nwhat each proxy saw (from /metrics):");
    for (name, admin) in [("web's proxy", &web_admin), ("api's proxy", &api_admin)] {
        for line in peers_seen(admin).await? {
            println!("  {name}: {line}");
        }
    }

    step("Wait for web's SVID to rotate (20 s TTL: renewal at about half-life)");
    let before: serde_json::Value =
        serde_json::from_str(&admin_get(&web_admin, "/debug/certs").await?)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let now: serde_json::Value =
            serde_json::from_str(&admin_get(&web_admin, "/debug/certs").await?)?;
        if now["serial"] != before["serial"] {
            break now;
        }
        if std::time::Instant::now() > deadline {
            bail!("no rotation within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "serial {} -> {}, new SVID valid until {}",
        before["serial"].as_str().unwrap_or("?"),
        after["serial"].as_str().unwrap_or("?"),
        after["not_after"].as_str().unwrap_or("?")
    );
    println!("web got: {}", call_api(&entry, "GET /hello-again").await?);
    println!(
        "SPIFFE-aware apps can fetch web's SVID from the Workload API at unix://{}",
        socket.display()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let root = std::env::current_dir()?.join("target/latch-demo");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    // Ctrl-C at any point ends the demo; dropping the guards stops every child process.
    tokio::select! {
        result = demo_and_wait(&root) => result?,
        _ = tokio::signal::ctrl_c() => println!("\nCtrl-C: stopping"),
    }
    println!(
        "Files are under {} (keys 0600). Everything has stopped.",
        root.display()
    );
    Ok(())
}

/// Runs the demo; from a terminal, keeps the mesh up until Ctrl-C.
async fn demo_and_wait(root: &Path) -> Result<()> {
    demo(root).await?;
    if std::io::stdin().is_terminal() {
        step("The mesh keeps running (logs under target/latch-demo); press Ctrl-C to stop");
        std::future::pending::<()>().await;
    }
    step("Done");
    Ok(())
}
