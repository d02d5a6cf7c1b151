//! Fuzz target `spiffe_id`: the property checks of `latch_fuzz::spiffe_id` on libFuzzer's inputs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latch_fuzz::spiffe_id::check(data));
