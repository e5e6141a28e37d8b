//! The loop: pull a batch from the durable consumer, write it, then ack.
//!
//! Events are acknowledged only after Mongo accepted the whole batch; while
//! Mongo fails the batch is retried with a growing pause (and JetStream is
//! told the events are still in progress), so nothing is skipped and the lag
//! simply grows. An event redelivered after a lost ack is written again and
//! changes nothing. An event that fails for good is quarantined instead
//! (recorded, then acknowledged: `quarantine.rs`), so that it holds up
//! neither its batch nor delivery; one of a newer schema than this build
//! reads is handed back for an upgraded instance until its last delivery
//! (`mongo.max_deliver`).
//!
//! Several instances may run this loop on the same durable consumer: each
//! fetches its own batches, so events of one session can be applied by two
//! instances at once and out of order, and a batch whose ack wait passed can
//! be applied by two at once. [`Store::apply`] is written for that; nothing
//! here assumes one instance. The checkpoint kept in Mongo is the
//! consumer's ack floor, which every instance's acks move.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bstore_codec::Codec;
use bstore_domain::delta::Delta;
use bstore_domain::{Change, KeyId, KeyType, SessionKey};
use bstore_log::{Delivered, Durable, DurableConfig, EventLog, LogConfig, LogError};
use bytes::Bytes;

use crate::plan::{Base, KeyPlace, Seen, displaced};
use crate::store::{Applied, LoggedEvent, Store};
use crate::{MongoConfig, MongoError, QuarantineKind, Quarantined};

/// How many times Mongo refuses an event's write before it is quarantined
/// (a refusal that was in fact passing gets two more chances).
const REFUSALS_BEFORE_QUARANTINE: u32 = 3;

/// How far the materializer is behind the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    /// The stream's last sequence.
    pub last_seq: u64,
    /// Every event up to this sequence is applied and acknowledged (the
    /// consumer's ack floor).
    pub applied_seq: u64,
}

impl Lag {
    /// Sequences not yet applied.
    pub fn events(&self) -> u64 {
        self.last_seq.saturating_sub(self.applied_seq)
    }
}

/// Asks JetStream how far `consumer` is behind `stream`. Needs only NATS, so
/// it answers while Mongo is down.
pub async fn lag(js: &jetstream::Context, stream: &str, consumer: &str) -> Result<Lag, MongoError> {
    let (last_seq, applied_seq) = bstore_log::durable_lag(js, stream, consumer).await.map_err(nats)?;
    Ok(Lag { last_seq, applied_seq })
}

/// What one materializer process did since it started, for metrics. The
/// `quarantine` collection keeps the records themselves, across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// The highest sequence this process applied.
    pub applied_seq: u64,
    /// Events quarantined: skipped for good, recorded and acknowledged.
    pub quarantined_events: u64,
    /// Key documents found unreadable when a patch needed their value (the
    /// value was taken from the log).
    pub unreadable_documents: u64,
    /// Deliveries handed back for another instance: events of a newer
    /// schema than this build reads.
    pub deferred_events: u64,
    /// Events of erased sessions from before their erasure (unreadable by
    /// design), acknowledged without being applied: the erasure's marker,
    /// which follows them, clears the session.
    pub erased_events: u64,
}

#[derive(Default)]
struct Counters {
    applied_seq: AtomicU64,
    quarantined_events: AtomicU64,
    unreadable_documents: AtomicU64,
    deferred_events: AtomicU64,
    erased_events: AtomicU64,
}

/// The materializer. Run it with [`Materializer::run`]; ask its lag with
/// [`Materializer::lag`].
#[derive(Clone)]
pub struct Materializer {
    pub(crate) store: Store,
    js: jetstream::Context,
    log: LogConfig,
    pub(crate) cfg: MongoConfig,
    codec: Codec,
    /// The log, for the sessions' data keys.
    pub(crate) events: EventLog,
    counters: Arc<Counters>,
}

/// What [`Materializer::write_batch`] did.
struct Written {
    applied: Applied,
    set_aside: Vec<Quarantined>,
}

impl Materializer {
    /// A materializer of the stream `log` describes into `store`.
    pub fn new(client: async_nats::Client, log: LogConfig, cfg: MongoConfig, store: Store, codec: Codec) -> Self {
        let mut js = jetstream::new(client);
        js.set_timeout(log.request_timeout);
        let events = EventLog::attach(js.clone(), log.clone(), codec.clone());
        Self { store, js, log, cfg, codec, events, counters: Arc::default() }
    }

