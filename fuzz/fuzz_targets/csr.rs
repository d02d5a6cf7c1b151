//! Fuzz target `csr`: the property checks of `latch_fuzz::csr` on libFuzzer's inputs.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: latch_fuzz::write_seeds_if_asked("csr"),
    |data: &[u8]| latch_fuzz::csr::check(data)
);
