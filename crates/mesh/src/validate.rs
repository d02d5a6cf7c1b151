//! The validation rules of the mesh model, one function per rule: names, label keys, host
//! names, IPs, TCP ports and SPIFFE IDs. The control plane's YAML and Kubernetes paths and the
//! proxy's xDS conversions call these same functions, so what one side accepts the other does.
//! `at` is the field path the error names (`workloads[2].ips`, or `ips` inside a message).

use std::collections::BTreeMap;
use std::net::IpAddr;

use latch_identity::SpiffeId;

use crate::MeshError;

/// Longest name, namespace, label key or hostname accepted.
pub const MAX_NAME_LEN: usize = 253;

/// The path of `field` inside `at` (`at` may be empty: the top of a message).
pub fn field(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_string()
    } else {
        format!("{at}.{field}")
    }
}

/// A name, namespace or service account: 1 to 253 of letters, digits, '-', '.', '_'.
pub fn check_name(at: &str, value: &str) -> Result<(), MeshError> {
    if value.is_empty() {
        return Err(MeshError::invalid(at, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(MeshError::invalid(
            at,
            format!("longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(MeshError::invalid(
            format!("{at} \"{value}\""),
            "may hold only letters, digits, '-', '.' and '_'",
        ));
    }
    Ok(())
}

/// A workload's `<namespace>/<name>` (two `check_name` names), as a proxy names itself with
/// `--workload-name` and in its discovery node id. Checks the length first, so a huge string
/// from the network costs nothing.
pub fn is_workload_name(s: &str) -> bool {
    s.len() <= 2 * MAX_NAME_LEN + 1
        && s.split_once('/').is_some_and(|(namespace, name)| {
            check_name("", namespace).is_ok() && check_name("", name).is_ok()
        })
}

/// Label keys (of labels or a selector): non-empty, no whitespace, at most 253 characters.
pub fn check_labels(at: &str, labels: &BTreeMap<String, String>) -> Result<(), MeshError> {
    for key in labels.keys() {
        if key.is_empty() || key.len() > MAX_NAME_LEN || key.chars().any(char::is_whitespace) {
            return Err(MeshError::invalid(
                format!("{at} \"{key}\""),
                "a label key must be non-empty, without spaces, and at most 253 characters",
            ));
        }
    }
    Ok(())
}

/// A service's host names: non-empty, no whitespace, at most 253 characters.
pub fn check_hostnames(at: &str, hosts: &[String]) -> Result<(), MeshError> {
    for (i, host) in hosts.iter().enumerate() {
        if host.is_empty() || host.len() > MAX_NAME_LEN || host.chars().any(char::is_whitespace) {
            return Err(MeshError::invalid(
                format!("{at}[{i}] \"{host}\""),
                "not a host name",
            ));
        }
    }
    Ok(())
}

/// An IPv4 or IPv6 address.
pub fn parse_ip(at: &str, text: &str) -> Result<IpAddr, MeshError> {
    text.parse()
        .map_err(|_| MeshError::invalid(format!("{at} \"{text}\""), "not an IP address"))
}

/// A list of distinct IP addresses.
pub fn parse_ips<'a>(
    at: &str,
    texts: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<IpAddr>, MeshError> {
    let mut out: Vec<IpAddr> = Vec::new();
    for (i, text) in texts.into_iter().enumerate() {
        let addr = parse_ip(&format!("{at}[{i}]"), text)?;
        if out.contains(&addr) {
            return Err(MeshError::invalid(
                format!("{at}[{i}] \"{text}\""),
                "listed twice",
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

/// A TCP port, 1 to 65535.
pub fn parse_port(at: &str, port: u32) -> Result<u16, MeshError> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(MeshError::invalid(
            format!("{at} {port}"),
            "not a TCP port (1 to 65535)",
        )),
    }
}

/// A SPIFFE ID of any trust domain.
pub fn parse_spiffe_id(at: &str, text: &str) -> Result<SpiffeId, MeshError> {
    SpiffeId::parse(text).map_err(|e| {
        MeshError::invalid(format!("{at} \"{text}\""), format!("not a SPIFFE ID: {e}"))
    })
}

/// A principal prefix: `spiffe://`, a non-empty trust domain, then a path that ends in `/`, so
/// that it matches whole path segments (`spiffe://td/ns/a/` matches `spiffe://td/ns/a/sa/web`
/// but not `spiffe://td/ns/ab/...`). `spiffe://td/` names every workload of trust domain `td`;
/// `spiffe://td` alone is refused like any other prefix without the final `/`.
pub fn check_principal_prefix(at: &str, prefix: &str) -> Result<(), MeshError> {
    match prefix_trust_domain(prefix) {
        Some("") => {
            return Err(MeshError::invalid(
                format!("{at} \"{prefix}\""),
                "must start with spiffe://<trust domain>; the trust domain is empty",
            ));
        }
        None => {
            return Err(MeshError::invalid(
                format!("{at} \"{prefix}\""),
                "must start with spiffe://<trust domain>",
            ));
        }
        Some(_) => {}
    }
    if !prefix.ends_with('/') {
        return Err(MeshError::invalid(
            format!("{at} \"{prefix}\""),
            format!(
                "must end in \"/\" to match whole path segments (write {prefix}/ for IDs under \
                 it, or use exact: for this one ID)"
            ),
        ));
    }
    Ok(())
}

/// The trust domain a principal prefix names (the text between `spiffe://` and the next `/`);
/// `None` when it does not start with `spiffe://`.
pub fn prefix_trust_domain(prefix: &str) -> Option<&str> {
    let rest = prefix.strip_prefix("spiffe://")?;
    Some(rest.split('/').next().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_prefix_needs_a_trust_domain() {
        for prefix in [
            "spiffe://",
            "spiffe:///ns/x/",
            "spiffe:/x/",
            "http://cluster.local/",
            "demo/",
            "",
        ] {
            let text = check_principal_prefix("prefix", prefix)
                .unwrap_err()
                .to_string();
            assert!(
                text.starts_with(&format!("prefix \"{prefix}\": must start with spiffe://")),
                "{text}"
            );
        }
    }

    #[test]
    fn principal_prefix_must_end_in_a_slash() {
        for (prefix, ok) in [
            ("spiffe://cluster.local/ns/ops/", true),
            ("spiffe://cluster.local/ns/a/sa/web/", true),
            ("spiffe://cluster.local/", true),
            ("spiffe://c/", true),
            ("spiffe://cluster.local/ns/a/sa/web", false),
            ("spiffe://cluster.local/ns/ops", false),
            ("spiffe://cluster.local", false),
            ("spiffe://c", false),
        ] {
            let result = check_principal_prefix("p.prefix", prefix);
            assert_eq!(result.is_ok(), ok, "{prefix:?}: {result:?}");
            if let Err(e) = result {
                assert_eq!(
                    e.to_string(),
                    format!(
                        "p.prefix \"{prefix}\": must end in \"/\" to match whole path segments \
                         (write {prefix}/ for IDs under it, or use exact: for this one ID)"
                    )
                );
            }
        }
    }

    #[test]
    fn prefix_trust_domains() {
        for (prefix, td) in [
            ("spiffe://cluster.local/ns/", Some("cluster.local")),
            ("spiffe://other.org/", Some("other.org")),
            ("spiffe://", Some("")),
            ("http://x/", None),
        ] {
            assert_eq!(prefix_trust_domain(prefix), td, "{prefix}");
        }
    }

    #[test]
    fn ports_names_and_ips() {
        assert_eq!(parse_port("p", 1), Ok(1));
        assert_eq!(parse_port("p", 65535), Ok(65535));
        for bad in [0, 65536, u32::MAX] {
            assert_eq!(
                parse_port("p", bad).unwrap_err().to_string(),
                format!("p {bad}: not a TCP port (1 to 65535)")
            );
        }
        assert!(check_name("n", "web-1.a_b").is_ok());
        assert!(check_name("n", "a/b").is_err());
        assert!(check_name("n", &"a".repeat(254)).is_err());
        assert_eq!(
            check_name("n", "").unwrap_err().to_string(),
            "n: must not be empty"
        );
        assert_eq!(
            parse_ips("ips", ["10.0.0.1", "10.0.0.1"])
                .unwrap_err()
                .to_string(),
            "ips[1] \"10.0.0.1\": listed twice"
        );
        assert_eq!(field("", "ips"), "ips");
        assert_eq!(field("workloads[0]", "ips"), "workloads[0].ips");
    }
}
