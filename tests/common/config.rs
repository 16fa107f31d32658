//! Configs under test, built from parts — tenants, models, pools,
//! deployments over mock providers, pricing, and any top-level section
//! (`quota`, `audit`, `retry`, limits) — and written out as the YAML a user
//! would write. A test says what its config has, not how YAML spells it;
//! the gateway reads it exactly as it reads a file.

use super::{ALPHA_KEY, BETA_KEY};
use collie::gateway::key_digest_hex;
use collie_mock::MockServer;
use serde_json::{Map, Value, json};

/// One entry of a config list (a tenant, a model, a pool or a deployment),
/// as the mapping that holds its fields; `key` is the field naming it.
macro_rules! part {
    ($(#[$doc:meta])* $name:ident, $key:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub(crate) struct $name(Map<String, Value>);

        impl $name {
            /// Set a field: any the config accepts (`rpm`, `policy`, `routes`, …).
            pub(crate) fn set(mut self, field: &str, value: impl Into<Value>) -> Self {
                self.0.insert(field.to_string(), value.into());
                self
            }

            /// Leave a field out.
            pub(crate) fn unset(mut self, field: &str) -> Self {
                self.0.remove(field);
                self
            }

        }

        impl Part for $name {
            fn name(&self) -> &str {
                self.0[$key].as_str().unwrap_or_default()
            }
        }
    };
}

/// What an edit finds a part by.
pub(crate) trait Part: Clone {
    fn name(&self) -> &str;
}

part!(
    /// A tenant: its id, the digests of its keys, the models it may use.
    Tenant,
    "id"
);
part!(
    /// A model clients ask for, and the pools it falls back through.
    Model,
    "name"
);
part!(
    /// A pool of deployments.
    Pool,
    "id"
);
part!(
    /// A deployment: a provider's URL, the model it serves, its key.
    Deployment,
    "id"
);

impl Tenant {
    /// `id`, with one key (kept as its digest), allowed every model.
    pub(crate) fn new(id: &str, key: &str) -> Tenant {
        Tenant(Map::new())
            .set("id", id)
            .set("api_keys", json!([key_digest_hex(key)]))
            .set("models", json!(["*"]))
    }

    /// Tenant `alpha`: every model, priority 1.
    pub(crate) fn alpha() -> Tenant {
        Tenant::new("alpha", ALPHA_KEY).priority(1)
    }

    /// Tenant `beta`: only `models`, priority 5.
    pub(crate) fn beta(models: &[&str]) -> Tenant {
        Tenant::new("beta", BETA_KEY).models(models).priority(5)
    }

    pub(crate) fn models(self, models: &[&str]) -> Tenant {
        self.set("models", models)
    }

    pub(crate) fn priority(self, priority: u32) -> Tenant {
        self.set("priority", priority)
    }

    pub(crate) fn quota(self, quota: Value) -> Tenant {
        self.set("quota", quota)
    }
}

impl Model {
    pub(crate) fn new(name: &str, fallback: &[&str]) -> Model {
        Model(Map::new())
            .set("name", name)
            .set("fallback", fallback)
    }
}

impl Pool {
    /// A pool of these deployments, in this order, each of weight 1.
    pub(crate) fn new(id: &str, deployments: &[&str]) -> Pool {
        let members: Vec<Value> = deployments
            .iter()
            .map(|d| json!({"deployment": d}))
            .collect();
        Pool(Map::new()).set("id", id).set("deployments", members)
    }

    /// A pool of (deployment, weight) members.
    pub(crate) fn weighted(id: &str, deployments: &[(&str, u32)]) -> Pool {
        let members: Vec<Value> = deployments
            .iter()
            .map(|(d, w)| json!({"deployment": d, "weight": w}))
            .collect();
        Pool(Map::new()).set("id", id).set("deployments", members)
    }
}

impl Deployment {
    /// `id` at `base_url` (`http://host:port/v1`), serving `model`.
    pub(crate) fn new(id: &str, base_url: &str, model: &str) -> Deployment {
        Deployment(Map::new())
            .set("id", id)
            .set("base_url", base_url)
            .set("model", model)
    }

    /// `id` served by a mock provider.
    pub(crate) fn on(id: &str, mock: &MockServer, model: &str) -> Deployment {
        Deployment::new(id, &mock.base_url(), model)
    }

    /// The provider key comes from this environment variable (the tests
    /// set `KEY_A` and `KEY_B`).
    pub(crate) fn key(self, env: &str) -> Deployment {
        self.set("api_key_env", env)
    }

    pub(crate) fn timeouts(self, timeouts: Value) -> Deployment {
        self.set("timeouts", timeouts)
    }

    pub(crate) fn health(self, health: Value) -> Deployment {
        self.set("health", health)
    }
}

/// A whole config but its listeners (the gateway under test picks them).
#[derive(Clone, Debug, Default)]
pub(crate) struct Conf {
    settings: Map<String, Value>,
    tenants: Vec<Tenant>,
    models: Vec<Model>,
    pools: Vec<Pool>,
    deployments: Vec<Deployment>,
    pricing: Map<String, Value>,
}

impl Conf {
    pub(crate) fn new() -> Conf {
        Conf::default()
    }

    /// Tenants `alpha` (every model, priority 1) and `beta` (only
    /// `beta_models`, priority 5).
    pub(crate) fn two_tenants(beta_models: &[&str]) -> Conf {
        Conf::new()
            .tenant(Tenant::alpha())
            .tenant(Tenant::beta(beta_models))
    }

    /// A top-level setting or section: `max_body_bytes`, `quota`, `audit`, …
    pub(crate) fn set(mut self, key: &str, value: impl Into<Value>) -> Conf {
        self.settings.insert(key.to_string(), value.into());
        self
    }

    /// Whether a top-level setting is given.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.settings.contains_key(key)
    }

    pub(crate) fn tenant(mut self, tenant: Tenant) -> Conf {
        self.tenants.push(tenant);
        self
    }

    /// No tenants (to give others in their place).
    pub(crate) fn without_tenants(mut self) -> Conf {
        self.tenants.clear();
        self
    }

    pub(crate) fn model(mut self, model: Model) -> Conf {
        self.models.push(model);
        self
    }

    /// A model listed before the ones already there.
    pub(crate) fn model_first(mut self, model: Model) -> Conf {
        self.models.insert(0, model);
        self
    }

    pub(crate) fn pool(mut self, pool: Pool) -> Conf {
        self.pools.push(pool);
        self
    }

    /// A pool listed before the ones already there.
    pub(crate) fn pool_first(mut self, pool: Pool) -> Conf {
        self.pools.insert(0, pool);
        self
    }

    pub(crate) fn deployment(mut self, deployment: Deployment) -> Conf {
        self.deployments.push(deployment);
        self
    }

    /// A model's price in USD per million tokens, in and out (replacing
    /// any price it had).
    pub(crate) fn price(mut self, model: &str, input_per_mtok: f64, output_per_mtok: f64) -> Conf {
        self.pricing.insert(
            model.to_string(),
            json!({"input_per_mtok": input_per_mtok, "output_per_mtok": output_per_mtok}),
        );
        self
    }

    pub(crate) fn edit_tenant(mut self, id: &str, edit: impl FnOnce(Tenant) -> Tenant) -> Conf {
        edit_in(&mut self.tenants, id, edit);
        self
    }

    pub(crate) fn edit_pool(mut self, id: &str, edit: impl FnOnce(Pool) -> Pool) -> Conf {
        edit_in(&mut self.pools, id, edit);
        self
    }

    pub(crate) fn edit_deployment(
        mut self,
        id: &str,
        edit: impl FnOnce(Deployment) -> Deployment,
    ) -> Conf {
        edit_in(&mut self.deployments, id, edit);
        self
    }

    /// The config as one YAML mapping: the settings, then the lists.
    pub(crate) fn to_value(&self) -> Value {
        let mut doc = self.settings.clone();
        // Tenants alpha and beta have priorities 1 and 5 for the queue's
        // sake; the rates a test writes are the rates it means, so priority
        // factors are all 1.0 unless a test sets `quota.priority_factors`
        // itself (`{}` for the defaults).
        if let Some(quota) = doc
            .entry("quota")
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            quota
                .entry("priority_factors")
                .or_insert_with(|| json!({"1": 1.0, "2": 1.0, "3": 1.0, "4": 1.0, "5": 1.0}));
        }
        let lists = [
            (
                "tenants",
                self.tenants.iter().map(|t| &t.0).collect::<Vec<_>>(),
            ),
            ("models", self.models.iter().map(|m| &m.0).collect()),
            ("pools", self.pools.iter().map(|p| &p.0).collect()),
            (
                "deployments",
                self.deployments.iter().map(|d| &d.0).collect(),
            ),
        ];
        for (key, items) in lists {
            if !items.is_empty() {
                doc.insert(key.to_string(), json!(items));
            }
        }
        if !self.pricing.is_empty() {
            doc.insert("pricing".to_string(), Value::Object(self.pricing.clone()));
        }
        Value::Object(doc)
    }

    pub(crate) fn yaml(&self) -> String {
        serde_yaml_ng::to_string(&self.to_value()).unwrap()
    }
}

