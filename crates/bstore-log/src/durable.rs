//! Reading the log through a durable consumer: what the Mongo materializer
//! (and anything else that follows every session's events) uses, so that
//! subjects, delivery, decoding and acknowledgements of the event stream are
//! known here alone.
//!
//! [`EventLog::durable`] gets (or makes) a durable pull consumer over every
//! session's subject, starting after a checkpoint the caller keeps; each
//! [`Durable::fetch`] hands over a batch of [`Delivered`] messages, each
//! decoded for the session its subject names — or, when it cannot be, with
//! the reason, whether another instance may read it (a newer schema, a
//! data-key look-up that failed) and whether it is an event of an erased
//! session from before its erasure. The caller acknowledges each one
//! ([`Delivered::ack`]), hands it back ([`Delivered::nak`]) or says it is
//! still at work ([`Delivered::progress`]).

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use bstore_codec::{CodecError, SealError};
use bstore_domain::{Event, SessionKey};
use futures_util::StreamExt;

use crate::{EventLog, LogError, unavailable};

/// The settings of a durable consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableConfig {
    /// Its name.
    pub name: String,
    /// What it is for, as the server shows it.
    pub description: String,
    /// How long a delivery may go unacknowledged before it is delivered
    /// again.
    pub ack_wait: Duration,
    /// Deliveries of one message at most.
    pub max_deliver: i64,
    /// Messages per fetch.
    pub batch: usize,
    /// How long a fetch waits for its batch to fill.
    pub batch_wait: Duration,
}

/// A durable consumer over every session's events.
pub struct Durable {
    consumer: consumer::PullConsumer,
    cfg: DurableConfig,
}

/// Why a delivered message is not an event this process can use; names no
/// value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecoded {
    /// The session its subject names, if any.
    pub session: Option<SessionKey>,
    /// Why.
    pub reason: String,
    /// Another process may read it (written by a newer schema, or its data
    /// key could not be looked up here): hand it back.
    pub defer: bool,
    /// An event of an erased session from before its erasure: unreadable by
    /// design.
    pub erased: bool,
}

/// One delivered message of the event stream.
pub struct Delivered {
    msg: jetstream::Message,
    /// Its stream sequence.
    pub seq: u64,
    /// How many times it has been delivered, this one included.
    pub delivered: i64,
    /// Its subject.
    pub subject: String,
    /// The session and its event, or why not.
    pub event: Result<(SessionKey, Event), Undecoded>,
}

impl Delivered {
    /// Acknowledges it: never delivered again.
    pub async fn ack(&self) -> Result<(), LogError> {
        self.msg.ack().await.map_err(unavailable)
    }

    /// Hands it back, to be delivered again after `delay`.
    pub async fn nak(&self, delay: Duration) -> Result<(), LogError> {
        self.msg.ack_with(AckKind::Nak(Some(delay))).await.map_err(unavailable)
    }

    /// Says it is still being worked on, so that it is not delivered again
    /// after the ack wait.
    pub async fn progress(&self) -> Result<(), LogError> {
        self.msg.ack_with(AckKind::Progress).await.map_err(unavailable)
    }
}

impl EventLog {
    /// The durable consumer `cfg` names, made when missing — starting after
    /// `checkpoint()` (0: from the first event), so that a lost consumer
    /// does not mean a replay of the whole log. One made with another bound
    /// on deliveries is given `cfg.max_deliver`.
    pub async fn durable<F: Future<Output = u64>>(&self, cfg: &DurableConfig, checkpoint: impl FnOnce() -> F) -> Result<Durable, LogError> {
        let stream = self.js.get_stream(&self.cfg.stream).await.map_err(unavailable)?;
        if let Ok(c) = stream.get_consumer::<consumer::pull::Config>(&cfg.name).await {
            let have = &c.cached_info().config;
            if have.max_deliver == cfg.max_deliver {
                return Ok(Durable { consumer: c, cfg: cfg.clone() });
            }
            tracing::info!(consumer = %cfg.name, max_deliver = cfg.max_deliver, "bounding the consumer's redeliveries");
            let consumer = stream.update_consumer(self.durable_config(cfg, have.deliver_policy)).await.map_err(unavailable)?;
            return Ok(Durable { consumer, cfg: cfg.clone() });
        }
        let from = checkpoint().await;
        let deliver_policy = match from {
            0 => consumer::DeliverPolicy::All,
            n => consumer::DeliverPolicy::ByStartSequence { start_sequence: n + 1 },
        };
        tracing::info!(consumer = %cfg.name, from = from + 1, "creating a durable consumer of the event stream");
        let consumer = stream.get_or_create_consumer(&cfg.name, self.durable_config(cfg, deliver_policy)).await.map_err(unavailable)?;
        Ok(Durable { consumer, cfg: cfg.clone() })
    }

