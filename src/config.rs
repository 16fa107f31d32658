//! Configuration: YAML → raw serde types → a validated [`Config`].
//!
//! Validation collects every problem with its path (`pools[1].deployments[0].weight:
//! must be > 0`) before failing, so an operator fixes a file in one pass.
//! Secrets are never written in the file: provider keys are named by environment
//! variable and tenant keys are stored as SHA-256 digests.

mod audit;
mod fleet;
mod health;
mod quota;
mod raw;
mod tls;

pub use audit::{AnomalySettings, AuditSettings, SinkSpec, SinkSpecError, Webhook, is_schema_name};
pub(crate) use fleet::{FleetSettings, RedisDown};
pub(crate) use health::{HealthSettings, Policy, ProbeKind, RetrySettings, Route};
use http::{HeaderName, HeaderValue};
pub(crate) use quota::{
    Budget, Limits, PriorityFactors, QuotaSettings, Rate, RebalanceSettings, TenantLimits,
};
use raw::{
    RawConfig, RawDeployment, RawModel, RawPool, RawPrice, RawSize, RawTenant, RawUpstreamTls,
};
use serde::de::DeserializeOwned;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;
pub(crate) use tls::CaBundle;

pub(crate) const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
pub(crate) const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090));
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
pub(crate) const DEFAULT_MAX_JSON_DEPTH: usize = 64;
pub(crate) const DEFAULT_PRIORITY: u8 = 3;
/// Requests held for a deployment to come back, all models together.
const DEFAULT_MAX_HELD_REQUESTS: usize = 256;
/// The shortest admin token accepted.
const MIN_ADMIN_TOKEN: usize = 16;
pub(crate) const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
pub(crate) const DEFAULT_MAX_HEADERS: usize = 100;
pub(crate) const DEFAULT_MAX_INFLIGHT_BODY_BYTES: usize = 256 * 1024 * 1024;
/// The HTTP/1 parser below Collie stops at 256 header fields.
const MAX_HEADERS_CEILING: usize = 250;
/// Routing gives each deployment a synthetic 16-bit identity (see
/// `routing::identity_backend`).
const MAX_DEPLOYMENTS: usize = u16::MAX as usize;

/// A pool, by its position in [`Config::pools`]: never confused with a
/// deployment's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PoolIx(pub(crate) usize);

/// A deployment, by its position in [`Config::deployments`] (and in the
/// router's deployments built from them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct DeploymentIx(pub(crate) usize);

/// The validated configuration. Indices (`usize`) refer into the vectors of
/// this struct; names were resolved during validation.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the OpenAI-style endpoint that applications call listens.
    pub listen: SocketAddr,
    /// Where `/metrics`, `/healthz`, `/readyz` and the status page listen.
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin listener's pages that show tenants' usage
    /// and deployments (`/status`, `/quota`); without one they are served
    /// to loopback clients only. From `admin_token_env`.
    pub(crate) admin_token: Option<Secret>,
    pub(crate) threads: usize,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_json_depth: usize,
    /// How long a client may take to send its whole body, and how long a
    /// write to a slow client may block.
    pub(crate) client_timeout: Duration,
    /// How long a client may take to send a whole request head, from its
    /// first byte (on a new connection: from the connection's start).
    pub(crate) head_timeout: Duration,
    /// How long a connection may sit idle between requests.
    pub(crate) keepalive_timeout: Duration,
    /// Largest request head (request line and headers) accepted: 431 beyond.
    pub(crate) max_header_bytes: usize,
    /// Most header fields a request may carry: 431 beyond.
    pub(crate) max_headers: usize,
    /// Request bodies held in memory by all requests together: beyond it a
    /// request gets 503 with `Retry-After` instead of its body being read.
    pub(crate) max_inflight_body_bytes: usize,
    /// Longest a graceful stop waits for requests in flight before it cuts
    /// them off (streams end with an error event).
    pub(crate) drain_timeout: Duration,
    pub(crate) upstream_keepalive_pool: usize,
    /// Replaces the system roots for every `https` deployment without its own `ca_file`.
    pub(crate) upstream_ca: Option<CaBundle>,
    pub(crate) tenants: Vec<Tenant>,
    pub(crate) models: Vec<Model>,
    pub(crate) pools: Vec<Pool>,
    /// Provider endpoints; pools refer to them by index.
    pub deployments: Vec<Deployment>,
    /// Keyed by the upstream model name, which is what a provider bills.
    pub(crate) pricing: HashMap<String, Price>,
    pub(crate) quota: QuotaSettings,
    pub(crate) retry: RetrySettings,
    /// Longest a request may take in all: waits, attempts and backoff.
    pub(crate) request_deadline: Duration,
    /// Most requests held at once for a deployment to come back.
    pub(crate) max_held_requests: usize,
    pub(crate) audit: AuditSettings,
    /// Quotas shared by a fleet of sidecars through Redis; `None`: this
    /// sidecar's own ledger alone.
    pub(crate) fleet: Option<FleetSettings>,
    /// Environment variables the file names but the process lacks, with
    /// the field that names each: empty unless validated with
    /// [`MissingEnv::Allow`] (such a config is for checking, not running).
    pub(crate) missing_env: Vec<(String, String)>,
}

/// What validation does about an environment variable the file names
/// (`api_key_env`, `admin_token_env`, `audit.postgres_url_env`) that the
/// process does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingEnv {
    /// An error, as for `collie run`: the value is needed.
    Refuse,
    /// Noted ([`Config::missing_env`]) and otherwise ignored: a config
    /// checked in CI, without the secrets the process would get.
    Allow,
}

