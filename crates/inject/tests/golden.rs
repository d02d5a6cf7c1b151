//! Golden tests: every `tests/golden/*.in.yaml` injected with the default settings must equal
//! its checked-in `*.out.yaml` (`LATCH_UPDATE_GOLDEN=1` rewrites them; review the diff). Then
//! what a user relies on: injecting twice changes nothing, opt-outs are honoured, excluded
//! ports reach the iptables command, the commands are ones latch-proxy accepts, the patch
//! applied by an independent RFC 6902 implementation gives the same pod, bad input is refused.

use std::path::{Path, PathBuf};

use clap::Parser;
use latch_inject::manifest::{ManifestError, Outcome, inject_manifests};
use latch_inject::{InjectConfig, InjectError, SkipReason, inject};
use serde_json::{Value, json};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// (name, input text, path of the expected output) for every golden case.
fn cases() -> Vec<(String, String, PathBuf)> {
    let mut cases: Vec<_> = std::fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|entry| {
            let path = entry.unwrap().path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".in.yaml")?
                .to_string();
            let input = std::fs::read_to_string(&path).unwrap();
            Some((
                name.clone(),
                input,
                golden_dir().join(format!("{name}.out.yaml")),
            ))
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 4, "golden cases are missing");
    cases
}

fn run(yaml: &str) -> (String, Vec<Outcome>) {
    inject_manifests(yaml, &InjectConfig::default()).expect("injection succeeds")
}

fn golden_output(name: &str) -> String {
    std::fs::read_to_string(golden_dir().join(format!("{name}.out.yaml"))).unwrap()
}

/// Every document of a YAML stream, as JSON values.
fn documents(yaml: &str) -> Vec<Value> {
    let mut reader = yaml.as_bytes();
    serde_saphyr::read::<_, Value>(&mut reader)
        .map(|doc| doc.unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

#[test]
fn injected_manifests_match_the_golden_files() {
    let update = std::env::var_os("LATCH_UPDATE_GOLDEN").is_some();
    for (name, input, expected_path) in cases() {
        let (output, _) = run(&input);
        if update {
            std::fs::write(&expected_path, &output).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!(
                "{} is missing; run with LATCH_UPDATE_GOLDEN=1 to create it",
                expected_path.display()
            )
        });
        assert_eq!(
            output,
            expected,
            "{name}: output differs from {} (LATCH_UPDATE_GOLDEN=1 rewrites it)",
            expected_path.display()
        );
    }
}

#[test]
fn injecting_twice_changes_nothing() {
    for (name, _, _) in cases() {
        let once = golden_output(&name);
        let (twice, outcomes) = run(&once);
        assert_eq!(twice, once, "{name}: a second injection changed the output");
        assert!(
            outcomes.iter().all(|o| o.skipped.is_some()),
            "{name}: {outcomes:?}"
        );
    }
    let (_, outcomes) = run(&golden_output("deployment"));
    assert_eq!(
        outcomes,
        [Outcome {
            object: "Deployment/api".into(),
            skipped: Some(SkipReason::AlreadyInjected),
            warnings: Vec::new(),
        }]
    );
}

#[test]
fn opted_out_and_host_network_pods_are_left_alone() {
    let input = std::fs::read_to_string(golden_dir().join("opt-out.in.yaml")).unwrap();
    let (output, outcomes) = run(&input);
    let skipped: Vec<_> = outcomes
        .iter()
        .map(|o| (o.object.as_str(), o.skipped))
        .collect();
    assert_eq!(
        skipped,
        [
            ("Pod/debug", Some(SkipReason::OptedOut)),
            ("StatefulSet/db", Some(SkipReason::OptedOut)),
            ("DaemonSet/node-agent", Some(SkipReason::HostNetwork)),
        ]
    );
    assert_eq!(documents(&output), documents(&input), "nothing may change");
    assert!(!output.contains("latch-proxy"));
}

/// The container named `name` among the pod template's init containers.
fn init_container<'a>(template: &'a Value, name: &str) -> &'a Value {
    template["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no init container {name}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn excluded_ports_reach_the_iptables_rules() {
    let docs = documents(&golden_output("deployment"));
    let template = &docs[1]["spec"]["template"];
    let command = strings(&init_container(template, "latch-iptables")["command"]);
    assert_eq!(
        command,
        [
            "latch-proxy",
            "iptables",
            "install",
            "--proxy-uid",
            "1337",
            "--exclude-outbound-ports",
            "22,5432",
            "--exclude-inbound-ports",
            "9090"
        ]
    );
    // The same command line, read by latch-proxy's own parser, yields rules that let those
    // ports through.
    let mut print = command.clone();
    print[2] = "print".into();
    let cli = latch_proxy::Cli::try_parse_from(&print).expect("latch-proxy accepts the command");
    let Some(latch_proxy::config::Command::Iptables {
        proxy_uid,
        exclude_outbound_ports,
        exclude_inbound_ports,
        ..
    }) = cli.command
    else {
        panic!("not the iptables subcommand");
    };
    let rules = latch_proxy::capture::CaptureRules {
        proxy_uid,
        exclude_outbound_ports,
        exclude_inbound_ports,
    }
    .render(latch_proxy::capture::Family::V4);
    for rule in [
        "-A LATCH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A LATCH_OUTPUT -p tcp --dport 22 -j RETURN",
        "-A LATCH_OUTPUT -p tcp --dport 5432 -j RETURN",
        "-A LATCH_INBOUND -p tcp --dport 9090 -j RETURN",
    ] {
        assert!(
            rules.lines().any(|l| l == rule),
            "{rule} missing in\n{rules}"
        );
    }

    // Without annotations: no exclusion flags at all.
    let docs = documents(&golden_output("pod"));
    let command = strings(&init_container(&docs[0], "latch-iptables")["command"]);
    assert_eq!(
        command,
        ["latch-proxy", "iptables", "install", "--proxy-uid", "1337"]
    );
}

