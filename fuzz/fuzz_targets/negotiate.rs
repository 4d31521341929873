//! Fuzz target `negotiate`: see nbdkit::fuzzing::negotiate.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdkit::fuzzing::negotiate(data));
