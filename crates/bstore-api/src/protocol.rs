//! Protocol version 1 (`docs/protocol.md`) in one place: the ops, the request
//! bodies — decoded strictly by the service, encoded by the Rust client — and
//! the reply bodies.
//!
//! Requests are decoded by hand over the byte slice, not through serde: a
//! body must be exactly one MessagePack map with `str` keys and nothing after
//! it, each known field must have exactly its documented type, a key may
//! appear once per map, and every count and size is checked against the
//! [`Limits`] as soon as its header is read, before anything is allocated for
//! it. Unknown fields are skipped, but must be well-formed and nest at most
//! [`MAX_UNKNOWN_DEPTH`] levels.
//!
//! Error messages name the field at fault, never a value the client sent.

use std::collections::HashSet;
use std::fmt;

use bstore_domain::Limits;
use serde::{Deserialize, Serialize};

/// The ops of protocol version 1, the last two tokens of a request subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiOp {
    /// `creds.get`: read the creds.
    CredsGet,
    /// `creds.put`: replace the creds.
    CredsPut,
    /// `keys.get`: read keys of one type.
    KeysGet,
    /// `keys.set`: write and delete keys, all or nothing.
    KeysSet,
    /// `session.delete`: forget the session.
    SessionDelete,
    /// `session.info`: summarize the session.
    SessionInfo,
    /// `keys.list`: a page of the ids stored under one type.
    KeysList,
    /// `session.claim`: ask for or renew the session's writer claim.
    SessionClaim,
}

impl ApiOp {
    /// Every op, in the order of `docs/protocol.md`.
    pub const ALL: [ApiOp; 8] = [
        ApiOp::CredsGet,
        ApiOp::CredsPut,
        ApiOp::KeysGet,
        ApiOp::KeysSet,
        ApiOp::SessionDelete,
        ApiOp::SessionInfo,
        ApiOp::KeysList,
        ApiOp::SessionClaim,
    ];

    /// The op named by `token` (`keys.get`, ...), if it is one.
    pub fn parse(token: &str) -> Option<ApiOp> {
        Some(match token {
            "creds.get" => ApiOp::CredsGet,
            "creds.put" => ApiOp::CredsPut,
            "keys.get" => ApiOp::KeysGet,
            "keys.set" => ApiOp::KeysSet,
            "session.delete" => ApiOp::SessionDelete,
            "session.info" => ApiOp::SessionInfo,
            "keys.list" => ApiOp::KeysList,
            "session.claim" => ApiOp::SessionClaim,
            _ => return None,
        })
    }

    /// The op's subject tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiOp::CredsGet => "creds.get",
            ApiOp::CredsPut => "creds.put",
            ApiOp::KeysGet => "keys.get",
            ApiOp::KeysSet => "keys.set",
            ApiOp::SessionDelete => "session.delete",
            ApiOp::SessionInfo => "session.info",
            ApiOp::KeysList => "keys.list",
            ApiOp::SessionClaim => "session.claim",
        }
    }

    /// The op's position in [`ApiOp::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ApiOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The changes of a `keys.set`: per type, per id, a value or `None` (delete),
/// in the order the body holds them. No type repeats, nor an id within a type.
pub type KeySetData<'a> = Vec<(&'a str, Vec<(&'a str, Option<&'a [u8]>)>)>;

/// A request body, borrowing its strings and bytes from the encoded body (or,
/// on the client, from the caller). Ids are not validated here; that is the
/// domain's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody<'a> {
    /// `creds.get`: `{}`.
    CredsGet,
    /// `creds.put`: `{ "rid"?: str, "creds": bin }`.
    CredsPut {
        /// The request id.
        rid: Option<&'a str>,
        /// The client-encoded creds.
        creds: &'a [u8],
    },
    /// `keys.get`: `{ "type": str, "ids": [str, ...] }`.
    KeysGet {
        /// The key type.
        ty: &'a str,
        /// The ids wanted.
        ids: Vec<&'a str>,
    },
    /// `keys.set`: `{ "rid"?: str, "data": { type: { id: bin | nil } } }`.
    KeysSet {
        /// The request id.
        rid: Option<&'a str>,
        /// The changes.
        data: KeySetData<'a>,
    },
    /// `session.delete`: `{ "rid"?: str }`.
    SessionDelete {
        /// The request id.
        rid: Option<&'a str>,
    },
    /// `session.info`: `{}`.
    SessionInfo,
    /// `keys.list`: `{ "type": str, "after"?: str, "limit"?: uint }`.
    KeysList {
        /// The key type.
        ty: &'a str,
        /// The cursor: only ids after this one, in byte order.
        after: Option<&'a str>,
        /// Most ids wanted in the page (1 up to the ids-per-call limit).
        limit: Option<usize>,
    },
    /// `session.claim`: `{ "claim"?: str }`.
    SessionClaim {
        /// The claim to renew; without it, a new claim is asked for.
        claim: Option<&'a str>,
    },
}

/// Why a request body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not a body of the documented shape (code 400).
    #[error("{0}")]
    Malformed(String),
    /// A count or size over a limit (code 413).
    #[error("{what} is {actual}, over the limit of {limit}")]
    TooLarge {
        /// Which limit.
        what: &'static str,
        /// The configured maximum.
        limit: usize,
        /// What the body declared.
        actual: usize,
    },
}

fn malformed(message: impl Into<String>) -> BodyError {
    BodyError::Malformed(message.into())
}

fn over(what: &'static str, limit: usize, actual: usize) -> Result<(), BodyError> {
    if actual > limit { Err(BodyError::TooLarge { what, limit, actual }) } else { Ok(()) }
}

/// Most fields one request map may hold, known and unknown together.
pub const MAX_FIELDS: usize = 64;

/// How deep an unknown field's value may nest (a scalar is depth 1).
pub const MAX_UNKNOWN_DEPTH: usize = 16;

impl<'a> RequestBody<'a> {
    /// The op this body belongs to.
    pub fn op(&self) -> ApiOp {
        match self {
            RequestBody::CredsGet => ApiOp::CredsGet,
            RequestBody::CredsPut { .. } => ApiOp::CredsPut,
            RequestBody::KeysGet { .. } => ApiOp::KeysGet,
            RequestBody::KeysSet { .. } => ApiOp::KeysSet,
            RequestBody::SessionDelete { .. } => ApiOp::SessionDelete,
            RequestBody::SessionInfo => ApiOp::SessionInfo,
            RequestBody::KeysList { .. } => ApiOp::KeysList,
            RequestBody::SessionClaim { .. } => ApiOp::SessionClaim,
        }
    }

