//! Sessions' data keys: made, looked up, followed and destroyed.
//!
//! Each session's data key lives, wrapped under a ring key
//! ([`Codec::wrap_data_key`]), in the JetStream KV bucket
//! [`DATA_KEYS_BUCKET`], key `<tenant>.<session>`, with one revision kept
//! (`history = 1`): a record replaced or erased leaves no older revision
//! behind in the bucket. The record is MessagePack:
//!
//! ```text
//! { g: generation (u32), k: wrapped key (bin, absent once erased),
//!   erasing: bool, erased: { marker, prev, at_ms } (absent if never erased) }
//! ```
//!
//! - **Made** by the first append after the cluster has data keys on
//!   ([`EventLog::append`] asks [`EventLog::key_for_write`]): generation
//!   1, or the erased generation + 1, written with a compare-and-set on the
//!   record's revision so two writers never make two keys.
//! - **Looked up** once per session and process, by the first replay or
//!   append, and cached in the codec's [`bstore_codec::DataKeys`].
//! - **Followed**: a process that holds sessions watches the bucket
//!   ([`EventLog::watch_data_keys`]) and forgets what it cached of a
//!   session whose record changed; a replay that passes a session deletion
//!   forgets it too, so that a write after an erasure never seals under the
//!   destroyed key even before the watch has told.
//! - **Destroyed** by [`EventLog::erase`]:
//!   1. the record is rewritten without its key and marked `erasing` (no
//!      append of the session can seal anything until step 3);
//!   2. a session deletion is appended, sealed under the ring — the
//!      *marker*, readable for ever, so every projection and replay clears
//!      the session;
//!   3. the record is rewritten with `erased = {marker, prev}` and no key.
//!
//!   Replays then start after `prev`: what precedes the marker is skipped,
//!   and could not be opened anyway. The next write makes a new generation.
//!   An erasure cut short between the steps leaves the session refusing
//!   writes (503) until `erase` is run again, which finishes it.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, kv};
use bstore_codec::{CodecError, DataKeyState, Erased, SealError, SealedUnder, sealed_under};
use bstore_domain::{Change, Event, SessionKey};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::{EventLog, LogError, unavailable};

/// The bucket of the sessions' wrapped data keys.
pub const DATA_KEYS_BUCKET: &str = "BSTORE_DATAKEYS";

/// Attempts at a compare-and-set of a record before giving up (503).
const CAS_ATTEMPTS: usize = 5;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    #[serde(rename = "g")]
    generation: u32,
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    wrapped: Option<Vec<u8>>,
    #[serde(default)]
    erasing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    erased: Option<Erased>,
    /// The retention's cut (`retention.rs`): events through this sequence
    /// were dropped; the base snapshot at it stands for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cut: Option<u64>,
}

/// What [`EventLog::erase`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    /// The erasure's marker event (a session deletion sealed under the ring).
    pub marker: u64,
    /// The session's message before the marker (0: none).
    pub prev: u64,
    /// The destroyed generation, if the session had a data key.
    pub destroyed_generation: Option<u32>,
    /// Events before the marker sealed under the destroyed data keys: now
    /// unreadable for good.
    pub shredded_events: u64,
    /// Events before the marker sealed under ring keys (written before the
    /// cluster had data keys on, or markers of earlier erasures), by key id:
    /// these stay readable to whoever holds that key.
    pub under_ring: BTreeMap<u32, u64>,
}

/// The session a data-key record's name stands for.
fn session_of_key(name: &str) -> Option<SessionKey> {
    let (tenant, session) = name.split_once('.')?;
    SessionKey::parse(tenant, session).ok()
}

fn key_name(session: &SessionKey) -> String {
    format!("{}.{}", session.tenant, session.session)
}

impl EventLog {
    /// The data-key bucket, opened (or made) on first use.
    async fn data_key_bucket(&self) -> Result<&kv::Store, LogError> {
        self.data_key_bucket
            .get_or_try_init(|| async {
                if let Ok(store) = self.js.get_key_value(DATA_KEYS_BUCKET).await {
                    return Ok(store);
                }
                let cfg = kv::Config {
                    bucket: DATA_KEYS_BUCKET.into(),
                    description: "baileys-store: each session's data key, wrapped under a sealing key".into(),
                    history: 1,
                    num_replicas: self.cfg.replicas.max(1),
                    storage: match self.cfg.storage {
                        crate::Storage::File => jetstream::stream::StorageType::File,
                        crate::Storage::Memory => jetstream::stream::StorageType::Memory,
                    },
                    ..Default::default()
                };
                match self.js.create_key_value(cfg).await {
                    Ok(store) => Ok(store),
                    // Made by another process at the same moment.
                    Err(e) => self.js.get_key_value(DATA_KEYS_BUCKET).await.map_err(|_| unavailable(e)),
                }
            })
            .await
    }

