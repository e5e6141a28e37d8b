//! The event log: the one place a write is decided.
//!
//! One JetStream stream holds every session's events, one subject per
//! session (`<subject_prefix>.<tenant>.<session>`). An append is fenced with
//! `Nats-Expected-Last-Subject-Sequence`, so a writer that has not seen the
//! session's latest event gets [`LogError::Conflict`] instead of overwriting
//! it, and carries `Nats-Msg-Id` from the client's request id, so a retried
//! request is stored once.
//!
//! Each event also seals the sequence it was fenced on (`Event::prev`), and
//! [`EventLog::replay`] checks it against the message that precedes it on the
//! subject ([`bstore_domain::chain`]): an event that is not where it was
//! written — a copy of an older one, published again by someone who may
//! write to the stream — is refused, logged and counted
//! ([`refused_events`]), never applied; one that names a predecessor the
//! replay never saw stops it ([`LogError::Broken`]). The stream denies
//! deleting messages and purging, so what was acknowledged stays.
//!
//! **Architecture invariant:** nothing but [`EventLog::append`] writes a
//! session's subject, and it writes only sealed events.

mod config;
mod datakeys;
mod durable;
mod fold;
mod listing;
mod retention;
mod snapshots;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, message::PublishMessage, stream};
use bstore_codec::{Codec, CodecError};
use bstore_domain::{Chain, Event, Link, Refusal, SessionKey};
use futures_util::StreamExt;

pub use config::{LogConfig, Storage};
pub use datakeys::{DATA_KEYS_BUCKET, Erasure};
pub use durable::{Delivered, Durable, DurableConfig, Undecoded, durable_lag, session_of};
pub use fold::{FoldStart, Folded};
pub use retention::Retained;
pub use snapshots::{COVERS_HEADER, SNAPSHOTS_KEPT, StoredSnapshot, skipped_snapshots};

/// Why the log could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Someone else appended to the session since the writer last looked.
    /// Nothing was stored.
    #[error("the session changed since it was loaded (expected last sequence {expected})")]
    Conflict {
        /// The sequence the writer expected to be last.
        expected: u64,
    },
    /// The event is larger than the stream or server accepts.
    #[error("the event is too large for the log: {0}")]
    TooLarge(String),
    /// JetStream did not answer or refused for a reason that may pass
    /// (no leader, time-out, connection lost). Retry.
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
    /// An event in the log could not be opened or decoded.
    #[error("event {seq} of {session} is unreadable: {source}")]
    Unreadable {
        /// The session.
        session: String,
        /// The event's stream sequence.
        seq: u64,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// An event does not follow the message before it: it names a
    /// predecessor the replay never saw (an event is missing), or the replay
    /// started after a sequence that is not the session's. The session's
    /// state cannot be vouched for.
    #[error("event {seq} of {session} does not follow sequence {last}: {what}")]
    Broken {
        /// The session.
        session: String,
        /// The event's stream sequence.
        seq: u64,
        /// The sequence of the message before it (or the replay's start).
        last: u64,
        /// What is wrong.
        what: String,
    },
    /// An event that is where it was written does not apply to the state
    /// the events before it build (a patch of a value the state does not
    /// hold): the log and the starting point disagree.
    #[error("event {seq} of {session} does not apply: {what}")]
    Unfit {
        /// The session.
        session: String,
        /// The event's stream sequence.
        seq: u64,
        /// What does not fit.
        what: String,
    },
}

/// What a checked replay hands over for each message of the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// The event is where it was written: apply it.
    Fits(Event),
    /// The event is not where it was written (already logged and counted):
    /// never apply it. The state's sequence still moves past it.
    Refused(Event, Refusal),
}

static REFUSED: AtomicU64 = AtomicU64::new(0);
static BROKEN: AtomicU64 = AtomicU64::new(0);

/// Events this process's replays refused because they were not where they
/// were written (copies of older events). A copy stays in the log, so it is
/// counted again by every replay that passes it.
pub fn refused_events() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Replays this process stopped because an event named a predecessor they
/// never saw ([`LogError::Broken`]).
pub fn broken_chains() -> u64 {
    BROKEN.load(Ordering::Relaxed)
}

