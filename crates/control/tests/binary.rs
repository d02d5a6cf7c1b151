//! Runs the real `latch-control` binary as an operator would: the first start makes a root that
//! a restart keeps, every flag has its LATCH_* variable, and a corrupt CA key or a bad config
//! file stops start-up with a message naming the culprit. Every child is killed on drop.

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use latch_identity::TrustBundle;
use latch_testkit::Child;

const BINARY: &str = env!("CARGO_BIN_EXE_latch-control");
/// How long start-up (or a refusal to start) may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `latch-control` with info logs, no colour, and no LATCH_* variable leaking in from the caller.
fn command() -> Command {
    let mut cmd = Command::new(BINARY);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LATCH_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd
}

/// Calls `check` every 50 ms until it yields a value or `TIMEOUT` passes.
fn poll<T>(check: impl FnMut() -> Option<T>) -> Option<T> {
    latch_testkit::poll(TIMEOUT, check)
}

/// A `latch-control` process this test started (the test kit's `Child`: killed when dropped,
/// so a failing assert never leaves it behind), its stderr in a log file of its own.
struct Running {
    child: Child,
    _logs: tempfile::TempDir,
}

impl Running {
    /// Starts the binary on `data_dir` with both listeners on port 0, plus `extra` flags.
    fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let mut args = vec!["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Self::start_with(data_dir, &args)
    }

    /// Starts the binary on `data_dir` with exactly `args` besides `--data-dir`.
    fn start_with(data_dir: &Path, args: &[&str]) -> Self {
        let logs = tempfile::tempdir().expect("log dir");
        let mut command = command();
        command.arg("--data-dir").arg(data_dir).args(args);
        let child = Child::spawn("latch-control", command, &logs.path().join("control.log"))
            .expect("spawn latch-control");
        Self { child, _logs: logs }
    }

    /// Waits until the bundle file exists and the start-up line is logged.
    fn wait_started(&mut self, data_dir: &Path) {
        let bundle = data_dir.join("bundle.pem");
        let started = poll(|| {
            if let Some(status) = self.child.try_wait() {
                panic!(
                    "latch-control exited ({status}) instead of starting:\n{}",
                    self.child.log()
                );
            }
            (bundle.exists() && self.child.log().contains("control plane started")).then_some(())
        });
        assert!(
            started.is_some(),
            "latch-control did not start within {TIMEOUT:?}:\n{}",
            self.child.log()
        );
    }

    /// Waits for the process to exit on its own; returns its status and all of its output.
    fn exit(mut self) -> (ExitStatus, String) {
        let Some(status) = self.child.wait_exit(TIMEOUT) else {
            panic!(
                "latch-control still running after {TIMEOUT:?}:\n{}",
                self.child.log()
            );
        };
        (status, self.child.log())
    }
}

/// Starts the control plane on `data_dir`, waits until it serves, and kills it.
fn start_and_stop(data_dir: &Path) {
    Running::start(data_dir, &[]).wait_started(data_dir);
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn first_start_creates_a_root_and_restart_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let root_path = data_dir.join("ca/root.crt.pem");
    let bundle_path = data_dir.join("bundle.pem");

    start_and_stop(&data_dir);
    let root = read(&root_path);
    let bundle = read(&bundle_path);
    assert_eq!(
        TrustBundle::from_pem(&bundle).unwrap().roots(),
        TrustBundle::from_pem(&root).unwrap().roots(),
        "bundle.pem must hold the root"
    );

    start_and_stop(&data_dir);
    assert_eq!(read(&root_path), root, "restart replaced the root");
    assert_eq!(read(&bundle_path), bundle);
}

