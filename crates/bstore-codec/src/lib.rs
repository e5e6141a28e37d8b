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

mod keyring;
mod seal;

use bstore_domain::{Event, KeyId, KeyType, SessionKey, SessionState};
use serde::{Serialize, de::DeserializeOwned};

pub use keyring::{KEY_LEN, KeyError, Keyring};
pub use seal::{Context, SealError, sealed_key_id};

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
}

impl Codec {
    /// A codec sealing under `keyring`'s current key.
    pub fn new(keyring: Keyring) -> Self {
        Self { keyring }
    }

    /// The keyring in use.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
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
        seal::seal(&self.keyring, &Context::value(session, slot), value)
    }

    /// Opens a value sealed by [`Codec::seal_value`] for the same place.
    pub fn open_value(&self, session: &SessionKey, slot: Option<(&KeyType, &KeyId)>, blob: &[u8]) -> Result<Vec<u8>, CodecError> {
        Ok(seal::open(&self.keyring, &Context::value(session, slot), blob)?)
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
        seal::seal(&self.keyring, ctx, &bytes)
    }

    fn decode<T: DeserializeOwned>(&self, ctx: &Context, blob: &[u8]) -> Result<T, CodecError> {
        let bytes = seal::open(&self.keyring, ctx, blob)?;
        rmp_serde::from_slice(&bytes).map_err(|e| CodecError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests;