/// The sealed bytes [`EventLog::append`] publishes for `event` appended after
/// sequence `expected_last`: the event with `prev` set to it, sealed for
/// `session`.
pub fn seal_appended(codec: &Codec, session: &SessionKey, expected_last: u64, event: &Event) -> Vec<u8> {
    codec.encode_event(session, &Event { prev: Some(expected_last), ..event.clone() })
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The stream sequence of the event.
    pub seq: u64,
    /// The log had already stored this request id: nothing new was written
    /// and `seq` is the original event's.
    pub duplicate: bool,
}

/// A handle on the event log. Cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    js: jetstream::Context,
    cfg: LogConfig,
    codec: Codec,
    /// The sessions' data keys (`datakeys.rs`), opened on first use.
    data_key_bucket: std::sync::Arc<tokio::sync::OnceCell<async_nats::jetstream::kv::Store>>,
}

impl EventLog {
    /// Connects to the stream, creating it when missing and bringing its
    /// settings in line with `cfg` when they differ.
    pub async fn open(client: async_nats::Client, cfg: LogConfig, codec: Codec) -> Result<Self, LogError> {
        let mut js = jetstream::new(client);
        js.set_timeout(cfg.request_timeout);
        let mut wanted = cfg.stream_config();
        let mut stream = js.get_or_create_stream(wanted.clone()).await.map_err(unavailable)?;
        let have = stream.info().await.map_err(unavailable)?.config.clone();
        if have.deny_purge && !wanted.deny_purge {
            return Err(LogError::Unavailable(format!(
                "stream.retention_secs is set, but the stream {} denies purges: it was made without a retention, and the server never lifts that. \
                 Keep retention_secs = 0, or move the history to a new stream made with the retention",
                wanted.name
            )));
        }
        if !have.deny_purge && wanted.deny_purge && have.metadata.contains_key(config::RETENTION_METADATA) {
            // Made with a retention. Denying purges cannot be undone, so a
            // process configured without one (a tool run with the defaults)
            // does not do it; it only says so. (A stream of an older release
            // allowed purges without this mark: it is brought in line.)
            tracing::warn!(stream = %wanted.name, "the event stream allows subject purges (it was made with a retention) but stream.retention_secs is 0 here");
            wanted.deny_purge = false;
        }
        if differs(&have, &wanted) {
            tracing::info!(stream = %wanted.name, "updating stream settings to match the configuration");
            js.update_stream(wanted).await.map_err(unavailable)?;
        }
        let snapshots = cfg.snapshot_stream_config();
        let mut stream = js.get_or_create_stream(snapshots.clone()).await.map_err(unavailable)?;
        let have = stream.info().await.map_err(unavailable)?.config.clone();
        if snapshots_differ(&have, &snapshots) {
            tracing::info!(stream = %snapshots.name, "updating stream settings to match the configuration");
            js.update_stream(snapshots).await.map_err(unavailable)?;
        }
        Ok(Self { js, cfg, codec, data_key_bucket: Default::default() })
    }

    /// A handle on a stream that already exists, without checking or
    /// changing its settings: for readers such as the materializer.
    pub fn attach(js: jetstream::Context, cfg: LogConfig, codec: Codec) -> Self {
        Self { js, cfg, codec, data_key_bucket: Default::default() }
    }

