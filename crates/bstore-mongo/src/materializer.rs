//! The loop: pull a batch from the durable consumer, write it, then ack.
//!
//! Events are acknowledged only after Mongo accepted the whole batch; while
//! Mongo fails the batch is retried with a growing pause (and JetStream is
//! told the events are still in progress), so nothing is skipped and the lag
//! simply grows. An event redelivered after a lost ack is written again and
//! changes nothing.
//!
//! Several instances may run this loop on the same durable consumer: each
//! fetches its own batches, so events of one session can be applied by two
//! instances at once and out of order, and a batch whose ack wait passed can
//! be applied by two at once. [`Store::apply`] is written for that; nothing
//! here assumes one instance. The checkpoint kept in Mongo is the
//! consumer's ack floor, which every instance's acks move.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer};
use bstore_codec::Codec;
use bstore_domain::delta::Delta;
use bstore_domain::{Change, KeyId, KeyType, SessionKey, SessionState};
use bstore_log::{EventLog, LogConfig};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::store::{ID_SEP, KeyValueAt, LoggedEvent, Store, key_doc_id, sid};
use crate::{MongoConfig, MongoError};

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
    let mut s = js.get_stream(stream).await.map_err(nats)?;
    let last_seq = s.info().await.map_err(nats)?.state.last_sequence;
    let applied_seq = match s.get_consumer::<consumer::pull::Config>(consumer).await {
        Ok(mut c) => c.info().await.map_err(nats)?.ack_floor.stream_sequence,
        Err(_) => 0,
    };
    Ok(Lag { last_seq, applied_seq })
}

/// The materializer. Run it with [`Materializer::run`]; ask its lag with
/// [`Materializer::lag`].
#[derive(Clone)]
pub struct Materializer {
    store: Store,
    js: jetstream::Context,
    log: LogConfig,
    cfg: MongoConfig,
    codec: Codec,
    applied: Arc<AtomicU64>,
}

impl Materializer {
    /// A materializer of the stream `log` describes into `store`.
    pub fn new(client: async_nats::Client, log: LogConfig, cfg: MongoConfig, store: Store, codec: Codec) -> Self {
        let mut js = jetstream::new(client);
        js.set_timeout(log.request_timeout);
        Self { store, js, log, cfg, codec, applied: Arc::new(AtomicU64::new(0)) }
    }

    /// Turns every patched value of `events` into the whole value it stands
    /// for. The base of a patch is the key's value from an earlier event of
    /// the same batch, else the value its Mongo document holds; a document
    /// already at or past the event means the event was applied before (a
    /// redelivery) and the patch is dropped. When the base is missing or is
    /// not the one the patch was made against (the patch checks), the
    /// session is replayed from the log up to the event — slow, and only
    /// needed when Mongo lost or never had the previous value.
    pub async fn resolve_patches(&self, events: &[LoggedEvent]) -> Result<Vec<LoggedEvent>, MongoError> {
        let mut events: Vec<LoggedEvent> = events.to_vec();
        events.sort_by_key(|e| e.seq);
        let wanted: Vec<(SessionKey, KeyType, KeyId)> = events
            .iter()
            .flat_map(|e| match &e.event.change {
                Change::KeysChanged { patched, .. } => patched
                    .iter()
                    .flat_map(|(t, ids)| ids.keys().map(move |i| (e.session.clone(), t.clone(), i.clone())))
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            })
            .collect();
        if wanted.is_empty() {
            return Ok(events);
        }
        let stored = self.store.values_of(&wanted).await?;
        // Values as of the event being resolved: what earlier events of the
        // batch left, by document id, with the sequence that left them
        // (`None`: deleted).
        let mut in_batch: HashMap<String, KeyValueAt> = HashMap::new();
        for e in &mut events {
            let sid = sid(&e.session);
            let Change::KeysChanged { keys, patched } = &mut e.event.change else {
                if matches!(e.event.change, Change::SessionDeleted) {
                    let prefix = format!("{sid}{ID_SEP}");
                    in_batch.retain(|id, _| !id.starts_with(&prefix));
                    for id in stored.keys().filter(|id| id.starts_with(&prefix)) {
                        in_batch.insert(id.clone(), (e.seq, None));
                    }
                }
                continue;
            };
            for (ty, ids) in std::mem::take(patched) {
                for (kid, delta) in ids {
                    let doc_id = key_doc_id(&sid, &ty, &kid);
                    let mongo = stored.get(&doc_id);
                    if mongo.is_some_and(|(seq, _)| *seq >= e.seq) && !in_batch.contains_key(&doc_id) {
                        continue; // applied before: the guard would drop it anyway
                    }
                    // With several instances, the batch and Mongo may each
                    // hold an older value than the one just before this
                    // event (another instance has the events between): the
                    // newer of the two is tried first, and the patch checks
                    // which one it was made against.
                    let mut bases: Vec<&KeyValueAt> =
                        in_batch.get(&doc_id).into_iter().chain(mongo.filter(|(seq, _)| *seq < e.seq)).collect();
                    bases.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
                    let new = match bases.iter().find_map(|(_, v)| v.as_deref().and_then(|b| delta.apply(b).ok())) {
                        Some(new) => new,
                        None => self.value_from_log(&e.session, e.seq, &ty, &kid, &delta).await?,
                    };
                    keys.entry(ty.clone()).or_default().insert(kid, Some(new));
                }
            }
            for (ty, ids) in keys.iter() {
                for (kid, value) in ids {
                    in_batch.insert(key_doc_id(&sid, ty, kid), (e.seq, value.clone()));
                }
            }
        }
        Ok(events)
    }

