//! Transparent capture: the original destination of a REDIRECTed connection (SO_ORIGINAL_DST),
//! and the iptables and ip6tables rules that send the app's TCP through the proxy
//! (`latch-proxy iptables install|uninstall|print`), applied with iptables-restore and
//! ip6tables-restore in the pod's network namespace.

use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::{Command, Stdio};

use latch_mesh::ports::{INBOUND_CAPTURE, OUTBOUND_CAPTURE, PROXY_PORTS, PROXY_UID};
use thiserror::Error;
use tokio::net::TcpStream;

/// The original destination of a connection redirected by iptables or ip6tables, an IPv4
/// address in its plain form. A dual-stack listener accepts IPv4 connections as IPv4-mapped
/// IPv6 sockets, but their original destination is in the IPv4 conntrack table.
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V6(local) if local.ip().to_ipv4_mapped().is_none() => sock.original_dst_v6()?,
        _ => sock.original_dst_v4()?,
    };
    let addr = addr
        .as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))?;
    Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// True when `ip` is an address of this network namespace: the kernel lets a socket bind it.
/// (REDIRECT rewrites the destination to one address of the interface the packet came in on,
/// which need not be the one the client used when the interface has several.)
pub fn is_local_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    !ip.is_unspecified()
        && !ip.is_multicast()
        && std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

const OUTPUT_CHAIN: &str = "LATCH_OUTPUT";
const INBOUND_CHAIN: &str = "LATCH_INBOUND";

/// An IP family: the rules are the same for both but for loopback and the tools applying them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

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
    #[error(
        "this pod has the IPv6 address {address}, but the IPv6 capture rules could not be \
         installed, so IPv6 traffic would bypass the proxy; no rules were left installed. \
         Install ip6tables (with the ip6table_nat module, or nf_tables) in this image, or \
         remove IPv6 from the pod. The cause: {cause}"
    )]
    Ipv6Hole {
        address: Ipv6Addr,
        cause: Box<CaptureError>,
    },
}

/// What `install` did.
#[derive(Debug)]
pub enum Installed {
    /// Rules for IPv4 and IPv6.
    BothFamilies,
    /// IPv4 rules only: the IPv6 ones could not be installed (the error), and the pod has no
    /// global IPv6 address, so no IPv6 traffic can reach or leave it around the proxy.
    Ipv4Only(CaptureError),
}

