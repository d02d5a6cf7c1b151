//! Root CA rotation without downtime, end to end: a control plane and two proxies on loopback
//! with short SVID lifetimes, steady traffic between them, and `latchctl ca rotate
//! prepare|activate|retire` run as an operator would. Every request must succeed throughout;
//! the new root reaches both proxies before it signs anything; leaves of the old and the new
//! root meet on the same connection path; the old root leaves only after the longest leaf
//! lifetime has passed since activation.

use std::time::{Duration, Instant};

use latch_control::ca::TtlPolicy;
use latch_identity::{PeerRole, TrustBundle};
use latch_testkit::Harness;
use latch_testkit::apps::{Load, echo_app};
use latch_testkit::binaries::{latchctl as latchctl_binary, outcome};
use latch_testkit::loopback_mesh::{Member, free_port, start_member_with_ttl, workloads_yaml};
use latch_testkit::until;
use rustls_pki_types::CertificateDer;
use serde_json::Value;

/// Runs `latchctl ca <args>` against the harness; stdout (JSON) or stderr.
fn latchctl(harness: &Harness, args: &[&str]) -> Result<String, String> {
    let admin = harness.control_plane.admin_addr.to_string();
    let data_dir = harness.control_data_dir().to_str().expect("utf-8 path");
    let mut all = vec!["ca"];
    all.extend_from_slice(args);
    all.extend(["--admin", &admin, "--data-dir", data_dir]);
    outcome(&latchctl_binary(&all))
}

fn latchctl_json(harness: &Harness, args: &[&str]) -> Value {
    let text =
        latchctl(harness, args).unwrap_or_else(|e| panic!("latchctl ca {args:?} failed: {e}"));
    serde_json::from_str(&text).expect("latchctl prints JSON")
}

/// Whether `proxy`'s current SVID chains to `root`.
fn signed_by(proxy: &latch_proxy::Proxy, root: &CertificateDer<'static>) -> bool {
    let svid = proxy.agent.store().svid().expect("proxy has an SVID");
    let only = TrustBundle::new(vec![root.clone()]).expect("bundle");
    latch_identity::verify_svid(
        svid.chain(),
        &only,
        std::time::SystemTime::now(),
        PeerRole::Client,
    )
    .is_ok()
}

fn bundle_of(proxy: &latch_proxy::Proxy) -> Vec<CertificateDer<'static>> {
    proxy.agent.store().bundle().roots().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_under_load_without_a_failed_request() {
    let client = Member {
        name: "client",
        ip: "127.0.0.51",
        mesh_port: free_port("127.0.0.51"),
    };
    let server = Member {
        name: "server",
        ip: "127.0.0.52",
        mesh_port: free_port("127.0.0.52"),
    };
    // Leaves live at most 30 s, so the old root may be retired 30 s after activation.
    let max_ttl = Duration::from_secs(30);
    let harness = Harness::start_with_mesh_and(&workloads_yaml(&[&client, &server]), |config| {
        config.ttl = TtlPolicy {
            default: Duration::from_secs(4),
            max: max_ttl,
        };
    })
    .await;
    let app_port = echo_app(server.ip, "server");
    // The server's leaf lives 30 s and is renewed 15 s after it arrives; the client's lives
    // 4 s. After the activation, which follows within seconds, the client soon presents a
    // leaf of the new root while the server still presents one of the old.
    let server_proxy = start_member_with_ttl(&harness, &server, &[], Some(max_ttl)).await;
    let client_proxy = start_member_with_ttl(
        &harness,
        &client,
        &[format!("127.0.0.51:0={}:{app_port}", server.ip)],
        Some(Duration::from_secs(4)),
    )
    .await;
    let load = Load::start(&[(client_proxy.explicit_addrs[0].to_string(), "server")], 1);

    let status = latchctl_json(&harness, &["status"]);
    assert_eq!(status["rotation"]["phase"], "idle");
    let old_root = harness.bundle().roots()[0].clone();

    // prepare: the new root reaches both proxies' bundles; nobody holds a leaf of it.
    let prepared = latchctl_json(&harness, &["rotate", "prepare"]);
    assert_eq!(prepared["rotation"]["phase"], "prepared");
    let bundle = harness.bundle();
    assert_eq!(bundle.roots().len(), 2);
    let new_root = bundle.roots()[1].clone();
    until(
        "both proxies trust the new root",
        Duration::from_secs(30),
        || {
            bundle_of(&server_proxy).contains(&new_root)
                && bundle_of(&client_proxy).contains(&new_root)
        },
    )
    .await;
    assert!(signed_by(&server_proxy, &old_root) && signed_by(&client_proxy, &old_root));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = latchctl_json(&harness, &["status"]);
        if status["proxies_connected"] == 2
            && status["proxies_without_current_bundle"]
                .as_array()
                .is_some_and(Vec::is_empty)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proxies never acknowledged: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(signed_by(&server_proxy, &old_root) && signed_by(&client_proxy, &old_root));

    // activate: renewals bring leaves of the new root; the old and the new meet meanwhile.
    let activated = latchctl_json(&harness, &["rotate", "activate"]);
    assert_eq!(activated["rotation"]["phase"], "activated");
    let activated_at = Instant::now();
    let mut mixed_calls = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, c) = (
            signed_by(&server_proxy, &new_root),
            signed_by(&client_proxy, &new_root),
        );
        if s && c {
            break;
        }
        if s != c {
            let before = load.ok();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let still_mixed = signed_by(&server_proxy, &new_root) == s
                && signed_by(&client_proxy, &new_root) == c;
            if still_mixed && load.ok() > before {
                mixed_calls += load.ok() - before;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            Instant::now() < deadline,
            "proxies never renewed from the new root"
        );
    }
    assert!(
        mixed_calls > 0,
        "no request was seen between a leaf of the old root and one of the new"
    );

    // retire: refused before the longest leaf lifetime has passed since activation.
    let refusal =
        latchctl(&harness, &["rotate", "retire"]).expect_err("retire must be refused this early");
    assert!(
        refusal.contains("may still anchor live leaves until"),
        "{refusal}"
    );
    let wait = (max_ttl + Duration::from_secs(1)).saturating_sub(activated_at.elapsed());
    tokio::time::sleep(wait).await;
    let retired = latchctl_json(&harness, &["rotate", "retire"]);
    assert_eq!(retired["rotation"]["phase"], "idle");
    assert_eq!(harness.bundle().roots(), std::slice::from_ref(&new_root));
    until(
        "both proxies dropped the old root",
        Duration::from_secs(30),
        || {
            bundle_of(&server_proxy) == [new_root.clone()]
                && bundle_of(&client_proxy) == [new_root.clone()]
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (ok, errors) = load.stop().await;
    assert!(
        errors.is_empty(),
        "requests failed during the rotation: {errors:?}"
    );
    assert!(ok > 50, "too little traffic to mean anything: {ok}");
    println!(
        "root rotated under load: {ok} requests, 0 failed; {mixed_calls} requests between an \
         old-root and a new-root leaf"
    );
}
