//! Fuzz target `spiffe_id`: the property checks of `latch_fuzz::spiffe_id` on libFuzzer's inputs.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: latch_fuzz::write_seeds_if_asked("spiffe_id"),
    |data: &[u8]| latch_fuzz::spiffe_id::check(data)
);
