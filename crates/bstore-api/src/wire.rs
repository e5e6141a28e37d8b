//! Subjects and bodies: decoding requests, encoding replies.
//!
//! The protocol itself (ops, body shapes, the strict decoder) is in
//! [`crate::protocol`]; this module turns a subject and a decoded body into
//! what a session actor does, and a reply into its body.

use std::collections::HashMap;

use bstore_domain::{Command, DomainError, IdError, KeyChanges, KeyId, KeyType, Limits, SessionKey};
use bstore_session::{Op, Reply, SessionError};
use bytes::Bytes;

use crate::ErrorCode;
use crate::protocol::{ApiOp, BodyError, ClaimReply, ClaimedWrittenReply, CredsReply, IdsReply, KeysReply, RequestBody, WrittenReply};

/// A refused request: its code and a message for humans. The message names
/// the op token or the field at fault, never the subject, tenant or session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal(pub ErrorCode, pub String);

impl From<IdError> for Refusal {
    /// Says which id broke which rule, without the id itself.
    fn from(e: IdError) -> Self {
        Refusal(ErrorCode::InvalidId, format!("invalid {}: {}", e.what, e.reason))
    }
}

impl From<BodyError> for Refusal {
    fn from(e: BodyError) -> Self {
        let code = match e {
            BodyError::Malformed(_) => ErrorCode::BadRequest,
            BodyError::TooLarge { .. } => ErrorCode::TooLarge,
        };
        Refusal(code, e.to_string())
    }
}

impl From<&SessionError> for Refusal {
    /// A session error as the client is told it. Data that does not open is
    /// described by the session and log crates with the session's name and
    /// the event's place; the reply says only what happened, so the caller
    /// logs `e` itself where the operator needs those details.
    fn from(e: &SessionError) -> Self {
        let message = match e {
            SessionError::Rejected(DomainError::InvalidId(id)) => return id.clone().into(),
            SessionError::Unreadable(_) => "stored data of the session could not be opened or decoded (see the service's log)".into(),
            other => other.to_string(),
        };
        Refusal(ErrorCode::of(e), message)
    }
}

impl Refusal {
    /// A session error as the client of `key` is told it: like
    /// `Refusal::from`, but unreadable data keeps its cause (which key,
    /// which event) with the session's name taken out, in both forms the
    /// session and log crates write it (`tenant/session`, `tenant.session`).
    pub(crate) fn of_session(e: &SessionError, key: &SessionKey) -> Self {
        let SessionError::Unreadable(detail) = e else { return Refusal::from(e) };
        let cause = detail.replace(&key.to_string(), "the session").replace(&format!("{}.{}", key.tenant, key.session), "the session");
        Refusal(ErrorCode::Unreadable, format!("stored data could not be opened: {cause}"))
    }
}

/// Op families: the first op token of every op. An unknown op is named in
/// its refusal only when it looks like one (a family, then a word of
/// lowercase letters), so a subject missing a token never has its session or
/// tenant echoed back as an "op".
const OP_FAMILIES: [&str; 3] = ["creds", "keys", "session"];

/// Splits `<prefix>.<tenant>.<session>.<op>` and validates each part.
pub(crate) fn parse_subject(prefix: &str, subject: &str) -> Result<(SessionKey, ApiOp), Refusal> {
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| Refusal(ErrorCode::UnknownOp, format!("the subject does not start with the prefix {prefix:?}")))?;
    // The op is the last two tokens; everything before them must be exactly
    // `<tenant>.<session>`.
    let Some(ids) = rest.rsplitn(3, '.').nth(2) else {
        return Err(Refusal(ErrorCode::UnknownOp, format!("expected {prefix}.<tenant>.<session>.<op>")));
    };
    let token = &rest[ids.len() + 1..];
    let Some(op) = ApiOp::parse(token) else {
        let known = ApiOp::ALL.map(ApiOp::as_str).join(", ");
        let named = match token.split_once('.') {
            Some((family, action))
                if OP_FAMILIES.contains(&family) && (1..=32).contains(&action.len()) && action.bytes().all(|b| b.is_ascii_lowercase()) =>
            {
                format!(" {token:?}")
            }
            _ => String::new(),
        };
        return Err(Refusal(ErrorCode::UnknownOp, format!("unknown op{named}; known: {known}")));
    };
    match ids.split_once('.') {
        Some((tenant, session)) if !session.contains('.') => Ok((SessionKey::parse(tenant, session)?, op)),
        _ => Err(Refusal(ErrorCode::InvalidId, "tenant and session must be single subject tokens without '.'".into())),
    }
}

