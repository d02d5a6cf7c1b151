//! Who may connect to this workload. The inbound side asks the `Authorizer` with the caller's
//! verified SPIFFE ID and the target port; it evaluates the discovery policies in the current
//! `MeshSnapshot` (DENY wins, then ALLOW if any, else mesh peers) and, when `--allow` is
//! given, that list as an extra restriction. Also re-run on open connections after a change.
//! What a single policy or rule matches is the model's (`latch_mesh::Policy::matches`).

use latch_identity::{SpiffeId, TrustDomain};
use latch_mesh::{Action, Policy};

use crate::state::MeshSnapshot;

/// A decision; a denial names what decided it, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// The policy that decided ("<ns>/<name>"), "--allow", "mesh-peers" (no policies), or
        /// "revocation" (the peer's SVID was revoked).
        by: String,
        why: String,
    },
}

impl Decision {
    fn deny(by: impl Into<String>, why: String) -> Self {
        Decision::Deny { by: by.into(), why }
    }
}

/// The contract's evaluation over `policies`: any DENY match denies; else, with at least one
/// ALLOW policy, one must match; else only callers of `trust_domain` are allowed.
pub fn evaluate(
    policies: &[Policy],
    trust_domain: &TrustDomain,
    peer: &SpiffeId,
    port: u16,
) -> Decision {
    if let Some(deny) = policies
        .iter()
        .filter(|p| p.action == Action::Deny)
        .find(|p| p.matches(peer, port))
    {
        let name = deny.resource_name();
        let why = format!("DENY policy {name} matches {peer} on port {port}");
        return Decision::deny(name, why);
    }
    let mut allows = policies
        .iter()
        .filter(|p| p.action == Action::Allow)
        .peekable();
    if allows.peek().is_some() {
        let mut names = Vec::new();
        for policy in allows {
            if policy.matches(peer, port) {
                return Decision::Allow;
            }
            names.push(policy.resource_name());
        }
        names.sort_unstable();
        return Decision::deny(
            names.join(","),
            format!(
                "no ALLOW policy ({}) matches {peer} on port {port}",
                names.join(", ")
            ),
        );
    }
    if peer.is_member_of(trust_domain) {
        Decision::Allow
    } else {
        Decision::deny(
            "mesh-peers",
            format!("{peer} is not in trust domain {trust_domain} (no policies apply)"),
        )
    }
}

/// The inbound authorizer: the snapshot's policies and, if given, the `--allow` list (both
/// must allow).
#[derive(Debug, Clone)]
pub struct Authorizer {
    trust_domain: TrustDomain,
    allow: Vec<SpiffeId>,
}

impl Authorizer {
    pub fn new(trust_domain: TrustDomain, allow: Vec<SpiffeId>) -> Self {
        Self {
            trust_domain,
            allow,
        }
    }