    /// Decodes the body of a request to `op`, strictly (see the module
    /// documentation). An empty body is the empty map, which is a whole
    /// request only for the ops without a required field. The service
    /// decodes with [`RequestBody::decode_claimed`]; this is for the tests.
    #[cfg(test)]
    pub fn decode(op: ApiOp, body: &'a [u8], limits: &Limits) -> Result<Self, BodyError> {
        Self::decode_claimed(op, body, limits).map(|(body, _)| body)
    }

    /// Decodes the body of a request to `op`, strictly (see the module
    /// documentation), with the writer claim a write carries (`"claim": str`
    /// in `creds.put`, `keys.set` and `session.delete`; `None` for the other
    /// ops). An empty body is the empty map, which is a whole request only
    /// for the ops without a required field.
    pub fn decode_claimed(op: ApiOp, body: &'a [u8], limits: &Limits) -> Result<(Self, Option<&'a str>), BodyError> {
        let mut r = Reader { buf: body, pos: 0 };
        let fields = if body.is_empty() { 0 } else { r.map_len("the body")? };
        if fields > MAX_FIELDS {
            return Err(malformed(format!("the body has {fields} fields; at most {MAX_FIELDS} are accepted")));
        }
        let mut seen: Vec<&str> = Vec::with_capacity(fields);
        let (mut rid, mut creds, mut ty, mut ids, mut data) = (None, None, None, None, None);
        let (mut after, mut limit, mut claim) = (None, None, None);
        for _ in 0..fields {
            let name = r.str().map_err(|_| malformed("every field name of the body must be a str"))?;
            if seen.contains(&name) {
                return Err(match known_field(op, name) {
                    Some(field) => malformed(format!("field `{field}` appears twice")),
                    None => malformed("a field appears twice in the body"),
                });
            }
            seen.push(name);
            match known_field(op, name) {
                Some("rid") => rid = Some(r.str().map_err(|_| malformed("field `rid` must be a str"))?),
                Some("creds") => creds = Some(r.bytes("field `creds`", "creds size in bytes", limits.max_value_bytes)?),
                Some("type") => ty = Some(r.str().map_err(|_| malformed("field `type` must be a str"))?),
                Some("ids") => ids = Some(read_ids(&mut r, limits)?),
                Some("data") => data = Some(read_data(&mut r, limits)?),
                Some("after") => after = Some(r.str().map_err(|_| malformed("field `after` must be a str"))?),
                Some("limit") => limit = Some(read_limit(&mut r, limits)?),
                Some("claim") => claim = Some(r.str().map_err(|_| malformed("field `claim` must be a str"))?),
                _ => r.skip(MAX_UNKNOWN_DEPTH)?,
            }
        }
        if r.pos != body.len() {
            return Err(malformed("bytes follow the body's map"));
        }
        let required = |field: &'static str| malformed(format!("field `{field}` is required"));
        let body = match op {
            ApiOp::CredsGet => RequestBody::CredsGet,
            ApiOp::SessionInfo => RequestBody::SessionInfo,
            ApiOp::CredsPut => RequestBody::CredsPut { rid, creds: creds.ok_or_else(|| required("creds"))? },
            ApiOp::KeysGet => RequestBody::KeysGet { ty: ty.ok_or_else(|| required("type"))?, ids: ids.ok_or_else(|| required("ids"))? },
            ApiOp::KeysSet => RequestBody::KeysSet { rid, data: data.ok_or_else(|| required("data"))? },
            ApiOp::SessionDelete => RequestBody::SessionDelete { rid },
            ApiOp::KeysList => RequestBody::KeysList { ty: ty.ok_or_else(|| required("type"))?, after, limit },
            ApiOp::SessionClaim => return Ok((RequestBody::SessionClaim { claim }, None)),
        };
        Ok((body, claim))
    }

    /// Encodes the body as the protocol documents it: a map holding the
    /// fields that are set, byte strings as `bin`.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        match self {
            RequestBody::CredsGet | RequestBody::SessionInfo => w.map(0),
            RequestBody::CredsPut { rid, creds } => {
                w.map(1 + usize::from(rid.is_some()));
                w.rid(*rid);
                w.str("creds");
                w.bin(creds);
            }
            RequestBody::KeysGet { ty, ids } => {
                w.map(2);
                w.str("type");
                w.str(ty);
                w.str("ids");
                w.array(ids.len());
                for id in ids {
                    w.str(id);
                }
            }
            RequestBody::KeysSet { rid, data } => {
                w.map(1 + usize::from(rid.is_some()));
                w.rid(*rid);
                w.str("data");
                w.map(data.len());
                for (ty, ids) in data {
                    w.str(ty);
                    w.map(ids.len());
                    for (id, value) in ids {
                        w.str(id);
                        match value {
                            Some(v) => w.bin(v),
                            None => w.nil(),
                        }
                    }
                }
            }
            RequestBody::SessionDelete { rid } => {
                w.map(usize::from(rid.is_some()));
                w.rid(*rid);
            }
            RequestBody::KeysList { ty, after, limit } => {
                w.map(1 + usize::from(after.is_some()) + usize::from(limit.is_some()));
                w.str("type");
                w.str(ty);
                if let Some(after) = after {
                    w.str("after");
                    w.str(after);
                }
                if let Some(limit) = limit {
                    w.str("limit");
                    w.uint(*limit as u64);
                }
            }
            RequestBody::SessionClaim { claim } => {
                w.map(usize::from(claim.is_some()));
                if let Some(claim) = claim {
                    w.str("claim");
                    w.str(claim);
                }
            }
        }
        w.0
    }

    /// [`RequestBody::encode`] with a writer claim for a write (`claim`
    /// first in the map). Bodies of other ops are encoded without it.
    pub fn encode_claimed(&self, claim: Option<&str>) -> Vec<u8> {
        let plain = self.encode();
        let (Some(claim), ApiOp::CredsPut | ApiOp::KeysSet | ApiOp::SessionDelete) = (claim, self.op()) else { return plain };
        // Every write body is a fixmap of at most two fields.
        debug_assert!(plain[0] & 0xf0 == 0x80 && plain[0] & 0x0f < 15);
        let mut w = Writer(Vec::with_capacity(plain.len() + claim.len() + 8));
        w.0.push(plain[0] + 1);
        w.str("claim");
        w.str(claim);
        w.0.extend_from_slice(&plain[1..]);
        w.0
    }
}

