//! Limits of latch-proxy as an operator sees them, with real `latch-proxy` processes (their
//! logs, `/metrics` and open-file limit are per process): the connection cap refuses at once,
//! counts and logs; running out of file descriptors is survived, counted, logged and retried
//! without spinning; slowloris on the mesh port holds slots only until the handshake timeout;
//! a soft open-file limit below the hard one is raised at start.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use latch_identity::SpiffeId;
use latch_testkit::apps::byte_echo_app;
use latch_testkit::binaries::workspace_binary;
use latch_testkit::net::free_port;
use latch_testkit::{Child, Harness, admin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A `latch-proxy` process, killed when dropped.
struct ProxyProcess {
    child: Child,
    admin: String,
    /// Its `--inbound` listener.
    inbound: SocketAddr,
    /// Its `--outbound` listener, if it has one.
    entry: Option<SocketAddr>,
}

impl ProxyProcess {
    /// Starts latch-proxy for `id` (discovery off), optionally under `prlimit --nofile=S:H`,
    /// with `extra` flags, and waits for /ready.
    async fn start(
        h: &Harness,
        dir: &tempfile::TempDir,
        id: &SpiffeId,
        nofile: Option<(u64, u64)>,
        extra: &[String],
    ) -> Self {
        let id_text = id.to_string();
        let name = id_text.rsplit('/').next().unwrap_or("proxy");
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, h.bundle().to_pem()).unwrap();
        let token = dir.path().join(format!("{name}.token"));
        std::fs::write(&token, h.token(id, Duration::from_secs(600), false)).unwrap();
        let admin = format!("127.0.0.1:{}", free_port().unwrap());
        let inbound: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
            .parse()
            .unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let proxy = workspace_binary("latch-proxy");
        let mut command = match nofile {
            Some((soft, hard)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}"))
                    .arg("--")
                    .arg(&proxy);
                c
            }
            None => Command::new(&proxy),
        };
        command
            .arg("--control-plane")
            .arg(h.grpc_addr())
            .arg("--ca-bundle")
            .arg(&bundle)
            .arg("--join-token-file")
            .arg(&token)
            .args(["--admin", &admin, "--inbound", &inbound.to_string()])
            .arg("--discovery=false")
            .args(extra)
            .env("RUST_LOG", "info");
        let child = Child::spawn("latch-proxy", command, &log)
            .unwrap_or_else(|e| panic!("{e:#} (prlimit is in util-linux)"));
        let entry = extra
            .iter()
            .find_map(|a| a.split_once('=').map(|(listen, _)| listen.parse().unwrap()));
        let mut proxy = Self {
            child,
            admin,
            inbound,
            entry,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            proxy.child.assert_running();
            if matches!(admin::get(&proxy.admin, "/ready").await, Ok((200, _))) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "latch-proxy not ready after 20 s:\n{}",
                proxy.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proxy
    }

    fn log_text(&self) -> String {
        self.child.log()
    }

    fn assert_running(&mut self) {
        self.child.assert_running();
    }

    /// The value of the sample `series` (name and labels exactly as exported), 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        let (status, body) = admin::get(&self.admin, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        admin::metric_value(&body, series)
    }

    /// Waits (up to 10 s) until `series` reaches `want`; returns its last value.
    async fn metric_reaching(&self, series: &str, want: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.metric(series).await;
            if now >= want || Instant::now() > deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// User+system CPU time so far (/proc/<pid>/stat; prlimit execs the proxy, same PID).
    fn cpu_time(&self) -> Duration {
        self.child.cpu_time().unwrap()
    }
}

/// A server-side proxy (inbound only, `server_flags`) and a client-side proxy whose explicit
/// listener leads to `app` through it (`client_flags`).
async fn pair(
    h: &Harness,
    dir: &tempfile::TempDir,
    app: SocketAddr,
    server_nofile: Option<(u64, u64)>,
    server_flags: &[&str],
    client_flags: &[&str],
) -> (ProxyProcess, ProxyProcess) {
    let server_id = h.id("demo", "api");
    let flags = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let server = ProxyProcess::start(h, dir, &server_id, server_nofile, &flags(server_flags)).await;
    let mut client_args = vec![
        "--outbound".to_string(),
        format!(
            "127.0.0.1:{}={server_id}@{}/{}",
            free_port().unwrap(),
            server.inbound,
            app.port()
        ),
    ];
    client_args.extend(flags(client_flags));
    let client = ProxyProcess::start(h, dir, &h.id("demo", "web"), None, &client_args).await;
    (server, client)
}

