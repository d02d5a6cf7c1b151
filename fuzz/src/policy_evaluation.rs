//! Policy evaluation: `authorizer::evaluate` and `Authorizer::authorize` (through a
//! `MeshSnapshot`) on generated policies, callers and ports, against the contract spelled out
//! independently here: a matching DENY always refuses (and names a DENY policy that matches);
//! otherwise, with any ALLOW policy, one must match; otherwise only the trust domain's peers get
//! in. A prefix matches by whole path segments (the ID equals it, or it ends in '/' and the ID
//! starts with it), and one the shared validation accepts admits an ID only that way. The
//! `--allow` list only ever narrows, and the order of policies decides nothing.
//!
//! Input: structured through `arbitrary`; names and IDs come mostly from a small vocabulary so
//! that rules and callers meet often, with arbitrary strings mixed in.

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Result, Unstructured};
use latch_identity::{SpiffeId, TrustDomain};
use latch_mesh::{Action, Policy, Principal, Rule};
use latch_proxy::authorizer::{Authorizer, Decision, evaluate};
use latch_proxy::state::{Discovered, Held};
use latch_proxy::{LocalConfig, MeshSnapshot};

const TRUST_DOMAINS: [&str; 3] = ["cluster.local", "cluster.localx", "other.org"];
const NAMESPACES: [&str; 4] = ["demo", "ops", "ns", "sa"];
const ACCOUNTS: [&str; 3] = ["web", "db", "ns"];

fn word(u: &mut Unstructured<'_>, vocabulary: &[&str]) -> Result<String> {
    if u.ratio(1, 8)? {
        u.arbitrary()
    } else {
        Ok(u.choose(vocabulary)?.to_string())
    }
}

/// Up to 12 arbitrary bytes as text.
fn short_text(u: &mut Unstructured<'_>) -> Result<String> {
    let len = u.int_in_range(0..=12)?;
    Ok(String::from_utf8_lossy(u.bytes(len)?).into_owned())
}

/// A SPIFFE ID: usually of a known shape from the vocabulary, sometimes any parseable string.
fn spiffe_id(u: &mut Unstructured<'_>) -> Result<SpiffeId> {
    let td = u.choose(&TRUST_DOMAINS)?;
    let ns = u.choose(&NAMESPACES)?;
    let sa = u.choose(&ACCOUNTS)?;
    let text = match u.int_in_range(0..=5)? {
        0 => format!("spiffe://{td}"),
        1 => format!("spiffe://{td}/ns/{ns}/sa/{sa}/extra"),
        2 => format!("spiffe://{td}/svc/{ns}"),
        3 => format!("spiffe://{td}/{}", short_text(u)?),
        _ => format!("spiffe://{td}/ns/{ns}/sa/{sa}"),
    };
    Ok(SpiffeId::parse(&text).unwrap_or_else(|_| {
        SpiffeId::parse(&format!("spiffe://{td}/ns/{ns}/sa/{sa}")).expect("vocabulary ID")
    }))
}

fn principal(u: &mut Unstructured<'_>, peer: &SpiffeId) -> Result<Principal> {
    let text = match u.int_in_range(0..=4)? {
        0 => peer.to_string(),
        4 => {
            // A prefix of the caller's ID cut just after one of its '/' (a whole-segment
            // prefix), sometimes with the '/' dropped.
            let s = peer.as_str();
            let cuts: Vec<usize> = s.match_indices('/').map(|(i, _)| i + 1).collect();
            let cut = *u.choose(&cuts)?;
            let cut = if u.arbitrary()? { cut } else { cut - 1 };
            s[..cut].to_string()
        }
        1 => {
            // A prefix of the caller's ID, cut anywhere.
            let s = peer.as_str();
            let mut cut = u.int_in_range(0..=s.len())?;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s[..cut].to_string()
        }
        2 => spiffe_id(u)?.to_string(),
        _ => String::arbitrary(u)?,
    };
    Ok(if u.arbitrary()? {
        Principal::Exact(text)
    } else {
        Principal::Prefix(text)
    })
}

