//! The bench's private network namespace: created with its loopback up, and deleted when the
//! guard drops, after stopping (by PID) whatever processes the bench left running in it. Every
//! process of a mesh or load run lives in it, so nothing else on the machine shares its ports.
//! Also how the outer run gets there: its tools installed, then `run_inside` re-executes
//! latch-bench in a fresh namespace.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use latch_testkit::child::run_output;

/// A network namespace this process created; deleted on drop.
pub struct PrivateNetns {
    pub name: String,
}

impl PrivateNetns {
    /// `ip netns add <name>` and `ip link set lo up` inside it.
    pub fn create(name: &str) -> Result<Self> {
        run_output(ip(&["netns", "add", name]))?;
        let netns = Self {
            name: name.to_string(),
        };
        run_output(ip(&["-n", name, "link", "set", "lo", "up"]))?;
        Ok(netns)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// PIDs of processes still in the namespace (all of them started by this bench).
    fn pids(&self) -> Vec<String> {
        run_output(ip(&["netns", "pids", &self.name]))
            .map(|out| out.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn signal_all(&self, signal: &str) -> bool {
        let pids = self.pids();
        for pid in &pids {
            let _ = Command::new("kill")
                .args([signal, pid])
                .stderr(Stdio::null())
                .status();
        }
        !pids.is_empty()
    }
}

impl Drop for PrivateNetns {
    fn drop(&mut self) {
        // Leftovers of an interrupted run: ask them to stop, then insist.
        if self.signal_all("-TERM") {
            std::thread::sleep(Duration::from_secs(2));
            self.signal_all("-KILL");
        }
        if let Err(e) = run_output(ip(&["netns", "del", &self.name])) {
            eprintln!(
                "warning: could not delete network namespace {}: {e}",
                self.name
            );
        }
    }
}

fn ip(args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command.args(args);
    command
}

/// `apt-get install`s the package of each `(command, package)` whose command is not on PATH
/// (one `apt-get update` first); nothing when all are there.
pub fn install_missing(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    run_output(apt(&["update", "-qq"]))?;
    let mut install = apt(&["install", "-y", "-qq"]);
    install.args(&missing);
    run_output(install).with_context(|| format!("installing {}", missing.join(" ")))?;
    Ok(())
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `latch-bench <bench> --inside <namespace> <args>` in a new private namespace with the
/// soft open-file limit raised to the hard one (an idle connection costs a sidecar two
/// descriptors, so the hard limit, 20,000 in this machine's containers and not raisable without
/// CAP_SYS_RESOURCE, caps the memory rows at 9,000 connections), and deletes the namespace whatever happens. Ctrl-C stops the inner run (same
/// process group); this process stays to clean up.
pub async fn run_inside(bench: &str, args: &[String]) -> Result<()> {
    let netns = PrivateNetns::create(&format!("latch-{bench}-{}", std::process::id()))?;
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping the bench and deleting its namespace");
        }
    });
    let exe = std::env::current_exe().context("locating latch-bench")?;
    let mut command = netns.command("sh");
    command
        .arg("-c")
        .arg("ulimit -n \"$(ulimit -Hn)\" && exec \"$0\" \"$@\"")
        .arg(&exe)
        .args([bench, "--inside", &netns.name])
        .args(args);
    let status = tokio::task::spawn_blocking(move || command.status())
        .await?
        .context("running the bench inside its namespace")?;
    drop(netns);
    if !status.success() {
        bail!("the {bench} bench failed ({status})");
    }
    Ok(())
}
