#![no_main]
//! libFuzzer entry of the `infod_datagram` target; what it checks is in `rmosix_fuzz_harness::datagram`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rmosix_fuzz_harness::datagram::run(data));
