//! One pipeline for every alert: the anomaly rules over the audit records
//! and the health events of the deployments (unhealthy, breaker open,
//! recovered, panic mode of a model) become one [`Alert`] type with a
//! severity and a short recommendation, are deduplicated with a cool-down
//! per (rule, scope), counted in metrics, kept in a small feed for the
//! status page, queued for the audit trail's anomaly table, and delivered to
//! the webhook with retries.
//!
//! Deduplication: the first alert of a (rule, scope) is delivered. Until
//! `cooldown` has passed since that delivery, the same rule for the same
//! scope is merged into it — its count and last-seen time go up in the
//! feed; the webhook and the trail do not get it again — and the first one
//! after the cool-down is delivered again, carrying the count of what was
//! merged. A detector may fire at most once per its own window; the
//! cool-down is the slower, operator-facing limit on top.
//!
//! Memory is bounded: the feed keeps the newest [`FEED`] alerts, the
//! dedup book at most [`KEYS_KEPT`] (rule, scope) keys (the least recently
//! seen are forgotten past it), the queues toward the trail and the
//! webhook a fixed number each (past it an alert is dropped there and
//! logged; it stays in the feed and the metrics).

pub(crate) mod health;
mod webhook;

use crate::config::Webhook;
use prometheus::{IntCounter, IntCounterVec, Registry};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};

/// Alerts kept for the status page's feed (the newest).
pub(crate) const FEED: usize = 50;
/// (rule, scope) keys the deduplication remembers at most.
pub(crate) const KEYS_KEPT: usize = 10_000;
/// Alerts waiting for the audit writer at most.
const RECORDS_QUEUED: usize = 1024;
/// How long a stop waits for alerts still on their way to the webhook.
const WEBHOOK_DRAIN: Duration = Duration::from_secs(5);

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something returned to normal.
    Info,
    /// Worth a look: traffic still flows.
    Warning,
    /// Requests fail or money is being spent fast.
    Critical,
}

impl Severity {
    /// The label in metrics, the trail and the webhook.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What an alert is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Scope {
    /// All traffic of the sidecar.
    Global,
    /// One tenant.
    Tenant {
        /// The tenant's id.
        tenant: String,
    },
    /// One end user of a tenant (`user` / `X-User-ID`).
    User {
        /// The tenant the user belongs to.
        tenant: String,
        /// The user id as recorded.
        user: String,
    },
    /// One deployment.
    Deployment {
        /// The deployment's id.
        deployment: String,
    },
    /// One public model.
    Model {
        /// The model's name.
        model: String,
    },
}

impl Scope {
    /// `global`, `tenant`, `user`, `deployment` or `model`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Tenant { .. } => "tenant",
            Scope::User { .. } => "user",
            Scope::Deployment { .. } => "deployment",
            Scope::Model { .. } => "model",
        }
    }

    /// The tenant it concerns, if any.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Scope::Tenant { tenant } | Scope::User { tenant, .. } => Some(tenant),
            _ => None,
        }
    }

    /// What it names beyond the tenant: the user, deployment or model.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Scope::User { user, .. } => Some(user),
            Scope::Deployment { deployment } => Some(deployment),
            Scope::Model { model } => Some(model),
            Scope::Global | Scope::Tenant { .. } => None,
        }
    }

    /// The scope again from its stored parts (`None`: not one Collie wrote).
    pub fn from_parts(kind: &str, tenant: Option<&str>, subject: Option<&str>) -> Option<Scope> {
        let s = |v: Option<&str>| v.map(str::to_string);
        Some(match (kind, s(tenant), s(subject)) {
            ("global", _, _) => Scope::Global,
            ("tenant", Some(tenant), _) => Scope::Tenant { tenant },
            ("user", Some(tenant), Some(user)) => Scope::User { tenant, user },
            ("deployment", _, Some(deployment)) => Scope::Deployment { deployment },
            ("model", _, Some(model)) => Scope::Model { model },
            _ => return None,
        })
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Global => f.write_str("all traffic"),
            Scope::Tenant { tenant } => write!(f, "tenant {tenant}"),
            Scope::User { tenant, user } => write!(f, "user {user} of {tenant}"),
            Scope::Deployment { deployment } => write!(f, "deployment {deployment}"),
            Scope::Model { model } => write!(f, "model {model}"),
        }
    }
}

