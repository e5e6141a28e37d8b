//! The Redis projection: a fast copy of each session for cold loads.
//!
//! One hash per session, keyed `<prefix>:{<tenant>.<session>}`: the braces
//! are a Redis Cluster hash tag, so the whole session lives on one slot and
//! one script can change it atomically. Its fields:
//!
//! | field | value |
//! |---|---|
//! | `seq` | stream sequence of the last event the hash reflects, in clear for the scripts' guard |
//! | `manifest` | sealed: the sequence, the session's metadata, and a digest of every entry below |
//! | `creds` | the creds, sealed for the session's creds slot |
//! | `<type>\x1f<tag>` | one key: its id and value sealed together for the session, type and tag |
//!
//! A key's field is named by its id tag ([`Codec::id_tag`]), a keyed hash of
//! its id under the ring's index key, so nothing in Redis names a contact
//! (key ids are JIDs, phone numbers, LIDs, group ids); the id itself is
//! sealed beside the value, for the slot the type and tag name.
//! The unit separator cannot occur in a key type (`[A-Za-z0-9_.:-]`) and a
//! tag is base64url, so a field splits back unambiguously and never
//! collides with the other fields.
//!
//! **The copy is believed as a whole or not at all.** Each value opening
//! for its own slot is not enough: a field deleted, added, or swapped for an
//! older sealed value of the same slot opens fine. So the manifest carries a
//! digest of the whole copy — the count of entries and the XOR of one keyed
//! hash per entry ([`Codec::entry_hasher`]: the creds, or a key's type, id
//! and value) — and [`RedisProjection::load`] recomputes it from what it
//! opened and refuses a copy that does not match it, or whose `seq` is not
//! the manifest's, as [`RedisError::Unreadable`] (the loader then uses the
//! log and repairs the copy); such copies are counted ([`untrusted_copies`]).
//! Whoever lacks the ring can neither seal a manifest nor compute an entry's
//! hash, so a copy that passes holds exactly the session as of its
//! manifest's sequence: at most an older copy put back whole, which is
//! merely stale — the loader replays the log's tail after its sequence. An XOR (rather than a hash of the sorted entries) lets a
//! delta update the digest from the touched entries alone: the new digest
//! is the old one XOR the hashes of the touched entries before the event
//! XOR their hashes after it, computed here from images of both
//! ([`RedisProjection::apply`]), so a delta still writes only what changed.
//!
//! Every write is one Lua script that checks `seq` first, so projections are
//! idempotent and ordered by stream sequence: a delta applies only on top of
//! exactly the event before it, an older or repeated one changes nothing, and
//! a gap is reported so the caller can write a whole snapshot instead.
//!
//! Hashes written by releases before the manifest (key ids in clear in the
//! field names, `updated_at_ms` and `events` in clear, no `manifest`) are not
//! read: they load as untrusted, and the loader replaces them with a
//! snapshot from the log, as it would any copy it cannot believe — they are
//! a cache. (A release without the manifest finds the `manifest` field
//! unexpected and the tagged fields unopenable, so it too treats a newer
//! copy as unreadable and rewrites it: mixed releases cost reloads from the
//! log, never a wrong answer.)
//!
//! **Architecture invariant:** Redis never holds a fact the stream lacks.
//! Only events the log acknowledged, or states built from them, are written
//! here, and every value is sealed: a blob copied to another field or
//! session fails to open and is treated as no copy at all.

mod config;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bstore_codec::{Codec, Context};
use bstore_domain::{Change, Event, KeyId, KeyType, SessionKey, SessionState};
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

pub use config::{RedisConfig, RedisTls};
/// The Redis client crate, for tools and tests that inspect the hashes.
pub use redis;

/// Separates a key's type from its id tag in a field name.
pub const FIELD_SEP: char = '\x1f';
const SEQ: &str = "seq";
const MANIFEST: &str = "manifest";
const CREDS: &str = "creds";
/// Arguments passed to one `HSET`/`HDEL` inside the scripts, well under
/// Lua's limit on values one `unpack` may return.
const CHUNK: usize = 1000;