pub(crate) fn check_rid(rid: Option<&str>) -> Result<Option<String>, Refusal> {
    if let Some(r) = rid {
        let ok = !r.is_empty() && r.len() <= 64 && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(Refusal(ErrorCode::InvalidId, "rid must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'".into()));
        }
    }
    Ok(rid.map(str::to_owned))
}

/// A writer claim id: what the service hands out (32 hex digits), and at
/// most what a rid may be, so that a malformed one is refused rather than
/// compared.
fn check_claim(claim: Option<&str>) -> Result<Option<String>, Refusal> {
    if let Some(c) = claim {
        let ok = !c.is_empty() && c.len() <= 64 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(Refusal(ErrorCode::InvalidId, "claim must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'".into()));
        }
    }
    Ok(claim.map(str::to_owned))
}

/// A write, as the holder of a writer claim when the body carries one.
fn write_op(cmd: Command, rid: Option<String>, claim: Option<String>) -> Op {
    match claim {
        Some(claim) => Op::ClaimedWrite { claim, cmd, rid },
        None => Op::Write { cmd, rid },
    }
}

/// Decodes a request body for `op` and turns it into what the session actor
/// does. The size of the body, then every count and size inside it, is
/// checked before anything is built from it: 413 for a limit, 400 for a body
/// of the wrong shape, 422 for a malformed id.
pub(crate) fn parse_body(op: ApiOp, body: &[u8], limits: &Limits, max_request_bytes: usize) -> Result<Op, Refusal> {
    if body.len() > max_request_bytes {
        return Err(Refusal(ErrorCode::TooLarge, format!("body is {} bytes, over the limit of {max_request_bytes}", body.len())));
    }
    let (decoded, claim) = RequestBody::decode_claimed(op, body, limits)?;
    let claim = check_claim(claim)?;
    Ok(match decoded {
        RequestBody::CredsGet => Op::GetCreds,
        RequestBody::SessionInfo => Op::Info,
        RequestBody::CredsPut { rid, creds } => {
            let rid = check_rid(rid)?;
            write_op(Command::PutCreds { creds: Bytes::copy_from_slice(creds) }, rid, claim)
        }
        RequestBody::KeysGet { ty, ids } => {
            let ty = KeyType::parse(ty)?;
            let ids = ids.into_iter().map(KeyId::parse).collect::<Result<_, _>>()?;
            Op::GetKeys { ty, ids }
        }
        RequestBody::KeysSet { rid, data } => {
            let rid = check_rid(rid)?;
            let mut keys = KeyChanges::new();
            for (ty, ids) in data {
                if ids.is_empty() {
                    KeyType::parse(ty)?;
                    continue;
                }
                // The decoder refused repeated types and ids, so nothing
                // here overwrites an earlier entry.
                let of_type = keys.entry(KeyType::parse(ty)?).or_default();
                for (id, value) in ids {
                    of_type.insert(KeyId::parse(id)?, value.map(Bytes::copy_from_slice));
                }
            }
            write_op(Command::SetKeys { keys }, rid, claim)
        }
        RequestBody::SessionDelete { rid } => write_op(Command::DeleteSession, check_rid(rid)?, claim),
        RequestBody::KeysList { ty, after, limit } => {
            let ty = KeyType::parse(ty)?;
            // The cursor is an id (the last of the previous page), so it
            // follows the rules of one.
            let after = after.map(KeyId::parse).transpose().map_err(|e| IdError { what: "cursor `after` (a key id)", ..e })?;
            Op::ListIds { ty, after, limit }
        }
        RequestBody::SessionClaim { claim } => Op::Claim { claim: check_claim(claim)? },
    })
}

