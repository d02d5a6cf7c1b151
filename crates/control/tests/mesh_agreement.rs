//! Whatever the control plane accepts, every proxy accepts: generated config entries go through
//! the control plane's validation (`MeshModel::build`), its encoding into discovery resources
//! (`MeshSnapshot::build`) and the proxy's conversion of each resource
//! (`latch_mesh::from_resource`, what the proxy's xDS client runs on every resource), and the
//! proxy must accept each one and read back exactly the entry the control plane built.

use std::collections::BTreeMap;

use latch_control::mesh::spec::{
    MeshSettingsSpec, PolicySpec, PrincipalSpec, RuleSpec, ServicePortSpec, ServiceSpec,
    WorkloadSpec,
};
use latch_control::mesh::{MeshModel, MeshSnapshot, ResourceType};
use latch_identity::TrustDomain;
use latch_mesh::{MeshConfig, Policy, Principal, Resource, Service, Workload, from_resource};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

const PEM: &str = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n";

/// Mostly valid names, sometimes anything.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["web", "api", "db", "a.b_c-1", "ns"]).prop_map(String::from),
        2 => "[a-z0-9._-]{1,6}",
        1 => ".{0,5}",
    ]
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "10\\.0\\.[0-9]{1,2}\\.[0-9]{1,3}",
        2 => "fd00::[0-9a-f]{1,4}",
        1 => ".{0,6}",
    ]
}

fn port() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => 1u32..=65535,
        1 => Just(0u32),
        1 => 65536u32..=70000,
    ]
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(
        prop_oneof![8 => "[a-z/.]{1,4}", 1 => ".{0,3}"],
        "[a-z]{0,3}",
        0..3,
    )
}

fn spiffe_id() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "spiffe://cluster\\.local/ns/[a-z]{1,3}/sa/[a-z]{1,3}",
        2 => "spiffe://(other\\.org|cluster\\.local)(/[a-z.]{0,3}){0,3}",
        1 => Just("spiffe:///ns/x".to_string()),
        1 => ".{0,8}",
    ]
}

/// Principal prefixes: mostly accepted ones (whole segments of cluster.local), then the near
/// misses (no final '/', another trust domain) and the shapes the two sides once disagreed on.
fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "spiffe://cluster\\.local/(ns/[a-z]{1,3}/(sa/[a-z]{1,3}/)?)?",
        2 => "spiffe://(cluster\\.local|other\\.org)/ns/[a-z]{0,3}/?",
        2 => prop::sample::select(vec![
            "spiffe:///ns/x",
            "spiffe://",
            "spiffe:///",
            "spiffe://c",
            "spiffe://c/",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a/sa/web",
            "spiffe:/x",
            "http://x/",
        ])
        .prop_map(String::from),
        2 => "spiffe://[a-z./]{0,6}",
        1 => ".{0,8}",
    ]
}

fn workload() -> impl Strategy<Value = WorkloadSpec> {
    (
        name(),
        name(),
        prop_oneof![
            6 => name().prop_map(|sa| (Some(sa), None)),
            3 => spiffe_id().prop_map(|id| (None, Some(id))),
            1 => Just((None, None)),
        ],
        vec(ip(), 0..3),
        option::of(port()),
        labels(),
    )
        .prop_map(
            |(name, namespace, (service_account, spiffe_id), ips, mesh_port, labels)| {
                WorkloadSpec {
                    name,
                    namespace,
                    service_account,
                    spiffe_id,
                    ips,
                    mesh_port,
                    labels,
                }
            },
        )
}

fn service() -> impl Strategy<Value = ServiceSpec> {
    let port_spec =
        (port(), option::of(port()), "[a-z]{0,3}").prop_map(|(port, target_port, name)| {
            ServicePortSpec {
                port,
                target_port,
                name,
            }
        });
    (
        name(),
        name(),
        vec(ip(), 0..3),
        vec(prop_oneof![6 => "[a-z.]{1,8}", 1 => ".{0,4}"], 0..2),
        vec(port_spec, 0..3),
        prop_oneof![
            3 => labels().prop_map(|s| (Some(s), None)),
            3 => vec(ip(), 0..3).prop_map(|e| (None, Some(e))),
            1 => Just((None, None)),
        ],
    )
        .prop_map(
            |(name, namespace, vips, hostnames, ports, (selector, endpoints))| ServiceSpec {
                name,
                namespace,
                vips,
                hostnames,
                ports,
                selector,
                endpoints,
            },
        )
}

fn policy() -> impl Strategy<Value = PolicySpec> {
    let principal = prop_oneof![
        4 => spiffe_id().prop_map(|id| PrincipalSpec { exact: Some(id), prefix: None }),
        4 => prefix().prop_map(|p| PrincipalSpec { exact: None, prefix: Some(p) }),
        1 => Just(PrincipalSpec::default()),
    ];
    let rule = (vec(principal, 1..3), vec(name(), 0..2), vec(port(), 0..2)).prop_map(
        |(principals, namespaces, ports)| RuleSpec {
            principals,
            namespaces,
            ports,
        },
    );
    (
        name(),
        name(),
        labels(),
        prop::sample::select(vec!["ALLOW", "deny", "Allow", "DENY", "PERMIT"]),
        vec(rule, 0..3),
    )
        .prop_map(|(name, namespace, selector, action, rules)| PolicySpec {
            name,
            namespace,
            selector,
            action: action.to_string(),
            rules,
        })
}

