//! Collie: a per-tenant sidecar gateway for OpenAI-style LLM traffic.
//!
//! The map of the parts is in the README; each module's first line says what
//! it owns.

pub mod admin;
pub mod alerts;
pub mod audit;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod outcome;
pub mod quota;
mod redact;
pub mod routing;
pub mod server;
pub mod state;
pub mod usage;