#[derive(Debug, Clone)]
pub(crate) struct Tenant {
    pub(crate) id: String,
    pub(crate) key_digests: Vec<[u8; 32]>,
    pub(crate) models: ModelAccess,
    /// 1 (highest) to 5 (lowest).
    pub(crate) priority: u8,
    /// Quota limits (the priority is repeated inside).
    pub(crate) limits: TenantLimits,
    /// Output tokens reserved for a request without `max_tokens`.
    pub(crate) default_max_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ModelAccess {
    All,
    Only(HashSet<String>),
}

impl ModelAccess {
    pub(crate) fn allows(&self, model: &str) -> bool {
        match self {
            ModelAccess::All => true,
            ModelAccess::Only(set) => set.contains(model),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Model {
    pub(crate) name: String,
    /// Pool indices in fallback order.
    pub(crate) chain: Vec<PoolIx>,
    /// Route-alias rules; the first that matches replaces `chain`.
    pub(crate) routes: Vec<Route>,
    pub(crate) max_output_tokens: Option<u64>,
    pub(crate) family: Family,
    /// Context window of the deployments serving the model that set none.
    pub(crate) context_window: Option<u64>,
    /// How long a request may wait for a deployment to come back while
    /// every one of its chain is down (panic mode); `None`: 503 at once.
    pub(crate) hold_when_down: Option<Duration>,
}

impl Model {
    /// The chain for a request: the first route rule matching the hint or the
    /// tenant's priority, else the default chain.
    pub(crate) fn chain_for(&self, priority: u8, hint: Option<&str>) -> &[PoolIx] {
        self.routes
            .iter()
            .find(|r| {
                let hint_ok = r.hint.as_deref().is_none_or(|h| Some(h) == hint);
                let prio_ok = r.priorities.as_ref().is_none_or(|p| p.contains(&priority));
                hint_ok && prio_ok
            })
            .map_or(&self.chain, |r| &r.chain)
    }
}

/// The tokenizer family a model's counts follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `o200k_base`: GPT-4o, GPT-4.1, GPT-5, the o-series.
    O200k,
    /// `cl100k_base`: GPT-4, GPT-3.5, the text-embedding-3 models.
    Cl100k,
    /// Anything else: a cautious middle with a safety margin.
    Generic,
}

impl Family {
    /// Guess from a model name; config can say otherwise.
    pub fn for_model(name: &str) -> Family {
        let n = name.to_ascii_lowercase();
        let o200k = [
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "o1",
            "o3",
            "o4",
            "chatgpt-4o",
        ];
        let cl100k = ["gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada"];
        if o200k.iter().any(|p| n.starts_with(p)) {
            Family::O200k
        } else if cl100k.iter().any(|p| n.starts_with(p)) {
            Family::Cl100k
        } else {
            Family::Generic
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Family> {
        match text {
            "o200k" => Some(Family::O200k),
            "cl100k" => Some(Family::Cl100k),
            "generic" => Some(Family::Generic),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Pool {
    pub(crate) id: String,
    pub(crate) members: Vec<PoolMember>,
    pub(crate) max_concurrency: Option<u32>,
    pub(crate) adaptive_concurrency: bool,
    pub(crate) policy: Policy,
    /// Other members tried before the next pool of the chain.
    pub(crate) retries: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct PoolMember {
    pub(crate) deployment: DeploymentIx,
    pub(crate) weight: u32,
}

/// One provider endpoint: where it is, the key it takes, the model name it
/// expects, its timeouts and limits.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub(crate) id: String,
    /// The provider's API root, e.g. `https://api.openai.com/v1`.
    pub base_url: BaseUrl,
    pub(crate) api_key: Option<Secret>,
    pub(crate) model: String,
    /// `model`, ready for the `x-collie-model` response header.
    pub(crate) model_header: HeaderValue,
    /// The header carrying the provider key, marked sensitive so HPACK never
    /// indexes it (and its `Debug` says only "Sensitive"). `None` when no
    /// key is sent.
    pub(crate) auth_header: Option<(HeaderName, HeaderValue)>,
    /// The deployment's own trust roots (`ca_file`), loaded.
    pub(crate) ca: Option<CaBundle>,
    /// Offer HTTP/2 in ALPN (TLS only). Plain-text upstreams always speak HTTP/1.1.
    pub(crate) http2: bool,
    pub(crate) timeouts: Timeouts,
    /// The provider's per-minute limits for this key.
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    /// Tokens (prompt + output) the deployment's model holds; `None`: the
    /// model's, else unbounded.
    pub(crate) context_window: Option<u64>,
    pub(crate) health: HealthSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthStyle {
    /// `Authorization: Bearer <key>` (OpenAI and most compatible providers).
    Bearer,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
    /// No credential sent (a local model server).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    /// From the end of the request to the response head.
    pub(crate) first_byte: Duration,
    /// Longest silence allowed between two reads of the response body.
    pub(crate) idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            // A non-streamed completion sends nothing until it has generated
            // everything, so this is generous by default.
            first_byte: Duration::from_secs(120),
            idle: Duration::from_secs(60),
        }
    }
}

/// Parsed `http(s)://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub(crate) tls: bool,
    pub(crate) host: String,
    /// The URL's port, else the scheme's default (443 or 80).
    pub port: u16,
    /// Without a trailing slash; empty when the URL has no path.
    pub(crate) path_prefix: String,
    /// [`BaseUrl::authority`], ready for the `Host` header.
    pub(crate) host_header: HeaderValue,
}

impl BaseUrl {
    /// The `Host` header value: the port is left out when it is the scheme's default.
    pub(crate) fn authority(&self) -> String {
        authority_of(self.tls, &self.host, self.port)
    }

    /// Point at another port (the demo moves its mock providers), keeping
    /// the `Host` header in step.
    pub fn set_port(&mut self, port: u16) {
        self.port = port;
        // The host was a valid header value already and a port adds only
        // digits, so this cannot fail.
        if let Ok(v) = HeaderValue::from_str(&self.authority()) {
            self.host_header = v;
        }
    }
}

fn authority_of(tls: bool, host: &str, port: u16) -> String {
    let default_port = if tls { 443 } else { 80 };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    if port == default_port {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// Prices in picodollars (1e-12 USD) per token so that cost arithmetic is exact
/// integer arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Price {
    pub(crate) input_pico_per_token: u64,
    pub(crate) output_pico_per_token: u64,
}

/// A secret value read from the environment. It has no `Display` and its
/// `Debug` is redacted, so it cannot end up in a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn new(value: String) -> Self {
        Secret(value)
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// One validation problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub(crate) path: String,
    pub(crate) message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// A pool by its index.
    pub(crate) fn pool(&self, p: PoolIx) -> Option<&Pool> {
        self.pools.get(p.0)
    }

    /// A deployment by its index.
    pub(crate) fn deployment(&self, d: DeploymentIx) -> Option<&Deployment> {
        self.deployments.get(d.0)
    }

    /// The environment variables validation allowed to be missing, each
    /// with the field that names it (see [`MissingEnv::Allow`]).
    pub fn missing_env(&self) -> &[(String, String)] {
        &self.missing_env
    }

    /// Why a valid config would still serve nobody: no tenant (every
    /// request 401) or no model (every request 404). An empty file is
    /// valid YAML for a config of defaults, and is such a config.
    /// `check-config` refuses it; `run` starts, not ready (`/readyz`
    /// waits for a model), so a config can be filled in by a reload.
    pub fn serves_nobody(&self) -> Vec<ConfigError> {
        let mut out = Vec::new();
        if self.tenants.is_empty() {
            out.push(ConfigError {
                path: "tenants".into(),
                message: "no tenant is configured, so every request would be refused (401); is the file empty?".into(),
            });
        }
        if self.models.is_empty() {
            out.push(ConfigError {
                path: "models".into(),
                message: "no model is configured, so every request would be refused (404)".into(),
            });
        }
        out
    }

    /// Read and validate a file, taking provider keys from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::load_with(path, MissingEnv::Refuse)
    }

    /// [`Config::load`], with `missing` deciding about the environment
    /// variables the process lacks.
    pub fn load_with(path: &Path, missing: MissingEnv) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        Config::from_yaml_with(&text, &|name| std::env::var(name).ok(), missing)
    }

    /// Validate YAML text; `env` looks up environment variables (injectable for tests).
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        Config::from_yaml_with(text, env, MissingEnv::Refuse)
    }

    /// [`Config::from_yaml`], with `missing` deciding about the environment
    /// variables `env` does not have.
    pub fn from_yaml_with(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        missing: MissingEnv,
    ) -> Result<Config, ConfigErrors> {
        let mut v = Validator {
            errors: Vec::new(),
            env,
            missing,
            missing_env: Vec::new(),
        };
        let raw: RawConfig = match v.parse_document(text) {
            Some(raw) => raw,
            None => return Err(ConfigErrors(v.errors)),
        };
        let config = v.build(raw);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(v.errors))
        }
    }
}

/// The top-level field an error is about: the first segment of its path, or
/// for an unknown field at the top, the name the message quotes.
fn top_level_key(path: &str, message: &str) -> Option<String> {
    let first = path
        .split(['.', '['])
        .next()
        .filter(|s| !s.is_empty() && *s != "?");
    if let Some(k) = first {
        return Some(k.to_string());
    }
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

struct Validator<'a> {
    errors: Vec<ConfigError>,
    env: &'a dyn Fn(&str) -> Option<String>,
    missing: MissingEnv,
    /// (field, variable) of each variable allowed to be missing.
    missing_env: Vec<(String, String)>,
}

impl Validator<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// The variable `name` that the field at `path` names is not set: an
    /// error, or with [`MissingEnv::Allow`] a note.
    fn env_missing(&mut self, path: &str, name: &str) {
        match self.missing {
            MissingEnv::Refuse => {
                self.error(path, format!("environment variable `{name}` is not set"));
            }
            MissingEnv::Allow => self.missing_env.push((path.to_string(), name.to_string())),
        }
    }

