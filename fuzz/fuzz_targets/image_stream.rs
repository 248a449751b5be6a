#![no_main]
//! libFuzzer entry of the `image_stream` target; what it checks is in `rmosix_fuzz_harness::image`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rmosix_fuzz_harness::image::run(data));
