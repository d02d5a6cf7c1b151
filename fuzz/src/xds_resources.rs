//! xDS resource decoding as the proxy does it: a `DeltaDiscoveryResponse` (protobuf, as it comes
//! off the stream) through `discovery::apply` onto a held state, then `MeshSnapshot::build`.
//! A response is applied all or nothing, only to its own type; what is held afterwards is
//! exactly what was sent (with its version), minus what was removed, and every value is valid
//! and faithful to its message; applying the same response again changes nothing.
//!
//! Input: a selector byte (0-3: force the type URL to MeshConfig, Workload, Service,
//! AuthorizationPolicy; otherwise keep the decoded one), then the encoded response.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::SystemTime;

use latch_identity::{CertStore, SpiffeId};
use latch_mesh::{Action, Principal};
use latch_proto::discovery::{DeltaDiscoveryResponse, Resource};
use latch_proto::mesh::{self, authorization_policy, principal_match};
use latch_proto::type_url;
use latch_proxy::state::Discovered;
use latch_proxy::xds::apply;
use latch_proxy::{LocalConfig, MeshSnapshot};
use prost::Message;

use crate::fixtures;

/// The proxy's certificate store: the fuzzing CA's bundle, no SVID of its own.
fn store() -> &'static CertStore {
    static STORE: OnceLock<CertStore> = OnceLock::new();
    STORE.get_or_init(|| CertStore::new((*fixtures::ca().bundle()).clone()))
}

fn resource<M: Message>(url: &str, name: &str, version: &str, message: &M) -> Resource {
    Resource::of(url, name, version, message)
}

fn response(url: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: url.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        nonce: "n1".into(),
        system_version_info: "s1".into(),
    }
}

fn workload(name: &str, id: &str, ips: &[&str]) -> mesh::Workload {
    mesh::Workload {
        name: name.into(),
        namespace: "demo".into(),
        spiffe_id: id.into(),
        ips: ips.iter().map(|s| s.to_string()).collect(),
        mesh_port: 15008,
        ..mesh::Workload::default()
    }
}

fn service(name: &str, vip: &str) -> mesh::Service {
    mesh::Service {
        name: name.into(),
        namespace: "demo".into(),
        vips: vec![vip.into()],
        ports: vec![mesh::ServicePort {
            port: 80,
            target_port: 8080,
            name: "http".into(),
        }],
        endpoints: vec![mesh::Endpoint {
            ip: "10.0.0.3".into(),
        }],
        ..mesh::Service::default()
    }
}

fn policy(name: &str, action: authorization_policy::Action) -> mesh::AuthorizationPolicy {
    let principal = |m| mesh::PrincipalMatch { r#match: Some(m) };
    mesh::AuthorizationPolicy {
        name: name.into(),
        namespace: "demo".into(),
        action: action as i32,
        rules: vec![mesh::Rule {
            principals: vec![
                principal(principal_match::Match::Exact(
                    fixtures::AUTHENTICATED.into(),
                )),
                principal(principal_match::Match::Prefix(
                    "spiffe://fuzz.latch/ns/ops/".into(),
                )),
            ],
            namespaces: vec!["demo".into()],
            ports: vec![8080],
        }],
        ..mesh::AuthorizationPolicy::default()
    }
}

fn mesh_config(with_bundle: bool) -> mesh::MeshConfig {
    mesh::MeshConfig {
        mtls_mode: mesh::mesh_config::MtlsMode::Strict as i32,
        port_mtls: BTreeMap::from([(8080, mesh::mesh_config::MtlsMode::Permissive as i32)]),
        trust_bundle_pem: if with_bundle {
            fixtures::ca().bundle().to_pem()
        } else {
            String::new()
        },
        outbound_policy: mesh::mesh_config::OutboundPolicy::RegistryOnly as i32,
        ..mesh::MeshConfig::default()
    }
}

/// One valid response per type: the state the fuzzed response is applied on.
fn base_responses() -> Vec<DeltaDiscoveryResponse> {
    let w = type_url::WORKLOAD;
    let s = type_url::SERVICE;
    let p = type_url::AUTHORIZATION_POLICY;
    vec![
        response(
            type_url::MESH_CONFIG,
            vec![resource(
                type_url::MESH_CONFIG,
                "mesh",
                "m1",
                &mesh_config(false),
            )],
            &[],
        ),
        response(
            w,
            vec![
                resource(
                    w,
                    "demo/web",
                    "w1",
                    &workload("web", fixtures::AUTHENTICATED, &["10.0.0.2"]),
                ),
                resource(
                    w,
                    "demo/db",
                    "w1",
                    &workload(
                        "db",
                        "spiffe://fuzz.latch/ns/demo/sa/db",
                        &["10.0.0.3", "fd00::3"],
                    ),
                ),
            ],
            &[],
        ),
        response(
            s,
            vec![
                resource(s, "demo/api", "s1", &service("api", "10.96.0.10")),
                resource(s, "demo/db", "s1", &service("db", "10.96.0.11")),
            ],
            &[],
        ),
        response(
            p,
            vec![
                resource(
                    p,
                    "demo/allow",
                    "p1",
                    &policy("allow", authorization_policy::Action::Allow),
                ),
                resource(
                    p,
                    "demo/deny",
                    "p1",
                    &policy("deny", authorization_policy::Action::Deny),
                ),
            ],
            &[],
        ),
    ]
}

fn base() -> &'static Discovered {
    static BASE: OnceLock<Discovered> = OnceLock::new();
    BASE.get_or_init(|| {
        base_responses()
            .iter()
            .fold(Discovered::default(), |held, response| {
                apply(&held, response, store(), SystemTime::now())
                    .unwrap_or_else(|e| panic!("base response refused: {e:?}"))
            })
    })
}

