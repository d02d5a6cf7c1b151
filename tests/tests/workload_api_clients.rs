//! The SPIFFE Workload API as SPIFFE clients built on other gRPC implementations see it, each
//! run as an ordinary uid the proxy allows (`--workload-api-allow-uid 4242`): py-spiffe (PyPI
//! `spiffe`, on gRPC C-core, which sends the socket path as `:authority`) and a small
//! @grpc/grpc-js script (npm, Node's own HTTP/2) with the Workload API proto fetch the X.509-SVID,
//! follow a rotation and fetch the bundles; uid 4243 reaches the socket (mode 0666), is refused,
//! and the refusal is counted on /metrics. Needs root (to run clients as other uids), py-spiffe
//! in `/opt/latch-ci/py-spiffe` (or LATCH_PY_SPIFFE_PYTHON) and grpc-js in
//! `/opt/latch-ci/grpc-js/node_modules` (or LATCH_GRPC_JS_MODULES); skips without, fails instead
//! with LATCH_REQUIRE_SPIFFE_CLIENTS=1, as CI sets (.ci/run installs both). Also PyJWT (a
//! py-spiffe dependency) judging the JWT-SVIDs `latch_identity::jwt` signs.

use std::ffi::OsStr;
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
/// Where @grpc/grpc-js and @grpc/proto-loader are installed; .ci/run installs them there.
const GRPC_JS_ENV: &str = "LATCH_GRPC_JS_MODULES";
const DEFAULT_GRPC_JS: &str = "/opt/latch-ci/grpc-js/node_modules";
const JS_CLIENT: &str = include_str!("../clients/grpc_js_client.js");
const WORKLOAD_PROTO: &str = include_str!("../../proto/spiffe/workload.proto");

/// A SKIPPED line, or a panic under LATCH_REQUIRE_SPIFFE_CLIENTS=1.
fn missing(what: &str) {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but {what}");
    }
    latch_testkit::skip::skipped(&format!("{what}; set {REQUIRE_ENV}=1 to fail instead"));
}

/// Whether clients can run as other uids (root); a SKIPPED line or a panic if not.
fn can_switch_uid() -> bool {
    let root = is_root();
    if !root {
        missing("running clients as other uids needs root");
    }
    root
}

/// The node_modules folder with @grpc/grpc-js and @grpc/proto-loader, if node can load them.
fn grpc_js() -> Option<PathBuf> {
    if !can_switch_uid() {
        return None;
    }
    let modules =
        PathBuf::from(std::env::var(GRPC_JS_ENV).unwrap_or_else(|_| DEFAULT_GRPC_JS.to_string()));
    let works = std::process::Command::new("node")
        .args([
            "-e",
            "require('@grpc/grpc-js'); require('@grpc/proto-loader')",
        ])
        .env("NODE_PATH", &modules)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        missing(&format!(
            "node cannot load @grpc/grpc-js and @grpc/proto-loader from {} (.ci/run installs \
             them with npm)",
            modules.display()
        ));
        return None;
    }
    Some(modules)
}

/// The interpreter with py-spiffe (and PyJWT, which it depends on) importable, if there is one.
fn py_spiffe() -> Option<PathBuf> {
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

/// A directory any uid may enter (the clients run as other uids), holding the client scripts
/// and the Workload API proto.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(dir.path().join("py_spiffe_client.py"), PY_CLIENT).unwrap();
    std::fs::write(dir.path().join("grpc_js_client.js"), JS_CLIENT).unwrap();
    std::fs::write(dir.path().join("workload.proto"), WORKLOAD_PROTO).unwrap();
    dir
}

/// Runs a client (`program` and its first arguments) in `dir` against `socket`, as `uid` (via
/// setpriv), with `env` added, and returns the JSON it printed.
async fn run_client(
    program: &[&OsStr],
    env: &[(&str, &OsStr)],
    dir: &Path,
    socket: &Path,
    uid: u32,
) -> Value {
    let mut command = tokio::process::Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg("--")
        .args(program)
        .current_dir(dir)
        .env("HOME", dir)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .kill_on_drop(true)
        .stdin(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the client finishes within 60 s")
        .expect("the client starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{program:?} printed no JSON ({e}):\n{stdout}\n{stderr}"))
}

