#![no_main]
//! Fuzz target: see `collie::fuzzing::identity_headers` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| collie::fuzzing::identity_headers(data));