    /// The value a patch at `seq` produces, computed from the session as the
    /// log has it just before `seq`.
    async fn value_from_log(&self, session: &SessionKey, seq: u64, ty: &KeyType, kid: &KeyId, delta: &Delta) -> Result<Bytes, MongoError> {
        tracing::info!(%session, seq, key = %format!("{ty}/{kid}"), "patch base not in mongo; replaying the session from the log");
        let log = EventLog::attach(self.js.clone(), self.log.clone(), self.codec.clone());
        let mut state = SessionState::default();
        let mut failed = None;
        log.replay(session, 0, |s, event| {
            if s < seq
                && failed.is_none()
                && let Err(e) = state.apply(s, &event)
            {
                failed = Some(e);
            }
        })
        .await
        .map_err(|e| MongoError::Stream(e.to_string()))?;
        if let Some(e) = failed {
            return Err(MongoError::Unreadable(e.to_string()));
        }
        let base = state.get_keys(ty, [kid]).pop().map(|(_, v)| v);
        base.and_then(|b| delta.apply(&b).ok()).ok_or_else(|| {
            MongoError::Unreadable(format!("event {seq} of {session} patches {ty}/{kid}, which the log does not hold as patched"))
        })
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
        self.applied.load(Ordering::Acquire)
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

    /// Materializes until the lag is 0 once, then returns. For `rebuild`.
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
    /// the whole log.
    async fn consumer(&self) -> Result<consumer::PullConsumer, MongoError> {
        let stream = self.js.get_stream(&self.log.stream).await.map_err(nats)?;
        if let Ok(c) = stream.get_consumer(&self.cfg.consumer).await {
            return Ok(c);
        }
        let checkpoint = self.store.checkpoint(&self.cfg.consumer).await.unwrap_or(0);
        let deliver_policy = match checkpoint {
            0 => consumer::DeliverPolicy::All,
            n => consumer::DeliverPolicy::ByStartSequence { start_sequence: n + 1 },
        };
        tracing::info!(consumer = %self.cfg.consumer, from = checkpoint + 1, "creating the materializer's durable consumer");
        let config = consumer::pull::Config {
            durable_name: Some(self.cfg.consumer.clone()),
            description: Some("baileys-store mongo materializer".into()),
            filter_subject: format!("{}.>", self.log.subject_prefix),
            deliver_policy,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.cfg.ack_wait,
            max_ack_pending: (self.cfg.batch_size.max(1) * 4) as i64,
            max_batch: self.cfg.batch_size.max(1) as i64,
            ..Default::default()
        };
        stream.get_or_create_consumer(&self.cfg.consumer, config).await.map_err(nats)
    }

    /// Fetches one batch, writes it (retrying until Mongo accepts it), and
    /// acknowledges it. Returns how many messages came.
    async fn step(&self, consumer: &consumer::PullConsumer) -> Result<usize, MongoError> {
        let mut batch =
            consumer.batch().max_messages(self.cfg.batch_size.max(1)).expires(self.cfg.batch_wait).messages().await.map_err(nats)?;
        let mut messages = Vec::new();
        while let Some(m) = batch.next().await {
            messages.push(m.map_err(nats)?);
        }
        if messages.is_empty() {
            return Ok(0);
        }
        let mut events = Vec::with_capacity(messages.len());
        let mut good = Vec::with_capacity(messages.len());
        for m in &messages {
            match self.decode(m) {
                Ok(e) => {
                    events.push(e);
                    good.push(m);
                }
                // Left unacknowledged: it comes back after the ack wait, the
                // lag stays above 0, and the error repeats until an operator
                // acts (a missing key in the keyring, typically).
                Err(e) => tracing::error!(subject = %m.subject, error = %e, "cannot materialize an event; leaving it unacknowledged"),
            }
        }
        let max_seq = events.iter().map(|e| e.seq).max().unwrap_or(0);
        let write = async {
            let mut pause = Backoff::new(self.cfg.retry_max);
            loop {
                let written = async {
                    let events = self.resolve_patches(&events).await?;
                    self.store.apply(&events).await
                }
                .await;
                match written {
                    Ok(applied) => {
                        tracing::debug!(?applied, max_seq, "batch materialized");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, events = events.len(), "writing a batch to mongo failed; retrying");
                        pause.wait().await;
                    }
                }
            }
        };
        // While the batch is being written (or retried), JetStream is told
        // it is in progress, so that it is not delivered to another instance
        // after the ack wait. That would still be correct — every write is
        // guarded — but it would be done twice.
        tokio::pin!(write);
        let mut keep_alive = tokio::time::interval((self.cfg.ack_wait / 3).max(Duration::from_millis(100)));
        keep_alive.tick().await;
        loop {
            tokio::select! {
                _ = &mut write => break,
                _ = keep_alive.tick() => {
                    for m in &good {
                        let _ = m.ack_with(AckKind::Progress).await;
                    }
                }
            }
        }
        for m in good {
            if let Err(e) = m.ack().await {
                // The event will come again and change nothing.
                tracing::debug!(error = %e, "ack lost");
            }
        }
        self.applied.fetch_max(max_seq, Ordering::AcqRel);
        self.save_checkpoint(consumer).await;
        Ok(messages.len())
    }

