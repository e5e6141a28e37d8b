//! The keyring: every key that may open a blob, and the one that seals.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Length of a sealing key in bytes.
pub const KEY_LEN: usize = 32;

/// Why a keyring could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No key was given.
    #[error("the keyring is empty")]
    Empty,
    /// A key spec could not be parsed.
    #[error("bad key entry {entry:?}: {reason}")]
    Parse {
        /// The entry as written, with the key material cut off.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The same id was given twice with different keys.
    #[error("key id {0} is given twice")]
    Duplicate(u32),
    /// The configured current key is not in the ring.
    #[error("current key id {0} is not in the keyring")]
    NoCurrent(u32),
}

/// Keys by id. The current key seals; every key opens.
///
/// Beside the sealing keys the ring holds the *index key*, which seals
/// nothing: it only names things (the keyed hashes that stand in for key
/// ids in Redis field names and Mongo document ids). Names must not change
/// when the sealing key rotates, so the index key does not follow the
/// current key: it is derived from the lowest-id key of the ring unless it
/// is given on its own ([`Keyring::with_index`]).
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<u32, [u8; KEY_LEN]>,
    current: u32,
    index: [u8; KEY_LEN],
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Keyring").field("ids", &self.ids()).field("current", &self.current).finish_non_exhaustive()
    }
}

impl Keyring {
    /// Builds a keyring. `current` defaults to the highest id, so adding a
    /// key with a higher id is how a key is rotated in.
    pub fn new(keys: impl IntoIterator<Item = (u32, [u8; KEY_LEN])>, current: Option<u32>) -> Result<Self, KeyError> {
        let mut map = BTreeMap::new();
        for (id, key) in keys {
            if let Some(old) = map.insert(id, key)
                && old != key
            {
                return Err(KeyError::Duplicate(id));
            }
        }
        let current = match current {
            Some(id) if map.contains_key(&id) => id,
            Some(id) => return Err(KeyError::NoCurrent(id)),
            None => *map.keys().next_back().ok_or(KeyError::Empty)?,
        };
        let lowest = map.values().next().expect("the ring is not empty");
        let index = derive(lowest, b"bstore/index/v1");
        Ok(Self { keys: map, current, index })
    }

    /// The same ring with `index` as its index key instead of the derived
    /// one: for an operator who retires the lowest key while the names in
    /// the projections must stay as they are.
    pub fn with_index(mut self, index: [u8; KEY_LEN]) -> Self {
        self.index = index;
        self
    }

    /// The index key (see the type's documentation). Secret like the
    /// sealing keys: with it, a guessed contact can be tested against the
    /// names in a projection.
    pub fn index_key(&self) -> &[u8; KEY_LEN] {
        &self.index
    }

    /// Parses keys written as `id:base64` entries separated by commas,
    /// whitespace or new lines; `#` starts a comment. This is the format of
    /// `BSTORE_KEYS` and of a key file.
    pub fn parse_entries(text: &str) -> Result<Vec<(u32, [u8; KEY_LEN])>, KeyError> {
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            for entry in line.split([',', ' ', '\t']).filter(|e| !e.is_empty()) {
                let shown = || entry.split(':').next().unwrap_or_default().to_owned() + ":…";
                let (id, b64) = entry.split_once(':').ok_or_else(|| KeyError::Parse { entry: shown(), reason: "expected id:base64" })?;
                let id: u32 = id.parse().map_err(|_| KeyError::Parse { entry: shown(), reason: "the id is not a whole number" })?;
                let raw = STANDARD.decode(b64).map_err(|_| KeyError::Parse { entry: shown(), reason: "the key is not base64" })?;
                let key: [u8; KEY_LEN] =
                    raw.try_into().map_err(|_| KeyError::Parse { entry: shown(), reason: "the key is not 32 bytes" })?;
                out.push((id, key));
            }
        }
        Ok(out)
    }

    /// Formats one key as an entry [`Keyring::parse_entries`] reads.
    pub fn format_entry(id: u32, key: &[u8; KEY_LEN]) -> String {
        format!("{id}:{}", STANDARD.encode(key))
    }

    /// A fresh random key from the operating system.
    pub fn generate_key() -> [u8; KEY_LEN] {
        let mut key = [0u8; KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).expect("the OS random source works");
        key
    }

    /// The id of the sealing key.
    pub fn current(&self) -> u32 {
        self.current
    }

    /// Every id in the ring, ascending.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    pub(crate) fn get(&self, id: u32) -> Option<&[u8; KEY_LEN]> {
        self.keys.get(&id)
    }

    pub(crate) fn current_key(&self) -> &[u8; KEY_LEN] {
        &self.keys[&self.current]
    }
}

/// HMAC-SHA256 of `label` under `key`.
fn derive(key: &[u8; KEY_LEN], label: &[u8]) -> [u8; KEY_LEN] {
    let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), label);
    tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
}
