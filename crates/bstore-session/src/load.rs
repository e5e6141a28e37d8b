//! Loading a session into memory: the Redis copy plus the log's tail after
//! it, else the latest usable snapshot plus the tail after it, else the log
//! alone.
//!
//! The Redis copy is a shortcut, never an authority. It is used only when it
//! opens cleanly (every value is sealed for its own session, type and id)
//! and its sequence is not past the session's last event in the log; then
//! only the events after it are replayed. Otherwise — missing, unreachable,
//! unreadable, or ahead of the log — the session loads from its snapshots
//! and the log, with a warning for the suspicious cases, and the caller is
//! told how to repair the copy.
//!
//! A snapshot (`bstore_log::snapshots`) is trusted the same way: it must
//! open as this session's state, not be older than the session's erasure,
//! not be past the log's last event, and the events after it must follow
//! it. One that fails any of these is skipped, logged, and the older one is
//! tried, then the whole log. The cost of a load is therefore the size of
//! the state plus the events since the last snapshot, not the history.
//! When the starting point is already at the log's last event no replay
//! consumer is made at all.
//!
//! Every replay checks that each event is where it was written
//! ([`EventLog::replay_checked`]); a refused one is never applied, but the
//! state's sequence moves past it ([`SessionState::pass_over`]), since the
//! next append is fenced on the session's last message. A replay after the
//! Redis copy or a snapshot that refuses an event falls back to the log
//! alone: from the middle, a copy of an older event and a starting point at
//! a sequence that is not the session's can look the same, and the whole log
//! tells them apart.

use bstore_domain::{Event, SessionKey, SessionState};
use bstore_log::{EventLog, FoldStart, Folded};
use bstore_redis::{RedisError, RedisProjection, SnapshotMode};

use crate::SessionError;

/// Where a loaded state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The Redis copy, plus `tail` events from the log after it.
    Redis {
        /// Events replayed after the copy's sequence.
        tail: u64,
    },
    /// A snapshot in the log covering events through `seq`, plus `tail`
    /// events after it.
    Snapshot {
        /// The last event the snapshot covers.
        seq: u64,
        /// Events replayed after it.
        tail: u64,
    },
    /// The log alone, from its first event; `events` were replayed.
    Log {
        /// Events replayed.
        events: u64,
    },
}

impl Source {
    /// Events replayed from the log by this load.
    pub fn replayed(&self) -> u64 {
        match *self {
            Self::Redis { tail } | Self::Snapshot { tail, .. } => tail,
            Self::Log { events } => events,
        }
    }

    /// A short name, for figures and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Redis { .. } => "redis",
            Self::Snapshot { .. } => "snapshot",
            Self::Log { .. } => "log",
        }
    }
}

/// A loaded session.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The state, current as of the log's last event of the session.
    pub state: SessionState,
    /// Where it came from.
    pub source: Source,
    /// How the Redis copy should be rewritten, if it is not current.
    pub repair: Option<SnapshotMode>,
}

/// Loads `key` from `redis` (when configured), its snapshots and the log.
pub async fn load(log: &EventLog, redis: Option<&RedisProjection>, key: &SessionKey) -> Result<Loaded, SessionError> {
    load_observed(log, redis, key, &mut |_, _| {}).await
}