fn edit_in<T: Part>(list: &mut [T], name: &str, edit: impl FnOnce(T) -> T) {
    let Some(slot) = list.iter_mut().find(|p| p.name() == name) else {
        panic!("no {name} in the config");
    };
    *slot = edit(slot.clone());
}

/// The standard layout: tenants `alpha` (every model) and `beta` (only
/// `other`); model `gpt` falls back from deployment `a` (mock a, upstream
/// model `gpt-a`, key A) to `b` (mock b, `gpt-b`, key B); `other` is `b`
/// only, `embed` and `resp` are `a` only.
pub(crate) fn two_step(a: &MockServer, b: &MockServer, first_byte: &str) -> Conf {
    let timeouts = json!({"connect": "1s", "first_byte": first_byte, "idle": "2s"});
    Conf::two_tenants(&["other"])
        .model(Model::new("gpt", &["pa", "pb"]))
        .model(Model::new("other", &["pb"]))
        .model(Model::new("embed", &["pa"]))
        .model(Model::new("resp", &["pa"]))
        .pool(Pool::new("pa", &["a"]))
        .pool(Pool::new("pb", &["b"]))
        .deployment(
            Deployment::on("a", a, "gpt-a")
                .key("KEY_A")
                .timeouts(timeouts.clone()),
        )
        .deployment(
            Deployment::on("b", b, "gpt-b")
                .key("KEY_B")
                .timeouts(timeouts),
        )
        .price("gpt-a", 1.0, 2.0)
        .price("gpt-b", 10.0, 20.0)
}
