//! The Kubernetes manifests, checked offline against the Kubernetes schemas with
//! kubernetes-validate (PyPI) in strict mode (unknown fields are errors): everything in
//! deploy/kubernetes, and what `latchctl inject` makes of the demo apps, for the oldest version
//! with native sidecars in the schema (1.29) and the newest the validator knows. Latch's own
//! AuthorizationPolicy resources are checked against the CRD's schema (tests/k8s/validate_crs.py).
//!
//! Without the validator these tests print SKIPPED; with LATCH_REQUIRE_K8S_VALIDATE=1 (set by
//! .ci/run, which installs it) they fail instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VERSIONS: [&str; 2] = ["1.29", "1.37"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kubernetes_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// Whether the validator (and Python's jsonschema and yaml, which it brings) can run here.
fn validator_available(test: &str) -> bool {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("kubernetes-validate", &["--version"])
        && works("python3", &["-c", "import jsonschema, yaml"])
    {
        return true;
    }
    let why = "kubernetes-validate is not installed (pip install kubernetes-validate)";
    if std::env::var("LATCH_REQUIRE_K8S_VALIDATE").is_ok_and(|v| v == "1") {
        panic!("{test}: {why}, and LATCH_REQUIRE_K8S_VALIDATE=1");
    }
    latch_testkit::skip::skipped(&format!(
        "{why} (set LATCH_REQUIRE_K8S_VALIDATE=1 to fail instead)"
    ));
    false
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `kubernetes-validate --strict` for one Kubernetes version; returns (success, its report).
fn validate(version: &str, files: &[PathBuf]) -> (bool, String) {
    let output = Command::new("kubernetes-validate")
        .args(["--strict", "-k", version])
        .args(files)
        .output()
        .expect("kubernetes-validate runs");
    (output.status.success(), text(&output))
}

fn validate_crs(files: &[PathBuf]) -> (bool, String) {
    let output = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/k8s/validate_crs.py"))
        .arg(kubernetes_dir().join("10-crd-authorizationpolicy.yaml"))
        .args(files)
        .output()
        .expect("python3 runs");
    (output.status.success(), text(&output))
}

/// Asserts every listed resource passed and nothing failed or went unchecked, except Latch's
/// own kinds, which the Kubernetes schemas cannot know.
fn assert_all_passed(report: &str, resources: &[&str]) {
    for resource in resources {
        assert!(
            report.contains(&format!("passed for resource {resource} ")),
            "{resource} was not validated:\n{report}"
        );
    }
    for line in report.lines() {
        let known_gap = line.contains("Couldn't find schema for kind AuthorizationPolicy");
        assert!(
            line.starts_with("INFO") || known_gap,
            "unexpected line: {line}\n{report}"
        );
    }
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kubernetes_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "manifests missing: {files:?}");
    files
}

fn latchctl_inject(input: &Path, output: &Path) {
    latchctl_inject_with(input, output, &[]);
}

fn latchctl_inject_with(input: &Path, output: &Path, flags: &[&str]) {
    let run = Command::new(env!("CARGO_BIN_EXE_latchctl"))
        .args(["inject", "-f"])
        .arg(input)
        .arg("-o")
        .arg(output)
        .args(flags)
        .env_remove("LATCH_INJECT_IMAGE")
        .env_remove("LATCH_INJECT_CONTROL_PLANE")
        .env_remove("LATCH_TRUST_DOMAIN")
        .output()
        .expect("latchctl runs");
    assert!(run.status.success(), "{}", text(&run));
    let report = String::from_utf8_lossy(&run.stderr);
    assert!(
        report.contains("injected Deployment/http-server")
            && report.contains("injected Deployment/http-client"),
        "{report}"
    );
}