    /// Records the consumer's ack floor in Mongo. Not the batch's highest
    /// sequence: with several instances, or an event left unacknowledged,
    /// events below it may not be applied yet, and a consumer made again
    /// from it would skip them. Every event up to the ack floor was
    /// acknowledged, so applied. (Acks are asynchronous: the floor read may
    /// not include this batch yet; a later batch records it.)
    async fn save_checkpoint(&self, consumer: &consumer::PullConsumer) {
        let floor = match consumer.get_info().await {
            Ok(info) => info.ack_floor.stream_sequence,
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

    fn decode(&self, m: &jetstream::Message) -> Result<LoggedEvent, MongoError> {
        let seq = m.info().map_err(|e| MongoError::Unreadable(e.to_string()))?.stream_sequence;
        let session = session_of(&self.log.subject_prefix, &m.subject)
            .ok_or_else(|| MongoError::Unreadable(format!("subject {} names no session", m.subject)))?;
        let event =
            self.codec.decode_event(&session, &m.payload).map_err(|e| MongoError::Unreadable(format!("event {seq} of {session}: {e}")))?;
        Ok(LoggedEvent { seq, session, event })
    }
}

/// The session a subject `<prefix>.<tenant>.<session>` belongs to.
pub fn session_of(prefix: &str, subject: &str) -> Option<SessionKey> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (tenant, session) = rest.split_once('.')?;
    SessionKey::parse(tenant, session).ok()
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