    /// Parse the document, reporting every broken top-level field: a field
    /// that fails (unknown, or of the wrong type) is reported and left out,
    /// and the rest is parsed again, so one typo does not hide the others.
    fn parse_document(&mut self, text: &str) -> Option<RawConfig> {
        let mut doc: serde_yaml_ng::Value = match serde_yaml_ng::from_str(text) {
            Ok(serde_yaml_ng::Value::Null) => serde_yaml_ng::Value::Mapping(Default::default()),
            Ok(v) => v,
            Err(e) => {
                self.error("", e.to_string());
                return None;
            }
        };
        loop {
            // The fields left out take their defaults; the errors already
            // collected keep the file from being accepted.
            match serde_path_to_error::deserialize::<_, RawConfig>(doc.clone()) {
                Ok(raw) => return Some(raw),
                Err(e) => {
                    let path = e.path().to_string();
                    let message = e.into_inner().to_string();
                    let key = top_level_key(&path, &message);
                    let removed = match (&mut doc, &key) {
                        (serde_yaml_ng::Value::Mapping(m), Some(k)) => {
                            m.remove(k.as_str()).is_some()
                        }
                        _ => false,
                    };
                    let path = if path == "." { String::new() } else { path };
                    let path = match (&key, path.is_empty()) {
                        (Some(k), true) => k.clone(),
                        _ => path,
                    };
                    self.error(path, message);
                    if !removed {
                        return None;
                    }
                }
            }
        }
    }

