//! Fault injection (docs/reliability.md, "Faults"), kill -9: of the real control plane under load (no request and no
//! state lost, proxies reconnect and renew) and of a transparent proxy in a network namespace
//! (the app's connections fail fast and recover on restart); prints the numbers
//! docs/reliability.md reports. The namespace test needs root; it skips without (fails with
//! LATCH_REQUIRE_NETNS=1, as CI sets).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use latch_identity::bundle::sha256_hex;
use latch_testkit::Child;
use latch_testkit::admin::{get_blocking, is_ready, metric_blocking, request_blocking};
use latch_testkit::apps::{Load, call_blocking, echo_app};
use latch_testkit::netns::{
    PROXY_ADMIN, Pod, PodControlPlane, PodProcess, TestNet, logs, require_netns,
};
use latch_testkit::processes::{ControlProcess, ProxySpec};
use latch_testkit::{spiffe_id, wait_for};

#[test]
fn control_plane_kill_9_under_load_loses_no_request_and_no_state() {
    let dir = tempfile::Builder::new()
        .prefix("lf-kill-cp-")
        .tempdir()
        .expect("dir");
    let mut control = ControlProcess::new(dir.path(), &dir.path().join("data"));
    let mut process = control.start();
    let app = echo_app("127.0.0.1", "server");
    // Short SVIDs (renewed every ~6 s) so renewals span the outage and follow the restart.
    let server = ProxySpec::new("server", "12s");
    let mut client = ProxySpec::new("client", "12s");
    let entry = client.to(&server, app);
    let server_proxy = server.start(&control, dir.path());
    let client_proxy = client.start(&control, dir.path());
    let logs = |process: &Child| {
        format!(
            "{}\n{}\n{}",
            process.logs(),
            server_proxy.logs(),
            client_proxy.logs()
        )
    };
    assert_eq!(
        call_blocking(&entry, "hello").as_deref(),
        Ok("server: hello"),
        "{}",
        logs(&process)
    );

    // What must survive: the root, the bundle, the admin credential, and the join tokens (one
    // unused single-use token, and every token the API confirms while the kill happens).
    let root_cert = std::fs::read(control.data_dir.join("ca/root.crt.pem")).expect("root");
    let root_key = std::fs::read(control.data_dir.join("ca/root.key.pem")).expect("key");
    let bundle = std::fs::read(control.bundle()).expect("bundle");
    let credential = std::fs::read(control.data_dir.join("admin.token")).expect("credential");
    let unused = control.create_token("spare", false).expect("token");

    let load = Load::start(&[(entry.clone(), "server")], 2);
    let stop_tokens = Arc::new(AtomicBool::new(false));
    let tokens = token_creator(&control, stop_tokens.clone());
    std::thread::sleep(Duration::from_secs(1));
    let metric_of = |admin: &str, name: &str| metric_blocking(admin, name, &[]);
    let reconnects = |p: &ProxySpec| metric_of(&p.admin, "latch_proxy_discovery_reconnects");
    let rotations = |p: &ProxySpec| metric_of(&p.admin, "latch_proxy_svid_rotations_total");
    let reconnects_before = (reconnects(&server), reconnects(&client));

    process.kill9();
    let killed_at = Instant::now();
    let ok_at_kill = load.ok();
    std::thread::sleep(Duration::from_secs(2));
    let ok_while_down = load.ok() - ok_at_kill;
    let rotations_at_restart = (rotations(&server), rotations(&client));
    let mut process = control.start();
    let restarted_after = killed_at.elapsed();

    // Both proxies reconnect discovery to the new process and renew their SVIDs through it.
    let resynced = wait_for(Duration::from_secs(20), || {
        reconnects(&server) > reconnects_before.0
            && reconnects(&client) > reconnects_before.1
            && metric_of(&server.admin, "latch_proxy_discovery_connected") == 1.0
            && metric_of(&client.admin, "latch_proxy_discovery_connected") == 1.0
    });
    assert!(
        resynced,
        "the proxies did not reconnect\n{}",
        logs(&process)
    );
    let reconnected_after = killed_at.elapsed();
    let renewed = wait_for(Duration::from_secs(20), || {
        rotations(&server) > rotations_at_restart.0
            && rotations(&client) > rotations_at_restart.1
            && metric_blocking(
                &control.admin,
                "latch_control_svids_issued_total",
                &["renewal"],
            ) >= 2.0
    });
    assert!(
        renewed,
        "no SVID renewal after the restart\n{}",
        logs(&process)
    );
    let renewed_after = killed_at.elapsed();
    assert!(
        is_ready(&server.admin) && is_ready(&client.admin),
        "{}",
        logs(&process)
    );
    std::thread::sleep(Duration::from_millis(500));
    stop_tokens.store(true, Ordering::Relaxed);
    let (created, token_failures) = tokens.join().expect("token thread");
    let (ok, errors) = load.finish();

    assert!(
        errors.is_empty(),
        "{} exchanges failed: {errors:?}\n{}",
        errors.len(),
        logs(&process)
    );
    assert!(
        ok_while_down > 0,
        "no traffic while the control plane was down"
    );
    assert!(ok > 100, "too little traffic to mean anything: {ok}");

    // Nothing lost: CA, bundle and credential untouched; every confirmed token is on disk and
    // works; the spare single-use token was not spent by the crash and works once.
    assert_eq!(
        std::fs::read(control.data_dir.join("ca/root.crt.pem")).expect("root"),
        root_cert
    );
    assert_eq!(
        std::fs::read(control.data_dir.join("ca/root.key.pem")).expect("key"),
        root_key
    );
    assert_eq!(std::fs::read(control.bundle()).expect("bundle"), bundle);
    assert_eq!(
        std::fs::read(control.data_dir.join("admin.token")).expect("cred"),
        credential
    );
    let recorded = recorded_token_hashes(&control.data_dir);
    let missing: Vec<&String> = created
        .iter()
        .filter(|t| !recorded.contains(&sha256_hex(t.as_bytes())))
        .collect();
    assert!(!created.is_empty(), "no token was created around the kill");
    assert!(
        missing.is_empty(),
        "{} confirmed tokens lost: {missing:?}",
        missing.len()
    );
    let last = created.last().expect("a token");
    control
        .request_cert(last, &dir.path().join("last"))
        .expect("the last token confirmed before/after the kill works");
    control
        .request_cert(&unused, &dir.path().join("spare"))
        .expect("the unused single-use token survived the kill");
    assert!(
        control
            .request_cert(&unused, &dir.path().join("spare2"))
            .is_err(),
        "a single-use token worked twice"
    );
    let control_ready = get_blocking(&control.admin, "/ready").expect("admin answers");
    assert_eq!(control_ready.0, 200, "{}", control_ready.1);
    process.kill9();
    println!(
        "kill -9 of latch-control under load: {ok} exchanges, {} failed ({ok_while_down} while it \
         was down for 2 s); restarted {:.1} s after the kill, both proxies reconnected {:.1} s \
         and renewed {:.1} s after it; {} join tokens confirmed around the kill ({} attempts \
         refused while down), all on disk",
        errors.len(),
        restarted_after.as_secs_f64(),
        reconnected_after.as_secs_f64(),
        renewed_after.as_secs_f64(),
        created.len(),
        token_failures
    );
}

