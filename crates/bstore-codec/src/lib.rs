//! How baileys-store writes bytes at rest.
//!
//! Every event in the log, every snapshot and every projected value goes
//! through [`Codec`]: MessagePack ([`rmp_serde`]), then lz4 ([`lz4_flex`]) when
//! that makes it smaller, then sealed with XSalsa20-Poly1305
//! ([`crypto_secretbox`]) under the current key of a [`Keyring`].
//!
//! **Architecture invariant:** nothing leaves this crate in clear. A sealed
//! blob names the key that sealed it, so keys rotate without downtime: a new
//! key becomes current for writes while older keys still open older blobs.
//! A blob is also bound to where it belongs (its tenant and session, and for
//! a single value its type and id) through a per-context subkey, so a blob
//! copied to another session fails to open instead of being believed.

mod datakeys;
mod keyring;
mod seal;

use bstore_domain::{Event, KeyId, KeyType, SessionKey, SessionState};
use serde::{Serialize, de::DeserializeOwned};

pub use keyring::{KEY_LEN, KeyError, KeySpec, Keyring};
pub use datakeys::{DataKeyState, DataKeys, Erased};
pub use seal::{Context, SealError, SealedUnder, sealed_key_id, sealed_under};

/// Bytes of an id tag before encoding: 128 bits, so that tags of distinct
/// ids of one session never collide in practice.
const TAG_LEN: usize = 16;

/// Why bytes could not be turned back into a value.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The blob could not be opened (unknown key, tampering, wrong place).
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The blob opened but its contents are not what was expected.
    #[error("sealed contents do not decode: {0}")]
    Decode(String),
    /// The event was written by a newer schema than this build knows.
    #[error("event schema version {0} is newer than this build understands")]
    UnknownSchema(u16),
}

/// Encodes, compresses and seals; opens, decompresses and decodes.
#[derive(Debug, Clone)]
pub struct Codec {
    keyring: Keyring,
    data_keys: DataKeys,
}

impl Codec {
    /// A codec sealing under `keyring`'s current key (and under the data
    /// keys of the sessions it is given, [`Codec::data_keys`]).
    pub fn new(keyring: Keyring) -> Self {
        Self { keyring, data_keys: DataKeys::default() }
    }

    /// The keyring in use.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The sessions' data keys this codec seals and opens with, shared by
    /// its clones.
    pub fn data_keys(&self) -> &DataKeys {
        &self.data_keys
    }

    /// A fresh random data key.
    pub fn generate_data_key() -> [u8; KEY_LEN] {
        Keyring::generate_key()
    }

    /// A generation of `session`'s data key, sealed under the ring's
    /// current key for that session and generation: what the key store
    /// keeps. Rotating the ring re-wraps these; what they seal stays.
    pub fn wrap_data_key(&self, session: &SessionKey, generation: u32, key: &[u8; KEY_LEN]) -> Vec<u8> {
        seal::seal(&self.keyring, &Context::data_key(session, generation), key)
    }

    /// Opens a data key wrapped by [`Codec::wrap_data_key`].
    pub fn unwrap_data_key(&self, session: &SessionKey, generation: u32, wrapped: &[u8]) -> Result<[u8; KEY_LEN], CodecError> {
        let plain = seal::open(&self.keyring, &Context::data_key(session, generation), wrapped)?;
        plain.try_into().map_err(|_| CodecError::Decode("a wrapped data key is not 32 bytes".into()))
    }

    /// Whether `blob` is sealed under a session's data key: opening it may
    /// need that key looked up first.
    pub fn open_needs_data_key(&self, blob: &[u8]) -> bool {
        matches!(sealed_under(blob), Some(SealedUnder::DataKey(_)))
    }

    /// Seals one event of `session` under the ring even when the session
    /// has a data key: for the marker of an erasure, which must stay
    /// readable once the data key is gone.
    pub fn encode_event_under_ring(&self, session: &SessionKey, event: &Event) -> Vec<u8> {
        self.encode(&Context::event(session).under_ring(), event)
    }

    /// Seals one event of `session` for the log.
    pub fn encode_event(&self, session: &SessionKey, event: &Event) -> Vec<u8> {
        self.encode(&Context::event(session), event)
    }

    /// Opens one event of `session` read from the log, upgrading old schemas.
    pub fn decode_event(&self, session: &SessionKey, blob: &[u8]) -> Result<Event, CodecError> {
        let event: Event = self.decode(&Context::event(session), blob)?;
        event.upgrade().map_err(CodecError::UnknownSchema)
    }

    /// Seals a whole-session snapshot.
    pub fn encode_snapshot(&self, session: &SessionKey, state: &SessionState) -> Vec<u8> {
        self.encode(&Context::snapshot(session), state)
    }

    /// Opens a whole-session snapshot.
    pub fn decode_snapshot(&self, session: &SessionKey, blob: &[u8]) -> Result<SessionState, CodecError> {
        self.decode(&Context::snapshot(session), blob)
    }

    /// Seals one key value (or, with `ty` and `id` of `None`, the creds) for
    /// a projection.
    pub fn seal_value(&self, session: &SessionKey, slot: Option<(&KeyType, &KeyId)>, value: &[u8]) -> Vec<u8> {
        self.seal_in(&Context::value(session, slot), value)
    }

    /// Opens a value sealed by [`Codec::seal_value`] for the same place.
    pub fn open_value(&self, session: &SessionKey, slot: Option<(&KeyType, &KeyId)>, blob: &[u8]) -> Result<Vec<u8>, CodecError> {
        Ok(self.open_in(&Context::value(session, slot), blob)?)
    }