fn decoded<T: Message + Default>(r: &Resource) -> T {
    let any = r.resource.as_ref().expect("accepted resource has a body");
    T::decode(any.value.as_slice()).expect("accepted resource decodes")
}

fn ips(texts: &[String]) -> Vec<IpAddr> {
    texts
        .iter()
        .map(|t| t.parse().expect("accepted IP parses"))
        .collect()
}

/// Every value held for a resource of `response` is valid and says what its message says.
fn check_faithful(next: &Discovered, response: &DeltaDiscoveryResponse) {
    for r in &response.resources {
        match response.type_url.as_str() {
            type_url::MESH_CONFIG => assert_eq!(r.name, latch_proto::MESH_CONFIG_NAME),
            type_url::WORKLOAD => {
                let m: mesh::Workload = decoded(r);
                let held = &next.workloads[&r.name].value;
                assert_eq!(r.name, format!("{}/{}", m.namespace, m.name));
                assert_eq!(held.resource_name(), r.name);
                assert_eq!(held.spiffe_id.as_str(), m.spiffe_id);
                assert_eq!(held.ips, ips(&m.ips));
                assert_eq!(u32::from(held.mesh_port), m.mesh_port);
                assert_ne!(held.mesh_port, 0);
            }
            type_url::SERVICE => {
                let m: mesh::Service = decoded(r);
                let held = &next.services[&r.name].value;
                assert_eq!(r.name, format!("{}/{}", m.namespace, m.name));
                assert_eq!(held.vips, ips(&m.vips));
                let endpoints: Vec<String> = m.endpoints.iter().map(|e| e.ip.clone()).collect();
                assert_eq!(held.endpoints, ips(&endpoints));
                assert_eq!(
                    held.ports.len(),
                    m.ports.len(),
                    "a port was dropped or merged"
                );
                for (p, held) in m.ports.iter().zip(&held.ports) {
                    assert_ne!(p.port, 0);
                    assert_ne!(p.target_port, 0);
                    assert_eq!(u32::from(held.port), p.port);
                    assert_eq!(u32::from(held.target_port), p.target_port);
                }
            }
            type_url::AUTHORIZATION_POLICY => {
                let m: mesh::AuthorizationPolicy = decoded(r);
                let held = &next.policies[&r.name].value;
                assert_eq!(r.name, format!("{}/{}", m.namespace, m.name));
                assert_eq!(held.resource_name(), r.name);
                let action = match held.action {
                    Action::Allow => authorization_policy::Action::Allow,
                    Action::Deny => authorization_policy::Action::Deny,
                };
                assert_eq!(action as i32, m.action);
                assert_eq!(held.rules.len(), m.rules.len());
                for (rule, message) in held.rules.iter().zip(&m.rules) {
                    assert_eq!(rule.namespaces, message.namespaces);
                    assert!(
                        rule.namespaces
                            .iter()
                            .all(|n| !n.is_empty() && !n.contains('/'))
                    );
                    let ports: Vec<u32> = rule.ports.iter().map(|p| u32::from(*p)).collect();
                    assert_eq!(ports, message.ports);
                    assert!(rule.ports.iter().all(|p| *p != 0));
                    assert_eq!(rule.principals.len(), message.principals.len());
                    for (principal, sent) in rule.principals.iter().zip(&message.principals) {
                        match (principal, &sent.r#match) {
                            (Principal::Exact(id), Some(principal_match::Match::Exact(s))) => {
                                assert_eq!(id, s);
                                assert!(SpiffeId::parse(id).is_ok());
                            }
                            (Principal::Prefix(p), Some(principal_match::Match::Prefix(s))) => {
                                assert_eq!(p, s);
                                let rest = p.strip_prefix("spiffe://").expect("spiffe:// prefix");
                                assert!(!rest.is_empty() && !rest.starts_with('/'));
                                assert!(p.ends_with('/'), "accepted prefix {p:?} without '/'");
                            }
                            other => panic!("principal decoded as {other:?}"),
                        }
                    }
                }
            }
            other => panic!("applied a response of type {other:?}"),
        }
    }
}

