//! Snapshots: a session's whole state, sealed and kept in JetStream beside
//! its events, so that a load replays only the events after it.
//!
//! The stream [`crate::LogConfig::snapshot_stream`] holds one subject per
//! session (`<snapshot_subject_prefix>.<tenant>.<session>`) and keeps the
//! last [`SNAPSHOTS_KEPT`] messages of each: the newest, and the one before
//! it to fall back on when the newest does not open. A snapshot is the
//! [`SessionState`] sealed for its session ([`Codec::encode_snapshot`]:
//! under the session's data key when the cluster has them, else under the
//! ring), so it opens only as the state of the session it was written for,
//! and it carries the sequence of the last event it covers inside the seal
//! (the state's own sequence) and, for listing, in the header
//! [`COVERS_HEADER`].
//!
//! A snapshot is derived data, never an authority: it is written off the
//! reply path from a state that already holds acknowledged events, and a
//! load believes it only when the log's events after it follow it (the
//! first names its sequence as predecessor) and it is not past the log's
//! last event of the session. Anything else — unreadable, foreign, sealed
//! under a destroyed data key, older than the session's erasure, ahead of
//! the log — is skipped with a warning, and the load falls back to the
//! older snapshot, then to the whole log.

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use bstore_codec::{CodecError, SealError};
use bstore_domain::{SessionKey, SessionState};

use crate::{EventLog, LogError, unavailable};

/// How many snapshots of a session the stream keeps.
pub const SNAPSHOTS_KEPT: i64 = 2;

/// The header naming the event sequence a snapshot covers.
pub const COVERS_HEADER: &str = "Bstore-Covers";

/// States larger than this are sealed on a blocking-pool thread.
const OFF_THREAD_BYTES: u64 = 128 << 10;

/// One stored snapshot of a session.
#[derive(Debug)]
pub struct StoredSnapshot {
    /// Its sequence in the snapshot stream.
    pub stream_seq: u64,
    /// The event sequence it claims to cover (from its header; the sealed
    /// state's own sequence is what a load uses).
    pub covers: Option<u64>,
    /// The sealed bytes.
    pub payload: bytes::Bytes,
}

impl EventLog {
    /// The subject that holds `session`'s snapshots.
    pub fn snapshot_subject(&self, session: &SessionKey) -> String {
        format!("{}.{}.{}", self.cfg.snapshot_subject_prefix, session.tenant, session.session)
    }

    /// Seals `state` as a snapshot of `session` and stores it; returns its
    /// sequence in the snapshot stream. Refused (503) while the session is
    /// being erased.
    pub async fn write_snapshot(&self, session: &SessionKey, state: &SessionState) -> Result<u64, LogError> {
        self.store_snapshot(&self.snapshot_subject(session), session, state).await
    }

    /// Seals `state` for `session` (off the serving thread when it is
    /// large) and publishes it on `subject` of the snapshot stream with the
    /// sequence it covers: what every snapshot write — regular, base,
    /// re-sealed — comes down to.
    pub(crate) async fn store_snapshot(&self, subject: &str, session: &SessionKey, state: &SessionState) -> Result<u64, LogError> {
        self.key_for_write(session).await?;
        let payload = if state.info().bytes < OFF_THREAD_BYTES {
            self.codec.encode_snapshot(session, state)
        } else {
            let (codec, session, state) = (self.codec.clone(), session.clone(), state.clone());
            tokio::task::spawn_blocking(move || codec.encode_snapshot(&session, &state))
                .await
                .map_err(|e| LogError::Unavailable(format!("sealing a snapshot failed: {e}")))?
        };
        if payload.len() > self.cfg.max_message_bytes.max(0) as usize {
            return Err(LogError::TooLarge(format!("the snapshot of {session} is {} bytes", payload.len())));
        }
        let mut headers = HeaderMap::new();
        headers.insert(COVERS_HEADER, state.seq().to_string().as_str());
        let ack = self
            .js
            .publish_with_headers(subject.to_string(), headers, payload.into())
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(ack.sequence)
    }

    /// The stored snapshots of `session`, newest first (at most
    /// [`SNAPSHOTS_KEPT`]).
    pub async fn stored_snapshots(&self, session: &SessionKey) -> Result<Vec<StoredSnapshot>, LogError> {
        let mut out = self.stored_on(&self.snapshot_subject(session)).await?;
        // The base snapshot at the retention's cut is a starting point too.
        out.extend(self.stored_on(&self.base_subject(session)).await?);
        out.sort_by_key(|s| std::cmp::Reverse(s.covers.unwrap_or(0)));
        Ok(out)
    }

    /// The snapshots stored on `subject`, newest first.
    pub(crate) async fn stored_on(&self, subject: &str) -> Result<Vec<StoredSnapshot>, LogError> {
        let stream = self.js.get_stream_no_info(&self.cfg.snapshot_stream).await.map_err(unavailable)?;
        let subject = subject.to_string();
        let Some(newest) = found(stream.direct_get_last_for_subject(subject.clone()).await)? else { return Ok(Vec::new()) };
        let mut out = vec![stored(newest)];
        // The stream keeps two per subject: the first one is the older, when
        // it is not the newest itself.
        if let Some(older) = found(stream.direct_get_first_for_subject(subject).await)?
            && older.sequence < out[0].stream_seq
        {
            out.push(stored(older));
        }
        Ok(out)
    }

