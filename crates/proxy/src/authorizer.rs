//! Who may connect to this workload. The inbound side asks an `Authorizer` with the caller's
//! verified SPIFFE ID and the target port; today from flags (trust domain or allow-list),
//! later from discovery policies behind the same trait.

use latch_identity::{SpiffeId, TrustDomain};

/// A decision with a reason for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

/// Decides whether `peer` may reach the local app on `port`.
pub trait Authorizer: Send + Sync {
    fn authorize(&self, peer: &SpiffeId, port: u16) -> Decision;
}

/// The flag-configured policy: an explicit allow-list when given, else every ID of the local
/// trust domain.
#[derive(Debug, Clone)]
pub struct StaticAuthorizer {
    trust_domain: TrustDomain,
    allow: Vec<SpiffeId>,
}

impl StaticAuthorizer {
    pub fn new(trust_domain: TrustDomain, allow: Vec<SpiffeId>) -> Self {
        Self {
            trust_domain,
            allow,
        }
    }
}

impl Authorizer for StaticAuthorizer {
    fn authorize(&self, peer: &SpiffeId, _port: u16) -> Decision {
        if !self.allow.is_empty() {
            return if self.allow.contains(peer) {
                Decision::Allow
            } else {
                Decision::Deny(format!("{peer} is not in the --allow list"))
            };
        }
        if peer.is_member_of(&self.trust_domain) {
            Decision::Allow
        } else {
            Decision::Deny(format!(
                "{peer} is not in trust domain {}",
                self.trust_domain
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn decisions() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let open = StaticAuthorizer::new(td.clone(), vec![]);
        let listed = StaticAuthorizer::new(td, vec![id("spiffe://cluster.local/ns/a/sa/web")]);
        let table = [
            (&open, "spiffe://cluster.local/ns/a/sa/web", true),
            (&open, "spiffe://cluster.local/ns/b/sa/db", true),
            (&open, "spiffe://other.org/ns/a/sa/web", false),
            (&listed, "spiffe://cluster.local/ns/a/sa/web", true),
            (&listed, "spiffe://cluster.local/ns/b/sa/db", false),
        ];
        for (authorizer, peer, allowed) in table {
            assert_eq!(
                authorizer.authorize(&id(peer), 80) == Decision::Allow,
                allowed,
                "{peer}"
            );
        }
    }
}
