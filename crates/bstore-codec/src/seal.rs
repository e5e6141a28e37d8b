//! The sealed-blob format.
//!
//! ```text
//! blob      = magic(0xB5) format(1) key_id(u32 BE) nonce(24) secretbox(plain)   sealed under a ring key
//!           | magic(0xB5) format(2) gen(u32 BE)    nonce(24) secretbox(plain)   sealed under the session's data key
//! plain     = flags(u8) body          flags bit 0: body is lz4 (size-prepended)
//! subkey    = HMAC-SHA256(key, "bstore/seal/v1" ‖ for each context part: len(u32 BE) ‖ part)
//! ```
//!
//! Format 2 is the same but for its key: the session's *data key* of
//! generation `gen` ([`crate::DataKeys`]), itself kept wrapped (sealed in
//! format 1 under a ring key) outside the blob. Events and snapshots — what
//! the log keeps for ever — are sealed so (contexts that name their
//! session); projected values stay under the ring, since projections are
//! rewritten at will (erased with the session, re-sealed by a rotation).
//! Destroying a session's wrapped data key makes every format-2 blob of it
//! unreadable for good — how a session is erased while the log keeps its
//! messages — and rotating the ring re-wraps data keys instead of
//! re-sealing what they sealed.
//!
//! Sealing with a subkey derived from the blob's context (rather than the
//! raw key) is what binds a blob to its place: opening it anywhere else
//! derives another subkey and the Poly1305 tag fails. The flags sit inside
//! the sealed part so they are authenticated too.

use bstore_domain::{KeyId, KeyType, SessionKey};
use crypto_secretbox::XSalsa20Poly1305;
use crypto_secretbox::aead::{Aead, AeadCore, KeyInit, OsRng};

use crate::keyring::Keyring;

const MAGIC: u8 = 0xB5;
const FORMAT: u8 = 1;
const FORMAT_DATA_KEY: u8 = 2;
const HEADER: usize = 2 + 4 + 24;
const FLAG_LZ4: u8 = 1;
/// Bodies shorter than this are not worth compressing.
const COMPRESS_MIN: usize = 64;
/// A decompressed body is never larger than this (defends against a
/// size prefix that is authentic but absurd, e.g. from a future bug).
const MAX_PLAIN: usize = 256 << 20;

/// Why a sealed blob could not be opened. None of these is "not found".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Too short, wrong magic, or a format this build does not know.
    #[error("not a sealed blob of a known format")]
    Malformed,
    /// Sealed under a key id that is not (or no longer) in the keyring.
    #[error("sealed under key {0}, which is not in the keyring")]
    UnknownKey(u32),
    /// The tag did not verify: tampered, wrong key material, or a blob that
    /// belongs to another session, type or id.
    #[error("the blob fails authentication (tampered, wrong key, or from another place)")]
    Tampered,
    /// Authentic, but the compressed body is corrupt.
    #[error("the sealed body does not decompress")]
    Corrupt,
    /// Sealed under a generation of the session's data key, which this
    /// process has not fetched: fetch the session's data key and try again.
    #[error("sealed under data key generation {0} of its session, which is not loaded")]
    NoDataKey(u32),
    /// Sealed under a generation of the session's data key that no longer
    /// exists: the session was erased. Unreadable for good, by design.
    #[error("sealed under data key generation {0} of its session, which was destroyed when the session was erased")]
    DataKeyGone(u32),
}

/// Where a blob belongs. Each part is length-prefixed when the subkey is
/// derived, so no two different contexts collide.
#[derive(Debug, Clone)]
pub struct Context {
    parts: Vec<Vec<u8>>,
    /// The session the blob belongs to, whose data key seals it when it
    /// has one.
    session: Option<SessionKey>,
}

impl Context {
    /// An event of a session.
    pub fn event(s: &SessionKey) -> Self {
        Self::of(&[b"event", s.tenant.as_str().as_bytes(), s.session.as_str().as_bytes()]).of_session(s)
    }

