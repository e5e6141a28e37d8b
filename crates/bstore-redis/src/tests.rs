//! The projection against a real redis-server.

use bstore_codec::{Codec, Keyring};
use bstore_domain::{Change, Event, KeyChanges, KeyId, KeyType, SessionKey, SessionState};
use bstore_testkit::RedisServer;
use bytes::Bytes;
use redis::AsyncCommands;

use super::*;

fn codec() -> Codec {
    Codec::new(Keyring::new(vec![(1, [7u8; 32])], None).unwrap())
}

fn projection(server: &RedisServer) -> RedisProjection {
    RedisProjection::new(RedisConfig { url: Some(server.url()), ..Default::default() }, codec()).unwrap()
}

fn sk(s: &str) -> SessionKey {
    SessionKey::parse("t", s).unwrap()
}

fn keys(entries: &[(&str, &str, Option<&str>)]) -> Event {
    let mut keys = KeyChanges::new();
    for (ty, id, v) in entries {
        keys.entry(KeyType::parse(ty).unwrap())
            .or_default()
            .insert(KeyId::parse(id).unwrap(), v.map(|v| Bytes::copy_from_slice(v.as_bytes())));
    }
    Event { v: 1, at_ms: 1000, rid: None, change: Change::KeysChanged { keys, patched: Default::default() } }
}

/// Applies `event` to `st` at `seq` and projects it; returns the outcome.
async fn step(p: &RedisProjection, s: &SessionKey, st: &mut SessionState, seq: u64, event: Event) -> DeltaOutcome {
    let prev = st.seq();
    st.apply(seq, &event).unwrap();
    p.apply(s, prev, st, &event).await.unwrap()
}

#[tokio::test]
async fn deltas_apply_in_order_and_load_back() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("a");
    let mut st = SessionState::default();
    let creds = Event { v: 1, at_ms: 5, rid: None, change: Change::CredsPut { creds: Bytes::from_static(b"creds") } };
    assert_eq!(step(&p, &s, &mut st, 3, creds).await, DeltaOutcome::Applied);
    assert_eq!(step(&p, &s, &mut st, 7, keys(&[("pre-key", "1", Some("a")), ("session", "u.0", Some("s"))])).await, DeltaOutcome::Applied);
    assert_eq!(step(&p, &s, &mut st, 9, keys(&[("pre-key", "1", None), ("pre-key", "2", Some("b"))])).await, DeltaOutcome::Applied);
    assert_eq!(p.load(&s).await.unwrap(), Some(st.clone()));
    assert_eq!(p.stored_seq(&s).await.unwrap(), Some(9));
    assert_eq!(p.load(&sk("nobody")).await.unwrap(), None);
    assert_eq!(p.sessions().await.unwrap(), vec![s]);
}

#[tokio::test]
async fn repeated_and_older_deltas_change_nothing_and_gaps_are_reported() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("b");
    let mut st = SessionState::default();
    let e1 = keys(&[("pre-key", "1", Some("a"))]);
    step(&p, &s, &mut st, 4, e1.clone()).await;
    let at4 = st.clone();
    let e2 = keys(&[("pre-key", "1", Some("new"))]);
    step(&p, &s, &mut st, 6, e2.clone()).await;
    // The same delta again, and the older one after the newer.
    assert_eq!(p.apply(&s, 4, &st, &e2).await.unwrap(), DeltaOutcome::AlreadyNewer);
    assert_eq!(p.apply(&s, 0, &at4, &e1).await.unwrap(), DeltaOutcome::AlreadyNewer);
    assert_eq!(p.load(&s).await.unwrap(), Some(st.clone()));
    // A delta whose predecessor the hash has not seen is refused.
    let mut ahead = st.clone();
    let e3 = keys(&[("pre-key", "3", Some("c"))]);
    ahead.apply(12, &e3).unwrap();
    assert_eq!(p.apply(&s, 10, &ahead, &e3).await.unwrap(), DeltaOutcome::Gap { stored: 6 });
    assert_eq!(p.load(&s).await.unwrap(), Some(st.clone()));
    // A guarded snapshot fills the gap; an older guarded one is refused.
    assert!(p.write_snapshot(&s, &ahead, SnapshotMode::Guarded).await.unwrap());
    assert!(!p.write_snapshot(&s, &st, SnapshotMode::Guarded).await.unwrap());
    assert_eq!(p.load(&s).await.unwrap(), Some(ahead.clone()));
    // Replace overrides the guard.
    assert!(p.write_snapshot(&s, &st, SnapshotMode::Replace).await.unwrap());
    assert_eq!(p.load(&s).await.unwrap(), Some(st));
}

