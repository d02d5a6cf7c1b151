//! Developer tasks shared by the `xtask` binary and its tests. Codegen lives here so that the
//! staleness test runs exactly the code `cargo xtask codegen` runs, and the compose mesh so
//! that tests/tests/compose.rs builds and runs it exactly as `cargo xtask compose` does; the
//! fuzz runner so that its output parsing is tested. This
//! crate must build even when the checked-in generated code is broken, so it depends on no
//! Latch crate.

pub mod codegen;
pub mod compose;
pub mod fuzz;