/// The SHA-256 hashes of the join tokens recorded in `<data_dir>/join-tokens.json`.
fn recorded_token_hashes(data_dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(data_dir.join("join-tokens.json")).expect("token state");
    let state: serde_json::Value = serde_json::from_str(&text).expect("token state is JSON");
    state["tokens"]
        .as_object()
        .map(|tokens| tokens.keys().cloned().collect())
        .unwrap_or_default()
}

/// Creates join tokens back to back through the admin API until stopped; the tokens the API
/// confirmed (201) and how many attempts failed.
fn token_creator(
    control: &ControlProcess,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, u64)> {
    let admin = control.admin.clone();
    let credential = control.admin_token();
    let body = format!(
        r#"{{"spiffe_id":"{}","ttl_seconds":3600}}"#,
        spiffe_id("later")
    );
    std::thread::spawn(move || {
        let (mut created, mut failed) = (Vec::new(), 0);
        while !stop.load(Ordering::Relaxed) {
            match request_blocking(&admin, "POST", "/v1/join-tokens", Some(&credential), &body) {
                Ok((201, json)) => {
                    let value: serde_json::Value =
                        serde_json::from_str(&json).expect("token answer is JSON");
                    created.push(value["token"].as_str().expect("token").to_string());
                }
                _ => {
                    failed += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        (created, failed)
    })
}

/// The connect timeout the app (curl) uses: a fault must surface well before it.
const APP_CONNECT_TIMEOUT_SECS: u64 = 5;

/// A transparent latch-proxy in `pod` from `dir` (reusable join token), `peer` as a
/// flag-configured meshed peer, started and waited for until /ready; returns it and how long
/// it took to become ready.
fn start_pod_proxy<'n>(
    control: &PodControlPlane<'n>,
    pod: &Pod<'n>,
    peer: &Pod,
    dir: &Path,
) -> (PodProcess<'n>, Duration) {
    // Each start logs to its own file, so a restarted proxy's log is its own.
    static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let log = format!("proxy-{}.log", STARTS.fetch_add(1, Ordering::Relaxed));
    let started = Instant::now();
    let proxy = control.run_proxy(pod, dir, Some(peer), &[], &log);
    (proxy, started.elapsed())
}

/// curl from `pod` with the app's connect timeout: Ok(body) or Err(curl's exit code and
/// message), and how long it took.
fn timed_curl(pod: &Pod, url: &str) -> (Result<String, String>, Duration) {
    let started = Instant::now();
    let timeout = APP_CONNECT_TIMEOUT_SECS.to_string();
    let out = pod.exec(
        "curl",
        &[
            "-sS",
            "-f",
            "--connect-timeout",
            &timeout,
            "--max-time",
            "10",
            url,
        ],
    );
    let elapsed = started.elapsed();
    let result = if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "exit {}: {}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    };
    (result, elapsed)
}

/// Polls `url` from `pod` until it answers `body`; how long that took.
fn until_served(pod: &Pod, url: &str, body: &str, logs: impl Fn() -> String) -> Duration {
    let started = Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || pod.curl(url).as_deref()
            == Ok(body)),
        "{url} never served again from {}\n{}",
        pod.name,
        logs()
    );
    started.elapsed()
}

