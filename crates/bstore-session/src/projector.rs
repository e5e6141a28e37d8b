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
//! Each Redis copy carries a manifest with a digest of the whole session
//! (see `bstore_redis`), which a delta updates from the entries it touches:
//! their values before the event (an image the actor takes before applying
//! it) and after. The task keeps the digest of the last state it projected;
//! when a delta does not follow on from it (the first after a load, or after
//! a failure) it takes the one the copy's sealed manifest vouches for, if the
//! copy is at the delta's predecessor, and otherwise marks the session
//! behind, so that a snapshot — never a delta with a digest it cannot know —
//! writes the copy.
//!
//! Everything here is best effort by design: Redis is a cache of the log, so
//! a projection that fails leaves a stale or missing copy — which a load
//! detects by sequence and repairs — never a lost or refused write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bstore_domain::{Event, SessionKey, SessionState};
use bstore_redis::{DeltaOutcome, Digest, RedisProjection, SnapshotMode};
use tokio::sync::mpsc;

/// A delta's `before` and `after` are images ([`image`]) of the session
/// before and after its event.
enum Job {
    Delta { before: Box<SessionState>, after: SessionState, event: Event },
    Snapshot { state: SessionState, mode: SnapshotMode },
}

#[derive(Default)]
struct Status {
    /// The Redis copy is not known to be at the actor's sequence.
    behind: AtomicBool,
    /// The highest sequence whose projection was dropped or failed. A
    /// snapshot clears `behind` only if it covers this: a delta dropped
    /// while an older snapshot was being written is not covered by it.
    missed: AtomicU64,
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
    /// When the timer last tried a snapshot; it waits longer after each
    /// failure (so thousands of behind sessions do not hammer a Redis that
    /// is down) and only the catch-up interval once one has succeeded.
    last_try: Arc<std::sync::Mutex<Option<Instant>>>,
    interval: Duration,
}

impl Projector {
    /// Starts the projection task of `key` on the current arbiter.
    pub(crate) fn start(key: SessionKey, redis: RedisProjection) -> Self {
        let (tx, rx) = mpsc::channel(redis.config().queue.max(1));
        let status = Arc::new(Status::default());
        let interval = redis.config().catch_up_interval;
        actix::spawn(run(key, redis, rx, status.clone()));
        Self { tx, status, last_try: Arc::new(std::sync::Mutex::new(None)), interval }
    }

    /// Whether the Redis copy needs a snapshot to catch up.
    pub(crate) fn is_behind(&self) -> bool {
        self.status.behind.load(Ordering::Acquire)
    }

    /// Called after the log stored `event`, which was applied to the state
    /// `before` is an [`image`] of, leaving the session as `after`. Never
    /// waits.
    pub(crate) fn after_write(&self, before: SessionState, after: &SessionState, event: &Event) {
        if self.is_behind() && !self.status.snapshot_queued.load(Ordering::Acquire) {
            self.snapshot(after, SnapshotMode::Guarded);
            return;
        }
        let job = Job::Delta { before: Box::new(before), after: image(after, event), event: event.clone() };
        if self.tx.try_send(job).is_err() {
            self.status.missed(after.seq());
        }
    }

    /// Queues a snapshot of `state` unless one is already waiting (`Replace`
    /// always goes). Never waits.
    pub(crate) fn snapshot(&self, state: &SessionState, mode: SnapshotMode) {
        if mode == SnapshotMode::Guarded && self.status.snapshot_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        self.status.snapshot_queued.store(true, Ordering::Release);
        self.status.behind.store(true, Ordering::SeqCst);
        if self.tx.try_send(Job::Snapshot { state: state.clone(), mode }).is_err() {
            // The queue is full: the timer tries again.
            self.status.snapshot_queued.store(false, Ordering::Release);
            self.status.missed(state.seq());
        }
    }

    /// Queues a snapshot if the copy is behind, none is waiting, and the
    /// back-off after failed snapshots has passed. For the timer.
    pub(crate) fn catch_up(&self, state: &SessionState) {
        if !self.is_behind() || self.status.snapshot_queued.load(Ordering::Acquire) {
            return;
        }
        let failures = self.status.failures.load(Ordering::Acquire).min(5);
        let wait = (self.interval * 2u32.pow(failures)).min(Duration::from_secs(30));
        let mut last = self.last_try.lock().expect("not poisoned");
        if last.is_some_and(|at| at.elapsed() < wait) {
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        self.snapshot(state, SnapshotMode::Guarded);
    }
}

impl Status {
    /// Marks the copy behind because the projection of `seq` was lost.
    fn missed(&self, seq: u64) {
        self.missed.fetch_max(seq, Ordering::SeqCst);
        crate::stats::projection_missed();
        self.behind.store(true, Ordering::SeqCst);
    }