#[test]
fn every_flag_has_its_latch_environment_variable() {
    let out = command().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // Each option's entry starts at a line whose first word is `--flag` or `-x,`; clap puts
    // the description and `[env: ...]` on that line or, when wrapping, on the lines below.
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [first, ..] if first.starts_with("--") => {
                entries.push((first.to_string(), line.to_string()));
            }
            [short, long, ..] if short.len() == 3 && short.starts_with('-') => {
                entries.push((long.to_string(), line.to_string()));
            }
            _ => {
                if let Some((_, text)) = entries.last_mut() {
                    text.push_str(line);
                }
            }
        }
    }
    let flags: Vec<&str> = entries.iter().map(|(flag, _)| flag.as_str()).collect();
    assert_eq!(
        flags,
        [
            "--trust-domain",
            "--data-dir",
            "--listen",
            "--admin",
            "--config",
            "--default-ttl",
            "--max-ttl",
            "--ca-cert",
            "--ca-key",
            "--ca-chain",
            "--ca-bundle",
            "--max-connections",
            "--max-connections-per-source",
            "--max-unauthenticated-connections",
            "--webhook",
            "--webhook-configuration",
            "--inject-image",
            "--inject-control-plane",
            "--kubernetes",
            "--ca-secret",
            "--log-format",
            "--publish-bundle",
            "--help",
            "--version",
        ],
        "{help}"
    );
    for (flag, text) in entries
        .iter()
        .filter(|(f, _)| f != "--help" && f != "--version")
    {
        let env = format!("LATCH_{}", flag[2..].replace('-', "_").to_uppercase());
        assert!(
            text.contains(&format!("[env: {env}=")),
            "{flag} does not name {env}:\n{text}"
        );
    }
}

#[test]
fn corrupt_ca_key_stops_start_up_and_keeps_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    start_and_stop(&data_dir);
    let key_path = data_dir.join("ca/root.key.pem");
    let root_path = data_dir.join("ca/root.crt.pem");
    std::fs::write(&key_path, b"\x00\xffthis is not a key").unwrap();
    let root = read(&root_path);

    let (status, stderr) = Running::start(&data_dir, &[]).exit();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("corrupt"), "{stderr}");
    assert!(stderr.contains(&key_path.display().to_string()), "{stderr}");
    assert_eq!(read(&root_path), root, "a refused start replaced the root");
    assert_eq!(read(&key_path), b"\x00\xffthis is not a key");
}

#[test]
fn a_taken_port_stops_start_up_said_once_and_leaves_no_ca_behind() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let data_dir = dir.path().join("data");
    let (status, stderr) =
        Running::start_with(&data_dir, &["--listen", &taken, "--admin", "127.0.0.1:0"]).exit();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {taken} (--listen)")),
        "the message names the address and the flag:\n{stderr}"
    );
    assert!(
        stderr.contains("pick another address with --listen"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("os error 98").count(),
        1,
        "the OS error is said once:\n{stderr}"
    );
    assert!(
        !data_dir.join("ca").exists(),
        "a start that fails on a taken port must not create a CA"
    );
}

#[test]
fn short_join_token_in_config_file_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("latch.yaml");
    std::fs::write(
        &config,
        "join_tokens:\n  - spiffe_id: spiffe://cluster.local/ns/demo/sa/web\n    token: too-short\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (status, stderr) = Running::start(&dir.path().join("data"), &["--config", config]).exit();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("join_tokens[0]: join token is 9 characters; at least 16 are required"),
        "{stderr}"
    );
}

#[test]
fn publish_bundle_writes_a_readable_copy_or_stops_start_up() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let published = dir.path().join("bundle-for-sidecars.pem");
    let mut running = Running::start(
        &data_dir,
        &["--publish-bundle", published.to_str().unwrap()],
    );
    running.wait_started(&data_dir);
    let logged = poll(|| {
        running
            .child
            .log()
            .contains("trust bundle published")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", running.child.log());
    assert_eq!(read(&published), read(&data_dir.join("bundle.pem")));
    let mode = std::fs::metadata(&published).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o644,
        "sidecars of another uid must be able to read it"
    );
    drop(running);

    // A folder that does not exist is a start-up error naming the flag.
    let missing = dir.path().join("no-such-dir/bundle.pem");
    let (status, stderr) =
        Running::start(&data_dir, &["--publish-bundle", missing.to_str().unwrap()]).exit();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--publish-bundle") && stderr.contains("no-such-dir"),
        "{stderr}"
    );
}
