//! The HAProxy pair in `mode tcp`: a frontend per app on each side, TLS 1.3 only with one
//! cipher suite, the SVIDs from our CA as certificates and `verify required` on both sides
//! (chain checked against the bundle; HAProxy checks no SPIFFE ID).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use super::latch::SvidFiles;
use super::tunnel::{Alt, App, Tunnel};
use latch_testkit::Child as Proc;
use latch_testkit::net::wait_port;

pub const ENTRY_BASE: u16 = 13000;
const TLS_BASE: u16 = 23000;

/// `maxconn` of the mesh bench: fits the container's hard limit of 20,000 open files (HAProxy
/// needs two per connection plus a few) and still leaves room for the 9,000-connection memory
/// row.
const MAXCONN: usize = 9500;

/// Starts both sides and waits for their listeners.
pub fn start(dir: &Path, client: &SvidFiles, server: &SvidFiles, suite: &str) -> Result<Tunnel> {
    start_with(dir, client, server, suite, MAXCONN)
}

/// `start` with `maxconn` (global and per frontend) on both sides.
pub fn start_with(
    dir: &Path,
    client: &SvidFiles,
    server: &SvidFiles,
    suite: &str,
    maxconn: usize,
) -> Result<Tunnel> {
    let server_side = side(dir, "haproxy-server", server, suite, false, maxconn)?;
    let client_side = side(dir, "haproxy-client", client, suite, true, maxconn)?;
    for app in App::ALL {
        wait_port(app.port_in(ENTRY_BASE), Duration::from_secs(10))?;
        wait_port(app.port_in(TLS_BASE), Duration::from_secs(10))?;
    }
    Ok(Tunnel::proxied(
        Alt::Haproxy,
        ENTRY_BASE,
        client_side,
        server_side,
    ))
}

fn side(
    dir: &Path,
    name: &str,
    svid: &SvidFiles,
    suite: &str,
    client: bool,
    maxconn: usize,
) -> Result<Proc> {
    // HAProxy wants the chain and the key in one file.
    let combined = dir.join(format!("{name}.pem"));
    let pem = [&svid.chain, &svid.key]
        .iter()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<Vec<_>>>()?
        .join("");
    std::fs::write(&combined, pem)?;
    let config_path = dir.join(format!("{name}.cfg"));
    let log = dir.join(format!("{name}.log"));
    let ca = svid.bundle.display();
    let crt = combined.display();
    std::fs::write(
        &config_path,
        config(client, &format!("{crt}"), &format!("{ca}"), suite, maxconn),
    )?;
    let mut command = Command::new("haproxy");
    command.arg("-db").arg("-f").arg(&config_path);
    let mut proc = crate::spawn(name, command, &log)?;
    std::thread::sleep(Duration::from_millis(200));
    proc.check_running()?;
    Ok(proc)
}

fn config(client: bool, crt: &str, ca: &str, suite: &str, maxconn: usize) -> String {
    let mut text = format!(
        "global\n  maxconn {maxconn}\n\
         \x20 ssl-default-bind-ciphersuites {suite}\n\
         \x20 ssl-default-server-ciphersuites {suite}\n\
         \x20 ssl-default-bind-options ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3\n\
         \x20 ssl-default-server-options ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3\n\
         defaults\n  mode tcp\n  maxconn {maxconn}\n  timeout connect 5s\n\
         \x20 timeout client 1h\n  timeout server 1h\n"
    );
    for app in App::ALL {
        let name = format!("{app:?}").to_lowercase();
        if client {
            let _ = write!(
                text,
                "frontend {name}\n  bind 127.0.0.1:{}\n  default_backend {name}\n\
                 backend {name}\n  server s 127.0.0.1:{} ssl verify required ca-file {ca} crt {crt}\n",
                app.port_in(ENTRY_BASE),
                app.port_in(TLS_BASE),
            );
        } else {
            let _ = write!(
                text,
                "frontend {name}\n  bind 127.0.0.1:{} ssl crt {crt} ca-file {ca} verify required\n\
                 \x20 default_backend {name}\n\
                 backend {name}\n  server app 127.0.0.1:{}\n",
                app.port_in(TLS_BASE),
                app.port(),
            );
        }
    }
    text
}
