//! `MeshError`: why a piece of mesh configuration or a discovery resource cannot be used. The
//! YAML path names the entry and field (`workloads[2].ips[0] "10.0.0.x": not an IP address`);
//! the xDS path names the field inside the message, and the proxy adds the resource name.

use thiserror::Error;

/// A mesh configuration or resource that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MeshError {
    /// A field holds a value the mesh cannot use; `at` names the entry and field (and the
    /// value, quoted, where it helps).
    #[error("{at}: {reason}")]
    Invalid { at: String, reason: String },
    /// An xDS resource without its `google.protobuf.Any`.
    #[error("no resource body")]
    NoBody,
    /// An xDS resource whose body is of another type than its response.
    #[error("carries a {found:?} in a {expected} response")]
    WrongType {
        found: String,
        expected: &'static str,
    },
    /// An xDS resource body that is not the protobuf it claims to be.
    #[error("cannot be decoded: {0}")]
    Decode(#[from] prost::DecodeError),
    /// An xDS resource whose name is not the one its message gives it.
    #[error("resource name does not match; a {kind} must be named {expected:?}")]
    WrongName {
        kind: &'static str,
        expected: String,
    },
}

impl MeshError {
    /// `at` cannot be used because of `reason`.
    pub fn invalid(at: impl Into<String>, reason: impl Into<String>) -> Self {
        MeshError::Invalid {
            at: at.into(),
            reason: reason.into(),
        }
    }
}