    /// Deserialize one list item on its own so that one broken item does not
    /// hide the problems of the others.
    fn item<T: DeserializeOwned>(&mut self, path: &str, value: serde_yaml_ng::Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = e.path().to_string();
                let full = if inner == "." {
                    path.to_string()
                } else {
                    format!("{path}.{inner}")
                };
                self.error(full, e.into_inner().to_string());
                None
            }
        }
    }

    fn duration(&mut self, path: &str, text: &Option<String>, default: Duration) -> Duration {
        match text {
            None => default,
            Some(t) => match humantime::parse_duration(t) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.error(path, "must be longer than zero");
                    default
                }
                // A bare number: say which unit, not only that one is missing.
                Err(_) if t.trim().parse::<f64>().is_ok() => {
                    let n = t.trim();
                    self.error(
                        path,
                        format!("`{n}` has no unit; write `{n}s` for seconds (or `{n}ms`, `{n}m`)"),
                    );
                    default
                }
                Err(e) => {
                    self.error(
                        path,
                        format!("not a duration ({e}); write e.g. `30s` or `2m`"),
                    );
                    default
                }
            },
        }
    }

    fn optional_positive(&mut self, path: &str, value: Option<i64>) -> Option<u64> {
        match value {
            None => None,
            Some(n) if n > 0 => u64::try_from(n).ok(),
            Some(_) => {
                self.error(path, "must be > 0");
                None
            }
        }
    }

    /// A size in bytes that must be > 0.
    fn size(&mut self, path: &str, value: Option<&RawSize>, default: usize) -> usize {
        match value.map(parse_size) {
            None => default,
            Some(Ok(n)) if n > 0 => n,
            Some(Ok(_)) => {
                self.error(path, "must be > 0");
                default
            }
            Some(Err(e)) => {
                self.error(path, e.to_string());
                default
            }
        }
    }

    fn positive(&mut self, path: &str, value: Option<i64>, default: usize) -> usize {
        match value {
            None => default,
            Some(n) if n > 0 => usize::try_from(n).unwrap_or(usize::MAX),
            Some(_) => {
                self.error(path, "must be > 0");
                default
            }
        }
    }

    fn build(&mut self, raw: RawConfig) -> Config {
        let threads = self.positive(
            "threads",
            raw.threads,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        );
        let max_body_bytes = self.size(
            "max_body_bytes",
            raw.max_body_bytes.as_ref(),
            DEFAULT_MAX_BODY_BYTES,
        );
        let max_json_depth =
            self.positive("max_json_depth", raw.max_json_depth, DEFAULT_MAX_JSON_DEPTH);
        let client_timeout = self.duration(
            "client_timeout",
            &raw.client_timeout,
            Duration::from_secs(60),
        );
        let head_timeout =
            self.duration("head_timeout", &raw.head_timeout, Duration::from_secs(10));
        let keepalive_timeout = self.duration(
            "keepalive_timeout",
            &raw.keepalive_timeout,
            Duration::from_secs(60),
        );
        let max_header_bytes = self.size(
            "max_header_bytes",
            raw.max_header_bytes.as_ref(),
            DEFAULT_MAX_HEADER_BYTES,
        );
        if max_header_bytes < 1024 {
            self.error("max_header_bytes", "must be at least 1KiB");
        }
        let max_headers = self.positive("max_headers", raw.max_headers, DEFAULT_MAX_HEADERS);
        if max_headers > MAX_HEADERS_CEILING {
            self.error(
                "max_headers",
                format!("must be at most {MAX_HEADERS_CEILING}"),
            );
        }
        let max_inflight_body_bytes = self.size(
            "max_inflight_body_bytes",
            raw.max_inflight_body_bytes.as_ref(),
            DEFAULT_MAX_INFLIGHT_BODY_BYTES,
        );
        let drain_timeout =
            self.duration("drain_timeout", &raw.drain_timeout, Duration::from_secs(30));
        let upstream_keepalive_pool =
            self.positive("upstream_keepalive_pool", raw.upstream_keepalive_pool, 1024);
        let listen = self.listen("listen", raw.listen.as_deref(), DEFAULT_LISTEN);
        let admin_listen = self.listen(
            "admin_listen",
            raw.admin_listen.as_deref(),
            DEFAULT_ADMIN_LISTEN,
        );
        if let (Some(l), Some(a)) = (listen, admin_listen) {
            if l == a {
                self.error("admin_listen", "must differ from `listen`");
            }
        }
        let admin_token = raw
            .admin_token_env
            .as_deref()
            .and_then(|name| match (self.env)(name).map(|v| v.trim().to_string()) {
                None => {
                    self.env_missing("admin_token_env", name);
                    None
                }
                // Guessable by trying: the message never quotes the value.
                Some(v) if v.len() < MIN_ADMIN_TOKEN => {
                    self.error(
                        "admin_token_env",
                        format!(
                            "environment variable `{name}` holds a token shorter than {MIN_ADMIN_TOKEN} characters"
                        ),
                    );
                    None
                }
                Some(v) => Some(Secret::new(v)),
            });

        let upstream_ca = raw
            .upstream_tls
            .and_then(|v| self.item::<RawUpstreamTls>("upstream_tls", v))
            .and_then(|t| t.ca_file)
            .and_then(|f| self.ca_file("upstream_tls.ca_file", &f));
        // The gateway's connector reads this file again, itself, and
        // refuses (at start, with a panic) a bundle that holds anything
        // but certificates.
        if let Some(ca) = upstream_ca.as_ref().filter(|ca| ca.other_items > 0) {
            self.error(
                "upstream_tls.ca_file",
                format!(
                    "{} holds something other than certificates (a private key?); keep only the CA certificates in it",
                    ca.path.display()
                ),
            );
        }

        let (quota, defaults) = self.quota_settings(raw.quota);
        let retry = self.retry(raw.retry.as_ref());
        let audit = self.audit(raw.audit);
        let fleet = self.fleet(raw.fleet);
        self.check_rebalance_fleet(&quota, fleet.is_some());
        let request_deadline = self.duration(
            "request_deadline",
            &raw.request_deadline,
            Duration::from_secs(600),
        );
        let max_held_requests = self.positive(
            "max_held_requests",
            raw.max_held_requests,
            DEFAULT_MAX_HELD_REQUESTS,
        );
        let deployments = self.deployments(raw.deployments);
        let pools = self.pools(raw.pools, &deployments);
        let models = self.models(raw.models, &pools);
        let tenants = self.tenants(raw.tenants, &models, &defaults, quota.priority_factors);
        let pricing = self.pricing(raw.pricing);
        self.check_rebalance_capacity(&quota, &pools.items);
        self.check_priced_budgets(
            &tenants,
            &models,
            &pools.items,
            &deployments.items,
            &pricing,
        );

        Config {
            listen: listen.unwrap_or(DEFAULT_LISTEN),
            admin_listen: admin_listen.unwrap_or(DEFAULT_ADMIN_LISTEN),
            admin_token,
            threads,
            max_body_bytes,
            max_json_depth,
            client_timeout,
            head_timeout,
            keepalive_timeout,
            max_header_bytes,
            max_headers,
            max_inflight_body_bytes,
            drain_timeout,
            upstream_keepalive_pool,
            upstream_ca,
            tenants,
            models,
            pools: pools.items,
            deployments: deployments.items,
            pricing,
            quota,
            retry,
            request_deadline,
            max_held_requests,
            audit,
            fleet,
            missing_env: std::mem::take(&mut self.missing_env),
        }
    }

    /// An `IP:port` to listen on; `None` when it is not one (reported).
    fn listen(
        &mut self,
        path: &str,
        text: Option<&str>,
        default: SocketAddr,
    ) -> Option<SocketAddr> {
        let Some(text) = text else {
            return Some(default);
        };
        if let Ok(addr) = text.parse() {
            return Some(addr);
        }
        // `localhost` is loopback by definition (RFC 6761), so it is taken
        // as 127.0.0.1; any other name is refused rather than resolved: it
        // may resolve to several addresses, or to others tomorrow.
        match text.rsplit_once(':') {
            Some((host, port)) if host.eq_ignore_ascii_case("localhost") => {
                match port.parse::<u16>() {
                    Ok(port) => Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))),
                    Err(_) => {
                        self.error(path, format!("`{port}` is not a port number (0 to 65535)"));
                        None
                    }
                }
            }
            Some((host, _))
                if !host.is_empty()
                    && host.parse::<IpAddr>().is_err()
                    && !host.starts_with('[') =>
            {
                self.error(
                    path,
                    format!(
                        "`{text}`: listen on an IP address, not a host name (`{host}` is not resolved); e.g. `127.0.0.1:8080` (this host only; `localhost:8080` means the same), `0.0.0.0:8080` (every IPv4 interface) or `[::]:8080`"
                    ),
                );
                None
            }
            _ => {
                self.error(
                    path,
                    format!(
                        "`{text}` is not an IP:port address; e.g. `127.0.0.1:8080` or `[::1]:8080`"
                    ),
                );
                None
            }
        }
    }

    fn ca_file(&mut self, path: &str, file: &str) -> Option<CaBundle> {
        CaBundle::load(Path::new(file))
            .map_err(|e| self.error(path, e.to_string()))
            .ok()
    }

    fn deployments(&mut self, raw: Vec<serde_yaml_ng::Value>) -> Named<Deployment> {
        let mut out = Named::default();
        if raw.len() > MAX_DEPLOYMENTS {
            self.error(
                "deployments",
                format!("at most {MAX_DEPLOYMENTS} deployments"),
            );
        }
        for (i, value) in raw.into_iter().enumerate() {
            let path = format!("deployments[{i}]");
            let id_hint = id_of(&value, "id");
            let Some(d) = self.item::<RawDeployment>(&path, value) else {
                out.broken.extend(id_hint);
                continue;
            };
            if out.index.contains_key(&d.id) || out.broken.contains(&d.id) {
                self.error(
                    format!("{path}.id"),
                    format!("duplicate deployment id `{}`", d.id),
                );
                continue;
            }
            let id = d.id.clone();
            match self.deployment(&path, d) {
                Some(d) => {
                    out.index.insert(id, out.items.len());
                    out.items.push(d);
                }
                None => out.broken.push(id),
            }
        }
        out
    }

    fn deployment(&mut self, path: &str, d: RawDeployment) -> Option<Deployment> {
        let before = self.errors.len();
        if d.id.trim().is_empty() {
            self.error(format!("{path}.id"), "must not be empty");
        }
        if d.model.trim().is_empty() {
            self.error(format!("{path}.model"), "must not be empty");
        }
        let base_url = match parse_base_url(&d.base_url) {
            Ok(u) => Some(u),
            Err(e) => {
                self.error(format!("{path}.base_url"), e.to_string());
                None
            }
        };
        let api_key = match &d.api_key_env {
            None => None,
            Some(name) => match (self.env)(name) {
                // Checked here so that `check-config` refuses what the server
                // could not send; the message never quotes the value.
                Some(v) if v.trim().bytes().any(|b| !(0x20..0x7f).contains(&b)) => {
                    self.error(
                        format!("{path}.api_key_env"),
                        format!(
                            "environment variable `{name}` holds characters a header cannot carry"
                        ),
                    );
                    None
                }
                Some(v) if !v.trim().is_empty() => Some(Secret::new(v.trim().to_string())),
                Some(_) => {
                    self.error(
                        format!("{path}.api_key_env"),
                        format!("environment variable `{name}` is empty"),
                    );
                    None
                }
                None => {
                    self.env_missing(&format!("{path}.api_key_env"), name);
                    None
                }
            },
        };
        let auth = match d.auth.as_deref() {
            None if d.api_key_env.is_some() => AuthStyle::Bearer,
            None => AuthStyle::None,
            Some("bearer") => AuthStyle::Bearer,
            Some("api-key") => AuthStyle::ApiKey,
            Some("none") => AuthStyle::None,
            Some(other) => {
                self.error(
                    format!("{path}.auth"),
                    format!("unknown auth style `{other}`; use bearer, api-key or none"),
                );
                AuthStyle::None
            }
        };
        if auth != AuthStyle::None && d.api_key_env.is_none() {
            self.error(
                format!("{path}.auth"),
                "needs `api_key_env` to name the provider key",
            );
        }
        let auth_header = match (&api_key, &d.api_key_env) {
            (Some(key), Some(name)) => auth_header(auth, key).unwrap_or_else(|_| {
                // The message names the variable, never the value.
                self.error(
                    format!("{path}.api_key_env"),
                    format!("environment variable `{name}` holds characters a header cannot carry"),
                );
                None
            }),
            _ => None,
        };
        let model_header = HeaderValue::from_str(&d.model)
            .map_err(|_| {
                self.error(
                    format!("{path}.model"),
                    format!(
                        "`{}` cannot be sent as a header value (it is echoed in `x-collie-model`): no control characters",
                        d.model.escape_debug()
                    ),
                )
            })
            .ok();
        let ca = d
            .ca_file
            .as_ref()
            .and_then(|f| self.ca_file(&format!("{path}.ca_file"), f));
        if d.ca_file.is_some() && base_url.as_ref().is_some_and(|u| !u.tls) {
            self.error(format!("{path}.ca_file"), "only applies to https base URLs");
        }
        let defaults = Timeouts::default();
        let timeouts = match &d.timeouts {
            None => defaults,
            Some(t) => Timeouts {
                connect: self.duration(
                    &format!("{path}.timeouts.connect"),
                    &t.connect,
                    defaults.connect,
                ),
                first_byte: self.duration(
                    &format!("{path}.timeouts.first_byte"),
                    &t.first_byte,
                    defaults.first_byte,
                ),
                idle: self.duration(&format!("{path}.timeouts.idle"), &t.idle, defaults.idle),
            },
        };
        let health = self.health(&format!("{path}.health"), d.health.as_ref());
        let rpm = self.optional_positive(&format!("{path}.rpm"), d.rpm);
        let tpm = self.optional_positive(&format!("{path}.tpm"), d.tpm);
        let context_window =
            self.optional_positive(&format!("{path}.context_window"), d.context_window);
        let base_url = base_url?;
        let model_header = model_header?;
        if self.errors.len() > before {
            return None;
        }
        Some(Deployment {
            id: d.id,
            http2: d.http2.unwrap_or(true) && base_url.tls,
            base_url,
            api_key,
            model: d.model,
            model_header,
            auth_header,
            ca,
            timeouts,
            rpm,
            tpm,
            context_window,
            health,
        })
    }

    fn pools(
        &mut self,
        raw: Vec<serde_yaml_ng::Value>,
        deployments: &Named<Deployment>,
    ) -> Named<Pool> {
        let mut out = Named::default();
        for (i, value) in raw.into_iter().enumerate() {
            let path = format!("pools[{i}]");
            let id_hint = id_of(&value, "id");
            let Some(p) = self.item::<RawPool>(&path, value) else {
                out.broken.extend(id_hint);
                continue;
            };
            let RawPool {
                id,
                deployments: raw_members,
                max_concurrency,
                adaptive_concurrency,
                policy,
                retries,
            } = p;
            let policy = match policy.as_deref() {
                None | Some("weighted") => Policy::Weighted,
                Some("least_latency") => Policy::LeastLatency,
                Some("cost") => Policy::Cost,
                Some(other) => {
                    self.error(
                        format!("{path}.policy"),
                        format!("unknown policy `{other}`; use weighted, least_latency or cost"),
                    );
                    Policy::Weighted
                }
            };
            let retries = match retries {
                None => 0,
                Some(n) if n >= 0 => u32::try_from(n).unwrap_or(u32::MAX),
                Some(_) => {
                    self.error(format!("{path}.retries"), "must be ≥ 0");
                    0
                }
            };
            let before = self.errors.len();
            let max_concurrency = self
                .optional_positive(&format!("{path}.max_concurrency"), max_concurrency)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
            if raw_members.is_empty() {
                self.error(
                    format!("{path}.deployments"),
                    "must list at least one deployment",
                );
            }
            let mut members = Vec::new();
            let mut seen = HashSet::new();
            for (j, m) in raw_members.into_iter().enumerate() {
                let mpath = format!("{path}.deployments[{j}]");
                let weight = match m.weight {
                    None => 1,
                    Some(w) if w > 0 => u32::try_from(w.min(10_000)).unwrap_or(10_000),
                    Some(_) => {
                        self.error(format!("{mpath}.weight"), "must be > 0");
                        continue;
                    }
                };
                if m.weight.is_some_and(|w| w > 10_000) {
                    self.error(format!("{mpath}.weight"), "must be ≤ 10000");
                }
                match deployments.resolve(&m.deployment) {
                    Resolved::Found(idx) => {
                        if !seen.insert(idx) {
                            self.error(
                                format!("{mpath}.deployment"),
                                format!("deployment `{}` is listed twice", m.deployment),
                            );
                        }
                        members.push(PoolMember {
                            deployment: DeploymentIx(idx),
                            weight,
                        });
                    }
                    Resolved::Broken => {}
                    Resolved::Missing => {
                        self.error(
                            format!("{mpath}.deployment"),
                            format!("unknown deployment `{}`", m.deployment),
                        );
                    }
                }
            }
            if out.index.contains_key(&id) || out.broken.contains(&id) {
                self.error(format!("{path}.id"), format!("duplicate pool id `{id}`"));
                continue;
            }
            if self.errors.len() > before {
                out.broken.push(id);
                continue;
            }
            out.index.insert(id.clone(), out.items.len());
            out.items.push(Pool {
                id,
                members,
                max_concurrency,
                adaptive_concurrency: adaptive_concurrency.unwrap_or(false),
                policy,
                retries,
            });
        }
        out
    }

    fn models(&mut self, raw: Vec<serde_yaml_ng::Value>, pools: &Named<Pool>) -> Vec<Model> {
        let mut out: Vec<Model> = Vec::new();
        for (i, value) in raw.into_iter().enumerate() {
            let path = format!("models[{i}]");
            let Some(m) = self.item::<RawModel>(&path, value) else {
                continue;
            };
            if m.name.trim().is_empty() {
                self.error(format!("{path}.name"), "must not be empty");
            }
            if m.name == "*" {
                self.error(
                    format!("{path}.name"),
                    "`*` is reserved for tenant model lists",
                );
            }
            if out.iter().any(|o| o.name == m.name) {
                self.error(
                    format!("{path}.name"),
                    format!("duplicate model `{}`", m.name),
                );
                continue;
            }
            let chain = self.chain(&format!("{path}.fallback"), &m.fallback, pools);
            let routes = self.routes(&path, &m.routes, pools);
            let max_output_tokens =
                self.optional_positive(&format!("{path}.max_output_tokens"), m.max_output_tokens);
            let family = match m.tokenizer.as_deref() {
                None => Family::for_model(&m.name),
                Some(t) => Family::parse(t).unwrap_or_else(|| {
                    self.error(
                        format!("{path}.tokenizer"),
                        format!("unknown tokenizer `{t}`; use o200k, cl100k or generic"),
                    );
                    Family::Generic
                }),
            };
            let context_window =
                self.optional_positive(&format!("{path}.context_window"), m.context_window);
            let hold_when_down = m.hold_when_down.as_ref().map(|_| {
                self.duration(
                    &format!("{path}.hold_when_down"),
                    &m.hold_when_down,
                    Duration::ZERO,
                )
            });
            out.push(Model {
                name: m.name,
                chain,
                routes,
                max_output_tokens,
                family,
                context_window,
                hold_when_down,
            });
        }
        out
    }

    fn tenants(
        &mut self,
        raw: Vec<serde_yaml_ng::Value>,
        models: &[Model],
        defaults: &raw::RawLimits,
        factors: PriorityFactors,
    ) -> Vec<Tenant> {
        let mut out: Vec<Tenant> = Vec::new();
        let mut key_owner: HashMap<[u8; 32], String> = HashMap::new();
        // Ids seen so far: a set, so a config with 100k tenants loads in
        // linear time.
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        for (i, value) in raw.into_iter().enumerate() {
            let path = format!("tenants[{i}]");
            let Some(t) = self.item::<RawTenant>(&path, value) else {
                continue;
            };
            if t.id.trim().is_empty() {
                self.error(format!("{path}.id"), "must not be empty");
            }
            if !seen.insert(t.id.clone()) {
                self.error(
                    format!("{path}.id"),
                    format!("duplicate tenant id `{}`", t.id),
                );
                continue;
            }
            if t.api_keys.is_empty() {
                self.error(
                    format!("{path}.api_keys"),
                    "must list at least one key digest",
                );
            }
            let mut key_digests = Vec::new();
            for (j, hex_digest) in t.api_keys.iter().enumerate() {
                let kpath = format!("{path}.api_keys[{j}]");
                let Some(digest) = parse_digest(hex_digest) else {
                    self.error(
                        kpath,
                        "must be a SHA-256 digest: 64 hex characters (see `collie hash-key`)",
                    );
                    continue;
                };
                if let Some(owner) = key_owner.get(&digest) {
                    self.error(
                        kpath,
                        format!("the same key is already given to tenant `{owner}`"),
                    );
                    continue;
                }
                key_owner.insert(digest, t.id.clone());
                key_digests.push(digest);
            }
            let access = if t.models.iter().any(|m| m == "*") {
                ModelAccess::All
            } else {
                let mut set = HashSet::new();
                for (j, name) in t.models.iter().enumerate() {
                    if !models.iter().any(|m| &m.name == name) {
                        self.error(
                            format!("{path}.models[{j}]"),
                            format!("unknown model `{name}`"),
                        );
                    }
                    set.insert(name.clone());
                }
                ModelAccess::Only(set)
            };
            let priority = match t.priority {
                None => DEFAULT_PRIORITY,
                Some(p @ 1..=5) => u8::try_from(p).unwrap_or(DEFAULT_PRIORITY),
                Some(_) => {
                    self.error(
                        format!("{path}.priority"),
                        "must be between 1 (highest) and 5 (lowest)",
                    );
                    DEFAULT_PRIORITY
                }
            };
            let (limits, default_max_tokens) = self.tenant_limits(
                &format!("{path}.quota"),
                t.quota.as_ref(),
                defaults,
                priority,
                factors,
                models,
            );
            out.push(Tenant {
                id: t.id,
                key_digests,
                models: access,
                priority,
                limits,
                default_max_tokens,
            });
        }
        out
    }

    fn pricing(
        &mut self,
        raw: std::collections::BTreeMap<String, serde_yaml_ng::Value>,
    ) -> HashMap<String, Price> {
        let mut out = HashMap::new();
        for (model, value) in raw {
            let path = format!("pricing.{model}");
            let Some(p) = self.item::<RawPrice>(&path, value) else {
                continue;
            };
            let input = self.price(&format!("{path}.input_per_mtok"), p.input_per_mtok);
            let output = self.price(&format!("{path}.output_per_mtok"), p.output_per_mtok);
            if let (Some(input_pico_per_token), Some(output_pico_per_token)) = (input, output) {
                out.insert(
                    model,
                    Price {
                        input_pico_per_token,
                        output_pico_per_token,
                    },
                );
            }
        }
        out
    }

    /// USD per million tokens → picodollars per token (×1e12 / 1e6 = ×1e6).
    fn price(&mut self, path: &str, usd_per_mtok: f64) -> Option<u64> {
        if !usd_per_mtok.is_finite() || usd_per_mtok < 0.0 {
            self.error(path, "must be a non-negative number");
            return None;
        }
        if usd_per_mtok > 1_000_000.0 {
            self.error(path, "must be ≤ 1000000 USD per million tokens");
            return None;
        }
        let pico = (usd_per_mtok * 1e6).round();
        // Bounded above, so the conversion is exact.
        Some(pico as u64)
    }
}