    /// The codec events are sealed with.
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// The configuration in force.
    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }

    /// The subject that holds `session`'s events.
    pub fn subject(&self, session: &SessionKey) -> String {
        format!("{}.{}.{}", self.cfg.subject_prefix, session.tenant, session.session)
    }

    /// Appends `event` if the session's last event is still `expected_last`
    /// (0: the session has no events). The stored event names
    /// `expected_last` as its predecessor (`prev`), whatever `event.prev`
    /// says: the fence makes that true.
    pub async fn append(&self, session: &SessionKey, expected_last: u64, event: &Event) -> Result<Appended, LogError> {
        self.key_for_write(session).await?;
        // Compressing and sealing a large event happens off the thread that
        // serves the other sessions.
        let payload = if event.value_bytes() < OFF_THREAD_BYTES {
            seal_appended(&self.codec, session, expected_last, event)
        } else {
            let (codec, session, event) = (self.codec.clone(), session.clone(), event.clone());
            tokio::task::spawn_blocking(move || seal_appended(&codec, &session, expected_last, &event))
                .await
                .map_err(|e| LogError::Unavailable(format!("sealing an event failed: {e}")))?
        };
        let mut msg = PublishMessage::build().payload(payload.into()).expected_last_subject_sequence(expected_last);
        if let Some(rid) = &event.rid {
            msg = msg.message_id(format!("{}.{}.{rid}", session.tenant, session.session));
        }
        self.publish(session, expected_last, msg).await
    }

    /// Appends `event` sealed under the ring even if the session has a data
    /// key: an erasure's marker. Fenced like [`EventLog::append`].
    async fn append_under_ring(&self, session: &SessionKey, expected_last: u64, event: &Event) -> Result<u64, LogError> {
        let payload = self.codec.encode_event_under_ring(session, &Event { prev: Some(expected_last), ..event.clone() });
        let msg = PublishMessage::build().payload(payload.into()).expected_last_subject_sequence(expected_last);
        Ok(self.publish(session, expected_last, msg).await?.seq)
    }

    async fn publish(&self, session: &SessionKey, expected_last: u64, msg: PublishMessage) -> Result<Appended, LogError> {
        let ack = self.js.send_publish(self.subject(session), msg).await.map_err(|e| publish_error(e, expected_last))?;
        let ack = ack.await.map_err(|e| publish_error(e, expected_last))?;
        Ok(Appended { seq: ack.sequence, duplicate: ack.duplicate })
    }

    /// Replays `session`'s events after sequence `after` (0: from the
    /// start), in order, calling `f` with each event that is where it was
    /// written and its sequence; events that are not are refused (see
    /// [`EventLog::replay_checked`]) and not handed over. Returns the
    /// sequence of the last message seen, refused ones included (or
    /// `after`): the sequence a state built from these events is at.
    pub async fn replay(&self, session: &SessionKey, after: u64, mut f: impl FnMut(u64, Event)) -> Result<u64, LogError> {
        self.replay_checked(session, after, |seq, replayed| {
            if let Replayed::Fits(event) = replayed {
                f(seq, event);
            }
        })
        .await
    }

    /// Like [`EventLog::replay`], handing over refused events too.
    ///
    /// `after` must be 0 or the sequence of one of the session's messages
    /// (the sequence of a state built from them is): the first message after
    /// it must name it as its predecessor. Each event is checked against the
    /// message before it ([`Chain`]). One that is not where it was written is
    /// logged at error level, counted ([`refused_events`]) and handed over as
    /// [`Replayed::Refused`]; the replay goes on. One that names a
    /// predecessor the replay never saw stops it with [`LogError::Broken`].
    ///
    /// A session that was erased is replayed from its erasure's marker on
    /// (`datakeys.rs`): what precedes it is skipped.
    pub async fn replay_checked(&self, session: &SessionKey, after: u64, mut f: impl FnMut(u64, Replayed)) -> Result<u64, LogError> {
        let after = self.replay_start(session, after).await?;
        let mut chain = Chain::after(after);
        let Some(mut tail) = self.tail(session, after).await? else { return Ok(after) };
        while let Some((seq, msg)) = tail.next().await? {
            let event = self.decode_fresh(session, seq, &msg.payload).await?;
            self.passed(session, &event);
            let mut link = chain.check(seq, &event);
            if link == Link::NeedPredecessor {
                // Only an unchained event read from the middle asks for this:
                // whether it may be a write of the previous release depends
                // on what precedes it. A chained predecessor says enough; an
                // unchained one says nothing of what came before it (it may
                // itself be a refused copy), so then the history up to it is
                // read.
                match self.event_at(session, after).await? {
                    Some(predecessor) if predecessor.prev.is_some() => chain.learn(&predecessor),
                    Some(_) => chain = self.chain_through(session, after, seq).await?,
                    None => return Err(not_a_message(session, seq, after)),
                }
                link = chain.check(seq, &event);
            }
            match link {
                Link::Fits => f(seq, Replayed::Fits(event)),
                Link::Refused(why) => {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(session = %session, seq, prev = ?event.prev, kind = event.kind(), reason = %why, "refused an event that is not where it was written; it is not applied");
                    f(seq, Replayed::Refused(event, why));
                }
                Link::Gap { prev, last } => return Err(gap(session, seq, prev, last)),
                Link::NeedPredecessor => unreachable!("a learned chain judges every event"),
            }
        }
        Ok(chain.last())
    }

    /// Like [`EventLog::replay`] but hands over the sealed payload, for
    /// tools that audit or copy the log without opening it. Nothing is
    /// checked.
    pub async fn replay_raw(
        &self,
        session: &SessionKey,
        after: u64,
        mut f: impl FnMut(u64, Option<&HeaderMap>, &[u8]) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        let Some(mut tail) = self.tail(session, after).await? else { return Ok(()) };
        while let Some((seq, msg)) = tail.next().await? {
            f(seq, msg.headers.as_ref(), &msg.payload)?;
        }
        Ok(())
    }

    fn decode(&self, session: &SessionKey, seq: u64, payload: &[u8]) -> Result<Event, LogError> {
        self.codec.decode_event(session, payload).map_err(|source| LogError::Unreadable { session: session.to_string(), seq, source })
    }

    /// The chain of `session`'s messages from the first through the one at
    /// `upto`, as a replay from the start leaves it there. `next` is the
    /// message the caller is judging, for the error.
    async fn chain_through(&self, session: &SessionKey, upto: u64, next: u64) -> Result<Chain, LogError> {
        let mut chain = Chain::from_start();
        let Some(mut tail) = self.tail(session, 0).await? else { return Err(not_a_message(session, next, upto)) };
        while let Some((seq, msg)) = tail.next().await? {
            if seq > upto {
                break;
            }
            let event = self.decode(session, seq, &msg.payload)?;
            if let Link::Gap { prev, last } = chain.check(seq, &event) {
                return Err(gap(session, seq, prev, last));
            }
        }
        if chain.last() != upto {
            return Err(not_a_message(session, next, upto));
        }
        Ok(chain)
    }

    /// The event of `session` stored at `seq`, if that message is one of the
    /// session's.
    async fn event_at(&self, session: &SessionKey, seq: u64) -> Result<Option<Event>, LogError> {
        let stream = self.js.get_stream_no_info(&self.cfg.stream).await.map_err(unavailable)?;
        match stream.get_raw_message(seq).await {
            Ok(m) if m.subject.as_str() == self.subject(session) => Ok(Some(self.decode(session, seq, &m.payload)?)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The session's messages after `after`, or `None` when there are none.
    async fn tail(&self, session: &SessionKey, after: u64) -> Result<Option<Tail>, LogError> {
        let deliver_policy = match after {
            0 => consumer::DeliverPolicy::All,
            n => consumer::DeliverPolicy::ByStartSequence { start_sequence: n + 1 },
        };
        let stream = self.js.get_stream_no_info(&self.cfg.stream).await.map_err(unavailable)?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig { filter_subject: self.subject(session), deliver_policy, ..Default::default() })
            .await
            .map_err(unavailable)?;
        // The server keeps an idle ordered consumer for 30 s and caps the
        // consumers of a stream (1,000 by default): left to expire, the
        // consumers of a burst of session loads would refuse the next ones.
        // So each is deleted as soon as its replay is over, whichever way.
        let delete = DeleteOnDrop(Some((stream, consumer.cached_info().name.clone())));
        if consumer.cached_info().num_pending == 0 {
            return Ok(None);
        }
        let messages = consumer.messages().await.map_err(unavailable)?;
        Ok(Some(Tail { messages, timeout: self.cfg.request_timeout, done: false, _delete: delete }))
    }

    /// The sequence of `session`'s last event, 0 when it has none.
    pub async fn last_seq(&self, session: &SessionKey) -> Result<u64, LogError> {
        let stream = self.js.get_stream_no_info(&self.cfg.stream).await.map_err(unavailable)?;
        match stream.get_last_raw_message_by_subject(&self.subject(session)).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(unavailable(e)),
        }
    }
}