/// A proxy for `id` whose Workload API at `socket` allows root and APP_UID.
async fn proxy_for_app_uid(
    h: &Harness,
    id: &latch_identity::SpiffeId,
    socket: &Path,
) -> latch_proxy::Proxy {
    let mut config = h.proxy_config(
        id,
        Some(Duration::from_secs(8)),
        Some(socket.to_path_buf()),
        false,
    );
    if let Some(api) = &mut config.workload_api {
        api.allowed = AllowedPeers::new(0, &[AllowedUid::Uid(APP_UID)]);
    }
    latch_testkit::start_proxy(config).await
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn py_spiffe_as_an_allowed_uid_fetches_follows_a_rotation_and_other_uids_are_refused() {
    let Some(python) = py_spiffe().filter(|_| can_switch_uid()) else {
        return;
    };
    let h = Harness::start().await;
    let id = h.id("demo", "py-app");
    let dir = shared_dir();
    let socket = dir.path().join("workload-api/socket");
    let proxy = proxy_for_app_uid(&h, &id, &socket).await;
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(
        mode & 0o777,
        0o666,
        "other uids may connect; SO_PEERCRED decides"
    );

    let script = dir.path().join("py_spiffe_client.py");
    let py = |mode: &'static str| {
        [
            python.as_os_str(),
            script.as_os_str(),
            OsStr::new(mode),
            OsStr::new("30"),
        ]
    };
    let quiet = [("PYTHONWARNINGS", OsStr::new("ignore"))];
    let result = run_client(&py("fetch"), &quiet, dir.path(), &socket, APP_UID).await;
    assert_eq!(result["spiffe_id"], id.to_string(), "{result}");
    assert_eq!(result["key_matches_leaf"], true, "{result}");
    assert_eq!(result["bundles"]["cluster.local"], 1, "{result}");
    let serials = strings(&result["stream_serials"]);
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
    let result = run_client(&py("refused"), &quiet, dir.path(), &socket, OTHER_UID).await;
    let error = result["error"].as_str().expect("uid 4243 gets no SVID");
    assert!(error.contains("UNAVAILABLE"), "{error}");
    let counted = latch_testkit::admin::metric(proxy.admin_addr, refused, &[]).await;
    assert!(counted >= 1.0, "refusals counted: {counted}");
    proxy.shutdown().await;
    h.stop().await;
}