/// Items of one section by id, plus the ids of items that failed to parse so
/// that references to them are not reported a second time.
struct Named<T> {
    items: Vec<T>,
    index: HashMap<String, usize>,
    broken: Vec<String>,
}

impl<T> Default for Named<T> {
    fn default() -> Self {
        Named {
            items: Vec::new(),
            index: HashMap::new(),
            broken: Vec::new(),
        }
    }
}

enum Resolved {
    Found(usize),
    Broken,
    Missing,
}

impl<T> Named<T> {
    fn resolve(&self, id: &str) -> Resolved {
        match self.index.get(id) {
            Some(&i) => Resolved::Found(i),
            None if self.broken.iter().any(|b| b == id) => Resolved::Broken,
            None => Resolved::Missing,
        }
    }
}

fn id_of(value: &serde_yaml_ng::Value, key: &str) -> Option<String> {
    value.get(key).and_then(|v| v.as_str()).map(str::to_string)
}

/// The header that carries a provider key in `style`; `None` for no key.
fn auth_header(
    style: AuthStyle,
    key: &Secret,
) -> Result<Option<(HeaderName, HeaderValue)>, http::header::InvalidHeaderValue> {
    let (name, text) = match style {
        AuthStyle::None => return Ok(None),
        AuthStyle::Bearer => (
            http::header::AUTHORIZATION,
            format!("Bearer {}", key.expose()),
        ),
        AuthStyle::ApiKey => (HeaderName::from_static("api-key"), key.expose().to_string()),
    };
    let mut value = HeaderValue::from_str(&text)?;
    value.set_sensitive(true);
    Ok(Some((name, value)))
}