/// A rule that found something, before deduplication.
#[derive(Debug, Clone, PartialEq)]
pub struct Raised {
    pub(crate) rule: &'static str,
    pub(crate) scope: Scope,
    pub(crate) severity: Severity,
    /// What was seen, in words (counts and the limit they passed).
    pub(crate) message: String,
    /// What to do about it, in one line.
    pub(crate) recommendation: &'static str,
    /// When, in epoch ms (a record's time for anomaly rules).
    pub(crate) at_ms: i64,
}

/// An alert as delivered and shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// The same for every delivery attempt of this alert; different for
    /// every delivery.
    pub id: String,
    /// The rule: an anomaly rule (`request_rate`, …) or a health event
    /// (`deployment_unhealthy`, `breaker_open`, `deployment_recovered`,
    /// `model_panic`, `model_recovered`).
    pub rule: String,
    /// What it is about.
    pub scope: Scope,
    /// How urgent it is.
    pub severity: Severity,
    /// What was seen (the latest occurrence).
    pub message: String,
    /// What to do about it.
    pub recommendation: String,
    /// The first occurrence merged into this alert, epoch ms.
    pub first_seen_ms: i64,
    /// The latest occurrence, epoch ms.
    pub last_seen_ms: i64,
    /// Occurrences merged into it (1: just this one).
    pub count: u64,
    /// The sidecar that raised it.
    pub sidecar: String,
}

/// The alert pipeline's series. Label values: rules and severities are
/// fixed sets; tenants come from the configuration.
#[derive(Clone)]
pub(crate) struct AlertMetrics {
    delivered: IntCounterVec,
    merged: IntCounterVec,
    /// Anomalies by rule and tenant (`global` for all tenants), as before
    /// the pipeline existed; health events are not in it.
    anomalies: IntCounterVec,
    pub(crate) webhook_failures: IntCounter,
}

impl AlertMetrics {
    pub(crate) fn new(r: &Registry) -> prometheus::Result<AlertMetrics> {
        let vec = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(prometheus::Opts::new(name, help), labels)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let webhook_failures = IntCounter::new(
            "collie_anomaly_webhook_failures_total",
            "Alerts (anomalies and health events) the webhook never accepted",
        )?;
        r.register(Box::new(webhook_failures.clone()))?;
        Ok(AlertMetrics {
            delivered: vec(
                "collie_alerts_total",
                "Alerts delivered (after deduplication), by rule and severity",
                &["rule", "severity"],
            )?,
            merged: vec(
                "collie_alerts_deduplicated_total",
                "Alerts merged into one delivered within its cool-down, by rule",
                &["rule"],
            )?,
            anomalies: vec(
                "collie_anomalies_total",
                "Anomalies detected in the audit records, by rule and tenant",
                &["rule", "tenant"],
            )?,
            webhook_failures,
        })
    }
}

