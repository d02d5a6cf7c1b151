//! The properties Latch's fuzz targets check, one module per target, and the seed inputs each
//! starts from. `fuzz_targets/*.rs` hand libFuzzer's bytes to `<module>::check`, and write
//! the seeds when asked (`cargo xtask fuzz --write-seeds`). Driven by `cargo xtask fuzz`.

pub mod csr;
pub mod policy_evaluation;
pub mod spiffe_id;
pub mod transport_header;
pub mod xds_resources;

mod fixtures;

use std::path::PathBuf;

/// The seed inputs of target `name`: (file name, bytes).
pub fn seeds(name: &str) -> Vec<(String, Vec<u8>)> {
    match name {
        "transport_header" => transport_header::seeds(),
        "csr" => csr::seeds(),
        "spiffe_id" => spiffe_id::seeds(),
        "xds_resources" => xds_resources::seeds(),
        "policy_evaluation" => policy_evaluation::seeds(),
        _ => Vec::new(),
    }
}

/// Writes the seeds of `target` into `<dir>/<target>/seed-<name>` when the environment variable
/// `LATCH_FUZZ_WRITE_SEEDS` names a `dir` (set by `cargo xtask fuzz --write-seeds`). Runs once,
/// before libFuzzer reads the corpus.
pub fn write_seeds_if_asked(target: &str) {
    let Some(dir) = std::env::var_os("LATCH_FUZZ_WRITE_SEEDS") else {
        return;
    };
    let dir = PathBuf::from(dir).join(target);
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        seeds(target)
            .into_iter()
            .try_for_each(|(name, bytes)| std::fs::write(dir.join(format!("seed-{name}")), bytes))
    });
    if let Err(e) = written {
        panic!("writing the seeds of {target} into {}: {e}", dir.display());
    }
}