/// `64 hex chars` → digest.
pub(crate) fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).ok()?;
    Some(out)
}

/// Why a size is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SizeError {
    #[error("must be > 0")]
    Negative,
    #[error("too large")]
    TooLarge,
    #[error("`{0}` is not a size; write bytes or e.g. `32MiB`")]
    NotASize(String),
    #[error("unknown size unit `{0}`; use B, KiB, MiB or GiB")]
    UnknownUnit(String),
}

fn parse_size(size: &RawSize) -> Result<usize, SizeError> {
    match size {
        RawSize::Bytes(n) if *n >= 0 => usize::try_from(*n).map_err(|_| SizeError::TooLarge),
        RawSize::Bytes(_) => Err(SizeError::Negative),
        RawSize::Text(t) => {
            let t = t.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: usize = num
                .parse()
                .map_err(|_| SizeError::NotASize(t.to_string()))?;
            let mult: usize = match unit.trim() {
                "" | "B" => 1,
                "KiB" | "K" | "KB" => 1 << 10,
                "MiB" | "M" | "MB" => 1 << 20,
                "GiB" | "G" | "GB" => 1 << 30,
                other => return Err(SizeError::UnknownUnit(other.to_string())),
            };
            n.checked_mul(mult).ok_or(SizeError::TooLarge)
        }
    }
}

/// Why a `base_url` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UrlError {
    #[error("`{text}` is not a URL: {reason}")]
    NotAUrl { text: String, reason: String },
    #[error("scheme `{0}` is not supported; use http or https")]
    Scheme(String),
    #[error("`{0}` needs a scheme (http:// or https://)")]
    NoScheme(String),
    #[error("`{0}` has no host")]
    NoHost(String),
    #[error("credentials in the URL are not allowed; use api_key_env")]
    Credentials,
    #[error(
        "a query string is not allowed in base_url (for Azure OpenAI, use its v1 API: `https://RESOURCE.openai.azure.com/openai/v1`, no `api-version`, and the deployment's name as `model`)"
    )]
    Query,
    #[error("`{0}`: the host cannot be sent as a `Host` header")]
    HostHeader(String),
    /// Azure's per-deployment paths need an `api-version` query on every
    /// request, which Collie does not add; its v1 API needs none.
    #[error(
        "`{0}`: Azure OpenAI's `/openai/deployments/NAME` paths need an `api-version` query on every request; use the v1 API instead: `https://RESOURCE.openai.azure.com/openai/v1`, with the deployment's name as `model`"
    )]
    AzureDeployments(String),
}