#[test]
fn the_sidecar_runs_first_as_a_native_sidecar_that_latch_proxy_accepts() {
    let docs = documents(&golden_output("deployment"));
    let template = &docs[1]["spec"]["template"];
    let names: Vec<_> = template["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["latch-iptables", "latch-proxy", "migrate"]);
    let proxy = init_container(template, "latch-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        proxy["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );

    // The kubelet expands $(VAR) from the container's env; do the same, then parse the
    // command line with latch-proxy's own flags.
    let env: Vec<(String, String)> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            if let Some(value) = e["value"].as_str() {
                return (e["name"].as_str().unwrap().to_string(), value.to_string());
            }
            let field = e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap();
            let value = match field {
                "metadata.name" => "api-7c9d-x2k4f",
                "metadata.namespace" => "demo",
                other => panic!("unexpected fieldRef {other}"),
            };
            (e["name"].as_str().unwrap().to_string(), value.to_string())
        })
        .collect();
    let mut argv = strings(&proxy["command"]);
    for arg in strings(&proxy["args"]) {
        argv.push(env.iter().fold(arg, |arg, (name, value)| {
            arg.replace(&format!("$({name})"), value)
        }));
    }
    let args = latch_proxy::Cli::try_parse_from(&argv)
        .expect("latch-proxy accepts the sidecar's arguments")
        .run;
    assert_eq!(args.workload_name.as_deref(), Some("demo/api-7c9d-x2k4f"));
    assert_eq!(args.control_plane, "latch-control.latch-system.svc:15010");
    assert!(args.transparent);
    assert_eq!(args.admin.port(), 15020);
    // The files the flags name are where the volumes are mounted.
    let mounts = proxy["volumeMounts"].as_array().unwrap();
    let mounted = |volume: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == volume)
            .map(|m| PathBuf::from(m["mountPath"].as_str().unwrap()))
            .unwrap()
    };
    assert_eq!(
        args.token_file.unwrap().parent().unwrap(),
        mounted("latch-token")
    );
    assert_eq!(
        args.ca_bundle.unwrap().parent().unwrap(),
        mounted("latch-ca-bundle")
    );
    let volumes = template["spec"]["volumes"].as_array().unwrap();
    let token = volumes.iter().find(|v| v["name"] == "latch-token").unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "latch"
    );
    let bundle = volumes
        .iter()
        .find(|v| v["name"] == "latch-ca-bundle")
        .unwrap();
    assert_eq!(bundle["configMap"]["name"], "latch-ca-bundle");
    // The pod's own volume is still there, first.
    assert_eq!(volumes[0]["name"], "config");
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

