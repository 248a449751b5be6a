#![no_main]
//! libFuzzer entry of the `migd_messages` target; what it checks is in `rmosix_fuzz_harness::protocol`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rmosix_fuzz_harness::protocol::run(data));
