//! Requests to a gateway as one of its tenants, and the bodies tests send.

use super::ALPHA_KEY;
use super::gateway::Gw;
use reqwest::RequestBuilder;
use serde_json::{Value, json};

pub(crate) const CHAT: &str = "/v1/chat/completions";

/// A gateway reached over HTTP: one in this process ([`Gw`]) or a
/// `collie run` process ([`Remote`]).
pub(crate) trait Calls {
    /// `http://127.0.0.1:PORT`
    fn base(&self) -> &str;
    fn client(&self) -> &reqwest::Client;

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// A POST to `path` naming `tenant` and presenting `key` as a bearer token.
    fn post_as(&self, path: &str, tenant: &str, key: &str) -> RequestBuilder {
        self.client()
            .post(self.url(path))
            .header("x-tenant-id", tenant)
            .bearer_auth(key)
    }

    /// A POST to `path` as tenant alpha.
    fn post(&self, path: &str) -> RequestBuilder {
        self.post_as(path, "alpha", ALPHA_KEY)
    }

    /// A GET of `path` naming `tenant` and presenting `key`.
    fn get_as(&self, path: &str, tenant: &str, key: &str) -> RequestBuilder {
        self.client()
            .get(self.url(path))
            .header("x-tenant-id", tenant)
            .bearer_auth(key)
    }

    /// A chat request as tenant alpha.
    fn chat(&self, body: Value) -> RequestBuilder {
        self.post(CHAT).json(&body)
    }

    /// A chat request naming `tenant` and presenting `key`.
    fn chat_as(&self, tenant: &str, key: &str, body: Value) -> RequestBuilder {
        self.post_as(CHAT, tenant, key).json(&body)
    }
}

impl Calls for Gw {
    fn base(&self) -> &str {
        &self.base
    }

    fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// A gateway known only by its URL (a `collie run` process).
pub(crate) struct Remote {
    pub base: String,
    pub client: reqwest::Client,
}

impl Remote {
    pub(crate) fn new(base: &str) -> Remote {
        Remote {
            base: base.to_string(),
            client: reqwest::Client::new(),
        }
    }
}

impl Calls for Remote {
    fn base(&self) -> &str {
        &self.base
    }

    fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// A one-message chat body: "hello" to `model`.
pub(crate) fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

/// A streamed chat body with no messages.
pub(crate) fn streamed(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": []})
}
