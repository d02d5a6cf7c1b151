//! Fails when crates/proto/src/generated differs from what `cargo xtask codegen` would write.

use std::collections::BTreeMap;
use std::path::Path;

fn read_dir_files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("dir entry").path();
            let name = path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path).expect("read generated file");
            (name, text)
        })
        .collect()
}

#[test]
fn checked_in_generated_code_is_fresh() {
    let root = xtask::codegen::workspace_root();
    let fresh = tempfile::tempdir().expect("tempdir");
    xtask::codegen::generate(&root, fresh.path()).expect("codegen");
    let want = read_dir_files(fresh.path());
    let have = read_dir_files(&xtask::codegen::checked_in_dir(&root));
    assert!(!want.is_empty(), "codegen produced nothing");
    for (name, text) in &want {
        assert!(
            have.get(name) == Some(text),
            "crates/proto/src/generated/{name} is stale or missing: run `cargo xtask codegen` and commit"
        );
    }
    for name in have.keys() {
        assert!(
            want.contains_key(name),
            "crates/proto/src/generated/{name} has no .proto source any more: run `cargo xtask codegen`"
        );
    }
}
