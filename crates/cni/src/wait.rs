//! `latch-cni wait`: run inside a pod (as an init container, without privileges) before the
//! app starts, it returns once the pod's outbound capture works, so that a pod scheduled on a
//! node where latch-cni is missing or unchained fails to start instead of running uncaptured.
//!
//! Reading the rules would need NET_ADMIN, so it tests them instead: it listens on the outbound
//! capture port and connects to an address outside the pod (TEST-NET-1, never routed). Only
//! the REDIRECT can deliver that connection to its own listener. ADD installs both families or
//! fails, so IPv4 capture working means the IPv6 rules the pod needs are there too.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use latch_mesh::ports::OUTBOUND_CAPTURE;

/// Where the probe connects: 192.0.2.1:9 (TEST-NET-1, RFC 5737; the discard port).
const PROBE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 9);

/// Waits up to `timeout` for the capture to work; `proxy_uid` is exempt from capture, so the
/// probe cannot run as it.
pub fn wait_for_capture(timeout: Duration, proxy_uid: u32) -> Result<()> {
    let uid = rustix::process::getuid().as_raw();
    if uid == proxy_uid {
        bail!(
            "latch-cni wait runs as uid {uid}, the proxy's, whose traffic is never captured: \
             run it as another uid"
        );
    }
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, OUTBOUND_CAPTURE))
        .with_context(|| format!("listening on the outbound capture port {OUTBOUND_CAPTURE}"))?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe(&listener) {
            Ok(()) => return Ok(()),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "the capture rules are not in place in this pod after {timeout:?} ({last}): is \
                 the latch-cni DaemonSet running on this node, and is latch-cni the last plugin \
                 of its CNI configuration (docs/kubernetes.md, \"CNI mode\")?"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One attempt: connect to `PROBE` and find that connection on `listener`.
fn probe(listener: &TcpListener) -> Result<()> {
    let client = TcpStream::connect_timeout(&PROBE, Duration::from_secs(1))
        .with_context(|| format!("connecting to {PROBE}"))?;
    let ours = client.local_addr()?;
    // The redirected connection is in the accept queue once connect() returned.
    for _ in 0..10 {
        match listener.accept() {
            Ok((_, peer)) if peer == ours => return Ok(()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accepting on the capture port"),
        }
    }
    bail!("{PROBE} answered, but not through the capture port")
}