#[test]
fn install_manifests_validate_against_the_kubernetes_schemas() {
    if !validator_available("install_manifests_validate_against_the_kubernetes_schemas") {
        return;
    }
    for version in VERSIONS {
        let (ok, report) = validate(version, &manifests());
        assert!(ok, "Kubernetes {version}:\n{report}");
        assert_all_passed(
            &report,
            &[
                "namespace/latch-system",
                "customresourcedefinition/authorizationpolicies.latch.dev",
                "serviceaccount/latch-control",
                "clusterrole/latch-control",
                "clusterrolebinding/latch-control",
                "role/latch-control-ca",
                "rolebinding/latch-control-ca",
                "configmap/latch-control-config",
                "deployment/latch-control",
                "service/latch-control",
                "poddisruptionbudget/latch-control",
                "mutatingwebhookconfiguration/latch-sidecar-injector",
                "serviceaccount/latch-cni",
                "configmap/latch-cni-config",
                "daemonset/latch-cni",
            ],
        );
    }
}

#[test]
fn injected_demo_apps_validate_against_the_kubernetes_schemas() {
    if !validator_available("injected_demo_apps_validate_against_the_kubernetes_schemas") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let injected = dir.path().join("demo-injected.yaml");
    latchctl_inject(&kubernetes_dir().join("demo/demo.yaml"), &injected);
    for version in VERSIONS {
        let (ok, report) = validate(version, std::slice::from_ref(&injected));
        assert!(ok, "Kubernetes {version}:\n{report}");
        assert_all_passed(
            &report,
            &[
                "namespace/latch-demo",
                "deployment/http-server",
                "service/http-server",
                "deployment/http-client",
            ],
        );
    }
    let (ok, report) = validate_crs(&[injected]);
    assert!(
        ok && report.contains("AuthorizationPolicy/http-server-callers passed"),
        "{report}"
    );
}

/// The checks above can fail: a field Kubernetes does not know in an injected container, and
/// a policy the CRD's schema forbids, are both caught.
#[test]
fn the_validators_catch_broken_manifests() {
    if !validator_available("the_validators_catch_broken_manifests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let injected = dir.path().join("demo-injected.yaml");
    latchctl_inject(&kubernetes_dir().join("demo/demo.yaml"), &injected);
    let text = std::fs::read_to_string(&injected).unwrap();
    assert!(text.contains("restartPolicy: Always"));
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        text.replacen("restartPolicy: Always", "restartPolicys: Always", 1),
    )
    .unwrap();
    let (ok, report) = validate("1.37", std::slice::from_ref(&broken));
    assert!(!ok && report.contains("restartPolicys"), "{report}");

    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: latch.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: d}\n\
         spec:\n  action: MAYBE\n  rules:\n    - principals: [{exact: spiffe://td/a, prefix: spiffe://td/}]\n      ports: [70000]\n",
    )
    .unwrap();
    let (ok, report) = validate_crs(&[policy]);
    assert!(!ok, "{report}");
    for expected in [
        "'MAYBE' is not one of",
        "70000 is greater than the maximum",
        "has too many properties",
    ] {
        assert!(report.contains(expected), "{expected}:\n{report}");
    }
}

#[test]
fn webhook_ca_bundle_prints_the_bundle_as_base64() {
    let dir = tempfile::tempdir().unwrap();
    let run = |bundle: &Path| {
        Command::new(env!("CARGO_BIN_EXE_latchctl"))
            .args(["webhook", "ca-bundle", "--bundle"])
            .arg(bundle)
            .output()
            .unwrap()
    };
    // A real root, made by the CA code the control plane uses.
    let ca = latch_control::ca::Ca::load_or_create(
        dir.path(),
        &latch_identity::TrustDomain::new("cluster.local").unwrap(),
        latch_control::ca::TtlPolicy::default(),
    )
    .unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, ca.bundle().to_pem()).unwrap();
    let output = run(&bundle);
    assert!(output.status.success(), "{}", text(&output));
    let printed = String::from_utf8(output.stdout).unwrap();
    let decoded = Command::new("base64")
        .arg("-d")
        .stdin(
            std::fs::File::open({
                let file = dir.path().join("printed");
                std::fs::write(&file, printed.trim()).unwrap();
                file
            })
            .unwrap(),
        )
        .output()
        .unwrap();
    assert_eq!(decoded.stdout, std::fs::read(&bundle).unwrap());
    assert_eq!(printed.trim().lines().count(), 1, "one line, for caBundle");

    std::fs::write(&bundle, "not a certificate").unwrap();
    let output = run(&bundle);
    assert!(!output.status.success());
    assert!(text(&output).contains("trust bundle"), "{}", text(&output));
}

