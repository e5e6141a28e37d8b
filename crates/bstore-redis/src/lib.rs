//! The Redis projection: a fast copy of each session for cold loads.
//!
//! One hash per session, keyed `<prefix>:{<tenant>.<session>}`: the braces
//! are a Redis Cluster hash tag, so the whole session lives on one slot and
//! one script can change it atomically. Its fields:
//!
//! | field | value |
//! |---|---|
//! | `seq` | stream sequence of the last event the hash reflects |
//! | `updated_at_ms`, `events` | the session's metadata as of `seq` |
//! | `creds` | the creds, sealed for the session's creds slot |
//! | `<type>\x1f<id>` | one key's value, sealed for its session, type and id |
//!
//! The unit separator cannot occur in a key type (`[A-Za-z0-9_.:-]`) or a
//! key id (no control characters), so a field splits back unambiguously and
//! never collides with the metadata fields.
//!
//! Every write is one Lua script that checks `seq` first, so projections are
//! idempotent and ordered by stream sequence: a delta applies only on top of
//! exactly the event before it, an older or repeated one changes nothing, and
//! a gap is reported so the caller can write a whole snapshot instead.
//!
//! **Architecture invariant:** Redis never holds a fact the stream lacks.
//! Only events the log acknowledged, or states built from them, are written
//! here, and every value is sealed ([`Codec::seal_value`]): a blob copied to
//! another field or session fails to open and is treated as no copy at all.

mod config;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bstore_codec::Codec;
use bstore_domain::{Change, Event, KeyId, KeyType, SessionKey, SessionState};
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

pub use config::{RedisConfig, RedisTls};
/// The Redis client crate, for tools and tests that inspect the hashes.
pub use redis;

/// Separates a key's type from its id in a field name.
pub const FIELD_SEP: char = '\x1f';
const SEQ: &str = "seq";
const CREDS: &str = "creds";
const UPDATED: &str = "updated_at_ms";
const EVENTS: &str = "events";
/// Arguments passed to one `HSET`/`HDEL` inside the scripts, well under
/// Lua's limit on values one `unpack` may return.
const CHUNK: usize = 1000;

/// Why Redis could not do what was asked. Neither is fatal to a write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    /// Unreachable, refused, or slower than the configured time-out.
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    /// The hash is there but cannot be believed: a value fails to open, a
    /// field or the sequence does not parse.
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

// ARGV: prev, seq, ttl, reset, updated_at_ms, events, n_deleted,
// deleted fields..., then field/value pairs to set.
const DELTA: &str = r"
local prev, seq = tonumber(ARGV[1]), tonumber(ARGV[2])
if stored >= seq then return {0, stored} end
if stored ~= prev then return {2, stored} end
if ARGV[4] == '1' then redis.call('DEL', KEYS[1]) end
local ndel = tonumber(ARGV[7])
chunked('HDEL', 8, 7 + ndel)
chunked('HSET', 8 + ndel, #ARGV)
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'updated_at_ms', ARGV[5], 'events', ARGV[6])
expire(tonumber(ARGV[3]))
return {1, stored}
";

