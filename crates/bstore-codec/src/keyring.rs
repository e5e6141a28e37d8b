//! The keyring: every key that may open a blob, and the one that seals.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

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
    /// Two different index keys were given.
    #[error("the index key is given twice")]
    DuplicateIndex,
}

/// What a key text holds: sealing keys by id, and perhaps a pinned index
/// key (an `index:<base64>` entry).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KeySpec {
    /// Sealing keys, in the order given.
    pub keys: Vec<(u32, [u8; KEY_LEN])>,
    /// The index key, when pinned.
    pub index: Option<[u8; KEY_LEN]>,
}

impl fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u32> = self.keys.iter().map(|(id, _)| *id).collect();
        f.debug_struct("KeySpec").field("ids", &ids).field("index", &self.index.is_some()).finish()
    }
}

impl KeySpec {
    /// Adds the entries of `other` (an index key given in both must be the same).
    pub fn extend(&mut self, other: KeySpec) -> Result<(), KeyError> {
        self.keys.extend(other.keys);
        match (self.index, other.index) {
            (Some(a), Some(b)) if a != b => return Err(KeyError::DuplicateIndex),
            (None, b) => self.index = b,
            _ => {}
        }
        Ok(())
    }
}

/// Keys by id. The current key seals; every key opens.
///
/// Which key is current can change while the ring is in use
/// ([`Keyring::set_current`]), so that a running cluster switches its
/// sealing key once every instance can open blobs under the new one. Clones
/// share that choice: every codec, log and projection made from one ring
/// switches together. Sealing reads it with one atomic load.
///
/// Beside the sealing keys the ring holds the *index key*, which seals
/// nothing: it only names things (the keyed hashes that stand in for key
/// ids in Redis field names and Mongo document ids). Names must not change
/// when the sealing key rotates, so the index key does not follow the
/// current key: it is derived from the lowest-id key of the ring unless it
/// is given on its own ([`Keyring::with_index`], an `index:` entry).
#[derive(Clone)]
pub struct Keyring {
    keys: Arc<BTreeMap<u32, [u8; KEY_LEN]>>,
    current: Arc<AtomicU32>,
    index: [u8; KEY_LEN],
    index_pinned: bool,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Keyring")
            .field("ids", &self.ids())
            .field("current", &self.current())
            .field("index_pinned", &self.index_pinned)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Builds a keyring. `current` defaults to the highest id. (A running
    /// service does not keep that default: it seals under the key its
    /// cluster has recorded, and switches with [`Keyring::set_current`].)
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
        Ok(Self { keys: Arc::new(map), current: Arc::new(AtomicU32::new(current)), index, index_pinned: false })
    }

    /// A ring of `spec`'s keys, with its index key if it pins one.
    pub fn from_spec(spec: KeySpec, current: Option<u32>) -> Result<Self, KeyError> {
        let ring = Self::new(spec.keys, current)?;
        Ok(match spec.index {
            Some(index) => ring.with_index(index),
            None => ring,
        })
    }

    /// The same ring with `index` as its index key instead of the derived
    /// one: for an operator who retires the lowest key while the names in
    /// the projections must stay as they are.
    pub fn with_index(mut self, index: [u8; KEY_LEN]) -> Self {
        self.index = index;
        self.index_pinned = true;
        self
    }

    /// Whether the index key was given ([`Keyring::with_index`]) rather
    /// than derived from the lowest-id key.
    pub fn index_pinned(&self) -> bool {
        self.index_pinned
    }

    /// The id of the key the index key is derived from (the lowest), or
    /// `None` when it is pinned. Retiring that key changes the index key,
    /// and with it every name in the projections.
    pub fn index_source(&self) -> Option<u32> {
        (!self.index_pinned).then(|| *self.keys.keys().next().expect("the ring is not empty"))
    }

    /// The index key (see the type's documentation). Secret like the
    /// sealing keys: with it, a guessed contact can be tested against the
    /// names in a projection.
    pub fn index_key(&self) -> &[u8; KEY_LEN] {
        &self.index
    }

