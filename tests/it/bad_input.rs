//! Bad input gets a clear, coded error, and the session is left unchanged.

use bstore_api::client::{ClientError, SessionClient, key_data};
use bstore_domain::SessionInfo;

use crate::harness::{Stack, rid};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
    let e = r.unwrap_err();
    e.code().unwrap_or_else(|| panic!("expected a coded service error, got {e:?}"))
}

/// A session with known content, and a check that it did not change.
async fn seeded(s: &SessionClient) -> SessionInfo {
    s.creds_put(&rid(), b"creds").await.unwrap();
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"one"[..]))])).await.unwrap();
    s.info().await.unwrap()
}

async fn assert_unchanged(s: &SessionClient, before: &SessionInfo) {
    assert_eq!(&s.info().await.unwrap(), before);
    assert_eq!(s.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"one");
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"creds"[..]));
}

#[tokio::test]
async fn malformed_ids_in_the_subject_are_422_or_404() {
    let stack = Stack::start().await;
    let client = SessionClient::new(stack.nc.clone(), "bstore", "t", "s").with_timeout(std::time::Duration::from_secs(3));
    let long = "x".repeat(129);
    for (tail, want) in [
        ("t.a.b.keys.get", 422), // a dot inside the session
        (&format!("t.{long}.keys.get"), 422),
        ("t.s.keys.drop", 404), // unknown op
        ("t.s.nothing", 404),
    ] {
        assert_eq!(code(client.raw_subject(tail).await), want, "{tail}");
    }
    // NATS itself never delivers a publish to a wildcard subject or one with
    // an empty token, so such an id cannot reach the service at all (the service's own
    // check of '*' and '>' is covered by the API's unit tests).
    for tail in ["*.s.keys.get", "t.>.keys.get", "t..keys.get"] {
        let r = client.raw_subject(tail).await;
        assert!(matches!(r, Err(ClientError::NoResponders) | Err(ClientError::Service { code: 422, .. })), "{tail}: {r:?}");
    }
}

#[tokio::test]
async fn garbage_truncated_or_mistyped_bodies_are_400() {
    let stack = Stack::start().await;
    let s = stack.session("t", "s");
    let before = seeded(&s).await;
    let good = rmp_serde::to_vec_named(&serde_json::json!({"type": "pre-key", "ids": ["1"]})).unwrap();
    assert_eq!(code(s.raw("keys.get", b"\xc1\xc1 not msgpack".to_vec()).await), 400);
    assert_eq!(code(s.raw("keys.get", good[..good.len() - 2].to_vec()).await), 400, "truncated");
    assert_eq!(code(s.raw("keys.set", rmp_serde::to_vec_named(&serde_json::json!({"data": 5})).unwrap()).await), 400);
    assert_eq!(code(s.raw("keys.set", rmp_serde::to_vec_named(&serde_json::json!({"data": {"pre-key": {"1": 7}}})).unwrap()).await), 400);
    assert_eq!(code(s.raw("creds.put", Vec::new()).await), 400);
    assert_unchanged(&s, &before).await;
}

#[tokio::test]
async fn bad_key_types_ids_and_request_ids_are_422() {
    let stack = Stack::start().await;
    let s = stack.session("t", "s");
    let before = seeded(&s).await;
    assert_eq!(code(s.keys_set(&rid(), &key_data([("pre-key", "2", Some(&b"ok"[..])), ("bad type", "1", Some(&b"x"[..]))])).await), 422);
    assert_eq!(
        code(s.keys_set(&rid(), &key_data([("pre-key", "2", Some(&b"ok"[..])), ("pre-key", "a\u{0}b", Some(&b"x"[..]))])).await),
        422
    );
    assert_eq!(code(s.keys_get("pre-key", &[""]).await), 422);
    assert_eq!(code(s.keys_set("not a rid!", &key_data([("pre-key", "2", Some(&b"ok"[..]))])).await), 422);
    assert_unchanged(&s, &before).await;
}

#[tokio::test]
async fn limits_are_enforced_with_413_and_apply_nothing() {
    let stack = Stack::start_with(&[
        ("BSTORE__API__MAX_REQUEST_BYTES", "200000"),
        ("BSTORE__LIMITS__MAX_IDS_PER_CALL", "10"),
        ("BSTORE__LIMITS__MAX_VALUE_BYTES", "1000"),
    ])
    .await;
    let s = stack.session("t", "s");
    let before = seeded(&s).await;

    let ids: Vec<String> = (0..11).map(|i| format!("n{i}")).collect();
    let many = key_data(ids.iter().map(|i| ("pre-key", i.as_str(), Some(&b"v"[..]))));
    assert_eq!(code(s.keys_set(&rid(), &many).await), 413, "too many ids to set");
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(code(s.keys_get("pre-key", &refs).await), 413, "too many ids to get");

    let big = vec![0u8; 1001];
    assert_eq!(code(s.keys_set(&rid(), &key_data([("pre-key", "2", Some(&b"ok"[..])), ("session", "x", Some(&big[..]))])).await), 413);
    assert_eq!(code(s.creds_put(&rid(), &big).await), 413);

    let body = vec![0u8; 200_001];
    assert_eq!(code(s.raw("keys.set", body).await), 413, "body over the request limit");
    assert_unchanged(&s, &before).await;
}