/// The state behind deduplication and the feed.
#[derive(Default)]
struct Book {
    /// (rule, scope) → when it was last delivered, and the alert as it
    /// stands (merged occurrences included).
    keys: HashMap<(&'static str, Scope), Entry>,
    /// Newest last.
    feed: VecDeque<Alert>,
}

struct Entry {
    /// When it was last delivered (the cool-down runs from there).
    delivered_ms: i64,
    /// Occurrences merged since, and the first of them.
    merged: u64,
    first_merged_ms: Option<i64>,
    /// The alert as the feed shows it: the delivered one, merges included.
    shown: Alert,
}

impl Book {
    /// Put an alert at the head of the feed: each (rule, scope) once.
    fn show(&mut self, alert: Alert) {
        self.feed
            .retain(|a| !(a.rule == alert.rule && a.scope == alert.scope));
        self.feed.push_back(alert);
        while self.feed.len() > FEED {
            self.feed.pop_front();
        }
    }
}

/// The alert pipeline, shared by the audit writer, the health bridge and
/// the admin listener.
pub(crate) struct Alerts {
    sidecar: String,
    cooldown: Duration,
    book: Mutex<Book>,
    /// Delivered alerts waiting for the audit writer; `None` when no trail
    /// is written (nothing would drain it).
    records: Mutex<Option<Vec<Alert>>>,
    webhook: Mutex<Option<mpsc::Sender<Alert>>>,
    webhook_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    metrics: AlertMetrics,
    /// Bumped on every alert (delivered or merged) and every health change:
    /// the status page's push waits on it.
    changes: watch::Sender<u64>,
}

impl Alerts {
    /// A pipeline for `sidecar`; the webhook sender starts on a thread of
    /// its own when one is configured. `record` queues delivered alerts for
    /// the audit writer.
    pub(crate) fn new(
        sidecar: &str,
        cooldown: Duration,
        hook: Option<Webhook>,
        record: bool,
        metrics: AlertMetrics,
    ) -> Alerts {
        let (webhook, thread) = match hook {
            Some(h) => {
                let (tx, thread) = webhook::start(h, metrics.webhook_failures.clone());
                (Some(tx), Some(thread))
            }
            None => (None, None),
        };
        Alerts {
            sidecar: sidecar.to_string(),
            cooldown,
            book: Mutex::new(Book::default()),
            records: Mutex::new(record.then(Vec::new)),
            webhook: Mutex::new(webhook),
            webhook_thread: Mutex::new(thread),
            metrics,
            changes: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take a rule's finding through deduplication. Returns the alert when
    /// it is delivered (logged, counted, fed to the webhook and the trail),
    /// `None` when it was merged into one delivered within the cool-down.
    pub(crate) fn raise(&self, r: Raised) -> Option<Alert> {
        let cooldown = i64::try_from(self.cooldown.as_millis()).unwrap_or(i64::MAX);
        let key = (r.rule, r.scope.clone());
        let mut book = self.lock();
        if let Some(e) = book
            .keys
            .get_mut(&key)
            .filter(|e| r.at_ms.saturating_sub(e.delivered_ms) < cooldown)
        {
            e.merged += 1;
            e.first_merged_ms.get_or_insert(r.at_ms);
            e.shown.count += 1;
            e.shown.last_seen_ms = e.shown.last_seen_ms.max(r.at_ms);
            e.shown.message = r.message;
            e.shown.severity = e.shown.severity.max(r.severity);
            let shown = e.shown.clone();
            book.show(shown);
            drop(book);
            self.metrics.merged.with_label_values(&[r.rule]).inc();
            self.touch();
            return None;
        }
        // Occurrences merged since the last delivery ride along with this one.
        let (count, first_seen_ms) = match book.keys.get(&key) {
            Some(e) if e.merged > 0 => (e.merged + 1, e.first_merged_ms.unwrap_or(r.at_ms)),
            _ => (1, r.at_ms),
        };
        let mut alert = Alert {
            id: String::new(),
            rule: r.rule.to_string(),
            scope: r.scope,
            severity: r.severity,
            message: r.message,
            recommendation: r.recommendation.to_string(),
            first_seen_ms: first_seen_ms.min(r.at_ms),
            last_seen_ms: r.at_ms,
            count,
            sidecar: self.sidecar.clone(),
        };
        alert.id = alert_id(&alert);
        if book.keys.len() >= KEYS_KEPT && !book.keys.contains_key(&key) {
            forget_oldest(&mut book.keys);
        }
        book.keys.insert(
            key,
            Entry {
                delivered_ms: r.at_ms,
                merged: 0,
                first_merged_ms: None,
                shown: alert.clone(),
            },
        );
        book.show(alert.clone());
        drop(book);
        self.deliver(&alert);
        self.touch();
        Some(alert)
    }

    fn deliver(&self, alert: &Alert) {
        let log = format!(
            "alert {} ({}) on {}: {} — {}",
            alert.rule,
            alert.severity.as_str(),
            alert.scope,
            alert.message,
            alert.recommendation
        );
        match alert.severity {
            Severity::Info => log::info!("{log}"),
            Severity::Warning | Severity::Critical => log::warn!("{log}"),
        }
        self.metrics
            .delivered
            .with_label_values(&[alert.rule.as_str(), alert.severity.as_str()])
            .inc();
        if !health::is_health_rule(&alert.rule) {
            self.metrics
                .anomalies
                .with_label_values(&[
                    alert.rule.as_str(),
                    alert.scope.tenant().unwrap_or("global"),
                ])
                .inc();
        }
        if let Some(records) = self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            if records.len() < RECORDS_QUEUED {
                records.push(alert.clone());
            } else {
                log::warn!(
                    "alert {} not queued for the audit trail (queue full)",
                    alert.rule
                );
            }
        }
        if let Some(tx) = self
            .webhook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            // Bounded: an alert that does not fit is still in the feed,
            // the metrics and the trail.
            if tx.try_send(alert.clone()).is_err() {
                log::warn!(
                    "alert {} not queued for the webhook (queue full)",
                    alert.rule
                );
            }
        }
    }

    /// Delivered alerts not yet handed to the audit writer.
    pub(crate) fn take_records(&self) -> Vec<Alert> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The feed, newest first.
    pub(crate) fn recent(&self) -> Vec<Alert> {
        self.lock().feed.iter().rev().cloned().collect()
    }