/// The name of a field `op` knows, or `None` for an unknown one.
fn known_field(op: ApiOp, name: &str) -> Option<&'static str> {
    Some(match (op, name) {
        (ApiOp::CredsPut | ApiOp::KeysSet | ApiOp::SessionDelete, "rid") => "rid",
        (ApiOp::CredsPut, "creds") => "creds",
        (ApiOp::KeysGet | ApiOp::KeysList, "type") => "type",
        (ApiOp::KeysList, "after") => "after",
        (ApiOp::KeysList, "limit") => "limit",
        (ApiOp::KeysGet, "ids") => "ids",
        (ApiOp::KeysSet, "data") => "data",
        (ApiOp::CredsPut | ApiOp::KeysSet | ApiOp::SessionDelete | ApiOp::SessionClaim, "claim") => "claim",
        _ => return None,
    })
}

/// `ids` of a `keys.get`: the count is checked at the array header.
fn read_ids<'a>(r: &mut Reader<'a>, limits: &Limits) -> Result<Vec<&'a str>, BodyError> {
    let n = r.array_len("ids")?;
    over("ids in one keys.get", limits.max_ids_per_call, n)?;
    r.room_for(n, "ids")?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(r.str().map_err(|_| malformed("field `ids` must be an array of str"))?);
    }
    Ok(ids)
}

/// `limit` of a `keys.list`: a positive integer, at most the ids-per-call
/// limit.
fn read_limit(r: &mut Reader<'_>, limits: &Limits) -> Result<usize, BodyError> {
    let n = r.uint().ok_or_else(|| malformed("field `limit` must be a positive integer"))??;
    if n == 0 {
        return Err(malformed("field `limit` must be at least 1"));
    }
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    over("ids in one keys.list", limits.max_ids_per_call, n)?;
    Ok(n)
}

/// `data` of a `keys.set`: the id count (over all types) is checked at each
/// map header, each value at its header, the byte total as it grows.
fn read_data<'a>(r: &mut Reader<'a>, limits: &Limits) -> Result<KeySetData<'a>, BodyError> {
    let types = r.map_len("data")?;
    over("key types in one keys.set", limits.max_ids_per_call, types)?;
    r.room_for(types.saturating_mul(2), "data")?;
    let mut data = Vec::with_capacity(types);
    let mut type_names = HashSet::with_capacity(types);
    let (mut total_ids, mut total_bytes) = (0usize, 0usize);
    for _ in 0..types {
        let ty = r.str().map_err(|_| malformed("every key type in `data` must be a str"))?;
        if !type_names.insert(ty) {
            return Err(malformed("a key type appears twice in `data`"));
        }
        let n = r.map_len("each key type's entry in `data`")?;
        total_ids = total_ids.saturating_add(n);
        over("ids in one keys.set", limits.max_ids_per_call, total_ids)?;
        r.room_for(n.saturating_mul(2), "data")?;
        let mut entries = Vec::with_capacity(n);
        let mut id_names = HashSet::with_capacity(n);
        for _ in 0..n {
            let id = r.str().map_err(|_| malformed("every key id in `data` must be a str"))?;
            if !id_names.insert(id) {
                return Err(malformed("a key id appears twice under one type in `data`"));
            }
            let value = if r.peek() == Some(0xc0) {
                r.pos += 1;
                None
            } else {
                let v = r.bytes("each value in `data`", "key value size in bytes", limits.max_value_bytes)?;
                total_bytes += v.len();
                over("total value bytes in one keys.set", limits.max_set_bytes, total_bytes)?;
                Some(v)
            };
            entries.push((id, value));
        }
        data.push((ty, entries));
    }
    Ok(data)
}

/// A cursor over an encoded body. Every length is checked against the bytes
/// left before it is used.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BodyError> {
        if n > self.left() {
            return Err(malformed("the body ends in the middle of a value"));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    /// A big-endian unsigned length of `width` bytes.
    fn len(&mut self, width: usize) -> Result<usize, BodyError> {
        Ok(self.take(width)?.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b)))
    }

    /// Refuses a header announcing more elements than bytes are left (each
    /// element takes at least one), before anything is allocated for them.
    fn room_for(&self, elements: usize, what: &str) -> Result<(), BodyError> {
        if elements > self.left() {
            return Err(malformed(format!("{what} announces more elements than the body holds")));
        }
        Ok(())
    }

    fn map_len(&mut self, what: &str) -> Result<usize, BodyError> {
        self.container_len(0x80, 0xde).ok_or_else(|| malformed(format!("{what} must be a map")))?
    }

    fn array_len(&mut self, field: &str) -> Result<usize, BodyError> {
        self.container_len(0x90, 0xdc).ok_or_else(|| malformed(format!("field `{field}` must be an array")))?
    }

    /// The element count of a map or array header at the cursor (its fix
    /// form starts at `fix`, its 16-bit form is `m16`, the 32-bit one
    /// `m16 + 1`), consuming the header; `None` if another type is there.
    fn container_len(&mut self, fix: u8, m16: u8) -> Option<Result<usize, BodyError>> {
        let m = self.peek()?;
        let width = match m {
            _ if m & 0xf0 == fix => {
                self.pos += 1;
                return Some(Ok(usize::from(m & 0x0f)));
            }
            _ if m == m16 => 2,
            _ if m == m16 + 1 => 4,
            _ => return None,
        };
        self.pos += 1;
        Some(self.len(width))
    }

    /// The length of a `str` header at the cursor, consuming the header.
    fn str_len(&mut self) -> Option<Result<usize, BodyError>> {
        let n = match self.peek()? {
            m @ 0xa0..=0xbf => {
                self.pos += 1;
                Ok(usize::from(m & 0x1f))
            }
            0xd9 => {
                self.pos += 1;
                self.len(1)
            }
            0xda => {
                self.pos += 1;
                self.len(2)
            }
            0xdb => {
                self.pos += 1;
                self.len(4)
            }
            _ => return None,
        };
        Some(n)
    }

    /// A non-negative integer at the cursor (positive fixint or `uint`
    /// 8–64), consuming it; `None` if another type is there. A negative or
    /// float value, even a whole one, is not taken.
    fn uint(&mut self) -> Option<Result<u64, BodyError>> {
        let width = match self.peek()? {
            m @ 0x00..=0x7f => {
                self.pos += 1;
                return Some(Ok(u64::from(m)));
            }
            0xcc => 1,
            0xcd => 2,
            0xce => 4,
            0xcf => 8,
            _ => return None,
        };
        self.pos += 1;
        Some(self.take(width).map(|b| b.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b))))
    }

    /// The length of a `bin` header at the cursor, consuming the header.
    fn bin_len(&mut self) -> Option<Result<usize, BodyError>> {
        let width = match self.peek()? {
            0xc4 => 1,
            0xc5 => 2,
            0xc6 => 4,
            _ => return None,
        };
        self.pos += 1;
        Some(self.len(width))
    }

    /// A `str`; `Err` names no field, callers do.
    fn str(&mut self) -> Result<&'a str, BodyError> {
        let n = self.str_len().ok_or_else(|| malformed("expected a str"))??;
        std::str::from_utf8(self.take(n)?).map_err(|_| malformed("a str is not valid UTF-8"))
    }

    /// A byte string: `bin`, or `str` (its UTF-8 bytes), at most `max` long;
    /// the size is checked at the header. `what` names it in an error.
    fn bytes(&mut self, what: &str, limit: &'static str, max: usize) -> Result<&'a [u8], BodyError> {
        let (n, is_str) = match self.bin_len() {
            Some(n) => (n?, false),
            None => match self.str_len() {
                Some(n) => (n?, true),
                None => return Err(malformed(format!("{what} must be a bin (or a str)"))),
            },
        };
        over(limit, max, n)?;
        let bytes = self.take(n)?;
        if is_str && std::str::from_utf8(bytes).is_err() {
            return Err(malformed(format!("{what} is a str that is not valid UTF-8")));
        }
        Ok(bytes)
    }

    /// Skips one well-formed value of any type, nested at most `depth` deep.
    /// Each element takes at least one byte, so this is linear in the body.
    fn skip(&mut self, depth: usize) -> Result<(), BodyError> {
        if depth == 0 {
            return Err(malformed(format!("an unknown field nests deeper than {MAX_UNKNOWN_DEPTH} levels")));
        }
        let marker = self.peek().ok_or_else(|| malformed("the body ends in the middle of a value"))?;
        if let Some(n) = self.str_len() {
            let n = n?;
            return std::str::from_utf8(self.take(n)?).map(drop).map_err(|_| malformed("a str is not valid UTF-8"));
        }
        if let Some(n) = self.bin_len() {
            let n = n?;
            return self.take(n).map(drop);
        }
        if matches!(marker, 0x80..=0x8f | 0xde | 0xdf) {
            let n = self.map_len("a map")?.saturating_mul(2);
            return self.skip_elements(n, depth);
        }
        if matches!(marker, 0x90..=0x9f | 0xdc | 0xdd) {
            let n = self.array_len("an unknown")?;
            return self.skip_elements(n, depth);
        }
        self.pos += 1;
        let data = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
            0xcc | 0xd0 => 1,
            0xcd | 0xd1 => 2,
            0xca | 0xce | 0xd2 => 4,
            0xcb | 0xcf | 0xd3 => 8,
            // fixext 1, 2, 4, 8, 16: a type byte and the data.
            0xd4 => 2,
            0xd5 => 3,
            0xd6 => 5,
            0xd7 => 9,
            0xd8 => 17,
            // ext 8, 16, 32: a length, a type byte and the data.
            0xc7 => self.len(1)? + 1,
            0xc8 => self.len(2)? + 1,
            0xc9 => self.len(4)? + 1,
            _ => return Err(malformed("the body holds a byte that starts no MessagePack value")),
        };
        self.take(data).map(drop)
    }

    fn skip_elements(&mut self, n: usize, depth: usize) -> Result<(), BodyError> {
        self.room_for(n, "an unknown field")?;
        for _ in 0..n {
            self.skip(depth - 1)?;
        }
        Ok(())
    }
}

