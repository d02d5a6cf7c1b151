//! Fuzz target `policy_evaluation`: the property checks of `latch_fuzz::policy_evaluation` on libFuzzer's inputs.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: latch_fuzz::write_seeds_if_asked("policy_evaluation"),
    |data: &[u8]| latch_fuzz::policy_evaluation::check(data)
);