/// What `rmp_serde` writes for a JSON-shaped value.
fn msgpack(v: serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec_named(&v).unwrap()
}

/// Bodies a lenient (serde-based) decoder took for valid requests, for each
/// op they would have been accepted for. Several would have changed the
/// session: an array read as a struct, bytes from an array of integers, the
/// last of two repeated ids.
fn lenient_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let mut bodies = Vec::new();
    for op in ["creds.get", "creds.put", "keys.get", "keys.set", "session.delete", "session.info"] {
        for body in [
            &b"\x90"[..],                         // []
            b"\x91\xa3r-1",                       // [rid]
            b"\x81\x01\x02",                      // {1: 2}
            b"\x81\x00\xa1x",                     // {0: "x"}
            b"\x80\xc1garbage",                   // {} and garbage
            b"\x80\x80",                          // {} twice
            b"\x82\xa3rid\xa1a\xa3rid\xa1b",      // a repeated key
            b"\x81\xa5other\xdd\xff\xff\xff\xff", // an unknown field announcing 4 G elements
        ] {
            bodies.push((op, body.to_vec()));
        }
    }
    let garbage = |mut b: Vec<u8>| {
        b.extend_from_slice(b"\xc1 trailing");
        b
    };
    bodies.extend([
        ("creds.put", msgpack(serde_json::json!(["r-1", [1, 2, 3]]))),
        ("creds.put", msgpack(serde_json::json!({"creds": [1, 2, 3]}))),
        ("creds.put", msgpack(serde_json::json!({"rid": null, "creds": "x"}))),
        ("creds.put", garbage(msgpack(serde_json::json!({"creds": "x"})))),
        ("creds.put", Vec::new()),
        ("keys.get", msgpack(serde_json::json!(["pre-key", ["1"]]))),
        ("keys.get", msgpack(serde_json::json!({"type": "pre-key", "ids": {"0": "1"}}))),
        ("keys.get", Vec::new()),
        ("keys.set", msgpack(serde_json::json!(["r-2", {"pre-key": {"1": [1, 2]}}]))),
        ("keys.set", msgpack(serde_json::json!({"data": {"pre-key": {"1": [1, 2]}}}))),
        ("keys.set", msgpack(serde_json::json!({"data": [["pre-key", {"1": null}]]}))),
        ("keys.set", garbage(msgpack(serde_json::json!({"data": {"pre-key": {"1": null}}})))),
        ("keys.set", b"\x81\xa4data\x81\xa7pre-key\x82\xa11\xc4\x01a\xa11\xc4\x01b".to_vec()), // id "1" twice
        ("keys.set", b"\x81\xa4data\x81\xa7pre-key\x81\x01\xc4\x01a".to_vec()),                // an integer id
        ("keys.set", Vec::new()),
        ("session.delete", msgpack(serde_json::json!(["r-3"]))),
        ("session.delete", msgpack(serde_json::json!({"rid": null}))),
        ("session.delete", garbage(msgpack(serde_json::json!({"rid": "r-4"})))),
    ]);
    bodies
}

#[tokio::test]
async fn lenient_bodies_are_400_and_apply_nothing() {
    let stack = Stack::start().await;
    let s = stack.session("t", "s");
    let before = seeded(&s).await;
    for (op, body) in lenient_bodies() {
        let r = s.raw(op, body.clone()).await;
        assert_eq!(code(r), 400, "{op} {body:x?}");
        if op == "session.delete" {
            assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"creds"[..]), "after {body:x?}");
        }
    }
    assert_unchanged(&s, &before).await;
    // The documented shapes still work, `str` for `bin` included.
    s.raw("creds.put", msgpack(serde_json::json!({"rid": rid(), "creds": "as text"}))).await.unwrap();
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"as text"[..]));
    s.raw("session.delete", Vec::new()).await.unwrap();
    assert!(!s.info().await.unwrap().exists);
}

