//! `cargo xtask demo`: the README's quick start. Runs the real binaries on loopback, no root and
//! no Docker: a control plane with a self-made CA and a mesh config file, two latch-proxy
//! sidecars that learn the mesh from it over discovery, and two small apps ("web" calls "api")
//! that speak plain TCP while the proxies carry it over mTLS. Each workload has its own loopback
//! address (127.0.0.2, 127.0.0.3), so the proxies route by address as under transparent
//! capture. Shows the request crossing, the SPIFFE ID each proxy saw, a policy edit cutting a
//! live connection, and an SVID rotation; keeps the mesh running until Ctrl-C when started from
//! a terminal (or with `--keep-running`), which stops everything cleanly.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use latch_testkit::Child;
use latch_testkit::binaries::sibling_binary;
use latch_testkit::files::replace_file;
use latch_testkit::net::free_port;
use latch_testkit::wait_for;
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

/// Loopback addresses of the two workloads.
const WEB_IP: &str = "127.0.0.2";
const API_IP: &str = "127.0.0.3";
/// api's service address: never connected to, a name the proxies route by.
const API_VIP: &str = "10.96.0.3";

/// The "api" app: plain TCP, answers every message with a greeting, as long as the connection
/// stays open.
async fn serve_api(listener: tokio::net::TcpListener) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut request = vec![0u8; 256];
            while let Ok(n) = tcp.read(&mut request).await {
                if n == 0 {
                    return;
                }
                let reply = format!(
                    "api says hello; you sent {:?} (plain TCP here, mTLS between the proxies)",
                    String::from_utf8_lossy(&request[..n]).trim()
                );
                if tcp.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The "web" app: one message on a new connection to its proxy's outbound listener, which
/// stands for api's service address.
async fn call_api(entry: &str, request: &str) -> Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(entry).await?;
    tcp.write_all(request.as_bytes()).await?;
    let mut reply = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut reply)).await??;
    if n == 0 {
        bail!("the connection was closed without an answer");
    }
    Ok(String::from_utf8_lossy(&reply[..n]).into_owned())
}

/// The mesh config the control plane watches: both workloads, api's service, and who may call
/// api (`api_callers`).
fn mesh_yaml(web_mesh: u16, api_mesh: u16, api_port: u16, api_callers: &str) -> String {
    format!(
        "# Edited live by the demo; latch-control reloads it on every change.\n\
         workloads:\n\
         \x20 - {{name: web, namespace: demo, service_account: web, ips: [\"{WEB_IP}\"], mesh_port: {web_mesh}, labels: {{app: web}}}}\n\
         \x20 - {{name: api, namespace: demo, service_account: api, ips: [\"{API_IP}\"], mesh_port: {api_mesh}, labels: {{app: api}}}}\n\
         services:\n\
         \x20 - name: api\n\
         \x20   namespace: demo\n\
         \x20   vips: [\"{API_VIP}\"]\n\
         \x20   ports: [{{port: 80, target_port: {api_port}}}]\n\
         \x20   selector: {{app: api}}\n\
         policies:\n\
         \x20 - name: api-callers\n\
         \x20   namespace: demo\n\
         \x20   selector: {{app: api}}\n\
         \x20   action: ALLOW\n\
         \x20   rules:\n\
         \x20     - principals: [{{exact: \"spiffe://cluster.local/ns/demo/sa/{api_callers}\"}}]\n"
    )
}

/// Starts our `binary` (next to this one) with `args`, output to `log`; stopped when dropped
/// (SIGTERM, then SIGKILL after 2 s).
fn spawn(binary: &str, args: &[&str], log: &Path) -> Result<Child> {
    let mut command = std::process::Command::new(sibling_binary(binary));
    command.args(args);
    // Stopped with SIGTERM first, so that a proxy closes its connections itself.
    Ok(Child::spawn(binary, command, log)?.with_grace(Duration::from_secs(2)))
}