/// Copies found untrustworthy by [`RedisProjection::load`] in this process.
static UNTRUSTED: AtomicU64 = AtomicU64::new(0);

/// How many copies [`RedisProjection::load`] has refused in this process:
/// a value that does not open, a field deleted, added or swapped, a
/// sequence changed, or a hash of an older release. Each one was also
/// logged by the loader and repaired from the log.
pub fn untrusted_copies() -> u64 {
    UNTRUSTED.load(Ordering::Relaxed)
}

/// Why Redis could not do what was asked. Neither is fatal to a write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    /// Unreachable, refused, or slower than the configured time-out.
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    /// The hash is there but cannot be believed: a value fails to open, a
    /// field or the sequence does not parse, or the copy is not the whole
    /// its manifest vouches for.
    #[error("the redis copy of {session} is unreadable: {reason}")]
    Unreadable {
        /// The session.
        session: String,
        /// What was wrong.
        reason: String,
    },
}

/// What a guarded delta did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaOutcome {
    /// Applied on top of the previous event.
    Applied,
    /// The hash already reflects this event or a newer one: nothing changed.
    AlreadyNewer,
    /// The hash is at another sequence than the event's predecessor (missing,
    /// behind, or unreadable): nothing changed; write a snapshot.
    Gap {
        /// The sequence the hash holds (0: no hash; -1: unparseable).
        stored: i64,
    },
}

/// How a snapshot treats a hash that is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Write only when the hash is older than the snapshot.
    Guarded,
    /// Replace whatever is there: used when the hash was found unreadable or
    /// ahead of the log, i.e. when its sequence cannot be trusted.
    Replace,
}

/// The digest of a session as of a sequence: how many entries (creds and
/// keys) it holds and the XOR of their keyed hashes. It depends on the
/// session's content alone, not on what Redis holds, so a writer that knows
/// the digest of the state an event was applied to can write the next
/// manifest without reading the hash ([`RedisProjection::apply`]); one
/// that does not asks [`RedisProjection::digest_at`] or writes a snapshot.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    seq: u64,
    entries: u64,
    sum: [u8; 32],
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Digest").field("seq", &self.seq).field("entries", &self.entries).finish_non_exhaustive()
    }
}

impl Digest {
    /// The digest of a session holding nothing, as of `seq`.
    fn empty(seq: u64) -> Self {
        Self { seq, entries: 0, sum: [0; 32] }
    }

    /// The sequence it is the digest as of.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn add(&mut self, hash: [u8; 32]) {
        self.xor(hash);
        self.entries += 1;
    }

    fn remove(&mut self, hash: [u8; 32]) {
        self.xor(hash);
        // Only a digest that does not describe the state could underflow;
        // the copy it is written with then fails its next load.
        self.entries = self.entries.wrapping_sub(1);
    }

    fn xor(&mut self, hash: [u8; 32]) {
        for (s, h) in self.sum.iter_mut().zip(hash) {
            *s ^= h;
        }
    }

    /// Equal, in time independent of where they differ.
    fn matches(&self, other: &Digest) -> bool {
        let diff = self.sum.iter().zip(&other.sum).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        self.seq == other.seq && self.entries == other.entries && diff == 0
    }
}

/// The manifest's plain contents: a format byte, then `seq`, `entries`,
/// `updated_at_ms` (0: none) and `events` as u64 BE, then the digest's sum.
struct Manifest {
    digest: Digest,
    updated_at_ms: u64,
    events: u64,
}

const MANIFEST_FORMAT: u8 = 1;
const MANIFEST_LEN: usize = 1 + 4 * 8 + 32;

impl Manifest {
    fn of(digest: Digest, state: &SessionState) -> Self {
        Self { digest, updated_at_ms: state.updated_at_ms().unwrap_or(0), events: state.events() }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MANIFEST_LEN);
        out.push(MANIFEST_FORMAT);
        for n in [self.digest.seq, self.digest.entries, self.updated_at_ms, self.events] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(&self.digest.sum);
        out
    }

    fn decode(plain: &[u8]) -> Option<Self> {
        if plain.len() != MANIFEST_LEN || plain[0] != MANIFEST_FORMAT {
            return None;
        }
        let n = |i: usize| u64::from_be_bytes(plain[1 + 8 * i..9 + 8 * i].try_into().expect("eight bytes"));
        let digest = Digest { seq: n(0), entries: n(1), sum: plain[33..].try_into().expect("32 bytes") };
        Some(Self { digest, updated_at_ms: n(2), events: n(3) })
    }
}

