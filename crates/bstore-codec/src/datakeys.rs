//! What a process knows of each session's data key.
//!
//! A session's events and snapshots are sealed under a data key of its own (format 2, see `seal.rs`) once the cluster has data
//! keys on. The key is random, kept *wrapped* — sealed under a ring key for
//! its session and generation ([`Codec::wrap_data_key`](crate::Codec::wrap_data_key)) — in a store the
//! log owns (`bstore-log`), and destroyed when the session is erased: what
//! it sealed stays in the log and in backups, unreadable by anyone, the
//! holder of every sealing key included.
//!
//! [`DataKeys`] is the in-memory side, shared by every clone of a codec:
//! per session, the generation in use and its key, or the knowledge that
//! the session has none (not created yet, or erased). Sealing for a session
//! with a key uses it; for one without, the ring (the format every release
//! reads), which is what happens until the cluster switches data keys on.
//! Opening a format-2 blob of a session this process has not looked up
//! fails with [`SealError::NoDataKey`](crate::SealError::NoDataKey), so that the caller (which can
//! reach the store) looks it up and tries again; a generation that is not
//! the session's any more fails with [`SealError::DataKeyGone`](crate::SealError::DataKeyGone).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use bstore_domain::SessionKey;

use crate::KEY_LEN;

/// Where a session's erasure left its log: every message before `marker`
/// belongs to the erased past; `marker` is the erasure's own event (a
/// session deletion sealed under the ring) and `prev` the message before
/// it, after which a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Erased {
    /// The sequence of the erasure's marker event.
    pub marker: u64,
    /// The sequence of the session's message before the marker (0: none).
    pub prev: u64,
    /// When the erasure was recorded (milliseconds since the epoch).
    pub at_ms: u64,
}

/// What is known of one session.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKeyState {
    /// The generation in use and its key, when the session has one.
    pub key: Option<(u32, Arc<[u8; KEY_LEN]>)>,
    /// Its last erasure, if it was ever erased.
    pub erased: Option<Erased>,
    /// An erasure has begun and not finished: nothing may be sealed for the
    /// session meanwhile.
    pub erasing: bool,
    /// The audit retention dropped the session's events through this
    /// sequence; a base snapshot at it stands for them.
    pub cut: Option<u64>,
}

impl std::fmt::Debug for DataKeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("DataKeyState")
            .field("generation", &self.key.as_ref().map(|(g, _)| *g))
            .field("erased", &self.erased)
            .field("erasing", &self.erasing)
            .finish()
    }
}

/// The data keys this process has looked up, shared by every clone of the
/// codec that holds it.
#[derive(Clone, Default)]
pub struct DataKeys {
    known: Arc<RwLock<HashMap<SessionKey, DataKeyState>>>,
    enabled: Arc<AtomicBool>,
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeys").field("enabled", &self.enabled()).field("known", &self.read().len()).finish()
    }
}

impl DataKeys {
    /// Whether new data keys are made: the cluster's choice (off until
    /// every instance reads format 2). Blobs already sealed under data
    /// keys open either way.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Switches the making of data keys on or off, for every clone.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }

    /// What is known of `session`, if it was looked up.
    pub fn get(&self, session: &SessionKey) -> Option<DataKeyState> {
        self.read().get(session).cloned()
    }

    /// Records what the store says of `session`.
    pub fn set(&self, session: &SessionKey, state: DataKeyState) {
        self.known.write().unwrap_or_else(|e| e.into_inner()).insert(session.clone(), state);
    }

    /// Forgets `session`, so the next use looks it up again: after its
    /// record changed, or a deletion that may have been an erasure.
    pub fn forget(&self, session: &SessionKey) {
        self.known.write().unwrap_or_else(|e| e.into_inner()).remove(session);
    }

    /// How many sessions are known.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no session is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn key_of(&self, session: &SessionKey) -> Option<(u32, Arc<[u8; KEY_LEN]>)> {
        self.read().get(session).and_then(|s| s.key.clone())
    }

    pub(crate) fn looked_up(&self, session: &SessionKey) -> bool {
        self.read().contains_key(session)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SessionKey, DataKeyState>> {
        self.known.read().unwrap_or_else(|e| e.into_inner())
    }
}
