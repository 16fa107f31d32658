#![no_main]
//! Fuzz target: see `collie::fuzzing::request_body` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| collie::fuzzing::request_body(data));
