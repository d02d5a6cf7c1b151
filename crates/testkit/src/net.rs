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

/// A free port on `ip` (bound then released).
pub fn free_port_on(ip: IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
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
