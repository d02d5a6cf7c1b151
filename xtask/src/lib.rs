//! Developer tasks shared by the `xtask` binary and its tests. Codegen lives here so that the
//! staleness test runs exactly the code `cargo xtask codegen` runs, and the compose mesh so
//! that tests/tests/compose.rs builds and runs it exactly as `cargo xtask compose` does; the
//! fuzz runner so that its output parsing is tested; the record of skipped tests so that the
//! summary ending `cargo test --workspace` (tests/zz_skipped_tests.rs) needs nothing else. This
//! crate must build even when the checked-in generated code is broken, so it depends on no
//! Latch crate.

pub mod codegen;
pub mod compose;
pub mod fuzz;
pub mod skipped;

/// `cargo` arguments that build the release binaries `cargo xtask demo` and `bench` run. Not
/// `--quiet`: the first build takes minutes and cargo's progress is what the user watches.
pub const RELEASE_BUILD: &[&str] = &["build", "--release", "--bins"];

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_build_shows_cargo_progress() {
        assert!(
            !super::RELEASE_BUILD
                .iter()
                .any(|a| *a == "--quiet" || *a == "-q"),
            "{:?}",
            super::RELEASE_BUILD
        );
    }
}