#[tokio::test]
async fn refusals_name_no_tenant_or_session() {
    let stack = Stack::start().await;
    let (tenant, session) = ("victimcorp", "bot-4471-secret");
    let s = SessionClient::new(stack.nc.clone(), "bstore", tenant, session);
    let message = |r: Result<bytes::Bytes, ClientError>, want: u16| match r {
        Err(ClientError::Service { code, message }) if code == want => message,
        other => panic!("expected {want}, got {other:?}"),
    };
    let unknown = message(s.raw("keys.drop", Vec::new()).await, 404);
    assert!(unknown.contains("keys.drop"), "the op token is named: {unknown}");
    for m in [
        unknown,
        message(s.raw_subject(&format!("{tenant}%.{session}.keys.get")).await, 422),
        message(s.raw_subject(&format!("{tenant}.{session}.x.keys.get")).await, 422),
        message(s.raw_subject(&format!("{tenant}.{session}.nothing")).await, 404),
        message(s.raw("keys.get", msgpack(serde_json::json!({"type": "pre-key", "ids": [format!("{session}\n")]}))).await, 422),
        message(
            s.raw("keys.set", b"\x81\xa4data\x81\xa7pre-key\x81\xaf".iter().copied().chain(session.bytes()).chain(*b"\x01").collect())
                .await,
            400,
        ),
    ] {
        assert!(!m.contains(tenant) && !m.contains(session), "{m}");
    }
}

/// `keys.get` of 2.1 M ids in a body under the 4 MiB request limit.
fn id_bomb() -> Vec<u8> {
    let n = 2_100_000u32;
    let mut body = b"\x82\xa4type\xa7pre-key\xa3ids\xdd".to_vec();
    body.extend_from_slice(&n.to_be_bytes());
    for i in 0..n {
        // Mostly one-letter ids, some empty: 2.1 M of them fit in 4 MiB.
        body.extend_from_slice(if i % 20 == 0 { b"\xa0" } else { b"\xa1x" });
    }
    assert!(body.len() < 4 << 20);
    body
}

#[tokio::test]
async fn an_id_bomb_is_413_and_other_tenants_are_served_meanwhile() {
    let stack = Stack::start().await;
    let victim = stack.session("other", "s").with_timeout(std::time::Duration::from_secs(5));
    victim.creds_put(&rid(), b"victim creds").await.unwrap();
    let attacker = stack.session("t", "s").with_timeout(std::time::Duration::from_secs(10));
    let bomb = id_bomb();
    let bombs = (0..6).map(|_| {
        let (attacker, bomb) = (attacker.clone(), bomb.clone());
        tokio::spawn(async move { attacker.raw("keys.get", bomb).await })
    });
    let bombs: Vec<_> = bombs.collect();
    for _ in 0..20 {
        assert_eq!(victim.creds_get().await.unwrap().as_deref(), Some(&b"victim creds"[..]));
    }
    for b in bombs {
        match b.await.unwrap() {
            Err(ClientError::Service { code: 413, message }) => assert!(message.contains("ids in one keys.get"), "{message}"),
            other => panic!("expected 413, got {other:?}"),
        }
    }
    assert_eq!(victim.creds_get().await.unwrap().as_deref(), Some(&b"victim creds"[..]));
    assert!(!attacker.info().await.unwrap().exists);
}

/// A 32-byte block of eight groups `x, 255-x, 255-x, x`, with `x` the bytes
/// of `n`: all such blocks share one rsync rolling hash, yet any two differ.
fn colliding_block(n: u64) -> [u8; 32] {
    let mut block = [0u8; 32];
    for (g, x) in n.to_le_bytes().into_iter().enumerate() {
        block[4 * g..4 * g + 4].copy_from_slice(&[x, 255 - x, 255 - x, x]);
    }
    block
}

fn colliding_value(bytes: usize, first: u64) -> Vec<u8> {
    (first..first + (bytes / 32) as u64).flat_map(|n| colliding_block(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))).collect()
}

#[tokio::test]
async fn a_value_crafted_against_delta_building_is_stored_and_reads_back_exactly() {
    let mut stack = Stack::start().await;
    let s = stack.session("t", "crafted");
    let id = "120363@g.us::4915112345678::0";
    let first = colliding_value(1 << 20, 0);
    // A rewrite is tried as a delta against the first: every aligned block
    // collides with every block of the base, and none matches.
    let second = colliding_value(1 << 20, 1 << 32);
    // Then an honest small change, which is recorded as a delta.
    let mut third = second.clone();
    third[500_000] ^= 1;
    third.extend_from_slice(b"appended");
    for value in [&first, &second, &third] {
        s.keys_set(&rid(), &key_data([("sender-key", id, Some(&value[..]))])).await.unwrap();
        assert_eq!(&s.keys_get("sender-key", &[id]).await.unwrap()[id], value);
    }
    // Rebuilt from the log alone, the value is exact.
    stack.service.restart();
    assert_eq!(s.keys_get("sender-key", &[id]).await.unwrap()[id], third);
    assert_eq!(s.info().await.unwrap().bytes, third.len() as u64);
}
