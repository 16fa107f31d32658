//! The `collie` command line: its commands run as processes, the admin
//! listener, and `collie demo` as the README runs it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod commands;
mod demo;
mod reload;