    /// The newest snapshot of `session` if it is usable: one direct get,
    /// what a load tries first (the others are read only when it fails).
    pub async fn newest_snapshot(&self, session: &SessionKey) -> Result<Option<SessionState>, LogError> {
        let stream = self.js.get_stream_no_info(&self.cfg.snapshot_stream).await.map_err(unavailable)?;
        let Some(newest) = found(stream.direct_get_last_for_subject(self.snapshot_subject(session)).await)? else { return Ok(None) };
        Ok(self.usable(session, vec![stored(newest)]).await?.pop())
    }

    /// The usable snapshots of `session`, newest first, opened: those that
    /// open as this session's state and are not older than its erasure.
    /// What is skipped is logged.
    pub async fn snapshots(&self, session: &SessionKey) -> Result<Vec<SessionState>, LogError> {
        let stored = self.stored_snapshots(session).await?;
        self.usable(session, stored).await
    }

    async fn usable(&self, session: &SessionKey, stored: Vec<StoredSnapshot>) -> Result<Vec<SessionState>, LogError> {
        if stored.is_empty() {
            return Ok(Vec::new());
        }
        let erased_at = self.data_key_state(session).await?.erased.map(|e| e.marker);
        let mut out = Vec::with_capacity(stored.len());
        for snap in stored {
            let state = match self.open_snapshot(session, &snap.payload).await {
                Ok(state) => state,
                Err(e @ LogError::Unavailable(_)) => return Err(e),
                Err(e) => {
                    SKIPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(session = %session, snapshot = snap.stream_seq, error = %e, "skipping a snapshot that does not open as this session's state");
                    continue;
                }
            };
            if erased_at.is_some_and(|marker| state.seq() < marker) {
                // Written before the session was erased: what it holds is
                // what the erasure removed.
                continue;
            }
            out.push(state);
        }
        Ok(out)
    }

    /// Seals again under the current ring key every snapshot of `session`
    /// (its base snapshot included) that is sealed under another ring key,
    /// so that retiring that key leaves every snapshot readable; returns how
    /// many were written. Snapshots under the session's data key are left
    /// as they are (the key itself is re-wrapped). The regular ones are
    /// written again oldest first, so the newest stays the newest.
    pub async fn reseal_snapshots(&self, session: &SessionKey) -> Result<u64, LogError> {
        let current = self.codec.keyring().current();
        let stale =
            |payload: &[u8]| matches!(bstore_codec::sealed_under(payload), Some(bstore_codec::SealedUnder::Ring(k)) if k != current);
        let mut written = 0;
        for subject in [self.snapshot_subject(session), self.base_subject(session)] {
            let stored = self.stored_on(&subject).await?;
            if !stored.iter().any(|s| stale(&s.payload)) {
                continue;
            }
            for snap in stored.iter().rev() {
                let state = self.open_snapshot(session, &snap.payload).await?;
                self.store_snapshot(&subject, session, &state).await?;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Removes every snapshot of `session` (an erasure).
    pub async fn purge_snapshots(&self, session: &SessionKey) -> Result<(), LogError> {
        let stream = self.js.get_stream_no_info(&self.cfg.snapshot_stream).await.map_err(unavailable)?;
        stream.purge().filter(self.snapshot_subject(session)).await.map_err(unavailable)?;
        stream.purge().filter(self.base_subject(session)).await.map_err(unavailable)?;
        Ok(())
    }

    pub(crate) async fn open_snapshot(&self, session: &SessionKey, payload: &[u8]) -> Result<SessionState, LogError> {
        let unreadable = |source| LogError::Unreadable { session: session.to_string(), seq: 0, source };
        match self.codec.decode_snapshot(session, payload) {
            Err(CodecError::Seal(SealError::NoDataKey(_) | SealError::DataKeyGone(_))) => {
                self.refresh_data_key(session).await?;
                self.codec.decode_snapshot(session, payload).map_err(unreadable)
            }
            other => other.map_err(unreadable),
        }
    }
}

fn stored(m: async_nats::jetstream::message::StreamMessage) -> StoredSnapshot {
    let covers = m.headers.get(COVERS_HEADER).and_then(|v| v.as_str().parse().ok());
    StoredSnapshot { stream_seq: m.sequence, covers, payload: m.payload }
}

fn found(
    r: Result<async_nats::jetstream::message::StreamMessage, stream::DirectGetError>,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>, LogError> {
    match r {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable(e)),
    }
}

static SKIPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Snapshots this process's loads skipped because they did not open as
/// their session's state.
pub fn skipped_snapshots() -> u64 {
    SKIPPED.load(std::sync::atomic::Ordering::Relaxed)
}