/// Waits (up to 10 s) for the proxy's JWT bundle from discovery to hold `kid`.
async fn wait_for_jwt_key(proxy: &latch_proxy::Proxy, kid: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if proxy
            .store()
            .jwt_bundle()
            .is_some_and(|b| b.kids().any(|k| k == kid))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy's JWT bundle holds key {kid} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The signature part of `signed` put on `token` (same header and claims, another key's
/// signature).
fn with_signature_of(token: &str, signed: &str) -> String {
    let (signing_input, _) = token.rsplit_once('.').unwrap();
    let (_, signature) = signed.rsplit_once('.').unwrap();
    format!("{signing_input}.{signature}")
}

/// JWT-SVIDs end to end for py-spiffe as uid 4242: it fetches the JWT bundles (the control
/// plane's key, delivered to the proxy by discovery), a JWT-SVID for two audiences (the same
/// token again from the proxy's cache), has it validated by the proxy, and PyJWT verifies it
/// with the bundle's key (signature, sub, aud, exp). ValidateJWTSVID refuses a token for another
/// audience, an expired one, one signed by a key outside the bundle, one whose signature is
/// another key's under the bundle's kid, and one whose subject is in another trust domain.
#[tokio::test(flavor = "multi_thread")]
async fn py_spiffe_fetches_and_validates_jwt_svids_and_pyjwt_verifies_them() {
    use latch_identity::jwt::JwtSigningKey;
    use std::time::SystemTime;
    let Some(python) = py_spiffe().filter(|_| can_switch_uid()) else {
        return;
    };
    let h = Harness::start().await;
    let id = h.id("demo", "jwt-app");
    let dir = shared_dir();
    let socket = dir.path().join("workload-api/socket");
    let proxy = proxy_for_app_uid(&h, &id, &socket).await;
    let authority = &h.control_plane.jwt;
    let kid = authority
        .keys()
        .signing_kid(SystemTime::now())
        .unwrap()
        .to_string();
    wait_for_jwt_key(&proxy, &kid).await;

    let now = SystemTime::now();
    let db = ["db".to_string()];
    let genuine = authority.sign(&id, &db, now).unwrap().token;
    let foreign = JwtSigningKey::generate().unwrap();
    let foreign_token = foreign
        .sign(&id, &db, now, now + Duration::from_secs(300))
        .unwrap();
    let refused = serde_json::json!({
        "expired": authority.sign(&id, &db, now - Duration::from_secs(600)).unwrap().token,
        "foreign_key": foreign_token,
        "forged_signature": with_signature_of(&genuine, &foreign_token),
        "other_trust_domain": authority
            .sign(&latch_identity::SpiffeId::parse("spiffe://other.example/ns/demo/sa/jwt-app").unwrap(), &db, now)
            .unwrap()
            .token,
    });
    let refused_path = dir.path().join("refused.json");
    std::fs::write(&refused_path, refused.to_string()).unwrap();

    let script = dir.path().join("py_spiffe_client.py");
    let program = [
        python.as_os_str(),
        script.as_os_str(),
        OsStr::new("jwt"),
        refused_path.as_os_str(),
    ];
    let quiet = [("PYTHONWARNINGS", OsStr::new("ignore"))];
    let result = run_client(&program, &quiet, dir.path(), &socket, APP_UID).await;

    assert_eq!(
        result["bundles"]["cluster.local"],
        serde_json::json!([kid]),
        "{result}"
    );
    assert_eq!(result["svid"]["spiffe_id"], id.to_string(), "{result}");
    assert_eq!(
        result["svid"]["audience"],
        serde_json::json!(["cache", "db"])
    );
    assert_eq!(result["svid"]["cached"], true, "{result}");
    let expiry = result["svid"]["expiry"].as_u64().unwrap();
    let unix_now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (unix_now + 240..=unix_now + 310).contains(&expiry),
        "expires in about 5 minutes: {expiry} vs now {unix_now}"
    );
    assert_eq!(result["validated"], id.to_string(), "{result}");
    let claims = &result["pyjwt"]["claims"];
    assert_eq!(claims["sub"], id.to_string(), "PyJWT verified it: {result}");
    assert_eq!(
        claims["aud"],
        serde_json::json!(["cache", "db"]),
        "{result}"
    );
    assert_eq!(claims["exp"].as_u64(), Some(expiry), "{result}");
    for (name, reason) in [
        ("other_audience", "audience"),
        ("expired", "expired"),
        ("foreign_key", "does not hold"),
        ("forged_signature", "signature"),
        ("other_trust_domain", "trust domain"),
    ] {
        let error = result["refused"][name]
            .as_str()
            .unwrap_or_else(|| panic!("{name} was accepted: {result}"));
        assert!(
            error.contains("INVALID_ARGUMENT") && error.contains(reason),
            "{name}: {error}"
        );
    }
    proxy.shutdown().await;
    h.stop().await;
}