fn mount_path<'a>(container: &'a Value, volume: &str) -> Option<&'a str> {
    container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == volume)?["mountPath"]
        .as_str()
}

#[test]
fn every_app_container_finds_the_workload_api_socket_the_proxy_serves() {
    let docs = documents(&golden_output("workload-api"));
    let pod = &docs[0];
    let proxy = init_container(pod, "latch-proxy");
    let args = latch_proxy::Cli::try_parse_from(strings(&proxy["command"]).into_iter().chain(
        strings(&proxy["args"]).into_iter().map(|arg| {
            // What the kubelet expands from the Downward API env.
            arg.replace("$(LATCH_POD_NAMESPACE)", "demo")
                .replace("$(LATCH_POD_NAME)", "spiffe-app")
        }),
    ))
    .expect("latch-proxy accepts the sidecar's arguments")
    .run;
    let socket = args
        .workload_api
        .expect("the proxy serves the Workload API");
    assert_eq!(
        args.workload_api_allow_uid,
        [latch_proxy::config::AllowedUid::Any],
        "the volume is private to the pod, so any of its uids may connect"
    );
    let dir = mount_path(proxy, "latch-workload-api").expect("the proxy mounts the volume");
    let path = socket.strip_prefix("unix://").unwrap();
    assert_eq!(Path::new(path).parent().unwrap(), Path::new(dir));
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "latch-workload-api")
        .unwrap();
    assert_eq!(
        volume["emptyDir"]["medium"], "Memory",
        "pod-private, in memory"
    );

    // The app's containers and its own init container: the socket where the proxy makes it,
    // read-only, and the variable SPIFFE libraries read; their own env and mounts stay.
    let app = &pod["spec"]["containers"][0];
    let fetch = init_container(pod, "fetch-config");
    for container in [app, fetch] {
        assert_eq!(
            env_value(container, "SPIFFE_ENDPOINT_SOCKET"),
            Some(&*socket)
        );
        assert_eq!(mount_path(container, "latch-workload-api"), Some(dir));
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "latch-workload-api")
            .unwrap();
        assert_eq!(mount["readOnly"], true);
    }
    assert_eq!(env_value(app, "LOG_LEVEL"), Some("debug"));
    assert_eq!(mount_path(app, "data"), Some("/data"));
    // A container that names its own socket keeps it.
    let helper = &pod["spec"]["containers"][1];
    assert_eq!(
        env_value(helper, "SPIFFE_ENDPOINT_SOCKET"),
        Some("unix:///custom/agent.sock")
    );
    assert_eq!(helper["env"].as_array().unwrap().len(), 1);

    // Opted out: the proxy, without socket, volume or variable.
    let opted_out = &docs[1];
    let proxy = init_container(opted_out, "latch-proxy");
    assert!(!strings(&proxy["args"]).contains(&"--workload-api".to_string()));
    assert!(mount_path(proxy, "latch-workload-api").is_none());
    assert!(opted_out["spec"]["containers"][0].get("env").is_none());
    assert!(
        !opted_out["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "latch-workload-api")
    );
}

/// Every pod and pod template of the golden inputs.
fn pods_of_golden_inputs() -> Vec<Value> {
    let mut pods = Vec::new();
    for (_, input, _) in cases() {
        for doc in documents(&input) {
            let mut objects = vec![doc.clone()];
            if doc["kind"] == "List" {
                objects = doc["items"].as_array().unwrap().clone();
            }
            for object in objects {
                for pointer in ["", "/spec/template", "/spec/jobTemplate/spec/template"] {
                    if let Some(pod) = object.pointer(pointer)
                        && pod
                            .get("spec")
                            .is_some_and(|s| s.get("containers").is_some())
                    {
                        pods.push(pod.clone());
                    }
                }
            }
        }
    }
    assert!(pods.len() >= 8, "found only {} pods", pods.len());
    pods
}

