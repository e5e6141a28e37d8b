//! Subjects and bodies: decoding requests, encoding replies.

use std::collections::{BTreeMap, HashMap};

use async_nats::service::Request as NatsRequest;
use bstore_domain::{Command, IdError, KeyChanges, KeyId, KeyType, SessionKey};
use bstore_session::{Op, Reply, Request, Sessions};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::metrics::Metrics;
use crate::{ApiConfig, ErrorCode, service_error};

/// The ops of protocol version 1.
pub(crate) const OPS: [&str; 6] = ["creds.get", "creds.put", "keys.get", "keys.set", "session.delete", "session.info"];

/// A refused request: its code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal(pub ErrorCode, pub String);

impl From<IdError> for Refusal {
    fn from(e: IdError) -> Self {
        Refusal(ErrorCode::InvalidId, e.to_string())
    }
}

/// Splits `<prefix>.<tenant>.<session>.<op>` and validates each part.
pub(crate) fn parse_subject<'a>(prefix: &str, subject: &'a str) -> Result<(SessionKey, &'a str), Refusal> {
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| Refusal(ErrorCode::UnknownOp, format!("subject {subject:?} is outside the prefix {prefix:?}")))?;
    // The op is the last two tokens; everything before them must be exactly
    // `<tenant>.<session>`.
    let Some(ids) = rest.rsplitn(3, '.').nth(2) else {
        return Err(Refusal(ErrorCode::UnknownOp, format!("expected {prefix}.<tenant>.<session>.<op>, got {subject:?}")));
    };
    let op = &rest[ids.len() + 1..];
    if !OPS.contains(&op) {
        return Err(Refusal(ErrorCode::UnknownOp, format!("unknown op in {subject:?}; known: {}", OPS.join(", "))));
    }
    match ids.split_once('.') {
        Some((tenant, session)) if !session.contains('.') => Ok((SessionKey::parse(tenant, session)?, op)),
        _ => Err(Refusal(ErrorCode::InvalidId, "tenant and session must be single subject tokens without '.'".into())),
    }
}

#[derive(Deserialize, Default)]
struct Empty {}

#[derive(Deserialize)]
struct CredsPut {
    #[serde(default)]
    rid: Option<String>,
    creds: ByteBuf,
}

#[derive(Deserialize)]
struct KeysGet {
    #[serde(rename = "type")]
    ty: String,
    ids: Vec<String>,
}

#[derive(Deserialize)]
struct KeysSet {
    #[serde(default)]
    rid: Option<String>,
    data: BTreeMap<String, BTreeMap<String, Option<ByteBuf>>>,
}

#[derive(Deserialize, Default)]
struct Delete {
    #[serde(default)]
    rid: Option<String>,
}

fn decode<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, Refusal> {
    if body.is_empty() { Ok(T::default()) } else { decode_required(body) }
}

fn decode_required<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Refusal> {
    rmp_serde::from_slice(body).map_err(|e| Refusal(ErrorCode::BadRequest, format!("body is not a valid MessagePack request: {e}")))
}

fn check_rid(rid: Option<String>) -> Result<Option<String>, Refusal> {
    if let Some(r) = &rid {
        let ok = !r.is_empty() && r.len() <= 64 && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(Refusal(ErrorCode::InvalidId, "rid must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'".into()));
        }
    }
    Ok(rid)
}

/// Turns an op and its body into what the session actor does.
pub(crate) fn parse_op(op: &str, body: &[u8]) -> Result<Op, Refusal> {
    Ok(match op {
        "creds.get" => {
            decode::<Empty>(body)?;
            Op::GetCreds
        }
        "session.info" => {
            decode::<Empty>(body)?;
            Op::Info
        }
        "creds.put" => {
            let r: CredsPut = decode_required(body)?;
            Op::Write { cmd: Command::PutCreds { creds: Bytes::from(r.creds.into_vec()) }, rid: check_rid(r.rid)? }
        }
        "keys.get" => {
            let r: KeysGet = decode_required(body)?;
            let ty = KeyType::parse(&r.ty)?;
            let ids = r.ids.iter().map(|i| KeyId::parse(i)).collect::<Result<_, _>>()?;
            Op::GetKeys { ty, ids }
        }
        "keys.set" => {
            let r: KeysSet = decode_required(body)?;
            let mut keys = KeyChanges::new();
            for (ty, ids) in r.data {
                let ty = KeyType::parse(&ty)?;
                let of_type = keys.entry(ty).or_default();
                for (id, value) in ids {
                    of_type.insert(KeyId::parse(&id)?, value.map(|v| Bytes::from(v.into_vec())));
                }
            }
            Op::Write { cmd: Command::SetKeys { keys }, rid: check_rid(r.rid)? }
        }
        "session.delete" => {
            let r: Delete = decode(body)?;
            Op::Write { cmd: Command::DeleteSession, rid: check_rid(r.rid)? }
        }
        other => return Err(Refusal(ErrorCode::UnknownOp, format!("unknown op {other:?}"))),
    })
}

#[derive(Serialize)]
struct CredsReply<'a> {
    creds: Option<&'a Bytes>,
    seq: u64,
}

#[derive(Serialize)]
struct KeysReply<'a> {
    values: HashMap<&'a str, &'a Bytes>,
    seq: u64,
}

#[derive(Serialize)]
struct WrittenReply {
    seq: u64,
}

