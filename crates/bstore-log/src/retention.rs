//! Audit retention: a session's events older than `stream.retention_secs`
//! are dropped — but only once a durable snapshot stands for them
//! (invariant 8 of the design), never past what a durable consumer (the
//! Mongo materializer) has yet to read, and never so that a replay could
//! start anywhere but at a state that holds them.
//!
//! [`EventLog::retain`] runs for one session, off the reply path, after the
//! session's actor has written a snapshot:
//!
//! 1. it folds the session from its current cut (the base snapshot there, or
//!    the first event) through the last event decided before the cutoff
//!    (`now - retention`): the state at that event `p`;
//! 2. it stores that state as the session's *base snapshot* on
//!    `<snapshot subject>.base` and waits for the acknowledgement;
//! 3. it records the cut `p` in the session's `BSTORE_DATAKEYS` record
//!    (compare-and-set, never moving back) — from then on every replay
//!    starts at `p` and every fold from the start begins at the base
//!    snapshot;
//! 4. only then it purges the session's subject below `p + 1`.
//!
//! A crash between any two steps leaves the history whole or the cut
//! recorded over events still present: both replay the same state. The
//! event stream must allow subject purges for this, so a retention is a
//! choice made when the stream is created (`deny_purge` is off only then;
//! the server never lifts it later). What stops a bot from purging is then
//! what stops it from reaching the JetStream API at all (ARCHITECTURE.md,
//! "Trust model"): the serving identity has no JetStream rights and a
//! request's reply subject must be an inbox.

use std::time::Duration;

use bstore_domain::{SessionKey, SessionState};
use futures_util::StreamExt;

use crate::{EventLog, LogError, Replayed, unavailable};

/// What one [`EventLog::retain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    /// The new cut: events through it were dropped.
    pub cut: u64,
    /// Messages the purge removed.
    pub purged: u64,
}

impl EventLog {
    /// The subject of `session`'s base snapshot (the state at its cut).
    pub fn base_subject(&self, session: &SessionKey) -> String {
        format!("{}.base", self.snapshot_subject(session))
    }

    /// The state a fold from the start begins with: the base snapshot at
    /// the retention's cut when there is one (and no later erasure), else
    /// the empty state.
    pub async fn start_state(&self, session: &SessionKey) -> Result<SessionState, LogError> {
        let known = self.data_key_state(session).await?;
        match known.cut {
            Some(cut) if known.erased.is_none_or(|e| e.marker <= cut) => self.base_state(session, cut).await,
            _ => Ok(SessionState::default()),
        }
    }

    /// The base snapshot at `cut`.
    async fn base_state(&self, session: &SessionKey, cut: u64) -> Result<SessionState, LogError> {
        for snap in self.stored_on(&self.base_subject(session)).await? {
            match self.open_snapshot(session, &snap.payload).await {
                Ok(state) if state.seq() == cut => return Ok(state),
                Ok(_) => {}
                Err(e @ LogError::Unavailable(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(session = %session, snapshot = snap.stream_seq, error = %e, "a base snapshot does not open as this session's state")
                }
            }
        }
        Err(crate::broken(
            session,
            cut + 1,
            cut,
            format!("the retention dropped the events through {cut} and their base snapshot is missing or unreadable"),
        ))
    }

    /// Drops `session`'s events decided more than `keep` before `now_ms`
    /// that a base snapshot can stand for (see the module documentation).
    /// `None`: nothing to drop (yet).
    pub async fn retain(&self, session: &SessionKey, keep: Duration, now_ms: u64) -> Result<Option<Retained>, LogError> {
        let known = self.refresh_data_key(session).await?;
        if known.erasing {
            return Ok(None);
        }
        let cutoff = now_ms.saturating_sub(keep.as_millis() as u64);
        let mut state = self.start_state(session).await?;
        let (mut p, mut stop, mut failed) = (state.seq(), false, None);
        self.replay_checked(session, state.seq(), |seq, replayed| {
            if stop || failed.is_some() {
                return;
            }
            let (event, fits) = match replayed {
                Replayed::Fits(event) => (event, true),
                Replayed::Refused(event, _) => (event, false),
            };
            if event.at_ms > cutoff {
                stop = true;
                return;
            }
            if !fits {
                state.pass_over(seq);
            } else if let Err(e) = state.apply(seq, &event) {
                failed = Some(LogError::Unfit { session: session.to_string(), seq, what: e.to_string() });
                return;
            }
            p = seq;
        })
        .await?;
        if let Some(e) = failed {
            return Err(e);
        }
        if p == 0 || known.cut.is_some_and(|cut| p <= cut) {
            return Ok(None);
        }
        let stream = self.js.get_stream_no_info(&self.cfg.stream).await.map_err(unavailable)?;
        if let Some(floor) = self.durable_floor(&stream).await?
            && floor < p
        {
            tracing::debug!(session = %session, cut = p, floor, "retention waits for a durable consumer to pass the cut");
            return Ok(None);
        }
        // 1. The base snapshot, stored before anything is dropped.
        self.store_snapshot(&self.base_subject(session), session, &state).await?;
        // 2. The cut, then 3. the purge.
        self.record_cut(session, p).await?;
        let purged = stream.purge().filter(self.subject(session)).sequence(p + 1).await.map_err(unavailable)?.purged;
        tracing::info!(session = %session, cut = p, purged, "retention dropped events a base snapshot stands for");
        Ok(Some(Retained { cut: p, purged }))
    }

    /// The lowest acknowledgement floor of the event stream's durable
    /// consumers: the retention never drops what one has yet to read.
    async fn durable_floor(&self, stream: &async_nats::jetstream::stream::Stream<()>) -> Result<Option<u64>, LogError> {
        let mut floor: Option<u64> = None;
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(unavailable)?;
            if info.config.durable_name.is_some() {
                let acked = info.ack_floor.stream_sequence;
                floor = Some(floor.map_or(acked, |f| f.min(acked)));
            }
        }
        Ok(floor)
    }
}