fn rule(u: &mut Unstructured<'_>, peer: &SpiffeId, port: u16) -> Result<Rule> {
    let mut rule = Rule::default();
    for _ in 0..u.int_in_range(0..=2)? {
        rule.principals.push(principal(u, peer)?);
    }
    for _ in 0..u.int_in_range(0..=2)? {
        rule.namespaces.push(word(u, &NAMESPACES)?);
    }
    for _ in 0..u.int_in_range(0..=2)? {
        rule.ports.push(match u.int_in_range(0..=2)? {
            0 => port,
            1 => port.wrapping_add(1),
            _ => u.arbitrary()?,
        });
    }
    Ok(rule)
}

/// The contract, written without the code under test.
mod contract {
    use super::*;

    /// The namespace of a `/ns/<ns>/sa/<sa>` ID.
    pub fn namespace(peer: &str) -> Option<&str> {
        let path = &peer["spiffe://".len()..];
        let parts: Vec<&str> = path.split('/').skip(1).collect();
        match parts[..] {
            ["ns", ns, "sa", _] => Some(ns),
            _ => None,
        }
    }

    pub fn rule_matches(rule: &Rule, peer: &str, port: u16) -> bool {
        let principal_ok = rule.principals.is_empty()
            || rule.principals.iter().any(|p| match p {
                Principal::Exact(s) => s == peer,
                Principal::Prefix(s) => {
                    s == peer
                        || (s.ends_with('/')
                            && peer.as_bytes().get(..s.len()) == Some(s.as_bytes()))
                }
            });
        let namespace_ok = rule.namespaces.is_empty()
            || rule.namespaces.iter().any(|n| namespace(peer) == Some(n));
        let port_ok = rule.ports.is_empty() || rule.ports.contains(&port);
        principal_ok && namespace_ok && port_ok
    }

    pub fn policy_matches(policy: &Policy, peer: &str, port: u16) -> bool {
        policy.rules.iter().any(|r| rule_matches(r, peer, port))
    }