    /// Writes `events` (whole values or patches): reads what the batch needs
    /// once ([`Store::read`]), refuses the events out of their place in the
    /// log (passed over, not applied), turns patches into whole values, and
    /// writes. Returns what was written and what was set aside for good:
    /// events refused, events whose patch fits nothing the log holds, and
    /// key documents that did not open. An error is transient, or a write
    /// Mongo refused ([`MongoError::Refused`], naming its event).
    async fn write_batch(&self, events: &[LoggedEvent]) -> Result<Written, MongoError> {
        let seen = self.store.read(events).await?;
        let (events, displaced) = displaced(events.to_vec(), &seen);
        let mut set_aside: Vec<Quarantined> =
            displaced.iter().map(|d| Quarantined::event(&self.subject(&d.session), Some(&d.session), d.seq, d.reason.clone())).collect();
        let events = self.resolve_patches(&events, &seen, &mut set_aside).await?;
        let applied = self.store.write(&events, &displaced, &seen).await?;
        Ok(Written { applied, set_aside })
    }

    /// Turns every patched value of `events` into the whole value it stands
    /// for. The base of a patch is the key's value from an earlier event of
    /// the same batch, else the value its Mongo document holds (as `seen`
    /// read it); a document already at or past the event means the event
    /// was applied before (a redelivery) and the patch is dropped. When the
    /// base is missing, does not open (the document is then recorded in
    /// `set_aside`), or is not the one the patch was made against (the patch
    /// checks), the session is replayed from the log up to the event — slow,
    /// and only needed when Mongo lost or never had the previous value. An
    /// event whose patch fits nothing the log holds either is left out and
    /// recorded in `set_aside`.
    async fn resolve_patches(
        &self,
        events: &[LoggedEvent],
        seen: &Seen,
        set_aside: &mut Vec<Quarantined>,
    ) -> Result<Vec<LoggedEvent>, MongoError> {
        let mut events: Vec<LoggedEvent> = events.to_vec();
        events.sort_by_key(|e| e.seq);
        if !events.iter().any(
            |e| matches!(&e.event.change, Change::KeysChanged { patched, .. } | Change::Restored { patched, .. } if !patched.is_empty()),
        ) {
            return Ok(events);
        }
        let mut out = Vec::with_capacity(events.len());
        let mut unreadable_noted = HashSet::new();
        // Values as of the event being resolved: what earlier events of the
        // batch left, with the sequence that left them (`None`: deleted).
        let mut in_batch: HashMap<KeyPlace, (u64, Option<Bytes>)> = HashMap::new();
        'events: for mut e in events {
            let (Change::KeysChanged { keys, patched } | Change::Restored { keys, patched, .. }) = &mut e.event.change else {
                if matches!(e.event.change, Change::SessionDeleted) {
                    in_batch.retain(|(s, _, _), _| *s != e.session);
                    for place in seen.bases.keys().filter(|(s, _, _)| *s == e.session) {
                        in_batch.insert(place.clone(), (e.seq, None));
                    }
                }
                out.push(e);
                continue;
            };
            let mut resolved = Vec::new();
            for (ty, ids) in std::mem::take(patched) {
                for (kid, delta) in ids {
                    let place = (e.session.clone(), ty.clone(), kid.clone());
                    let mark = seen.keys.get(&place);
                    if mark.is_some_and(|m| m.seq >= e.seq) && !in_batch.contains_key(&place) {
                        continue; // applied before: the guard would drop it anyway
                    }
                    let stored = match seen.bases.get(&place) {
                        Some(Base::Value(v)) => mark.filter(|m| m.seq < e.seq).map(|m| (m.seq, Some(v.clone()))),
                        Some(Base::Unreadable(why)) => {
                            if unreadable_noted.insert(place.clone()) {
                                let tag = self.codec.id_tag(&e.session, &ty, &kid);
                                let reason = format!("the key document does not open ({why}); its value was taken from the log");
                                set_aside.push(Quarantined::document(
                                    &self.subject(&e.session),
                                    &e.session,
                                    e.seq,
                                    ty.as_str(),
                                    tag,
                                    reason,
                                ));
                            }
                            None
                        }
                        None => None,
                    };
                    // With several instances, the batch and Mongo may each
                    // hold an older value than the one just before this
                    // event (another instance has the events between): the
                    // newer of the two is tried first, and the patch checks
                    // which one it was made against.
                    let mut bases: Vec<&(u64, Option<Bytes>)> = in_batch.get(&place).into_iter().chain(stored.as_ref()).collect();
                    bases.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
                    let new = match bases.iter().find_map(|(_, v)| v.as_deref().and_then(|b| delta.apply(b).ok())) {
                        Some(new) => new,
                        None => match self.value_from_log(&e.session, e.seq, &ty, &kid, &delta).await {
                            Ok(new) => new,
                            Err(MongoError::Unreadable(reason)) => {
                                set_aside.push(Quarantined::event(&self.subject(&e.session), Some(&e.session), e.seq, reason));
                                continue 'events;
                            }
                            Err(other) => return Err(other),
                        },
                    };
                    resolved.push((ty.clone(), kid, new));
                }
            }
            for (ty, kid, new) in resolved {
                keys.entry(ty).or_default().insert(kid, Some(new));
            }
            for (ty, ids) in keys.iter() {
                for (kid, value) in ids {
                    in_batch.insert((e.session.clone(), ty.clone(), kid.clone()), (e.seq, value.clone()));
                }
            }
            out.push(e);
        }
        Ok(out)
    }

    /// The value a patch at `seq` produces, computed from the session as the
    /// log has it just before `seq`. [`MongoError::Unreadable`]: it never
    /// will be (the log cannot be replayed, or the patch fits nothing it
    /// holds), said without naming the key.
    async fn value_from_log(&self, session: &SessionKey, seq: u64, ty: &KeyType, kid: &KeyId, delta: &Delta) -> Result<Bytes, MongoError> {
        tracing::info!(%session, seq, key = %format!("{ty}/{kid}"), "patch base not in mongo; folding the session from the log");
        let log = &self.events;
        // The session just before the event: from its newest snapshot
        // before it, plus the events between.
        let state = match log.fold(session, Some(seq - 1), true, &mut |_, _| {}).await {
            Ok((state, _, _)) => state,
            Err(LogError::Unavailable(e)) => return Err(MongoError::Stream(e)),
            Err(e @ LogError::Unfit { .. }) => {
                tracing::warn!(%session, seq, error = %e, "the session's log does not replay");
                return Err(MongoError::Unreadable(
                    "a patch needs the session replayed from the log, where an event does not apply".into(),
                ));
            }
            Err(e) => return Err(MongoError::Unreadable(format!("a patch needs the session replayed from the log, which fails: {e}"))),
        };
        let base = state.get_keys(ty, [kid]).pop().map(|(_, v)| v);
        base.and_then(|b| delta.apply(&b).ok())
            .ok_or_else(|| MongoError::Unreadable(format!("it patches a {ty} key that the log does not hold as patched")))
    }

    /// The Mongo side.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How far behind the log it is.
    pub async fn lag(&self) -> Result<Lag, MongoError> {
        lag(&self.js, &self.log.stream, &self.cfg.consumer).await
    }

    /// The highest sequence this process has applied.
    pub fn applied_seq(&self) -> u64 {
        self.counters.applied_seq.load(Ordering::Acquire)
    }

    /// What this process did since it started.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            applied_seq: c.applied_seq.load(Ordering::Acquire),
            quarantined_events: c.quarantined_events.load(Ordering::Relaxed),
            erased_events: c.erased_events.load(Ordering::Relaxed),
            unreadable_documents: c.unreadable_documents.load(Ordering::Relaxed),
            deferred_events: c.deferred_events.load(Ordering::Relaxed),
        }
    }

    fn subject(&self, session: &SessionKey) -> String {
        format!("{}.{}.{}", self.log.subject_prefix, session.tenant, session.session)
    }

    /// Materializes until `shutdown` resolves. Mongo and NATS failures are
    /// waited out, never returned.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        tokio::select! {
            _ = &mut shutdown => {}
            _ = self.work(None) => {}
        }
        tracing::info!("materializer stopped");
    }

    /// Materializes until the lag is 0 once, then returns (the benchmark's
    /// measure of throughput).
    pub async fn drain(&self) -> Result<(), MongoError> {
        self.work(Some(())).await
    }

    async fn work(&self, until_caught_up: Option<()>) -> Result<(), MongoError> {
        let mut pause = Backoff::new(self.cfg.retry_max);
        while let Err(e) = self.store.ensure_indexes().await {
            tracing::warn!(error = %e, "creating the mongo indexes failed; retrying");
            pause.wait().await;
        }
        let mut consumer = None;
        let mut last_lag_log = Instant::now();
        loop {
            if last_lag_log.elapsed() >= self.cfg.lag_log_interval {
                last_lag_log = Instant::now();
                match self.lag().await {
                    Ok(lag) => {
                        tracing::info!(lag = lag.events(), last_seq = lag.last_seq, applied_seq = lag.applied_seq, "materializer lag")
                    }
                    Err(e) => tracing::warn!(error = %e, "could not read the materializer lag"),
                }
            }
            let c = match &consumer {
                Some(c) => c,
                None => match self.consumer().await {
                    Ok(c) => consumer.insert(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach the event stream's consumer; retrying");
                        pause.wait().await;
                        continue;
                    }
                },
            };
            match self.step(c).await {
                Ok(0) if until_caught_up.is_some() => {
                    if self.lag().await?.events() == 0 {
                        return Ok(());
                    }
                }
                Ok(_) => pause.reset(),
                Err(e) => {
                    tracing::warn!(error = %e, "fetching from the event stream failed; retrying");
                    consumer = None;
                    pause.wait().await;
                }
            }
        }
    }

    /// The durable consumer, created when missing — from the checkpoint kept
    /// in Mongo if there is one, so a lost consumer does not mean a replay of
    /// the whole log. One made by an earlier release, without a bound on
    /// redeliveries, is given `mongo.max_deliver`.
    pub(crate) async fn consumer(&self) -> Result<Durable, MongoError> {
        let cfg = DurableConfig {
            name: self.cfg.consumer.clone(),
            description: "baileys-store mongo materializer".into(),
            ack_wait: self.cfg.ack_wait,
            max_deliver: self.max_deliver(),
            batch: self.cfg.batch_size.max(1),
            batch_wait: self.cfg.batch_wait,
        };
        self.events.durable(&cfg, || async { self.store.checkpoint(&self.cfg.consumer).await.unwrap_or(0) }).await.map_err(nats)
    }

    fn max_deliver(&self) -> i64 {
        self.cfg.max_deliver.max(1)
    }

    /// Fetches one batch, writes it (retrying while Mongo fails), records
    /// what fails for good in quarantine, and acknowledges the batch.
    /// Returns how many messages came.
    async fn step(&self, consumer: &Durable) -> Result<usize, MongoError> {
        let messages = consumer.fetch(&self.events).await.map_err(nats)?;
        if messages.is_empty() {
            return Ok(0);
        }
        let mut events = Vec::with_capacity(messages.len());
        let mut set_aside = Vec::new();
        // Messages this call acknowledges, by sequence.
        let mut pending: HashMap<u64, &Delivered> = HashMap::new();
        for m in &messages {
            let delivered = m.delivered;
            let last_delivery = delivered >= self.max_deliver();
            let decoded = match &m.event {
                Ok((session, event)) => Ok(LoggedEvent { seq: m.seq, session: session.clone(), event: event.clone() }),
                Err(u) => Err(u),
            };
            match decoded {
                // Each delivery before this one failed to finish: an event
                // that makes an instance die, or hang past the ack wait.
                Ok(e) if last_delivery => {
                    let reason = format!("delivered {delivered} times without being acknowledged");
                    set_aside.push(Quarantined::event(&m.subject, Some(&e.session), e.seq, reason));
                    pending.insert(e.seq, m);
                }
                Ok(e) => {
                    pending.insert(e.seq, m);
                    events.push(e);
                }
                Err(u) if u.erased => {
                    self.counters.erased_events.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(subject = %m.subject, seq = m.seq, "skipping an event erased with its session");
                    pending.insert(m.seq, m);
                }
                Err(u) if u.defer && !last_delivery => {
                    self.counters.deferred_events.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(subject = %m.subject, seq = m.seq, reason = %u.reason, delivered, "cannot read an event here; handing it back for another instance");
                    let _ = m.nak(self.cfg.ack_wait).await;
                }
                Err(u) => {
                    set_aside.push(Quarantined::event(&m.subject, u.session.as_ref(), m.seq, u.reason.clone()));
                    pending.insert(m.seq, m);
                }
            }
        }
        let write = async move {
            let mut pause = Backoff::new(self.cfg.retry_max);
            let mut refusals: HashMap<u64, u32> = HashMap::new();
            loop {
                match self.write_batch(&events).await {
                    Ok(written) => {
                        tracing::debug!(applied = ?written.applied, "batch materialized");
                        set_aside.extend(written.set_aside);
                        break;
                    }
                    // Mongo refuses one event's change for what it is: once
                    // that repeats, the rest of the batch is written without
                    // it.
                    Err(MongoError::Refused { seq: Some(seq), reason }) if events.iter().any(|e| e.seq == seq) => {
                        let refused = refusals.entry(seq).or_default();
                        *refused += 1;
                        if *refused < REFUSALS_BEFORE_QUARANTINE {
                            tracing::warn!(seq, %reason, "mongo refused a write of the batch; retrying");
                            pause.wait().await;
                            continue;
                        }
                        let i = events.iter().position(|e| e.seq == seq).expect("checked above");
                        let e = events.remove(i);
                        set_aside.push(Quarantined::event(&self.subject(&e.session), Some(&e.session), seq, reason));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, events = events.len(), "writing a batch to mongo failed; retrying");
                        pause.wait().await;
                    }
                }
            }
            // Recorded before anything is acknowledged: a quarantine that is
            // not recorded would be a silent skip.
            while let Err(e) = self.store.quarantine(&set_aside).await {
                tracing::warn!(error = %e, "recording quarantined records in mongo failed; retrying");
                pause.wait().await;
            }
            (events, set_aside)
        };
        // While the batch is being written (or retried), JetStream is told
        // it is in progress, so that it is not delivered to another instance
        // after the ack wait. That would still be correct — every write is
        // guarded — but it would be done twice.
        tokio::pin!(write);
        let mut keep_alive = tokio::time::interval((self.cfg.ack_wait / 3).max(Duration::from_millis(100)));
        keep_alive.tick().await;
        let (events, set_aside) = loop {
            tokio::select! {
                done = &mut write => break done,
                _ = keep_alive.tick() => {
                    for m in pending.values() {
                        let _ = m.progress().await;
                    }
                }
            }
        };
        for q in &set_aside {
            tracing::error!(subject = %q.subject, seq = q.seq, kind = ?q.kind, reason = %q.reason, "quarantined");
            let counter = match q.kind {
                QuarantineKind::Event => &self.counters.quarantined_events,
                QuarantineKind::Document => &self.counters.unreadable_documents,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        for m in pending.into_values() {
            // A quarantined event is acknowledged like the others once it is
            // recorded: never delivered again, and the ack floor (and so the
            // checkpoint) moves past it.
            if let Err(e) = m.ack().await {
                // The event will come again and change nothing.
                tracing::debug!(error = %e, "ack lost");
            }
        }
        let max_seq = events.iter().map(|e| e.seq).max().unwrap_or(0);
        self.counters.applied_seq.fetch_max(max_seq, Ordering::AcqRel);
        self.save_checkpoint(consumer).await;
        Ok(messages.len())
    }

    /// Records the consumer's ack floor in Mongo. Not the batch's highest
    /// sequence: with several instances, or an event left unacknowledged,
    /// events below it may not be applied yet, and a consumer made again
    /// from it would skip them. Every event up to the ack floor was
    /// acknowledged, so applied. (Acks are asynchronous: the floor read may
    /// not include this batch yet; a later batch records it.)
    async fn save_checkpoint(&self, consumer: &Durable) {
        let floor = match consumer.ack_floor().await {
            Ok(floor) => floor,
            Err(e) => {
                tracing::debug!(error = %e, "could not read the consumer's ack floor; checkpoint not moved");
                return;
            }
        };
        if floor > 0
            && let Err(e) = self.store.save_checkpoint(&self.cfg.consumer, floor).await
        {
            tracing::debug!(error = %e, "could not save the checkpoint; a later batch will");
        }
    }
}

struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self { next: Duration::from_millis(100), max }
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

fn nats(e: impl std::fmt::Display) -> MongoError {
    MongoError::Stream(e.to_string())
}
