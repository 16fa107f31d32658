//! Health events as alerts: every breaker change the health book reports
//! ([`HealthEvent`]) is judged here, off the request path, and the ones an
//! operator acts on become alerts:
//!
//! | rule | severity | when |
//! | --- | --- | --- |
//! | `deployment_unhealthy` | warning | probes failed `unhealthy_after` times in a row (its breaker opens) |
//! | `breaker_open` | warning | live traffic opened the breaker (`failures_to_open` in a row, or `error_ratio`) |
//! | `deployment_recovered` | info | the breaker of a deployment alerted above closed again |
//! | `model_panic` | critical | every deployment of a model's chain is unhealthy: its requests get 503 |
//! | `model_recovered` | info | a model in panic mode has a deployment that may serve again |
//!
//! Not alerted: a breaker opened by a provider's `Retry-After` (the
//! provider asked for rest; it is counted in the breaker metrics), the
//! cooldown's end (open → half-open) and a failed trial (it was down
//! already). Panic mode is checked on every change and once a second (a
//! reload can change a chain).

use super::{Alerts, Raised, Scope, Severity, now_ms};
use crate::routing::health::{BreakerState, Cause, HealthEvent, HealthState};
use crate::state::{Snapshot, State};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// The rules of health events (every other rule is an anomaly rule).
pub(crate) const HEALTH_RULES: [&str; 5] = [
    "deployment_unhealthy",
    "breaker_open",
    "deployment_recovered",
    "model_panic",
    "model_recovered",
];

pub(crate) fn is_health_rule(rule: &str) -> bool {
    HEALTH_RULES.contains(&rule)
}

/// The background service turning breaker changes into alerts.
pub(crate) struct HealthAlerts {
    pub(crate) state: Arc<State>,
    pub(crate) alerts: Arc<Alerts>,
    pub(crate) events: Mutex<Option<mpsc::Receiver<HealthEvent>>>,
}

/// What was alerted and not yet recovered.
#[derive(Default)]
struct Down {
    deployments: HashSet<String>,
    models: HashSet<String>,
}

#[async_trait]
impl BackgroundService for HealthAlerts {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut events) = self.events.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let mut down = Down::default();
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(e) => self.judge(&e, &mut down),
                    None => return,
                },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            self.panic_mode(&mut down);
        }
    }
}

impl HealthAlerts {
    fn enabled(snap: &Snapshot) -> bool {
        snap.config.audit.anomalies.health_alerts
    }

    fn judge(&self, e: &HealthEvent, down: &mut Down) {
        // Whatever it is, the status page has something new to show.
        self.alerts.touch();
        let snap = self.state.load();
        if !Self::enabled(&snap) {
            return;
        }
        let Some(d) = snap
            .router
            .deployments
            .iter()
            .find(|d| d.id == e.deployment)
        else {
            return;
        };
        let scope = Scope::Deployment {
            deployment: d.id.clone(),
        };
        let t = e.transition;
        let raised = |rule, severity, message: String, recommendation| Raised {
            rule,
            scope: scope.clone(),
            severity,
            message,
            recommendation,
            at_ms: now_ms(),
        };
        match (t.to, t.cause) {
            (BreakerState::Open, Cause::ProbesFailing) if down.deployments.insert(d.id.clone()) => {
                let h = d.health.snapshot();
                let last = h.last_probe.map(|p| p.detail).unwrap_or_default();
                self.alerts.raise(raised(
                        "deployment_unhealthy",
                        Severity::Warning,
                        format!(
                            "deployment {}: {} probes in a row failed (last: {last}); taken out of its pools",
                            d.id, h.probe_failures
                        ),
                        "Check the provider's status and the deployment's key and base URL; its pools send traffic to their other members meanwhile.",
                    ));
            }
            (BreakerState::Open, Cause::Failures | Cause::ErrorRatio | Cause::TrialFailed)
                if down.deployments.insert(d.id.clone()) =>
            {
                let h = d.health.snapshot();
                let s = d.health.settings();
                let why = if t.cause == Cause::ErrorRatio {
                    format!(
                        "{} of its last {} requests failed (limit {:.0} %)",
                        h.errors,
                        h.error_samples,
                        s.error_ratio * 100.0
                    )
                } else {
                    format!("{} requests in a row failed", s.failures_to_open)
                };
                self.alerts.raise(raised(
                        "breaker_open",
                        Severity::Warning,
                        format!("deployment {}: breaker open, {why}", d.id),
                        "See the deployment's recent errors (collie audit report, top errors); traffic goes to other members until a trial request succeeds.",
                    ));
            }
            (BreakerState::Closed, cause) if down.deployments.remove(&d.id) => {
                let how = match cause {
                    Cause::ProbesPassing => "its probes pass again",
                    _ => "a trial request succeeded",
                };
                self.alerts.raise(raised(
                    "deployment_recovered",
                    Severity::Info,
                    format!("deployment {}: back in service, {how}", d.id),
                    "Nothing to do; watch that it stays up.",
                ));
            }
            // A provider's Retry-After, a cooldown's end: not a fault.
            _ => {}
        }
    }

    /// Raise `model_panic` when every deployment of a model's chain is
    /// unhealthy, `model_recovered` when one of them may serve again.
    fn panic_mode(&self, down: &mut Down) {
        let snap = self.state.load();
        if !Self::enabled(&snap) {
            return;
        }
        for m in &snap.config.models {
            let members: Vec<_> = m
                .chain
                .iter()
                .filter_map(|&p| snap.router.pool(p))
                .flat_map(|p| p.member_ixs())
                .filter_map(|d| snap.router.deployment(d))
                .collect();
            let panic = !members.is_empty()
                && members
                    .iter()
                    .all(|d| d.health.state() == HealthState::Unhealthy);
            let scope = Scope::Model {
                model: m.name.clone(),
            };
            let names = || {
                members
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if panic && down.models.insert(m.name.clone()) {
                self.alerts.raise(Raised {
                    rule: "model_panic",
                    scope,
                    severity: Severity::Critical,
                    message: format!(
                        "model {}: every deployment of its chain is unhealthy ({}); its requests get 503 no_healthy_upstream",
                        m.name,
                        names()
                    ),
                    recommendation: "Check the providers of its chain on the status page; a fallback pool on another provider keeps a model up when one provider fails.",
                    at_ms: now_ms(),
                });
            } else if !panic && down.models.remove(&m.name) {
                self.alerts.raise(Raised {
                    rule: "model_recovered",
                    scope,
                    severity: Severity::Info,
                    message: format!("model {}: a deployment of its chain serves again", m.name),
                    recommendation: "Nothing to do; requests are served again.",
                    at_ms: now_ms(),
                });
            }
        }
        // A model a reload removed is forgotten.
        down.models.retain(|name| snap.model(name).is_some());
    }
}
