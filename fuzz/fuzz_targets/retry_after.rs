#![no_main]
//! Fuzz target: see `collie::fuzzing::retry_after` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| collie::fuzzing::retry_after(data));
