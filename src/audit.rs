//! The audit trail: one record per request — admitted or refused, streamed or
//! not, finished or cut off — written off the hot path to SQLite (default) or
//! PostgreSQL, chained by hashes so an edited or deleted row shows, watched
//! by anomaly rules, and read back by reports.
//!
//! The request path only builds the record and hands it to a bounded queue
//! (`try_send`; with `when_full: block` it waits for room instead). A writer
//! thread of its own hashes request bodies, chains, batches and commits, runs
//! the anomaly rules and retention. On a graceful stop every queued record is
//! written before the process exits.
//!
//! If the process is killed, what is lost is every record not yet
//! committed: those in the queue (at most `queue`), the one batch the writer
//! holds, being formed, committed or retried (at most `batch`), and the
//! requests whose response went out but whose logging phase had not queued
//! their record yet (at most the requests in flight). So at most
//! `queue + batch + requests in flight`; when the writer keeps up, about one
//! flush interval of traffic. Records dropped on a full queue are lost
//! whether or not the process dies, and counted.

pub mod anomaly;
mod canonical;
pub mod record;
pub mod report;
pub mod sink;
mod writer;

use crate::alerts::Alerts;
use crate::config::AuditSettings;
use crate::outcome::Finished;
use prometheus::{IntCounter, IntGauge, Registry};
use record::Pending;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// Counters of the audit machinery.
#[derive(Clone)]
pub(crate) struct AuditMetrics {
    pub(crate) written: IntCounter,
    pub(crate) dropped: IntCounter,
    pub(crate) write_errors: IntCounter,
    pub(crate) queued: IntGauge,
    /// Requests answered whose record waits for room (`when_full: block`).
    pub(crate) waiting: IntGauge,
    pub(crate) chain_conflicts: IntCounter,
}

impl AuditMetrics {
    pub(crate) fn new(r: &Registry) -> prometheus::Result<AuditMetrics> {
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let queued = IntGauge::new("collie_audit_queued", "Audit records waiting to be written")?;
        r.register(Box::new(queued.clone()))?;
        let waiting = IntGauge::new(
            "collie_audit_waiting",
            "Answered requests whose audit record waits for room in a full queue",
        )?;
        r.register(Box::new(waiting.clone()))?;
        Ok(AuditMetrics {
            written: counter("collie_audit_written_total", "Audit records committed")?,
            dropped: counter(
                "collie_audit_dropped_total",
                "Audit records dropped because the queue was full",
            )?,
            write_errors: counter(
                "collie_audit_write_errors_total",
                "Failed audit batch writes (retried)",
            )?,
            queued,
            waiting,
            chain_conflicts: counter(
                "collie_audit_chain_conflicts_total",
                "Batches whose chain places another process had taken (same sidecar id)",
            )?,
        })
    }
}

/// The request path's end of the queue.
pub(crate) struct Auditor {
    tx: mpsc::Sender<writer::Msg>,
    block: bool,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    metrics: AuditMetrics,
}

impl Auditor {
    /// Queue the record of a finished request. Never waits unless the
    /// configured policy is `block`.
    pub(crate) async fn submit(&self, finished: Finished) {
        let mut pending = Pending {
            finished,
            request_hash: None,
        };
        if let Some(b) = &pending.finished.body {
            // Bodies waiting to be hashed are bounded; past the bound the
            // hash is taken here instead.
            let queued = self.queued_bytes.fetch_add(b.len(), Ordering::Relaxed);
            if queued + b.len() > self.max_bytes {
                self.queued_bytes.fetch_sub(b.len(), Ordering::Relaxed);
                pending.request_hash = Some(record::request_hash(b));
                pending.finished.body = None;
            }
        }
        let body_len = pending.finished.body.as_ref().map_or(0, |b| b.len());
        let msg = writer::Msg::Record(Box::new(pending));
        let sent = if self.block {
            self.metrics.waiting.inc();
            let sent = self.tx.send(msg).await.is_ok();
            self.metrics.waiting.dec();
            sent
        } else {
            self.tx.try_send(msg).is_ok()
        };
        if sent {
            self.metrics.queued.inc();
        } else {
            self.queued_bytes.fetch_sub(body_len, Ordering::Relaxed);
            self.metrics.dropped.inc();
        }
    }
}

/// The writer thread; join it after the server stopped to flush everything.
pub(crate) struct AuditHandle {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuditHandle {
    /// Wait until the writer has written everything queued. Returns once every
    /// `Auditor` (the request path's sender) is gone.
    pub(crate) fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why the audit trail could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuditError {
    /// The sink cannot be opened or read: a database that does not answer,
    /// a file that cannot be created, a trail of a newer schema.
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    #[error("cannot start the audit writer: {0}")]
    Thread(#[source] std::io::Error),
}

/// Open the sink and start the writer, writing the chain of `sidecar`;
/// what the anomaly rules find goes to `alerts`, and the alerts it
/// delivered are written with the records. `None` when auditing is off.
pub(crate) fn start(
    settings: &AuditSettings,
    metrics: AuditMetrics,
    sidecar: String,
    alerts: Arc<Alerts>,
) -> Result<Option<(Auditor, AuditHandle)>, AuditError> {
    let Some(spec) = &settings.sink else {
        return Ok(None);
    };
    let sink = spec.open_for_writing(settings.request_hash_index)?;
    let (tx, rx) = mpsc::channel(settings.queue);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    log::info!("audit: writing the chain of sidecar `{sidecar}`");
    let thread = writer::spawn(
        sink,
        rx,
        tx.downgrade(),
        settings.clone(),
        sidecar,
        Arc::clone(&queued_bytes),
        metrics.clone(),
        alerts,
    )?;
    Ok(Some((
        Auditor {
            tx,
            block: settings.block_when_full,
            queued_bytes,
            max_bytes: settings.queue_bytes,
            metrics,
        },
        AuditHandle {
            thread: Some(thread),
        },
    )))
}

/// The name of this process's hash chain: `audit.sidecar_id` when set,
/// else the host name and a random suffix chosen at start.
///
/// The host name alone is not unique enough: two sidecars on one host (or
/// two pods given the same name) would write one chain from two places.
/// A fresh suffix per start means each run is a chain of its own, which
/// `verify` checks on its own; the price is that a run's last records can
/// be cut off without a later run noticing. Set `sidecar_id` to a name that
/// is unique per instance and stable across restarts (a StatefulSet pod's
/// name) to continue one chain over restarts.
pub(crate) fn sidecar_id(settings: &AuditSettings) -> String {
    if let Some(id) = &settings.sidecar_id {
        return id.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "collie".to_string());
    format!("{host}-{:08x}", rand::random::<u32>())
}