    /// A snapshot of a session.
    pub fn snapshot(s: &SessionKey) -> Self {
        Self::of(&[b"snapshot", s.tenant.as_str().as_bytes(), s.session.as_str().as_bytes()]).of_session(s)
    }

    /// A generation of a session's data key, wrapped under a ring key.
    pub fn data_key(s: &SessionKey, generation: u32) -> Self {
        Self::of(&[b"data-key", s.tenant.as_str().as_bytes(), s.session.as_str().as_bytes(), &generation.to_be_bytes()])
    }

    /// The session whose data key seals blobs of this context, if any.
    pub fn session(&self) -> Option<&SessionKey> {
        self.session.as_ref()
    }

    /// The same context sealed under the ring even when its session has a
    /// data key: for records that must outlive an erasure (its marker).
    pub fn under_ring(mut self) -> Self {
        self.session = None;
        self
    }

    fn of_session(mut self, s: &SessionKey) -> Self {
        self.session = Some(s.clone());
        self
    }

    /// One projected value: a key of a type, or the creds when `slot` is `None`.
    pub fn value(s: &SessionKey, slot: Option<(&KeyType, &KeyId)>) -> Self {
        let (t, s_) = (s.tenant.as_str().as_bytes(), s.session.as_str().as_bytes());
        match slot {
            Some((ty, id)) => Self::of(&[b"key", t, s_, ty.as_str().as_bytes(), id.as_str().as_bytes()]),
            None => Self::of(&[b"creds", t, s_]),
        }
    }

    fn of(parts: &[&[u8]]) -> Self {
        Self { parts: parts.iter().map(|p| p.to_vec()).collect(), session: None }
    }

    fn subkey(&self, key: &[u8; 32]) -> crypto_secretbox::Key {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let mut ctx = ring::hmac::Context::with_key(&k);
        ctx.update(b"bstore/seal/v1");
        for part in &self.parts {
            ctx.update(&(part.len() as u32).to_be_bytes());
            ctx.update(part);
        }
        let tag = ctx.sign();
        *crypto_secretbox::Key::from_slice(tag.as_ref())
    }
}

/// Compresses (when it pays) and seals `plain` under the current key.
pub fn seal(ring: &Keyring, ctx: &Context, plain: &[u8]) -> Vec<u8> {
    let (id, key) = ring.sealing();
    seal_under(FORMAT, id, key, ctx, plain)
}

/// Compresses (when it pays) and seals `plain` under a generation of a
/// session's data key.
pub(crate) fn seal_data_key(generation: u32, key: &[u8; 32], ctx: &Context, plain: &[u8]) -> Vec<u8> {
    seal_under(FORMAT_DATA_KEY, generation, key, ctx, plain)
}

fn seal_under(format: u8, id: u32, key: &[u8; 32], ctx: &Context, plain: &[u8]) -> Vec<u8> {
    let mut inner = Vec::with_capacity(plain.len() + 1);
    let compressed = (plain.len() >= COMPRESS_MIN).then(|| lz4_flex::compress_prepend_size(plain));
    match compressed {
        Some(c) if c.len() < plain.len() => {
            inner.push(FLAG_LZ4);
            inner.extend_from_slice(&c);
        }
        _ => {
            inner.push(0);
            inner.extend_from_slice(plain);
        }
    }
    let cipher = XSalsa20Poly1305::new(&ctx.subkey(key));
    let nonce = XSalsa20Poly1305::generate_nonce(&mut OsRng);
    let sealed = cipher.encrypt(&nonce, inner.as_slice()).expect("sealing in memory cannot fail");
    let mut out = Vec::with_capacity(HEADER + sealed.len());
    out.extend_from_slice(&[MAGIC, format]);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// The id of the key that sealed `blob`, read from its clear header
/// without opening it; `None` when `blob` is not a sealed blob. For
/// reports of what is still sealed under which key.
pub fn sealed_key_id(blob: &[u8]) -> Option<u32> {
    (blob.len() > HEADER + 16 && blob[0] == MAGIC && blob[1] == FORMAT)
        .then(|| u32::from_be_bytes(blob[2..6].try_into().expect("four bytes")))
}

/// What sealed a blob, read from its clear header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedUnder {
    /// This key of the ring (format 1).
    Ring(u32),
    /// This generation of its session's data key (format 2).
    DataKey(u32),
}

