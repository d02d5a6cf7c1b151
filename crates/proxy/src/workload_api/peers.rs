//! Who may use the Workload API: the peer's uid as the kernel reports it (SO_PEERCRED, read when
//! the connection is accepted), against the proxy's own uid, root, and `--workload-api-allow-uid`.
//! The file mode only keeps out the uids the mode excludes; this check is the one that decides.

use crate::config::AllowedUid;

/// The uids allowed to connect, fixed at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedPeers {
    /// Every uid (`--workload-api-allow-uid any`): for a socket in a directory only one pod's
    /// containers can reach.
    Any,
    /// These uids only; always holds root and the proxy's own uid.
    Uids(Vec<u32>),
}

impl AllowedPeers {
    /// Root, the proxy's own uid (`own`) and the `--workload-api-allow-uid` values.
    pub fn new(own: u32, flags: &[AllowedUid]) -> Self {
        if flags.contains(&AllowedUid::Any) {
            return Self::Any;
        }
        let mut uids = vec![0, own];
        uids.extend(flags.iter().filter_map(|f| match f {
            AllowedUid::Uid(uid) => Some(*uid),
            AllowedUid::Any => None,
        }));
        uids.sort_unstable();
        uids.dedup();
        Self::Uids(uids)
    }

    /// Only the proxy's own uid and root.
    pub fn owner_only() -> Self {
        Self::new(rustix::process::getuid().as_raw(), &[])
    }

    pub fn allows(&self, uid: u32) -> bool {
        match self {
            Self::Any => true,
            Self::Uids(uids) => uids.contains(&uid),
        }
    }

    /// The mode of a socket file owned by uid `own`: owner-only when nobody but `own` and root
    /// is allowed (root passes file modes anyway); otherwise 0666, since the uids allowed have
    /// no common group to give a narrower mode to, and the SO_PEERCRED check refuses the rest.
    pub fn socket_mode(&self, own: u32) -> u32 {
        match self {
            Self::Uids(uids) if uids.iter().all(|&uid| uid == 0 || uid == own) => 0o600,
            _ => 0o666,
        }
    }

    /// For log lines: `any uid` or `uids 0, 1337`.
    pub fn describe(&self) -> String {
        match self {
            Self::Any => "any uid".to_string(),
            Self::Uids(uids) => {
                let list: Vec<String> = uids.iter().map(u32::to_string).collect();
                format!("uids {}", list.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_the_proxy_uid_always_others_only_when_listed() {
        let owner = AllowedPeers::new(1337, &[]);
        assert_eq!(owner, AllowedPeers::Uids(vec![0, 1337]));
        assert!(owner.allows(0) && owner.allows(1337));
        assert!(!owner.allows(4242) && !owner.allows(65534));
        assert_eq!(owner.socket_mode(1337), 0o600);
        // A proxy running as root: one uid, still owner-only, until another is allowed.
        assert_eq!(AllowedPeers::new(0, &[]).socket_mode(0), 0o600);
        let root_and_1337 = AllowedPeers::new(0, &[AllowedUid::Uid(1337)]);
        assert_eq!(root_and_1337, AllowedPeers::Uids(vec![0, 1337]));
        assert_eq!(root_and_1337.socket_mode(0), 0o666);

        let listed = AllowedPeers::new(1337, &[AllowedUid::Uid(4242), AllowedUid::Uid(4242)]);
        assert_eq!(listed, AllowedPeers::Uids(vec![0, 1337, 4242]));
        assert!(listed.allows(4242) && !listed.allows(4243));
        assert_eq!(listed.socket_mode(1337), 0o666);
        assert_eq!(listed.describe(), "uids 0, 1337, 4242");

        let any = AllowedPeers::new(1337, &[AllowedUid::Uid(7), AllowedUid::Any]);
        assert_eq!(any, AllowedPeers::Any);
        assert!(any.allows(65534));
        assert_eq!(any.socket_mode(1337), 0o666);
    }
}
