//! Skipped tests: `skipped(why)` prints the loud SKIPPED line and records it for the summary
//! that ends `cargo test --workspace`. Implemented in `xtask::skipped`, next to the target that
//! prints the summary; used by `netns`, the tests of tests/ and crates/cli/tests.

pub use xtask::skipped::skipped;
