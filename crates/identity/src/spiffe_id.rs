//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE ID specification says.
//! Every identity that crosses a Latch boundary (CSR, certificate, policy, flag) goes
//! through `SpiffeId::parse`; nothing else builds one from a string.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

const SCHEME: &str = "spiffe://";
/// Longest SPIFFE ID the specification allows, in bytes.
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name the specification allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID. Positions are byte offsets into the input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    #[error(
        "trust domain has invalid character {ch:?} at byte {pos}: only lowercase letters, digits, '.', '-' and '_' are allowed (no port, user info or percent-encoding)"
    )]
    BadTrustDomainChar { ch: char, pos: usize },
    #[error("trust domain is {len} bytes long; the maximum is {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong { len: usize },
    #[error("path has an empty segment at byte {pos}")]
    EmptySegment { pos: usize },
    #[error("path has a trailing '/'")]
    TrailingSlash,
    #[error("path segment at byte {pos} is '.' or '..'")]
    DotSegment { pos: usize },
    #[error(
        "path has invalid character {ch:?} at byte {pos}: only letters, digits, '.', '-' and '_' are allowed (no query, fragment or percent-encoding)"
    )]
    BadPathChar { ch: char, pos: usize },
    #[error("SPIFFE ID is {len} bytes long; the maximum is {MAX_ID_LEN}")]
    TooLong { len: usize },
}

fn is_trust_domain_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// Character at byte `pos` of `s`, for error messages (the input may be any UTF-8).
fn char_at(s: &str, pos: usize) -> char {
    s[pos..].chars().next().unwrap_or('?')
}