fn parse_base_url(text: &str) -> Result<BaseUrl, UrlError> {
    let uri: http::Uri = text
        .parse()
        .map_err(|e: http::uri::InvalidUri| UrlError::NotAUrl {
            text: text.to_string(),
            reason: e.to_string(),
        })?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        Some(other) => return Err(UrlError::Scheme(other.to_string())),
        None => return Err(UrlError::NoScheme(text.to_string())),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| UrlError::NoHost(text.to_string()))?;
    if authority.as_str().contains('@') {
        return Err(UrlError::Credentials);
    }
    if uri.query().is_some() {
        return Err(UrlError::Query);
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(UrlError::NoHost(text.to_string()));
    }
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path_prefix = uri.path().trim_end_matches('/').to_string();
    let azure = [".openai.azure.com", ".cognitiveservices.azure.com"];
    if azure.iter().any(|a| host.to_ascii_lowercase().ends_with(a))
        && path_prefix.contains("/openai/deployments/")
    {
        return Err(UrlError::AzureDeployments(text.to_string()));
    }
    let host_header = HeaderValue::from_str(&authority_of(tls, &host, port))
        .map_err(|_| UrlError::HostHeader(text.to_string()))?;
    Ok(BaseUrl {
        tls,
        host,
        port,
        path_prefix,
        host_header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY_A" => Some("sk-a".into()),
            "EMPTY" => Some("".into()),
            "BADKEY" => Some("sk-\u{7}é".into()),
            _ => None,
        }
    }

    const DIGEST: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn good() -> String {
        format!(
            r#"
listen: 127.0.0.1:8080
admin_listen: 127.0.0.1:9090
max_body_bytes: 1MiB
tenants:
  - id: alpha
    api_keys: ["{DIGEST}"]
    models: [gpt]
    priority: 1
models:
  - name: gpt
    fallback: [main]
pools:
  - id: main
    deployments:
      - deployment: a
        weight: 3
deployments:
  - id: a
    base_url: https://api.example.com/openai/v1/
    api_key_env: KEY_A
    model: gpt-x
    timeouts: {{ connect: 2s, first_byte: 10s, idle: 5s }}
pricing:
  gpt-x: {{ input_per_mtok: 0.0375, output_per_mtok: 0.6 }}
"#
        )
    }

    #[test]
    fn accepts_a_good_file() {
        let c = Config::from_yaml(&good(), &env).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert_eq!(c.tenants[0].priority, 1);
        assert_eq!(c.models[0].chain, vec![PoolIx(0)]);
        assert_eq!(c.pools[0].members[0].weight, 3);
        let d = &c.deployments[0];
        assert_eq!(d.base_url.path_prefix, "/openai/v1");
        assert_eq!(d.base_url.port, 443);
        assert_eq!(d.base_url.authority(), "api.example.com");
        assert_eq!(d.api_key.as_ref().unwrap().expose(), "sk-a");
        let (name, value) = d.auth_header.as_ref().unwrap();
        assert_eq!(
            (name.as_str(), value.as_bytes()),
            ("authorization", &b"Bearer sk-a"[..])
        );
        assert!(value.is_sensitive());
        assert_eq!(d.model_header, "gpt-x");
        assert_eq!(d.base_url.host_header, "api.example.com");
        assert_eq!(d.timeouts.first_byte, Duration::from_secs(10));
        assert_eq!(c.pricing["gpt-x"].input_pico_per_token, 37_500);
        assert_eq!(c.pricing["gpt-x"].output_pico_per_token, 600_000);
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let text = format!(
            r#"
tenants:
  - id: alpha
    api_keys: ["nothex"]
    models: [gpt, nope]
    priority: 9
  - id: alpha
    api_keys: ["{DIGEST}"]
    models: ["*"]
models:
  - name: gpt
    fallback: [main, ghost]
pools:
  - id: main
    deployments:
      - deployment: a
        weight: 0
      - deployment: b
        weight: -2
      - deployment: missing
deployments:
  - id: a
    base_url: ftp://x
    api_key_env: UNSET
    model: m
  - id: b
    base_url: http://127.0.0.1:9/v1
    api_key_env: EMPTY
    model: m
    colour: blue
  - id: a
    base_url: http://127.0.0.1:9/v1
    model: m
  - id: c
    base_url: http://127.0.0.1:9/v1
    api_key_env: BADKEY
    model: m
  - id: e
    base_url: http://127.0.0.1:9/v1
    model: "gpt\x01x"
    ca_file: /nonexistent/ca.pem
"#
        );
        let errs = Config::from_yaml(&text, &env).unwrap_err();
        let lines: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
        let expect = [
            "deployments[0].base_url: scheme `ftp` is not supported",
            "deployments[0].api_key_env: environment variable `UNSET` is not set",
            "deployments[1].colour: unknown field `colour`",
            "deployments[2].id: duplicate deployment id `a`",
            "deployments[3].api_key_env: environment variable `BADKEY` holds characters",
            "deployments[4].model: `gpt\\u{1}x` cannot be sent as a header value",
            "deployments[4].ca_file: cannot read /nonexistent/ca.pem",
            "pools[0].deployments[0].weight: must be > 0",
            "pools[0].deployments[1].weight: must be > 0",
            "pools[0].deployments[2].deployment: unknown deployment `missing`",
            "models[0].fallback[1]: unknown pool `ghost`",
            "tenants[0].api_keys[0]: must be a SHA-256 digest",
            "tenants[0].models[1]: unknown model `nope`",
            "tenants[0].priority: must be between 1 (highest) and 5 (lowest)",
            "tenants[1].id: duplicate tenant id `alpha`",
        ];
        for e in expect {
            assert!(
                lines.iter().any(|l| l.starts_with(e)),
                "missing `{e}` in:\n{}",
                lines.join("\n")
            );
        }
        // `b` failed to parse; a reference to it is not reported again.
        assert!(!lines.iter().any(|l| l.contains("unknown deployment `b`")));
    }

    #[test]
    fn context_windows_are_positive_token_counts() {
        let text = good()
            .replace(
                "    fallback: [main]\n",
                "    fallback: [main]\n    context_window: 0\n",
            )
            .replace(
                "    model: gpt-x\n",
                "    model: gpt-x\n    context_window: -3\n",
            );
        let errs = Config::from_yaml(&text, &env).unwrap_err().to_string();
        assert!(
            errs.contains("models[0].context_window: must be > 0"),
            "{errs}"
        );
        assert!(
            errs.contains("deployments[0].context_window: must be > 0"),
            "{errs}"
        );
        let text = good().replace(
            "    model: gpt-x\n",
            "    model: gpt-x\n    context_window: 128000\n",
        );
        let c = Config::from_yaml(&text, &env).unwrap();
        assert_eq!(c.deployments[0].context_window, Some(128_000));
        assert_eq!(c.models[0].context_window, None);
    }

    #[test]
    fn rejects_unknown_top_level_field_with_path() {
        let errs = Config::from_yaml("listen: 127.0.0.1:1\nlisten_port: 3\n", &env).unwrap_err();
        assert!(
            errs.to_string().contains("unknown field `listen_port`"),
            "{errs}"
        );
    }

    #[test]
    fn a_top_level_typo_does_not_hide_other_problems() {
        let text = "max_body_byte: 10\nthreads: many\nretry: {backof: 1s}\nmodels:\n  - {name: m, fallback: [ghost]}\n";
        let errs = Config::from_yaml(text, &env).unwrap_err();
        let lines: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
        for e in [
            "max_body_byte: unknown field `max_body_byte`",
            "threads: invalid type",
            "retry.backof: unknown field `backof`",
            "models[0].fallback[0]: unknown pool `ghost`",
        ] {
            assert!(
                lines.iter().any(|l| l.starts_with(e)),
                "missing `{e}` in:\n{}",
                lines.join("\n")
            );
        }
    }

    #[test]
    fn shared_key_between_tenants_is_an_error() {
        let text = format!(
            "tenants:\n  - {{id: a, api_keys: [\"{DIGEST}\"], models: [\"*\"]}}\n  - {{id: b, api_keys: [\"{DIGEST}\"], models: [\"*\"]}}\n"
        );
        let errs = Config::from_yaml(&text, &env).unwrap_err();
        assert!(
            errs.to_string()
                .contains("tenants[1].api_keys[0]: the same key is already given to tenant `a`"),
            "{errs}"
        );
    }

    #[test]
    fn sizes_and_urls() {
        assert_eq!(parse_size(&RawSize::Text("32MiB".into())), Ok(32 << 20));
        assert_eq!(parse_size(&RawSize::Bytes(10)), Ok(10));
        assert!(parse_size(&RawSize::Text("3 parsecs".into())).is_err());
        let mut u = parse_base_url("http://127.0.0.1:9101").unwrap();
        assert_eq!((u.tls, u.port, u.path_prefix.as_str()), (false, 9101, ""));
        assert_eq!(u.authority(), "127.0.0.1:9101");
        u.set_port(80);
        assert_eq!(u.host_header, "127.0.0.1");
        assert!(parse_base_url("https://user:pw@host/v1").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("sk-live-canary".into());
        assert!(!format!("{s:?}").contains("canary"));
        // Nor through the header built from it.
        let c = Config::from_yaml(&good(), &|_| Some("sk-live-canary".into())).unwrap();
        assert!(!format!("{c:?}").contains("canary"));
    }

    /// A bare number where a duration goes: the error says which unit to
    /// add, for every duration field (they share one reader).
    #[test]
    fn a_bare_number_as_a_duration_suggests_its_unit() {
        let text = "deployments:\n  - {id: d, base_url: \"http://127.0.0.1:9/v1\", model: m, timeouts: {connect: 5, idle: 1.5}}\ndrain_timeout: 30\nhead_timeout: 10s\n";
        let errs = Config::from_yaml(text, &|_| None).unwrap_err().to_string();
        for expected in [
            "deployments[0].timeouts.connect: `5` has no unit; write `5s` for seconds (or `5ms`, `5m`)",
            "deployments[0].timeouts.idle: `1.5` has no unit; write `1.5s`",
            "drain_timeout: `30` has no unit; write `30s`",
        ] {
            assert!(errs.contains(expected), "missing `{expected}` in:\n{errs}");
        }
        assert!(!errs.contains("head_timeout"), "{errs}");
        // Not a number and not text: still a type error, naming what fits.
        let errs = Config::from_yaml("drain_timeout: [1]\n", &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains(
                "drain_timeout: invalid type: sequence, expected a duration such as `30s`"
            ),
            "{errs}"
        );
    }

    #[test]
    fn localhost_is_a_listen_address_and_other_names_say_why_not() {
        let c = Config::from_yaml(
            "listen: localhost:8081\nadmin_listen: LOCALHOST:9091\n",
            &|_| None,
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:9091".parse().unwrap());
        let errs = Config::from_yaml(
            "listen: gateway.internal:8080\nadmin_listen: localhost:http\n",
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "listen: `gateway.internal:8080`: listen on an IP address, not a host name",
            "e.g. `127.0.0.1:8080` (this host only; `localhost:8080` means the same), `0.0.0.0:8080`",
            "admin_listen: `http` is not a port number",
        ] {
            assert!(errs.contains(expected), "missing `{expected}` in:\n{errs}");
        }
        let errs = Config::from_yaml("listen: \"8080\"\n", &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains("`8080` is not an IP:port address; e.g. `127.0.0.1:8080`"),
            "{errs}"
        );
    }

    /// Azure OpenAI's v1 API is an ordinary base URL; its per-deployment
    /// form needs an `api-version` query, and both ways to write that are
    /// refused with the v1 form named.
    #[test]
    fn azure_urls() {
        let v1 = parse_base_url("https://example-eastus.openai.azure.com/openai/v1").unwrap();
        assert_eq!(v1.path_prefix, "/openai/v1");
        for old in [
            "https://example.openai.azure.com/openai/deployments/gpt-4o",
            "https://example.openai.azure.com/openai/deployments/gpt-4o/v1",
            "https://Example.cognitiveservices.azure.com/openai/deployments/gpt-4o",
        ] {
            let e = parse_base_url(old).unwrap_err().to_string();
            assert!(
                e.contains("use the v1 API instead: `https://RESOURCE.openai.azure.com/openai/v1`"),
                "{old}: {e}"
            );
        }
        let e = parse_base_url(
            "https://example.openai.azure.com/openai/deployments/gpt-4o?api-version=2024-10-21",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "a query string is not allowed in base_url (for Azure OpenAI, use its v1 API"
            ),
            "{e}"
        );
    }

    /// With [`MissingEnv::Allow`], the variables the process lacks are
    /// listed instead of refused; a set one is still checked.
    #[test]
    fn missing_env_can_be_allowed() {
        let text = "admin_token_env: TOKEN\ndeployments:\n  - {id: a, base_url: \"http://127.0.0.1:9/v1\", model: m, api_key_env: UNSET}\n  - {id: b, base_url: \"http://127.0.0.1:9/v1\", model: m, api_key_env: EMPTY}\n";
        let env = |name: &str| (name == "EMPTY").then(String::new);
        let errs = Config::from_yaml(text, &env).unwrap_err().to_string();
        assert!(
            errs.contains("deployments[0].api_key_env: environment variable `UNSET` is not set"),
            "{errs}"
        );
        let errs = Config::from_yaml_with(text, &env, MissingEnv::Allow)
            .unwrap_err()
            .to_string();
        assert!(!errs.contains("UNSET") && !errs.contains("TOKEN"), "{errs}");
        assert!(
            errs.contains("deployments[1].api_key_env: environment variable `EMPTY` is empty"),
            "{errs}"
        );
        let c = Config::from_yaml_with(
            &text.replace("api_key_env: EMPTY", "api_key_env: UNSET"),
            &env,
            MissingEnv::Allow,
        )
        .unwrap();
        let missing: Vec<(&str, &str)> = c
            .missing_env()
            .iter()
            .map(|(f, n)| (f.as_str(), n.as_str()))
            .collect();
        assert_eq!(
            missing,
            [
                ("admin_token_env", "TOKEN"),
                ("deployments[0].api_key_env", "UNSET"),
                ("deployments[1].api_key_env", "UNSET"),
            ]
        );
    }
}
