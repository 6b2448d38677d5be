//! Arbitrary frames; any CALL goes through the command verifier and replay window.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proto::testkit::fuzz_verify(data);
});