/// JWT signing-key rotation under load: while requests for new tokens run, the control plane
/// replaces its key; tokens issued before keep validating at the proxy (the replaced key stays
/// in the bundle), tokens issued after carry the new key id and validate too.
#[tokio::test(flavor = "multi_thread")]
async fn jwt_svids_issued_before_a_key_rotation_keep_validating() {
    use latch_proxy::workload_api::jwt::validate;
    use std::time::SystemTime;
    let h = Harness::start().await;
    let id = h.id("demo", "rotating");
    let proxy = h.start_proxy(&id, None, None).await;
    let old_kid = h
        .control_plane
        .jwt
        .keys()
        .signing_kid(SystemTime::now())
        .unwrap()
        .to_string();
    wait_for_jwt_key(&proxy, &old_kid).await;
    let mut client = latch_identity::client::CaClient::connect(
        &h.grpc_addr(),
        proxy.store().clone(),
        latch_identity::ExpectedPeer::Exactly(latch_identity::client::control_plane_id(
            &h.trust_domain,
        )),
        true,
    )
    .await
    .unwrap();
    let kid_of = |token: &str| -> String {
        use base64::Engine;
        let header = token.split('.').next().unwrap();
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap();
        serde_json::from_slice::<Value>(&header).unwrap()["kid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Load: 8 tasks asking for tokens back to back across the rotation.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..8 {
        let mut client = client.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let issued = client
                    .fetch_jwt_svid(vec![format!("svc-{i}")])
                    .await
                    .unwrap();
                tokens.push((format!("svc-{i}"), issued.token));
            }
            tokens
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rotation = h.control_plane.rotate_jwt_key().await.unwrap();
    let new_kid = rotation.kid;
    assert_ne!(new_kid, old_kid);
    wait_for_jwt_key(&proxy, &new_kid).await;
    // The new key signs once it has been published for the harness's publish-ahead time.
    let until = rotation.signs_from + Duration::from_millis(300);
    tokio::time::sleep(until.duration_since(SystemTime::now()).unwrap_or_default()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut by_kid = std::collections::BTreeMap::<String, usize>::new();
    for task in load {
        for (audience, token) in task.await.unwrap() {
            let claims = validate(proxy.store(), &token, &audience, SystemTime::now())
                .unwrap_or_else(|e| panic!("a token of {audience} refused: {e:?}"));
            assert_eq!(claims.subject, id);
            *by_kid.entry(kid_of(&token)).or_default() += 1;
        }
    }
    assert!(
        by_kid.get(&old_kid).is_some_and(|n| *n > 0)
            && by_kid.get(&new_kid).is_some_and(|n| *n > 0),
        "tokens of both keys were issued and all validated: {by_kid:?}"
    );
    let old = client.fetch_jwt_svid(vec!["after".into()]).await.unwrap();
    assert_eq!(
        kid_of(&old.token),
        new_kid,
        "new tokens are signed by the new key"
    );
    proxy.shutdown().await;
    h.stop().await;
}

/// A JWT-SVID cannot be recalled once issued, but revoking its subject makes ValidateJWTSVID
/// refuse the tokens issued before the revocation, on every proxy that holds it (discovery
/// pushes revocations to all); a token of another ID, or of the revoked ID issued after, passes.
#[tokio::test(flavor = "multi_thread")]
async fn validate_refuses_jwt_svids_of_an_id_revoked_after_they_were_issued() {
    use latch_proxy::workload_api::jwt::validate;
    use std::time::SystemTime;
    let h = Harness::start().await;
    let (revoked, other) = (h.id("demo", "leaky"), h.id("demo", "other"));
    let verifier = h.start_proxy(&h.id("demo", "api"), None, None).await;
    let kid = h
        .control_plane
        .jwt
        .keys()
        .signing_kid(SystemTime::now())
        .unwrap()
        .to_string();
    wait_for_jwt_key(&verifier, &kid).await;
    let sign = |id: &latch_identity::SpiffeId, at: SystemTime| {
        h.control_plane
            .jwt
            .sign(id, &["db".into()], at)
            .unwrap()
            .token
    };
    let before = sign(&revoked, SystemTime::now() - Duration::from_secs(2));
    let of_other = sign(&other, SystemTime::now() - Duration::from_secs(2));
    validate(verifier.store(), &before, "db", SystemTime::now())
        .expect("valid before the revocation");

    h.control_plane
        .revocations
        .revoke(
            &revoked,
            "key leaked",
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while validate(verifier.store(), &before, "db", SystemTime::now()).is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revocation reaches the verifying proxy within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = validate(verifier.store(), &before, "db", SystemTime::now()).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("was revoked at"), "{refused:?}");
    validate(verifier.store(), &of_other, "db", SystemTime::now()).expect("another ID's token");
    let after = sign(&revoked, SystemTime::now() + Duration::from_secs(2));
    validate(
        verifier.store(),
        &after,
        "db",
        SystemTime::now() + Duration::from_secs(2),
    )
    .expect("issued after the revocation (as a re-enrolled workload's would be)");
    verifier.shutdown().await;
    h.stop().await;
}

/// The proxy caches a JWT-SVID per audience set, in at most 1,024 entries. Once an app has
/// filled the cache with one-off audiences (all still valid), an audience in steady use is
/// still cached: the entry due first makes room (found by `cargo xtask bench jwt`, whose
/// "cached" rows reached the control plane on every request after the uncached rows).
#[tokio::test(flavor = "multi_thread")]
async fn a_jwt_svid_cache_full_of_one_off_audiences_still_caches_new_ones() {
    use latch_proxy::workload_api::jwt::JwtSvids;
    let h = Harness::start().await;
    let id = h.id("demo", "many-audiences");
    let proxy = h.start_proxy(&id, None, None).await;
    let svids = JwtSvids::new(
        proxy.store().clone(),
        h.grpc_addr(),
        latch_identity::ExpectedPeer::Exactly(latch_identity::client::control_plane_id(
            &h.trust_domain,
        )),
    );
    for n in 0..1100 {
        svids.fetch(&[format!("once-{n}")]).await.unwrap();
    }
    let issued = || h.control_plane.metrics.jwt_svids_issued.get();
    let before = issued();
    let (_, first) = svids.fetch(&["steady".to_string()]).await.unwrap();
    for _ in 0..10 {
        let (_, again) = svids.fetch(&["steady".to_string()]).await.unwrap();
        assert_eq!(again, first, "answered from the cache");
    }
    assert_eq!(issued() - before, 1, "one token issued for eleven requests");
    proxy.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_js_as_an_allowed_uid_fetches_x509_and_jwt_svids_follows_a_rotation_and_other_uids_are_refused()
 {
    let Some(modules) = grpc_js() else { return };
    let h = Harness::start().await;
    let id = h.id("demo", "node-app");
    let dir = shared_dir();
    let socket = dir.path().join("workload-api/socket");
    let proxy = proxy_for_app_uid(&h, &id, &socket).await;

    let script = dir.path().join("grpc_js_client.js");
    let proto = dir.path().join("workload.proto");
    let node = |mode: &'static str| {
        [
            OsStr::new("node"),
            script.as_os_str(),
            proto.as_os_str(),
            OsStr::new(mode),
            OsStr::new("30"),
        ]
    };
    let env = [("NODE_PATH", modules.as_os_str())];
    let result = run_client(&node("fetch"), &env, dir.path(), &socket, APP_UID).await;
    assert_eq!(result["spiffe_id"], id.to_string(), "{result}");
    assert_eq!(result["uri_san"], format!("URI:{id}"), "{result}");
    assert_eq!(result["key_matches_leaf"], true, "{result}");
    assert_eq!(
        result["bundles"]["spiffe://cluster.local"], true,
        "the bundle holds a CA for the trust domain: {result}"
    );
    let serials = strings(&result["serials"]);
    assert_eq!(
        serials.len(),
        2,
        "the stream delivered a rotation: {result}"
    );
    assert_ne!(serials[0], serials[1]);
    assert_eq!(
        result["jwt_bundle_keys"]["spiffe://cluster.local"], 1,
        "{result}"
    );
    assert_eq!(result["jwt_spiffe_id"], id.to_string(), "{result}");
    assert_eq!(
        result["jwt_verified_by_node"], true,
        "Node's crypto verifies the JWT-SVID with the bundle's JWKS: {result}"
    );
    assert_eq!(result["validate"], id.to_string(), "{result}");
    assert_eq!(
        result["validate_other_audience"], "INVALID_ARGUMENT",
        "{result}"
    );

    let result = run_client(&node("refused"), &env, dir.path(), &socket, OTHER_UID).await;
    let error = result["error"].as_str().expect("uid 4243 gets no SVID");
    assert!(error.starts_with("UNAVAILABLE"), "{error}");
    let refused = "latch_proxy_workload_api_connections_refused_total";
    let counted = latch_testkit::admin::metric(proxy.admin_addr, refused, &[]).await;
    assert!(counted >= 1.0, "refusals counted: {counted}");
    proxy.shutdown().await;
    h.stop().await;
}

/// Verifies a JWT-SVID with PyJWT against a JWKS file; prints the claims or the error's class.
const PYJWT_CHECK: &str = r#"
import json, sys, jwt
jwks, token, audience = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
kid = jwt.get_unverified_header(token)["kid"]
key = next(k for k in jwks["keys"] if k["kid"] == kid)
try:
    claims = jwt.decode(token, jwt.PyJWK(key).key, algorithms=["ES256"], audience=audience,
                        options={"require": ["exp", "sub", "aud"]})
    print(json.dumps({"claims": claims}))
except jwt.PyJWTError as error:
    print(json.dumps({"error": type(error).__name__}))
"#;

/// JWT-SVIDs as `latch_identity::jwt` signs them, judged by PyJWT (independent of Latch's code)
/// with the JWT bundle's JWKS: signature, `sub`, `aud` and `exp`.
#[test]
fn jwt_svids_verify_with_pyjwt() {
    use latch_identity::jwt::{JwtBundle, JwtSigningKey};
    use std::time::SystemTime;
    let Some(python) = py_spiffe() else { return };
    let key = JwtSigningKey::generate().unwrap();
    let mut bundle = JwtBundle::default();
    bundle.add(&key);
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, bundle.to_jwks().to_string()).unwrap();
    let id = latch_identity::SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap();
    let now = SystemTime::now();
    let check = |token: &str, audience: &str| -> Value {
        let output = std::process::Command::new(&python)
            .args(["-c", PYJWT_CHECK])
            .arg(&jwks)
            .args([token, audience])
            .env("PYTHONWARNINGS", "ignore")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let audience = vec!["db".to_string()];
    let valid = key
        .sign(&id, &audience, now, now + Duration::from_secs(300))
        .unwrap();
    let verdict = check(&valid, "db");
    assert_eq!(verdict["claims"]["sub"], id.to_string(), "{verdict}");
    assert_eq!(verdict["claims"]["aud"], serde_json::json!(["db"]));
    assert_eq!(check(&valid, "other")["error"], "InvalidAudienceError");
    let expired = key
        .sign(
            &id,
            &audience,
            now - Duration::from_secs(600),
            now - Duration::from_secs(300),
        )
        .unwrap();
    assert_eq!(check(&expired, "db")["error"], "ExpiredSignatureError");
    let other = JwtSigningKey::generate().unwrap();
    let mut parts: Vec<String> = valid.split('.').map(str::to_string).collect();
    parts[2] = other
        .sign(&id, &audience, now, now + Duration::from_secs(300))
        .unwrap()
        .rsplit('.')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        check(&parts.join("."), "db")["error"],
        "InvalidSignatureError"
    );
}

/// Connects to the Unix socket `socket` `count` times as `uid` (each connection closed by the
/// proxy at once); returns the connecting process's pid.
fn connect_as(uid: u32, socket: &Path, count: u32) -> u32 {
    let script = "import os, socket, sys\n\
                  for _ in range(int(sys.argv[2])):\n    \
                      s = socket.socket(socket.AF_UNIX)\n    \
                      s.connect(sys.argv[1])\n    \
                      s.recv(1)\n    \
                      s.close()\n\
                  print(os.getpid())";
    let output = std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "--", "/usr/bin/python3", "-c", script])
        .arg(socket)
        .arg(count.to_string())
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

