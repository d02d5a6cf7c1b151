//! latchctl end to end against a control plane, with openssl as the outside judge of what the
//! CA issues: the chain verifies, the extensions are exactly the X509-SVID set, TTL one hour.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use latch_control::ControlPlane;

fn latchctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latchctl"))
        .args(args)
        .env_remove("LATCH_JOIN_TOKEN")
        .output()
        .expect("latchctl runs")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn openssl(args: &[&str]) -> String {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    stdout_of(&output)
}

async fn start(data_dir: &Path) -> ControlPlane {
    let config = latch_testkit::loopback_config(data_dir.to_path_buf());
    ControlPlane::start(config)
        .await
        .expect("control plane starts")
}

/// Unix seconds of an openssl `-startdate`/`-enddate` line, via `date`.
fn openssl_time(line: &str) -> i64 {
    let value = line.split_once('=').expect("key=value").1;
    let out = Command::new("date")
        .args(["-u", "-d", value, "+%s"])
        .output()
        .unwrap();
    stdout_of(&out).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn token_create_then_cert_request_yields_an_svid_openssl_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let cp = start(&data_dir).await;
    let admin = cp.admin_addr.to_string();
    let grpc = cp.grpc_addr.to_string();
    let data = data_dir.to_str().unwrap().to_string();
    let id = "spiffe://cluster.local/ns/demo/sa/web";

    let token = stdout_of(
        &tokio::task::spawn_blocking({
            let (admin, data) = (admin.clone(), data.clone());
            move || {
                latchctl(&[
                    "token",
                    "create",
                    "--spiffe-id",
                    id,
                    "--admin",
                    &admin,
                    "--data-dir",
                    &data,
                ])
            }
        })
        .await
        .unwrap(),
    );
    assert!(token.starts_with("latch-jt-"), "{token}");

    let out = dir.path().join("out");
    let out_str = out.to_str().unwrap().to_string();
    let bundle = cp.bundle_path.to_str().unwrap().to_string();
    let printed = stdout_of(
        &tokio::task::spawn_blocking({
            let (token, grpc, bundle, out_str) =
                (token.clone(), grpc.clone(), bundle.clone(), out_str.clone());
            move || {
                latchctl(&[
                    "cert",
                    "request",
                    "--token",
                    &token,
                    "--control-plane",
                    &grpc,
                    "--bundle",
                    &bundle,
                    "--out",
                    &out_str,
                ])
            }
        })
        .await
        .unwrap(),
    );
    assert!(printed.starts_with(id), "{printed}");

    let svid = out.join("svid.pem");
    let svid = svid.to_str().unwrap();
    let key_mode = std::fs::metadata(out.join("svid.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600, "private key must be 0600");

    // The chain verifies against the bundle file the control plane wrote.
    let verified = openssl(&[
        "verify",
        "-CAfile",
        out.join("bundle.pem").to_str().unwrap(),
        svid,
    ]);
    assert!(verified.ends_with(": OK"), "{verified}");

    // Exactly the X509-SVID extensions, with the right criticality and values.
    let text = openssl(&["x509", "-in", svid, "-noout", "-text"]);
    let extensions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("X509v3 ") && *l != "X509v3 extensions:")
        .collect();
    assert_eq!(
        extensions,
        vec![
            "X509v3 Authority Key Identifier:",
            "X509v3 Subject Alternative Name: critical",
            "X509v3 Key Usage: critical",
            "X509v3 Extended Key Usage:",
            "X509v3 Subject Key Identifier:",
            "X509v3 Basic Constraints: critical",
        ],
        "{text}"
    );
    let after = |header: &str| -> String {
        let mut lines = text.lines().map(str::trim);
        lines.find(|l| l.starts_with(header)).unwrap();
        lines.next().unwrap().to_string()
    };
    assert_eq!(
        after("X509v3 Subject Alternative Name"),
        format!("URI:{id}")
    );
    assert_eq!(after("X509v3 Key Usage"), "Digital Signature");
    assert_eq!(
        after("X509v3 Extended Key Usage"),
        "TLS Web Server Authentication, TLS Web Client Authentication"
    );
    assert_eq!(after("X509v3 Basic Constraints"), "CA:FALSE");
    // AKI is the root's SKI.
    let root_text = openssl(&["x509", "-in", &bundle, "-noout", "-text"]);
    let root_ski = {
        let mut lines = root_text.lines().map(str::trim);
        lines
            .find(|l| l.starts_with("X509v3 Subject Key Identifier"))
            .unwrap();
        lines.next().unwrap().to_string()
    };
    assert_eq!(after("X509v3 Authority Key Identifier"), root_ski);

    // TTL one hour: NotAfter - NotBefore = 1 h + the 5 min backdate (for clock skew).
    let start = openssl_time(&openssl(&["x509", "-in", svid, "-noout", "-startdate"]));
    let end = openssl_time(&openssl(&["x509", "-in", svid, "-noout", "-enddate"]));
    assert_eq!(end - start, 3600 + 300);

    // The token was single-use: a second request is refused with an actionable message.
    let again = tokio::task::spawn_blocking(move || {
        latchctl(&[
            "cert",
            "request",
            "--token",
            &token,
            "--control-plane",
            &grpc,
            "--bundle",
            &bundle,
            "--out",
            &out_str,
        ])
    })
    .await
    .unwrap();
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already used"), "{stderr}");
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_create_needs_the_admin_credential() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("data")).await;
    let admin = cp.admin_addr.to_string();
    let wrong_dir = dir.path().join("elsewhere");
    std::fs::create_dir_all(&wrong_dir).unwrap();
    std::fs::write(wrong_dir.join("admin.token"), "not-the-credential\n").unwrap();
    let output = tokio::task::spawn_blocking(move || {
        latchctl(&[
            "token",
            "create",
            "--spiffe-id",
            "spiffe://cluster.local/ns/a/sa/b",
            "--admin",
            &admin,
            "--data-dir",
            wrong_dir.to_str().unwrap(),
        ])
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("admin credential"),
        "{stderr}"
    );
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_create_refuses_the_control_planes_own_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cp = start(&data).await;
    let admin = cp.admin_addr.to_string();
    let output = tokio::task::spawn_blocking(move || {
        latchctl(&[
            "token",
            "create",
            "--spiffe-id",
            "spiffe://cluster.local/ns/latch-system/sa/latch-control",
            "--admin",
            &admin,
            "--data-dir",
            data.to_str().unwrap(),
        ])
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("400")
            && stderr.contains("is reserved for the control plane's own use")
            && stderr.contains("use another service account"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "no token printed");
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_of_another_control_plane_is_said_once_in_our_words() {
    let dir = tempfile::tempdir().unwrap();
    let ours = start(&dir.path().join("ours")).await;
    let theirs = start(&dir.path().join("theirs")).await;
    let grpc = ours.grpc_addr.to_string();
    let wrong_bundle = dir.path().join("theirs/bundle.pem");
    let out = dir.path().join("out");
    let output = tokio::task::spawn_blocking(move || {
        latchctl(&[
            "cert",
            "request",
            "--token",
            "latch-jt-0000000000000000000000000000000000000000000000000000000000000000",
            "--control-plane",
            &grpc,
            "--bundle",
            wrong_bundle.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    })
    .await
    .unwrap();
    drop(theirs);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("does not chain to the trust bundle"),
        "says why the control plane was refused:\n{stderr}"
    );
    assert!(
        stderr.contains("is it this control plane's bundle.pem?"),
        "says what to check:\n{stderr}"
    );
    assert!(
        !stderr.contains("OtherError") && !stderr.contains("SpiffeId {"),
        "no Rust debug structure:\n{stderr}"
    );
    assert_eq!(
        stderr.matches("invalid peer certificate").count(),
        1,
        "said once:\n{stderr}"
    );
    drop(ours);
}

#[test]
fn inject_refuses_an_app_running_as_the_proxy_uid() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.yaml");
    let output = dir.path().join("out.yaml");
    std::fs::write(
        &input,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api}\nspec:\n  template:\n    \
         spec:\n      containers:\n      - {name: api, image: api, securityContext: {runAsUser: 1337}}\n",
    )
    .unwrap();
    let run = latchctl(&[
        "inject",
        "-f",
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("Deployment/api") && stderr.contains("container \"api\" runs as uid 1337"),
        "{stderr}"
    );
    assert!(!output.exists(), "nothing written");
}

#[tokio::test(flavor = "multi_thread")]
async fn cert_fetch_prints_the_svid_a_proxy_serves_on_its_workload_api() {
    let h = latch_testkit::Harness::start().await;
    let id = h.id("demo", "fetcher");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let proxy = h.start_proxy(&id, None, Some(socket.clone())).await;
    let endpoint = format!("unix://{}", socket.display());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_latchctl"))
            .args(["cert", "fetch"])
            .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
            .output()
            .expect("latchctl runs")
    })
    .await
    .unwrap();
    let line = stdout_of(&output);
    let serial = proxy.store().svid().unwrap().info().serial.clone();
    assert!(
        line.starts_with(&format!("{id} serial {serial} valid until ")),
        "{line}"
    );

    // Not a Unix socket address: said so, nothing printed.
    let output = latchctl(&["cert", "fetch", "--socket", "localhost:15000"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unix:///absolute/path"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    proxy.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_fetch_prints_a_jwt_svid_the_proxy_validates() {
    let h = latch_testkit::Harness::start().await;
    let id = h.id("demo", "jwt-fetcher");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let proxy = h.start_proxy(&id, None, Some(socket.clone())).await;
    let endpoint = format!("unix://{}", socket.display());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_latchctl"))
            .args(["jwt", "fetch", "--audience", "db", "--audience", "cache"])
            .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
            .output()
            .expect("latchctl runs")
    })
    .await
    .unwrap();
    let token = stdout_of(&output);
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        id.to_string()
    );
    // The token alone, for the app's Authorization header: the control plane's key signed it
    // for both audiences, with the workload's ID as `sub`.
    let cp = &h.control_plane;
    for audience in ["db", "cache"] {
        let claims = latch_identity::jwt::validate(
            token.trim(),
            &h.trust_domain,
            cp.jwt.keys().bundle(),
            audience,
            std::time::SystemTime::now(),
        )
        .unwrap();
        assert_eq!(claims.subject, id);
    }
    proxy.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_rotate_replaces_the_signing_key_and_keeps_the_old_one_published() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cp = start(&data).await;
    let old = cp
        .jwt
        .keys()
        .signing_kid(std::time::SystemTime::now())
        .unwrap()
        .to_string();
    let admin = cp.admin_addr.to_string();
    let rotate = move |data_dir: std::path::PathBuf| {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            latchctl(&[
                "jwt",
                "rotate",
                "--admin",
                &admin,
                "--data-dir",
                data_dir.to_str().unwrap(),
            ])
        })
    };
    // Without the admin credential: refused, nothing rotated.
    let wrong_dir = dir.path().join("elsewhere");
    std::fs::create_dir_all(&wrong_dir).unwrap();
    std::fs::write(wrong_dir.join("admin.token"), "not-the-credential\n").unwrap();
    let output = rotate(wrong_dir).await.unwrap();
    assert!(!output.status.success());
    assert_eq!(
        cp.jwt
            .keys()
            .signing_kid(std::time::SystemTime::now())
            .unwrap(),
        old
    );

    let output = rotate(data).await.unwrap();
    let answer: serde_json::Value = serde_json::from_str(&stdout_of(&output)).unwrap();
    // Published now, signing later: until then the old key signs.
    let new = answer["new_kid"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(answer["signing_kid"], old);
    let signs_from = humantime::parse_rfc3339(answer["signs_from"].as_str().unwrap()).unwrap();
    assert_eq!(cp.jwt.keys().signing_kid(signs_from).unwrap(), new);
    let mut kids = vec![old, new];
    kids.sort();
    assert_eq!(answer["bundle_kids"], serde_json::json!(kids));
    // The proxies are served the bundle with both keys (the MeshConfig's JWKS).
    let snapshot = cp.mesh.snapshot();
    let config = snapshot
        .resources(latch_control::mesh::snapshot::ResourceType::MeshConfig)
        .values()
        .next()
        .unwrap()
        .clone();
    let bytes = &config.body.value;
    for kid in &kids {
        assert!(
            bytes.windows(kid.len()).any(|w| w == kid.as_bytes()),
            "the MeshConfig holds key {kid}"
        );
    }
    cp.shutdown().await;
}
