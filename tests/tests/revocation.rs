//! Revocation end to end with the real binaries (issue 18): latch-control, two latch-proxy
//! processes with an echo app behind the server, `latchctl identity revoke`. The revoked
//! client's open connection is closed within a second, new ones fail, its SVID cannot be
//! renewed nor its old token used, all of it across a control-plane restart, and the workload
//! works again once registered with a new token.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use latch_identity::client::{CaClient, control_plane_id};
use latch_identity::{CertStore, ExpectedPeer, Svid, TrustBundle, TrustDomain};
use latch_testkit::apps::{call_blocking, echo_app};
use latch_testkit::binaries::{latchctl, outcome};
use latch_testkit::processes::{ControlProcess, ProxySpec};
use latch_testkit::spiffe_id;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

fn bundle(control: &ControlProcess) -> TrustBundle {
    TrustBundle::from_pem(&std::fs::read(control.bundle()).expect("bundle")).expect("bundle PEM")
}

/// A CA client of `control`, presenting `svid` when given.
async fn ca_client(control: &ControlProcess, svid: Option<Svid>) -> CaClient {
    let present = svid.is_some();
    let store = Arc::new(match svid {
        Some(svid) => CertStore::with_svid(svid, bundle(control)),
        None => CertStore::new(bundle(control)),
    });
    let expected = ExpectedPeer::Exactly(control_plane_id(
        &TrustDomain::new(latch_testkit::TRUST_DOMAIN).unwrap(),
    ));
    CaClient::connect(&control.grpc, store, expected, present)
        .await
        .expect("connects to the control plane")
}

/// `latchctl identity <args>` against `control`; Ok(stdout) or Err(stderr).
fn identity(control: &ControlProcess, args: &[&str]) -> Result<String, String> {
    let data_dir = control.data_dir.to_str().expect("utf-8 path");
    let mut all = vec!["identity"];
    all.extend_from_slice(args);
    all.extend(["--admin", &control.admin, "--data-dir", data_dir]);
    outcome(&latchctl(&all))
}

/// Asserts that renewing `svid` and using `token` are both refused as revoked.
fn assert_refused_as_revoked(control: &ControlProcess, svid: &Svid, token: &str) {
    let svid = Svid::new(svid.chain().to_vec(), svid.private_key().clone_key()).unwrap();
    runtime().block_on(async {
        let renewal = ca_client(control, Some(svid))
            .await
            .fetch_svid(None, None, None)
            .await;
        let err = renewal.expect_err("a revoked SVID renewed").to_string();
        assert!(
            err.contains("PermissionDenied") && err.contains("was revoked at"),
            "{err}"
        );
        let by_token = ca_client(control, None)
            .await
            .fetch_svid(None, None, Some(token.to_string()))
            .await;
        let err = by_token
            .expect_err("a token older than the revocation worked")
            .to_string();
        assert!(
            err.contains("was revoked at") && err.contains("register the workload again"),
            "{err}"
        );
    });
}

#[test]
fn a_revoked_identity_is_cut_off_within_a_second_and_comes_back_registered_again() {
    revoked_client_cut_off_and_back(false);
}

/// The same with the client's connections carried as HBONE streams: the revocation closes the
/// stream, and a new stream on the tunnel is refused.
#[test]
fn a_revoked_client_is_cut_off_per_hbone_stream_and_comes_back_registered_again() {
    revoked_client_cut_off_and_back(true);
}