/// The messages of one replay, up to the last one pending when it started.
struct Tail {
    messages: consumer::pull::Ordered,
    timeout: Duration,
    done: bool,
    _delete: DeleteOnDrop,
}

impl Tail {
    /// The next message and its stream sequence; `None` after the last.
    async fn next(&mut self) -> Result<Option<(u64, jetstream::Message)>, LogError> {
        if self.done {
            return Ok(None);
        }
        let msg = match tokio::time::timeout(self.timeout, self.messages.next()).await {
            Err(_) => return Err(LogError::Unavailable("replay stalled".into())),
            Ok(None) => return Err(LogError::Unavailable("replay ended early".into())),
            Ok(Some(msg)) => msg.map_err(unavailable)?,
        };
        let info = msg.info().map_err(|e| LogError::Unavailable(e.to_string()))?;
        let seq = info.stream_sequence;
        self.done = info.pending == 0;
        Ok(Some((seq, msg)))
    }
}

fn not_a_message(session: &SessionKey, seq: u64, after: u64) -> LogError {
    broken(session, seq, after, format!("the replay started after sequence {after}, which is not a message of the session"))
}

/// The event at `seq` names `prev` as its predecessor, later than the
/// message `last` before it: an event is missing.
fn gap(session: &SessionKey, seq: u64, prev: u64, last: u64) -> LogError {
    broken(session, seq, last, format!("it was appended after sequence {prev}: an event is missing"))
}

