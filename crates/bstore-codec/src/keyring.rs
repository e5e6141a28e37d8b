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
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<u32, [u8; KEY_LEN]>,
    current: u32,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Keyring").field("ids", &self.ids()).field("current", &self.current).finish()
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
        Ok(Self { keys: map, current })
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
