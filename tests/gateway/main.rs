//! The request path over real sockets: who may call, the exchange with
//! providers (rewriting, fallback, `Retry-After`), streams, and hostile
//! clients and providers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

#[path = "../common/mod.rs"]
mod common;

mod admission;
mod cost;
mod exchange;
mod hostile;
mod streaming;
