#![no_main]
//! libFuzzer entry of the `migd_channel` target; what it checks is in `rmosix_fuzz_harness::channel`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rmosix_fuzz_harness::channel::run(data));
