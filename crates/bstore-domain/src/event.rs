//! Events: what was decided, in the past tense. Events are a wire format —
//! they are stored forever in the log and read back by every later version —
//! so each carries a schema version and is upgraded on read, never
//! reinterpreted silently.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ids::{KeyId, KeyType};

/// The schema version this build writes. Readers accept this one and every
/// older one they know how to upgrade.
pub const EVENT_SCHEMA_VERSION: u16 = 1;

/// The changes of one `keys.set`, by type then id. `None` deletes the key.
pub type KeyChanges = BTreeMap<KeyType, BTreeMap<KeyId, Option<Bytes>>>;

/// One recorded change to a session, with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Schema version of this record ([`EVENT_SCHEMA_VERSION`] when written).
    pub v: u16,
    /// When the write was decided, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The client's request id, if it sent one; also the log's dedup id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rid: Option<String>,
    /// What changed.
    pub change: Change,
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
    KeysChanged {
        /// Per type, per id: the new value, or `None` for a deletion.
        keys: KeyChanges,
    },
    /// The session was logged out: creds and every key are gone.
    SessionDeleted,
}

impl Event {
    /// Checks that this build can interpret the event and upgrades older
    /// schema versions in place. Version 1 is the only one so far.
    pub fn upgrade(self) -> Result<Self, u16> {
        match self.v {
            1 => Ok(self),
            other => Err(other),
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
