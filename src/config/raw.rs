//! The configuration file exactly as written: serde types with no meaning
//! attached yet. Every struct denies unknown fields so a typo is an error, not
//! a silently ignored setting. Numbers that must be positive are read as signed
//! integers so that `-1` gets a "must be > 0" message with its path instead of
//! a type error.

use serde::Deserialize;
use std::collections::BTreeMap;

/// Top level. The list sections stay untyped here so that each item can be
/// checked on its own and every broken item reported, not only the first.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listen: Option<String>,
    #[serde(default)]
    pub admin_listen: Option<String>,
    #[serde(default)]
    pub threads: Option<i64>,
    #[serde(default)]
    pub max_body_bytes: Option<RawSize>,
    #[serde(default)]
    pub max_json_depth: Option<i64>,
    #[serde(default)]
    pub client_timeout: Option<String>,
    #[serde(default)]
    pub upstream_keepalive_pool: Option<i64>,
    #[serde(default)]
    pub upstream_tls: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub tenants: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub models: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub pools: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub deployments: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub pricing: BTreeMap<String, serde_yaml_ng::Value>,
}

/// A size written either as a byte count or as a string with a unit (`32MiB`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    #[serde(default)]
    pub ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub id: String,
    /// SHA-256 digests (hex) of the tenant's API keys; `collie hash-key` prints one.
    pub api_keys: Vec<String>,
    /// Public model names the tenant may call; `"*"` allows every model.
    pub models: Vec<String>,
    #[serde(default)]
    pub priority: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    /// Pools tried in this order until one answers.
    pub fallback: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub id: String,
    pub deployments: Vec<RawPoolMember>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoolMember {
    pub deployment: String,
    #[serde(default)]
    pub weight: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub id: String,
    pub base_url: String,
    /// Name of the environment variable holding the provider key. Absent for
    /// upstreams that take no key (a local model server).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub auth: Option<String>,
    /// The model name the provider expects.
    pub model: String,
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default)]
    pub http2: Option<bool>,
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    pub first_byte: Option<String>,
    #[serde(default)]
    pub idle: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// USD per million prompt tokens.
    pub input_per_mtok: f64,
    /// USD per million completion tokens.
    pub output_per_mtok: f64,
}
