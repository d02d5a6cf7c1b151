//! Fuzz target `transport_header`: the property checks of `latch_fuzz::transport_header` on libFuzzer's inputs.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: latch_fuzz::write_seeds_if_asked("transport_header"),
    |data: &[u8]| latch_fuzz::transport_header::check(data)
);
