//! Transparent capture: the original destination of a REDIRECTed connection (SO_ORIGINAL_DST),
//! and the iptables rules that send the app's TCP through the proxy (`latch-proxy iptables
//! install|uninstall|print`), applied with iptables-restore in the pod's network namespace.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use latch_mesh::ports::{INBOUND_CAPTURE, OUTBOUND_CAPTURE, PROXY_PORTS, PROXY_UID};
use thiserror::Error;
use tokio::net::TcpStream;

/// The original destination of a connection redirected by iptables.
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

const OUTPUT_CHAIN: &str = "LATCH_OUTPUT";
const INBOUND_CHAIN: &str = "LATCH_INBOUND";

/// What to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRules {
    pub proxy_uid: u32,
    /// Destination ports the app reaches directly, never through the proxy.
    pub exclude_outbound_ports: Vec<u16>,
    /// Local ports reached directly from outside (besides the proxy's own 15001, 15006, 15008
    /// and 15020).
    pub exclude_inbound_ports: Vec<u16>,
}

impl Default for CaptureRules {
    fn default() -> Self {
        Self {
            proxy_uid: PROXY_UID,
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
        }
    }
}

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("running {command}: {source} (is iptables installed, and do we have NET_ADMIN?)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
}

impl CaptureRules {
    /// The nat table rules in iptables-restore format (used with --noflush).
    pub fn render(&self) -> String {
        let mut out = String::from("*nat\n");
        out.push_str(&format!(
            ":{OUTPUT_CHAIN} - [0:0]\n:{INBOUND_CHAIN} - [0:0]\n"
        ));
        out.push_str(&format!("-A OUTPUT -p tcp -j {OUTPUT_CHAIN}\n"));
        out.push_str(&format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}\n"));
        // Outbound: everything the app sends, except the proxy's own traffic and loopback.
        out.push_str(&format!(
            "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN\n",
            self.proxy_uid
        ));
        out.push_str(&format!("-A {OUTPUT_CHAIN} -d 127.0.0.0/8 -j RETURN\n"));
        for port in &self.exclude_outbound_ports {
            out.push_str(&format!(
                "-A {OUTPUT_CHAIN} -p tcp --dport {port} -j RETURN\n"
            ));
        }
        // Only connection-opening segments (SYN) are redirected. The nat table sees just the
        // first packet conntrack tracks for a connection, and on rules installed under live
        // connections (or conntrack turned on by the install itself) that first packet can be
        // mid-stream: redirecting it would hand, say, the proxy's own discovery stream to the
        // capture port and silently break it. Found by the netns VIP test.
        out.push_str(&format!(
            "-A {OUTPUT_CHAIN} -p tcp --syn -j REDIRECT --to-ports {OUTBOUND_CAPTURE}\n"
        ));
        // Inbound: everything arriving for the pod, except the proxy's own ports. Redirecting a
        // connection to 15001 or 15006 to the capture listener would make the proxy connect to
        // its own listener; left alone it reaches the listener directly, which refuses a
        // destination that is the proxy itself. The outbound chain needs no such rule: the
        // proxy's own connections (uid) and loopback are never captured, and a captured app
        // connection to this pod's proxy ports is refused by the proxy.
        for port in PROXY_PORTS.iter().chain(&self.exclude_inbound_ports) {
            out.push_str(&format!(
                "-A {INBOUND_CHAIN} -p tcp --dport {port} -j RETURN\n"
            ));
        }
        out.push_str(&format!(
            "-A {INBOUND_CHAIN} -p tcp --syn -j REDIRECT --to-ports {INBOUND_CAPTURE}\n"
        ));
        out.push_str("COMMIT\n");
        out
    }

    /// Installs the rules, replacing any earlier Latch rules (idempotent).
    pub fn install(&self) -> Result<(), CaptureError> {
        uninstall()?;
        let command = "iptables-restore --noflush".to_string();
        let mut child = Command::new("iptables-restore")
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| CaptureError::Spawn {
                command: command.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.render().as_bytes())
                .map_err(|source| CaptureError::Spawn {
                    command: command.clone(),
                    source,
                })?;
        }
        let output = child
            .wait_with_output()
            .map_err(|source| CaptureError::Spawn {
                command: command.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(CaptureError::Failed {
                command,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

fn iptables(args: &[&str]) -> Result<bool, CaptureError> {
    let command = format!("iptables {}", args.join(" "));
    let output = Command::new("iptables")
        .args(args)
        .output()
        .map_err(|source| CaptureError::Spawn {
            command: command.clone(),
            source,
        })?;
    Ok(output.status.success())
}

/// Removes every Latch rule and chain; does nothing when none are installed.
pub fn uninstall() -> Result<(), CaptureError> {
    for (parent, chain) in [("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", INBOUND_CHAIN)] {
        // Delete every jump into our chain (there may be several after manual edits).
        while iptables(&["-t", "nat", "-D", parent, "-p", "tcp", "-j", chain])? {}
        if iptables(&["-t", "nat", "-F", chain])? && !iptables(&["-t", "nat", "-X", chain])? {
            return Err(CaptureError::Failed {
                command: format!("iptables -t nat -X {chain}"),
                stderr: "chain is still referenced".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_exclude_the_proxy_loopback_and_configured_ports() {
        let rules = CaptureRules {
            proxy_uid: PROXY_UID,
            exclude_outbound_ports: vec![22],
            exclude_inbound_ports: vec![9090],
        }
        .render();
        let lines: Vec<&str> = rules.lines().collect();
        let expected = [
            "*nat",
            ":LATCH_OUTPUT - [0:0]",
            ":LATCH_INBOUND - [0:0]",
            "-A OUTPUT -p tcp -j LATCH_OUTPUT",
            "-A PREROUTING -p tcp -j LATCH_INBOUND",
            "-A LATCH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A LATCH_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A LATCH_OUTPUT -p tcp --dport 22 -j RETURN",
            "-A LATCH_OUTPUT -p tcp --syn -j REDIRECT --to-ports 15001",
            "-A LATCH_INBOUND -p tcp --dport 15001 -j RETURN",
            "-A LATCH_INBOUND -p tcp --dport 15006 -j RETURN",
            "-A LATCH_INBOUND -p tcp --dport 15008 -j RETURN",
            "-A LATCH_INBOUND -p tcp --dport 15020 -j RETURN",
            "-A LATCH_INBOUND -p tcp --dport 9090 -j RETURN",
            "-A LATCH_INBOUND -p tcp --syn -j REDIRECT --to-ports 15006",
            "COMMIT",
        ];
        assert_eq!(lines, expected);
    }
}