// ARGV: seq, ttl, replace, then field/value pairs (the metadata included).
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

    /// The field holding one key's value.
    pub fn field(ty: &KeyType, id: &KeyId) -> String {
        format!("{ty}{FIELD_SEP}{id}")
    }

    /// Projects `event`, which the log stored at `after.seq()` right after
    /// `prev`, leaving the session as `after`: the keys the event touched
    /// are written with their values in `after` (or deleted when absent).
    /// Applies only when the hash is exactly at `prev`. Only the touched keys,
    /// the creds (for `CredsPut`) and the metadata of `after` are read, so it
    /// may be a partial image of the session holding just those.
    pub async fn apply(&self, session: &SessionKey, prev: u64, after: &SessionState, event: &Event) -> Result<DeltaOutcome, RedisError> {
        let mut deleted: Vec<String> = Vec::new();
        let mut set: Vec<(String, Vec<u8>)> = Vec::new();
        let reset = match &event.change {
            // Values are taken from the state after the event, not from the
            // event, so the projection holds exactly what a load would see
            // whatever form the event records a change in.
            Change::CredsPut { .. } => {
                if let Some(creds) = after.creds() {
                    set.push((CREDS.into(), self.codec.seal_value(session, None, creds)));
                }
                false
            }
            Change::KeysChanged { .. } => {
                // Whole values and patches alike: the value is the one in
                // `after`, so a patch reaches Redis as the value it produced.
                for (ty, id) in event.touched_keys() {
                    match after.get_keys(ty, [id]).pop() {
                        Some((_, v)) => set.push((Self::field(ty, id), self.codec.seal_value(session, Some((ty, id)), &v))),
                        None => deleted.push(Self::field(ty, id)),
                    }
                }
                false
            }
            // The hash is replaced by one holding only the sequence and the
            // metadata, so a late delta cannot bring a key back.
            Change::SessionDeleted => true,
        };
        let mut inv = self.delta.key(self.key(session));
        inv.arg(prev)
            .arg(after.seq())
            .arg(self.cfg.ttl_secs)
            .arg(if reset { "1" } else { "0" })
            .arg(after.updated_at_ms().unwrap_or(0))
            .arg(after.events())
            .arg(deleted.len());
        for f in &deleted {
            inv.arg(f);
        }
        for (f, v) in &set {
            inv.arg(f).arg(v.as_slice());
        }
        let mut conn = self.conn.clone();
        let (code, stored): (i64, i64) = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(match code {
            1 => DeltaOutcome::Applied,
            0 => DeltaOutcome::AlreadyNewer,
            _ => DeltaOutcome::Gap { stored },
        })
    }

    /// Writes `state` whole. Returns whether it was written ([`SnapshotMode::Guarded`]
    /// skips a hash that is already as new or newer).
    pub async fn write_snapshot(&self, session: &SessionKey, state: &SessionState, mode: SnapshotMode) -> Result<bool, RedisError> {
        if !self.reachable.load(Ordering::Acquire) {
            let mut conn = self.conn.clone();
            let _: String = self.bounded(redis::cmd("PING").query_async(&mut conn)).await?;
        }
        let mut inv = self.snapshot.key(self.key(session));
        inv.arg(state.seq()).arg(self.cfg.ttl_secs).arg(if mode == SnapshotMode::Replace { "1" } else { "0" });
        inv.arg(SEQ).arg(state.seq());
        inv.arg(UPDATED).arg(state.updated_at_ms().unwrap_or(0));
        inv.arg(EVENTS).arg(state.events());
        if let Some(creds) = state.creds() {
            inv.arg(CREDS).arg(self.codec.seal_value(session, None, creds));
        }
        for (ty, id, v) in state.iter_keys() {
            inv.arg(Self::field(ty, id)).arg(self.codec.seal_value(session, Some((ty, id)), v));
        }
        let mut conn = self.conn.clone();
        let written: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(written == 1)
    }

    /// Reads `session`'s hash back into a state. `Ok(None)`: no hash.
    pub async fn load(&self, session: &SessionKey) -> Result<Option<SessionState>, RedisError> {
        let mut conn = self.conn.clone();
        let key = self.key(session);
        let fields: Vec<(Vec<u8>, Vec<u8>)> = self.bounded(conn.hgetall(&key)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        self.decode(session, fields).map(Some)
    }

    /// The sequence `session`'s hash is at (`None`: no hash).
    pub async fn stored_seq(&self, session: &SessionKey) -> Result<Option<u64>, RedisError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = self.bounded(conn.hget(self.key(session), SEQ)).await?;
        raw.map(|s| s.parse().map_err(|_| unreadable(session, "the sequence does not parse"))).transpose()
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

    fn decode(&self, session: &SessionKey, fields: Vec<(Vec<u8>, Vec<u8>)>) -> Result<SessionState, RedisError> {
        let number = |v: &[u8], what: &str| -> Result<u64, RedisError> {
            std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()).ok_or_else(|| unreadable(session, &format!("{what} does not parse")))
        };
        let (mut seq, mut creds, mut updated, mut events, mut keys) = (None, None, None, 0, Vec::with_capacity(fields.len()));
        for (name, value) in fields {
            let name = String::from_utf8(name).map_err(|_| unreadable(session, "a field name is not UTF-8"))?;
            match name.as_str() {
                SEQ => seq = Some(number(&value, "the sequence")?),
                UPDATED => updated = Some(number(&value, "updated_at_ms")?).filter(|&t| t > 0),
                EVENTS => events = number(&value, "events")?,
                CREDS => {
                    let plain = self.codec.open_value(session, None, &value).map_err(|e| unreadable(session, &format!("creds: {e}")))?;
                    creds = Some(Bytes::from(plain));
                }
                other => {
                    let (ty, id) =
                        other.split_once(FIELD_SEP).ok_or_else(|| unreadable(session, &format!("unexpected field {other:?}")))?;
                    let ty = KeyType::parse(ty).map_err(|e| unreadable(session, &e.to_string()))?;
                    let id = KeyId::parse(id).map_err(|e| unreadable(session, &e.to_string()))?;
                    let plain = self
                        .codec
                        .open_value(session, Some((&ty, &id)), &value)
                        .map_err(|e| unreadable(session, &format!("key {ty}/{id}: {e}")))?;
                    keys.push((ty, id, Bytes::from(plain)));
                }
            }
        }
        let seq = seq.ok_or_else(|| unreadable(session, "no sequence"))?;
        Ok(SessionState::from_parts(seq, creds, keys, updated, events))
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
