#![no_main]
//! libFuzzer entry of the `infod_query` target; what it checks is in `rmosix_fuzz_harness::query`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rmosix_fuzz_harness::query::run(data));
