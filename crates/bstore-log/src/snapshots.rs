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
//!
//! A sealed state larger than one message (the stream's
//! `max_message_bytes`, less room for headers) is stored in *parts*: its
//! bytes cut into pieces published on `<subject>.part.<i>` first, then the
//! snapshot's own message on the session's subject, empty, naming the
//! parts' stream sequences in [`PARTS_HEADER`]. Part subjects keep two
//! messages each too, so both snapshots a subject keeps find their parts.
//! The parts are not sealed on their own: the whole blob is, so a part
//! swapped, lost or replaced by a later write makes the snapshot fail to
//! open, and it is skipped like any other.

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use bstore_codec::{CodecError, SealError};
use bstore_domain::{SessionKey, SessionState};

use crate::{EventLog, LogError, unavailable};

/// How many snapshots of a session the stream keeps.
pub const SNAPSHOTS_KEPT: i64 = 2;

/// The header naming the event sequence a snapshot covers.
pub const COVERS_HEADER: &str = "Bstore-Covers";

/// The header of a snapshot stored in parts: the stream sequences of its
/// parts, in order, comma-separated.
pub const PARTS_HEADER: &str = "Bstore-Parts";

/// At most this many parts per snapshot: a state above
/// `PARTS_MAX × max_message_bytes` sealed is not snapshotted.
pub const PARTS_MAX: usize = 64;

/// Room left in each message for its headers.
const HEADER_ROOM: usize = 4 << 10;

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
    /// The sealed bytes (its parts put together; empty when one is gone).
    pub payload: bytes::Bytes,
    /// The parts it was stored in (1: one message).
    pub parts: usize,
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
    /// sequence it covers — in parts when it is larger than a message: what
    /// every snapshot write — regular, base, re-sealed — comes down to.
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
        let mut payload = bytes::Bytes::from(payload);
        let mut headers = HeaderMap::new();
        headers.insert(COVERS_HEADER, state.seq().to_string().as_str());
        let room = (self.cfg.max_message_bytes.max(0) as usize).saturating_sub(HEADER_ROOM).max(1);
        if payload.len() > room {
            let parts = payload.len().div_ceil(room);
            if parts > PARTS_MAX {
                return Err(LogError::TooLarge(format!("the snapshot of {session} is {} bytes, over {PARTS_MAX} parts", payload.len())));
            }
            // The parts first: the snapshot's own message names them, so a
            // reader never finds it before them.
            let mut seqs = Vec::with_capacity(parts);
            for (i, at) in (0..payload.len()).step_by(room).enumerate() {
                let part = payload.slice(at..(at + room).min(payload.len()));
                seqs.push(self.publish_acked(part_subject(subject, i), HeaderMap::new(), part).await?.to_string());
            }
            headers.insert(PARTS_HEADER, seqs.join(",").as_str());
            payload = bytes::Bytes::new();
        }
        self.publish_acked(subject.to_string(), headers, payload).await
    }

    async fn publish_acked(&self, subject: String, headers: HeaderMap, payload: bytes::Bytes) -> Result<u64, LogError> {
        let ack = self.js.publish_with_headers(subject, headers, payload).await.map_err(unavailable)?.await.map_err(unavailable)?;
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
        let mut out = vec![stored(&stream, &subject, newest).await?];
        // The stream keeps two per subject: the first one is the older, when
        // it is not the newest itself.
        if let Some(older) = found(stream.direct_get_first_for_subject(subject.clone()).await)?
            && older.sequence < out[0].stream_seq
        {
            out.push(stored(&stream, &subject, older).await?);
        }
        Ok(out)
    }

    /// The newest snapshot of `session` if it is usable: one direct get,
    /// what a load tries first (the others are read only when it fails).
    pub async fn newest_snapshot(&self, session: &SessionKey) -> Result<Option<SessionState>, LogError> {
        let stream = self.js.get_stream_no_info(&self.cfg.snapshot_stream).await.map_err(unavailable)?;
        let subject = self.snapshot_subject(session);
        let Some(newest) = found(stream.direct_get_last_for_subject(subject.clone()).await)? else { return Ok(None) };
        let newest = stored(&stream, &subject, newest).await?;
        Ok(self.usable(session, vec![newest]).await?.pop())
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
        for subject in [self.snapshot_subject(session), self.base_subject(session)] {
            stream.purge().filter(subject.clone()).await.map_err(unavailable)?;
            stream.purge().filter(format!("{subject}.part.*")).await.map_err(unavailable)?;
        }
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

/// The subject of part `i` of the snapshots stored on `subject`.
pub fn part_subject(subject: &str, i: usize) -> String {
    format!("{subject}.part.{i}")
}

/// The snapshot `m` read from `subject`, its parts put together if it was
/// stored in parts. A part that is gone, or is not on its subject, leaves
/// the payload empty (it then fails to open, and is skipped).
async fn stored(
    stream: &stream::Stream<()>,
    subject: &str,
    m: async_nats::jetstream::message::StreamMessage,
) -> Result<StoredSnapshot, LogError> {
    let covers = m.headers.get(COVERS_HEADER).and_then(|v| v.as_str().parse().ok());
    let Some(parts) = m.headers.get(PARTS_HEADER).map(|v| v.as_str().to_owned()) else {
        return Ok(StoredSnapshot { stream_seq: m.sequence, covers, payload: m.payload, parts: 1 });
    };
    let seqs: Vec<Option<u64>> = parts.split(',').map(|p| p.parse().ok()).collect();
    let mut payload = Vec::new();
    for (i, seq) in seqs.iter().enumerate().take(PARTS_MAX) {
        let part = match seq {
            Some(seq) => found(stream.direct_get(*seq).await)?.filter(|p| p.subject.as_str() == part_subject(subject, i)),
            None => None,
        };
        let Some(part) = part else {
            tracing::warn!(%subject, snapshot = m.sequence, part = i, "a part of a snapshot is gone");
            payload.clear();
            break;
        };
        payload.extend_from_slice(&part.payload);
    }
    Ok(StoredSnapshot { stream_seq: m.sequence, covers, payload: payload.into(), parts: seqs.len() })
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
