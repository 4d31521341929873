//! Fuzz target `request`: see nbdkit::fuzzing::request.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdkit::fuzzing::request(data));
