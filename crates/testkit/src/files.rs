//! Temp dirs and files the tests, bench and demo keep making: a named temp dir, a path as
//! UTF-8 for a flag, a config file replaced the way an editor does it (write aside, rename),
//! a private (0600) token file. Used by `harness`, `processes`, tests, latch-bench, the demo.

use std::path::Path;

/// A new temp dir named `latch-<prefix>-...`, removed when dropped.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("latch-{prefix}-"))
        .tempdir()
        .expect("temp dir")
}

/// `path` as a `&str`, for command-line flags.
pub fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Replaces `path` with `text` the way an editor does (write aside, rename over it), so a
/// watcher never sees a half-written file.
pub fn replace_file(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Writes a join token (or any secret) to `path`, 0600.
pub fn write_token(path: &Path, token: &str) {
    latch_identity::files::write_private(path, token.as_bytes())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
