//! Fuzz target `option`: see nbdkit::fuzzing::option.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdkit::fuzzing::option(data));
