//! The writer thread: drains the queue, hashes request bodies, chains the
//! records, commits them in batches, runs the anomaly rules and retention.
//! It ends when the queue is closed and empty.

use super::anomaly::Detector;
use super::record::{Pending, record_of, request_hash};
use super::sink::{AnomalyRow, Retention, Sink, Stored, WriteError};
use super::{AuditError, AuditMetrics};
use crate::alerts::Alerts;
use crate::config::AuditSettings;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// What the writer receives: records, and ticks that bound how long a
/// partial batch waits.
pub(super) enum Msg {
    Record(Box<Pending>),
    Tick,
}

/// This sidecar's place in its chain: the last (seq, hash) committed.
struct Chain {
    sidecar: String,
    seq: i64,
    head: String,
}

#[expect(
    clippy::too_many_arguments,
    reason = "the writer's parts, each owned by the thread it starts"
)]
pub(super) fn spawn(
    mut sink: Box<dyn Sink>,
    mut rx: mpsc::Receiver<Msg>,
    ticker: mpsc::WeakSender<Msg>,
    s: AuditSettings,
    sidecar: String,
    queued_bytes: Arc<AtomicUsize>,
    metrics: AuditMetrics,
    alerts: Arc<Alerts>,
) -> Result<std::thread::JoinHandle<()>, AuditError> {
    // Continue this sidecar's chain where the sink has it.
    let (seq, head) = sink.chain_head(&sidecar)?.unwrap_or((0, String::new()));
    let mut chain = Chain { sidecar, seq, head };
    // Ticks come from a thread of their own that stops when the request
    // path's senders are gone (it only holds a weak one).
    let interval = s.flush_interval;
    std::thread::Builder::new()
        .name("collie-audit-tick".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                let Some(tx) = ticker.upgrade() else { return };
                // Only into an empty queue: ticks wake an idle writer (for
                // retention) and must not take the room of records while the
                // writer is busy. A lost tick does not matter.
                if tx.capacity() == tx.max_capacity() {
                    let _ = tx.try_send(Msg::Tick);
                }
            }
        })
        .map_err(AuditError::Thread)?;
    // No async runtime on this thread: the sinks' clients block, by design.
    std::thread::Builder::new()
        .name("collie-audit".into())
        .spawn(move || {
            let mut detector = Detector::new(s.anomalies.clone());
            let mut batch: Vec<Pending> = Vec::with_capacity(s.batch);
            let mut last_prune = Instant::now();
            loop {
                // Wake once for the first record, then let the rest of the
                // interval's records gather in the queue: one wake-up and one
                // transaction per batch, not per record.
                let first = rx.blocking_recv();
                let closed = first.is_none();
                if let Some(Msg::Record(p)) = first {
                    batch.push(*p);
                    let deadline = Instant::now() + s.flush_interval;
                    loop {
                        while batch.len() < s.batch {
                            match rx.try_recv() {
                                Ok(Msg::Record(p)) => batch.push(*p),
                                Ok(Msg::Tick) => {}
                                Err(_) => break,
                            }
                        }
                        let now = Instant::now();
                        if batch.len() >= s.batch || now >= deadline || rx.is_closed() {
                            break;
                        }
                        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
                    }
                }
                // A tick woke the writer: take what is queued, but never
                // more than one batch. (The writer holds at most `batch`
                // records outside the queue; the crash bound counts on it.)
                while batch.len() < s.batch {
                    match rx.try_recv() {
                        Ok(Msg::Record(p)) => batch.push(*p),
                        Ok(Msg::Tick) => {}
                        Err(_) => break,
                    }
                }
                // Also with no records: the baseline's periods end on the clock.
                let n = batch.len();
                write_batch(
                    &mut *sink,
                    &mut batch,
                    &mut chain,
                    &mut detector,
                    &metrics,
                    &alerts,
                    &queued_bytes,
                );
                metrics.queued.sub(i64::try_from(n).unwrap_or(0));
                if last_prune.elapsed() >= s.prune_every
                    && (s.max_age.is_some() || s.max_rows.is_some() || s.max_bytes.is_some())
                {
                    last_prune = Instant::now();
                    let keep = Retention {
                        before_ms: s.max_age.map(|age| {
                            now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX)
                        }),
                        max_rows: s.max_rows.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
                        max_bytes: s.max_bytes,
                    };
                    match sink.prune(&keep) {
                        Ok(0) => {}
                        Ok(n) => log::info!("audit retention removed {n} records"),
                        Err(e) => log::warn!("audit retention failed: {e}"),
                    }
                }
                if closed {
                    break;
                }
            }
        })
        .map_err(AuditError::Thread)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Attempts at one batch before it is dropped (and counted).