    /// A snapshot at `seq` was written: the copy is current unless a later
    /// projection was lost meanwhile. Clearing first and checking after
    /// keeps a loss recorded concurrently (`missed` stores its sequence
    /// before it sets `behind`).
    fn caught_up(&self, seq: u64) {
        self.behind.store(false, Ordering::SeqCst);
        if self.missed.load(Ordering::SeqCst) > seq {
            self.behind.store(true, Ordering::SeqCst);
        }
    }
}

async fn run(key: SessionKey, redis: RedisProjection, mut rx: mpsc::Receiver<Job>, status: Arc<Status>) {
    // The digest of the session as of the last job done: the state of a
    // snapshot, or the state after a delta. It is the session's whatever
    // Redis then held, so it stands even after a gap.
    let mut known: Option<Digest> = None;
    while let Some(job) = rx.recv().await {
        match job {
            Job::Delta { before, after, event } => {
                if status.behind.load(Ordering::Acquire) {
                    continue;
                }
                let base = match known.filter(|d| d.seq() == before.seq()) {
                    Some(digest) => Ok(Some(digest)),
                    None => redis.digest_at(&key, before.seq()).await,
                };
                let base = match base {
                    Ok(Some(base)) => base,
                    Ok(None) => {
                        tracing::debug!(session = %key, prev = before.seq(), "the redis copy is not at the delta's predecessor; a snapshot will follow");
                        status.missed(after.seq());
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(session = %key, error = %e, "redis projection failed; the session will catch up with a snapshot");
                        status.missed(after.seq());
                        continue;
                    }
                };
                match redis.apply(&key, &base, &before, &after, &event).await {
                    Ok((outcome, digest)) => {
                        known = Some(digest);
                        if let DeltaOutcome::Gap { stored } = outcome {
                            tracing::debug!(session = %key, stored, prev = before.seq(), "redis copy has a gap; a snapshot will follow");
                            status.missed(after.seq());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(session = %key, error = %e, "redis projection failed; the session will catch up with a snapshot");
                        known = None;
                        status.missed(after.seq());
                    }
                }
            }
            Job::Snapshot { state, mode } => {
                let result = redis.write_snapshot(&key, &state, mode).await;
                // Cleared only now, so writes during the snapshot queue
                // deltas behind it rather than another snapshot.
                status.snapshot_queued.store(false, Ordering::Release);
                match result {
                    Ok((written, digest)) => {
                        tracing::debug!(session = %key, seq = state.seq(), written, ?mode, "redis copy caught up");
                        known = Some(digest);
                        status.failures.store(0, Ordering::Release);
                        status.caught_up(state.seq());
                        crate::stats::projection_caught_up();
                    }
                    Err(e) => {
                        tracing::warn!(session = %key, error = %e, "redis snapshot failed; will retry");
                        known = None;
                        status.failures.fetch_add(1, Ordering::AcqRel);
                        status.missed(state.seq());
                    }
                }
            }
        }
    }
}

/// The part of a state a delta projection reads, taken before the event is
/// applied and after: what the event touches (its keys, or the creds) and
/// the session's metadata. Cloning the whole state instead would copy every
/// key of the session on every write; this clones only handles on the
/// touched values.
pub(crate) fn image(state: &SessionState, event: &Event) -> SessionState {
    let creds = if event.touches_creds() { state.creds().cloned() } else { None };
    let keys = event.touched_keys().into_iter().filter_map(|(ty, id)| state.get_keys(ty, [id]).pop().map(|(id, v)| (ty.clone(), id, v)));
    SessionState::from_parts(state.seq(), creds, keys, state.updated_at_ms(), state.events())
}

#[cfg(test)]
mod tests {
    //! The projector against a real redis-server, paused with `CLIENT PAUSE`
    //! so that a snapshot is in flight while the queue overflows.

    use std::time::{Duration, Instant};

    use bstore_codec::{Codec, Keyring};
    use bstore_domain::{Command, KeyChanges, KeyId, KeyType, Limits, SessionKey, SessionState};
    use bstore_redis::{RedisConfig, RedisProjection, SnapshotMode};
    use bstore_testkit::RedisServer;
    use bytes::Bytes;

    use super::{Projector, image};

    /// Writes key `k<i>` as the actor does; returns the image before the
    /// event, and the event.
    fn write(st: &mut SessionState, i: u8) -> (SessionState, bstore_domain::Event) {
        let mut keys = KeyChanges::new();
        keys.entry(KeyType::parse("session").unwrap())
            .or_default()
            .insert(KeyId::parse(&format!("k{i}")).unwrap(), Some(Bytes::from(vec![i])));
        let event = st.handle(Command::SetKeys { keys }, &Limits::default(), 1, None).unwrap().expect("a change");
        let before = image(st, &event);
        st.apply(st.seq() + 1, &event).unwrap();
        (before, event)
    }

    #[test]
    fn a_projection_lost_while_an_older_snapshot_is_written_keeps_the_copy_behind() {
        let server = RedisServer::start();
        actix::System::new().block_on(async move {
            let cfg = RedisConfig { url: Some(server.url()), queue: 2, timeout: Duration::from_secs(5), ..Default::default() };
            let redis = RedisProjection::new(cfg, Codec::new(Keyring::new(vec![(1, [7u8; 32])], None).unwrap())).unwrap();
            let key = SessionKey::parse("t", "p1").unwrap();
            let p = Projector::start(key.clone(), redis.clone());

            let mut st = SessionState::default();
            write(&mut st, 1);
            // Redis stops answering for a moment: the snapshot of seq 1 is
            // taken by the task and waits.
            let mut conn = redis.connection();
            let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(600).query_async(&mut conn).await.unwrap();
            p.snapshot(&st, SnapshotMode::Guarded);
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Four writes meanwhile: two deltas fit the queue, two are lost.
            for i in 2..=5u8 {
                let (before, event) = write(&mut st, i);
                p.after_write(before, &st, &event);
            }
            // The snapshot of seq 1 lands; it does not cover seq 4 and 5.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            assert!(p.is_behind(), "a snapshot older than a lost delta must not clear the session's behind mark");

            // The timer's catch-up brings the copy to the actor's sequence.
            p.catch_up(&st);
            let start = Instant::now();
            while redis.stored_seq(&key).await.unwrap() != Some(5) || p.is_behind() {
                assert!(start.elapsed() < Duration::from_secs(10), "the copy did not catch up: {:?}", redis.stored_seq(&key).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(redis.load(&key).await.unwrap(), Some(st), "the copy is believed");
        });
    }

    async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let start = Instant::now();
        while !done().await {
            assert!(start.elapsed() < Duration::from_secs(10), "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn a_projector_without_the_digest_takes_the_manifests_or_else_writes_a_snapshot() {
        let server = RedisServer::start();
        actix::System::new().block_on(async move {
            let cfg = RedisConfig { url: Some(server.url()), ..Default::default() };
            let redis = RedisProjection::new(cfg, Codec::new(Keyring::new(vec![(1, [7u8; 32])], None).unwrap())).unwrap();
            let key = SessionKey::parse("t", "p2").unwrap();
            let mut st = SessionState::default();
            write(&mut st, 1);
            redis.write_snapshot(&key, &st, SnapshotMode::Guarded).await.unwrap();

            // A new actor loaded that copy: its projector has never seen a
            // digest, and goes on with deltas from the copy's manifest.
            let p = Projector::start(key.clone(), redis.clone());
            for i in 2..=4u8 {
                let (before, event) = write(&mut st, i);
                p.after_write(before, &st, &event);
            }
            until("the deltas were not projected", async || redis.stored_seq(&key).await.unwrap() == Some(4)).await;
            assert_eq!(p.status.missed.load(std::sync::atomic::Ordering::SeqCst), 0, "no delta fell back to a snapshot");
            assert_eq!(redis.load(&key).await.unwrap(), Some(st.clone()), "the copy is believed");

            // The copy is gone (a flushed cache) under a projector that has
            // no digest: it cannot write a delta, so it writes a snapshot.
            redis.remove(&key).await.unwrap();
            let p = Projector::start(key.clone(), redis.clone());
            let (before, event) = write(&mut st, 5);
            p.after_write(before, &st, &event);
            until("the session was not marked behind", async || p.is_behind()).await;
            assert_eq!(redis.stored_seq(&key).await.unwrap(), None, "no delta was written blind");
            p.catch_up(&st);
            until("the copy did not catch up", async || redis.stored_seq(&key).await.unwrap() == Some(5) && !p.is_behind()).await;
            assert_eq!(redis.load(&key).await.unwrap(), Some(st), "the copy is believed");
        });
    }
}
