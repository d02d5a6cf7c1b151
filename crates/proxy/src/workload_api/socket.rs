//! Creates the Workload API socket so that it never exists, even for an instant, with a wider
//! mode than intended: it is bound inside a fresh directory only the proxy's uid can enter
//! (0700), given its mode there, then renamed into place. The rename also replaces a stale socket
//! from an earlier run in one step; anything else found at the path is left alone. (A umask set
//! around bind(2) would do the same, but the umask is process-wide and other threads create
//! files meanwhile.)

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::UnixListener;

/// Binds a listening Unix socket at `path` with file mode `mode`.
pub fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "something other than a socket is there; refusing to replace it",
            ));
        }
        _ => {}
    }
    let staging = staging_dir(parent);
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let result = bind_in(&staging, path, mode);
    let _ = std::fs::remove_dir(&staging);
    result
}

fn bind_in(staging: &Path, path: &Path, mode: u32) -> io::Result<UnixListener> {
    let temporary = staging.join("s");
    let listener = UnixListener::bind(&temporary)?;
    let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    Ok(listener)
}

/// A name no other bind uses: short, since a socket path has at most 107 bytes and the socket is
/// bound at `<parent>/<this>/s` first.
fn staging_dir(parent: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    parent.join(format!(
        ".latch-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test]
    async fn socket_has_its_mode_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/workload.sock");
        let first = bind(&path, 0o600).unwrap();
        assert_eq!(mode(&path), 0o600);
        drop(first); // a stale socket file stays behind, as after kill -9
        assert!(path.exists());
        let _second = bind(&path, 0o666).unwrap();
        assert_eq!(mode(&path), 0o666);
        tokio::net::UnixStream::connect(&path).await.unwrap();
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["workload.sock"]);
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("important");
        std::fs::write(&path, b"data").unwrap();
        let err = bind(&path, 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
