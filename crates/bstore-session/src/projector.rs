//! Keeps one session's Redis copy up to date without ever holding up a write.
//!
//! The actor hands each applied event to its [`Projector`] after the log has
//! acknowledged it, and answers the client at once: the Redis write happens
//! in a task of its own that works through a small queue, each call bounded
//! by the Redis time-out. When a write fails, times out, finds a gap, or the
//! queue is full, the session is marked *behind*; the actor then sends a
//! whole snapshot of its state instead of the next delta (or on its
//! catch-up timer when no write comes), and deltas queued before that
//! snapshot are skipped because they could only find the same gap.
//!
//! Everything here is best effort by design: Redis is a cache of the log, so
//! a projection that fails leaves a stale or missing copy — which a load
//! detects by sequence and repairs — never a lost or refused write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bstore_domain::{Change, Event, SessionKey, SessionState};
use bstore_redis::{DeltaOutcome, RedisProjection, SnapshotMode};
use tokio::sync::mpsc;

enum Job {
    Delta { prev: u64, after: SessionState, event: Event },
    Snapshot { state: SessionState, mode: SnapshotMode },
}

#[derive(Default)]
struct Status {
    /// The Redis copy is not known to be at the actor's sequence.
    behind: AtomicBool,
    /// A snapshot waits in the queue; no need to send another.
    snapshot_queued: AtomicBool,
    /// Snapshots that failed in a row; the timer waits longer after each.
    failures: AtomicU32,
}

/// The actor's end of its projection queue. Cheap to clone; the task ends
/// when every clone is dropped and the queue is drained.
#[derive(Clone)]
pub(crate) struct Projector {
    tx: mpsc::Sender<Job>,
    status: Arc<Status>,
    /// When the timer may next try a snapshot (backs off while Redis is
    /// down, so thousands of behind sessions do not hammer it).
    next_try: Arc<std::sync::Mutex<Instant>>,
    interval: Duration,
}

impl Projector {
    /// Starts the projection task of `key` on the current arbiter.
    pub(crate) fn start(key: SessionKey, redis: RedisProjection) -> Self {
        let (tx, rx) = mpsc::channel(redis.config().queue.max(1));
        let status = Arc::new(Status::default());
        let interval = redis.config().catch_up_interval;
        actix::spawn(run(key, redis, rx, status.clone()));
        Self { tx, status, next_try: Arc::new(std::sync::Mutex::new(Instant::now())), interval }
    }

    /// Whether the Redis copy needs a snapshot to catch up.
    pub(crate) fn is_behind(&self) -> bool {
        self.status.behind.load(Ordering::Acquire)
    }

    /// Called after the log stored `event` right after `prev`, leaving the
    /// session as `after`. Never waits.
    pub(crate) fn after_write(&self, prev: u64, after: &SessionState, event: &Event) {
        if self.is_behind() && !self.status.snapshot_queued.load(Ordering::Acquire) {
            self.snapshot(after, SnapshotMode::Guarded);
            return;
        }
        let job = Job::Delta { prev, after: post_image(after, event), event: event.clone() };
        if self.tx.try_send(job).is_err() {
            self.status.behind.store(true, Ordering::Release);
        }
    }

    /// Queues a snapshot of `state` unless one is already waiting (`Replace`
    /// always goes). Never waits.
    pub(crate) fn snapshot(&self, state: &SessionState, mode: SnapshotMode) {
        if mode == SnapshotMode::Guarded && self.status.snapshot_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        self.status.snapshot_queued.store(true, Ordering::Release);
        self.status.behind.store(true, Ordering::Release);
        if self.tx.try_send(Job::Snapshot { state: state.clone(), mode }).is_err() {
            // The queue is full: the timer tries again.
            self.status.snapshot_queued.store(false, Ordering::Release);
        }
    }

    /// Queues a snapshot if the copy is behind, none is waiting, and the
    /// back-off after failed snapshots has passed. For the timer.
    pub(crate) fn catch_up(&self, state: &SessionState) {
        if !self.is_behind() || self.status.snapshot_queued.load(Ordering::Acquire) {
            return;
        }
        let mut next = self.next_try.lock().expect("not poisoned");
        if Instant::now() < *next {
            return;
        }
        let failures = self.status.failures.load(Ordering::Acquire).min(5);
        *next = Instant::now() + (self.interval * 2u32.pow(failures)).min(Duration::from_secs(30));
        drop(next);
        self.snapshot(state, SnapshotMode::Guarded);
    }
}

async fn run(key: SessionKey, redis: RedisProjection, mut rx: mpsc::Receiver<Job>, status: Arc<Status>) {
    while let Some(job) = rx.recv().await {
        match job {
            Job::Delta { prev, after, event } => {
                if status.behind.load(Ordering::Acquire) {
                    continue;
                }
                match redis.apply(&key, prev, &after, &event).await {
                    Ok(DeltaOutcome::Applied | DeltaOutcome::AlreadyNewer) => {}
                    Ok(DeltaOutcome::Gap { stored }) => {
                        tracing::debug!(session = %key, stored, prev, "redis copy has a gap; a snapshot will follow");
                        status.behind.store(true, Ordering::Release);
                    }
                    Err(e) => {
                        tracing::warn!(session = %key, error = %e, "redis projection failed; the session will catch up with a snapshot");
                        status.behind.store(true, Ordering::Release);
                    }
                }
            }
            Job::Snapshot { state, mode } => {
                let result = redis.write_snapshot(&key, &state, mode).await;
                // Cleared only now, so writes during the snapshot queue
                // deltas behind it rather than another snapshot.
                status.snapshot_queued.store(false, Ordering::Release);
                match result {
                    Ok(written) => {
                        tracing::debug!(session = %key, seq = state.seq(), written, ?mode, "redis copy caught up");
                        status.behind.store(false, Ordering::Release);
                        status.failures.store(0, Ordering::Release);
                    }
                    Err(e) => {
                        tracing::warn!(session = %key, error = %e, "redis snapshot failed; will retry");
                        status.behind.store(true, Ordering::Release);
                        status.failures.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
        }
    }
}

/// The part of `after` a delta projection reads: what the event touched (its
/// keys, or the creds) and the session's metadata. Cloning the whole state
/// instead would copy every key of the session on every write.
fn post_image(after: &SessionState, event: &Event) -> SessionState {
    let creds = match event.change {
        Change::CredsPut { .. } => after.creds().cloned(),
        _ => None,
    };
    let keys = event.touched_keys().into_iter().filter_map(|(ty, id)| after.get_keys(ty, [id]).pop().map(|(id, v)| (ty.clone(), id, v)));
    SessionState::from_parts(after.seq(), creds, keys, after.updated_at_ms(), after.events())
}