    /// The name that stands in for key id `id` of type `ty` of `session`
    /// wherever a projection needs a name it can look a key up by (Redis
    /// field names, Mongo `_id`s): a keyed hash under the ring's index key
    /// and a per-session subkey, so a copy of a projection names no contact
    /// and the same contact has unrelated names in two sessions. 22
    /// characters of unpadded base64url; stable across sealing-key
    /// rotations.
    pub fn id_tag(&self, session: &SessionKey, ty: &KeyType, id: &KeyId) -> String {
        use base64::Engine as _;
        let mut sub = ring::hmac::Context::with_key(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.keyring.index_key()));
        sub.update(b"bstore/id-tag/v1");
        for part in [session.tenant.as_str(), session.session.as_str()] {
            sub.update(&(part.len() as u32).to_be_bytes());
            sub.update(part.as_bytes());
        }
        let sub = sub.sign();
        let mut tag = ring::hmac::Context::with_key(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, sub.as_ref()));
        tag.update(&(ty.as_str().len() as u32).to_be_bytes());
        tag.update(ty.as_str().as_bytes());
        tag.update(id.as_str().as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.sign().as_ref()[..TAG_LEN])
    }

    fn encode<T: Serialize>(&self, ctx: &Context, value: &T) -> Vec<u8> {
        // Named fields make the format self-describing, so old records stay
        // readable when fields are added. Encoding plain data cannot fail.
        let bytes = rmp_serde::to_vec_named(value).expect("serializing plain data to MessagePack");
        self.seal_in(ctx, &bytes)
    }

    fn decode<T: DeserializeOwned>(&self, ctx: &Context, blob: &[u8]) -> Result<T, CodecError> {
        let bytes = self.open_in(ctx, blob)?;
        rmp_serde::from_slice(&bytes).map_err(|e| CodecError::Decode(e.to_string()))
    }
}

impl Codec {
    /// Seals `plain` for `ctx`: for a projection that lays out what it
    /// seals itself (a manifest, a key kept beside its id).
    pub fn seal_for(&self, ctx: &Context, plain: &[u8]) -> Vec<u8> {
        self.seal_in(ctx, plain)
    }

    /// Opens a blob sealed by [`Codec::seal_for`] for the same context.
    pub fn open_for(&self, ctx: &Context, blob: &[u8]) -> Result<Vec<u8>, CodecError> {
        Ok(self.open_in(ctx, blob)?)
    }

    /// Seals under the data key of the context's session when it has one,
    /// else under the ring.
    fn seal_in(&self, ctx: &Context, plain: &[u8]) -> Vec<u8> {
        match ctx.session().and_then(|s| self.data_keys.key_of(s)) {
            Some((generation, key)) => seal::seal_data_key(generation, &key, ctx, plain),
            None => seal::seal(&self.keyring, ctx, plain),
        }
    }

    /// Opens a blob of either format: format 2 with its session's data key
    /// of the generation it names.
    fn open_in(&self, ctx: &Context, blob: &[u8]) -> Result<Vec<u8>, SealError> {
        let Some(SealedUnder::DataKey(generation)) = sealed_under(blob) else { return seal::open(&self.keyring, ctx, blob) };
        let session = ctx.session().ok_or(SealError::Malformed)?;
        match self.data_keys.key_of(session) {
            Some((have, key)) if have == generation => seal::open_data_key(&key, ctx, blob),
            // Known, and not this generation (or none at all): destroyed.
            _ if self.data_keys.looked_up(session) => Err(SealError::DataKeyGone(generation)),
            _ => Err(SealError::NoDataKey(generation)),
        }
    }

    /// The keyed hashes of `session`'s entries (its creds, each key with its
    /// type and id) that a projection's manifest combines into a digest of
    /// the whole copy. Keyed, so whoever lacks the ring cannot compute the
    /// hash of an entry and balance a forged set of entries. The key is
    /// derived from the ring's index key and the session: like the id tags,
    /// digests survive a rotation of the sealing key.
    pub fn entry_hasher(&self, session: &SessionKey) -> EntryHasher {
        let mut sub = ring::hmac::Context::with_key(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.keyring.index_key()));
        sub.update(b"bstore/entry-digest/v1");
        for part in [session.tenant.as_str(), session.session.as_str()] {
            sub.update(&(part.len() as u32).to_be_bytes());
            sub.update(part.as_bytes());
        }
        EntryHasher { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, sub.sign().as_ref()) }
    }
}

/// One session's keyed hash of entries ([`Codec::entry_hasher`]).
pub struct EntryHasher {
    key: ring::hmac::Key,
}

impl std::fmt::Debug for EntryHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EntryHasher")
    }
}

impl EntryHasher {
    /// The hash of the creds `value`.
    pub fn creds(&self, value: &[u8]) -> [u8; 32] {
        self.hash(&[b"creds"], value)
    }

    /// The hash of key `id` of type `ty` holding `value`.
    pub fn key(&self, ty: &KeyType, id: &KeyId, value: &[u8]) -> [u8; 32] {
        self.hash(&[b"key", ty.as_str().as_bytes(), id.as_str().as_bytes()], value)
    }

    // Every part before the value is length-prefixed, so no two entries
    // hash the same input.
    fn hash(&self, parts: &[&[u8]], value: &[u8]) -> [u8; 32] {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        for part in parts {
            ctx.update(&(part.len() as u32).to_be_bytes());
            ctx.update(part);
        }
        ctx.update(value);
        ctx.sign().as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }
}

#[cfg(test)]
mod tests;
