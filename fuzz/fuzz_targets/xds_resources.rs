//! Fuzz target `xds_resources`: the property checks of `latch_fuzz::xds_resources` on libFuzzer's inputs.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: latch_fuzz::write_seeds_if_asked("xds_resources"),
    |data: &[u8]| latch_fuzz::xds_resources::check(data)
);