/// What sealed `blob`, read from its clear header without opening it;
/// `None` when `blob` is not a sealed blob.
pub fn sealed_under(blob: &[u8]) -> Option<SealedUnder> {
    if blob.len() <= HEADER + 16 || blob[0] != MAGIC {
        return None;
    }
    let id = u32::from_be_bytes(blob[2..6].try_into().expect("four bytes"));
    match blob[1] {
        FORMAT => Some(SealedUnder::Ring(id)),
        FORMAT_DATA_KEY => Some(SealedUnder::DataKey(id)),
        _ => None,
    }
}

/// Opens a blob sealed by [`seal`] for the same context.
pub fn open(ring: &Keyring, ctx: &Context, blob: &[u8]) -> Result<Vec<u8>, SealError> {
    if blob.len() < HEADER + 16 + 1 || blob[0] != MAGIC || blob[1] != FORMAT {
        return Err(SealError::Malformed);
    }
    let id = u32::from_be_bytes(blob[2..6].try_into().expect("four bytes"));
    let key = ring.get(id).ok_or(SealError::UnknownKey(id))?;
    open_with(key, ctx, blob)
}

/// Opens a format-2 blob with the data key of the generation it names, which the
/// caller found for the blob's session ([`sealed_under`] names it).
pub(crate) fn open_data_key(key: &[u8; 32], ctx: &Context, blob: &[u8]) -> Result<Vec<u8>, SealError> {
    if blob.len() < HEADER + 16 + 1 || blob[0] != MAGIC || blob[1] != FORMAT_DATA_KEY {
        return Err(SealError::Malformed);
    }
    open_with(key, ctx, blob)
}

fn open_with(key: &[u8; 32], ctx: &Context, blob: &[u8]) -> Result<Vec<u8>, SealError> {
    let nonce = crypto_secretbox::Nonce::from_slice(&blob[6..HEADER]);
    let cipher = XSalsa20Poly1305::new(&ctx.subkey(key));
    let inner = cipher.decrypt(nonce, &blob[HEADER..]).map_err(|_| SealError::Tampered)?;
    let (flags, body) = inner.split_first().ok_or(SealError::Corrupt)?;
    if flags & FLAG_LZ4 == 0 {
        return Ok(body.to_vec());
    }
    let size = body.get(..4).map(|s| u32::from_le_bytes(s.try_into().expect("four bytes")) as usize).ok_or(SealError::Corrupt)?;
    if size > MAX_PLAIN {
        return Err(SealError::Corrupt);
    }
    lz4_flex::decompress_size_prepended(body).map_err(|_| SealError::Corrupt)
}

impl Context {
    /// The manifest of a session's projected copy: what the copy holds as a
    /// whole, checked before any of it is believed.
    pub fn manifest(s: &SessionKey) -> Self {
        Self::of(&[b"manifest", s.tenant.as_str().as_bytes(), s.session.as_str().as_bytes()])
    }

    /// One projected key named by its id tag ([`crate::Codec::id_tag`])
    /// rather than its id, for a projection that keeps the id sealed beside
    /// the value: bound to the slot the name gives, so a blob moved to
    /// another slot fails to open.
    pub fn tagged_key(s: &SessionKey, ty: &KeyType, tag: &str) -> Self {
        let (t, s_) = (s.tenant.as_str().as_bytes(), s.session.as_str().as_bytes());
        Self::of(&[b"tagged-key", t, s_, ty.as_str().as_bytes(), tag.as_bytes()])
    }
}