#[test]
fn proxy_kill_9_fails_the_apps_connections_fast_and_they_recover_on_restart() {
    if !require_netns() {
        return;
    }
    const BODY: &str = "served by b through the mesh";
    let net = TestNet::new("lf-kill");
    let a = net.add_pod("a");
    let b = net.add_pod("b");
    let nginx = b.start_nginx(BODY);

    // latch-control in the router namespace; each pod gets a reusable join token (a restarted
    // proxy authenticates again with it) and the bundle.
    let control = PodControlPlane::start(&net);
    let dirs = [control.proxy_dir(&a, true), control.proxy_dir(&b, true)];
    let (proxy_a, _) = start_pod_proxy(&control, &a, &b, &dirs[0]);
    let (proxy_b, _) = start_pod_proxy(&control, &b, &a, &dirs[1]);
    for pod in [&a, &b] {
        control.capture(pod);
    }
    let url = format!("http://{}/", b.ip());
    assert_eq!(
        a.curl(&url).as_deref(),
        Ok(BODY),
        "{}",
        logs(&[&proxy_a, &proxy_b, &nginx])
    );

    // kill -9 of a's proxy: a's connections are still captured, to a port nobody listens on.
    let pid = proxy_a.pid();
    drop(proxy_a); // SIGKILL, by PID
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "a's proxy survived SIGKILL"
    );
    let (outbound, outbound_took) = timed_curl(&a, &url);
    let outbound_error = outbound.expect_err("a reached b with its proxy dead");
    assert!(
        outbound_took < Duration::from_secs(APP_CONNECT_TIMEOUT_SECS),
        "a's app waited {outbound_took:?} to learn its proxy is gone: {outbound_error}"
    );
    let restarted = Instant::now();
    let (proxy_a, a_ready_in) = start_pod_proxy(&control, &a, &b, &dirs[0]);
    let a_served_in = until_served(&a, &url, BODY, || logs(&[&proxy_a, &proxy_b]));
    let a_recovered_in = restarted.elapsed();

    // kill -9 of b's proxy: a's proxy finds nobody on b's mesh port and closes a's connection.
    drop(proxy_b);
    let (inbound, inbound_took) = timed_curl(&a, &url);
    let inbound_error = inbound.expect_err("a reached b with b's proxy dead");
    assert!(
        inbound_took < Duration::from_secs(APP_CONNECT_TIMEOUT_SECS),
        "a's app waited {inbound_took:?} for b's dead proxy: {inbound_error}"
    );
    let restarted = Instant::now();
    let (proxy_b, b_ready_in) = start_pod_proxy(&control, &b, &a, &dirs[1]);
    until_served(&a, &url, BODY, || logs(&[&proxy_a, &proxy_b]));
    let b_recovered_in = restarted.elapsed();
    assert!(a.curl(&format!("http://{PROXY_ADMIN}/ready")).is_ok());
    assert!(b.curl(&format!("http://{PROXY_ADMIN}/ready")).is_ok());
    println!(
        "kill -9 of a's proxy: a's request failed after {:.0} ms ({outbound_error}); restarted \
         proxy ready in {:.1} s, a served again {:.1} s after the restart ({:.2} s after ready). \
         kill -9 of b's proxy: a's request failed after {:.0} ms ({inbound_error}); restarted \
         proxy ready in {:.1} s, a served again {:.1} s after the restart",
        outbound_took.as_secs_f64() * 1000.0,
        a_ready_in.as_secs_f64(),
        a_recovered_in.as_secs_f64(),
        a_served_in.as_secs_f64(),
        inbound_took.as_secs_f64() * 1000.0,
        b_ready_in.as_secs_f64(),
        b_recovered_in.as_secs_f64(),
    );
}
