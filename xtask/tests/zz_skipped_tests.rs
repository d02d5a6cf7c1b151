//! Not a test: the summary of the tests skipped during this `cargo test` run (missing root,
//! Docker, libfaketime, kubernetes-validate, ...), which libtest would otherwise count as
//! passed with their SKIPPED line swallowed. Cargo runs it last in `cargo test --workspace`
//! (xtask is the last package by name, this its last test target), so the names end the
//! output. Records come from `latch_testkit::skip::skipped` (`xtask::skipped`).

fn main() {
    xtask::skipped::report();
}
