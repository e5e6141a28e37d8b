//! Folding a session's events into its state: the one way anything in the
//! service turns the log into a [`SessionState`] — a load, a catch-up after
//! a conflict, the Mongo materializer's look-up of a patch's base, the
//! tools.
//!
//! [`EventLog::fold_into`] applies the events after a state's sequence;
//! [`EventLog::fold`] starts from the newest usable snapshot
//! (`snapshots.rs`) that is not past the point asked for, falling back to an
//! older one and then to the whole log when the events after a snapshot do
//! not follow it. Either stops at `upto` when asked.

use bstore_domain::{Event, SessionKey, SessionState};

use crate::{EventLog, LogError, Replayed};

/// What one fold into a state did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Folded {
    /// Events applied.
    pub applied: u64,
    /// Events refused (not where they were written) and passed over.
    pub refused: u64,
}

/// Where a fold started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoldStart {
    /// A snapshot covering the events through this sequence.
    Snapshot(u64),
    /// The first event of the session.
    Scratch,
}

impl EventLog {
    /// Applies every event of `session` after `state`'s sequence (through
    /// `upto`, if given), calling `seen` with each applied one; the state
    /// ends at the session's last message (or `upto`), refused ones
    /// included. An event that does not fit the state (a patch of a value
    /// the state does not hold) stops the fold with [`LogError::Unfit`] and
    /// leaves the state as it was before that event.
    pub async fn fold_into(
        &self,
        session: &SessionKey,
        state: &mut SessionState,
        upto: Option<u64>,
        seen: &mut (dyn FnMut(u64, &Event) + Send),
    ) -> Result<Folded, LogError> {
        if state.seq() == 0 {
            // From the start: at the retention's base snapshot, if any.
            *state = self.start_state(session).await?;
        }
        let upto = upto.unwrap_or(u64::MAX);
        if upto <= state.seq() {
            // Nothing to read: no replay consumer is made.
            return Ok(Folded::default());
        }
        let (mut done, mut failed) = (Folded::default(), None);
        let last = self
            .replay_checked(session, state.seq(), |seq, replayed| {
                if failed.is_some() || seq > upto {
                    return;
                }
                match replayed {
                    Replayed::Fits(event) => match state.apply(seq, &event) {
                        Ok(true) => {
                            done.applied += 1;
                            seen(seq, &event);
                        }
                        Ok(false) => {}
                        Err(e) => failed = Some(LogError::Unfit { session: session.to_string(), seq, what: e.to_string() }),
                    },
                    Replayed::Refused(..) => {
                        done.refused += 1;
                        state.pass_over(seq);
                    }
                }
            })
            .await?;
        if let Some(e) = failed {
            return Err(e);
        }
        state.pass_over(last.min(upto));
        Ok(done)
    }

    /// The state of `session` through `upto` (every event, if `None`):
    /// from the newest usable snapshot not past `upto` when `snapshots` is
    /// set, else (or when none is usable) from the first event. A snapshot
    /// whose following events refuse or do not fit it is skipped, logged,
    /// and the next starting point tried.
    pub async fn fold(
        &self,
        session: &SessionKey,
        upto: Option<u64>,
        snapshots: bool,
        seen: &mut (dyn FnMut(u64, &Event) + Send),
    ) -> Result<(SessionState, FoldStart, Folded), LogError> {
        // The newest snapshot alone first (one direct get): the others are
        // read only when it will not do.
        let mut tried = None;
        if snapshots
            && let Some(state) = self.newest_snapshot(session).await?
            && upto.is_none_or(|u| state.seq() <= u)
        {
            tried = Some(state.seq());
            if let Some(done) = self.fold_from_snapshot(session, state, upto, seen).await? {
                return Ok(done);
            }
        }
        let candidates = if snapshots { self.snapshots(session).await? } else { Vec::new() };
        for state in candidates {
            let at = state.seq();
            if upto.is_some_and(|u| at > u) || tried == Some(at) {
                continue;
            }
            if let Some(done) = self.fold_from_snapshot(session, state, upto, seen).await? {
                return Ok(done);
            }
        }
        let mut state = SessionState::default();
        let done = match self.fold_into(session, &mut state, upto, seen).await {
            // Another process may have moved the retention's cut since this
            // one looked: the events it started after are gone.
            Err(LogError::Broken { .. }) if self.data_key_state(session).await?.cut != self.refresh_data_key(session).await?.cut => {
                state = SessionState::default();
                self.fold_into(session, &mut state, upto, seen).await?
            }
            other => other?,
        };
        Ok((state, FoldStart::Scratch, done))
    }

    /// Folds from the snapshot `state`; `None` (logged) when the events
    /// after it refuse or do not fit it.
    async fn fold_from_snapshot(
        &self,
        session: &SessionKey,
        mut state: SessionState,
        upto: Option<u64>,
        seen: &mut (dyn FnMut(u64, &Event) + Send),
    ) -> Result<Option<(SessionState, FoldStart, Folded)>, LogError> {
        let at = state.seq();
        match self.fold_into(session, &mut state, upto, seen).await {
            Ok(done) if done.refused == 0 => Ok(Some((state, FoldStart::Snapshot(at), done))),
            Ok(_) => {
                tracing::warn!(session = %session, snapshot_seq = at, "events after a snapshot were refused; trying an older starting point");
                Ok(None)
            }
            Err(e @ (LogError::Unfit { .. } | LogError::Broken { .. })) => {
                tracing::warn!(session = %session, snapshot_seq = at, error = %e, "the log's events do not follow a snapshot; skipping it");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