/// Like [`load`], calling `seen` with every event replayed from the log.
pub(crate) async fn load_observed(
    log: &EventLog,
    redis: Option<&RedisProjection>,
    key: &SessionKey,
    seen: &mut (dyn FnMut(u64, &Event) + Send),
) -> Result<Loaded, SessionError> {
    let Some(redis) = redis else {
        let (state, source) = from_snapshots_observed(log, key, seen).await?;
        return Ok(Loaded { state, source, repair: None });
    };
    let (copy, last) = tokio::join!(redis.load(key), log.last_seq(key));
    let last = last?;
    let repair = match copy {
        // The copy is at the log's last event: nothing to replay, so no
        // consumer is made (the warm load costs one Redis read and one
        // direct get).
        Ok(Some(state)) if state.seq() == last => return Ok(Loaded { state, source: Source::Redis { tail: 0 }, repair: None }),
        Ok(Some(mut state)) if state.seq() <= last => {
            let from = state.seq();
            match replay_observed(log, key, &mut state, seen).await {
                Ok(tail) if tail.refused == 0 => {
                    let repair = (state.seq() > from).then_some(SnapshotMode::Guarded);
                    return Ok(Loaded { state, source: Source::Redis { tail: tail.applied }, repair });
                }
                Ok(_) => {
                    tracing::warn!(session = %key, redis_seq = from, "events after the redis copy were refused; loading from the log alone");
                    let mut state = SessionState::default();
                    let events = replay_observed(log, key, &mut state, seen).await?.applied;
                    return Ok(Loaded { state, source: Source::Log { events }, repair: Some(SnapshotMode::Replace) });
                }
                // The log's events do not fit the copy: the copy is wrong.
                Err(SessionError::Unreadable(e)) => {
                    tracing::warn!(session = %key, error = %e, "the redis copy does not fit the log's events; loading from the log");
                    Some(SnapshotMode::Replace)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(state)) => {
            tracing::warn!(session = %key, redis_seq = state.seq(), log_seq = last, "the redis copy is ahead of the log; ignoring it and loading from the log");
            Some(SnapshotMode::Replace)
        }
        // A session the log has no event of is new: nothing to replay.
        Ok(None) if last == 0 => return Ok(Loaded { state: SessionState::default(), source: Source::Log { events: 0 }, repair: None }),
        Ok(None) => Some(SnapshotMode::Guarded),
        Err(e @ RedisError::Unreadable { .. }) => {
            tracing::warn!(session = %key, error = %e, "ignoring the unreadable redis copy; loading from the log");
            Some(SnapshotMode::Replace)
        }
        Err(e @ RedisError::Unavailable(_)) => {
            tracing::warn!(session = %key, error = %e, "redis unavailable; loading from the log");
            Some(SnapshotMode::Guarded)
        }
    };
    let (state, source) = from_snapshots_observed(log, key, seen).await?;
    Ok(Loaded { state, source, repair })
}

/// Replays every event of `key`.
pub async fn from_log(log: &EventLog, key: &SessionKey) -> Result<SessionState, SessionError> {
    from_log_observed(log, key, &mut |_, _| {}).await
}

/// The session's state from its latest usable snapshot and the events after
/// it, or from the whole log when no snapshot is usable.
pub async fn from_snapshots(log: &EventLog, key: &SessionKey) -> Result<(SessionState, Source), SessionError> {
    from_snapshots_observed(log, key, &mut |_, _| {}).await
}

async fn from_snapshots_observed(
    log: &EventLog,
    key: &SessionKey,
    seen: &mut (dyn FnMut(u64, &Event) + Send),
) -> Result<(SessionState, Source), SessionError> {
    let last = log.last_seq(key).await?;
    if last == 0 {
        return Ok((SessionState::default(), Source::Log { events: 0 }));
    }
    // Through the log's last event: a snapshot past it (the log lost events
    // under it) is not used.
    let (state, start, done) = log.fold(key, Some(last), true, seen).await?;
    let source = match start {
        FoldStart::Snapshot(seq) => Source::Snapshot { seq, tail: done.applied },
        FoldStart::Scratch => Source::Log { events: done.applied },
    };
    Ok((state, source))
}

async fn from_log_observed(
    log: &EventLog,
    key: &SessionKey,
    seen: &mut (dyn FnMut(u64, &Event) + Send),
) -> Result<SessionState, SessionError> {
    let mut state = SessionState::default();
    replay_observed(log, key, &mut state, seen).await?;
    Ok(state)
}

/// Applies every event of `key` after `state`'s sequence and returns how
/// many were applied; the state ends at the session's last message, refused
/// ones included. An event that does not fit the state (a patch of a value
/// the state does not hold) stops the replay as unreadable.
pub async fn replay_into(log: &EventLog, key: &SessionKey, state: &mut SessionState) -> Result<u64, SessionError> {
    Ok(log.fold_into(key, state, None, &mut |_, _| {}).await?.applied)
}

/// Like [`replay_into`], calling `seen` with every event applied.
pub(crate) async fn replay_observed(
    log: &EventLog,
    key: &SessionKey,
    state: &mut SessionState,
    seen: &mut (dyn FnMut(u64, &Event) + Send),
) -> Result<Folded, SessionError> {
    Ok(log.fold_into(key, state, None, seen).await?)
}

#[cfg(test)]
mod tests {
    //! Loading through the Redis copy when the log holds an event that is
    //! not where it was written, against real servers.

    use async_nats::jetstream;
    use bstore_codec::{Codec, Keyring};
    use bstore_domain::Change;
    use bstore_log::LogConfig;
    use bstore_redis::RedisConfig;
    use bstore_testkit::{NatsServer, RedisServer};
    use bytes::Bytes;

    use super::*;

    fn codec() -> Codec {
        Codec::new(Keyring::new(vec![(1, [7u8; 32])], None).unwrap())
    }

    fn creds(v: &'static [u8]) -> Event {
        Event::new(1, None, Change::CredsPut { creds: Bytes::from_static(v) })
    }

    struct Servers {
        _nats: NatsServer,
        _redis: RedisServer,
        js: jetstream::Context,
        log: EventLog,
        redis: RedisProjection,
    }

    async fn servers() -> Servers {
        let (nats, redis_server) = (NatsServer::start(), RedisServer::start());
        let client = async_nats::connect(nats.url()).await.unwrap();
        let log = EventLog::open(client.clone(), LogConfig::default(), codec()).await.unwrap();
        let redis = RedisProjection::new(RedisConfig { url: Some(redis_server.url()), ..Default::default() }, codec()).unwrap();
        Servers { _nats: nats, _redis: redis_server, js: jetstream::new(client), log, redis }
    }

    impl Servers {
        async fn publish_again(&self, key: &SessionKey, seq: u64) -> u64 {
            let stored = self.js.get_stream("BSTORE_EVENTS").await.unwrap().get_raw_message(seq).await.unwrap();
            self.js.publish(self.log.subject(key), stored.payload).await.unwrap().await.unwrap().sequence
        }
    }

    #[tokio::test]
    async fn a_copy_after_the_redis_copy_is_refused_and_the_session_loads_from_the_log_once() {
        let s = servers().await;
        let key = SessionKey::parse("t", "a").unwrap();
        let first = s.log.append(&key, 0, &creds(b"v1")).await.unwrap().seq;
        s.log.append(&key, first, &creds(b"v2")).await.unwrap();
        s.redis.write_snapshot(&key, &from_log(&s.log, &key).await.unwrap(), SnapshotMode::Replace).await.unwrap();
        let copy = s.publish_again(&key, first).await;

        let loaded = load(&s.log, Some(&s.redis), &key).await.unwrap();
        assert_eq!(loaded.state.creds().map(|c| &c[..]), Some(&b"v2"[..]));
        assert_eq!(loaded.state.seq(), copy, "at the session's last message, to fence the next append on");
        assert_eq!((loaded.source.name(), loaded.repair), ("log", Some(SnapshotMode::Replace)));

        // Once repaired, the copy is behind the Redis copy: nothing to refuse.
        s.redis.write_snapshot(&key, &loaded.state, SnapshotMode::Replace).await.unwrap();
        let again = load(&s.log, Some(&s.redis), &key).await.unwrap();
        assert_eq!((again.source, again.repair, again.state), (Source::Redis { tail: 0 }, None, loaded.state));
    }

    #[tokio::test]
    async fn a_redis_copy_at_a_sequence_that_is_not_the_sessions_loses_no_event() {
        let s = servers().await;
        let (key, other) = (SessionKey::parse("t", "a").unwrap(), SessionKey::parse("t", "b").unwrap());
        let first = s.log.append(&key, 0, &creds(b"v1")).await.unwrap().seq;
        let elsewhere = s.log.append(&other, 0, &creds(b"other")).await.unwrap().seq;
        s.log.append(&key, first, &creds(b"v2")).await.unwrap();
        // A copy that says it is at the other session's sequence, with the
        // state of the first event: from there, the second event looks out
        // of place (it names the first), so the whole log decides.
        let wrong = SessionState::from_parts(elsewhere, Some(Bytes::from_static(b"v1")), Vec::new(), Some(1), 1);
        s.redis.write_snapshot(&key, &wrong, SnapshotMode::Replace).await.unwrap();

        let loaded = load(&s.log, Some(&s.redis), &key).await.unwrap();
        assert_eq!(loaded.state.creds().map(|c| &c[..]), Some(&b"v2"[..]), "the second event was applied");
        assert_eq!((loaded.source.name(), loaded.repair), ("log", Some(SnapshotMode::Replace)));
    }
}
