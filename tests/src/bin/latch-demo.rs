//! `cargo xtask demo`: the README's quick start. Runs the real binaries on loopback, no root and
//! no Docker: a control plane with a self-made CA, join tokens and SVIDs for two services
//! (fetched with latchctl, checked with openssl when present), then the two services talk over
//! mutual TLS with those SVIDs, each seeing the other's SPIFFE ID.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use latch_identity::{
    CertStore, ClientAuth, ExpectedPeer, SpiffeClientVerifier, SpiffeId, SpiffeServerVerifier,
    Svid, TrustBundle,
};
use latch_tests::procs::{ChildGuard, free_port, sibling_binary, wait_for};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
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
    let output = Command::new(sibling_binary(binary)).args(args).output()?;
    if !output.status.success() {
        bail!(
            "{binary} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn load_svid(dir: &Path) -> Result<(Svid, TrustBundle)> {
    let chain =
        CertificateDer::pem_file_iter(dir.join("svid.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivatePkcs8KeyDer::from_pem_file(dir.join("svid.key"))?;
    let bundle = TrustBundle::from_pem(&std::fs::read(dir.join("bundle.pem"))?)?;
    Ok((Svid::new(chain, key)?, bundle))
}

/// The "api" service: a TLS server that requires a client SVID of the trust domain and answers
/// with both identities.
async fn serve_api(listener: tokio::net::TcpListener, store: Arc<CertStore>) -> Result<()> {
    let trust_domain = store.svid().context("api has an SVID")?.id().trust_domain();
    let verifier = SpiffeClientVerifier::new(
        store.clone(),
        ClientAuth::Required(ExpectedPeer::TrustDomain(trust_domain)),
    );
    let config = latch_identity::tls::server_config(store.clone(), Arc::new(verifier), &[b"demo"])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tcp, _) = listener.accept().await?;
    let mut tls = acceptor.accept(tcp).await?;
    let peer = latch_identity::verifier::peer_spiffe_id(tls.get_ref().1.peer_certificates())
        .context("client presented an SVID")?;
    let mut request = vec![0u8; 64];
    let n = tls.read(&mut request).await?;
    let own = store.svid().context("api has an SVID")?.id().clone();
    let reply = format!(
        "{} -> hello {peer}, this is {own}",
        String::from_utf8_lossy(&request[..n])
    );
    tls.write_all(reply.as_bytes()).await?;
    tls.shutdown().await?;
    Ok(())
}

/// The "web" service: connects to api, accepting only api's SPIFFE ID.
async fn call_api(
    addr: std::net::SocketAddr,
    store: Arc<CertStore>,
    api: SpiffeId,
) -> Result<String> {
    let verifier = SpiffeServerVerifier::new(store.clone(), ExpectedPeer::Exactly(api));
    let config = latch_identity::tls::client_config(Some(store), Arc::new(verifier), &[b"demo"])?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(latch_identity::tls::placeholder_server_name(), tcp)
        .await?;
    let version = tls.get_ref().1.protocol_version();
    tls.write_all(b"GET /").await?;
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await?;
    Ok(format!("{reply}  [{version:?}]"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let root = std::env::current_dir()?.join("target/latch-demo");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let data_dir = root.join("control");
    let data = data_dir.to_str().context("path")?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let admin = format!("127.0.0.1:{}", free_port()?);

    step("Start the control plane (a CA is created on first start)");
    println!("$ latch-control --data-dir {data} --listen {listen} --admin {admin}");
    let log = root.join("control.log");
    let _control = ChildGuard::spawn(
        "latch-control",
        &["--data-dir", data, "--listen", &listen, "--admin", &admin],
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
    println!("trust bundle: {}", data_dir.join("bundle.pem").display());

    let mut stores = Vec::new();
    for service in ["api", "web"] {
        let id = format!("spiffe://cluster.local/ns/demo/sa/{service}");
        step(&format!("Create a join token for {id} and fetch its SVID"));
        let token = run(
            "latchctl",
            &[
                "token",
                "create",
                "--spiffe-id",
                &id,
                "--admin",
                &admin,
                "--data-dir",
                data,
            ],
        )?;
        println!(
            "TOKEN={}… (single-use, valid 1 h)",
            &token[..token.len().min(16)]
        );
        let out = root.join(service);
        let out_str = out.to_str().context("path")?;
        let bundle = data_dir.join("bundle.pem");
        println!(
            "{}",
            run(
                "latchctl",
                &[
                    "cert",
                    "request",
                    "--token",
                    &token,
                    "--control-plane",
                    &listen,
                    "--bundle",
                    bundle.to_str().context("path")?,
                    "--out",
                    out_str,
                ],
            )?
        );
        stores.push(load_svid(&out)?);
    }

    let web_dir = root.join("web");
    if Command::new("openssl").arg("version").output().is_ok() {
        step("Check web's SVID with openssl");
        let svid = web_dir.join("svid.pem");
        let verify = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(web_dir.join("bundle.pem"))
            .arg(&svid)
            .output()?;
        print!("{}", String::from_utf8_lossy(&verify.stdout));
        let text = Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-ext",
                "subjectAltName,keyUsage,extendedKeyUsage,basicConstraints",
                "-dates",
                "-in",
            ])
            .arg(&svid)
            .output()?;
        print!("{}", String::from_utf8_lossy(&text.stdout));
    }

    step("web calls api over mutual TLS 1.3, each side checking the other's SPIFFE ID");
    let (web, web_bundle) = stores.pop().context("web SVID")?;
    let (api, api_bundle) = stores.pop().context("api SVID")?;
    let api_id = api.id().clone();
    let api_store = Arc::new(CertStore::with_svid(api, api_bundle));
    let web_store = Arc::new(CertStore::with_svid(web, web_bundle));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(serve_api(listener, api_store));
    let reply = call_api(addr, web_store, api_id).await?;
    server.await??;
    println!("web got: {reply}");

    step("Start latch-proxy for web: it makes its own key, fetches an SVID and rotates it");
    let proxy_dir = root.join("web-proxy");
    latch_identity::files::ensure_private_dir(&proxy_dir)?;
    let token = run(
        "latchctl",
        &[
            "token",
            "create",
            "--spiffe-id",
            "spiffe://cluster.local/ns/demo/sa/web",
            "--admin",
            &admin,
            "--data-dir",
            data,
        ],
    )?;
    let token_file = proxy_dir.join("join-token");
    latch_identity::files::write_private(&token_file, token.as_bytes())?;
    let proxy_admin = format!("127.0.0.1:{}", free_port()?);
    let socket = proxy_dir.join("workload.sock");
    let bundle_file = data_dir.join("bundle.pem");
    let proxy_args = [
        "--control-plane",
        &listen,
        "--ca-bundle",
        bundle_file.to_str().context("path")?,
        "--join-token-file",
        token_file.to_str().context("path")?,
        "--svid-ttl",
        "10s",
        "--workload-api",
        &format!("unix://{}", socket.display()),
        "--admin",
        &proxy_admin,
    ];
    println!("$ latch-proxy {}", proxy_args.join(" "));
    let proxy_log = proxy_dir.join("proxy.log");
    let _proxy = ChildGuard::spawn("latch-proxy", &proxy_args, &proxy_log)?;
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 3 && std::time::Instant::now() < deadline {
        if let Ok((200, body)) = latch_tests::http_get(&proxy_admin, "/debug/certs").await {
            let certs: serde_json::Value = serde_json::from_str(&body)?;
            let serial = certs["serial"].as_str().unwrap_or_default().to_string();
            if !serial.is_empty() && !seen.contains(&serial) {
                if seen.is_empty() {
                    println!("$ curl http://{proxy_admin}/debug/certs\n{body}");
                } else {
                    println!(
                        "rotated: serial {serial}, valid until {}, next rotation {}",
                        certs["not_after"].as_str().unwrap_or("?"),
                        certs["next_rotation"].as_str().unwrap_or("?")
                    );
                }
                seen.push(serial);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if seen.len() < 3 {
        bail!(
            "the proxy did not rotate twice in 30 s; see {}",
            proxy_log.display()
        );
    }
    println!(
        "SPIFFE-aware apps can fetch the same SVID from the Workload API at unix://{}",
        socket.display()
    );

    step("Done");
    println!(
        "Files are under {} (keys 0600). The proxy and the control plane have stopped.",
        root.display()
    );
    Ok(())
}
