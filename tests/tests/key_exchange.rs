//! Post-quantum key exchange as a wire capture shows it: two proxies on loopback, and each proxy
//! with the control plane, negotiate X25519MLKEM768 (group 0x11ec); a peer that offers only
//! X25519 (OpenSSL's `s_client -groups X25519`) still gets through, on X25519. tcpdump records
//! the loopback traffic and tshark, not Latch's code, reads the ClientHello and ServerHello
//! key_share extensions out of the capture.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use latch_proxy::{ExplicitDestination, ExplicitTarget};
use latch_testkit::Harness;
use latch_testkit::apps::byte_echo_app;
use latch_testkit::netns::on_path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const X25519MLKEM768: u16 = 0x11ec;
const X25519: u16 = 0x001d;
const REQUIRE_ENV: &str = "LATCH_REQUIRE_CAPTURE";

/// True when this process can capture loopback traffic and read it: root, tcpdump, tshark and
/// openssl. Otherwise a loud SKIPPED line, or a panic when `LATCH_REQUIRE_CAPTURE=1` (CI).
fn require_capture() -> bool {
    let mut missing: Vec<&str> = if latch_testkit::is_root() {
        vec![]
    } else {
        vec!["root"]
    };
    missing.extend(
        ["tcpdump", "tshark", "openssl"]
            .into_iter()
            .filter(|tool| !on_path(tool)),
    );
    if missing.is_empty() {
        return true;
    }
    let missing = missing.join(", ");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but this machine lacks: {missing}");
    }
    latch_testkit::skip::skipped(&format!(
        "needs root, tcpdump, tshark and openssl; missing: {missing} (set {REQUIRE_ENV}=1 to \
         fail instead)"
    ));
    false
}

fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// tcpdump on loopback for the given TCP ports, writing a pcap file; killed when dropped.
struct Capture {
    child: Child,
    file: PathBuf,
    log: PathBuf,
}

impl Capture {
    fn start(dir: &Path, ports: &[u16]) -> Self {
        let file = dir.join("lo.pcap");
        let log = dir.join("tcpdump.log");
        let filter = ports
            .iter()
            .map(|p| format!("tcp port {p}"))
            .collect::<Vec<_>>()
            .join(" or ");
        // --immediate-mode and -U: nothing stays in a buffer when it stops; -Z root so it may
        // write in the temp dir.
        let child = Command::new("tcpdump")
            .args(["--immediate-mode", "-U", "-Z", "root", "-i", "lo", "-w"])
            .arg(&file)
            .arg(&filter)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("tcpdump log"))
            .spawn()
            .expect("starting tcpdump");
        let capture = Self { child, file, log };
        assert!(
            wait_for(Duration::from_secs(10), || capture
                .log_text()
                .contains("listening on")),
            "tcpdump did not start: {}",
            capture.log_text()
        );
        capture
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops tcpdump with SIGINT, so that it flushes the file, and returns the file.
    fn stop(mut self) -> PathBuf {
        let pid = self.child.id().to_string();
        let signalled = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            signalled
                && wait_for(Duration::from_secs(10), || self
                    .child
                    .try_wait()
                    .is_ok_and(|s| s.is_some())),
            "tcpdump did not stop on SIGINT: {}",
            self.log_text()
        );
        self.file.clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One TLS handshake seen on the wire: the client's port, the groups of its key shares, and
/// the group the server's key share selected.
#[derive(Debug, Default)]
struct Handshake {
    offered: Vec<u16>,
    selected: Option<u16>,
}

/// The handshakes to `server_port` in `pcap`, by client port, as tshark decodes them.
fn handshakes(pcap: &Path, server_port: u16) -> HashMap<u16, Handshake> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args(["-d", &format!("tcp.port=={server_port},tls")])
        .args([
            "-Y",
            &format!(
                "tcp.port=={server_port} && (tls.handshake.type == 1 || tls.handshake.type == 2)"
            ),
        ])
        .args(["-T", "fields", "-E", "separator=;"])
        .args(["-e", "tcp.srcport", "-e", "tcp.dstport"])
        .args(["-e", "tls.handshake.type"])
        .args(["-e", "tls.handshake.extensions_key_share_group"])
        .output()
        .expect("running tshark");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut found: HashMap<u16, Handshake> = HashMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(';').collect();
        let [src, dst, kind, groups] = fields[..] else {
            panic!("tshark line {line:?}")
        };
        let (src, dst): (u16, u16) = (src.parse().unwrap(), dst.parse().unwrap());
        // tshark prints numbers in decimal, or hex with 0x when it knows no name.
        let groups: Vec<u16> = groups
            .split(',')
            .filter(|g| !g.is_empty())
            .map(|g| match g.strip_prefix("0x") {
                Some(hex) => u16::from_str_radix(hex, 16).unwrap(),
                None => g.parse().unwrap(),
            })
            .collect();
        match (kind, src == server_port) {
            ("1", false) => found.entry(src).or_default().offered = groups,
            ("2", true) => found.entry(dst).or_default().selected = groups.first().copied(),
            _ => panic!("unexpected handshake message: {line:?}"),
        }
    }
    found
}