/// Encodes a reply body.
pub(crate) fn encode_reply(reply: &Reply) -> Vec<u8> {
    let named = match reply {
        Reply::Creds { creds, seq } => rmp_serde::to_vec_named(&CredsReply { creds: creds.as_ref(), seq: *seq }),
        Reply::Keys { values, seq } => {
            let values = values.iter().map(|(id, v)| (id.as_str(), v)).collect();
            rmp_serde::to_vec_named(&KeysReply { values, seq: *seq })
        }
        Reply::Written { seq } => rmp_serde::to_vec_named(&WrittenReply { seq: *seq }),
        Reply::Info(info) => rmp_serde::to_vec_named(info),
    };
    named.expect("replies are plain data")
}

/// Answers one request.
pub(crate) async fn handle(cfg: &ApiConfig, sessions: &Sessions, metrics: &Metrics, request: NatsRequest) {
    let started = std::time::Instant::now();
    let subject = request.message.subject.as_str();
    let mut known_op = None;
    let result = async {
        let (key, op) = parse_subject(&cfg.prefix, subject)?;
        known_op = Some(op);
        let body = &request.message.payload;
        if body.len() > cfg.max_request_bytes {
            return Err(Refusal(ErrorCode::TooLarge, format!("body is {} bytes, over the limit of {}", body.len(), cfg.max_request_bytes)));
        }
        let op = parse_op(op, body)?;
        let req = Request { key, op, deadline: sessions.deadline() };
        sessions.call(req).await.map_err(|e| Refusal(ErrorCode::of(&e), e.to_string()))
    }
    .await;
    let result = result.and_then(|reply| {
        let body = encode_reply(&reply);
        if body.len() > cfg.max_reply_bytes {
            return Err(Refusal(
                ErrorCode::TooLarge,
                format!("the reply would be {} bytes, over the server's limit of {}; ask for fewer ids", body.len(), cfg.max_reply_bytes),
            ));
        }
        Ok(body)
    });
    metrics.record(known_op, result.as_ref().err().map(|r| r.0), started.elapsed());
    let response = match result {
        Ok(body) => Ok(body.into()),
        Err(Refusal(code, message)) => {
            if code.number() >= 500 {
                tracing::warn!(%subject, code = code.number(), %message, "request failed");
            } else {
                tracing::debug!(%subject, code = code.number(), %message, "request refused");
            }
            Err(service_error(code, &message))
        }
    };
    if let Err(e) = request.respond(response).await {
        tracing::warn!(%subject, error = %e, "could not send the reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<impl std::fmt::Debug, Refusal>) -> u16 {
        r.unwrap_err().0.number()
    }

    #[test]
    fn subjects_split_into_session_and_op() {
        let (key, op) = parse_subject("bstore", "bstore.acme.bot-1.keys.set").unwrap();
        assert_eq!((key.tenant.as_str(), key.session.as_str(), op), ("acme", "bot-1", "keys.set"));
        let (_, op) = parse_subject("a.b", "a.b.t.s.session.info").unwrap();
        assert_eq!(op, "session.info");
    }

    #[test]
    fn bad_subjects_get_the_right_codes() {
        assert_eq!(code(parse_subject("bstore", "bstore.t.s.keys.drop")), 404);
        assert_eq!(code(parse_subject("bstore", "bstore.t.keys.get")), 422, "no session token");
        assert_eq!(code(parse_subject("bstore", "bstore.t.s")), 404);
        assert_eq!(code(parse_subject("bstore", "bstore.t.s.x.keys.get")), 422, "a dot inside the session");
        assert_eq!(code(parse_subject("bstore", "bstore.t.s%.keys.get")), 422);
        assert_eq!(code(parse_subject("bstore", "other.t.s.keys.get")), 404);
    }

    #[test]
    fn bodies_decode_or_refuse_with_400() {
        assert_eq!(code(parse_op("keys.get", b"\xc1garbage")), 400);
        assert_eq!(code(parse_op("creds.get", b"\x93\x01")), 400, "truncated array");
        assert_eq!(code(parse_op("creds.put", b"")), 400, "creds are required");
        assert!(matches!(parse_op("creds.get", b""), Ok(Op::GetCreds)));
        let body = rmp_serde::to_vec_named(&serde_json_like()).unwrap();
        let Op::Write { cmd: Command::SetKeys { keys }, rid } = parse_op("keys.set", &body).unwrap() else { panic!() };
        assert_eq!(rid.as_deref(), Some("r-1"));
        assert_eq!(keys.values().map(|m| m.len()).sum::<usize>(), 2);
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
        assert_eq!(code(parse_op("keys.get", &body)), 422);
        let body = rmp_serde::to_vec_named(&G { ty: "pre-key", ids: vec!["a\nb"] }).unwrap();
        assert_eq!(code(parse_op("keys.get", &body)), 422);
        #[derive(Serialize)]
        struct D<'a> {
            rid: &'a str,
        }
        let body = rmp_serde::to_vec_named(&D { rid: "has space" }).unwrap();
        assert_eq!(code(parse_op("session.delete", &body)), 422);
    }

    #[test]
    fn replies_are_maps_with_binaries() {
        let reply = Reply::Keys { values: vec![(KeyId::parse("1").unwrap(), Bytes::from_static(b"\x00"))], seq: 3 };
        let bytes = encode_reply(&reply);
        // fixmap(2) "values" fixmap(1) "1" bin8(1) 0x00 "seq" 3
        assert_eq!(bytes[0], 0x82);
        assert!(bytes.windows(3).any(|w| w == [0xc4, 1, 0]), "{bytes:x?}");
    }
}
