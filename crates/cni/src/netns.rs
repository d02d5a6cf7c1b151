//! Entering the pod's network namespace (`CNI_NETNS`) with setns(2).
//!
//! The plugin is single-threaded and short-lived, and after entering it does nothing but the
//! capture work, so the whole process moves into the pod's namespace, not one thread. That
//! matters: `capture.rs` reads /proc/net/if_inet6 (which follows the process, not the thread)
//! to decide whether a pod without IPv6 rules would have an IPv6 hole, and the iptables
//! commands it spawns inherit the namespace of the process. `nsenter --net=PATH` around each
//! command would leave that read in the node's namespace and needs util-linux on the node.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsFd;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Why the namespace could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path does not exist or is no longer a network namespace (the pod is gone).
    #[error("network namespace {path} does not exist (any more): {reason}")]
    Gone { path: String, reason: String },
    #[error(
        "cannot enter network namespace {path}: {reason} (latch-cni must run as root, as the \
         container runtime runs CNI plugins)"
    )]
    Failed { path: String, reason: String },
}

/// Moves this process into the network namespace at `path`.
pub fn enter(path: &str) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|e| {
        let reason = e.to_string();
        match e.kind() {
            ErrorKind::NotFound => NetnsError::Gone {
                path: path.into(),
                reason,
            },
            _ => NetnsError::Failed {
                path: path.into(),
                reason,
            },
        }
    })?;
    move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network)).map_err(|e| {
        // EINVAL: the file is not a network namespace, e.g. the bind mount was removed and an
        // empty file is left where it was.
        if e == rustix::io::Errno::INVAL {
            NetnsError::Gone {
                path: path.into(),
                reason: "not a network namespace".into(),
            }
        } else {
            NetnsError::Failed {
                path: path.into(),
                reason: e.to_string(),
            }
        }
    })
}