/// The admin endpoint's JSON or text, or an error.
async fn admin_get(addr: &str, path: &str) -> Result<String> {
    match latch_testkit::admin::get(addr, path).await? {
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
) -> Result<(Child, String)> {
    let id = format!("spiffe://cluster.local/ns/demo/sa/{name}");
    let dir = root.join(format!("{name}-proxy"));
    latch_testkit::latch_identity::files::ensure_private_dir(&dir)?;
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
    latch_testkit::latch_identity::files::write_private(&token_file, token.as_bytes())?;
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
        "--workload-name".into(),
        format!("demo/{name}"),
    ];
    args.extend(extra.iter().cloned());
    let shown: Vec<&str> = args.iter().map(String::as_str).collect();
    println!("$ latch-proxy {}", shown.join(" "));
    let guard = spawn("latch-proxy", &shown, &dir.join("proxy.log"))?;
    if !wait_for(Duration::from_secs(15), || {
        latch_testkit::admin::is_ready(&admin)
    }) {
        bail!(
            "{name}'s proxy did not become ready:\n{}",
            std::fs::read_to_string(dir.join("proxy.log"))?
        );
    }
    Ok((guard, admin))
}

/// The running mesh: stopped when dropped (every child process), kept while the demo waits for
/// Ctrl-C.
struct Mesh {
    control: Child,
    api_proxy: Child,
    web_proxy: Child,
    control_admin: String,
    api_admin: String,
    web_admin: String,
    /// web's outbound listener for api's service address.
    entry: String,
}

struct Control {
    data: String,
    listen: String,
    admin: String,
    bundle: String,
}

