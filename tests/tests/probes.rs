//! Kubelet probes of a meshed app (issue 21): the app's pod behind a STRICT transparent proxy,
//! a "kubelet" in another network namespace without a proxy probing the pod IP in plaintext the
//! way the kubelet does. The probe as the app wrote it is refused by capture; the probe as
//! injection rewrote it (`/app-health/<container>/<kind>` on the admin port, the original in
//! `--app-probes`) answers 200 while nginx serves and fails as soon as nginx is stopped. Needs
//! root (see crates/testkit/src/netns.rs).

use std::time::{Duration, Instant};

use latch_testkit::netns::{Pod, PodControlPlane, TestNet, logs, require_netns};

#[test]
fn rewritten_probes_report_the_apps_health_under_strict_capture() {
    if !require_netns() {
        return;
    }
    let net = TestNet::new("probe");
    let app = net.add_pod("app");
    let kubelet = net.add_pod("kubelet");
    let mut nginx = app.start_nginx("healthy");
    let control = PodControlPlane::start(&net);
    // What `latchctl inject` puts into latch.dev/app-probes for an httpGet readiness probe
    // with a header and a tcpSocket liveness probe of port 80.
    let probes = r#"{"app/readiness":{"httpGet":{"path":"/healthz","port":80,"httpHeaders":[{"name":"X-Probe","value":"readiness"}]},"timeoutSeconds":1},"app/liveness":{"tcpSocket":{"port":80}}}"#;
    let proxy = control.start_proxy(&app, None, &["--app-probes", probes]);
    control.capture(&app);
    let url = |path: &str| Pod::url(app.ip(), 15020).trim_end_matches('/').to_string() + path;

    // As written, the plaintext probe of the app port is refused under STRICT: a pod that
    // would never turn Ready.
    let direct = kubelet.curl(&Pod::url(app.ip(), 80));
    assert!(direct.is_err(), "STRICT let plaintext through: {direct:?}");

    // Rewritten: 200 from the proxy, which probed nginx on loopback.
    for path in ["/app-health/app/readiness", "/app-health/app/liveness"] {
        assert_eq!(
            kubelet.curl(&url(path)).as_deref(),
            Ok("ok\n"),
            "{path}\n{}",
            logs(&[&proxy, &nginx])
        );
    }
    assert!(
        nginx.log().contains("GET /healthz HTTP/1.1"),
        "nginx saw the original probe path: {}",
        nginx.log()
    );
    // A probe that was not configured is not answered, nor is anything else under the prefix.
    let unknown = kubelet.curl(&url("/app-health/other/readiness"));
    assert!(
        unknown.as_ref().is_err_and(|e| e.contains("404")),
        "{unknown:?}"
    );

    // nginx stops: the next probe fails (each probe asks the app at once, so well within one
    // kubelet period).
    assert!(nginx.interrupt(Duration::from_secs(5)), "nginx stops");
    let stopped = Instant::now();
    let readiness = kubelet.curl(&url("/app-health/app/readiness"));
    let liveness = kubelet.curl(&url("/app-health/app/liveness"));
    eprintln!(
        "probes after nginx stopped, {:?} later: {readiness:?} / {liveness:?}",
        stopped.elapsed()
    );
    assert!(
        readiness.as_ref().is_err_and(|e| e.contains("503")),
        "{readiness:?}"
    );
    assert!(
        liveness.as_ref().is_err_and(|e| e.contains("503")),
        "the TCP probe no longer succeeds for a dead app: {liveness:?}"
    );
}
