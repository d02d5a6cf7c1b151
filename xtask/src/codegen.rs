//! Regenerates crates/proto/src/generated from proto/ with protox (a pure-Rust protobuf
//! compiler, so no system protoc) and tonic-prost-build.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Every .proto file under `proto_dir`, sorted so the output does not depend on directory order.
fn proto_files(proto_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![proto_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "proto") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Compiles every proto under `<root>/proto` and writes the Rust modules into `out_dir`.
pub fn generate(root: &Path, out_dir: &Path) -> Result<()> {
    let proto_dir = root.join("proto");
    let files = proto_files(&proto_dir)?;
    let fds = protox::compile(&files, [&proto_dir])
        .map_err(|e| anyhow::anyhow!("compiling protos under {}: {e}", proto_dir.display()))?;
    std::fs::create_dir_all(out_dir)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // BTreeMap keeps map fields in key order, so a message always encodes to the same bytes
        // (discovery versions are hashes of the encoding).
        .btree_map(".")
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_fds(fds)
        .with_context(|| format!("generating Rust into {}", out_dir.display()))?;
    Ok(())
}

/// The folder the generated code is checked in to.
pub fn checked_in_dir(root: &Path) -> PathBuf {
    root.join("crates/proto/src/generated")
}