    /// Parses keys written as `id:base64` entries separated by commas,
    /// whitespace or new lines; `#` starts a comment. This is the format of
    /// `BSTORE_KEYS` and of a key file. An `index:base64` entry is refused
    /// here: [`Keyring::parse_spec`] reads it.
    pub fn parse_entries(text: &str) -> Result<Vec<(u32, [u8; KEY_LEN])>, KeyError> {
        let spec = Self::parse_spec(text)?;
        if spec.index.is_some() {
            return Err(KeyError::Parse { entry: "index:…".into(), reason: "an index key is not a sealing key" });
        }
        Ok(spec.keys)
    }

    /// Like [`Keyring::parse_entries`], also reading one `index:base64`
    /// entry: a pinned index key.
    pub fn parse_spec(text: &str) -> Result<KeySpec, KeyError> {
        let mut out = KeySpec::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            for entry in line.split([',', ' ', '\t']).filter(|e| !e.is_empty()) {
                let shown = || entry.split(':').next().unwrap_or_default().to_owned() + ":…";
                let (id, b64) = entry.split_once(':').ok_or_else(|| KeyError::Parse { entry: shown(), reason: "expected id:base64" })?;
                let raw = STANDARD.decode(b64).map_err(|_| KeyError::Parse { entry: shown(), reason: "the key is not base64" })?;
                let key: [u8; KEY_LEN] =
                    raw.try_into().map_err(|_| KeyError::Parse { entry: shown(), reason: "the key is not 32 bytes" })?;
                if id == INDEX_ENTRY {
                    out.extend(KeySpec { keys: Vec::new(), index: Some(key) })?;
                    continue;
                }
                let id: u32 = id.parse().map_err(|_| KeyError::Parse { entry: shown(), reason: "the id is not a whole number" })?;
                out.keys.push((id, key));
            }
        }
        Ok(out)
    }

    /// Formats one key as an entry [`Keyring::parse_entries`] reads.
    pub fn format_entry(id: u32, key: &[u8; KEY_LEN]) -> String {
        format!("{id}:{}", STANDARD.encode(key))
    }

    /// Formats an index key as the `index:` entry [`Keyring::parse_spec`]
    /// reads, to pin it.
    pub fn format_index(key: &[u8; KEY_LEN]) -> String {
        format!("{INDEX_ENTRY}:{}", STANDARD.encode(key))
    }

    /// A fresh random key from the operating system.
    pub fn generate_key() -> [u8; KEY_LEN] {
        let mut key = [0u8; KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).expect("the OS random source works");
        key
    }

    /// The id of the sealing key.
    pub fn current(&self) -> u32 {
        self.current.load(Ordering::Acquire)
    }

    /// Makes key `id` the sealing key of this ring and of every clone of
    /// it. Refused when the ring lacks `id`: nothing may be sealed under a
    /// key this ring cannot open.
    pub fn set_current(&self, id: u32) -> Result<(), KeyError> {
        if !self.keys.contains_key(&id) {
            return Err(KeyError::NoCurrent(id));
        }
        self.current.store(id, Ordering::Release);
        Ok(())
    }

    /// Whether the ring holds key `id`.
    pub fn has(&self, id: u32) -> bool {
        self.keys.contains_key(&id)
    }

    /// Every id in the ring, ascending.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// A check value of key `id`: 16 hex digits of a keyed hash of a fixed
    /// label, so that instances can tell whether they hold the same key
    /// under an id without showing it. `None` when the ring lacks `id`.
    pub fn fingerprint(&self, id: u32) -> Option<String> {
        self.keys.get(&id).map(check_value)
    }

    /// The check value of the index key (as [`Keyring::fingerprint`]).
    pub fn index_fingerprint(&self) -> String {
        check_value(&self.index)
    }

    pub(crate) fn get(&self, id: u32) -> Option<&[u8; KEY_LEN]> {
        self.keys.get(&id)
    }

    /// The sealing key with its id, read together: a switch between two
    /// reads would name one key in a blob's header and seal with another.
    pub(crate) fn sealing(&self) -> (u32, &[u8; KEY_LEN]) {
        let id = self.current();
        (id, &self.keys[&id])
    }
}

/// The entry name of a pinned index key in a key text.
const INDEX_ENTRY: &str = "index";