/// Connects to `entry`, sends a message and reads its echo; the connection stays open.
async fn echoed(entry: SocketAddr) -> std::io::Result<TcpStream> {
    let mut tcp = TcpStream::connect(entry).await?;
    tcp.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no echo within 10 s"))??;
    assert_eq!(&buf, b"ping");
    Ok(tcp)
}

/// Waits (up to 10 s) for the peer to close `tcp` without sending anything: returns true on
/// EOF or a reset, false if it stays open or data arrives.
async fn closed_by_peer(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Retries an echo through `entry` for up to 10 s.
async fn echoed_eventually(entry: SocketAddr) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match echoed(entry).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_cap_refuses_at_once_counts_logs_and_serves_again_when_one_closes() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = byte_echo_app();
    let (_server, mut client) = pair(&h, &dir, app, None, &[], &["--max-connections", "20"]).await;
    let entry = client.entry.unwrap();

    let mut held = Vec::new();
    for i in 0..20 {
        held.push(
            echoed(entry)
                .await
                .unwrap_or_else(|e| panic!("connection {} of 20: {e}", i + 1)),
        );
    }
    // The 21st: accepted by the kernel, then closed by the proxy without a byte through.
    let mut over = TcpStream::connect(entry).await.unwrap();
    let _ = over.write_all(b"ping").await;
    assert!(
        closed_by_peer(&mut over).await,
        "the connection over the cap is closed at once"
    );
    let refused = r#"latch_proxy_tcp_connections_refused_total{direction="outbound",reason="connection_limit"}"#;
    assert_eq!(client.metric_reaching(refused, 1.0).await, 1.0);
    let log = client.log_text();
    assert!(
        log.contains("connection limit reached (--max-connections 20)"),
        "the log names the limit:\n{log}"
    );
    // The 20 held connections are untouched.
    for tcp in &mut held {
        tcp.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tcp.read_exact(&mut buf).await.unwrap();
    }
    // One closes: its slot serves a new connection.
    drop(held.pop());
    echoed_eventually(entry)
        .await
        .expect("a new connection is served once one closes");
    client.assert_running();
}

#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_file_descriptors_is_counted_logged_retried_without_spinning_and_survived() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = byte_echo_app();
    // 64 descriptors: enough to start and proxy a few connections. The handshake timeout is
    // long so that nothing but the clients going away frees a descriptor.
    let (mut server, client) = pair(
        &h,
        &dir,
        app,
        Some((64, 64)),
        &["--handshake-timeout", "60s"],
        &[],
    )
    .await;
    let entry = client.entry.unwrap();
    let first = echoed(entry).await.expect("served below the limit");
    let log = server.log_text();
    assert!(
        log.contains("the open-file limit (RLIMIT_NOFILE 64) is below what --max-connections"),
        "start-up warns that the limit cannot hold --max-connections:\n{log}"
    );

    // Raw TCP connections that never start TLS: each accepted one holds a descriptor until
    // the (long) handshake timeout, so the proxy runs out.
    let mut raw = Vec::new();
    for _ in 0..100 {
        raw.push(TcpStream::connect(server.inbound).await.unwrap());
    }
    // Wait until the proxy reports running out (logged once the first accept fails).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server
        .log_text()
        .contains("open-file limit (RLIMIT_NOFILE 64;")
    {
        assert!(
            Instant::now() < deadline,
            "no accept failure logged:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Out of descriptors, the accept loop backs off rather than spinning: over two seconds it
    // uses a small fraction of a core (a busy loop would use all it can get).
    let before = server.cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = server.cpu_time() - before;
    assert!(
        used < Duration::from_millis(500),
        "the proxy used {used:?} of CPU in 2 s while out of descriptors"
    );
    server.assert_running();

    // The load goes away: the proxy accepts again and serves.
    drop(raw);
    let _again = echoed_eventually(entry)
        .await
        .expect("served again once descriptors are free");
    let errors = server
        .metric(r#"latch_proxy_tcp_accept_errors_total{listener="inbound",reason="fd_limit"}"#)
        .await;
    assert!(errors >= 1.0, "accept failures counted: {errors}");
    let log = server.log_text();
    assert!(
        log.contains("accepting again after"),
        "recovery is logged:\n{log}"
    );
    drop(first);
    server.assert_running();
}

/// The first bytes of a TLS ClientHello record, and no more.
const PARTIAL_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01];

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_on_the_mesh_port_holds_slots_only_until_the_handshake_timeout() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = byte_echo_app();
    let (mut server, client) = pair(
        &h,
        &dir,
        app,
        None,
        &["--max-connections", "5", "--handshake-timeout", "3s"],
        &[],
    )
    .await;
    let entry = client.entry.unwrap();

    // Five slow clients take every slot: three send nothing, two half a ClientHello.
    let mut slow = Vec::new();
    for i in 0..5 {
        let mut tcp = TcpStream::connect(server.inbound).await.unwrap();
        if i >= 3 {
            tcp.write_all(PARTIAL_CLIENT_HELLO).await.unwrap();
        }
        slow.push(tcp);
    }
    // Meanwhile a real peer is refused: the server closes it at once (over its cap), so the
    // app's connection through the client proxy ends without an echo.
    assert!(
        echoed(entry).await.is_err(),
        "while slowloris holds the slots, a new connection is refused"
    );
    let refused = r#"latch_proxy_tcp_connections_refused_total{direction="inbound",reason="connection_limit"}"#;
    assert!(server.metric(refused).await >= 1.0);

    // The handshake timeout closes every slow client (they never close themselves)...
    for tcp in &mut slow {
        assert!(
            closed_by_peer(tcp).await,
            "the proxy closes a slow handshake"
        );
    }
    let timeouts =
        r#"latch_proxy_tls_handshake_failures_total{direction="inbound",reason="timeout"}"#;
    assert_eq!(server.metric_reaching(timeouts, 5.0).await, 5.0);
    assert!(
        server
            .log_text()
            .contains("inbound mTLS handshake timed out")
    );
    // ...and frees their slots: a real mTLS connection goes through.
    echoed_eventually(entry)
        .await
        .expect("served once the slow handshakes timed out");
    server.assert_running();
}