#[tokio::test]
async fn a_deleted_session_keeps_only_its_sequence_so_late_deltas_cannot_resurrect_keys() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("c");
    let mut st = SessionState::default();
    let set = keys(&[("pre-key", "1", Some("a"))]);
    step(&p, &s, &mut st, 2, set.clone()).await;
    let deleted = Event { v: 1, at_ms: 9, rid: None, change: Change::SessionDeleted };
    assert_eq!(step(&p, &s, &mut st, 5, deleted).await, DeltaOutcome::Applied);
    let mut conn = p.connection();
    let fields: Vec<String> = conn.hkeys(p.key(&s)).await.unwrap();
    assert!(!fields.iter().any(|f| f.contains(FIELD_SEP) || f == "creds"), "{fields:?}");
    let mut old = SessionState::default();
    old.apply(2, &set).unwrap();
    assert_eq!(p.apply(&s, 0, &old, &set).await.unwrap(), DeltaOutcome::AlreadyNewer);
    let loaded = p.load(&s).await.unwrap().unwrap();
    assert_eq!(loaded, st);
    assert!(!loaded.info().exists);
}

#[tokio::test]
async fn a_blob_of_another_session_or_a_corrupt_one_is_unreadable() {
    let server = RedisServer::start();
    let p = projection(&server);
    let (a, b) = (sk("a"), sk("b"));
    for s in [&a, &b] {
        let mut st = SessionState::default();
        step(&p, s, &mut st, 3, keys(&[("pre-key", "1", Some(s.session.as_str()))])).await;
    }
    let mut conn = p.connection();
    let field = RedisProjection::field(&KeyType::parse("pre-key").unwrap(), &KeyId::parse("1").unwrap());
    let foreign: Vec<u8> = conn.hget(p.key(&b), &field).await.unwrap();
    let _: () = conn.hset(p.key(&a), &field, foreign).await.unwrap();
    assert!(matches!(p.load(&a).await, Err(RedisError::Unreadable { .. })));
    let _: () = conn.hset(p.key(&b), &field, b"garbage".as_slice()).await.unwrap();
    assert!(matches!(p.load(&b).await, Err(RedisError::Unreadable { .. })));
    let _: () = conn.hset(p.key(&b), "seq", "x").await.unwrap();
    assert!(matches!(p.stored_seq(&b).await, Err(RedisError::Unreadable { .. })));
}

#[tokio::test]
async fn large_writes_go_through_in_chunks() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("big");
    let ids: Vec<String> = (0..2500).map(|i| i.to_string()).collect();
    let entries: Vec<(&str, &str, Option<&str>)> = ids.iter().map(|i| ("pre-key", i.as_str(), Some("v"))).collect();
    let mut st = SessionState::default();
    assert_eq!(step(&p, &s, &mut st, 1, keys(&entries)).await, DeltaOutcome::Applied);
    let deletes: Vec<(&str, &str, Option<&str>)> = ids.iter().take(2100).map(|i| ("pre-key", i.as_str(), None)).collect();
    assert_eq!(step(&p, &s, &mut st, 2, keys(&deletes)).await, DeltaOutcome::Applied);
    assert_eq!(p.load(&s).await.unwrap(), Some(st.clone()));
    assert!(p.write_snapshot(&s, &st, SnapshotMode::Replace).await.unwrap());
    assert_eq!(p.load(&s).await.unwrap().unwrap().info().keys["pre-key"], 400);
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_within_the_time_out() {
    let mut server = RedisServer::start();
    let p = projection(&server);
    server.stop();
    let start = std::time::Instant::now();
    assert!(matches!(p.load(&sk("a")).await, Err(RedisError::Unavailable(_))));
    assert!(start.elapsed() < std::time::Duration::from_secs(3));
    server.start_again();
    let mut ok = false;
    for _ in 0..50 {
        if p.load(&sk("a")).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "the projection reconnects by itself");
}