fn check_value(key: &[u8; KEY_LEN]) -> String {
    derive(key, b"bstore/key-check/v1")[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 of `label` under `key`.
fn derive(key: &[u8; KEY_LEN], label: &[u8]) -> [u8; KEY_LEN] {
    let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), label);
    tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[u32]) -> Keyring {
        Keyring::new(ids.iter().map(|&i| (i, [i as u8; KEY_LEN])), None).unwrap()
    }

    #[test]
    fn a_switch_of_the_current_key_reaches_every_clone_and_only_to_a_key_it_holds() {
        let a = ring(&[1, 2]);
        a.set_current(1).unwrap();
        let b = a.clone();
        assert_eq!(b.current(), 1);
        b.set_current(2).unwrap();
        assert_eq!(a.current(), 2, "clones share the current key");
        assert_eq!(a.set_current(3), Err(KeyError::NoCurrent(3)));
        assert_eq!(a.current(), 2, "a refused switch changes nothing");
        // A ring built apart from it is not switched.
        assert_eq!(ring(&[1, 2]).current(), 2);
        let c = ring(&[1, 2]);
        c.set_current(1).unwrap();
        assert_eq!(a.current(), 2);
    }

    #[test]
    fn blobs_sealed_while_the_current_key_switches_all_open() {
        use bstore_domain::SessionKey;
        let ring = ring(&[1, 2]);
        let ctx = crate::Context::event(&SessionKey::parse("t", "s").unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let switcher = {
            let (ring, stop) = (ring.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    ring.set_current(1 + i % 2).unwrap();
                    i += 1;
                }
            })
        };
        let mut ids = std::collections::BTreeSet::new();
        let mut failed = 0;
        for _ in 0..20_000 {
            let blob = crate::seal::seal(&ring, &ctx, b"value");
            ids.insert(crate::sealed_key_id(&blob).unwrap());
            failed += usize::from(crate::seal::open(&ring, &ctx, &blob).is_err());
        }
        stop.store(true, Ordering::Relaxed);
        switcher.join().unwrap();
        assert_eq!(failed, 0, "blobs naming one key and sealed under the other");
        assert_eq!(ids.len(), 2, "both keys sealed");
    }

    #[test]
    fn an_index_entry_pins_the_index_key() {
        let text = format!("{}\n{}", Keyring::format_entry(2, &[2; KEY_LEN]), Keyring::format_index(&[9; KEY_LEN]));
        let spec = Keyring::parse_spec(&text).unwrap();
        assert_eq!(spec.index, Some([9; KEY_LEN]));
        let pinned = Keyring::from_spec(spec, None).unwrap();
        assert!(pinned.index_pinned());
        assert_eq!(pinned.index_source(), None);
        assert_eq!(pinned.index_key(), &[9; KEY_LEN]);
        assert!(Keyring::parse_entries(&text).is_err(), "the plain reader takes sealing keys only");
        let derived = ring(&[1, 2]);
        assert_eq!(derived.index_source(), Some(1));
        // Pinning the derived index key keeps the names when key 1 goes.
        let kept = ring(&[2]).with_index(*derived.index_key());
        assert_eq!(kept.index_fingerprint(), derived.index_fingerprint());
        let twice = format!("{} {}", Keyring::format_index(&[9; KEY_LEN]), Keyring::format_index(&[8; KEY_LEN]));
        assert_eq!(Keyring::parse_spec(&twice), Err(KeyError::DuplicateIndex));
    }

    #[test]
    fn fingerprints_tell_keys_apart_without_showing_them() {
        let a = ring(&[1, 2]);
        assert_eq!(a.fingerprint(1), ring(&[1]).fingerprint(1));
        assert_ne!(a.fingerprint(1), a.fingerprint(2));
        assert_eq!(a.fingerprint(3), None);
        let other = Keyring::new([(1, [7; KEY_LEN])], None).unwrap();
        assert_ne!(a.fingerprint(1), other.fingerprint(1), "another key under the same id");
        let fp = a.fingerprint(1).unwrap();
        assert_eq!(fp.len(), 16);
        assert!(!Keyring::format_entry(1, &[1; KEY_LEN]).contains(&fp));
    }
}
