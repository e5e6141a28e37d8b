//! When a session actor writes a snapshot of its state to the log
//! (`bstore_log::snapshots`): off the reply path, at most one at a time per
//! session, once [`SessionConfig::snapshot_every_events`] events or
//! [`SessionConfig::snapshot_every_bytes`] bytes of values have been
//! appended since the state's last snapshot, and when the actor stops with
//! at least [`SessionConfig::snapshot_on_idle_events`] such events (or with
//! any write at all when where the last snapshot stands is unknown, as after
//! a load from Redis). A load that had to replay more than the threshold —
//! a long history without a snapshot — writes one at once.
//!
//! A snapshot that fails to be written is logged and counted; nothing else
//! depends on it: the next one is tried after as many events again. With a
//! retention configured (`stream.retention_secs`), each snapshot written is
//! followed by [`EventLog::retain`] for the session.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bstore_domain::{SessionKey, SessionState};
use bstore_log::EventLog;

use crate::SessionConfig;
use crate::load::Source;

static WRITTEN: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);
static PURGED: AtomicU64 = AtomicU64::new(0);

/// Snapshots this process wrote and failed to write, and events its
/// retention dropped.
pub fn snapshot_counts() -> (u64, u64, u64) {
    (WRITTEN.load(Ordering::Relaxed), FAILED.load(Ordering::Relaxed), PURGED.load(Ordering::Relaxed))
}

/// What a session's actor knows of its state since the last snapshot.
#[derive(Debug, Default)]
pub(crate) struct SnapTrack {
    events: u64,
    bytes: u64,
    /// Whether `events` counts from the last snapshot (false after a load
    /// from Redis, which does not say where the snapshot stands).
    known: bool,
    /// Whether this actor appended anything.
    wrote: bool,
    busy: Arc<AtomicBool>,
}

impl SnapTrack {
    pub(crate) fn after_load(source: &Source) -> Self {
        let known = !matches!(source, Source::Redis { .. });
        Self { events: source.replayed(), known, ..Default::default() }
    }

    /// Counts an appended event carrying `bytes` of values.
    pub(crate) fn record(&mut self, bytes: usize) {
        self.events += 1;
        self.bytes += bytes as u64;
        self.wrote = true;
    }

    fn due(&self, cfg: &SessionConfig) -> bool {
        cfg.snapshot_every_events > 0 && (self.events >= cfg.snapshot_every_events || self.bytes >= cfg.snapshot_every_bytes)
    }

    fn due_on_idle(&self, cfg: &SessionConfig) -> bool {
        cfg.snapshot_every_events > 0 && (self.events >= cfg.snapshot_on_idle_events.max(1) || (!self.known && self.wrote))
    }

    /// Writes a snapshot of `state` in the background if one is due.
    pub(crate) fn maybe_write(&mut self, cfg: &SessionConfig, log: &EventLog, key: &SessionKey, state: &SessionState) {
        if self.due(cfg) {
            self.write(log, key, state);
        }
    }

    /// Writes a snapshot of `state` in the background if the actor stopping
    /// leaves enough uncovered events behind.
    pub(crate) fn on_stop(&mut self, cfg: &SessionConfig, log: &EventLog, key: &SessionKey, state: &SessionState) {
        if self.due_on_idle(cfg) {
            self.write(log, key, state);
        }
    }

    fn write(&mut self, log: &EventLog, key: &SessionKey, state: &SessionState) {
        if state.seq() == 0 || self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let (events, bytes, known) = (self.events, self.bytes, self.known);
        (self.events, self.bytes, self.known, self.wrote) = (0, 0, true, false);
        let (log, key, state, busy) = (log.clone(), key.clone(), state.clone(), self.busy.clone());
        tokio::spawn(async move {
            match log.write_snapshot(&key, &state).await {
                Ok(at) => {
                    WRITTEN.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(session = %key, covers = state.seq(), snapshot = at, events, bytes, known, "snapshot written");
                    let keep = log.config().retention_secs;
                    if keep > 0 {
                        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                        match log.retain(&key, std::time::Duration::from_secs(keep), now).await {
                            Ok(Some(r)) => {
                                PURGED.fetch_add(r.purged, Ordering::Relaxed);
                            }
                            Ok(None) => {}
                            Err(e) => tracing::warn!(session = %key, error = %e, "the retention could not run; the events stay"),
                        }
                    }
                }
                Err(e) => {
                    FAILED.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(session = %key, covers = state.seq(), error = %e, "could not write a snapshot; loads replay more until the next one");
                }
            }
            busy.store(false, Ordering::Release);
        });
    }
}
