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
/// - 3: `Restored`, a session put back to an earlier point of its history
///   (an operator's `restore`), written as a `keys_changed` with a
///   `restored` field. A version-2 reader would take it for a plain key
///   change and miss the creds and the point, which is why it is version 3:
///   such a reader decodes it and refuses it by its version.
///
/// A field that a reader may ignore without misreading the change needs no
/// new version. `prev` (the event's place in the log) is one: events are
/// MessagePack maps with named fields and `Event` does not deny unknown
/// ones, so a reader that predates it skips it and applies the change as
/// it should; it only does not check the event's place.
pub const EVENT_SCHEMA_VERSION: u16 = 3;

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
///
/// On the wire (MessagePack, named fields) a restore is a `keys_changed`
/// carrying a `restored` map (its point and the creds), not a variant of
/// its own: a release that predates restores then decodes the event, finds
/// schema version 3 and refuses it by its version — deferring it, in the
/// Mongo materializer, to an upgraded instance — instead of failing to
/// decode it as if it were corrupt. [`Change::schema_version`] is what keeps
/// it from being read as a plain key change.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        patched: KeyPatches,
    },
    /// The session was logged out: creds and every key are gone.
    SessionDeleted,
    /// An operator put the session back to its state at an earlier point of
    /// its history (`baileys-store restore`): after this event the creds and
    /// every key are exactly what the fold through `to_seq` held. It records
    /// the difference from the state it was decided against — the creds
    /// whole, the keys that differ (set, patched or deleted) — so it is one
    /// event however far back the point lies, and the history before it is
    /// kept as it was.
    Restored {
        /// The session's sequence restored to: the state after its events
        /// through this one.
        to_seq: u64,
        /// The moment the operator named, when the point was given as a time
        /// (ms since the Unix epoch); `to_seq` is the last event at or
        /// before it.
        to_ms: Option<u64>,
        /// The creds after the restore (those at the point): `None` when the
        /// session had none then.
        creds: Option<Bytes>,
        /// Per type, per id: the value at the point, or `None` for a key
        /// that did not exist then.
        keys: KeyChanges,
        /// Per type, per id: the value at the point as a delta against the
        /// key's value before this event.
        patched: KeyPatches,
    },
}

/// [`Change`] as it is written: the restore's own fields ride in a
/// `keys_changed`.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum WireOut<'a> {
    CredsPut {
        creds: &'a Bytes,
    },
    KeysChanged {
        keys: &'a KeyChanges,
        #[serde(skip_serializing_if = "no_patches")]
        patched: &'a KeyPatches,
        #[serde(skip_serializing_if = "Option::is_none")]
        restored: Option<WireRestoredOut<'a>>,
    },
    SessionDeleted,
}

#[derive(Serialize)]
struct WireRestoredOut<'a> {
    to_seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_ms: Option<u64>,
    creds: Option<&'a Bytes>,
}

fn no_patches(p: &&KeyPatches) -> bool {
    p.is_empty()
}

/// [`Change`] as it is read.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireIn {
    CredsPut {
        creds: Bytes,
    },
    KeysChanged {
        keys: KeyChanges,
        #[serde(default)]
        patched: KeyPatches,
        #[serde(default)]
        restored: Option<WireRestoredIn>,
    },
    SessionDeleted,
}

#[derive(Deserialize)]
struct WireRestoredIn {
    to_seq: u64,
    #[serde(default)]
    to_ms: Option<u64>,
    creds: Option<Bytes>,
}

impl Serialize for Change {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Change::CredsPut { creds } => WireOut::CredsPut { creds },
            Change::KeysChanged { keys, patched } => WireOut::KeysChanged { keys, patched, restored: None },
            Change::SessionDeleted => WireOut::SessionDeleted,
            Change::Restored { to_seq, to_ms, creds, keys, patched } => WireOut::KeysChanged {
                keys,
                patched,
                restored: Some(WireRestoredOut { to_seq: *to_seq, to_ms: *to_ms, creds: creds.as_ref() }),
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Change {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match WireIn::deserialize(d)? {
            WireIn::CredsPut { creds } => Change::CredsPut { creds },
            WireIn::KeysChanged { keys, patched, restored: None } => Change::KeysChanged { keys, patched },
            WireIn::KeysChanged { keys, patched, restored: Some(r) } => {
                Change::Restored { to_seq: r.to_seq, to_ms: r.to_ms, creds: r.creds, keys, patched }
            }
            WireIn::SessionDeleted => Change::SessionDeleted,
        })
    }
}

impl Change {
    /// The lowest schema version that interprets this change correctly: 3
    /// for a restore, 2 when it carries patches, 1 otherwise.
    pub fn schema_version(&self) -> u16 {
        match self {
            Change::Restored { .. } => 3,
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
        let changed = |keys: &KeyChanges, patched: &KeyPatches| -> usize {
            let whole: usize = keys.values().flat_map(|ids| ids.values()).map(|v| v.as_ref().map_or(0, Bytes::len)).sum();
            let deltas: usize = patched.values().flat_map(|ids| ids.values()).map(crate::delta::Delta::encoded_len).sum();
            whole + deltas
        };
        match &self.change {
            Change::CredsPut { creds } => creds.len(),
            Change::KeysChanged { keys, patched } => changed(keys, patched),
            Change::Restored { creds, keys, patched, .. } => creds.as_ref().map_or(0, Bytes::len) + changed(keys, patched),
            Change::SessionDeleted => 0,
        }
    }

    /// Checks that this build can interpret the event and upgrades older
    /// schema versions in place.
    pub fn upgrade(self) -> Result<Self, u16> {
        match self.v {
            // Version 1 is version 2 without patches, and 2 is 3 without
            // restores: nothing to convert.
            1..=3 => Ok(self),
            other => Err(other),
        }
    }

    /// Every key the event touches, with its type: written, patched or deleted.
    pub fn touched_keys(&self) -> Vec<(&KeyType, &KeyId)> {
        match &self.change {
            Change::KeysChanged { keys, patched } | Change::Restored { keys, patched, .. } => keys
                .iter()
                .flat_map(|(t, ids)| ids.keys().map(move |id| (t, id)))
                .chain(patched.iter().flat_map(|(t, ids)| ids.keys().map(move |id| (t, id))))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether the event sets the creds (to a value or to none): a
    /// `CredsPut` or a restore.
    pub fn touches_creds(&self) -> bool {
        matches!(self.change, Change::CredsPut { .. } | Change::Restored { .. })
    }

    /// A short name of the change, for logs and audit listings.
    pub fn kind(&self) -> &'static str {
        match self.change {
            Change::CredsPut { .. } => "creds_put",
            Change::KeysChanged { .. } => "keys_changed",
            Change::SessionDeleted => "session_deleted",
            Change::Restored { .. } => "restored",
        }
    }
}