    /// Something the status page shows changed.
    pub(crate) fn touch(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes when something the status page shows changed.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Stop taking alerts for the webhook and give those pending a bounded
    /// time to go out: a dead receiver must not hold the stop for its
    /// retries.
    pub(crate) fn shutdown(&self) {
        self.webhook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(thread) = self
            .webhook_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let give_up = Instant::now() + WEBHOOK_DRAIN;
        while !thread.is_finished() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(20));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!(
                "alert webhook: alerts still pending after {WEBHOOK_DRAIN:?} at shutdown were not sent (they are in the trail)"
            );
        }
    }
}

/// Past [`KEYS_KEPT`]: forget the tenth of the keys seen least recently
/// (one sort per tenth of the bound, not per alert).
fn forget_oldest(keys: &mut HashMap<(&'static str, Scope), Entry>) {
    let mut seen: Vec<i64> = keys.values().map(|e| e.shown.last_seen_ms).collect();
    seen.sort_unstable();
    let Some(&cut) = seen.get(seen.len() / 10) else {
        return;
    };
    keys.retain(|_, e| e.shown.last_seen_ms > cut);
}

/// An alert's identity: the same for every attempt, different for every
/// delivery (by sidecar, rule, scope and time).
fn alert_id(a: &Alert) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        a.sidecar.as_str(),
        &a.last_seen_ms.to_string(),
        &a.rule,
        a.scope.kind(),
        a.scope.tenant().unwrap_or("\u{0}"),
        a.scope.subject().unwrap_or("\u{0}"),
        &a.message,
    ] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    hex::encode(&h.finalize()[..16])
}

/// The wall clock in epoch ms.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(cooldown: Duration) -> Alerts {
        let metrics = AlertMetrics::new(&Registry::new()).unwrap();
        Alerts::new("s", cooldown, None, true, metrics)
    }

    fn raised(rule: &'static str, tenant: &str, at_ms: i64) -> Raised {
        Raised {
            rule,
            scope: Scope::Tenant {
                tenant: tenant.into(),
            },
            severity: Severity::Warning,
            message: format!("seen at {at_ms}"),
            recommendation: "look",
            at_ms,
        }
    }

    #[test]
    fn repeats_within_the_cooldown_are_merged_then_delivered_with_their_count() {
        let a = pipeline(Duration::from_secs(60));
        let first = a.raise(raised("request_rate", "t", 1_000)).unwrap();
        assert_eq!(first.count, 1);
        // Another scope, another rule: delivered on their own.
        assert!(a.raise(raised("request_rate", "u", 2_000)).is_some());
        assert!(a.raise(raised("hourly_cost", "t", 2_000)).is_some());
        // The same (rule, scope) within the minute: merged.
        assert_eq!(a.raise(raised("request_rate", "t", 30_000)), None);
        assert_eq!(a.raise(raised("request_rate", "t", 60_999)), None);
        let shown = a
            .recent()
            .into_iter()
            .find(|x| x.rule == "request_rate" && x.scope.tenant() == Some("t"))
            .unwrap();
        assert_eq!((shown.count, shown.last_seen_ms), (3, 60_999));
        assert_eq!(shown.first_seen_ms, 1_000);
        // Past the cool-down: delivered again, with what was merged.
        let again = a.raise(raised("request_rate", "t", 61_000)).unwrap();
        assert_eq!(again.count, 3, "two merged and this one");
        assert_eq!(again.first_seen_ms, 30_000);
        assert_ne!(again.id, first.id);
        assert_eq!(a.take_records().len(), 4);
        assert!(a.take_records().is_empty());
        // The feed holds each (rule, scope) once, newest first.
        let feed = a.recent();
        assert_eq!(feed.len(), 3);
        assert_eq!(feed[0].last_seen_ms, 61_000);
    }

    #[test]
    fn a_zero_cooldown_delivers_every_occurrence() {
        let a = pipeline(Duration::ZERO);
        assert!(a.raise(raised("large_request", "t", 1)).is_some());
        assert!(a.raise(raised("large_request", "t", 1)).is_some());
    }

    #[test]
    fn the_book_and_the_feed_stay_bounded() {
        let a = pipeline(Duration::from_secs(60));
        for i in 0..(KEYS_KEPT as i64 + 500) {
            a.raise(raised("request_rate", &format!("t{i}"), i));
        }
        assert!(a.lock().keys.len() <= KEYS_KEPT);
        assert_eq!(a.recent().len(), FEED);
    }
}