pub(crate) fn broken(session: &SessionKey, seq: u64, last: u64, what: String) -> LogError {
    BROKEN.fetch_add(1, Ordering::Relaxed);
    tracing::error!(session = %session, seq, last, %what, "an event does not follow the message before it; the session cannot be vouched for");
    LogError::Broken { session: session.to_string(), seq, last, what }
}

/// Deletes a consumer in the background when dropped.
struct DeleteOnDrop(Option<(stream::Stream<()>, String)>);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if let Some((stream, name)) = self.0.take() {
            // Nobody waits for it: a failed delete only leaves the consumer
            // to expire on its own.
            tokio::spawn(async move {
                if let Err(e) = stream.delete_consumer(&name).await {
                    tracing::debug!(consumer = %name, error = %e, "could not delete a replay consumer");
                }
            });
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

/// The server refuses a message over the stream's `max_msg_size` with this.
const MESSAGE_TOO_LARGE: jetstream::ErrorCode = jetstream::ErrorCode(10054);

fn publish_error(e: jetstream::context::PublishError, expected: u64) -> LogError {
    match e.kind() {
        PublishErrorKind::WrongLastSequence => LogError::Conflict { expected },
        PublishErrorKind::MaxPayloadExceeded => LogError::TooLarge(e.to_string()),
        PublishErrorKind::Other => {
            let code = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<jetstream::Error>()).map(jetstream::Error::error_code);
            if code == Some(MESSAGE_TOO_LARGE) { LogError::TooLarge(e.to_string()) } else { LogError::Unavailable(e.to_string()) }
        }
        _ => LogError::Unavailable(e.to_string()),
    }
}

/// Compares the snapshot stream's settings this service owns.
fn snapshots_differ(have: &stream::Config, want: &stream::Config) -> bool {
    have.subjects != want.subjects
        || have.num_replicas != want.num_replicas
        || have.max_message_size != want.max_message_size
        || have.max_messages_per_subject != want.max_messages_per_subject
        || have.allow_direct != want.allow_direct
}

/// Compares the settings this service owns; the server fills in others.
fn differs(have: &stream::Config, want: &stream::Config) -> bool {
    have.subjects != want.subjects
        || have.num_replicas != want.num_replicas
        || have.max_message_size != want.max_message_size
        || have.duplicate_window != want.duplicate_window
        || have.max_age != want.max_age
        || have.allow_direct != want.allow_direct
        || have.deny_delete != want.deny_delete
        || have.deny_purge != want.deny_purge
}

#[cfg(test)]
mod tests;

/// Events carrying more value bytes than this are sealed on a blocking-pool
/// thread.
const OFF_THREAD_BYTES: usize = 128 << 10;

/// How long an append waits for JetStream's acknowledgement by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
