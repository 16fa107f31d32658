//! The live configuration: one immutable [`Snapshot`] (config, routing,
//! lookup tables) behind an `ArcSwap`. A request loads it once when it starts
//! and keeps that `Arc` to the end, so a reload never shows it half of one
//! config and half of another.

use crate::config::{Config, ConfigErrors, Model};
use crate::quota::fleet::Fleet;
use crate::quota::{Authority, Calendar, Ledger, Quota};
use crate::routing::health::HealthBook;
use crate::routing::{BuildError, Router};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) struct Snapshot {
    pub(crate) config: Config,
    pub(crate) router: Router,
    /// Every tenant's quota ledger (shared with the previous snapshot) and
    /// the calendar its windows follow.
    pub(crate) quota: Quota,
    tenant_index: HashMap<String, usize>,
    model_index: HashMap<String, usize>,
    /// Key digest → tenant index, to tell "wrong key" from "another tenant's key".
    key_owner: HashMap<[u8; 32], usize>,
}

impl Snapshot {
    pub(crate) fn build(
        config: Config,
        previous: Option<&Snapshot>,
        ledger: &Ledger,
        book: &HealthBook,
        fleet: Option<&Arc<Fleet>>,
    ) -> Result<Snapshot, BuildError> {
        let router = Router::build(&config, previous.map(|p| &p.router), book)?;
        let model_index = config
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        let ledgers = config
            .tenants
            .iter()
            .map(|t| ledger.tenant(&t.id, &t.limits))
            .collect();
        let ids: Vec<&str> = config.tenants.iter().map(|t| t.id.as_str()).collect();
        ledger.retain(&ids);
        let calendar = Arc::new(Calendar::with_clock(
            config.quota.timezone.clone(),
            ledger.clock().clone(),
        ));
        let tenant_index = config
            .tenants
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.clone(), i))
            .collect();
        let key_owner = config
            .tenants
            .iter()
            .enumerate()
            .flat_map(|(i, t)| t.key_digests.iter().map(move |d| (*d, i)))
            .collect();
        Ok(Snapshot {
            config,
            router,
            quota: Quota::new(
                ledgers,
                calendar,
                fleet.map(|f| Arc::clone(f) as Arc<dyn Authority>),
            ),
            tenant_index,
            model_index,
            key_owner,
        })
    }

    pub(crate) fn model(&self, name: &str) -> Option<&Model> {
        self.model_index
            .get(name)
            .and_then(|&i| self.config.models.get(i))
    }

    pub(crate) fn tenant_index(&self, id: &str) -> Option<usize> {
        self.tenant_index.get(id).copied()
    }

    pub(crate) fn key_owner(&self, digest: &[u8; 32]) -> Option<usize> {
        self.key_owner.get(digest).copied()
    }
}

/// Why a reload was refused; the running snapshot stays.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    #[error("{} is invalid:\n{errors}", path.display())]
    Config { path: PathBuf, errors: ConfigErrors },
    #[error("internal error: {0}")]
    Build(#[from] BuildError),
    #[error("the `fleet` section cannot change while running (restart the sidecar)")]
    FleetChanged,
}

/// The swappable handle shared by every part of the process.
pub struct State {
    current: ArcSwap<Snapshot>,
    /// Quota counts live here, across snapshots.
    pub ledger: Ledger,
    /// Deployment health and probes, across snapshots.
    pub health: Arc<HealthBook>,
    /// The fleet sharing the limits, if any (fixed for the process).
    pub(crate) fleet: Option<Arc<Fleet>>,
}

impl State {
    pub(crate) fn new(
        config: Config,
        health: Arc<HealthBook>,
        fleet: Option<Arc<Fleet>>,
    ) -> Result<State, BuildError> {
        let ledger = if fleet.is_some() {
            Ledger::shared()
        } else {
            Ledger::default()
        };
        let snapshot = Snapshot::build(config, None, &ledger, &health, fleet.as_ref())?;
        Ok(State {
            current: ArcSwap::from_pointee(snapshot),
            ledger,
            health,
            fleet,
        })
    }

    pub(crate) fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replace the whole snapshot; requests already running keep the old one.
    /// It blocks while deployments' host names are resolved.
    pub fn reload(&self, config: Config) -> Result<(), BuildError> {
        let old = self.current.load_full();
        let next = Snapshot::build(
            config,
            Some(&old),
            &self.ledger,
            &self.health,
            self.fleet.as_ref(),
        )?;
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// Read, validate and swap in a config file. It blocks (it reads the
    /// file and resolves deployments' host names): from async code, run it
    /// on a blocking thread.
    pub(crate) fn reload_file(&self, path: &Path) -> Result<(), ReloadError> {
        let config = Config::load(path).map_err(|errors| ReloadError::Config {
            path: path.to_path_buf(),
            errors,
        })?;
        let fleet = |c: &Config| c.fleet.as_ref().map(|f| f.identity());
        if fleet(&config) != fleet(&self.load().config) {
            return Err(ReloadError::FleetChanged);
        }
        Ok(self.reload(config)?)
    }
}