const WRITE_ATTEMPTS: u32 = 5;

/// Turn the pending records into the chain's next links, hand what the
/// anomaly rules find (in them, and on the clock) to the alert pipeline, and
/// commit the records with every alert it delivered since the last batch
/// (health events too).
fn write_batch(
    sink: &mut dyn Sink,
    batch: &mut Vec<Pending>,
    chain: &mut Chain,
    detector: &mut Detector,
    metrics: &AuditMetrics,
    alerts: &Alerts,
    queued_bytes: &AtomicUsize,
) {
    let mut stored = Vec::with_capacity(batch.len());
    for p in batch.drain(..) {
        let (mut record, body) = record_of(p.finished, p.request_hash);
        if let Some(body) = body {
            queued_bytes.fetch_sub(body.len(), Ordering::Relaxed);
            record.request_hash = Some(request_hash(&body));
        }
        for found in detector.observe(&record) {
            alerts.raise(found);
        }
        stored.push(Stored {
            sidecar: chain.sidecar.clone(),
            seq: 0,
            prev_hash: String::new(),
            hash: String::new(),
            record,
        });
    }
    // After the batch's records, so those of a period just over count in it.
    for found in detector.tick(now_ms()) {
        alerts.raise(found);
    }
    let anomalies: Vec<AnomalyRow> = alerts.take_records().iter().map(AnomalyRow::of).collect();
    if stored.is_empty() && anomalies.is_empty() {
        return;
    }
    link(&mut stored, chain.seq, &chain.head);
    let mut attempt = 0;
    while attempt < WRITE_ATTEMPTS {
        attempt += 1;
        match sink.write(&stored, &anomalies) {
            Ok(()) => {
                if let Some(last) = stored.last() {
                    chain.seq = last.seq;
                    chain.head.clone_from(&last.hash);
                }
                metrics.written.inc_by(stored.len() as u64);
                return;
            }
            Err(WriteError::Conflict(e)) => {
                // Another process writes under this sidecar id: its rows hold
                // the places this batch was chained to. Nothing of either is
                // lost: this batch is chained again after the rows that are
                // there now, so the chain stays one verifiable sequence.
                metrics.chain_conflicts.inc();
                log::error!(
                    "audit: sidecar id `{}` is being written by another process too ({e}); \
                     give each sidecar its own audit.sidecar_id. Chaining this batch after its rows.",
                    chain.sidecar
                );
                match sink.chain_head(&chain.sidecar) {
                    Ok(head) => {
                        let (seq, hash) = head.unwrap_or((0, String::new()));
                        link(&mut stored, seq, &hash);
                    }
                    Err(e) => log::error!("audit: cannot read the chain head: {e}"),
                }
            }
            Err(WriteError::Failed(e)) => {
                metrics.write_errors.inc();
                log::error!("audit write failed (attempt {attempt}): {e}");
                std::thread::sleep(Duration::from_millis(200 * 2u64.pow(attempt - 1)));
            }
        }
    }
    log::error!(
        "audit: {} records could not be written and are dropped",
        stored.len()
    );
    metrics.dropped.inc_by(stored.len() as u64);
}

/// Give each record its place in the chain after (`seq`, `head`).
fn link(stored: &mut [Stored], mut seq: i64, head: &str) {
    let mut prev = head.to_string();
    for s in stored {
        seq += 1;
        s.seq = seq;
        s.hash = s.record.chain_hash(&s.sidecar, seq, &prev);
        s.prev_hash = std::mem::replace(&mut prev, s.hash.clone());
    }
}