async fn demo(root: &Path) -> Result<Mesh> {
    let data_dir = root.join("control");
    let control = Control {
        data: data_dir.display().to_string(),
        listen: format!("127.0.0.1:{}", free_port()?),
        admin: format!("127.0.0.1:{}", free_port()?),
        bundle: data_dir.join("bundle.pem").display().to_string(),
    };
    let api_listener = tokio::net::TcpListener::bind((API_IP, 0)).await?;
    let api_port = api_listener.local_addr()?.port();
    let (web_mesh, api_mesh) = (free_port()?, free_port()?);
    let config = root.join("mesh.yaml");
    replace_file(&config, &mesh_yaml(web_mesh, api_mesh, api_port, "web"))?;

    step("Start the control plane (a CA is created on first start) with the mesh config");
    println!(
        "$ cat {}\n{}",
        config.display(),
        std::fs::read_to_string(&config)?
    );
    println!(
        "$ latch-control --data-dir {} --listen {} --admin {} --config {}",
        control.data,
        control.listen,
        control.admin,
        config.display()
    );
    let log = root.join("control.log");
    let control_process = spawn(
        "latch-control",
        &[
            "--data-dir",
            &control.data,
            "--listen",
            &control.listen,
            "--admin",
            &control.admin,
            "--config",
            &config.display().to_string(),
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

    step("Start the api app (plain TCP) and its sidecar, which accepts mTLS on api's address");
    tokio::spawn(serve_api(api_listener));
    println!("api app listening on {API_IP}:{api_port}");
    let (api_proxy, api_admin) = start_proxy(
        root,
        "api",
        &control,
        &["--inbound".into(), format!("{API_IP}:{api_mesh}")],
    )
    .await?;

    step("Start web's sidecar: its outbound listener stands for api's service address");
    let entry = format!("127.0.0.1:{}", free_port()?);
    let socket = root.join("web-proxy/workload.sock");
    let (web_proxy, web_admin) = start_proxy(
        root,
        "web",
        &control,
        &[
            "--inbound".into(),
            format!("{WEB_IP}:{web_mesh}"),
            "--outbound".into(),
            format!("{entry}={API_VIP}:80"),
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
        "web app -> {entry} (web's proxy: {API_VIP}:80 is service demo/api, endpoint {API_IP}, \
         identity spiffe://cluster.local/ns/demo/sa/api) -> mTLS -> {API_IP}:{api_mesh} (api's \
         proxy: policy api-callers allows web) -> {API_IP}:{api_port} (api app)"
    );
    println!("web got: {}", call_api(&entry, "GET /hello").await?);
    println!("\nwhat each proxy saw (from /metrics):");
    for (name, admin) in [("web's proxy", &web_admin), ("api's proxy", &api_admin)] {
        for line in peers_seen(admin).await? {
            println!("  {name}: {line}");
        }
    }

    step("A policy edit cuts a live connection: api-callers now allows only sa/admin");
    let mut live = tokio::net::TcpStream::connect(&entry).await?;
    live.write_all(b"first message on a long-lived connection")
        .await?;
    let mut reply = vec![0u8; 512];
    let n = live.read(&mut reply).await?;
    println!(
        "web (live connection) got: {}",
        String::from_utf8_lossy(&reply[..n])
    );
    replace_file(&config, &mesh_yaml(web_mesh, api_mesh, api_port, "admin"))?;
    let edited = std::time::Instant::now();
    println!(
        "$ edit {}: principals [.../sa/web] -> [.../sa/admin]",
        config.display()
    );
    match tokio::time::timeout(Duration::from_secs(10), live.read(&mut reply)).await {
        Ok(Ok(0)) | Ok(Err(_)) => println!(
            "the live connection was closed by api's proxy {:.0} ms after the edit",
            edited.elapsed().as_secs_f64() * 1e3
        ),
        Ok(Ok(_)) => bail!("api answered on a connection the policy no longer allows"),
        Err(_) => bail!("the live connection was still open 10 s after the policy edit"),
    }
    match call_api(&entry, "GET /denied").await {
        Ok(reply) => bail!("a new connection was let through: {reply}"),
        Err(e) => println!("a new connection from web is refused too: {e}"),
    }
    for line in admin_get(&api_admin, "/metrics")
        .await?
        .lines()
        .filter(|l| {
            l.starts_with("latch_proxy_authorization_denials_total")
                || l.starts_with("latch_proxy_tcp_connections_closed_by_policy_total")
        })
    {
        println!("  api's proxy: {line}");
    }
    replace_file(&config, &mesh_yaml(web_mesh, api_mesh, api_port, "web"))?;
    println!(
        "$ edit {}: principals back to [.../sa/web]",
        config.display()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let reply = loop {
        match call_api(&entry, "GET /welcome-back").await {
            Ok(reply) => break reply,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => bail!("web is still refused after the policy was restored: {e}"),
        }
    };
    println!("web got: {reply}");

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
    Ok(Mesh {
        control: control_process,
        api_proxy,
        web_proxy,
        control_admin: control.admin.clone(),
        api_admin,
        web_admin,
        entry,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let keep_running = match std::env::args().nth(1).as_deref() {
        None => std::io::stdin().is_terminal(),
        Some("--keep-running") => true,
        Some(other) => bail!(
            "unknown argument {other:?}; usage: latch-demo [--keep-running] (keep the mesh \
             running until Ctrl-C even when not started from a terminal)"
        ),
    };
    let root = std::env::current_dir()?.join("target/latch-demo");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    // Ctrl-C at any point ends the demo; dropping the mesh stops every child process.
    tokio::select! {
        result = demo_and_wait(&root, keep_running) => result?,
        _ = tokio::signal::ctrl_c() => println!("\nCtrl-C: stopping"),
    }
    println!(
        "Files are under {} (keys 0600). Everything has stopped.",
        root.display()
    );
    Ok(())
}

/// Runs the demo; with `keep_running`, keeps the mesh up until Ctrl-C (which drops it).
async fn demo_and_wait(root: &Path, keep_running: bool) -> Result<()> {
    let mut mesh = demo(root).await?;
    if keep_running {
        step(&format!(
            "The mesh keeps running (logs under {}); press Ctrl-C to stop",
            root.display()
        ));
        for (name, child, admin) in [
            ("latch-control", &mesh.control, &mesh.control_admin),
            ("api's proxy", &mesh.api_proxy, &mesh.api_admin),
            ("web's proxy", &mesh.web_proxy, &mesh.web_admin),
        ] {
            println!("  {name}: pid {}, admin http://{admin}/ready", child.pid());
        }
        println!(
            "  web's entry to api: {} (plain TCP: send a line, api answers through the mesh)\n  \
             what web's proxy runs with: curl http://{}/debug/config",
            mesh.entry, mesh.web_admin
        );
        // Watch the children: if one of them stops, say so instead of pretending.
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for child in [&mut mesh.control, &mut mesh.api_proxy, &mut mesh.web_proxy] {
                child.check_running()?;
            }
        }
    }
    step("Done");
    Ok(())
}
