//! The SPIFFE Workload API as SPIFFE libraries built on other gRPC implementations see it, run
//! as an ordinary uid the proxy allows (`--workload-api-allow-uid 4242`): py-spiffe (PyPI
//! `spiffe`, on gRPC C-core, which sends the socket path as `:authority`) fetches the X.509-SVID,
//! follows a rotation and fetches the bundles; uid 4243 is refused and the refusal is counted on
//! /metrics. Needs root (to run clients as other uids) and py-spiffe in
//! `/opt/latch-ci/py-spiffe` (or LATCH_PY_SPIFFE_PYTHON); skips without, fails instead with
//! LATCH_REQUIRE_SPIFFE_CLIENTS=1, as CI sets (.ci/run installs it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use latch_proxy::config::AllowedUid;
use latch_proxy::workload_api::AllowedPeers;
use latch_testkit::Harness;
use serde_json::Value;

/// The app's uid, which the proxy allows, and one it does not.
const APP_UID: u32 = 4242;
const OTHER_UID: u32 = 4243;

/// Set to 1 (CI does) to fail, not skip, when a client library is missing.
const REQUIRE_ENV: &str = "LATCH_REQUIRE_SPIFFE_CLIENTS";
/// The Python interpreter that has py-spiffe; .ci/run makes this venv.
const PYTHON_ENV: &str = "LATCH_PY_SPIFFE_PYTHON";
const DEFAULT_PYTHON: &str = "/opt/latch-ci/py-spiffe/bin/python";
const PY_CLIENT: &str = include_str!("../clients/py_spiffe_client.py");

/// A SKIPPED line, or a panic under LATCH_REQUIRE_SPIFFE_CLIENTS=1.
fn missing(what: &str) {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but {what}");
    }
    latch_testkit::skip::skipped(&format!("{what}; set {REQUIRE_ENV}=1 to fail instead"));
}

/// The interpreter with py-spiffe importable, if there is one and this test may run clients as
/// other uids (root).
fn py_spiffe() -> Option<PathBuf> {
    if !is_root() {
        missing("running clients as other uids needs root");
        return None;
    }
    let python =
        PathBuf::from(std::env::var(PYTHON_ENV).unwrap_or_else(|_| DEFAULT_PYTHON.to_string()));
    let works = std::process::Command::new(&python)
        .args(["-c", "import spiffe"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        missing(&format!(
            "{} cannot import py-spiffe (.ci/run installs it: a venv with `pip install spiffe`)",
            python.display()
        ));
        return None;
    }
    Some(python)
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A directory any uid may enter (the clients run as other uids), holding the client script.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(dir.path().join("py_spiffe_client.py"), PY_CLIENT).unwrap();
    dir
}

/// Runs the py-spiffe client in `dir` against `socket`, as `uid` when given (via setpriv), and
/// returns the JSON it printed.
async fn run_py_client(
    python: &Path,
    dir: &Path,
    socket: &Path,
    uid: Option<u32>,
    args: &[&str],
) -> Value {
    let script = dir.join("py_spiffe_client.py");
    let mut command = match uid {
        Some(uid) => {
            let mut c = tokio::process::Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(python);
            c
        }
        None => tokio::process::Command::new(python),
    };
    command
        .arg(&script)
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .env("PYTHONWARNINGS", "ignore")
        .kill_on_drop(true)
        .stdin(Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the py-spiffe client finishes within 60 s")
        .expect("the py-spiffe client starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "py-spiffe client failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("py-spiffe client printed no JSON ({e}):\n{stdout}\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn py_spiffe_as_an_allowed_uid_fetches_follows_a_rotation_and_other_uids_are_refused() {
    let Some(python) = py_spiffe() else { return };
    let h = Harness::start().await;
    let id = h.id("demo", "py-app");
    let dir = shared_dir();
    let socket = dir.path().join("workload-api/socket");
    let mut config = h.proxy_config(
        &id,
        Some(Duration::from_secs(8)),
        Some(socket.clone()),
        false,
    );
    if let Some(api) = &mut config.workload_api {
        api.allowed = AllowedPeers::new(0, &[AllowedUid::Uid(APP_UID)]);
    }
    let proxy = latch_testkit::start_proxy(config).await;
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(
        mode & 0o777,
        0o666,
        "other uids may connect; SO_PEERCRED decides"
    );

    let result = run_py_client(
        &python,
        dir.path(),
        &socket,
        Some(APP_UID),
        &["fetch", "30"],
    )
    .await;
    assert_eq!(result["spiffe_id"], id.to_string(), "{result}");
    assert_eq!(result["key_matches_leaf"], true, "{result}");
    assert_eq!(result["bundles"]["cluster.local"], 1, "{result}");
    let serials: Vec<String> = result["stream_serials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        serials.len(),
        2,
        "the stream delivered a rotation: {result}"
    );
    assert_ne!(serials[0], serials[1]);
    // Both are SVIDs this proxy held: its rotation counter moved past them.
    assert!(proxy.metrics.rotations.get() >= 2);
    let refused = "latch_proxy_workload_api_connections_refused_total";
    assert_eq!(
        latch_testkit::admin::metric(proxy.admin_addr, refused, &[]).await,
        0.0
    );

    // Another uid reaches the socket (mode 0666) and is closed at accept: the library fails,
    // the proxy counts it.
    let result = run_py_client(&python, dir.path(), &socket, Some(OTHER_UID), &["refused"]).await;
    let error = result["error"].as_str().expect("uid 4243 gets no SVID");
    assert!(error.contains("UNAVAILABLE"), "{error}");
    let counted = latch_testkit::admin::metric(proxy.admin_addr, refused, &[]).await;
    assert!(counted >= 1.0, "refusals counted: {counted}");
    proxy.shutdown().await;
    h.stop().await;
}
