//! Events: what was decided, in the past tense. Events are a wire format —
//! they are stored forever in the log and read back by every later version —
//! so each carries a schema version and is upgraded on read, never
//! reinterpreted silently.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::delta::Delta;
use crate::ids::{KeyId, KeyType};

/// The newest schema version this build reads and writes. Each event is
/// written with the *lowest* version that interprets it correctly
/// ([`Event::new`]), so that a reader of the previous release reads every
/// event it can interpret and refuses, by its version, only those it would
/// misread. Readers accept this one and every older one they know how to
/// upgrade.
///
/// - 1: whole values only.
/// - 2: `KeysChanged` carries `patched` values (deltas against the previous
///   value). A version-1 reader would ignore that field and lose those
///   changes, which is why an event with patches is version 2 — and why one
///   without is still version 1.
///
/// A field that a reader may ignore without misreading the change needs no
/// new version. `prev` (the event's place in the log) is one: events are
/// MessagePack maps with named fields and `Event` does not deny unknown
/// ones, so a reader that predates it skips it and applies the change as
/// it should; it only does not check the event's place.
pub const EVENT_SCHEMA_VERSION: u16 = 2;

/// The changes of one `keys.set`, by type then id. `None` deletes the key.
pub type KeyChanges = BTreeMap<KeyType, BTreeMap<KeyId, Option<Bytes>>>;

/// Values of one `keys.set` recorded as deltas against their previous value.
pub type KeyPatches = BTreeMap<KeyType, BTreeMap<KeyId, Delta>>;

/// One recorded change to a session, with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Schema version of this record: the lowest that interprets it
    /// correctly ([`Change::schema_version`]).
    pub v: u16,
    /// When the write was decided, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The client's request id, if it sent one; also the log's dedup id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rid: Option<String>,
    /// What changed.
    pub change: Change,
    /// The stream sequence of the session's previous event when this one was
    /// appended (0: it was the first), set by the log at append time from the
    /// same expected sequence that fences the append. Sealed with the rest,
    /// it binds the event to its place: a copy of the event put anywhere
    /// else in the log no longer fits its predecessor (see [`crate::chain`]).
    /// `None` on events written before the chain existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<u64>,
}

/// What an event changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// The whole creds object was replaced.
    CredsPut {
        /// The client-encoded creds object.
        creds: Bytes,
    },
    /// Keys of one or more types were written or deleted, all together.
    /// A key appears in `keys` or in `patched`, never in both.
    KeysChanged {
        /// Per type, per id: the new value, or `None` for a deletion.
        keys: KeyChanges,
        /// Per type, per id: the new value as a delta against the key's
        /// value before this event (which always exists).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        patched: KeyPatches,
    },
    /// The session was logged out: creds and every key are gone.
    SessionDeleted,
}

impl Change {
    /// The lowest schema version that interprets this change correctly: 2
    /// when it carries patches, 1 otherwise.
    pub fn schema_version(&self) -> u16 {
        match self {
            Change::KeysChanged { patched, .. } if !patched.is_empty() => 2,
            _ => 1,
        }
    }
}

impl Event {
    /// A new event, not yet in the log (`prev` is set when it is appended),
    /// with the lowest schema version that interprets `change` correctly.
    pub fn new(at_ms: u64, rid: Option<String>, change: Change) -> Self {
        Self { v: change.schema_version(), at_ms, rid, change, prev: None }
    }

    /// Bytes of values (whole or as deltas) the event carries: what sealing
    /// it costs in proportion to.
    pub fn value_bytes(&self) -> usize {
        match &self.change {
            Change::CredsPut { creds } => creds.len(),
            Change::KeysChanged { keys, patched } => {
                let whole: usize = keys.values().flat_map(|ids| ids.values()).map(|v| v.as_ref().map_or(0, Bytes::len)).sum();
                let deltas: usize = patched.values().flat_map(|ids| ids.values()).map(crate::delta::Delta::encoded_len).sum();
                whole + deltas
            }
            Change::SessionDeleted => 0,
        }
    }

    /// Checks that this build can interpret the event and upgrades older
    /// schema versions in place.
    pub fn upgrade(self) -> Result<Self, u16> {
        match self.v {
            // Version 1 is version 2 without patches: nothing to convert.
            1 | 2 => Ok(self),
            other => Err(other),
        }
    }

    /// Every key the event touches, with its type: written, patched or deleted.
    pub fn touched_keys(&self) -> Vec<(&KeyType, &KeyId)> {
        match &self.change {
            Change::KeysChanged { keys, patched } => keys
                .iter()
                .flat_map(|(t, ids)| ids.keys().map(move |id| (t, id)))
                .chain(patched.iter().flat_map(|(t, ids)| ids.keys().map(move |id| (t, id))))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A short name of the change, for logs and audit listings.
    pub fn kind(&self) -> &'static str {
        match self.change {
            Change::CredsPut { .. } => "creds_put",
            Change::KeysChanged { .. } => "keys_changed",
            Change::SessionDeleted => "session_deleted",
        }
    }
}
