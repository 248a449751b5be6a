#![no_main]
//! libFuzzer entry of the `config` target; what it checks is in `rmosix_fuzz_harness::config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rmosix_fuzz_harness::config::run(data));