/// The latch-proxy binary as an operator runs it: a refused uid is logged with its uid and pid,
/// at most once a second with the number refused since the last line, and counted.
#[test]
fn the_proxy_logs_refused_uids_with_their_pid_at_most_once_a_second() {
    use latch_testkit::processes::{ControlProcess, ProxySpec};
    if !can_switch_uid() {
        return;
    }
    let dir = shared_dir();
    let mut control = ControlProcess::new(dir.path(), &dir.path().join("data"));
    let _control = control.start();
    let socket = dir.path().join("api/socket");
    let mut spec = ProxySpec::new("logged", "1h");
    spec.flags = vec![
        "--workload-api".into(),
        format!("unix://{}", socket.display()),
        "--workload-api-allow-uid".into(),
        APP_UID.to_string(),
    ];
    let proxy = spec.start(&control, dir.path());

    let pid = connect_as(OTHER_UID, &socket, 5);
    let line = format!("refused a connection from uid {OTHER_UID} (pid {pid})");
    let lines = || {
        proxy
            .log()
            .lines()
            .filter(|l| l.contains("refused a connection"))
            .count()
    };
    latch_testkit::wait_for(Duration::from_secs(5), || lines() >= 1);
    assert!(proxy.log().contains(&line), "{}", proxy.log());
    assert!(
        proxy
            .log()
            .contains(&format!("--workload-api-allow-uid {OTHER_UID}")),
        "the line names the flag that would allow it"
    );
    assert_eq!(lines(), 1, "five refusals within a second, one line");
    std::thread::sleep(Duration::from_millis(1100));
    connect_as(OTHER_UID, &socket, 1);
    latch_testkit::wait_for(Duration::from_secs(5), || lines() >= 2);
    let last = proxy
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("refused a connection"))
        .unwrap()
        .to_string();
    assert!(last.contains("refused_since_last_line=5"), "{last}");
    let refused = latch_testkit::admin::metric_blocking(
        &spec.admin,
        "latch_proxy_workload_api_connections_refused_total",
        &[],
    );
    assert_eq!(refused, 6.0);
}
