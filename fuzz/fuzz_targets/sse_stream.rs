#![no_main]
//! Fuzz target: see `collie::fuzzing::sse_stream` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| collie::fuzzing::sse_stream(data));
