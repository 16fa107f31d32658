#![no_main]
//! Fuzz target: see `collie::fuzzing::request_head` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| collie::fuzzing::request_head(data));
