#![no_main]
//! Fuzz target: see `collie::fuzzing::config_file` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| collie::fuzzing::config_file(data));
