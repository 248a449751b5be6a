#![no_main]
//! libFuzzer entry of the `control_frames` target; what it checks is in `rmosix_fuzz_harness::control`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rmosix_fuzz_harness::control::run(data));