    /// Decides whether `peer` may reach the local app on `port` under `snapshot`.
    pub fn authorize(&self, snapshot: &MeshSnapshot, peer: &SpiffeId, port: u16) -> Decision {
        if !self.allow.is_empty() && !self.allow.contains(peer) {
            return Decision::deny("--allow", format!("{peer} is not in the --allow list"));
        }
        evaluate(&snapshot.policies, &self.trust_domain, peer, port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Discovered, Held, LocalConfig};
    use latch_mesh::{Principal, Rule};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    /// A policy named "<namespace>/<name>".
    fn policy(name: &str, action: Action, rules: Vec<Rule>) -> Policy {
        let (namespace, name) = name.split_once('/').unwrap();
        Policy {
            name: name.into(),
            namespace: namespace.into(),
            selector: Default::default(),
            action,
            rules,
        }
    }

    fn exact(s: &str) -> Rule {
        Rule {
            principals: vec![Principal::Exact(s.into())],
            ..Rule::default()
        }
    }

    const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
    const DB: &str = "spiffe://cluster.local/ns/demo/sa/db";
    const OPS: &str = "spiffe://cluster.local/ns/ops/sa/admin";
    const FOREIGN: &str = "spiffe://other.org/ns/demo/sa/web";
    const ODD: &str = "spiffe://cluster.local/svc/demo";

    #[test]
    fn rule_fields() {
        let prefix = Rule {
            principals: vec![Principal::Prefix("spiffe://cluster.local/ns/ops/".into())],
            ..Rule::default()
        };
        let namespaces = Rule {
            namespaces: vec!["demo".into()],
            ..Rule::default()
        };
        let ports = Rule {
            ports: vec![8080],
            ..Rule::default()
        };
        let all = Rule {
            principals: vec![Principal::Exact(WEB.into())],
            namespaces: vec!["demo".into()],
            ports: vec![8080],
        };
        let table = [
            (&exact(WEB), WEB, 80, true),
            (&exact(WEB), DB, 80, false),
            (
                &exact(WEB),
                "spiffe://cluster.local/ns/demo/sa/web2",
                80,
                false,
            ),
            (&prefix, OPS, 80, true),
            (&prefix, WEB, 80, false),
            (&namespaces, WEB, 80, true),
            (&namespaces, OPS, 80, false),
            (&namespaces, FOREIGN, 80, true),
            (&namespaces, ODD, 80, false),
            (
                &namespaces,
                "spiffe://cluster.local/ns/demo/sa/web/extra",
                80,
                false,
            ),
            (&ports, WEB, 8080, true),
            (&ports, WEB, 8081, false),
            (&all, WEB, 8080, true),
            (&all, WEB, 9090, false),
            (&all, DB, 8080, false),
            (&Rule::default(), FOREIGN, 1, true),
        ];
        for (i, (rule, peer, port, expected)) in table.into_iter().enumerate() {
            assert_eq!(
                rule.matches(&id(peer), port),
                expected,
                "row {i}: {peer}:{port}"
            );
        }
    }

    #[test]
    fn evaluation() {
        let allow_web = policy("demo/allow-web", Action::Allow, vec![exact(WEB)]);
        let allow_ops = policy(
            "demo/allow-ops",
            Action::Allow,
            vec![Rule {
                namespaces: vec!["ops".into()],
                ..Rule::default()
            }],
        );
        let deny_web_9090 = policy(
            "demo/deny-web-9090",
            Action::Deny,
            vec![Rule {
                principals: vec![Principal::Exact(WEB.into())],
                ports: vec![9090],
                ..Rule::default()
            }],
        );
        let deny_nothing = policy("demo/empty-deny", Action::Deny, vec![]);
        let allow_nothing = policy("demo/empty-allow", Action::Allow, vec![]);
        let allow_all = policy("demo/allow-all", Action::Allow, vec![Rule::default()]);
        // Policies, caller, port, expected: Ok = allow, Err(by) = denied by `by`.
        type Row<'a> = (Vec<&'a Policy>, &'a str, u16, Result<(), &'a str>);
        let table: Vec<Row> = vec![
            // No policies: mesh peers only.
            (vec![], WEB, 80, Ok(())),
            (vec![], FOREIGN, 80, Err("mesh-peers")),
            // ALLOW policies present: one must match.
            (vec![&allow_web], WEB, 80, Ok(())),
            (vec![&allow_web], DB, 80, Err("demo/allow-web")),
            (vec![&allow_web, &allow_ops], OPS, 80, Ok(())),
            (
                vec![&allow_web, &allow_ops],
                DB,
                80,
                Err("demo/allow-ops,demo/allow-web"),
            ),
            // An ALLOW policy can admit callers from outside the trust domain.
            (vec![&allow_all], FOREIGN, 80, Ok(())),
            // A policy with no rules matches nothing, yet it is an ALLOW policy.
            (vec![&allow_nothing], WEB, 80, Err("demo/empty-allow")),
            (vec![&deny_nothing], WEB, 80, Ok(())),
            // DENY wins over ALLOW.
            (
                vec![&allow_web, &deny_web_9090],
                WEB,
                9090,
                Err("demo/deny-web-9090"),
            ),
            (vec![&allow_web, &deny_web_9090], WEB, 80, Ok(())),
            // DENY alone leaves the default for everyone else.
            (vec![&deny_web_9090], DB, 9090, Ok(())),
            (vec![&deny_web_9090], FOREIGN, 9090, Err("mesh-peers")),
        ];
        for (i, (policies, peer, port, expected)) in table.into_iter().enumerate() {
            let policies: Vec<Policy> = policies.into_iter().cloned().collect();
            let decision = evaluate(&policies, &td(), &id(peer), port);
            match (expected, &decision) {
                (Ok(()), Decision::Allow) => {}
                (Err(by), Decision::Deny { by: got, .. }) if by == got => {}
                _ => panic!("row {i}: {peer}:{port}: expected {expected:?}, got {decision:?}"),
            }
        }
    }

    #[test]
    fn allow_flag_restricts_on_top_of_policies() {
        let mut discovered = Discovered::default();
        discovered.policies.insert(
            "demo/allow-web".into(),
            Held {
                version: "1".into(),
                value: policy("demo/allow-web", Action::Allow, vec![exact(WEB)]),
            },
        );
        let with_policy = crate::state::MeshSnapshot::build(&discovered, &LocalConfig::default());
        let no_policy =
            crate::state::MeshSnapshot::build(&Discovered::default(), &LocalConfig::default());
        let open = Authorizer::new(td(), vec![]);
        let listed = Authorizer::new(td(), vec![id(WEB), id(DB)]);
        assert_eq!(open.authorize(&no_policy, &id(DB), 80), Decision::Allow);
        assert_eq!(listed.authorize(&no_policy, &id(DB), 80), Decision::Allow);
        assert!(matches!(
            listed.authorize(&no_policy, &id(OPS), 80),
            Decision::Deny { by, .. } if by == "--allow"
        ));
        // DB is listed but no policy allows it: both must allow.
        assert!(matches!(
            listed.authorize(&with_policy, &id(DB), 80),
            Decision::Deny { by, .. } if by == "demo/allow-web"
        ));
        assert_eq!(
            listed.authorize(&with_policy, &id(WEB), 80),
            Decision::Allow
        );
    }
}