    pub fn allows(policies: &[Policy], td: &str, peer: &str, port: u16) -> bool {
        let of = |action| policies.iter().filter(move |p| p.action == action);
        if of(Action::Deny).any(|p| policy_matches(p, peer, port)) {
            return false;
        }
        if of(Action::Allow).next().is_some() {
            return of(Action::Allow).any(|p| policy_matches(p, peer, port));
        }
        let peer_td = peer["spiffe://".len()..].split('/').next();
        peer_td == Some(td)
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let td = TrustDomain::new(TRUST_DOMAINS[0]).expect("valid trust domain");
    let peer = spiffe_id(u)?;
    let port: u16 = u.arbitrary()?;
    let mut policies = Vec::new();
    for i in 0..u.int_in_range(0..=5)? {
        let action = if u.arbitrary()? {
            Action::Deny
        } else {
            Action::Allow
        };
        let mut rules = Vec::new();
        for _ in 0..u.int_in_range(0..=2)? {
            rules.push(rule(u, &peer, port)?);
        }
        policies.push(Policy {
            name: format!("p{i}"),
            namespace: "demo".into(),
            selector: BTreeMap::new(),
            action,
            rules,
        });
    }
    let mut allow_list = Vec::new();
    for _ in 0..u.int_in_range(0..=2)? {
        allow_list.push(if u.arbitrary()? {
            peer.clone()
        } else {
            spiffe_id(u)?
        });
    }

    // A prefix the shared validation accepts admits an ID only by whole path segments.
    for principal in policies
        .iter()
        .flat_map(|p| &p.rules)
        .flat_map(|r| &r.principals)
    {
        if let Principal::Prefix(text) = principal {
            if let Ok(accepted) = Principal::prefix("prefix", text) {
                assert!(text.ends_with('/'), "accepted prefix {text:?} without a final '/'");
                if accepted.matches(&peer) {
                    let id = peer.as_str();
                    assert!(
                        id == text || (text.ends_with('/') && id.starts_with(text.as_str())),
                        "accepted prefix {text:?} admits {id}"
                    );
                }
            }
        }
    }

    let decision = evaluate(&policies, &td, &peer, port);
    let expected = contract::allows(&policies, td.as_str(), peer.as_str(), port);
    assert_eq!(
        decision == Decision::Allow,
        expected,
        "{peer} on port {port} under {policies:#?}: {decision:?}"
    );
    let matching_deny: Vec<String> = policies
        .iter()
        .filter(|p| p.action == Action::Deny && contract::policy_matches(p, peer.as_str(), port))
        .map(Policy::resource_name)
        .collect();
    if !matching_deny.is_empty() {
        match &decision {
            Decision::Deny { by, .. } => assert!(
                matching_deny.contains(by),
                "denied by {by}, not by a matching DENY policy ({matching_deny:?})"
            ),
            Decision::Allow => panic!("a matching DENY policy did not refuse {peer}"),
        }
    }

    // The order of policies decides nothing.
    let reversed: Vec<Policy> = policies.iter().rev().cloned().collect();
    assert_eq!(
        evaluate(&reversed, &td, &peer, port) == Decision::Allow,
        decision == Decision::Allow
    );

    // A DENY policy matching everyone refuses everyone, whatever else there is.
    let mut with_deny_all = policies.clone();
    with_deny_all.push(Policy {
        name: "deny-all".into(),
        namespace: "demo".into(),
        selector: BTreeMap::new(),
        action: Action::Deny,
        rules: vec![Rule::default()],
    });
    assert!(matches!(
        evaluate(&with_deny_all, &td, &peer, port),
        Decision::Deny { .. }
    ));

    // The inbound authorizer, through the snapshot discovery builds.
    let discovered = Discovered {
        policies: policies
            .iter()
            .map(|p| {
                let held = Held {
                    version: "1".into(),
                    value: p.clone(),
                };
                (p.resource_name(), held)
            })
            .collect::<BTreeMap<_, _>>(),
        ..Discovered::default()
    };
    let snapshot = MeshSnapshot::build(&discovered, &LocalConfig::default());
    let open = Authorizer::new(td.clone(), Vec::new()).authorize(&snapshot, &peer, port);
    assert_eq!(open == Decision::Allow, expected);
    let listed = Authorizer::new(td.clone(), allow_list.clone()).authorize(&snapshot, &peer, port);
    let in_list = allow_list.is_empty() || allow_list.contains(&peer);
    assert_eq!(
        listed == Decision::Allow,
        expected && in_list,
        "--allow {allow_list:?}"
    );
    Ok(())
}

pub fn check(data: &[u8]) {
    let _ = run(&mut Unstructured::new(data));
}

pub fn seeds() -> Vec<(String, Vec<u8>)> {
    // Byte strings that `arbitrary` reads as small meshes; they only need to be varied.
    let cases: [(&str, &[u8]); 6] = [
        ("no-policies", &[4, 0, 0, 0x50, 0x1f, 0]),
        ("one-allow", &[4, 0, 0, 0x50, 0x1f, 1, 0, 1, 0, 0, 0, 1, 0]),
        (
            "deny-and-allow",
            &[
                4, 1, 1, 0x90, 0x1f, 2, 1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 2, 1, 0, 0, 0, 0,
            ],
        ),
        (
            "foreign-caller",
            &[4, 2, 0, 0x50, 0, 1, 0, 1, 1, 1, 0, 2, 0, 1],
        ),
        (
            "odd-shape",
            &[
                2, 0, 1, 0xbb, 0x01, 3, 1, 2, 0, 3, 1, 1, 1, 2, 1, 0, 2, 0, 0, 2, 3, 3, 1,
            ],
        ),
        (
            "allow-list",
            &[
                4, 0, 1, 0x50, 0x1f, 1, 0, 1, 0, 0, 1, 0, 0, 2, 1, 0, 4, 2, 2,
            ],
        ),
    ];
    cases
        .into_iter()
        .map(|(name, bytes)| (name.to_string(), bytes.to_vec()))
        .collect()
}
