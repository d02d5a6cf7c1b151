//! The Grafana dashboard (`deploy/grafana/latch-proxies.json`) against a real Prometheus
//! (Debian's `prometheus`) scraping a running mesh: latch-control, a server proxy allowing one
//! caller, that caller, an intruder on HBONE that the server denies, and an `openssl s_client`
//! without a certificate. Every query of every panel must return data, with Grafana's
//! variables replaced as Grafana would. Grafana itself does not run here (not packaged for
//! Debian); Prometheus is what evaluates the queries.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use latch_testkit::Child;
use latch_testkit::apps::{call_blocking, echo_app};
use latch_testkit::binaries::workspace_root;
use latch_testkit::net::free_loopback;
use latch_testkit::processes::{ControlProcess, ProxySpec};
use latch_testkit::spiffe_id;

const REQUIRE_ENV: &str = "LATCH_REQUIRE_PROMETHEUS";

/// Prometheus, when installed.
fn prometheus() -> Option<&'static str> {
    let binary = "/usr/bin/prometheus";
    if Path::new(binary).is_file() {
        return Some(binary);
    }
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but {binary} is missing (apt-get install prometheus)");
    }
    latch_testkit::skip::skipped(&format!(
        "needs Prometheus (apt-get install prometheus); set {REQUIRE_ENV}=1 to fail instead"
    ));
    None
}

/// Runs `query` on Prometheus at `addr`; the result vector.
fn query(addr: &str, query: &str) -> Vec<serde_json::Value> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-G"])
        .arg(format!("http://{addr}/api/v1/query"))
        .arg("--data-urlencode")
        .arg(format!("query={query}"))
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    let answer: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("Prometheus answered {body:?} to {query:?}: {e}"));
    assert_eq!(answer["status"], "success", "{query}: {answer}");
    answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Every panel's title and queries, with Grafana's interval variables as Grafana would set
/// them for a 5-minute range scraped every second.
fn panel_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("a panel title").to_string();
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title}: the data source is the dashboard's variable"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let expr = expr
                .replace("$__rate_interval", "30s")
                .replace("$__range", "5m");
            assert!(!expr.contains('$'), "{title}: unknown variable in {expr}");
            queries.push((title.clone(), expr));
        }
    }
    queries
}

#[test]
fn every_dashboard_panel_returns_data_from_a_real_prometheus() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("deploy/grafana/latch-proxies.json"))
            .expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let queries = panel_queries(&dashboard);
    let Some(prometheus) = prometheus() else {
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut control = ControlProcess::new(dir, &dir.join("data"));
    let _control = control.start();
    let app_port = echo_app("127.0.0.1", "server");
    let mut server = ProxySpec::new("server", "1h");
    server.flags = vec!["--allow".into(), spiffe_id("client")];
    let mut client = ProxySpec::new("client", "1h");
    let mut intruder = ProxySpec::new("intruder", "1h");
    intruder.flags.push("--hbone".into());
    let entry = client.to(&server, app_port);
    let intruder_entry = intruder.to(&server, app_port);
    let proxies = [
        server.start(&control, dir),
        client.start(&control, dir),
        intruder.start(&control, dir),
    ];

    // Prometheus scraping the three proxies every second.
    let web = free_loopback();
    let targets: Vec<String> = [&server, &client, &intruder]
        .iter()
        .map(|p| format!("'{}'", p.admin))
        .collect();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: latch-proxy\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let mut command = Command::new(prometheus);
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"));
    let mut prometheus =
        Child::spawn("prometheus", command, &dir.join("prometheus.log")).expect("prometheus");
    let deadline = Instant::now() + Duration::from_secs(60);
    while query_up(&web) < 3 {
        prometheus.assert_running();
        assert!(
            Instant::now() < deadline,
            "Prometheus does not scrape the three proxies\n{}",
            prometheus.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Traffic of every kind the panels show: carried, denied (the intruder's HBONE streams,
    // refused by the peer), and a handshake without a client certificate.
    for i in 0..20 {
        assert_eq!(
            call_blocking(&entry, &format!("hello {i}")).as_deref(),
            Ok(format!("server: hello {i}").as_str())
        );
        assert!(call_blocking(&intruder_entry, "let me in").is_err());
    }
    let handshake = Command::new("openssl")
        .args(["s_client", "-connect", &server.inbound, "-tls1_3"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    drop(handshake);

    // Every panel has data once a few scrapes have seen the new series.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        missing = queries
            .iter()
            .filter(|(_, expr)| query(&web, expr).is_empty())
            .collect();
        if missing.is_empty() {
            break;
        }
    }
    assert!(
        missing.is_empty(),
        "panels without data: {missing:#?}\n{}",
        proxies.iter().map(Child::logs).collect::<String>()
    );
    // And the data says what happened: the intruder denied, the client not.
    let denied = query(
        &web,
        "sum by (peer) (latch_proxy_authorization_denials_total)",
    );
    let peers: Vec<&str> = denied
        .iter()
        .filter_map(|s| s["metric"]["peer"].as_str())
        .collect();
    assert_eq!(peers, [spiffe_id("intruder").as_str()], "{denied:?}");
}

/// How many scrape targets Prometheus at `addr` sees up.
fn query_up(addr: &str) -> usize {
    let Ok(out) = Command::new("curl")
        .args(["-sS", "--max-time", "2", "-G"])
        .arg(format!("http://{addr}/api/v1/query"))
        .args(["--data-urlencode", "query=up == 1"])
        .output()
    else {
        return 0;
    };
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["data"]["result"].as_array().map(Vec::len))
        .unwrap_or(0)
}