    async fn read_record(&self, session: &SessionKey) -> Result<(Record, Option<u64>), LogError> {
        let entry = self.data_key_bucket().await?.entry(key_name(session)).await.map_err(unavailable)?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = rmp_serde::from_slice(&e.value).map_err(|err| unreadable_record(session, err.to_string()))?;
                Ok((record, Some(e.revision)))
            }
            // Deleted or purged by hand: as if never made. What was sealed
            // under it cannot be opened and says so.
            Some(e) => Ok((Record::default(), Some(e.revision))),
            None => Ok((Record::default(), None)),
        }
    }

    /// Writes `record`: creates it when `revision` is `None`, else updates
    /// it only if it is still at `revision`. The inner error is a lost
    /// compare-and-set (or a refusal), for the caller to read again.
    async fn write_record(&self, session: &SessionKey, record: &Record, revision: Option<u64>) -> Result<Result<(), String>, LogError> {
        let value = Bytes::from(rmp_serde::to_vec_named(record).expect("plain data"));
        let bucket = self.data_key_bucket().await?;
        Ok(match revision {
            None => bucket.create(key_name(session), value).await.map(|_| ()).map_err(|e| e.to_string()),
            Some(rev) => bucket.update(key_name(session), value, rev).await.map(|_| ()).map_err(|e| e.to_string()),
        })
    }

    fn state_of(&self, session: &SessionKey, record: &Record) -> Result<DataKeyState, LogError> {
        let key = match &record.wrapped {
            Some(wrapped) => Some((
                record.generation,
                std::sync::Arc::new(
                    self.codec
                        .unwrap_data_key(session, record.generation, wrapped)
                        .map_err(|e| unreadable_record(session, e.to_string()))?,
                ),
            )),
            None => None,
        };
        Ok(DataKeyState { key, erased: record.erased, erasing: record.erasing, cut: record.cut })
    }

    /// What is known of `session`'s data key, looked up in the bucket if
    /// this process has not yet.
    pub async fn data_key_state(&self, session: &SessionKey) -> Result<DataKeyState, LogError> {
        if let Some(state) = self.codec.data_keys().get(session) {
            return Ok(state);
        }
        self.refresh_data_key(session).await
    }

    /// Looks `session`'s data key up again.
    pub async fn refresh_data_key(&self, session: &SessionKey) -> Result<DataKeyState, LogError> {
        let (record, _) = self.read_record(session).await?;
        let state = self.state_of(session, &record)?;
        self.codec.data_keys().set(session, state.clone());
        Ok(state)
    }

    /// Makes sure what is sealed next for `session` is sealed as it must
    /// be: under its data key, made now if the cluster has data keys on and
    /// the session has none. Refused (503) while an erasure of the session
    /// is unfinished.
    pub async fn key_for_write(&self, session: &SessionKey) -> Result<(), LogError> {
        for _ in 0..CAS_ATTEMPTS {
            let state = self.data_key_state(session).await?;
            if state.erasing {
                // Looked up again next time: the erasure may finish meanwhile.
                self.codec.data_keys().forget(session);
                return Err(LogError::Unavailable("the session is being erased; retry".into()));
            }
            if state.key.is_some() || !self.codec.data_keys().enabled() {
                return Ok(());
            }
            let (record, revision) = self.read_record(session).await?;
            if record.wrapped.is_some() || record.erasing {
                // Made or changed by someone else since it was cached.
                self.codec.data_keys().set(session, self.state_of(session, &record)?);
                continue;
            }
            let generation = record.generation + 1;
            let key = bstore_codec::Codec::generate_data_key();
            let made = Record { generation, wrapped: Some(self.codec.wrap_data_key(session, generation, &key)), ..record };
            match self.write_record(session, &made, revision).await? {
                Ok(()) => {
                    tracing::debug!(session = %session, generation, "made a data key");
                    self.codec.data_keys().set(session, DataKeyState {
                        key: Some((generation, std::sync::Arc::new(key))),
                        erased: made.erased,
                        erasing: false,
                        cut: made.cut,
                    });
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(session = %session, error = %e, "the data-key record changed meanwhile; reading it again");
                    self.codec.data_keys().forget(session);
                }
            }
        }
        Err(LogError::Unavailable("the session's data-key record keeps changing; retry".into()))
    }

    /// Where a replay of `session` after `after` starts: after the message
    /// before its last erasure's marker when `after` is before the marker.
    /// A replay never starts before the retention's cut either: the events
    /// through it are gone (a fold from the start begins at the base
    /// snapshot, `fold.rs`).
    pub(crate) async fn replay_start(&self, session: &SessionKey, after: u64) -> Result<u64, LogError> {
        let state = self.data_key_state(session).await?;
        let mut start = match state.erased {
            Some(e) if after < e.marker => after.max(e.prev),
            _ => after,
        };
        if let Some(cut) = state.cut {
            start = start.max(cut);
        }
        Ok(start)
    }

    /// Records the retention's cut at `seq` (never moving it back).
    pub(crate) async fn record_cut(&self, session: &SessionKey, seq: u64) -> Result<(), LogError> {
        for _ in 0..CAS_ATTEMPTS {
            let (record, revision) = self.read_record(session).await?;
            if record.cut.is_some_and(|c| c >= seq) {
                return Ok(());
            }
            if record.erasing {
                return Err(LogError::Unavailable("the session is being erased".into()));
            }
            let cut = Record { cut: Some(seq), ..record };
            match self.write_record(session, &cut, revision).await? {
                Ok(()) => {
                    self.codec.data_keys().set(session, self.state_of(session, &cut)?);
                    return Ok(());
                }
                Err(e) => tracing::debug!(session = %session, error = %e, "the data-key record changed meanwhile; reading it again"),
            }
        }
        Err(LogError::Unavailable("the session's data-key record keeps changing; retry".into()))
    }

    /// Opens an event, looking the session's data key up again once when
    /// the cached one does not fit (a generation made or erased since).
    pub(crate) async fn decode_fresh(&self, session: &SessionKey, seq: u64, payload: &[u8]) -> Result<Event, LogError> {
        match self.decode(session, seq, payload) {
            Err(LogError::Unreadable { source: CodecError::Seal(SealError::NoDataKey(_) | SealError::DataKeyGone(_)), .. }) => {
                self.refresh_data_key(session).await?;
                self.decode(session, seq, payload)
            }
            other => other,
        }
    }

    /// Called with each event a replay hands over: a session deletion may be
    /// an erasure's marker, after which the cached data key is stale.
    pub(crate) fn passed(&self, session: &SessionKey, event: &Event) {
        if matches!(event.change, Change::SessionDeleted) {
            self.codec.data_keys().forget(session);
        }
    }

    /// Sessions whose data-key record changes, as the bucket tells: what was
    /// cached of each is forgotten first. A consumer of this (the service)
    /// drops the session's actor when the record says erased or erasing, so
    /// that nothing erased stays in memory. Ends when the watch fails; call
    /// again.
    pub async fn watch_data_keys(&self) -> Result<impl Stream<Item = (SessionKey, bool)> + Send + use<>, LogError> {
        let watch = self.data_key_bucket().await?.watch_all().await.map_err(unavailable)?;
        let keys = self.codec.data_keys().clone();
        Ok(watch.filter_map(move |entry| {
            let keys = keys.clone();
            async move {
                let entry = entry.ok()?;
                let session = session_of_key(&entry.key)?;
                let record: Option<Record> = match entry.operation {
                    kv::Operation::Put => rmp_serde::from_slice(&entry.value).ok(),
                    _ => None,
                };
                let gone = record.as_ref().is_none_or(|r| r.erasing || r.wrapped.is_none());
                // Our own new generation needs no new look-up.
                let same = match (&record, keys.get(&session)) {
                    (Some(r), Some(known)) => {
                        !r.erasing && r.erased == known.erased && r.wrapped.is_some() && known.key.as_ref().map(|(g, _)| *g) == Some(r.generation)
                    }
                    _ => false,
                };
                if !same {
                    keys.forget(&session);
                }
                Some((session, gone))
            }
        }))
    }

    /// Erases `session`: destroys its data key and appends the marker after
    /// which replays start (see the module's documentation). Run again after
    /// a failure, it finishes what was begun.
    pub async fn erase(&self, session: &SessionKey, at_ms: u64) -> Result<Erasure, LogError> {
        // 1. The key goes, and the session takes no write until step 3.
        let destroyed_generation = loop {
            let (record, revision) = self.read_record(session).await?;
            let destroyed = record.wrapped.is_some().then_some(record.generation);
            let erasing = Record { wrapped: None, erasing: true, ..record };
            match self.write_record(session, &erasing, revision).await? {
                Ok(()) => break destroyed,
                Err(e) => tracing::debug!(session = %session, error = %e, "the data-key record changed meanwhile; reading it again"),
            }
        };
        self.codec.data_keys().forget(session);
        // What the erasure leaves behind, counted from the blobs' headers.
        let (mut shredded_events, mut under_ring) = (0u64, BTreeMap::new());
        self.replay_raw(session, 0, |_, _, blob| {
            match sealed_under(blob) {
                Some(SealedUnder::DataKey(_)) => shredded_events += 1,
                Some(SealedUnder::Ring(id)) => *under_ring.entry(id).or_insert(0u64) += 1,
                None => {}
            }
            Ok(())
        })
        .await?;
        // 2. The marker, fenced like any append: a write that lands first is
        // erased with the rest.
        let (marker, prev) = loop {
            let last = self.last_seq(session).await?;
            let event = Event::new(at_ms, None, Change::SessionDeleted);
            match self.append_under_ring(session, last, &event).await {
                Ok(seq) => break (seq, last),
                Err(LogError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        };
        // 3. Done: replays start after `prev`, the next write makes a key.
        loop {
            let (record, revision) = self.read_record(session).await?;
            let erased = Record { wrapped: None, erasing: false, erased: Some(Erased { marker, prev, at_ms }), ..record };
            match self.write_record(session, &erased, revision).await? {
                Ok(()) => break,
                Err(e) => tracing::debug!(session = %session, error = %e, "the data-key record changed meanwhile; reading it again"),
            }
        }
        self.codec.data_keys().forget(session);
        tracing::info!(session = %session, marker, destroyed_generation, shredded_events, "session erased");
        // Snapshots of what was erased go too: those sealed under the
        // destroyed key could not be opened anyway, those under the ring
        // (written before data keys) could.
        self.purge_snapshots(session).await?;
        Ok(Erasure { marker, prev, destroyed_generation, shredded_events, under_ring })
    }

    /// Every session that has a data-key record, with its state as stored
    /// (for `keys status`): sessions, their generations and how many are
    /// wrapped under each ring key.
    pub async fn data_key_records(&self) -> Result<Vec<(SessionKey, Option<u32>, Option<Erased>, bool)>, LogError> {
        let bucket = self.data_key_bucket().await?.clone();
        let mut out = Vec::new();
        let mut subjects = bucket.stream.info_with_subjects(format!("{}>", bucket.prefix)).await.map_err(unavailable)?;
        let mut names = Vec::new();
        while let Some(item) = subjects.next().await {
            let (subject, _) = item.map_err(unavailable)?;
            if let Some(name) = subject.strip_prefix(&bucket.prefix) {
                names.push(name.to_owned());
            }
        }
        for name in names {
            let Some(session) = session_of_key(&name) else { continue };
            let (record, _) = self.read_record(&session).await?;
            let wrapped_under = record.wrapped.as_deref().and_then(sealed_under).and_then(|u| match u {
                SealedUnder::Ring(id) => Some(id),
                SealedUnder::DataKey(_) => None,
            });
            out.push((session, wrapped_under, record.erased, record.erasing));
        }
        Ok(out)
    }

    /// Re-wraps every data key that is not wrapped under the ring's current
    /// key (after a rotation). Returns how many were re-wrapped.
    pub async fn rewrap_data_keys(&self) -> Result<u64, LogError> {
        let current = self.codec.keyring().current();
        let mut done = 0;
        for (session, under, _, _) in self.data_key_records().await? {
            if under.is_none_or(|id| id == current) {
                continue;
            }
            for _ in 0..CAS_ATTEMPTS {
                let (record, Some(revision)) = self.read_record(&session).await? else { break };
                let Some(wrapped) = &record.wrapped else { break };
                let key =
                    self.codec.unwrap_data_key(&session, record.generation, wrapped).map_err(|e| unreadable_record(&session, e.to_string()))?;
                let rewrapped = Record { wrapped: Some(self.codec.wrap_data_key(&session, record.generation, &key)), ..record.clone() };
                if self.write_record(&session, &rewrapped, Some(revision)).await?.is_ok() {
                    done += 1;
                    break;
                }
            }
        }
        Ok(done)
    }
}

/// A record that does not parse or whose key does not open: the session's
/// data cannot be read (520), which is never "not found".
fn unreadable_record(session: &SessionKey, why: String) -> LogError {
    LogError::Unreadable { session: session.to_string(), seq: 0, source: CodecError::Decode(format!("its data-key record: {why}")) }
}
