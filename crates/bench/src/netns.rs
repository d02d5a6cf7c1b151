//! The bench's private network namespace: created with its loopback up, and deleted when the
//! guard drops, after stopping (by PID) whatever processes the bench left running in it. Every
//! process of a mesh run lives in it, so nothing else on the machine shares its ports.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;

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
