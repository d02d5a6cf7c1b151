//! The properties Latch's fuzz targets check, one module per target, and the seed inputs each
//! starts from. `fuzz_targets/*.rs` hand libFuzzer's bytes to `<module>::check`; the corpus
//! test (`tests/corpus.rs`) replays every committed input through the same functions on stable
//! and writes the seeds. Driven by `cargo xtask fuzz`.

pub mod csr;
pub mod policy_evaluation;
pub mod spiffe_id;
pub mod transport_header;
pub mod xds_resources;

mod fixtures;

/// The fuzz targets, by name (the names of `fuzz_targets/*.rs` and `corpus/*/`).
pub const TARGETS: [&str; 5] = [
    "transport_header",
    "csr",
    "spiffe_id",
    "xds_resources",
    "policy_evaluation",
];

/// The property check of target `name`.
pub fn check_fn(name: &str) -> Option<fn(&[u8])> {
    Some(match name {
        "transport_header" => transport_header::check,
        "csr" => csr::check,
        "spiffe_id" => spiffe_id::check,
        "xds_resources" => xds_resources::check,
        "policy_evaluation" => policy_evaluation::check,
        _ => return None,
    })
}

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
