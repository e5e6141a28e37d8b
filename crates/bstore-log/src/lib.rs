//! The event log: the one place a write is decided.
//!
//! One JetStream stream holds every session's events, one subject per
//! session (`<subject_prefix>.<tenant>.<session>`). An append is fenced with
//! `Nats-Expected-Last-Subject-Sequence`, so a writer that has not seen the
//! session's latest event gets [`LogError::Conflict`] instead of overwriting
//! it, and carries `Nats-Msg-Id` from the client's request id, so a retried
//! request is stored once.
//!
//! **Architecture invariant:** nothing but [`EventLog::append`] writes a
//! session's subject, and it writes only sealed events.

mod config;

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, message::PublishMessage, stream};
use bstore_codec::{Codec, CodecError};
use bstore_domain::{Event, SessionKey};
use futures_util::StreamExt;

pub use config::{LogConfig, Storage};

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
}

impl EventLog {
    /// Connects to the stream, creating it when missing and bringing its
    /// settings in line with `cfg` when they differ.
    pub async fn open(client: async_nats::Client, cfg: LogConfig, codec: Codec) -> Result<Self, LogError> {
        let mut js = jetstream::new(client);
        js.set_timeout(cfg.request_timeout);
        let wanted = cfg.stream_config();
        let mut stream = js.get_or_create_stream(wanted.clone()).await.map_err(unavailable)?;
        let have = stream.info().await.map_err(unavailable)?.config.clone();
        if differs(&have, &wanted) {
            tracing::info!(stream = %wanted.name, "updating stream settings to match the configuration");
            js.update_stream(wanted).await.map_err(unavailable)?;
        }
        Ok(Self { js, cfg, codec })
    }

    /// A handle on a stream that already exists, without checking or
    /// changing its settings: for readers such as the materializer.
    pub fn attach(js: jetstream::Context, cfg: LogConfig, codec: Codec) -> Self {
        Self { js, cfg, codec }
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
    /// (0: the session has no events).
    pub async fn append(&self, session: &SessionKey, expected_last: u64, event: &Event) -> Result<Appended, LogError> {
        // Compressing and sealing a large event happens off the thread that
        // serves the other sessions.
        let payload = if event.value_bytes() < OFF_THREAD_BYTES {
            self.codec.encode_event(session, event)
        } else {
            let (codec, session, event) = (self.codec.clone(), session.clone(), event.clone());
            tokio::task::spawn_blocking(move || codec.encode_event(&session, &event))
                .await
                .map_err(|e| LogError::Unavailable(format!("sealing an event failed: {e}")))?
        };
        let mut msg = PublishMessage::build().payload(payload.into()).expected_last_subject_sequence(expected_last);
        if let Some(rid) = &event.rid {
            msg = msg.message_id(format!("{}.{}.{rid}", session.tenant, session.session));
        }
        let ack = self.js.send_publish(self.subject(session), msg).await.map_err(|e| publish_error(e, expected_last))?;
        let ack = ack.await.map_err(|e| publish_error(e, expected_last))?;
        Ok(Appended { seq: ack.sequence, duplicate: ack.duplicate })
    }

    /// Replays `session`'s events after sequence `after` (0: from the
    /// start), in order, calling `f` with each event and its sequence.
    /// Returns the sequence of the last event seen (or `after`).
    pub async fn replay(&self, session: &SessionKey, after: u64, mut f: impl FnMut(u64, Event)) -> Result<u64, LogError> {
        let mut last = after;
        self.replay_raw(session, after, |seq, _headers, payload| {
            let event = self.codec.decode_event(session, payload).map_err(|source| LogError::Unreadable {
                session: session.to_string(),
                seq,
                source,
            })?;
            f(seq, event);
            last = seq;
            Ok(())
        })
        .await?;
        Ok(last)
    }

    /// Like [`EventLog::replay`] but hands over the sealed payload, for
    /// tools that audit or copy the log without opening it.
    pub async fn replay_raw(
        &self,
        session: &SessionKey,
        after: u64,
        mut f: impl FnMut(u64, Option<&HeaderMap>, &[u8]) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
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
        let _delete = DeleteOnDrop(Some((stream, consumer.cached_info().name.clone())));
        if consumer.cached_info().num_pending == 0 {
            return Ok(());
        }
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        loop {
            let next = tokio::time::timeout(self.cfg.request_timeout, messages.next()).await;
            let msg = match next {
                Err(_) => return Err(LogError::Unavailable("replay stalled".into())),
                Ok(None) => return Err(LogError::Unavailable("replay ended early".into())),
                Ok(Some(msg)) => msg.map_err(unavailable)?,
            };
            let info = msg.info().map_err(|e| LogError::Unavailable(e.to_string()))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            f(seq, msg.headers.as_ref(), &msg.payload)?;
            if pending == 0 {
                return Ok(());
            }
        }
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

/// Compares the settings this service owns; the server fills in others.
fn differs(have: &stream::Config, want: &stream::Config) -> bool {
    have.subjects != want.subjects
        || have.num_replicas != want.num_replicas
        || have.max_message_size != want.max_message_size
        || have.duplicate_window != want.duplicate_window
        || have.max_age != want.max_age
        || have.allow_direct != want.allow_direct
}

/// Events carrying more value bytes than this are sealed on a blocking-pool
/// thread.
const OFF_THREAD_BYTES: usize = 128 << 10;

/// How long an append waits for JetStream's acknowledgement by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