// The stored sequence: 0 when the hash is missing, -1 when it does not parse
// (which matches no predecessor, so a delta turns into a snapshot).
const STORED_SEQ: &str = r"
local raw = redis.call('HGET', KEYS[1], 'seq')
local stored = 0
if raw then stored = tonumber(raw) or -1 end
";

const CHUNKED: &str = r"
local function chunked(cmd, from, to)
  local i = from
  while i <= to do
    local j = math.min(i + CHUNK - 1, to)
    redis.call(cmd, KEYS[1], unpack(ARGV, i, j))
    i = j + 1
  end
end
local function expire(ttl)
  if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
end
";

// ARGV: prev, seq, ttl, reset, manifest, n_deleted, deleted fields..., then
// field/value pairs to set.
const DELTA: &str = r"
local prev, seq = tonumber(ARGV[1]), tonumber(ARGV[2])
if stored >= seq then return {0, stored} end
if stored ~= prev then return {2, stored} end
if ARGV[4] == '1' then redis.call('DEL', KEYS[1]) end
local ndel = tonumber(ARGV[6])
chunked('HDEL', 7, 6 + ndel)
chunked('HSET', 7 + ndel, #ARGV)
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'manifest', ARGV[5])
expire(tonumber(ARGV[3]))
return {1, stored}
";