/// Everything a request's subject and body say, checked: the session, the
/// op, and what the session actor is to do. It loads nothing, and nothing is
/// allocated for a count or size that a limit refuses.
pub(crate) fn parse_request(
    prefix: &str,
    subject: &str,
    body: &[u8],
    limits: &Limits,
    max_request_bytes: usize,
) -> Result<(SessionKey, ApiOp, Op), Refusal> {
    let (key, api_op) = parse_subject(prefix, subject)?;
    let op = parse_body(api_op, body, limits, max_request_bytes)?;
    Ok((key, api_op, op))
}

/// Encodes a reply body.
pub(crate) fn encode_reply(reply: &Reply) -> Vec<u8> {
    let named = match reply {
        Reply::Creds { creds, seq } => rmp_serde::to_vec_named(&CredsReply { creds: creds.as_ref(), seq: *seq }),
        Reply::Keys { values, seq } => {
            // A map, so an id asked for twice is answered once.
            let values: HashMap<&str, &Bytes> = values.iter().map(|(id, v)| (id.as_str(), v)).collect();
            rmp_serde::to_vec_named(&KeysReply { values, seq: *seq })
        }
        Reply::Written { seq } => rmp_serde::to_vec_named(&WrittenReply { seq: *seq }),
        Reply::WrittenClaimed { seq, lease_ms } => rmp_serde::to_vec_named(&ClaimedWrittenReply { seq: *seq, lease_ms: *lease_ms }),
        Reply::Claim { claim, lease_ms, wait_ms, seq } => {
            rmp_serde::to_vec_named(&ClaimReply { claim: claim.as_deref(), lease_ms: *lease_ms, wait_ms: *wait_ms, seq: *seq })
        }
        Reply::Info(info) => rmp_serde::to_vec_named(info),
        // Answered only on the operator's subject (`admin.rs`).
        Reply::Restored(r) => rmp_serde::to_vec_named(r),
        Reply::Ids { ids, next, seq } => rmp_serde::to_vec_named(&IdsReply {
            ids: ids.iter().map(KeyId::as_str).collect(),
            next: next.as_ref().map(KeyId::as_str),
            seq: *seq,
        }),
    };
    named.expect("replies are plain data")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;

    use super::*;

    fn code(r: Result<impl std::fmt::Debug, Refusal>) -> u16 {
        r.unwrap_err().0.number()
    }

    const MAX: usize = 4 << 20;

    fn parse(op: &str, body: &[u8]) -> Result<Op, Refusal> {
        parse_body(ApiOp::parse(op).unwrap(), body, &Limits::default(), MAX)
    }

    fn request(subject: &str, body: &[u8]) -> Result<(SessionKey, ApiOp, Op), Refusal> {
        parse_request("bstore", subject, body, &Limits::default(), MAX)
    }

    #[test]
    fn subjects_split_into_session_and_op() {
        let (key, op) = parse_subject("bstore", "bstore.acme.bot-1.keys.set").unwrap();
        assert_eq!((key.tenant.as_str(), key.session.as_str(), op), ("acme", "bot-1", ApiOp::KeysSet));
        let (_, op) = parse_subject("a.b", "a.b.t.s.session.info").unwrap();
        assert_eq!(op, ApiOp::SessionInfo);
    }

    #[test]
    fn bad_subjects_get_the_right_codes() {
        assert_eq!(code(parse_subject("bstore", "bstore.t.s.keys.drop")), 404);
        assert_eq!(code(parse_subject("bstore", "bstore.t.keys.get")), 422, "no session token");
        assert_eq!(code(parse_subject("bstore", "bstore.t.s")), 404);
        assert_eq!(code(parse_subject("bstore", "bstore.t.s.x.keys.get")), 422, "a dot inside the session");
        assert_eq!(code(parse_subject("bstore", "bstore.t.s%.keys.get")), 422);
        assert_eq!(code(parse_subject("bstore", "bstore.t.*.keys.get")), 422);
        assert_eq!(code(parse_subject("bstore", "bstore.>.s.keys.get")), 422);
        assert_eq!(code(parse_subject("bstore", "other.t.s.keys.get")), 404);
    }

    #[test]
    fn refusals_name_the_op_or_field_but_never_the_subject_tenant_or_session() {
        let (tenant, session) = ("victimcorp", "bot-4471-secret");
        let cases = [
            format!("bstore.{tenant}.{session}.keys.drop"),
            format!("bstore.{tenant}.{session}.nothing"),
            format!("bstore.{tenant}.{session}"),
            format!("bstore.{tenant}.{session}.x.keys.get"),
            format!("bstore.{tenant}%.{session}.keys.get"),
            format!("bstore.{tenant}.{session}%.keys.get"),
            format!("bstore.{tenant}.{}.keys.get", "s".repeat(129)),
            format!("other.{tenant}.{session}.keys.get"),
            format!("bstore.{tenant}.{session}.keys.{session}"),
        ];
        for subject in &cases {
            let Refusal(_, message) = parse_subject("bstore", subject).unwrap_err();
            assert!(!message.contains(tenant) && !message.contains(session), "{subject}: {message}");
        }
        let Refusal(_, message) = parse_subject("bstore", &cases[0]).unwrap_err();
        assert!(message.contains("\"keys.drop\""), "the op token is named: {message}");
        // Nor a key type, key id or rid from the body.
        let body = |json: serde_json::Value| rmp_serde::to_vec_named(&json).unwrap();
        for (op, b) in [
            ("keys.get", body(serde_json::json!({"type": "pre-key", "ids": [format!("{session}\n")]}))),
            ("keys.get", body(serde_json::json!({"type": format!("{session} "), "ids": []}))),
            ("session.delete", body(serde_json::json!({"rid": format!("{session}!")}))),
        ] {
            let Refusal(c, message) = request(&format!("bstore.{tenant}.{session}.{op}"), &b).unwrap_err();
            assert_eq!(c.number(), 422);
            assert!(!message.contains(tenant) && !message.contains(session), "{op}: {message}");
        }
    }

    #[test]
    fn session_errors_are_told_without_the_session() {
        let key = SessionKey::parse("victimcorp", "bot-4471-secret").unwrap();
        let unreadable = SessionError::Unreadable(format!("{key}: event 7 of victimcorp.bot-4471-secret is unreadable"));
        let bad_id = SessionError::Rejected(DomainError::InvalidId(KeyId::parse("bot-4471-secret\n").unwrap_err()));
        let limit = SessionError::Rejected(DomainError::LimitExceeded { what: "ids in one keys.get", limit: 1, actual: 2 });
        for (e, want) in [(unreadable, 520), (bad_id, 422), (limit, 413), (SessionError::Conflict, 409), (SessionError::Timeout, 504)] {
            let Refusal(c, message) = Refusal::from(&e);
            assert_eq!(c.number(), want, "{e:?}");
            assert!(!message.contains("victimcorp") && !message.contains("bot-4471-secret"), "{message}");
        }
    }

    #[test]
    fn unreadable_data_keeps_its_cause_but_not_the_session() {
        let key = SessionKey::parse("victimcorp", "bot-4471-secret").unwrap();
        let e = SessionError::Unreadable(format!("{key}: event 7 of victimcorp.bot-4471-secret is unreadable: sealed under key 1"));
        let Refusal(c, message) = Refusal::of_session(&e, &key);
        assert_eq!(c.number(), 520);
        assert!(message.contains("key 1") && message.contains("event 7"), "{message}");
        assert!(!message.contains("victimcorp") && !message.contains("bot-4471-secret"), "{message}");
        let Refusal(c, _) = Refusal::of_session(&SessionError::Conflict, &key);
        assert_eq!(c.number(), 409);
    }

    #[test]
    fn bodies_decode_or_refuse_with_400() {
        assert_eq!(code(parse("keys.get", b"\xc1garbage")), 400);
        assert_eq!(code(parse("creds.get", b"\x93\x01")), 400, "truncated array");
        assert_eq!(code(parse("creds.put", b"")), 400, "creds are required");
        assert!(matches!(parse("creds.get", b""), Ok(Op::GetCreds)));
        let body = rmp_serde::to_vec_named(&serde_json_like()).unwrap();
        let Op::Write { cmd: Command::SetKeys { keys }, rid } = parse("keys.set", &body).unwrap() else { panic!() };
        assert_eq!(rid.as_deref(), Some("r-1"));
        assert_eq!(keys.values().map(|m| m.len()).sum::<usize>(), 2);
    }

    /// Each lenient body that serde-based decoding accepted, for each op it
    /// was accepted for: all are 400 now.
    #[test]
    fn lenient_bodies_are_400() {
        let json = |v: serde_json::Value| rmp_serde::to_vec_named(&v).unwrap();
        let garbage_after = |mut b: Vec<u8>| {
            b.extend_from_slice(b"\xc1garbage");
            b
        };
        let every_op = [
            b"\x90".to_vec(),                         // []
            b"\x91\xa3r-1".to_vec(),                  // [rid]
            b"\x81\x01\x02".to_vec(),                 // {1: 2}
            b"\x81\x00\xa1x".to_vec(),                // {0: "x"}
            b"\x80\x00".to_vec(),                     // {} followed by a byte
            garbage_after(b"\x80".to_vec()),          // {} followed by garbage
            b"\xc0".to_vec(),                         // nil
            b"\x82\xa3rid\xa1a\xa3rid\xa1b".to_vec(), // a repeated key
        ];
        for op in ApiOp::ALL {
            for body in &every_op {
                assert_eq!(code(parse(op.as_str(), body)), 400, "{op} {body:x?}");
            }
        }
        for (op, body) in [
            // Arrays for maps: serde read a struct from an array of its fields.
            ("creds.put", json(serde_json::json!(["r-1", [1, 2]]))),
            ("keys.get", json(serde_json::json!(["pre-key", ["1"]]))),
            ("keys.set", json(serde_json::json!(["r-1", {"pre-key": {"1": [1]}}]))),
            ("session.delete", json(serde_json::json!(["r-1"]))),
            // Bytes as an array of small integers.
            ("creds.put", json(serde_json::json!({"creds": [1, 2, 3]}))),
            ("keys.set", json(serde_json::json!({"data": {"pre-key": {"1": [1, 2, 3]}}}))),
            // Maps where arrays are documented, and the reverse.
            ("keys.get", json(serde_json::json!({"type": "pre-key", "ids": {"0": "1"}}))),
            ("keys.set", json(serde_json::json!({"data": [["pre-key", {"1": null}]]}))),
            ("keys.set", json(serde_json::json!({"data": {"pre-key": [null]}}))),
            // A nil rid.
            ("session.delete", json(serde_json::json!({"rid": null}))),
            ("creds.put", json(serde_json::json!({"rid": null, "creds": "x"}))),
            // Valid bodies with trailing bytes.
            ("creds.put", garbage_after(json(serde_json::json!({"creds": "x"})))),
            ("keys.get", [json(serde_json::json!({"type": "pre-key", "ids": ["1"]})), b"\x80".to_vec()].concat()),
            ("keys.set", [json(serde_json::json!({"data": {}})), b"\x00".to_vec()].concat()),
            // A repeated type or id: serde kept the last one.
            ("keys.set", b"\x81\xa4data\x81\xa7pre-key\x82\xa11\xc4\x01a\xa11\xc4\x01b".to_vec()),
            ("keys.set", b"\x81\xa4data\x82\xa7pre-key\x81\xa11\xc0\xa7pre-key\x81\xa12\xc0".to_vec()),
            // Integer keys inside data.
            ("keys.set", b"\x81\xa4data\x81\xa7pre-key\x81\x01\xc4\x01a".to_vec()),
            ("keys.set", b"\x81\xa4data\x81\x01\x81\xa11\xc4\x01a".to_vec()),
        ] {
            assert_eq!(code(parse(op, &body)), 400, "{op} {body:x?}");
        }
    }

    #[test]
    fn the_documented_str_for_bin_allowance_is_kept() {
        let body = rmp_serde::to_vec_named(&serde_json::json!({"rid": "r", "creds": "plain text"})).unwrap();
        let Ok(Op::Write { cmd: Command::PutCreds { creds }, .. }) = parse("creds.put", &body) else { panic!() };
        assert_eq!(&creds[..], b"plain text");
        let body = rmp_serde::to_vec_named(&serde_json::json!({"data": {"pre-key": {"1": "text", "2": null}}})).unwrap();
        let Ok(Op::Write { cmd: Command::SetKeys { keys }, .. }) = parse("keys.set", &body) else { panic!() };
        let of_type = &keys[&KeyType::parse("pre-key").unwrap()];
        assert_eq!(of_type[&KeyId::parse("1").unwrap()].as_deref(), Some(&b"text"[..]));
        assert_eq!(of_type[&KeyId::parse("2").unwrap()], None);
    }

    #[test]
    fn limits_are_refused_with_413_before_the_body_is_read() {
        // The body size first.
        assert_eq!(code(parse_body(ApiOp::CredsGet, &[0x80; 11], &Limits::default(), 10)), 413);
        // 2.1 M ids in a body under the request limit: refused at the array
        // header, so a body cut right after the header gets the same answer.
        let mut bomb = b"\x82\xa4type\xa7pre-key\xa3ids\xdd".to_vec();
        bomb.extend_from_slice(&2_100_000u32.to_be_bytes());
        let header = bomb.clone();
        for i in 0..2_100_000u32 {
            bomb.extend_from_slice(if i % 20 == 0 { b"\xa0" } else { b"\xa1x" });
        }
        assert!(bomb.len() < MAX);
        let (c, message) = match request("bstore.t.s.keys.get", &bomb) {
            Err(Refusal(c, m)) => (c, m),
            Ok(_) => panic!("accepted"),
        };
        assert_eq!((c.number(), message.as_str()), (413, "ids in one keys.get is 2100000, over the limit of 10000"));
        assert_eq!(code(request("bstore.t.s.keys.get", &header)), 413);
        // keys.set: ids over all types, each value and the total.
        let limits = Limits { max_ids_per_call: 2, max_value_bytes: 4, max_set_bytes: 6 };
        let set = |data: serde_json::Value| {
            #[derive(Serialize)]
            struct S {
                data: BTreeMap<String, BTreeMap<String, serde_bytes::ByteBuf>>,
            }
            let data: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_value(data).unwrap();
            let data = data
                .into_iter()
                .map(|(t, ids)| (t, ids.into_iter().map(|(i, v)| (i, serde_bytes::ByteBuf::from(v.into_bytes()))).collect()))
                .collect();
            parse_body(ApiOp::KeysSet, &rmp_serde::to_vec_named(&S { data }).unwrap(), &limits, MAX)
        };
        assert_eq!(code(set(serde_json::json!({"a": {"1": "x", "2": "x"}, "b": {"3": "x"}}))), 413);
        assert_eq!(code(set(serde_json::json!({"a": {"1": "12345"}}))), 413);
        assert_eq!(code(set(serde_json::json!({"a": {"1": "1234", "2": "123"}}))), 413);
        assert!(set(serde_json::json!({"a": {"1": "1234"}, "b": {"2": "12"}})).is_ok());
    }

    #[test]
    fn repeated_ids_in_a_keys_get_are_kept_and_answered_once() {
        let body = rmp_serde::to_vec_named(&serde_json::json!({"type": "pre-key", "ids": ["1", "1"]})).unwrap();
        let Ok(Op::GetKeys { ids, .. }) = parse("keys.get", &body) else { panic!() };
        assert_eq!(ids.len(), 2);
        let one = KeyId::parse("1").unwrap();
        let reply = Reply::Keys { values: vec![(one.clone(), Bytes::from_static(b"v")), (one, Bytes::from_static(b"v"))], seq: 1 };
        let decoded: KeysReply<HashMap<String, serde_bytes::ByteBuf>> = rmp_serde::from_slice(&encode_reply(&reply)).unwrap();
        assert_eq!(decoded.values.len(), 1);
        assert_eq!(encode_reply(&reply)[..2], [0x82, 0xa6], "a map of two fields, `values` first");
    }

    fn serde_json_like() -> BTreeMap<&'static str, rmpv_like::Value> {
        use rmpv_like::Value;
        let mut data = BTreeMap::new();
        let mut pre = BTreeMap::new();
        pre.insert("1".to_string(), Value::Bin(vec![1, 2]));
        pre.insert("2".to_string(), Value::Nil);
        data.insert("pre-key".to_string(), Value::Map(pre));
        let mut top = BTreeMap::new();
        top.insert("rid", Value::Str("r-1".into()));
        top.insert("data", Value::Map(data));
        top
    }

    /// Just enough of a dynamic MessagePack value to build test bodies.
    mod rmpv_like {
        use std::collections::BTreeMap;

        use serde::Serialize;

        pub enum Value {
            Nil,
            Str(String),
            Bin(Vec<u8>),
            Map(BTreeMap<String, Value>),
        }

        impl Serialize for Value {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    Value::Nil => s.serialize_none(),
                    Value::Str(v) => s.serialize_str(v),
                    Value::Bin(v) => s.serialize_bytes(v),
                    Value::Map(m) => m.serialize(s),
                }
            }
        }
    }

    #[test]
    fn invalid_ids_in_bodies_are_422() {
        #[derive(Serialize)]
        struct G<'a> {
            #[serde(rename = "type")]
            ty: &'a str,
            ids: Vec<&'a str>,
        }
        let body = rmp_serde::to_vec_named(&G { ty: "bad type", ids: vec!["1"] }).unwrap();
        assert_eq!(code(parse("keys.get", &body)), 422);
        let body = rmp_serde::to_vec_named(&G { ty: "pre-key", ids: vec!["a\nb"] }).unwrap();
        assert_eq!(code(parse("keys.get", &body)), 422);
        #[derive(Serialize)]
        struct D<'a> {
            rid: &'a str,
        }
        let body = rmp_serde::to_vec_named(&D { rid: "has space" }).unwrap();
        assert_eq!(code(parse("session.delete", &body)), 422);
        // A malformed type is refused even with no ids under it.
        let body = rmp_serde::to_vec_named(&serde_json::json!({"data": {"bad type": {}}})).unwrap();
        assert_eq!(code(parse("keys.set", &body)), 422);
    }

    #[test]
    fn keys_list_bodies_become_list_ops_and_bad_ids_in_them_are_422() {
        let body = |v: serde_json::Value| rmp_serde::to_vec_named(&v).unwrap();
        let Ok(Op::ListIds { ty, after, limit }) =
            parse("keys.list", &body(serde_json::json!({"type": "session", "after": "1.0", "limit": 5})))
        else {
            panic!()
        };
        assert_eq!((ty.as_str(), after.as_ref().map(KeyId::as_str), limit), ("session", Some("1.0"), Some(5)));
        assert!(matches!(parse("keys.list", &body(serde_json::json!({"type": "x"}))), Ok(Op::ListIds { after: None, limit: None, .. })));
        assert_eq!(code(parse("keys.list", &body(serde_json::json!({"type": "bad type"})))), 422);
        let secret = "victimcorp-bot-4471";
        for after in [String::new(), format!("{secret}\n"), "x".repeat(513)] {
            let Refusal(c, message) = parse("keys.list", &body(serde_json::json!({"type": "session", "after": after}))).unwrap_err();
            assert_eq!(c.number(), 422);
            assert!(message.contains("cursor `after`") && !message.contains(secret), "{message}");
        }
        assert_eq!(code(parse("keys.list", &body(serde_json::json!({"type": "session", "after": null})))), 400);
        assert_eq!(code(parse("keys.list", &body(serde_json::json!({"type": "session", "limit": 0})))), 400);
        assert_eq!(code(parse("keys.list", &body(serde_json::json!({"type": "session", "limit": 10_001})))), 413);
    }

    #[test]
    fn claims_become_claim_ops_and_claimed_writes() {
        let body = |v: serde_json::Value| rmp_serde::to_vec_named(&v).unwrap();
        assert_eq!(parse("session.claim", b"").unwrap(), Op::Claim { claim: None });
        assert_eq!(parse("session.claim", &body(serde_json::json!({"claim": "abc"}))).unwrap(), Op::Claim { claim: Some("abc".into()) });
        let Ok(Op::ClaimedWrite { claim, cmd: Command::DeleteSession, rid }) =
            parse("session.delete", &body(serde_json::json!({"claim": "abc", "rid": "r"})))
        else {
            panic!()
        };
        assert_eq!((claim.as_str(), rid.as_deref()), ("abc", Some("r")));
        assert!(matches!(
            parse("keys.set", &body(serde_json::json!({"claim": "abc", "data": {"t": {"1": "v"}}}))),
            Ok(Op::ClaimedWrite { cmd: Command::SetKeys { .. }, .. })
        ));
        assert!(matches!(parse("creds.put", &body(serde_json::json!({"creds": "c"}))), Ok(Op::Write { .. })));
        // A malformed claim id is 422 and named, its value is not.
        for bad in [String::new(), "has space".into(), "x".repeat(65), "victimcorp.secret".into()] {
            for op in ["session.claim", "creds.put"] {
                let Refusal(c, message) = parse(op, &body(serde_json::json!({"claim": bad, "creds": "c"}))).unwrap_err();
                assert_eq!(c.number(), 422, "{op} {bad:?}");
                assert!(message.contains("claim") && !message.contains("victimcorp"), "{message}");
            }
        }
        assert_eq!(code(parse("session.claim", &body(serde_json::json!({"claim": null})))), 400);
    }

    #[test]
    fn claim_replies_are_maps_of_the_documented_fields() {
        let granted = encode_reply(&Reply::Claim { claim: Some("c".into()), lease_ms: 3000, wait_ms: 0, seq: 4 });
        let decoded: ClaimReply<String> = rmp_serde::from_slice(&granted).unwrap();
        assert_eq!(decoded, ClaimReply { claim: Some("c".into()), lease_ms: 3000, wait_ms: 0, seq: 4 });
        let waiting = encode_reply(&Reply::Claim { claim: None, lease_ms: 0, wait_ms: 1200, seq: 4 });
        assert_eq!(waiting, b"\x84\xa5claim\xc0\xa8lease_ms\x00\xa7wait_ms\xcd\x04\xb0\xa3seq\x04");
        let written: ClaimedWrittenReply = rmp_serde::from_slice(&encode_reply(&Reply::WrittenClaimed { seq: 9, lease_ms: 2500 })).unwrap();
        assert_eq!((written.seq, written.lease_ms), (9, 2500));
        // A client that knows only `seq` reads it as a plain write's reply.
        let plain: WrittenReply = rmp_serde::from_slice(&encode_reply(&Reply::WrittenClaimed { seq: 9, lease_ms: 2500 })).unwrap();
        assert_eq!(plain.seq, 9);
    }

    #[test]
    fn a_page_of_ids_is_a_map_of_ids_next_and_seq() {
        let id = |s: &str| KeyId::parse(s).unwrap();
        let bytes = encode_reply(&Reply::Ids { ids: vec![id("1"), id("2")], next: Some(id("2")), seq: 7 });
        let decoded: IdsReply<String> = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(decoded, IdsReply { ids: vec!["1".into(), "2".into()], next: Some("2".into()), seq: 7 });
        // The last page says so with `next: nil`.
        let bytes = encode_reply(&Reply::Ids { ids: vec![], next: None, seq: 0 });
        assert_eq!(bytes, b"\x83\xa3ids\x90\xa4next\xc0\xa3seq\x00");
    }

    #[test]
    fn replies_are_maps_with_binaries() {
        let reply = Reply::Keys { values: vec![(KeyId::parse("1").unwrap(), Bytes::from_static(b"\x00"))], seq: 3 };
        let bytes = encode_reply(&reply);
        // fixmap(2) "values" fixmap(1) "1" bin8(1) 0x00 "seq" 3
        assert_eq!(bytes[0], 0x82);
        assert!(bytes.windows(3).any(|w| w == [0xc4, 1, 0]), "{bytes:x?}");
        let creds = encode_reply(&Reply::Creds { creds: Some(Bytes::from_static(b"c")), seq: 2 });
        let decoded: CredsReply<serde_bytes::ByteBuf> = rmp_serde::from_slice(&creds).unwrap();
        assert_eq!((decoded.creds.unwrap().into_vec(), decoded.seq), (b"c".to_vec(), 2));
        let written: WrittenReply = rmp_serde::from_slice(&encode_reply(&Reply::Written { seq: 9 })).unwrap();
        assert_eq!(written.seq, 9);
    }
}
