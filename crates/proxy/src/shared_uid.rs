//! The start-up check of transparent mode for other processes running as the proxy's uid in its
//! network namespace: the capture rules exempt that uid, so such a process's traffic bypasses the
//! proxy and leaves in clear. Reads /proc (as the proxy's uid it can read exactly those
//! processes' namespace links); called by `Proxy::start`, reported as a log error and the
//! `latch_proxy_uid_shared_processes` gauge.

use std::path::Path;

use crate::metrics::Metrics;

/// A process found sharing the proxy's uid and network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedProcess {
    pub pid: u32,
    /// Its command name (/proc/<pid>/comm), for the log line.
    pub name: String,
}

/// The real and effective uids from a /proc/<pid>/status text.
fn uids(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    let mut ids = line["Uid:".len()..].split_whitespace().map(str::parse);
    Some((ids.next()?.ok()?, ids.next()?.ok()?))
}

/// The effective uid of process `pid` under `proc_root`.
pub fn effective_uid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    uids(&status).map(|(_, effective)| effective)
}

/// Processes under `proc_root` (normally /proc) other than `own_pid` whose real or effective
/// uid is `uid` and whose network namespace (the `ns/net` link) is the one of `own_pid`.
/// Processes that vanish or cannot be read while scanning are left out.
pub fn processes_sharing_uid(proc_root: &Path, uid: u32, own_pid: u32) -> Vec<SharedProcess> {
    let netns = |pid: &str| std::fs::read_link(proc_root.join(pid).join("ns/net")).ok();
    let Some(own) = netns(&own_pid.to_string()) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut found: Vec<SharedProcess> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let pid: u32 = name.to_str()?.parse().ok()?;
            if pid == own_pid {
                return None;
            }
            let dir = entry.path();
            let (real, effective) = uids(&std::fs::read_to_string(dir.join("status")).ok()?)?;
            if real != uid && effective != uid {
                return None;
            }
            if netns(name.to_str()?)? != own {
                return None;
            }
            let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            Some(SharedProcess {
                pid,
                name: name.trim().chars().take(32).collect(),
            })
        })
        .collect();
    found.sort_by_key(|p| p.pid);
    found
}

/// Runs the scan for this process and reports: an error log line naming the processes, and the
/// gauge. Root is skipped (the capture rules never exempt it, and every root process in the
/// namespace would be listed).
pub fn check(metrics: &Metrics) {
    let proc_root = Path::new("/proc");
    let own_pid = std::process::id();
    let Some(uid) = effective_uid(proc_root, own_pid) else {
        tracing::warn!(
            "could not read /proc/self/status: not checking for processes sharing the proxy's uid"
        );
        return;
    };
    if uid == 0 {
        tracing::debug!("running as root: not checking for processes sharing the proxy's uid");
        return;
    }
    let shared = processes_sharing_uid(proc_root, uid, own_pid);
    metrics.uid_shared_processes.set(shared.len() as i64);
    if !shared.is_empty() {
        let listed: Vec<String> = shared
            .iter()
            .take(10)
            .map(|p| format!("{} ({:?})", p.pid, p.name))
            .collect();
        tracing::error!(
            uid,
            count = shared.len(),
            processes = %listed.join(", "),
            "other processes run as the proxy's uid in its network namespace: the capture rules \
             exempt this uid, so their traffic bypasses the proxy and leaves in clear; run the \
             app as another uid (securityContext.runAsUser)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fake_process(root: &Path, pid: u32, uid: u32, netns: &str, name: &str) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        std::fs::write(
            dir.join("status"),
            format!(
                "Name:\t{name}\nUmask:\t0022\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("comm"), format!("{name}\n")).unwrap();
        symlink(netns, dir.join("ns/net")).unwrap();
    }

    #[test]
    fn finds_other_processes_of_the_uid_in_the_same_network_namespace_only() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let pod = "net:[4026532200]";
        fake_process(root, 7, 1337, pod, "latch-proxy");
        fake_process(root, 12, 1337, pod, "app");
        fake_process(root, 13, 1000, pod, "other-uid");
        fake_process(root, 14, 1337, "net:[4026531840]", "other-pod");
        fake_process(root, 3, 1337, pod, "sidekick");
        std::fs::create_dir_all(root.join("sys")).unwrap();
        std::fs::create_dir_all(root.join("99")).unwrap(); // vanished mid-scan: no status
        assert_eq!(
            processes_sharing_uid(root, 1337, 7),
            [
                SharedProcess {
                    pid: 3,
                    name: "sidekick".into()
                },
                SharedProcess {
                    pid: 12,
                    name: "app".into()
                },
            ]
        );
        assert_eq!(processes_sharing_uid(root, 1000, 7).len(), 1);
        assert!(
            processes_sharing_uid(root, 1337, 14).is_empty(),
            "alone in its namespace"
        );
        assert!(
            processes_sharing_uid(root, 1337, 42).is_empty(),
            "own process unreadable"
        );
        assert_eq!(effective_uid(root, 12), Some(1337));
    }

    #[test]
    fn finds_a_real_child_of_the_same_uid() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let own = std::process::id();
        let uid = effective_uid(Path::new("/proc"), own).unwrap();
        // Until the child has exec'd, its comm is still this test's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let found = loop {
            let found = processes_sharing_uid(Path::new("/proc"), uid, own);
            if found
                .iter()
                .any(|p| p.pid == child.id() && p.name == "sleep")
                || std::time::Instant::now() > deadline
            {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found
                .iter()
                .any(|p| p.pid == child.id() && p.name == "sleep"),
            "{found:?}"
        );
        assert!(found.iter().all(|p| p.pid != own));
    }
}
