#![no_main]
//! libFuzzer entry of the `cluster_map` target; what it checks is in `rmosix_fuzz_harness::map`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rmosix_fuzz_harness::map::run(data));