impl CaptureRules {
    /// The nat table rules for `family` in iptables-restore format (used with --noflush).
    pub fn render(&self, family: Family) -> String {
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
        out.push_str(&format!(
            "-A {OUTPUT_CHAIN} -d {} -j RETURN\n",
            family.loopback()
        ));
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

    /// Both families' rules, each under a comment naming the command that applies it.
    pub fn print(&self) -> String {
        Family::BOTH
            .iter()
            .map(|&family| {
                format!(
                    "# {}: {} --noflush\n{}",
                    family.name(),
                    family.restore(),
                    self.render(family)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Installs the rules for both families, replacing any earlier Latch rules (idempotent).
    /// IPv4 rules are required. IPv6 rules are required when the pod has a global IPv6
    /// address; without one, a failure to install them is returned as `Installed::Ipv4Only`.
    /// On an error no Latch rule is left installed.
    pub fn install(&self) -> Result<Installed, CaptureError> {
        uninstall()?;
        self.restore(Family::V4)?;
        match self.restore(Family::V6) {
            Ok(()) => Ok(Installed::BothFamilies),
            Err(cause) => match global_ipv6_addresses().into_iter().next() {
                None => Ok(Installed::Ipv4Only(cause)),
                Some(address) => {
                    uninstall()?;
                    Err(CaptureError::Ipv6Hole {
                        address,
                        cause: Box::new(cause),
                    })
                }
            },
        }
    }

    fn restore(&self, family: Family) -> Result<(), CaptureError> {
        let command = format!("{} --noflush", family.restore());
        let spawn_err = |source| CaptureError::Spawn {
            command: command.clone(),
            source,
        };
        let mut child = Command::new(family.restore())
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            match stdin.write_all(self.render(family).as_bytes()) {
                // A tool that fails before reading its input closes the pipe; its exit status
                // and stderr below say why, which "Broken pipe" would not. (Seen with the CNI
                // test's failing ip6tables-restore.)
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other.map_err(spawn_err)?,
            }
        }
        let output = child.wait_with_output().map_err(spawn_err)?;
        if !output.status.success() {
            return Err(CaptureError::Failed {
                command,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
    /// The rules of `family` that are not installed, in iptables-restore syntax: empty when
    /// every jump, chain and rule `install` writes is present and the Latch chains hold
    /// nothing else. Used by the CNI plugin's CHECK; `iptables -C` compares rules the way the
    /// kernel stores them, so spelling differences (`--syn`, `-m tcp`) do not matter.
    pub fn missing(&self, family: Family) -> Result<Vec<String>, CaptureError> {
        let rendered = self.render(family);
        let mut missing = Vec::new();
        let mut expected_in_chain = [(OUTPUT_CHAIN, 0usize), (INBOUND_CHAIN, 0)];
        for rule in rendered.lines().filter(|l| l.starts_with("-A ")) {
            let args: Vec<&str> = rule.split_whitespace().collect();
            for (chain, count) in &mut expected_in_chain {
                if args.get(1) == Some(chain) {
                    *count += 1;
                }
            }
            let mut check = vec!["-t", "nat", "-C"];
            check.extend(&args[1..]);
            if !iptables(family, &check)? {
                missing.push(rule.to_string());
            }
        }
        // A rule added by hand to a Latch chain (say, a RETURN before the REDIRECT) would let
        // traffic around the proxy while every expected rule is still there.
        for (chain, expected) in expected_in_chain {
            let listed = iptables_stdout(family, &["-t", "nat", "-S", chain])?;
            let extra = listed
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count()
                .saturating_sub(expected);
            if extra > 0 {
                missing.push(format!(
                    "(nothing else in {chain}: it holds {extra} rule(s) Latch did not write)"
                ));
            }
        }
        Ok(missing)
    }
}

/// The global-scope IPv6 addresses of this network namespace (unique-local fd00::/8 included,
/// as the kernel counts them), from /proc/net/if_inet6; none when the kernel has no IPv6.
pub fn global_ipv6_addresses() -> Vec<Ipv6Addr> {
    std::fs::read_to_string("/proc/net/if_inet6")
        .map(|text| parse_if_inet6(&text))
        .unwrap_or_default()
}

/// Lines of `<32 hex digits> <ifindex> <prefix length> <scope> <flags> <name>`; scope 00 is
/// global.
fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (hex, scope) = (fields.first()?, fields.get(3)?);
            if *scope != "00" || hex.len() != 32 {
                return None;
            }
            u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from)
        })
        .collect()
}

fn iptables(family: Family, args: &[&str]) -> Result<bool, CaptureError> {
    let command = format!("{} {}", family.iptables(), args.join(" "));
    let output = Command::new(family.iptables())
        .args(args)
        .output()
        .map_err(|source| CaptureError::Spawn {
            command: command.clone(),
            source,
        })?;
    Ok(output.status.success())
}

/// What `iptables args` printed on stdout, whatever its exit status (empty for a chain that
/// does not exist).
fn iptables_stdout(family: Family, args: &[&str]) -> Result<String, CaptureError> {
    let command = format!("{} {}", family.iptables(), args.join(" "));
    let output = Command::new(family.iptables())
        .args(args)
        .output()
        .map_err(|source| CaptureError::Spawn { command, source })?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Removes every Latch rule and chain of both families; does nothing when none are installed
/// (nor for IPv6 when ip6tables is not installed: then no IPv6 rule can be).
pub fn uninstall() -> Result<(), CaptureError> {
    for family in Family::BOTH {
        match uninstall_family(family) {
            Err(CaptureError::Spawn { source, .. })
                if family == Family::V6 && source.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

fn uninstall_family(family: Family) -> Result<(), CaptureError> {
    for (parent, chain) in [("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", INBOUND_CHAIN)] {
        // Delete every jump into our chain (there may be several after manual edits).
        while iptables(
            family,
            &["-t", "nat", "-D", parent, "-p", "tcp", "-j", chain],
        )? {}
        if iptables(family, &["-t", "nat", "-F", chain])?
            && !iptables(family, &["-t", "nat", "-X", chain])?
        {
            return Err(CaptureError::Failed {
                command: format!("{} -t nat -X {chain}", family.iptables()),
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
        .render(Family::V4);
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

    #[test]
    fn ipv6_rules_differ_only_in_loopback() {
        let rules = CaptureRules::default();
        let v4 = rules.render(Family::V4);
        let v6 = rules.render(Family::V6);
        assert!(
            v6.lines()
                .any(|l| l == "-A LATCH_OUTPUT -d ::1/128 -j RETURN")
        );
        assert_eq!(v4.replace("127.0.0.0/8", "::1/128"), v6);
        let printed = rules.print();
        assert!(printed.starts_with("# IPv4: iptables-restore --noflush\n*nat\n"));
        assert!(printed.contains("\n# IPv6: ip6tables-restore --noflush\n*nat\n"));
        assert_eq!(printed.matches("COMMIT").count(), 2);
    }

    #[test]
    fn global_ipv6_addresses_are_scope_00() {
        let text = "\
00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000000000000000001 02 40 20 80     eth0
fd000005000000000000000000000010 02 40 00 80     eth0
20010db8000000000000000000000001 02 40 00 80     eth0
";
        assert_eq!(
            parse_if_inet6(text),
            vec![
                "fd00:5::10".parse::<Ipv6Addr>().unwrap(),
                "2001:db8::1".parse().unwrap()
            ]
        );
        assert!(parse_if_inet6("garbage\n").is_empty());
    }

    #[test]
    fn local_addresses_are_those_a_socket_can_bind() {
        assert!(is_local_address("127.0.0.1".parse().unwrap()));
        assert!(is_local_address("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_local_address("0.0.0.0".parse().unwrap()));
        // TEST-NET-3, never assigned to a host.
        assert!(!is_local_address("203.0.113.7".parse().unwrap()));
    }
}
