#![no_main]
//! Fuzz target: see `collie::fuzzing::key_mask` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| collie::fuzzing::key_mask(data));