    fn durable_config(&self, cfg: &DurableConfig, deliver_policy: consumer::DeliverPolicy) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(cfg.name.clone()),
            description: Some(cfg.description.clone()),
            filter_subject: format!("{}.>", self.cfg.subject_prefix),
            deliver_policy,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: cfg.ack_wait,
            max_deliver: cfg.max_deliver,
            max_ack_pending: (cfg.batch.max(1) * 4) as i64,
            max_batch: cfg.batch.max(1) as i64,
            ..Default::default()
        }
    }

    /// The stream's last sequence and the ack floor of the durable consumer
    /// `name` (0 when it does not exist): how far it is behind.
    pub async fn durable_lag(&self, name: &str) -> Result<(u64, u64), LogError> {
        durable_lag(&self.js, &self.cfg.stream, name).await
    }

    /// The session a subject of the event stream names.
    pub fn session_of(&self, subject: &str) -> Option<SessionKey> {
        session_of(&self.cfg.subject_prefix, subject)
    }

    /// Decodes a delivered message, looking the session's data key up when
    /// it is sealed under one this process does not have yet (first sight,
    /// or a generation made since); an event from before the session's
    /// erasure is told apart from an unreadable one.
    async fn decode_delivered(&self, subject: &str, seq: u64, payload: &[u8]) -> Result<(SessionKey, Event), Undecoded> {
        let Some(session) = self.session_of(subject) else {
            return Err(Undecoded { session: None, reason: "its subject names no session".into(), defer: false, erased: false });
        };
        let first = self.codec.decode_event(&session, payload);
        let first = match first {
            Ok(event) => return Ok((session, event)),
            Err(e) if !self.codec.open_needs_data_key(payload) => e,
            Err(_) => match self.refresh_data_key(&session).await {
                Ok(state) if state.erased.is_some_and(|e| seq < e.marker) => {
                    return Err(Undecoded { session: Some(session), reason: "erased with its session".into(), defer: false, erased: true });
                }
                Ok(_) => match self.codec.decode_event(&session, payload) {
                    Ok(event) => return Ok((session, event)),
                    Err(e) => e,
                },
                // The key store is unreachable: handed back, tried again later.
                Err(e) => {
                    return Err(Undecoded {
                        session: Some(session),
                        reason: format!("its data key cannot be looked up: {e}"),
                        defer: true,
                        erased: false,
                    });
                }
            },
        };
        let (reason, defer) = match &first {
            // Only a newer build can tell: during a rolling upgrade, an
            // upgraded instance takes it. (The version is sealed: nobody
            // without the key makes such an event.)
            CodecError::UnknownSchema(_) => (first.to_string(), true),
            // Not deferred: in a cluster every instance reads with the same
            // keys (a new key is accepted for reading everywhere before it
            // seals), and a forged header naming any key id must not hold
            // delivery up.
            CodecError::Seal(SealError::UnknownKey(id)) => {
                (format!("sealed under key {id}, which is not in the keyring (add it, then `rebuild mongo`)"), false)
            }
            // What does not decode may be quoted in the message.
            CodecError::Decode(_) => ("it opens but does not decode as an event".into(), false),
            _ => (format!("it does not open: {first}"), false),
        };
        Err(Undecoded { session: Some(session), reason, defer, erased: false })
    }
}

impl Durable {
    /// One batch (empty when nothing came within the batch wait), each
    /// message decoded.
    pub async fn fetch(&self, log: &EventLog) -> Result<Vec<Delivered>, LogError> {
        let mut batch =
            self.consumer.batch().max_messages(self.cfg.batch.max(1)).expires(self.cfg.batch_wait).messages().await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(m) = batch.next().await {
            let msg = m.map_err(unavailable)?;
            let (seq, delivered) = msg.info().map_or((0, 1), |i| (i.stream_sequence, i.delivered));
            let subject = msg.subject.to_string();
            let event = log.decode_delivered(&subject, seq, &msg.payload).await;
            out.push(Delivered { msg, seq, delivered, subject, event });
        }
        Ok(out)
    }

    /// The consumer's ack floor: every message up to it is acknowledged.
    pub async fn ack_floor(&self) -> Result<u64, LogError> {
        Ok(self.consumer.get_info().await.map_err(unavailable)?.ack_floor.stream_sequence)
    }
}

/// [`EventLog::durable_lag`] on a bare JetStream context: needs only NATS.
pub async fn durable_lag(js: &jetstream::Context, stream: &str, name: &str) -> Result<(u64, u64), LogError> {
    let mut stream = js.get_stream(stream).await.map_err(unavailable)?;
    let last = stream.info().await.map_err(unavailable)?.state.last_sequence;
    let floor = match stream.get_consumer::<consumer::pull::Config>(name).await {
        Ok(mut c) => c.info().await.map_err(unavailable)?.ack_floor.stream_sequence,
        Err(_) => 0,
    };
    Ok((last, floor))
}

/// The session a subject `<prefix>.<tenant>.<session>` belongs to.
pub fn session_of(prefix: &str, subject: &str) -> Option<SessionKey> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (tenant, session) = rest.split_once('.')?;
    SessionKey::parse(tenant, session).ok()
}
