//! Lowercase hex for bytes shown to people or used as names: certificate serials, SHA-256
//! fingerprints (`bundle::sha256_hex`), join tokens, admin credentials, session cache labels.
//! The one hex encoder of the workspace (no `hex` crate in the tree); the identity crate, the
//! control plane and the proxy call it.

use std::fmt::Write as _;

/// `bytes` as lowercase hex, two digits per byte.
pub fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_two_lowercase_digits_per_byte() {
        assert_eq!(super::encode(&[]), "");
        assert_eq!(super::encode(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }
}
