//! The one owner of child processes for tests, the bench and the demo: a `Child` is started
//! with its stdout and stderr in a log file and stopped when dropped, by its own PID only
//! (SIGKILL, or SIGTERM then SIGKILL after a grace period); it reads its log, exit status,
//! CPU time, memory and open files from /proc. Used by `processes`, `netns`, latch-bench.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A process this program started, stopped when dropped.
pub struct Child {
    child: std::process::Child,
    name: String,
    /// Where its stdout and stderr go.
    log: PathBuf,
    /// When set, a drop sends SIGTERM and waits this long before SIGKILL.
    grace: Option<Duration>,
}

impl Child {
    /// Starts `command` with stdin closed and stdout and stderr written to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({command:?})"))?;
        Ok(Self {
            child,
            name: name.to_string(),
            log: log.to_path_buf(),
            grace: None,
        })
    }

    /// Stops it politely when dropped: SIGTERM, then SIGKILL after `grace` (e.g. so that
    /// nginx's master takes its workers with it).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name it was started under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file its output goes to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What it wrote so far (stdout and stderr).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Its log under a `--- name ---` header, for assertion messages.
    pub fn logs(&self) -> String {
        format!("--- {} ---\n{}\n", self.name, self.log())
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails, with the tail of its log, if the process has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// Panics, with its log, if the process has already exited.
    pub fn assert_running(&mut self) {
        if let Err(e) = self.check_running() {
            panic!("{e:#}");
        }
    }

    /// Waits for `check`, panicking with the process's log if it is not true within `timeout`.
    pub fn wait_until(&self, timeout: Duration, what: &str, check: impl FnMut() -> bool) {
        assert!(
            crate::wait_for(timeout, check),
            "timed out after {timeout:?} waiting until {what}\n{}",
            self.logs()
        );
    }

    /// kill -9, then reap it; asserts that SIGKILL is what ended it.
    pub fn kill9(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().expect("wait");
        assert_eq!(status.signal(), Some(9), "{} ended by SIGKILL", self.name);
    }

    /// Sends `signal` (e.g. "INT") with `kill -<signal> <pid>`, to this process only.
    pub fn signal(&self, signal: &str) -> bool {
        Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits up to `timeout` for the process to exit by itself; its status, or `None` if it
    /// is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// User+system CPU time used so far (utime + stime from /proc/<pid>/stat, all threads).
    pub fn cpu_time(&self) -> Result<Duration> {
        let path = format!("/proc/{}/stat", self.pid());
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| -> Result<u64> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("field {i} of {path}"))
        };
        // utime and stime are fields 14 and 15; USER_HZ is 100 on Linux.
        Ok(Duration::from_millis((field(11)? + field(12)?) * 10))
    }

    /// Resident memory (VmRSS) in MiB.
    pub fn rss_mib(&self) -> Result<f64> {
        Ok(self.rss_kib()? as f64 / 1024.0)
    }

    /// Open file descriptors (entries of /proc/<pid>/fd).
    pub fn fd_count(&self) -> Result<usize> {
        let path = format!("/proc/{}/fd", self.pid());
        Ok(std::fs::read_dir(&path)
            .with_context(|| format!("reading {path}"))?
            .count())
    }

    /// The soft and hard open-file limits ("Max open files" of /proc/<pid>/limits), as written
    /// there (a number or "unlimited").
    pub fn open_files_limit(&self) -> Result<(String, String)> {
        let path = format!("/proc/{}/limits", self.pid());
        let limits = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let mut fields = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .with_context(|| format!("no open-file limit in {path}"))?
            .split_whitespace();
        match (fields.next(), fields.next()) {
            (Some(soft), Some(hard)) => Ok((soft.to_string(), hard.to_string())),
            _ => bail!("odd open-file limit line in {path}"),
        }
    }

    /// Resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no VmRSS in {path}"))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        let stopped_politely = self
            .grace
            .is_some_and(|grace| self.signal("TERM") && self.wait_exit(grace).is_some());
        if stopped_politely {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a log file, for error messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Runs a command to completion and returns its stdout; fails with stderr if it fails.
pub fn run_output(mut command: Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
