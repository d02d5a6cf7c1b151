//! `SpiffeId::parse` and `TrustDomain::new` against a second, deliberately naive reading of the
//! SPIFFE ID specification: both must agree on every input. Accepted IDs must round-trip through
//! `to_string` and rebuild from their parts; refusals must point inside the input.

use latch_identity::{SpiffeId, SpiffeIdError, TrustDomain};

/// The specification, written as plainly as possible (no positions, no early exits).
fn valid_by_spec(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    s.len() <= 2048 && trust_domain_by_spec(td) && path_by_spec(path)
}

fn trust_domain_by_spec(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
}

fn path_by_spec(path: &str) -> bool {
    let Some(segments) = path.strip_prefix('/') else {
        return path.is_empty();
    };
    segments.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    })
}

/// The byte position an error names, if any.
fn position(e: &SpiffeIdError) -> Option<usize> {
    match e {
        SpiffeIdError::BadTrustDomainChar { pos, .. }
        | SpiffeIdError::EmptySegment { pos }
        | SpiffeIdError::DotSegment { pos }
        | SpiffeIdError::BadPathChar { pos, .. } => Some(*pos),
        _ => None,
    }
}

pub fn check(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = SpiffeId::parse(s);
    assert_eq!(
        parsed.is_ok(),
        valid_by_spec(s),
        "SpiffeId::parse disagrees with the specification on {s:?}: {parsed:?}"
    );
    match parsed {
        Ok(id) => {
            let shown = id.to_string();
            assert_eq!(shown, s);
            assert_eq!(SpiffeId::parse(&shown).as_ref(), Ok(&id));
            assert_eq!(
                format!("spiffe://{}{}", id.trust_domain_name(), id.path()),
                s
            );
            let td = TrustDomain::new(id.trust_domain_name())
                .unwrap_or_else(|e| panic!("trust domain of accepted {s:?} refused: {e}"));
            assert!(id.is_member_of(&td));
            assert_eq!(id.trust_domain(), td);
            assert_eq!(SpiffeId::parse(td.id().as_str()).as_ref(), Ok(&td.id()));
            if let ["", "ns", ns, "sa", sa] = id.path().split('/').collect::<Vec<_>>()[..] {
                assert_eq!(SpiffeId::workload(&td, ns, sa).as_ref(), Ok(&id));
            }
        }
        Err(e) => {
            if let Some(pos) = position(&e) {
                assert!(
                    pos < s.len() && s.is_char_boundary(pos),
                    "{e:?} points outside {s:?}"
                );
            }
            // The message is shown to operators; building it must not fail.
            assert!(!e.to_string().is_empty());
        }
    }
    assert_eq!(
        TrustDomain::new(s).is_ok(),
        trust_domain_by_spec(s),
        "{s:?}"
    );
}

pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let long_td = format!("spiffe://{}", "a".repeat(255));
    let longest = format!("{long_td}/{}", "b".repeat(2048 - long_td.len() - 1));
    [
        ("workload", "spiffe://cluster.local/ns/demo/sa/web"),
        ("trust-domain-only", "spiffe://cluster.local"),
        ("odd-segments", "spiffe://a_b-c.9/A.b-C_d/..x/.y/z.."),
        ("trailing-slash", "spiffe://td/a/"),
        ("empty-segment", "spiffe://td//a"),
        ("dot-segment", "spiffe://td/./a"),
        ("dotdot-segment", "spiffe://td/a/.."),
        ("port", "spiffe://td:8080/x"),
        ("user-info", "spiffe://user@td/x"),
        ("percent", "spiffe://td/a%20b"),
        ("query", "spiffe://td/a?x=1"),
        ("uppercase-td", "spiffe://Cluster.local/x"),
        ("uppercase-scheme", "SPIFFE://td/x"),
        ("non-ascii", "spiffe://td/caf\u{e9}"),
        ("non-ascii-td", "spiffe://t\u{e9}d/x"),
        ("bare-td", "cluster.local"),
    ]
    .into_iter()
    .map(|(name, s)| (name.to_string(), s.as_bytes().to_vec()))
    .chain([
        ("longest-td".to_string(), long_td.into_bytes()),
        ("longest-id".to_string(), longest.into_bytes()),
    ])
    .collect()
}