fn revoked_client_cut_off_and_back(hbone: bool) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut control = ControlProcess::new(dir, &dir.join("data"));
    let control_process = control.start();
    let app_port = echo_app("127.0.0.1", "server");
    let server = ProxySpec::new("server", "1h");
    let mut client = ProxySpec::new("client", "1h");
    if hbone {
        client.flags.push("--hbone".into());
    }
    let entry = client.to(&server, app_port);
    let _server_proxy = server.start(&control, dir);
    let mut client_proxy = client.start(&control, dir);
    assert_eq!(
        call_blocking(&entry, "hello").as_deref(),
        Ok("server: hello")
    );

    // Credentials of the client's identity from before the revocation: an SVID and a token.
    let old_token = control.create_token("client", true).unwrap();
    let old_svid = runtime().block_on(async {
        let mut ca = ca_client(&control, None).await;
        ca.fetch_svid(None, None, Some(old_token.clone()))
            .await
            .expect("SVID before the revocation")
            .0
    });

    // A live connection through both proxies.
    let mut live = std::net::TcpStream::connect(&entry).unwrap();
    live.write_all(b"ping").unwrap();
    let mut buf = [0u8; 64];
    let n = live.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"server: ping");

    let listed = identity(&control, &["list"]).unwrap();
    assert!(
        listed.contains(&spiffe_id("client")) && listed.contains("join_token"),
        "{listed}"
    );
    let revoked = identity(
        &control,
        &[
            "revoke",
            "--spiffe-id",
            &spiffe_id("client"),
            "--reason",
            "key leaked",
        ],
    )
    .unwrap_or_else(|e| panic!("latchctl identity revoke: {e}"));
    let revoked_at = Instant::now();
    assert!(revoked.contains("key leaked"), "{revoked}");

    // The open connection is closed: EOF (or a reset) well within a second.
    live.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let closed = match live.read(&mut buf) {
        Ok(0) | Err(_) => revoked_at.elapsed(),
        Ok(n) => panic!("the connection is still open: {:?}", &buf[..n]),
    };
    eprintln!("open connection closed {closed:?} after `latchctl identity revoke` returned");
    assert!(
        closed < Duration::from_secs(1),
        "closed only after {closed:?}\n{}",
        client_proxy.logs()
    );
    let refused = call_blocking(&entry, "again");
    assert!(
        refused.is_err(),
        "a new connection got through: {refused:?}"
    );
    assert_refused_as_revoked(&control, &old_svid, &old_token);

    // A restart of the control plane keeps the revocation.
    drop(control_process);
    let _control_process = control.start();
    let listed = identity(&control, &["revocations"]).unwrap();
    assert!(listed.contains(&spiffe_id("client")), "{listed}");
    assert_refused_as_revoked(&control, &old_svid, &old_token);
    let refused = call_blocking(&entry, "after the restart");
    assert!(
        refused.is_err(),
        "got through after the restart: {refused:?}"
    );

    // Registered again: a new token, a new SVID, and traffic flows.
    drop(client_proxy);
    std::fs::remove_file(dir.join("client.token")).unwrap();
    client_proxy = client.start(&control, dir);
    let answer = call_blocking(&entry, "back");
    assert_eq!(
        answer.as_deref(),
        Ok("server: back"),
        "{}",
        client_proxy.logs()
    );
    assert_logs_name(dir, "revocations from the control plane installed");
}

/// Asserts that some proxy log in `dir` contains `line`.
fn assert_logs_name(dir: &Path, line: &str) {
    let logs: String = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("proxy-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(logs.contains(line), "no proxy logged {line:?}:\n{logs}");
}

#[test]
fn revoking_a_server_closes_the_connections_clients_hold_to_it() {
    revoked_server_cut_off(false);
}

/// The same over HBONE: the client closes its streams to the revoked server, and a new
/// connection is refused although the tunnel to it is still open.
#[test]
fn revoking_a_server_closes_the_hbone_streams_clients_hold_to_it() {
    revoked_server_cut_off(true);
}

fn revoked_server_cut_off(hbone: bool) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut control = ControlProcess::new(dir, &dir.join("data"));
    let _control_process = control.start();
    let app_port = echo_app("127.0.0.1", "server");
    let server = ProxySpec::new("server", "1h");
    let mut client = ProxySpec::new("client", "1h");
    if hbone {
        client.flags.push("--hbone".into());
    }
    let entry = client.to(&server, app_port);
    let _server_proxy = server.start(&control, dir);
    let client_proxy = client.start(&control, dir);

    let mut live = std::net::TcpStream::connect(&entry).unwrap();
    live.write_all(b"ping").unwrap();
    let mut buf = [0u8; 64];
    let n = live.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"server: ping");

    identity(
        &control,
        &[
            "revoke",
            "--spiffe-id",
            &spiffe_id("server"),
            "--reason",
            "host compromised",
        ],
    )
    .unwrap_or_else(|e| panic!("latchctl identity revoke: {e}"));
    let revoked_at = Instant::now();

    // The server's own proxy has nothing against its client; the client's proxy closes the
    // connection to the revoked server.
    live.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let closed = match live.read(&mut buf) {
        Ok(0) | Err(_) => revoked_at.elapsed(),
        Ok(n) => panic!("the connection is still open: {:?}", &buf[..n]),
    };
    eprintln!("connection to the revoked server closed {closed:?} after the revocation");
    assert!(
        closed < Duration::from_secs(1),
        "closed only after {closed:?}\n{}",
        client_proxy.logs()
    );
    assert!(
        client_proxy.logs().contains(&format!(
            "the server {} was revoked at",
            spiffe_id("server")
        )),
        "{}",
        client_proxy.logs()
    );
    let refused = call_blocking(&entry, "again");
    assert!(
        refused.is_err(),
        "a new connection reached the revoked server: {refused:?}"
    );
}
