//! What every alternative looks like to a workload: an entry port per app on the client side,
//! and the two sidecar processes whose CPU time and memory the bench reads. Also the fixed port
//! plan of the private namespace (no other tenant, so fixed ports are safe and readable).

use std::time::Duration;

use anyhow::Result;

use latch_testkit::Child as Proc;

/// The servers behind the tunnels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum App {
    Iperf,
    Redis,
    Http,
    Hold,
}

impl App {
    pub const ALL: [App; 4] = [App::Iperf, App::Redis, App::Http, App::Hold];

    /// Where the server itself listens.
    pub fn port(self) -> u16 {
        match self {
            App::Iperf => 5201,
            App::Redis => 6379,
            App::Http => 8080,
            App::Hold => 9000,
        }
    }

    fn index(self) -> u16 {
        match self {
            App::Iperf => 0,
            App::Redis => 1,
            App::Http => 2,
            App::Hold => 3,
        }
    }

    /// A port in a block of four (`base + index`), one per app.
    pub fn port_in(self, base: u16) -> u16 {
        base + self.index()
    }
}

/// The alternatives compared, in the order of the table's columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Alt {
    Direct,
    Latch,
    /// Latch with `--hbone` on the client side: streams over pooled tunnels.
    LatchHbone,
    Stunnel,
    Haproxy,
}

impl Alt {
    pub const ALL: [Alt; 5] = [
        Alt::Direct,
        Alt::Latch,
        Alt::LatchHbone,
        Alt::Stunnel,
        Alt::Haproxy,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Alt::Direct => "direct",
            Alt::Latch => "latch",
            Alt::LatchHbone => "latch-hbone",
            Alt::Stunnel => "stunnel",
            Alt::Haproxy => "haproxy",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Alt::Direct => "direct",
            Alt::Latch => "Latch",
            Alt::LatchHbone => "Latch HBONE",
            Alt::Stunnel => "stunnel",
            Alt::Haproxy => "HAProxy",
        }
    }
}

/// One alternative, running.
pub struct Tunnel {
    pub alt: Alt,
    /// First of the four client-side entry ports; `None` for the direct path.
    entry_base: Option<u16>,
    /// Client-side and server-side sidecars (none for the direct path).
    sidecars: Option<(Proc, Proc)>,
}

impl Tunnel {
    pub fn direct() -> Self {
        Self {
            alt: Alt::Direct,
            entry_base: None,
            sidecars: None,
        }
    }

    pub fn proxied(alt: Alt, entry_base: u16, client_side: Proc, server_side: Proc) -> Self {
        Self {
            alt,
            entry_base: Some(entry_base),
            sidecars: Some((client_side, server_side)),
        }
    }

    /// The port a client of `app` connects to.
    pub fn entry_port(&self, app: App) -> u16 {
        match self.entry_base {
            Some(base) => app.port_in(base),
            None => app.port(),
        }
    }

    /// The client-side and server-side sidecar processes (none for the direct path).
    pub fn sidecars(&self) -> Option<(&Proc, &Proc)> {
        self.sidecars
            .as_ref()
            .map(|(client, server)| (client, server))
    }

    /// CPU time of both sidecars so far (zero for the direct path).
    pub fn cpu_time(&self) -> Result<Duration> {
        match &self.sidecars {
            Some((client, server)) => Ok(client.cpu_time()? + server.cpu_time()?),
            None => Ok(Duration::ZERO),
        }
    }

    /// VmRSS of the client-side and server-side sidecar, MiB.
    pub fn rss_mib(&self) -> Result<Option<(f64, f64)>> {
        match &self.sidecars {
            Some((client, server)) => Ok(Some((client.rss_mib()?, server.rss_mib()?))),
            None => Ok(None),
        }
    }
}