// ARGV: seq, ttl, replace, then field/value pairs (seq and manifest included).
const SNAPSHOT: &str = r"
local seq = tonumber(ARGV[1])
if ARGV[3] ~= '1' and stored >= seq then return 0 end
redis.call('DEL', KEYS[1])
chunked('HSET', 4, #ARGV)
expire(tonumber(ARGV[2]))
return 1
";

/// A handle on the projection. Cheap to clone; connects lazily and
/// reconnects by itself, so it can be made while Redis is down.
#[derive(Clone)]
pub struct RedisProjection {
    conn: ConnectionManager,
    cfg: RedisConfig,
    codec: Codec,
    delta: Script,
    snapshot: Script,
    /// Whether the last call reached Redis. While it did not, a snapshot
    /// first pings, so an outage does not cost the sealing of whole
    /// sessions that cannot be written anyway.
    reachable: Arc<AtomicBool>,
}

impl RedisProjection {
    /// A projection at `cfg.url` sealing with `codec`. Fails only on a
    /// malformed URL (or none); reaching Redis is tried on first use.
    pub fn new(cfg: RedisConfig, codec: Codec) -> Result<Self, RedisError> {
        let client = client(&cfg)?;
        let manager_cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_cfg).map_err(unavailable)?;
        let script = |body: &str| Script::new(&format!("local CHUNK = {CHUNK}\n{STORED_SEQ}{CHUNKED}{body}"));
        Ok(Self { conn, delta: script(DELTA), snapshot: script(SNAPSHOT), cfg, codec, reachable: Arc::new(AtomicBool::new(true)) })
    }

    /// The settings in force.
    pub fn config(&self) -> &RedisConfig {
        &self.cfg
    }

    /// A connection, for tools and tests that look at Redis directly.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The key of `session`'s hash.
    pub fn key(&self, session: &SessionKey) -> String {
        format!("{}:{{{}.{}}}", self.cfg.key_prefix, session.tenant, session.session)
    }

    /// The field of `session`'s hash holding key `id` of type `ty`.
    pub fn field(&self, session: &SessionKey, ty: &KeyType, id: &KeyId) -> String {
        field_name(ty, &self.codec.id_tag(session, ty, id))
    }

    /// Projects `event`, which the log stored at `after.seq()` right after
    /// `base.seq()`, leaving the session as `after`: the keys the event
    /// touched are written with their values in `after` (or deleted when
    /// absent), and the manifest with the digest of `after`, computed from
    /// `base` (the digest before the event) and the touched entries in
    /// `before` and `after`. Applies only when the hash is exactly at
    /// `base.seq()`. Only the touched keys, the creds (for `CredsPut` and a
    /// restore) and
    /// the metadata of `after` are read, and only the touched keys and the
    /// creds of `before`, so both may be partial images holding just those.
    ///
    /// Returns what the script did and the digest of `after` — whatever the
    /// outcome: the digest is the session's, not the hash's.
    pub async fn apply(
        &self,
        session: &SessionKey,
        base: &Digest,
        before: &SessionState,
        after: &SessionState,
        event: &Event,
    ) -> Result<(DeltaOutcome, Digest), RedisError> {
        debug_assert_eq!(base.seq, before.seq(), "the digest is of the state the event was applied to");
        let hasher = self.codec.entry_hasher(session);
        let mut digest = Digest { seq: after.seq(), ..*base };
        let mut deleted: Vec<String> = Vec::new();
        let mut set: Vec<(String, Vec<u8>)> = Vec::new();
        // Values are taken from the state after the event, not from the
        // event, so the projection holds exactly what a load would see
        // whatever form the event records a change in: a patch reaches Redis
        // as the value it produced, and a restore as the creds and keys it
        // put back.
        if event.touches_creds() {
            if let Some(old) = before.creds() {
                digest.remove(hasher.creds(old));
            }
            match after.creds() {
                Some(creds) => {
                    digest.add(hasher.creds(creds));
                    set.push((CREDS.into(), self.codec.seal_value(session, None, creds)));
                }
                // A restore to a point without creds removes them.
                None if before.creds().is_some() => deleted.push(CREDS.into()),
                None => {}
            }
        }
        for (ty, id) in event.touched_keys() {
            if let Some((_, old)) = before.get_keys(ty, [id]).pop() {
                digest.remove(hasher.key(ty, id, &old));
            }
            let tag = self.codec.id_tag(session, ty, id);
            match after.get_keys(ty, [id]).pop() {
                Some((_, v)) => {
                    digest.add(hasher.key(ty, id, &v));
                    set.push((field_name(ty, &tag), self.seal_key(session, ty, &tag, id, &v)));
                }
                None => deleted.push(field_name(ty, &tag)),
            }
        }
        // The hash is replaced by one holding only the sequence and the
        // manifest, so a late delta cannot bring a key back.
        let reset = matches!(event.change, Change::SessionDeleted);
        if reset {
            digest = Digest::empty(after.seq());
        }
        let manifest = self.seal_manifest(session, &Manifest::of(digest, after));
        let mut inv = self.delta.key(self.key(session));
        inv.arg(base.seq).arg(after.seq()).arg(self.cfg.ttl_secs).arg(if reset { "1" } else { "0" }).arg(manifest).arg(deleted.len());
        for f in &deleted {
            inv.arg(f);
        }
        for (f, v) in &set {
            inv.arg(f).arg(v.as_slice());
        }
        let mut conn = self.conn.clone();
        let (code, stored): (i64, i64) = self.bounded(inv.invoke_async(&mut conn)).await?;
        let outcome = match code {
            1 => DeltaOutcome::Applied,
            0 => DeltaOutcome::AlreadyNewer,
            _ => DeltaOutcome::Gap { stored },
        };
        Ok((outcome, digest))
    }

    /// Writes `state` whole, with its manifest. Returns whether it was
    /// written ([`SnapshotMode::Guarded`] skips a hash that is already as
    /// new or newer) and the digest of `state`.
    pub async fn write_snapshot(
        &self,
        session: &SessionKey,
        state: &SessionState,
        mode: SnapshotMode,
    ) -> Result<(bool, Digest), RedisError> {
        if !self.reachable.load(Ordering::Acquire) {
            let mut conn = self.conn.clone();
            let _: String = self.bounded(redis::cmd("PING").query_async(&mut conn)).await?;
        }
        let hasher = self.codec.entry_hasher(session);
        let mut digest = Digest::empty(state.seq());
        let mut inv = self.snapshot.key(self.key(session));
        inv.arg(state.seq()).arg(self.cfg.ttl_secs).arg(if mode == SnapshotMode::Replace { "1" } else { "0" });
        inv.arg(SEQ).arg(state.seq());
        if let Some(creds) = state.creds() {
            digest.add(hasher.creds(creds));
            inv.arg(CREDS).arg(self.codec.seal_value(session, None, creds));
        }
        for (ty, id, v) in state.iter_keys() {
            digest.add(hasher.key(ty, id, v));
            let tag = self.codec.id_tag(session, ty, id);
            inv.arg(field_name(ty, &tag)).arg(self.seal_key(session, ty, &tag, id, v));
        }
        inv.arg(MANIFEST).arg(self.seal_manifest(session, &Manifest::of(digest, state)));
        let mut conn = self.conn.clone();
        let written: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok((written == 1, digest))
    }

    /// Reads `session`'s hash back into a state. `Ok(None)`: no hash. A
    /// hash that is not the whole its manifest vouches for (or has none) is
    /// [`RedisError::Unreadable`], and counted ([`untrusted_copies`]).
    pub async fn load(&self, session: &SessionKey) -> Result<Option<SessionState>, RedisError> {
        let mut conn = self.conn.clone();
        let key = self.key(session);
        let fields: Vec<(Vec<u8>, Vec<u8>)> = self.bounded(conn.hgetall(&key)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let decoded = self.decode(session, fields);
        if decoded.is_err() {
            UNTRUSTED.fetch_add(1, Ordering::Relaxed);
        }
        decoded.map(Some)
    }

    /// The sequence `session`'s hash is at (`None`: no hash), as its
    /// manifest vouches for it. A cheap probe: the entries are not checked
    /// (only [`RedisProjection::load`] does that).
    pub async fn stored_seq(&self, session: &SessionKey) -> Result<Option<u64>, RedisError> {
        Ok(self.manifest(session).await?.map(|m| m.digest.seq))
    }

    /// The digest of `session` as of `seq`, if the hash's manifest is at
    /// `seq` (`None`: no hash, or another sequence). For a writer that does
    /// not know the digest an event was applied to, say after the session
    /// was loaded: the manifest is sealed, so its digest is one this service
    /// computed for the state at `seq` — the digest of the session, even if
    /// the hash's entries were tampered with since (which the next load
    /// then detects).
    pub async fn digest_at(&self, session: &SessionKey, seq: u64) -> Result<Option<Digest>, RedisError> {
        if seq == 0 {
            // Before its first event a session holds nothing.
            return Ok(Some(Digest::empty(0)));
        }
        Ok(self.manifest(session).await?.map(|m| m.digest).filter(|d| d.seq == seq))
    }

    /// Removes `session`'s hash.
    pub async fn remove(&self, session: &SessionKey) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let _: i64 = self.bounded(conn.del(self.key(session))).await?;
        Ok(())
    }

    /// Every session with a hash under this prefix (SCAN, so it does not
    /// block Redis). Keys under the prefix that are not session hashes are
    /// left out.
    pub async fn sessions(&self) -> Result<Vec<SessionKey>, RedisError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}:{{*}}", self.cfg.key_prefix);
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .bounded(redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query_async(&mut conn))
                .await?;
            for key in keys {
                if let Some(session) = self.parse_key(&key) {
                    out.push(session);
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn parse_key(&self, key: &str) -> Option<SessionKey> {
        let inner = key.strip_prefix(&self.cfg.key_prefix)?.strip_prefix(":{")?.strip_suffix('}')?;
        let (tenant, session) = inner.split_once('.')?;
        SessionKey::parse(tenant, session).ok()
    }

    /// The manifest of `session`'s hash, opened and checked against `seq`
    /// (`None`: neither is there).
    async fn manifest(&self, session: &SessionKey) -> Result<Option<Manifest>, RedisError> {
        let mut conn = self.conn.clone();
        let (seq, manifest): (Option<Vec<u8>>, Option<Vec<u8>>) =
            self.bounded(redis::cmd("HMGET").arg(self.key(session)).arg(SEQ).arg(MANIFEST).query_async(&mut conn)).await?;
        match (seq, manifest) {
            (None, None) => Ok(None),
            (Some(seq), Some(manifest)) => self.checked_manifest(session, &seq, &manifest).map(Some),
            (_, None) => Err(unreadable(session, NO_MANIFEST)),
            (None, Some(_)) => Err(unreadable(session, "no sequence")),
        }
    }

    fn checked_manifest(&self, session: &SessionKey, seq: &[u8], blob: &[u8]) -> Result<Manifest, RedisError> {
        let seq: u64 =
            std::str::from_utf8(seq).ok().and_then(|s| s.parse().ok()).ok_or_else(|| unreadable(session, "the sequence does not parse"))?;
        let plain = self.codec.open_for(&Context::manifest(session), blob).map_err(|e| unreadable(session, &format!("manifest: {e}")))?;
        let manifest = Manifest::decode(&plain).ok_or_else(|| unreadable(session, "the manifest does not decode"))?;
        if manifest.digest.seq != seq {
            return Err(unreadable(session, &format!("at sequence {seq}, its manifest at {}", manifest.digest.seq)));
        }
        Ok(manifest)
    }

    fn seal_manifest(&self, session: &SessionKey, manifest: &Manifest) -> Vec<u8> {
        self.codec.seal_for(&Context::manifest(session), &manifest.encode())
    }

    /// A key's field value: its id (length-prefixed, u16 BE) and value,
    /// sealed together for the slot its field names.
    fn seal_key(&self, session: &SessionKey, ty: &KeyType, tag: &str, id: &KeyId, value: &[u8]) -> Vec<u8> {
        let id = id.as_str().as_bytes();
        let mut plain = Vec::with_capacity(2 + id.len() + value.len());
        plain.extend_from_slice(&(id.len() as u16).to_be_bytes());
        plain.extend_from_slice(id);
        plain.extend_from_slice(value);
        self.codec.seal_for(&Context::tagged_key(session, ty, tag), &plain)
    }

    /// Opens one key's field: its type, id and value. The id is not hashed
    /// again to check it against the tag: the blob opens only under the
    /// context of its field's type and tag, and only this service seals, so
    /// it sealed this id for this tag ([`RedisProjection::seal_key`]).
    fn open_key(&self, session: &SessionKey, name: &[u8], blob: &[u8]) -> Result<(KeyType, KeyId, Bytes), RedisError> {
        // Field names that are not a type and a tag are not shown: in a
        // hash of an older release, or one tampered with, they may hold ids.
        let (ty, tag) = std::str::from_utf8(name)
            .ok()
            .and_then(|n| n.split_once(FIELD_SEP))
            .filter(|(_, tag)| is_tag(tag))
            .ok_or_else(|| unreadable(session, "a field is neither a key's nor a known one"))?;
        let ty = KeyType::parse(ty).map_err(|e| unreadable(session, &e.to_string()))?;
        let bad = |what: &str| unreadable(session, &format!("key {ty}/{tag}: {what}"));
        let plain = Bytes::from(self.codec.open_for(&Context::tagged_key(session, &ty, tag), blob).map_err(|e| bad(&e.to_string()))?);
        let len = plain.get(..2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize).ok_or_else(|| bad("too short"))?;
        let id = plain.get(2..2 + len).and_then(|id| std::str::from_utf8(id).ok()).ok_or_else(|| bad("the id does not decode"))?;
        let id = KeyId::parse(id).map_err(|_| bad("the id is not a key id"))?;
        debug_assert_eq!(self.codec.id_tag(session, &ty, &id), tag, "sealed for the tag of its id");
        Ok((ty, id, plain.slice(2 + len..)))
    }

    fn decode(&self, session: &SessionKey, mut fields: Vec<(Vec<u8>, Vec<u8>)>) -> Result<SessionState, RedisError> {
        // The sequence and the manifest first: a copy without them (of an
        // older release, say) is refused before any of its fields is read.
        let mut take = |name: &str| fields.iter().position(|(n, _)| n == name.as_bytes()).map(|i| fields.swap_remove(i).1);
        let (seq, manifest) = match (take(SEQ), take(MANIFEST)) {
            (Some(seq), Some(manifest)) => (seq, manifest),
            (None, _) => return Err(unreadable(session, "no sequence")),
            (_, None) => return Err(unreadable(session, NO_MANIFEST)),
        };
        let manifest = self.checked_manifest(session, &seq, &manifest)?;
        let vouched = manifest.digest;
        if fields.len() as u64 != vouched.entries {
            return Err(unreadable(session, &format!("entries: {} in the hash, {} in its manifest", fields.len(), vouched.entries)));
        }
        let hasher = self.codec.entry_hasher(session);
        let mut digest = Digest::empty(vouched.seq);
        let (mut creds, mut keys) = (None, Vec::with_capacity(fields.len()));
        for (name, value) in fields {
            if name == CREDS.as_bytes() {
                let plain = self.codec.open_value(session, None, &value).map_err(|e| unreadable(session, &format!("creds: {e}")))?;
                digest.add(hasher.creds(&plain));
                creds = Some(Bytes::from(plain));
            } else {
                let (ty, id, v) = self.open_key(session, &name, &value)?;
                digest.add(hasher.key(&ty, &id, &v));
                keys.push((ty, id, v));
            }
        }
        if !digest.matches(&vouched) {
            return Err(unreadable(session, "its entries are not the ones its manifest vouches for (an older, moved or altered value)"));
        }
        let updated = Some(manifest.updated_at_ms).filter(|&t| t > 0);
        Ok(SessionState::from_parts(vouched.seq, creds, keys, updated, manifest.events))
    }

    async fn bounded<T>(&self, fut: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, RedisError> {
        let result = match tokio::time::timeout(self.cfg.timeout, fut).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(RedisError::Unavailable(format!("no answer within {:?}", self.cfg.timeout))),
        };
        self.reachable.store(!matches!(result, Err(RedisError::Unavailable(_))), Ordering::Release);
        result
    }
}

const NO_MANIFEST: &str = "no manifest (a copy written before manifests, or one tampered with)";

fn field_name(ty: &KeyType, tag: &str) -> String {
    format!("{ty}{FIELD_SEP}{tag}")
}

/// Whether `s` has the form of an id tag: 22 characters of base64url.
fn is_tag(s: &str) -> bool {
    s.len() == 22 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The client for `cfg`: the URL, with `username`/`password` over the URL's
/// and, for `rediss://`, the CA and client certificate of `cfg.tls`.
/// Fails on a malformed URL, an unreadable TLS file, or TLS files given with
/// a URL that is not `rediss://` (they would be ignored otherwise).
fn client(cfg: &RedisConfig) -> Result<redis::Client, RedisError> {
    use redis::IntoConnectionInfo as _;
    let bad = |what: &str| RedisError::Unavailable(format!("bad redis settings: {what}"));
    let url = cfg.url.as_deref().ok_or_else(|| RedisError::Unavailable("no redis url configured".into()))?;
    let mut info = url.into_connection_info().map_err(|e| bad(&format!("url: {e}")))?;
    if cfg.username.is_some() || cfg.password.is_some() {
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &cfg.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &cfg.password {
            settings = settings.set_password(password);
        }
        info = info.set_redis_settings(settings);
    }
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    if !cfg.tls.is_set() {
        return redis::Client::open(info).map_err(|e| bad(&e.to_string()));
    }
    if !tls {
        return Err(bad("redis.tls is set but the url is not rediss://"));
    }
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|e| bad(&format!("reading {}: {e}", path.display())));
    let client_tls = match (&cfg.tls.cert_file, &cfg.tls.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig { client_cert: read(cert)?, client_key: read(key)? }),
        (None, None) => None,
        _ => return Err(bad("redis.tls.cert_file and redis.tls.key_file go together")),
    };
    let root_cert = cfg.tls.ca_file.as_deref().map(read).transpose()?;
    redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls, root_cert }).map_err(|e| bad(&format!("tls: {e}")))
}

fn unavailable(e: impl std::fmt::Display) -> RedisError {
    RedisError::Unavailable(e.to_string())
}

fn unreadable(session: &SessionKey, reason: &str) -> RedisError {
    RedisError::Unreadable { session: session.to_string(), reason: reason.to_owned() }
}

#[cfg(test)]
mod tests;