/// The snapshot holds what was applied: every workload IP routes to a workload claiming it.
fn check_snapshot(next: &Discovered) {
    let snapshot = MeshSnapshot::build(next, &LocalConfig::default());
    let workloads: Vec<_> = next.workloads.values().map(|h| &h.value).collect();
    for (ip, peer) in &snapshot.peers {
        assert!(workloads.iter().any(|w| w.ips.contains(ip)
            && w.spiffe_id == peer.id
            && w.mesh_port == peer.mesh_port));
    }
    for w in &workloads {
        assert!(w.ips.iter().all(|ip| snapshot.peers.contains_key(ip)));
    }
    for (vip, route) in &snapshot.services {
        let service = &next.services[&route.name].value;
        assert!(service.vips.contains(vip));
        let ports: BTreeMap<u16, u16> = service
            .ports
            .iter()
            .map(|p| (p.port, p.target_port))
            .collect();
        assert_eq!(route.ports, ports);
    }
    assert_eq!(snapshot.policies.len(), next.policies.len());
}

pub fn check(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let Ok(mut response) = DeltaDiscoveryResponse::decode(bytes) else {
        return;
    };
    if let Some(url) = type_url::ALL.get(usize::from(selector)) {
        response.type_url = (*url).to_string();
    }
    let base = base();
    let now = SystemTime::now();
    let next = match apply(base, &response, store(), now) {
        Ok(next) => next,
        Err(reasons) => {
            assert!(!reasons.is_empty() && reasons.iter().all(|r| !r.to_string().is_empty()));
            return;
        }
    };
    let url = response.type_url.as_str();
    for other in type_url::ALL.iter().filter(|t| **t != url) {
        assert_eq!(
            next.versions(other),
            base.versions(other),
            "{other} changed"
        );
    }
    let before = base.versions(url);
    let after = next.versions(url);
    let sent: BTreeMap<&str, &str> = response
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .collect();
    assert_eq!(
        sent.len(),
        response.resources.len(),
        "accepted a name sent twice"
    );
    for (name, version) in &after {
        match sent.get(name.as_str()) {
            Some(v) => assert_eq!(version, v),
            None => {
                assert!(
                    !response.removed_resources.contains(name),
                    "{name} not removed"
                );
                assert_eq!(
                    before.get(name),
                    Some(version),
                    "{name} appeared or changed"
                );
            }
        }
    }
    for name in sent.keys() {
        assert!(
            after.contains_key(*name),
            "{name} was accepted but is not held"
        );
    }
    for (name, _) in before {
        assert!(
            after.contains_key(&name) || response.removed_resources.contains(&name),
            "{name} disappeared without being removed"
        );
    }
    check_faithful(&next, &response);
    check_snapshot(&next);

    let again = apply(&next, &response, store(), now)
        .unwrap_or_else(|e| panic!("a response applied once is refused the second time: {e:?}"));
    for t in type_url::ALL {
        assert_eq!(
            again.versions(t),
            next.versions(t),
            "applying twice changed {t}"
        );
    }
}

pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let w = type_url::WORKLOAD;
    let s = type_url::SERVICE;
    let p = type_url::AUTHORIZATION_POLICY;
    let m = type_url::MESH_CONFIG;
    let keep = 0xff;
    let mut bad_port = workload("bad", fixtures::AUTHENTICATED, &["10.0.0.9"]);
    bad_port.mesh_port = 70000;
    let mut bad_ip = workload("badip", fixtures::AUTHENTICATED, &["10.0.0.x"]);
    bad_ip.mesh_port = 15008;
    let mut twice_port = service("twice", "10.96.0.12");
    twice_port.ports.push(mesh::ServicePort {
        port: 80,
        target_port: 9090,
        name: "again".into(),
    });
    let mut bad_prefix = policy("badprefix", authorization_policy::Action::Allow);
    bad_prefix.rules[0].principals.push(mesh::PrincipalMatch {
        r#match: Some(principal_match::Match::Prefix("spiffe:///x".into())),
    });
    let mut empty_rule = policy("open", authorization_policy::Action::Deny);
    empty_rule.rules = vec![mesh::Rule::default()];
    let cases: Vec<(&str, u8, DeltaDiscoveryResponse)> = vec![
        (
            "mesh-config",
            keep,
            response(m, vec![resource(m, "mesh", "m2", &mesh_config(true))], &[]),
        ),
        (
            "mesh-config-other-name",
            keep,
            response(
                m,
                vec![resource(m, "other", "m2", &mesh_config(false))],
                &[],
            ),
        ),
        (
            "workloads-update-and-remove",
            keep,
            response(
                w,
                vec![resource(
                    w,
                    "demo/api",
                    "w2",
                    &workload(
                        "api",
                        "spiffe://fuzz.latch/ns/demo/sa/api",
                        &["10.0.0.2", "10.0.0.4"],
                    ),
                )],
                &["demo/db"],
            ),
        ),
        (
            "workload-bad-port",
            keep,
            response(w, vec![resource(w, "demo/bad", "w2", &bad_port)], &[]),
        ),
        (
            "workload-bad-ip",
            keep,
            response(w, vec![resource(w, "demo/badip", "w2", &bad_ip)], &[]),
        ),
        (
            "workload-sent-twice",
            keep,
            response(
                w,
                vec![
                    resource(
                        w,
                        "demo/web",
                        "w2",
                        &workload("web", fixtures::AUTHENTICATED, &["10.0.0.2"]),
                    ),
                    resource(
                        w,
                        "demo/web",
                        "w3",
                        &workload("web", fixtures::AUTHENTICATED, &["10.0.0.5"]),
                    ),
                ],
                &[],
            ),
        ),
        (
            "workload-name-mismatch",
            keep,
            response(
                w,
                vec![resource(
                    w,
                    "demo/other",
                    "w2",
                    &workload("web", fixtures::AUTHENTICATED, &[]),
                )],
                &[],
            ),
        ),
        (
            "workload-as-service",
            2,
            response(
                s,
                vec![resource(
                    w,
                    "demo/web",
                    "w2",
                    &workload("web", fixtures::AUTHENTICATED, &[]),
                )],
                &[],
            ),
        ),
        (
            "services",
            keep,
            response(
                s,
                vec![resource(
                    s,
                    "demo/cache",
                    "s2",
                    &service("cache", "fd00::10"),
                )],
                &["demo/api"],
            ),
        ),
        (
            "service-port-twice",
            keep,
            response(s, vec![resource(s, "demo/twice", "s2", &twice_port)], &[]),
        ),
        (
            "policies",
            keep,
            response(
                p,
                vec![resource(p, "demo/open", "p2", &empty_rule)],
                &["demo/allow"],
            ),
        ),
        (
            "policy-bad-prefix",
            keep,
            response(
                p,
                vec![resource(p, "demo/badprefix", "p2", &bad_prefix)],
                &[],
            ),
        ),
        (
            "remove-only",
            1,
            response(w, vec![], &["demo/web", "demo/unknown"]),
        ),
        (
            "unknown-type",
            keep,
            response("type.googleapis.com/latch.mesh.v1.Other", vec![], &[]),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, selector, r)| {
            (
                name.to_string(),
                [vec![selector], r.encode_to_vec()].concat(),
            )
        })
        .collect()
}