/// The checkov to run: on PATH, or where .ci/run installs it.
fn checkov() -> Option<PathBuf> {
    let installed = PathBuf::from("/opt/latch-ci/checkov/bin/checkov");
    let candidates = [PathBuf::from("checkov"), installed];
    let found = candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        let why = "checkov is not installed (pip install checkov)";
        if std::env::var("LATCH_REQUIRE_CHECKOV").is_ok_and(|v| v == "1") {
            panic!("{why}, and LATCH_REQUIRE_CHECKOV=1");
        }
        latch_testkit::skip::skipped(&format!(
            "{why} (set LATCH_REQUIRE_CHECKOV=1 to fail instead)"
        ));
    }
    found
}

/// checkov's failed checks over `dir`, as (check, resource, `place`).
fn checkov_findings(checkov: &Path, dir: &Path, place: &str) -> Vec<(String, String, String)> {
    // checkov finds no file under a path holding "..": give it the canonical one.
    let dir = dir.canonicalize().unwrap();
    let output = Command::new(checkov)
        .args([
            "--framework",
            "kubernetes",
            "-o",
            "json",
            "--quiet",
            "--compact",
            "-d",
        ])
        .arg(&dir)
        .output()
        .expect("checkov runs");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("checkov's JSON: {e}\n{}", text(&output)));
    assert!(
        report["summary"]["passed"].as_u64().unwrap_or(0) > 100,
        "checkov checked next to nothing in {}: {report}",
        dir.display()
    );
    let failed = report["results"]["failed_checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    failed
        .iter()
        .map(|f| {
            (
                f["check_id"].as_str().unwrap().to_string(),
                f["resource"].as_str().unwrap().to_string(),
                place.to_string(),
            )
        })
        .collect()
}

/// The findings docs/kubernetes.md justifies: the rows of its checkov table.
fn justified_findings() -> Vec<(String, String, String)> {
    let doc = std::fs::read_to_string(repo().join("docs/kubernetes.md")).unwrap();
    let table = doc
        .split("| check | resource | where | why it stays |")
        .nth(1)
        .expect("docs/kubernetes.md has the checkov table");
    table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            assert!(!cells[4].is_empty(), "a finding without a reason: {line}");
            (
                cells[1].to_string(),
                cells[2].to_string(),
                cells[3].to_string(),
            )
        })
        .collect()
}

#[test]
fn checkov_finds_nothing_but_the_justified_findings() {
    let Some(checkov) = checkov() else {
        return;
    };
    // Not tempdir()'s ".tmp..." name: checkov skips hidden folders.
    let injected = tempfile::Builder::new()
        .prefix("latch-checkov-")
        .tempdir()
        .unwrap();
    latchctl_inject(
        &kubernetes_dir().join("demo/demo.yaml"),
        &injected.path().join("demo-injected.yaml"),
    );
    let mut found = checkov_findings(&checkov, &kubernetes_dir(), "install");
    found.extend(checkov_findings(&checkov, injected.path(), "injected"));
    found.sort();
    let mut justified = justified_findings();
    justified.sort();
    let new: Vec<_> = found.iter().filter(|f| !justified.contains(f)).collect();
    let gone: Vec<_> = justified.iter().filter(|j| !found.contains(j)).collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "checkov findings not justified in docs/kubernetes.md: {new:?}\njustified there but no \
         longer found (remove the row): {gone:?}"
    );
}