/// A trust domain name such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name, 0)?;
        Ok(Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`, used as the CA's URI SAN.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            id: format!("{SCHEME}{}", self.0),
            path_start: SCHEME.len() + self.0.len(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Checks a trust domain name; `offset` is where it starts in the full input, for positions.
fn validate_trust_domain(name: &str, offset: usize) -> Result<(), SpiffeIdError> {
    if name.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if let Some(pos) = name.bytes().position(|b| !is_trust_domain_char(b)) {
        return Err(SpiffeIdError::BadTrustDomainChar {
            ch: char_at(name, pos),
            pos: offset + pos,
        });
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: name.len() });
    }
    Ok(())
}

/// Checks a path (empty, or `/seg/seg...`); `offset` is where it starts in the full input.
fn validate_path(path: &str, offset: usize) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller only passes text that starts at a '/'.
    let mut seg_start = 1;
    for (i, b) in path.bytes().enumerate().skip(1).chain([(path.len(), b'/')]) {
        if b != b'/' {
            if !is_path_char(b) {
                return Err(SpiffeIdError::BadPathChar {
                    ch: char_at(path, i),
                    pos: offset + i,
                });
            }
            continue;
        }
        let segment = &path[seg_start..i];
        if segment.is_empty() {
            return Err(if i == path.len() {
                SpiffeIdError::TrailingSlash
            } else {
                SpiffeIdError::EmptySegment { pos: offset + i }
            });
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment {
                pos: offset + seg_start,
            });
        }
        seg_start = i + 1;
    }
    Ok(())
}

/// A SPIFFE ID, `spiffe://<trust-domain>[/<path>]`, valid by construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        validate_trust_domain(&rest[..td_len], SCHEME.len())?;
        let path_start = SCHEME.len() + td_len;
        validate_path(&s[path_start..], path_start)?;
        Ok(Self {
            id: s.to_string(),
            path_start,
        })
    }

    /// The Kubernetes-style workload ID `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn workload(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name (without scheme).
    pub fn trust_domain_name(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_string())
    }

    /// The path, empty or starting with '/'.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// True when both IDs are in the same trust domain.
    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        self.trust_domain_name() == trust_domain.as_str()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn valid_ids() {
        for (input, td, path) in [
            ("spiffe://cluster.local", "cluster.local", ""),
            (
                "spiffe://cluster.local/ns/default/sa/web",
                "cluster.local",
                "/ns/default/sa/web",
            ),
            ("spiffe://a_b-c.9/x", "a_b-c.9", "/x"),
            (
                "spiffe://td/A.b-C_d/..x/.y/z..",
                "td",
                "/A.b-C_d/..x/.y/z..",
            ),
        ] {
            let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.trust_domain_name(), td, "{input}");
            assert_eq!(id.path(), path, "{input}");
            assert_eq!(id.as_str(), input);
        }
    }

    #[test]
    fn invalid_ids() {
        use SpiffeIdError::*;
        let long_td = format!("spiffe://{}", "a".repeat(256));
        let long_id = format!("spiffe://td/{}", "a".repeat(2048));
        let table: Vec<(&str, SpiffeIdError)> = vec![
            ("", Empty),
            ("http://td/x", WrongScheme),
            ("SPIFFE://td/x", WrongScheme),
            ("spiffe:/td/x", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///path", MissingTrustDomain),
            (
                "spiffe://Cluster.local",
                BadTrustDomainChar { ch: 'C', pos: 9 },
            ),
            (
                "spiffe://td:8080/x",
                BadTrustDomainChar { ch: ':', pos: 11 },
            ),
            (
                "spiffe://user@td/x",
                BadTrustDomainChar { ch: '@', pos: 13 },
            ),
            ("spiffe://t%41d/x", BadTrustDomainChar { ch: '%', pos: 10 }),
            ("spiffe://td?q=1", BadTrustDomainChar { ch: '?', pos: 11 }),
            ("spiffe://td/", TrailingSlash),
            ("spiffe://td/a/", TrailingSlash),
            ("spiffe://td//a", EmptySegment { pos: 12 }),
            ("spiffe://td/./a", DotSegment { pos: 12 }),
            ("spiffe://td/a/..", DotSegment { pos: 14 }),
            ("spiffe://td/a?x=1", BadPathChar { ch: '?', pos: 13 }),
            ("spiffe://td/a#frag", BadPathChar { ch: '#', pos: 13 }),
            ("spiffe://td/a%20b", BadPathChar { ch: '%', pos: 13 }),
            (
                "spiffe://td/caf\u{e9}",
                BadPathChar {
                    ch: '\u{e9}',
                    pos: 15,
                },
            ),
            ("spiffe://td/a b", BadPathChar { ch: ' ', pos: 13 }),
            (&long_td, TrustDomainTooLong { len: 256 }),
            (&long_id, TooLong { len: 2060 }),
        ];
        for (input, want) in table {
            let shown: String = input.chars().take(40).collect();
            assert_eq!(SpiffeId::parse(input), Err(want), "{shown}");
        }
    }

    #[test]
    fn longest_allowed_id_parses() {
        let td = "a".repeat(255);
        let prefix = format!("spiffe://{td}/");
        let id = format!("{prefix}{}", "b".repeat(MAX_ID_LEN - prefix.len()));
        assert_eq!(id.len(), MAX_ID_LEN);
        assert!(SpiffeId::parse(&id).is_ok());
    }

    #[test]
    fn workload_ids() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::workload(&td, "demo", "web").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/demo/sa/web");
        assert!(id.is_member_of(&td));
        assert!(SpiffeId::workload(&td, "de/mo", "web").is_ok()); // extra segment, still valid
        assert!(SpiffeId::workload(&td, "", "web").is_err());
        assert_eq!(td.id().as_str(), "spiffe://cluster.local");
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(s in "\\PC{0,80}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert_eq!(SpiffeId::parse(id.as_str()), Ok(id.clone()));
            }
        }

        #[test]
        fn generated_valid_ids_parse(
            td in "[a-z0-9._-]{1,40}",
            segs in proptest::collection::vec("[A-Za-z0-9._-]{1,12}", 0..6),
        ) {
            let segs: Vec<String> = segs.into_iter().filter(|s| s != "." && s != "..").collect();
            let path: String = segs.iter().map(|s| format!("/{s}")).collect();
            let input = format!("spiffe://{td}{path}");
            let id = SpiffeId::parse(&input).map_err(|e| TestCaseError::fail(format!("{input}: {e}")))?;
            prop_assert_eq!(id.trust_domain_name(), td.as_str());
            prop_assert_eq!(id.path(), path.as_str());
        }

        #[test]
        fn uppercase_trust_domain_is_rejected(td in "[a-z]{0,5}[A-Z][a-z]{0,5}") {
            let is_bad_char = matches!(
                SpiffeId::parse(&format!("spiffe://{td}/x")),
                Err(SpiffeIdError::BadTrustDomainChar { .. })
            );
            prop_assert!(is_bad_char);
        }
    }
}
