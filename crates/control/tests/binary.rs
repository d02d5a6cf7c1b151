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
            "--jwt-key-rotation",
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
            "--inject-proxy-cpu-request",
            "--inject-proxy-cpu-limit",
            "--inject-proxy-memory-request",
            "--inject-proxy-memory-limit",
            "--inject-proxy-log-level",
            "--inject-cni",
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
        // LATCH_CA_BUNDLE means the bundle latch-proxy and latchctl verify the control plane
        // with; the plug-in CA's roots have a variable of their own.
        let env = match flag.as_str() {
            "--ca-bundle" => "LATCH_CONTROL_CA_BUNDLE".to_string(),
            _ => format!("LATCH_{}", flag[2..].replace('-', "_").to_uppercase()),
        };
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

/// Starts latch-control with a config file holding `config`; returns its exit status and
/// stderr once it has stopped.
fn start_with_config(config: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latch.yaml");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();
    Running::start(&dir.path().join("data"), &["--config", path]).exit()
}

#[test]
fn short_join_token_in_config_file_stops_start_up() {
    let (status, stderr) = start_with_config(
        "join_tokens:\n  - spiffe_id: spiffe://cluster.local/ns/demo/sa/web\n    token: too-short\n",
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("join_tokens[0]: join token is 9 characters; at least 16 are required"),
        "{stderr}"
    );
}

#[test]
fn a_configured_token_for_the_control_planes_own_id_stops_start_up() {
    let (status, stderr) = start_with_config(
        "join_tokens:\n  - spiffe_id: spiffe://cluster.local/ns/latch-system/sa/latch-control\n    token: long-enough-to-be-a-token\n",
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("join_tokens[0].spiffe_id: spiffe://cluster.local/ns/latch-system/sa/latch-control is reserved for the control plane's own use"),
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

#[test]
fn a_csr_uri_holding_a_newline_cannot_forge_a_log_line() {
    use latch_identity::client::CaClient;
    use latch_proto::ca::CreateCertificateRequest;
    use latch_proto::ca::create_certificate_request::Proof;

    const TOKEN: &str = "log-forging-test-token-0123456789";
    const FORGED: &str = "INFO latch_control: issued SVID spiffe_id=spiffe://cluster.local/ns/latch-system/sa/latch-control";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("latch.yaml");
    std::fs::write(
        &config,
        format!(
            "join_tokens:\n  - spiffe_id: spiffe://cluster.local/ns/demo/sa/web\n    token: {TOKEN}\n    reusable: true\n"
        ),
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    let listen = latch_testkit::net::free_loopback();
    let mut running = Running::start_with(
        &data_dir,
        &[
            "--listen",
            &listen,
            "--admin",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    running.wait_started(&data_dir);

    // A CSR whose URI SAN carries a newline and a whole fake log line after it.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    let uri = format!("spiffe://cluster.local/ns/demo/sa/x\n{FORGED}");
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.as_str().try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let bundle =
        TrustBundle::from_pem(&std::fs::read(data_dir.join("bundle.pem")).unwrap()).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        let store = std::sync::Arc::new(latch_identity::CertStore::new(bundle));
        let expected =
            latch_identity::ExpectedPeer::Exactly(latch_identity::client::control_plane_id(
                &latch_identity::TrustDomain::new("cluster.local").unwrap(),
            ));
        let mut client = CaClient::connect(&listen, store, expected, false)
            .await
            .unwrap();
        client
            .create_certificate(CreateCertificateRequest {
                csr,
                ttl: None,
                proof: Some(Proof::JoinToken(TOKEN.into())),
            })
            .await
            .expect_err("a CSR for another ID is refused")
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let log = poll(|| {
        let log = running.child.log();
        log.contains("refused certificate request").then_some(log)
    })
    .unwrap_or_else(|| panic!("no refusal logged:\n{}", running.child.log()));
    let forged_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("INFO latch_control: issued"))
        .collect();
    assert!(forged_lines.is_empty(), "a forged line:\n{log}");
    let refusal = log
        .lines()
        .find(|l| l.contains("refused certificate request"))
        .unwrap();
    assert!(
        refusal.contains(r"sa/x\\n") || refusal.contains(r"sa/x\n"),
        "the newline is written escaped, on the refusal's own line: {refusal}"
    );
    assert_eq!(
        log.lines().filter(|l| l.contains(FORGED)).count(),
        1,
        "the fake line's text appears once, inside the refusal line:\n{log}"
    );
}

/// The help text of `flag` in `latch-control --help`, with its lines joined.
fn help_of(flag: &str) -> String {
    let out = command().arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let start = help
        .lines()
        .position(|l| l.split_whitespace().next() == Some(flag))
        .unwrap_or_else(|| panic!("{flag} in\n{help}"));
    let lines: Vec<&str> = help.lines().skip(start).collect();
    let end = lines[1..]
        .iter()
        .position(|l| l.trim_start().starts_with("--"))
        .map_or(lines.len(), |i| i + 1);
    let rest = lines[..end].join("\n");
    rest.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn help_says_what_the_readme_says_about_kubernetes_and_publish_bundle() {
    let kubernetes = help_of("--kubernetes");
    assert!(
        kubernetes.contains("still supplies join tokens and `mesh:` settings")
            && kubernetes.contains("join the cluster's"),
        "{kubernetes}"
    );
    let publish = help_of("--publish-bundle");
    assert!(
        publish.contains("at start and again on every root rotation step"),
        "{publish}"
    );
}

#[test]
fn latch_ca_bundle_of_the_proxy_is_not_taken_for_the_plugin_roots() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // Plug-in mode with LATCH_CA_BUNDLE set, as a shell that runs latchctl and latch-proxy
    // has it: refused, naming the variable to use instead.
    let logs = tempfile::tempdir().unwrap();
    let mut cmd = command();
    cmd.env("LATCH_CA_BUNDLE", "latch-data/bundle.pem")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--ca-cert", "ca.crt", "--ca-key", "ca.key"]);
    let mut child = Child::spawn("latch-control", cmd, &logs.path().join("log")).unwrap();
    let status = child.wait_exit(TIMEOUT).expect("latch-control exits");
    let stderr = child.log();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr
            .matches(
                "LATCH_CA_BUNDLE is set (latch-data/bundle.pem) but latch-control does not read it"
            )
            .count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("--ca-bundle or LATCH_CONTROL_CA_BUNDLE"),
        "{stderr}"
    );
    assert!(!data_dir.exists(), "nothing created");

    // Without plug-in mode the variable is simply not the control plane's business.
    let mut cmd = command();
    cmd.env("LATCH_CA_BUNDLE", "latch-data/bundle.pem")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let child = Child::spawn("latch-control", cmd, &logs.path().join("log2")).unwrap();
    let mut running = Running { child, _logs: logs };
    running.wait_started(&data_dir);
}