fn settings() -> impl Strategy<Value = MeshSettingsSpec> {
    let mode = prop::sample::select(vec!["STRICT", "permissive", "Strict", "OFF"]);
    (
        option::of(mode.clone()),
        btree_map(port(), mode, 0..3),
        option::of(prop::sample::select(vec![
            "passthrough",
            "registry-only",
            "REGISTRY_ONLY",
            "deny",
        ])),
    )
        .prop_map(|(mtls, port_mtls, outbound_policy)| MeshSettingsSpec {
            mtls: mtls.map(String::from),
            port_mtls: port_mtls
                .into_iter()
                .map(|(p, m)| (p, m.to_string()))
                .collect(),
            outbound_policy: outbound_policy.map(String::from),
        })
}

/// The proxy's view of every resource of `ty` in `snapshot`, by name; panics on a refusal.
fn proxy_reads<R: Resource>(snapshot: &MeshSnapshot, ty: ResourceType) -> BTreeMap<String, R> {
    snapshot
        .resources(ty)
        .iter()
        .map(|(name, resource)| {
            let value = from_resource::<R>(name, Some(&resource.body)).unwrap_or_else(|e| {
                panic!("the control plane sent {name:?}, which a proxy refuses: {e}")
            });
            (name.to_string(), value)
        })
        .collect()
}

/// Encodes an accepted model and checks that a proxy reads back exactly what was encoded.
fn check_agreement(model: MeshModel) {
    // Revocations of the model's workload IDs, at whole seconds (what the MeshConfig carries).
    let revocations: BTreeMap<_, _> = model
        .workloads
        .values()
        .enumerate()
        .map(|(i, w)| {
            let at =
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + i as u64);
            (w.spiffe_id.clone(), at)
        })
        .collect();
    let snapshot = MeshSnapshot::build(model.clone(), PEM, &revocations, None, 1);
    let config: BTreeMap<String, MeshConfig> = proxy_reads(&snapshot, ResourceType::MeshConfig);
    let config = &config[latch_proto::MESH_CONFIG_NAME];
    assert_eq!(config.settings, model.settings);
    assert_eq!(config.trust_bundle_pem, PEM);
    assert_eq!(config.revocations, revocations);
    let workloads: BTreeMap<String, Workload> = proxy_reads(&snapshot, ResourceType::Workload);
    assert_eq!(workloads, model.workloads);
    let services: BTreeMap<String, Service> = proxy_reads(&snapshot, ResourceType::Service);
    assert_eq!(services, model.services);
    let policies: BTreeMap<String, Policy> =
        proxy_reads(&snapshot, ResourceType::AuthorizationPolicy);
    assert_eq!(policies, model.policies);
    // What the control plane accepts names callers of its trust domain, by whole segments.
    for policy in model.policies.values() {
        for principal in policy.rules.iter().flat_map(|r| &r.principals) {
            match principal {
                Principal::Exact(id) => assert_eq!(
                    latch_identity::SpiffeId::parse(id)
                        .map(|id| id.trust_domain_name().to_string()),
                    Ok("cluster.local".to_string()),
                    "{id}"
                ),
                Principal::Prefix(p) => assert!(
                    p.starts_with("spiffe://cluster.local/") && p.ends_with('/'),
                    "{p}"
                ),
            }
        }
    }
}

/// Builds and checks the model, if the control plane accepts it.
fn check_if_accepted(
    settings: &MeshSettingsSpec,
    workloads: &[WorkloadSpec],
    services: &[ServiceSpec],
    policies: &[PolicySpec],
) -> bool {
    let td = TrustDomain::new("cluster.local").expect("valid trust domain");
    match MeshModel::build(&td, settings, workloads, services, policies) {
        Ok(model) => {
            check_agreement(model);
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn what_the_control_plane_accepts_every_proxy_accepts(
        settings in settings(),
        workloads in vec(workload(), 0..3),
        services in vec(service(), 0..3),
        policies in vec(policy(), 0..3),
    ) {
        // Each entry on its own (most are accepted), then all together.
        check_if_accepted(&settings, &[], &[], &[]);
        for w in &workloads {
            check_if_accepted(&MeshSettingsSpec::default(), std::slice::from_ref(w), &[], &[]);
        }
        for s in &services {
            check_if_accepted(&MeshSettingsSpec::default(), &workloads, std::slice::from_ref(s), &[]);
        }
        for p in &policies {
            check_if_accepted(&MeshSettingsSpec::default(), &[], &[], std::slice::from_ref(p));
        }
        check_if_accepted(&settings, &workloads, &services, &policies);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Principals alone, in an otherwise valid policy: the rule the two sides once disagreed on.
    #[test]
    fn principals_the_control_plane_accepts_every_proxy_accepts(
        exact in option::of(spiffe_id()),
        prefix in option::of(prefix()),
    ) {
        let policy = PolicySpec {
            name: "p".into(),
            namespace: "demo".into(),
            action: "ALLOW".into(),
            rules: vec![RuleSpec {
                principals: vec![PrincipalSpec { exact, prefix }],
                ..RuleSpec::default()
            }],
            ..PolicySpec::default()
        };
        check_if_accepted(&MeshSettingsSpec::default(), &[], &[], &[policy]);
    }
}

/// The generators reach the accepting side often enough for the property to mean something.
#[test]
fn generated_entries_are_often_accepted() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut accepted = [0; 3];
    for _ in 0..200 {
        let w = workload().new_tree(&mut runner).expect("tree").current();
        let s = service().new_tree(&mut runner).expect("tree").current();
        let p = policy().new_tree(&mut runner).expect("tree").current();
        let none = MeshSettingsSpec::default();
        accepted[0] += usize::from(check_if_accepted(&none, &[w], &[], &[]));
        accepted[1] += usize::from(check_if_accepted(&none, &[], &[s], &[]));
        accepted[2] += usize::from(check_if_accepted(&none, &[], &[], &[p]));
    }
    assert!(
        accepted.iter().all(|n| *n >= 20),
        "accepted workloads, services, policies of 200: {accepted:?}"
    );
}