#[test]
fn the_patch_applied_by_json_patch_gives_the_injected_pod() {
    let config = InjectConfig::default();
    let mut injected = 0;
    for pod in pods_of_golden_inputs() {
        let injection = inject(&pod, &config).unwrap();
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::to_value(&injection.patch).unwrap()).unwrap();
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        assert_eq!(patched, injection.pod);
        if injection.skipped.is_none() {
            injected += 1;
            assert_ne!(patched, pod);
        } else {
            assert!(injection.patch.is_empty());
        }
    }
    assert!(injected >= 5, "only {injected} pods were injected");
}

fn pod_with_annotations(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "demo", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    })
}

#[test]
fn bad_annotations_are_refused_with_the_annotation_and_value() {
    let config = InjectConfig::default();
    for (annotations, expected) in [
        (
            json!({"latch.dev/exclude-outbound-ports": "22,ssh"}),
            "annotation latch.dev/exclude-outbound-ports: \"22,ssh\" is not valid: \"ssh\" is not a port (1-65535)",
        ),
        (
            json!({"latch.dev/exclude-inbound-ports": "70000"}),
            "annotation latch.dev/exclude-inbound-ports: \"70000\" is not valid: \"70000\" is not a port",
        ),
        (
            json!({"latch.dev/exclude-inbound-ports": "0"}),
            "\"0\" is not a port",
        ),
        (
            json!({"latch.dev/exclude-outbound-ports": "22,,23"}),
            "empty entry",
        ),
        (
            json!({"latch.dev/inject": "no"}),
            "annotation latch.dev/inject \"no\" is not valid",
        ),
        (
            json!({"latch.dev/workload-api": "off"}),
            "annotation latch.dev/workload-api \"off\" is not valid",
        ),
        // Refused even when the pod opts out: a typo must not wait for the opt-in to surface.
        (
            json!({"latch.dev/inject": "false", "latch.dev/exclude-outbound-ports": "x"}),
            "\"x\" is not a port",
        ),
    ] {
        let err = inject(&pod_with_annotations(annotations.clone()), &config)
            .expect_err(&format!("{annotations} must be refused"));
        assert!(err.to_string().contains(expected), "{annotations}: {err}");
    }

    // Through a manifest, the error names the document.
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\n\
                apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api}\nspec:\n  template:\n    \
                metadata:\n      annotations: {latch.dev/exclude-outbound-ports: \"ssh\"}\n    \
                spec:\n      containers: [{name: api, image: api}]\n";
    let err = inject_manifests(yaml, &config).unwrap_err();
    assert!(
        matches!(&err, ManifestError::Inject { index: 2, what, source: InjectError::BadPorts { .. } } if what == "Deployment/api"),
        "{err}"
    );
    assert!(
        err.to_string().starts_with(
            "document 2 (Deployment/api): annotation latch.dev/exclude-outbound-ports"
        ),
        "{err}"
    );
}

