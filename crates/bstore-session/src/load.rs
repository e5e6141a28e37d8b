//! Loading a session into memory: the Redis copy plus the log's tail after
//! it, or the log alone.
//!
//! The Redis copy is a shortcut, never an authority. It is used only when it
//! opens cleanly (every value is sealed for its own session, type and id)
//! and its sequence is not past the session's last event in the log; then
//! only the events after it are replayed. Otherwise — missing, unreachable,
//! unreadable, or ahead of the log — the session loads from the log alone,
//! with a warning for the suspicious cases, and the caller is told how to
//! repair the copy.

use bstore_domain::{Event, SessionKey, SessionState};
use bstore_log::EventLog;
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
    /// The log alone, from its first event.
    Log,
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

/// Loads `key` from `redis` (when configured) and the log.
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
        return Ok(Loaded { state: from_log_observed(log, key, seen).await?, source: Source::Log, repair: None });
    };
    let (copy, last) = tokio::join!(redis.load(key), log.last_seq(key));
    let last = last?;
    let repair = match copy {
        Ok(Some(mut state)) if state.seq() <= last => {
            match replay_observed(log, key, &mut state, seen).await {
                Ok(tail) => {
                    let repair = (tail > 0).then_some(SnapshotMode::Guarded);
                    return Ok(Loaded { state, source: Source::Redis { tail }, repair });
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
        Ok(None) => (last > 0).then_some(SnapshotMode::Guarded),
        Err(e @ RedisError::Unreadable { .. }) => {
            tracing::warn!(session = %key, error = %e, "ignoring the unreadable redis copy; loading from the log");
            Some(SnapshotMode::Replace)
        }
        Err(e @ RedisError::Unavailable(_)) => {
            tracing::warn!(session = %key, error = %e, "redis unavailable; loading from the log");
            Some(SnapshotMode::Guarded)
        }
    };
    Ok(Loaded { state: from_log_observed(log, key, seen).await?, source: Source::Log, repair })
}

/// Replays every event of `key`.
pub async fn from_log(log: &EventLog, key: &SessionKey) -> Result<SessionState, SessionError> {
    from_log_observed(log, key, &mut |_, _| {}).await
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
/// many were applied. An event that does not fit the state (a patch of a
/// value the state does not hold) stops the replay as unreadable.
pub async fn replay_into(log: &EventLog, key: &SessionKey, state: &mut SessionState) -> Result<u64, SessionError> {
    replay_observed(log, key, state, &mut |_, _| {}).await
}

/// Like [`replay_into`], calling `seen` with every event applied.
pub(crate) async fn replay_observed(
    log: &EventLog,
    key: &SessionKey,
    state: &mut SessionState,
    seen: &mut (dyn FnMut(u64, &Event) + Send),
) -> Result<u64, SessionError> {
    let (mut applied, mut failed) = (0, None);
    log.replay(key, state.seq(), |seq, event| {
        if failed.is_none() {
            match state.apply(seq, &event) {
                Ok(true) => {
                    applied += 1;
                    seen(seq, &event);
                }
                Ok(false) => {}
                Err(e) => failed = Some(e),
            }
        }
    })
    .await?;
    match failed {
        Some(e) => Err(SessionError::Unreadable(format!("{key}: {e}"))),
        None => Ok(applied),
    }
}
