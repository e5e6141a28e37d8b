//! An operator's restore: the session put back to its state at an earlier
//! point of its history as one new event (`Change::Restored`), decided and
//! appended by the session's actor like any write.
//!
//! Going through the actor is what keeps every copy right: the state in
//! memory changes by applying the event the log stored, the Redis projector
//! and the snapshotter follow that apply, and the Mongo materializer reads
//! the event from the log. The history before the restore is kept as it
//! was; the restore itself is in it, with the point it went back to.
//!
//! The decision is made against the state the actor has when the restore
//! runs, brought level with the log first: a write acknowledged before it
//! is undone by it (that is what a restore is for), a write that reaches
//! the actor after it applies on top of it and stays. A conflict (another
//! writer by mistake) catches up and decides again, as writes do; the
//! operator's request id makes a retry land once.

use std::time::Instant;

use bstore_domain::{RestoreSummary, SessionKey, SessionState};
use bstore_log::LogError;
use serde::{Deserialize, Serialize};

use super::{Env, Live, catch_up, now_ms, resync};
use crate::projector::Projector;
use crate::{Reply, SessionError};

/// What an operator asks: put the session back to sequence `to_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    /// The session's state after its events through this sequence is the
    /// one to restore.
    pub to_seq: u64,
    /// The moment the operator named, when the point was given as a time;
    /// recorded in the event for the audit (the tool resolves it to
    /// `to_seq`, the last event at or before it).
    pub to_ms: Option<u64>,
    /// The request id: a retry with the same one is applied at most once.
    pub rid: String,
    /// Decide and report, write nothing.
    pub dry_run: bool,
}

/// What a restore did (or, for a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restoration {
    /// The session's sequence now: the restore's event, or the current one
    /// when nothing was written.
    pub seq: u64,
    /// The sequence of the state the restore was decided against.
    pub from_seq: u64,
    /// The point restored to.
    pub to_seq: u64,
    /// Which of the outcomes.
    pub outcome: RestoreOutcome,
    /// What changes (or changed): empty for a retry or a session already
    /// at that state.
    pub summary: RestoreSummary,
}

/// How a restore ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreOutcome {
    /// The restore's event was appended at `seq`.
    Restored,
    /// A dry run: this is what a restore would change; nothing was written.
    WouldRestore,
    /// The session already holds what it held at the point: nothing was
    /// written.
    AlreadyThere,
    /// A retry of a restore the log already stored (at `seq`).
    Retried,
}

/// A restore the service will not do. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreRefusal {
    /// The session has no events at all.
    #[error("the session has no history: nothing to restore")]
    UnknownSession,
    /// The point lies before what the log keeps of the session.
    #[error("sequence {to_seq} is before the session's kept history ({why}); the earliest point that can be restored is {earliest}")]
    HistoryGone {
        /// The point asked for.
        to_seq: u64,
        /// The first sequence a restore may name.
        earliest: u64,
        /// What dropped the history: "an audit retention" or "an erasure".
        why: &'static str,
    },
    /// The point lies after the session's last event.
    #[error("sequence {to_seq} is beyond the session's last event ({last})")]
    BeyondLog {
        /// The point asked for.
        to_seq: u64,
        /// The session's last event.
        last: u64,
    },
    /// The session held nothing at the point (before its first write, or
    /// right after a deletion): restoring that would be a deletion, which is
    /// `session.delete`'s (or `erase`'s) to do.
    #[error("the session held nothing at sequence {to_seq} (before its first write or after a deletion); a restore does not delete")]
    EmptyPoint {
        /// The point asked for.
        to_seq: u64,
    },
}