/// Writes the MessagePack the protocol uses, always in the shortest form.
struct Writer(Vec<u8>);

impl Writer {
    /// A length header: the `fix` form (its marker and largest length) if
    /// there is one and `n` fits, else the 8-, 16- or 32-bit form.
    fn header(&mut self, n: usize, fix: Option<(u8, usize)>, m8: Option<u8>, m16: u8, m32: u8) {
        match (fix, m8) {
            (Some((marker, max)), _) if n <= max => self.0.push(marker | n as u8),
            (_, Some(marker)) if n <= 0xff => self.0.extend_from_slice(&[marker, n as u8]),
            _ if n <= 0xffff => {
                self.0.push(m16);
                self.0.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                let n = u32::try_from(n).expect("a MessagePack length fits in 32 bits");
                self.0.push(m32);
                self.0.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    fn map(&mut self, n: usize) {
        self.header(n, Some((0x80, 15)), None, 0xde, 0xdf);
    }

    fn array(&mut self, n: usize) {
        self.header(n, Some((0x90, 15)), None, 0xdc, 0xdd);
    }

    fn str(&mut self, s: &str) {
        self.header(s.len(), Some((0xa0, 31)), Some(0xd9), 0xda, 0xdb);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn bin(&mut self, b: &[u8]) {
        self.header(b.len(), None, Some(0xc4), 0xc5, 0xc6);
        self.0.extend_from_slice(b);
    }

    fn nil(&mut self) {
        self.0.push(0xc0);
    }

    fn uint(&mut self, n: u64) {
        match n {
            0..=0x7f => self.0.push(n as u8),
            0x80..=0xff => self.0.extend_from_slice(&[0xcc, n as u8]),
            0x100..=0xffff => {
                self.0.push(0xcd);
                self.0.extend_from_slice(&(n as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.0.push(0xce);
                self.0.extend_from_slice(&(n as u32).to_be_bytes());
            }
            _ => {
                self.0.push(0xcf);
                self.0.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    fn rid(&mut self, rid: Option<&str>) {
        if let Some(rid) = rid {
            self.str("rid");
            self.str(rid);
        }
    }
}

/// The reply of `creds.get`: `{ "creds": bin | nil, "seq": uint }`. `B` is a
/// type that serializes as bytes (`&Bytes` in the service, `ByteBuf` in the
/// client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredsReply<B> {
    /// The creds, if stored.
    pub creds: Option<B>,
    /// The session's sequence.
    pub seq: u64,
}

/// The reply of `keys.get`: `{ "values": { id: bin, ... }, "seq": uint }`;
/// `M` is a map of ids to bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysReply<M> {
    /// The ids found and their values.
    pub values: M,
    /// The session's sequence.
    pub seq: u64,
}

/// The reply of `keys.list`: `{ "ids": [str, ...], "next": str | nil, "seq":
/// uint }`; `S` is a string type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdsReply<S> {
    /// The page's ids, in byte order.
    pub ids: Vec<S>,
    /// The `after` of the next page; `None` on the last page.
    #[serde(default)]
    pub next: Option<S>,
    /// The session's sequence the page was read at.
    pub seq: u64,
}

/// The reply of every write: `{ "seq": uint }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenReply {
    /// The session's sequence after the write.
    pub seq: u64,
}

/// The reply of a write that carried a writer claim: `{ "seq": uint,
/// "lease_ms": uint }`, the claim renewed for `lease_ms` from when the
/// request was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedWrittenReply {
    /// The session's sequence after the write.
    pub seq: u64,
    /// The claim's lease.
    pub lease_ms: u64,
}

/// The reply of `session.claim`: `{ "claim": str | nil, "lease_ms": uint,
/// "wait_ms": uint, "seq": uint }`. `S` is a string type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimReply<S> {
    /// The claim granted or renewed; `None`: another claim may still be in
    /// use, ask again after `wait_ms`.
    pub claim: Option<S>,
    /// How long the claim holds from when the request was sent (0 when not
    /// granted).
    pub lease_ms: u64,
    /// When not granted: how long until asking again may succeed.
    pub wait_ms: u64,
    /// The session's sequence.
    pub seq: u64,
}

/// The reply of `session.info`.
pub type InfoReply = bstore_domain::SessionInfo;

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(op: &str, body: &[u8]) -> Result<RequestBody<'static>, BodyError> {
        let body: &'static [u8] = Box::leak(body.to_vec().into_boxed_slice());
        RequestBody::decode(ApiOp::parse(op).unwrap(), body, &Limits::default())
    }

    fn refused(op: &str, body: &[u8]) -> String {
        match decode(op, body) {
            Err(BodyError::Malformed(m)) => m,
            other => panic!("{op} {body:x?}: expected a malformed body, got {other:?}"),
        }
    }

    fn enc(body: &RequestBody<'_>) -> Vec<u8> {
        body.encode()
    }

    /// `{ "rid": "r-1" }` as its bytes.
    const RID: &[u8] = b"\x81\xa3rid\xa3r-1";

    #[test]
    fn op_tokens_parse_and_print_back() {
        for (i, op) in ApiOp::ALL.into_iter().enumerate() {
            assert_eq!(ApiOp::parse(op.as_str()), Some(op));
            assert_eq!(op.index(), i);
            assert_eq!(op.to_string(), op.as_str());
        }
        for bad in ["", "keys", "keys.drop", "KEYS.GET", "keys.get ", "creds.get.x"] {
            assert_eq!(ApiOp::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_body_round_trips_through_the_encoder_and_the_decoder() {
        let long_id = "i".repeat(300);
        let big = vec![7u8; 70_000];
        let many: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        let bodies = [
            RequestBody::CredsGet,
            RequestBody::SessionInfo,
            RequestBody::SessionDelete { rid: None },
            RequestBody::SessionDelete { rid: Some("r-1") },
            RequestBody::CredsPut { rid: Some("r"), creds: b"" },
            RequestBody::CredsPut { rid: None, creds: &big },
            RequestBody::KeysGet { ty: "pre-key", ids: vec![] },
            RequestBody::KeysGet { ty: "pre-key", ids: many.iter().map(String::as_str).chain([long_id.as_str()]).collect() },
            RequestBody::KeysSet {
                rid: Some("r"),
                data: vec![
                    ("pre-key", vec![("1", Some(&b"a"[..])), ("2", None)]),
                    ("session", many.iter().map(|i| (i.as_str(), Some(&big[..300]))).collect()),
                    ("empty", vec![]),
                ],
            },
            RequestBody::KeysList { ty: "session", after: None, limit: None },
            RequestBody::KeysList { ty: "session", after: Some(&long_id), limit: Some(1) },
            RequestBody::KeysList { ty: "session", after: Some("1"), limit: None },
            RequestBody::KeysList { ty: "session", after: None, limit: Some(10_000) },
        ];
        for body in bodies {
            let bytes = enc(&body);
            assert_eq!(RequestBody::decode(body.op(), &bytes, &Limits::default()), Ok(body.clone()), "{bytes:x?}");
        }
    }

    #[test]
    fn claims_round_trip_and_are_decoded_strictly() {
        let limits = Limits::default();
        for body in [RequestBody::SessionClaim { claim: None }, RequestBody::SessionClaim { claim: Some("c-1") }] {
            let bytes = enc(&body);
            assert_eq!(RequestBody::decode(ApiOp::SessionClaim, &bytes, &limits), Ok(body.clone()), "{bytes:x?}");
        }
        assert_eq!(decode("session.claim", b""), Ok(RequestBody::SessionClaim { claim: None }), "an empty body asks for a claim");
        // A claim on each write, first in the map; a write without one decodes as before.
        let data = vec![("pre-key", vec![("1", Some(&b"a"[..])), ("2", None)])];
        for body in [
            RequestBody::CredsPut { rid: Some("r"), creds: b"c" },
            RequestBody::KeysSet { rid: Some("r"), data: data.clone() },
            RequestBody::KeysSet { rid: None, data: data.clone() },
            RequestBody::SessionDelete { rid: None },
            RequestBody::SessionDelete { rid: Some("r") },
        ] {
            for claim in [None, Some("0123abcd")] {
                let bytes = body.encode_claimed(claim);
                assert_eq!(RequestBody::decode_claimed(body.op(), &bytes, &limits), Ok((body.clone(), claim)), "{bytes:x?}");
                assert_eq!(RequestBody::decode(body.op(), &bytes, &limits), Ok(body.clone()));
            }
        }
        // What a general encoder writes decodes the same.
        let general = rmp_serde::to_vec_named(&serde_json::json!({"claim": "c", "rid": "r"})).unwrap();
        let general: &'static [u8] = Box::leak(general.into_boxed_slice());
        assert_eq!(
            RequestBody::decode_claimed(ApiOp::SessionDelete, general, &limits),
            Ok((RequestBody::SessionDelete { rid: Some("r") }, Some("c")))
        );
        // Not a str: nil, an integer, a bin, an array.
        for value in [&b"\xc0"[..], b"\x01", b"\xc4\x01c", b"\x91\xa1c"] {
            assert!(refused("session.claim", &[&b"\x81\xa5claim"[..], value].concat()).contains("`claim`"), "{value:x?}");
            assert!(refused("session.delete", &[&b"\x81\xa5claim"[..], value].concat()).contains("`claim`"), "{value:x?}");
        }
        assert!(refused("session.claim", b"\x82\xa5claim\xa1a\xa5claim\xa1b").contains("`claim`"));
        assert!(refused("session.claim", b"\x80\x00").contains("follow"));
        // Reads know no claim: it is an unknown field there, skipped.
        assert_eq!(decode("creds.get", b"\x81\xa5claim\xa1c"), Ok(RequestBody::CredsGet));
        let (_, claim) = RequestBody::decode_claimed(ApiOp::CredsGet, b"\x81\xa5claim\xa1c", &limits).unwrap();
        assert_eq!(claim, None);
        // Fields of other ops are unknown to session.claim.
        assert_eq!(decode("session.claim", b"\x81\xa3rid\x01"), Ok(RequestBody::SessionClaim { claim: None }));
        assert_eq!(ApiOp::parse("session.claim"), Some(ApiOp::SessionClaim));
    }

    #[test]
    fn bodies_made_by_a_general_encoder_decode() {
        // What rmp-serde (and MessagePack libraries of other languages)
        // write for the documented shapes.
        #[derive(Serialize)]
        struct Put<'a> {
            rid: &'a str,
            #[serde(with = "serde_bytes")]
            creds: &'a [u8],
        }
        let body = rmp_serde::to_vec_named(&Put { rid: "r-1", creds: b"\x00\x01" }).unwrap();
        assert_eq!(decode("creds.put", &body), Ok(RequestBody::CredsPut { rid: Some("r-1"), creds: b"\x00\x01" }));
        // And the client's encoder writes the same bytes a general one does,
        // in every length form.
        let big = vec![1u8; 70_000];
        for creds in [&b""[..], &big[..200], &big[..300], &big] {
            let general = rmp_serde::to_vec_named(&Put { rid: "r-1", creds }).unwrap();
            assert_eq!(RequestBody::CredsPut { rid: Some("r-1"), creds }.encode(), general);
        }
        #[derive(Serialize)]
        struct Get<'a> {
            #[serde(rename = "type")]
            ty: &'a str,
            ids: Vec<&'a str>,
        }
        let long: Vec<String> = [1, 31, 32, 255, 256, 70_000].iter().map(|&n| "x".repeat(n)).collect();
        let mut ids: Vec<&str> = long.iter().map(String::as_str).collect();
        for n in [ids.len(), 16, 70_000] {
            ids.resize(n, "1");
            let general = rmp_serde::to_vec_named(&Get { ty: "pre-key", ids: ids.clone() }).unwrap();
            assert_eq!(RequestBody::KeysGet { ty: "pre-key", ids: ids.clone() }.encode(), general, "{n} ids");
        }
        let body =
            rmp_serde::to_vec_named(&serde_json::json!({"type": "pre-key", "ids": ["1", "2"], "extra": {"a": [1, 2.5, null]}})).unwrap();
        assert_eq!(decode("keys.get", &body), Ok(RequestBody::KeysGet { ty: "pre-key", ids: vec!["1", "2"] }));
    }

    #[test]
    fn an_empty_body_is_an_empty_map_for_ops_without_required_fields() {
        assert_eq!(decode("creds.get", b""), Ok(RequestBody::CredsGet));
        assert_eq!(decode("session.info", b""), Ok(RequestBody::SessionInfo));
        assert_eq!(decode("session.delete", b""), Ok(RequestBody::SessionDelete { rid: None }));
        assert_eq!(decode("session.delete", b"\x80"), Ok(RequestBody::SessionDelete { rid: None }));
        assert!(refused("creds.put", b"").contains("`creds`"));
        assert!(refused("keys.get", b"").contains("`type`"));
        assert!(refused("keys.get", b"\x81\xa4type\xa1t").contains("`ids`"));
        assert!(refused("keys.set", b"\x80").contains("`data`"));
        assert!(refused("keys.list", b"").contains("`type`"));
        assert!(refused("keys.list", b"\x81\xa5after\xa11").contains("`type`"));
    }

    #[test]
    fn anything_but_one_map_with_str_keys_is_refused() {
        for op in ["creds.get", "session.info", "session.delete", "creds.put", "keys.get", "keys.set", "keys.list"] {
            for body in [
                &b"\x90"[..],            // []
                b"\x91\xa3r-1",          // [rid]
                b"\x92\xa3rid\xa3r-1",   // [ "rid", "r-1" ]
                b"\x81\x01\x02",         // {1: 2}
                b"\x81\x00\xa1x",        // {0: "x"}
                b"\x81\xc0\xa1x",        // {nil: "x"}
                b"\x80\x00",             // {} 0
                b"\x80\xc1garbage",      // {} garbage
                b"\x80\x80",             // {} {}
                b"\xc0",                 // nil
                b"\xa2{}",               // a str
                b"\xc4\x01\x80",         // a bin holding {}
                b"\x81",                 // a map cut short
                b"\x81\xa3rid",          // a field without a value
                b"\xde\x00",             // a map16 header cut short
                b"\xdf\xff\xff\xff\xff", // 4 G fields announced
                b"\x81\xa1\xff\x01",     // a field name that is not UTF-8
            ] {
                refused(op, body);
            }
        }
    }

    #[test]
    fn a_trailing_byte_after_a_valid_body_is_refused() {
        let good = enc(&RequestBody::KeysSet { rid: Some("r"), data: vec![("pre-key", vec![("1", Some(b"v"))])] });
        assert!(decode("keys.set", &good).is_ok());
        for tail in [&b"\x00"[..], b"\xc0", b"\x80", b"garbage"] {
            let body = [&good[..], tail].concat();
            assert!(refused("keys.set", &body).contains("follow"), "{tail:x?}");
        }
        assert!(refused("session.delete", &[RID, b"\x00"].concat()).contains("follow"));
    }

    #[test]
    fn known_fields_must_have_exactly_their_type() {
        // rid: str only (not nil, not an int, not a bin).
        for rid in [&b"\xc0"[..], b"\x01", b"\xc4\x01r", b"\x91\xa1r"] {
            refused("session.delete", &[&b"\x81\xa3rid"[..], rid].concat());
            refused("creds.put", &[&b"\x82\xa5creds\xc4\x00\xa3rid"[..], rid].concat());
        }
        // creds: bin or str; an array of small integers is not bytes.
        refused("creds.put", b"\x81\xa5creds\x93\x01\x02\x03");
        refused("creds.put", b"\x81\xa5creds\xc0");
        refused("creds.put", b"\x81\xa5creds\x05");
        refused("creds.put", b"\x81\xa5creds\x80");
        assert_eq!(decode("creds.put", b"\x81\xa5creds\xa2ab"), Ok(RequestBody::CredsPut { rid: None, creds: b"ab" }));
        refused("creds.put", b"\x81\xa5creds\xa1\xff");
        // type: str.
        refused("keys.get", b"\x82\xa4type\xc4\x01t\xa3ids\x90");
        refused("keys.get", b"\x82\xa4type\x01\xa3ids\x90");
        // ids: an array of str; not a map, not a str, no ints or bins inside.
        refused("keys.get", b"\x82\xa4type\xa1t\xa3ids\x81\xa11\xa11");
        refused("keys.get", b"\x82\xa4type\xa1t\xa3ids\xa11");
        refused("keys.get", b"\x82\xa4type\xa1t\xa3ids\x91\x01");
        refused("keys.get", b"\x82\xa4type\xa1t\xa3ids\x91\xc4\x011");
        refused("keys.get", b"\x82\xa4type\xa1t\xa3ids\x91\xc0");
        // data: a map of str to maps of str to bin, str or nil.
        refused("keys.set", b"\x81\xa4data\x90");
        refused("keys.set", b"\x81\xa4data\x91\x81\xa11\xc4\x01v");
        refused("keys.set", b"\x81\xa4data\x05");
        refused("keys.set", b"\x81\xa4data\x81\x01\x81\xa11\xc4\x01v"); // an integer type
        refused("keys.set", b"\x81\xa4data\x81\xa1t\x81\x01\xc4\x01v"); // an integer id
        refused("keys.set", b"\x81\xa4data\x81\xa1t\x91\xc4\x01v"); // ids as an array
        refused("keys.set", b"\x81\xa4data\x81\xa1t\x81\xa11\x07"); // an int value
        refused("keys.set", b"\x81\xa4data\x81\xa1t\x81\xa11\x92\x01\x02"); // bytes as an array of ints
        refused("keys.set", b"\x81\xa4data\x81\xa1t\x81\xa11\xc3"); // true
        refused("keys.set", b"\x81\xa4data\x81\xa1t\xc0"); // nil for a type's map
        assert_eq!(
            decode("keys.set", b"\x81\xa4data\x81\xa1t\x82\xa11\xa1v\xa12\xc0"),
            Ok(RequestBody::KeysSet { rid: None, data: vec![("t", vec![("1", Some(&b"v"[..])), ("2", None)])] })
        );
    }

    #[test]
    fn keys_list_takes_a_str_cursor_and_a_positive_integer_limit() {
        // `{ "type": "t", "limit": <value> }`
        let with_limit = |value: &[u8]| [&b"\x82\xa4type\xa1t\xa5limit"[..], value].concat();
        for (value, n) in [
            (&b"\x01"[..], 1),
            (b"\x7f", 127),
            (b"\xcc\x80", 128),
            (b"\xcd\x01\x2c", 300),
            (b"\xce\x00\x00\x27\x10", 10_000),
            (b"\xcf\x00\x00\x00\x00\x00\x00\x00\x05", 5),
        ] {
            assert_eq!(
                decode("keys.list", &with_limit(value)),
                Ok(RequestBody::KeysList { ty: "t", after: None, limit: Some(n) }),
                "{value:x?}"
            );
        }
        // Not a positive integer: 0, negative, float (even a whole one), str, nil, bool, bin.
        for value in [
            &b"\x00"[..],
            b"\xff",
            b"\xd0\xfb",
            b"\xd3\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\xcb\x40\x14\x00\x00\x00\x00\x00\x00",
            b"\xa15",
            b"\xc0",
            b"\xc3",
            b"\xc4\x01\x05",
        ] {
            assert!(refused("keys.list", &with_limit(value)).contains("`limit`"), "{value:x?}");
        }
        refused("keys.list", &with_limit(b"\xcd\x01"));
        // Over the ids-per-call limit: 413, however large.
        let limits = Limits { max_ids_per_call: 5, ..Limits::default() };
        for (value, actual) in [(&b"\x06"[..], 6), (b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", usize::MAX)] {
            let body: &'static [u8] = Box::leak(with_limit(value).into_boxed_slice());
            assert_eq!(
                RequestBody::decode(ApiOp::KeysList, body, &limits),
                Err(BodyError::TooLarge { what: "ids in one keys.list", limit: 5, actual })
            );
        }
        // The cursor is a str; nil is not an absent cursor.
        for value in [&b"\xc0"[..], b"\x01", b"\xc4\x011", b"\x91\xa11"] {
            assert!(refused("keys.list", &[&b"\x82\xa4type\xa1t\xa5after"[..], value].concat()).contains("`after`"), "{value:x?}");
        }
        assert!(refused("keys.list", b"\x82\xa4type\xa1t\xa4type\xa1u").contains("`type`"));
        assert!(refused("keys.list", b"\x83\xa4type\xa1t\xa5limit\x01\xa5limit\x02").contains("`limit`"));
        // Fields of other ops are unknown here, and skipped.
        assert_eq!(
            decode("keys.list", b"\x83\xa4type\xa1t\xa3ids\x91\xa11\xa3rid\x01"),
            Ok(RequestBody::KeysList { ty: "t", after: None, limit: None })
        );
        // What a general encoder writes, and the client's encoder writes the same.
        #[derive(Serialize)]
        struct List<'a> {
            #[serde(rename = "type")]
            ty: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            after: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            limit: Option<u64>,
        }
        for (after, limit) in [
            (None, None),
            (Some("x@s.whatsapp.net"), Some(1u64)),
            (None, Some(200)),
            (Some("a"), Some(70_000)),
            (Some("a"), Some(5_000_000_000)),
        ] {
            let general = rmp_serde::to_vec_named(&List { ty: "session", after, limit }).unwrap();
            let ours = RequestBody::KeysList { ty: "session", after, limit: limit.map(|n| n as usize) }.encode();
            assert_eq!(ours, general, "{after:?} {limit:?}");
        }
    }

    #[test]
    fn a_key_repeated_in_any_map_is_refused() {
        assert!(refused("session.delete", b"\x82\xa3rid\xa1a\xa3rid\xa1b").contains("`rid`"));
        refused("creds.put", b"\x82\xa5creds\xc4\x00\xa5creds\xc4\x00");
        refused("creds.get", b"\x82\xa1x\x01\xa1x\x02");
        refused("keys.set", b"\x81\xa4data\x82\xa1t\x80\xa1t\x80");
        refused("keys.set", b"\x81\xa4data\x81\xa1t\x82\xa11\xc0\xa11\xc4\x01v");
        // The same id under two types is two keys.
        assert!(decode("keys.set", b"\x81\xa4data\x82\xa1t\x81\xa11\xc0\xa1u\x81\xa11\xc0").is_ok());
    }

    #[test]
    fn unknown_fields_are_skipped_when_well_formed_and_bounded() {
        // Every kind of value, including ext types, floats and nested maps
        // with non-str keys.
        let unknown: &[&[u8]] = &[
            b"\x01",
            b"\xff",
            b"\xc0",
            b"\xc3",
            b"\xcc\x01",
            b"\xcd\x01\x02",
            b"\xce\x01\x02\x03\x04",
            b"\xcf\x01\x02\x03\x04\x05\x06\x07\x08",
            b"\xd3\x01\x02\x03\x04\x05\x06\x07\x08",
            b"\xca\x00\x00\x00\x00",
            b"\xcb\x00\x00\x00\x00\x00\x00\x00\x00",
            b"\xd4\x01\x00",
            b"\xd8\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            b"\xc7\x02\x05ab",
            b"\xc4\x02ab",
            b"\xd9\x02ab",
            b"\x92\x01\x81\x01\x02",
            b"\xdc\x00\x01\xc0",
            b"\xde\x00\x01\x01\x90",
        ];
        for value in unknown {
            // `{ "other": value, "rid": "r-1" }`
            let body = [&b"\x82\xa5other"[..], value, &RID[1..]].concat();
            assert_eq!(decode("session.delete", &body), Ok(RequestBody::SessionDelete { rid: Some("r-1") }), "{value:x?}");
            // A field unknown to an op is skipped even if another op knows it.
            assert_eq!(decode("creds.get", &body), Ok(RequestBody::CredsGet));
        }
        // Ill-formed unknown values are refused.
        for value in [
            &b"\xc1"[..],
            b"\xcd\x01",
            b"\x92\x01",
            b"\x81\x01",
            b"\xa3ab",
            b"\xa1\xff",
            b"\xc7\x05\x01ab",
            b"\xdd\xff\xff\xff\xff",
            b"\xdf\xff\xff\xff\xff",
        ] {
            refused("creds.get", &[&b"\x81\xa5other"[..], value].concat());
        }
        // Nesting is bounded.
        let deep = |levels: usize| [&b"\x81\xa5other"[..], &vec![0x91; levels - 1], b"\x01"].concat();
        assert_eq!(decode("creds.get", &deep(MAX_UNKNOWN_DEPTH)), Ok(RequestBody::CredsGet));
        assert!(refused("creds.get", &deep(MAX_UNKNOWN_DEPTH + 1)).contains("deeper"));
        let recursion_bomb = [&b"\x81\xa5other"[..], &vec![0x91; 1 << 20], b"\x01"].concat();
        refused("creds.get", &recursion_bomb);
        // And so is the number of fields.
        let mut many = vec![0xde, 0, MAX_FIELDS as u8 + 1];
        for i in 0..=MAX_FIELDS {
            many.extend_from_slice(&[0xa2, b'f', i as u8 + b'0', 0x01]);
        }
        refused("creds.get", &many);
    }

    fn ids_body(n: u32, id: &[u8]) -> Vec<u8> {
        let mut body = b"\x82\xa4type\xa7pre-key\xa3ids\xdd".to_vec();
        body.extend_from_slice(&n.to_be_bytes());
        for _ in 0..n {
            body.extend_from_slice(id);
        }
        body
    }

    #[test]
    fn the_id_count_is_refused_at_the_header_before_any_id_is_read() {
        let limits = Limits::default();
        // 2.1 M ids announced: refused from the header alone, so a body that
        // holds none of them gets the same answer as one that holds them all.
        let header_only = &ids_body(2_100_000, b"")[..];
        let err = RequestBody::decode(ApiOp::KeysGet, header_only, &limits).unwrap_err();
        assert_eq!(err, BodyError::TooLarge { what: "ids in one keys.get", limit: 10_000, actual: 2_100_000 });
        let full = ids_body(2_100_000, b"\xa0");
        assert_eq!(RequestBody::decode(ApiOp::KeysGet, &full, &limits).unwrap_err(), err);
        // At the limit it decodes.
        let at = ids_body(10_000, b"\xa11");
        assert!(matches!(RequestBody::decode(ApiOp::KeysGet, &at, &limits), Ok(RequestBody::KeysGet { ids, .. }) if ids.len() == 10_000));
        // Under the limit but more than the body holds: malformed, and no
        // room was reserved for them.
        refused("keys.get", &ids_body(9_000, b""));
    }

    #[test]
    fn keys_set_counts_and_sizes_are_refused_at_their_headers() {
        let limits = Limits { max_ids_per_call: 3, max_value_bytes: 10, max_set_bytes: 15 };
        let dec = |b: &[u8]| RequestBody::decode(ApiOp::KeysSet, Box::leak(b.to_vec().into_boxed_slice()), &limits);
        let too_large = |b: &[u8]| match dec(b) {
            Err(BodyError::TooLarge { what, .. }) => what,
            other => panic!("{b:x?}: {other:?}"),
        };
        // Ids are counted over all types, at each type's map header: the
        // second header announces the fourth id and nothing after it is read.
        assert_eq!(too_large(b"\x81\xa4data\x82\xa1a\x82\xa11\xc0\xa12\xc0\xa1b\x82"), "ids in one keys.set");
        // Types are bounded too, even with no ids under them.
        assert_eq!(too_large(b"\x81\xa4data\x84"), "key types in one keys.set");
        // A value over the size limit is refused at its header (nothing of it follows).
        assert_eq!(too_large(b"\x81\xa4data\x81\xa1a\x81\xa11\xc6\x00\x01\x00\x00"), "key value size in bytes");
        assert_eq!(too_large(b"\x81\xa4data\x81\xa1a\x81\xa11\xdb\x00\x01\x00\x00"), "key value size in bytes");
        // The total as it grows.
        let two = b"\x81\xa4data\x81\xa1a\x82\xa11\xc4\x0a0123456789\xa12\xc4\x06012345";
        assert_eq!(too_large(two), "total value bytes in one keys.set");
        let fits = b"\x81\xa4data\x81\xa1a\x82\xa11\xc4\x0a0123456789\xa12\xc4\x05012345";
        assert!(dec(&fits[..fits.len() - 1]).is_ok());
        // Creds: the value size limit, at the header.
        let creds = RequestBody::decode(ApiOp::CredsPut, b"\x81\xa5creds\xc6\xff\xff\xff\xff", &limits);
        assert!(matches!(creds, Err(BodyError::TooLarge { what: "creds size in bytes", .. })), "{creds:?}");
    }

    #[test]
    fn messages_name_fields_not_values() {
        let secret = "victimcorp-bot-4471-secret";
        let mut bodies = vec![
            [&b"\x81\xda\x00\x1a"[..], secret.as_bytes(), b"\x01\x02"].concat(), // an unknown field then garbage
            [&b"\x82\xa1"[..], b"x\x01\xa1x\x02"].concat(),
        ];
        let mut dup = b"\x82\xba".to_vec();
        dup.extend_from_slice(secret.as_bytes());
        dup.push(0x01);
        dup.push(0xba);
        dup.extend_from_slice(secret.as_bytes());
        dup.push(0x01);
        bodies.push(dup);
        let mut dup_id = b"\x81\xa4data\x81\xa1t\x82\xba".to_vec();
        dup_id.extend_from_slice(secret.as_bytes());
        dup_id.push(0xc0);
        dup_id.push(0xba);
        dup_id.extend_from_slice(secret.as_bytes());
        dup_id.push(0xc0);
        for body in bodies {
            let m = refused("creds.get", &body);
            assert!(!m.contains(secret), "{m}");
        }
        let m = refused("keys.set", &dup_id);
        assert!(!m.contains(secret) && m.contains("`data`"), "{m}");
    }
}
