//! The stunnel4 pair: one service per app on each side, TLS 1.3 only with one cipher suite,
//! the SVIDs from our CA as certificates and `verifyChain` (peer certificate required and
//! checked against the bundle) on both sides. stunnel checks no SPIFFE ID: chain only.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use super::latch::SvidFiles;
use super::tunnel::{Alt, App, Tunnel};
use latch_testkit::Child as Proc;
use latch_testkit::net::wait_port;

pub const ENTRY_BASE: u16 = 12000;
const TLS_BASE: u16 = 22000;

/// Starts both sides and waits for their listeners.
pub fn start(dir: &Path, client: &SvidFiles, server: &SvidFiles, suite: &str) -> Result<Tunnel> {
    let server_side = side(dir, "stunnel-server", server, suite, false)?;
    let client_side = side(dir, "stunnel-client", client, suite, true)?;
    for app in App::ALL {
        wait_port(app.port_in(ENTRY_BASE), Duration::from_secs(10))?;
        wait_port(app.port_in(TLS_BASE), Duration::from_secs(10))?;
    }
    Ok(Tunnel::proxied(
        Alt::Stunnel,
        ENTRY_BASE,
        client_side,
        server_side,
    ))
}

fn side(dir: &Path, name: &str, svid: &SvidFiles, suite: &str, client: bool) -> Result<Proc> {
    let config_path = dir.join(format!("{name}.conf"));
    let log = dir.join(format!("{name}.log"));
    std::fs::write(&config_path, config(svid, suite, client))?;
    let mut command = Command::new("stunnel");
    command.arg(&config_path);
    let mut proc = crate::spawn(name, command, &log)?;
    std::thread::sleep(Duration::from_millis(200));
    proc.check_running()?;
    Ok(proc)
}

fn config(svid: &SvidFiles, suite: &str, client: bool) -> String {
    let mut text = format!(
        "foreground = yes\npid =\ndebug = 4\n\
         cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n\
         sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\nciphersuites = {suite}\n\
         client = {}\n",
        svid.chain.display(),
        svid.key.display(),
        svid.bundle.display(),
        if client { "yes" } else { "no" },
    );
    for app in App::ALL {
        let (accept, connect) = if client {
            (app.port_in(ENTRY_BASE), app.port_in(TLS_BASE))
        } else {
            (app.port_in(TLS_BASE), app.port())
        };
        let _ = write!(
            text,
            "\n[{app:?}]\naccept = 127.0.0.1:{accept}\nconnect = 127.0.0.1:{connect}\n"
        );
    }
    text
}