/// The hard open-file limit to start latch-proxy under with `prlimit --nofile=1024:<hard>`:
/// 65536 where prlimit may set it (root with CAP_SYS_RESOURCE, or a hard limit already that
/// high), else this process's own hard limit if it is at least 4096. `None` (after a printed
/// SKIPPED line; a panic when LATCH_REQUIRE_NETNS=1) without prlimit or such a limit.
fn hard_nofile_limit_for_test() -> Option<u64> {
    let missing = if !latch_testkit::netns::on_path("prlimit") {
        "prlimit (util-linux)"
    } else if Command::new("prlimit")
        .args(["--nofile=1024:65536", "--", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        return Some(65536);
    } else {
        let own_hard = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find_map(|l| l.strip_prefix("Max open files"))
                    .and_then(|f| f.split_whitespace().nth(1)?.parse::<u64>().ok())
            });
        match own_hard {
            Some(hard) if hard >= 4096 => {
                eprintln!("prlimit may not set a hard open-file limit of 65536 here; using {hard}");
                return Some(hard);
            }
            _ => "a hard open-file limit of at least 4096 (or CAP_SYS_RESOURCE)",
        }
    };
    if std::env::var("LATCH_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
        panic!("LATCH_REQUIRE_NETNS=1 but this machine lacks: {missing}");
    }
    latch_testkit::skip::skipped(&format!(
        "needs {missing} (set LATCH_REQUIRE_NETNS=1 to fail instead)"
    ));
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn a_soft_open_file_limit_below_the_hard_one_is_raised_at_start() {
    let Some(hard) = hard_nofile_limit_for_test() else {
        return;
    };
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let id = h.id("demo", "server");
    // --max-connections 1000 needs 2064 descriptors: more than the soft limit of 1024 (so
    // without the raise the proxy would warn), at most the hard limit.
    let flags = ["--max-connections".to_string(), "1000".to_string()];
    let mut proxy = ProxyProcess::start(&h, &dir, &id, Some((1024, hard)), &flags).await;
    assert_eq!(
        proxy.child.open_files_limit().unwrap(),
        (hard.to_string(), hard.to_string()),
        "soft limit raised to the hard one (/proc/<pid>/limits)"
    );
    let log = proxy.log_text();
    assert!(
        log.contains(&format!(
            "raised the soft open-file limit (RLIMIT_NOFILE) from 1024 to the hard limit {hard}"
        )),
        "the raise is logged:\n{log}"
    );
    assert!(
        !log.contains("is below what --max-connections"),
        "no open-file warning once raised:\n{log}"
    );
    proxy.assert_running();
}