/// Connects with OpenSSL offering only X25519, presents `svid`, sends a transport header to
/// `app_port` and "ping", and returns what came back within 10 s.
async fn openssl_x25519_only(
    inbound: SocketAddr,
    dir: &Path,
    svid: &latch_identity::Svid,
    app_port: u16,
) -> Vec<u8> {
    let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(&cert, svid.chain_pem()).unwrap();
    std::fs::write(&key, svid.key_pem()).unwrap();
    let mut child = tokio::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-tls1_3", "-groups", "X25519"])
        .args(["-alpn", "latch/1", "-connect", &inbound.to_string()])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    let mut request = latch_proxy::transport::TransportHeader {
        target_port: app_port,
    }
    .encode();
    request.extend_from_slice(b"ping");
    stdin.write_all(&request).await.unwrap();
    stdin.flush().await.unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = vec![0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(10), stdout.read_exact(&mut got)).await;
    let _ = child.kill().await;
    match read {
        Ok(Ok(_)) => got,
        other => panic!("openssl s_client with X25519 only got no answer: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_negotiate_x25519mlkem768_and_accept_an_x25519_only_peer() {
    if !require_capture() {
        return;
    }
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = byte_echo_app();
    let control_port: u16 = h.grpc_addr().rsplit(':').next().unwrap().parse().unwrap();
    let inbound_port = latch_testkit::net::free_port().unwrap();
    // Started before the proxies, so their joins and discovery streams are recorded too.
    let capture = Capture::start(dir.path(), &[control_port, inbound_port]);

    let server_id = h.id("demo", "api");
    let mut config = h.mesh_proxy_config(&server_id, None);
    let inbound: SocketAddr = format!("127.0.0.1:{inbound_port}").parse().unwrap();
    config.data.inbound = Some(inbound);
    let server = latch_testkit::start_proxy(config).await;
    let mut config = h.proxy_config(&h.id("demo", "web"), None, None, false);
    config.data.explicit = vec![ExplicitTarget {
        listen: "127.0.0.1:0".parse().unwrap(),
        to: ExplicitDestination::Fixed {
            id: server_id.clone(),
            mesh_addr: inbound,
            target_port: app.port(),
        },
    }];
    let client = latch_testkit::start_proxy(config).await;

    // Proxy to proxy.
    let mut tcp = TcpStream::connect(client.explicit_addrs[0]).await.unwrap();
    tcp.write_all(b"through the mesh").await.unwrap();
    let mut echoed = vec![0u8; 16];
    tcp.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"through the mesh");

    // A peer without ML-KEM (OpenSSL 3.0 has none; -groups makes sure of it).
    let (svid, _) = h.svid(&h.id("demo", "legacy"), None).await;
    let answer = openssl_x25519_only(inbound, dir.path(), &svid, app.port()).await;
    assert_eq!(answer, b"ping", "an X25519-only peer is served");

    let pcap = capture.stop();
    let mesh = handshakes(&pcap, inbound_port);
    eprintln!("handshakes on the mesh port, by client port: {mesh:?}");
    let (hybrid, classical): (Vec<_>, Vec<_>) = mesh
        .values()
        .partition(|hs| hs.offered.contains(&X25519MLKEM768));
    assert!(
        !hybrid.is_empty() && hybrid.iter().all(|hs| hs.selected == Some(X25519MLKEM768)),
        "proxy to proxy: {mesh:?}"
    );
    assert!(
        classical.len() == 1
            && classical[0].offered == [X25519]
            && classical[0].selected == Some(X25519),
        "X25519-only peer: {mesh:?}"
    );
    // The proxies' certificate requests and discovery streams: one handshake at least per
    // proxy, every one on the hybrid group.
    let control = handshakes(&pcap, control_port);
    eprintln!("handshakes with the control plane, by client port: {control:?}");
    assert!(
        control.len() >= 2
            && control
                .values()
                .all(|hs| hs.offered.first() == Some(&X25519MLKEM768)
                    && hs.selected == Some(X25519MLKEM768)),
        "proxies to the control plane: {control:?}"
    );
    client.shutdown().await;
    server.shutdown().await;
    h.stop().await;
}
