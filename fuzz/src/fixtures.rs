//! What the targets share, made once per process: a CA in the control plane's own format (its
//! data dir is removed once loaded) and the IDs the inputs are judged against.

use std::sync::OnceLock;

use latch_control::ca::{Ca, TtlPolicy};
use latch_identity::{SpiffeId, TrustDomain};

pub const TRUST_DOMAIN: &str = "fuzz.latch";
/// The ID a CSR's sender has authenticated as (a join token would grant it).
pub const AUTHENTICATED: &str = "spiffe://fuzz.latch/ns/demo/sa/web";

pub fn trust_domain() -> TrustDomain {
    TrustDomain::new(TRUST_DOMAIN).expect("valid trust domain")
}

pub fn authenticated() -> &'static SpiffeId {
    static ID: OnceLock<SpiffeId> = OnceLock::new();
    ID.get_or_init(|| SpiffeId::parse(AUTHENTICATED).expect("valid SPIFFE ID"))
}

/// A control-plane CA with a fresh root, as `latch-control` makes on first start.
pub fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("latch-fuzz-ca-{}", std::process::id()));
        let ca = Ca::load_or_create(&dir, &trust_domain(), TtlPolicy::default());
        let _ = std::fs::remove_dir_all(&dir);
        ca.unwrap_or_else(|e| panic!("creating the fuzzing CA in {}: {e}", dir.display()))
    })
}
