//! Arbitrary bytes through the frame decoder (and a re-encode round trip).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proto::testkit::fuzz_decode(data);
});