/// Decides, appends (unless a dry run) and applies one restore.
pub(super) async fn restore(
    env: &Env,
    key: &SessionKey,
    projector: Option<&Projector>,
    live: &mut Live,
    req: RestoreRequest,
    deadline: Instant,
) -> Result<Reply, SessionError> {
    let window_ms = env.log.config().duplicate_window.as_millis() as u64;
    let answer = |seq, from_seq, outcome, summary| Reply::Restored(Restoration { seq, from_seq, to_seq: req.to_seq, outcome, summary });
    // The state at the point does not change while the session moves on:
    // it is folded once, on the first pass that needs it.
    let mut target: Option<SessionState> = None;
    for _ in 0..=env.cfg.conflict_retries {
        if let Some(seq) = live.rids.seq_of(&req.rid, now_ms(), window_ms) {
            return Ok(answer(seq, seq, RestoreOutcome::Retried, RestoreSummary::default()));
        }
        // Decided against the log's last event of the session, not only
        // what this state has seen.
        let last = env.log.last_seq(key).await?;
        if last != live.st.seq() {
            resync(env, key, live, last).await?;
        }
        let current = live.st.seq();
        check_point(env, key, current, req.to_seq).await?;
        let target = match &mut target {
            Some(t) => t,
            None => {
                let (state, _, _) = env.log.fold(key, Some(req.to_seq), true, &mut |_, _| {}).await?;
                if !state.exists() {
                    return Err(RestoreRefusal::EmptyPoint { to_seq: req.to_seq }.into());
                }
                target.insert(state)
            }
        };
        let Some(event) = live.st.restore(target, req.to_seq, req.to_ms, now_ms(), Some(req.rid.clone())) else {
            return Ok(answer(current, current, RestoreOutcome::AlreadyThere, RestoreSummary::default()));
        };
        let summary = live.st.restore_summary(&event).unwrap_or_default();
        if req.dry_run {
            return Ok(answer(current, current, RestoreOutcome::WouldRestore, summary));
        }
        match crate::stats::timed_append(&env.log, key, current, &event).await {
            Ok(appended) if appended.duplicate => {
                if appended.seq > live.st.seq() {
                    catch_up(env, key, live).await?;
                }
                return Ok(answer(appended.seq, appended.seq, RestoreOutcome::Retried, RestoreSummary::default()));
            }
            Ok(appended) => {
                let before = projector.map(|_| crate::projector::image(&live.st, &event));
                live.st.apply(appended.seq, &event).map_err(|e| SessionError::Unreadable(format!("{key}: {e}")))?;
                live.rids.record(&req.rid, appended.seq, event.at_ms);
                if let (Some(p), Some(before)) = (projector, before) {
                    p.after_write(before, &live.st, &event);
                }
                live.snap.record(event.value_bytes());
                live.snap.maybe_write(&env.cfg, &env.log, key, &live.st);
                tracing::info!(session = %key, seq = appended.seq, to_seq = req.to_seq, from_seq = current, "session restored");
                return Ok(answer(appended.seq, current, RestoreOutcome::Restored, summary));
            }
            Err(LogError::Conflict { expected }) => {
                tracing::info!(session = %key, expected, "restore conflict; catching up with the log");
                if Instant::now() >= deadline {
                    return Err(SessionError::Timeout);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(SessionError::Conflict)
}

/// Refuses a point the session's kept history cannot show: no history at
/// all, beyond its last event, before an audit retention's cut or an
/// erasure's marker.
async fn check_point(env: &Env, key: &SessionKey, current: u64, to_seq: u64) -> Result<(), SessionError> {
    if current == 0 {
        return Err(RestoreRefusal::UnknownSession.into());
    }
    if to_seq > current {
        return Err(RestoreRefusal::BeyondLog { to_seq, last: current }.into());
    }
    // Looked up again: another process may have moved the cut or erased.
    let known = env.log.refresh_data_key(key).await?;
    if let Some(e) = known.erased
        && to_seq < e.marker
    {
        return Err(RestoreRefusal::HistoryGone { to_seq, earliest: e.marker, why: "an erasure" }.into());
    }
    if let Some(cut) = known.cut
        && to_seq < cut
    {
        return Err(RestoreRefusal::HistoryGone { to_seq, earliest: cut, why: "an audit retention" }.into());
    }
    Ok(())
}