#[test]
fn apps_running_as_the_proxy_uid_are_refused() {
    let config = InjectConfig::default();
    let refused = |edit: &dyn Fn(&mut Value)| {
        let mut pod = pod_with_annotations(json!({}));
        pod["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m:1"}]);
        edit(&mut pod);
        inject(&pod, &config).map(|_| ()).map_err(|e| e.to_string())
    };
    for (edit, whom) in [
        (
            &(|p: &mut Value| p["spec"]["securityContext"] = json!({"runAsUser": 1337}))
                as &dyn Fn(&mut Value),
            "the pod runs as uid 1337",
        ),
        (
            &|p: &mut Value| {
                p["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 1337})
            },
            "container \"app\" runs as uid 1337",
        ),
        (
            &|p: &mut Value| {
                p["spec"]["initContainers"][0]["securityContext"] = json!({"runAsUser": 1337})
            },
            "init container \"migrate\" runs as uid 1337",
        ),
        (
            // Overridden by every container today, but an ephemeral debug container added
            // later would inherit it.
            &|p: &mut Value| {
                p["spec"]["securityContext"] = json!({"runAsUser": 1337});
                p["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 1000});
            },
            "the pod runs as uid 1337",
        ),
    ] {
        let err = refused(edit).expect_err(whom);
        assert!(err.starts_with(whom), "{err}");
        assert!(err.contains("bypass the mesh"), "{err}");
    }
    // Other uids, and group 1337 (the capture rules match the owner uid only), are injected.
    for edit in [
        &(|p: &mut Value| p["spec"]["securityContext"] = json!({"runAsUser": 1000}))
            as &dyn Fn(&mut Value),
        &|p: &mut Value| {
            p["spec"]["containers"][0]["securityContext"] =
                json!({"runAsUser": 1338, "runAsGroup": 1337})
        },
    ] {
        assert_eq!(refused(edit), Ok(()));
    }
    // Not meshed, so not refused: an opted-out pod running as 1337.
    let mut pod = pod_with_annotations(json!({"latch.dev/inject": "false"}));
    pod["spec"]["securityContext"] = json!({"runAsUser": 1337});
    assert!(inject(&pod, &config).unwrap().skipped.is_some());
    // Through a manifest, as `latchctl inject` sees it.
    let yaml = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api}\nspec:\n  template:\n    \
                spec:\n      securityContext: {runAsUser: 1337}\n      containers: [{name: api, image: api}]\n";
    let err = inject_manifests(yaml, &config).unwrap_err();
    assert!(
        matches!(
            &err,
            ManifestError::Inject {
                source: InjectError::ProxyUid { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn pods_that_would_break_are_refused() {
    let config = InjectConfig::default();
    let mut pod = pod_with_annotations(json!({}));
    pod["spec"]["volumes"] = json!([{"name": "latch-token", "emptyDir": {}}]);
    assert_eq!(
        inject(&pod, &config),
        Err(InjectError::NameTaken {
            kind: "volume",
            name: "latch-token".into()
        })
    );
    let mut pod = pod_with_annotations(json!({}));
    pod["spec"]["containers"][0]["ports"] = json!([{"containerPort": 15008}]);
    assert_eq!(
        inject(&pod, &config),
        Err(InjectError::PortTaken {
            container: "app".into(),
            port: 15008
        })
    );
    // A mount where the Workload API socket goes: the API server would refuse the pod for a
    // duplicate mount path; the injector says why, and the opt-out still injects.
    let mut pod = pod_with_annotations(json!({}));
    pod["spec"]["containers"][0]["volumeMounts"] =
        json!([{"name": "mine", "mountPath": "/var/run/latch/workload-api/"}]);
    let refused = inject(&pod, &config).unwrap_err();
    assert_eq!(
        refused,
        InjectError::MountTaken {
            container: "app".into()
        }
    );
    assert!(
        refused
            .to_string()
            .contains("latch.dev/workload-api: \"false\""),
        "{refused}"
    );
    pod["metadata"]["annotations"] = json!({"latch.dev/workload-api": "false"});
    assert!(inject(&pod, &config).unwrap().skipped.is_none());
    assert!(matches!(
        inject(&json!({"kind": "Pod", "metadata": {}}), &config),
        Err(InjectError::NotAPod(_))
    ));
    let err = inject_manifests(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 1}\n",
        &config,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("no pod template at /spec/template"),
        "{err}"
    );
}

#[test]
fn settings_reach_the_containers() {
    let config = InjectConfig {
        image: "registry.example/latch:1.2.3".into(),
        control_plane: "cp.example:15010".into(),
        trust_domain: "prod.example".into(),
        ..InjectConfig::default()
    };
    let injection = inject(&pod_with_annotations(json!({})), &config).unwrap();
    let iptables = init_container(&injection.pod, "latch-iptables");
    let proxy = init_container(&injection.pod, "latch-proxy");
    assert_eq!(iptables["image"], "registry.example/latch:1.2.3");
    assert_eq!(proxy["image"], "registry.example/latch:1.2.3");
    let args = strings(&proxy["args"]);
    let after = |flag: &str| {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1].clone()
    };
    assert_eq!(after("--control-plane"), "cp.example:15010");
    assert_eq!(after("--trust-domain"), "prod.example");
    // The pod's existing annotations stay, with the status added.
    let status: Value = serde_json::from_str(
        injection.pod["metadata"]["annotations"]["latch.dev/status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        status["initContainers"],
        json!(["latch-iptables", "latch-proxy"])
    );
}

/// The pod's `latch.dev/app-probes` as latch-proxy reads it (`--app-probes`).
fn app_probes_of(pod: &Value) -> latch_proxy::app_probes::AppProbes {
    let json = pod["metadata"]["annotations"]["latch.dev/app-probes"]
        .as_str()
        .expect("the annotation is set");
    latch_proxy::app_probes::AppProbes::parse(json).expect("latch-proxy accepts the probes")
}

#[test]
fn rewritten_probes_are_what_the_proxy_runs_and_opting_out_keeps_them() {
    let template = |annotations: Value| {
        let mut pod = pods_of_golden_inputs()
            .into_iter()
            .find(|p| p["spec"]["containers"][0].get("readinessProbe").is_some())
            .expect("the probes golden input");
        pod["metadata"]["annotations"] = annotations;
        pod
    };
    let injected = inject(&template(json!({})), &InjectConfig::default())
        .unwrap()
        .pod;
    let names: Vec<String> = app_probes_of(&injected).names().map(String::from).collect();
    assert_eq!(
        names,
        [
            "api/readiness",
            "web/liveness",
            "web/readiness",
            "web/startup"
        ],
        "exec probes and probes of another host are left alone"
    );
    for (container, kind, field) in [
        (0, "startup", "startupProbe"),
        (0, "readiness", "readinessProbe"),
        (0, "liveness", "livenessProbe"),
        (1, "readiness", "readinessProbe"),
    ] {
        let probe = &injected["spec"]["containers"][container][field];
        let name = injected["spec"]["containers"][container]["name"]
            .as_str()
            .unwrap();
        assert_eq!(
            probe["httpGet"],
            json!({"path": format!("/app-health/{name}/{kind}"), "port": 15020, "scheme": "HTTP"})
        );
        assert!(probe.get("tcpSocket").is_none() && probe.get("grpc").is_none());
    }

    let kept = inject(
        &template(json!({"latch.dev/rewrite-probes": "false"})),
        &InjectConfig::default(),
    )
    .unwrap()
    .pod;
    let original = template(json!({}));
    for container in 0..2 {
        for field in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                kept["spec"]["containers"][container][field],
                original["spec"]["containers"][container][field],
                "{field} kept as written"
            );
        }
    }
    assert!(
        kept["metadata"]["annotations"]
            .get("latch.dev/app-probes")
            .is_none()
    );
}

#[test]
fn probes_the_kubelet_could_not_run_are_refused_with_what_to_fix() {
    let pod = |probe: Value, annotations: Value| {
        json!({
            "metadata": {"name": "p", "annotations": annotations},
            "spec": {"containers": [{
                "name": "app", "image": "app:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": probe,
            }]},
        })
    };
    let config = InjectConfig::default();
    let err = inject(
        &pod(json!({"httpGet": {"port": "htp"}}), json!({})),
        &config,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            "container \"app\" readinessProbe: the container declares no port named \"htp\""
        ) && err.contains("latch.dev/rewrite-probes: \"false\""),
        "{err}"
    );
    let err = inject(
        &pod(
            json!({"tcpSocket": {"port": 8080}}),
            json!({"latch.dev/rewrite-probes": "no"}),
        ),
        &config,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("latch.dev/rewrite-probes: \"no\" is not valid"),
        "{err}"
    );
    let err = inject(
        &pod(
            json!({"tcpSocket": {"port": 8080}}),
            json!({"latch.dev/proxy-cpu-limit": "10 cores"}),
        ),
        &config,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("latch.dev/proxy-cpu-limit: \"10 cores\" is not valid"),
        "{err}"
    );
}