/// What the Pod Security Standards' "restricted" level (Kubernetes 1.29+, the rules of
/// https://kubernetes.io/docs/concepts/security/pod-security-standards/) refuses in `pod` (a
/// pod template's `{metadata, spec}`): one line per violation.
fn restricted_violations(pod: &serde_json::Value) -> Vec<String> {
    use serde_json::Value;
    let spec = &pod["spec"];
    let mut violations = Vec::new();
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[field] == true {
            violations.push(format!("spec.{field}"));
        }
    }
    const VOLUMES: [&str; 8] = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let kind = volume
            .as_object()
            .unwrap()
            .keys()
            .find(|k| *k != "name")
            .cloned()
            .unwrap_or_default();
        if !VOLUMES.contains(&kind.as_str()) {
            violations.push(format!("volume {} is {kind}", volume["name"]));
        }
    }
    let pod_context = &spec["securityContext"];
    let seccomp_ok = |p: &Value| matches!(p["type"].as_str(), Some("RuntimeDefault" | "Localhost"));
    let containers = ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .flat_map(|list| spec[*list].as_array().cloned().unwrap_or_default());
    for container in containers {
        let name = container["name"].as_str().unwrap_or_default().to_string();
        let context = &container["securityContext"];
        let mut refuse = |what: &str| violations.push(format!("container {name}: {what}"));
        if context["privileged"] == true {
            refuse("privileged");
        }
        if context["allowPrivilegeEscalation"] != false {
            refuse("allowPrivilegeEscalation is not false");
        }
        let non_root = match &context["runAsNonRoot"] {
            Value::Bool(b) => *b,
            _ => pod_context["runAsNonRoot"] == true,
        };
        if !non_root {
            refuse("runAsNonRoot is not true");
        }
        if context["runAsUser"] == 0
            || (context["runAsUser"].is_null() && pod_context["runAsUser"] == 0)
        {
            refuse("runAsUser 0");
        }
        let seccomp = if context["seccompProfile"].is_null() {
            seccomp_ok(&pod_context["seccompProfile"])
        } else {
            seccomp_ok(&context["seccompProfile"])
        };
        if !seccomp {
            refuse("no RuntimeDefault or Localhost seccompProfile");
        }
        let capabilities = &context["capabilities"];
        if !capabilities["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|c| c == "ALL"))
        {
            refuse("capabilities.drop lacks ALL");
        }
        for added in capabilities["add"].as_array().into_iter().flatten() {
            if added != "NET_BIND_SERVICE" {
                refuse(&format!("capabilities.add {added}"));
            }
        }
        for port in container["ports"].as_array().into_iter().flatten() {
            if port["hostPort"].as_u64().is_some_and(|p| p != 0) {
                refuse("hostPort");
            }
        }
    }
    violations
}

/// The pod templates of the Deployments in `yaml`.
fn pod_templates(yaml: &str) -> Vec<serde_json::Value> {
    let mut reader = yaml.as_bytes();
    serde_saphyr::read::<_, serde_json::Value>(&mut reader)
        .map(|doc| doc.unwrap())
        .filter(|doc| doc["kind"] == "Deployment")
        .map(|doc| doc["spec"]["template"].clone())
        .collect()
}

#[test]
fn in_cni_mode_injected_pods_pass_pod_security_restricted() {
    let dir = tempfile::tempdir().unwrap();
    let demo = kubernetes_dir().join("demo/demo.yaml");
    let (cni, classic) = (dir.path().join("cni.yaml"), dir.path().join("classic.yaml"));
    latchctl_inject_with(&demo, &cni, &["--inject-cni"]);
    latchctl_inject(&demo, &classic);

    let cni_pods = pod_templates(&std::fs::read_to_string(&cni).unwrap());
    assert_eq!(cni_pods.len(), 2);
    for pod in &cni_pods {
        assert_eq!(restricted_violations(pod), Vec::<String>::new(), "{pod:#}");
        let first = &pod["spec"]["initContainers"][0];
        assert_eq!(first["name"], "latch-cni-wait");
        assert_eq!(
            first["command"],
            serde_json::json!(["latch-cni", "wait", "--timeout", "60s"])
        );
    }
    // The checker is not blind: the init-container mode's privileged rule installer fails it.
    for pod in pod_templates(&std::fs::read_to_string(&classic).unwrap()) {
        let violations = restricted_violations(&pod);
        assert!(
            violations
                .contains(&"container latch-iptables: capabilities.add \"NET_ADMIN\"".to_string())
                && violations
                    .contains(&"container latch-iptables: runAsNonRoot is not true".to_string()),
            "{violations:?}"
        );
    }
    if validator_available("in_cni_mode_injected_pods_pass_pod_security_restricted") {
        for version in VERSIONS {
            let (ok, report) = validate(version, std::slice::from_ref(&cni));
            assert!(ok, "Kubernetes {version}:\n{report}");
        }
    }
}
