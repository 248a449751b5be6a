#![no_main]
//! libFuzzer entry of the `migd_handshake` target; what it checks is in `rmosix_fuzz_harness::handshake`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rmosix_fuzz_harness::handshake::run(data));
