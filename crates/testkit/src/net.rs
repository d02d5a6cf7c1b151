//! Ports and addresses for tests, the bench and the demo: a free port on any local address,
//! `127.0.0.1:<port>` strings, and waiting until something listens. Used by `processes`,
//! `loopback_mesh`, latch-bench and the demo.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// A free port on 127.0.0.1 (bound then released; fine for tools started right after).
pub fn free_port() -> std::io::Result<u16> {
    free_port_on(IpAddr::from([127, 0, 0, 1]))
}

/// Where `free_port_on` picks from: below Linux's ephemeral range (32768-60999), which the
/// kernel hands out as the source port of every outgoing connection. A port taken from that
/// range (binding port 0) and released can be taken again by any connection before the tool it
/// was meant for binds it; that made a proxy fail with "Address already in use" in CI. Above
/// the fixed ports tests and the README use (15001-15020).
const TEST_PORTS: std::ops::Range<u16> = 16_000..30_000;

/// Ports handed out by this process so far, so two tests never get the same one.
static PORTS_GIVEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A free port on `ip` (bound then released), from `TEST_PORTS`: each call of a process gets
/// another one, starting at a place that depends on the process, and one that binds now.
pub fn free_port_on(ip: IpAddr) -> std::io::Result<u16> {
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = PORTS_GIVEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let offset = u16::try_from((start + n) % span).expect("below the span");
        let port = TEST_PORTS.start + offset;
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {TEST_PORTS:?} on {ip}"),
    ))
}

/// `127.0.0.1:<a free port>`, for flags such as `--admin`.
pub fn free_loopback() -> String {
    loopback(free_port().expect("a free loopback port"))
}

/// `127.0.0.1:<port>`.
pub fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// 127.0.0.1 port 0: an ephemeral port for in-process listeners.
pub fn any_loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_port(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
