//! The apply function against a real Mongo-compatible server: repeats,
//! reordering and late events change nothing.

use std::collections::BTreeMap;

use bstore_codec::{Codec, Keyring};
use bstore_domain::{Change, Event, KeyChanges, KeyId, KeyType, SessionKey};
use bstore_testkit::MongoServer;
use bytes::Bytes;
use futures_util::TryStreamExt;
use mongodb::bson::{Document, doc};

use crate::{LoggedEvent, MongoConfig, Store};

fn codec() -> Codec {
    Codec::new(Keyring::new(vec![(1, [9u8; 32])], None).unwrap())
}

async fn store(server: &MongoServer, db: &str) -> Store {
    let cfg = MongoConfig { url: Some(server.url()), database: db.into(), ..Default::default() };
    let store = Store::connect(&cfg, codec()).await.unwrap();
    store.ensure_indexes().await.unwrap();
    store
}

fn session(s: &str) -> SessionKey {
    SessionKey::parse("t", s).unwrap()
}

fn keys(s: &str, seq: u64, entries: &[(&str, &str, Option<&str>)]) -> LoggedEvent {
    let mut keys = KeyChanges::new();
    for (ty, id, v) in entries {
        keys.entry(KeyType::parse(ty).unwrap())
            .or_default()
            .insert(KeyId::parse(id).unwrap(), v.map(|v| Bytes::copy_from_slice(v.as_bytes())));
    }
    LoggedEvent {
        seq,
        session: session(s),
        event: Event { v: 1, at_ms: 1000 + seq, rid: None, change: Change::KeysChanged { keys, patched: Default::default() } },
    }
}

fn creds(s: &str, seq: u64, v: &str) -> LoggedEvent {
    LoggedEvent {
        seq,
        session: session(s),
        event: Event { v: 1, at_ms: 1000 + seq, rid: None, change: Change::CredsPut { creds: Bytes::copy_from_slice(v.as_bytes()) } },
    }
}

fn deleted(s: &str, seq: u64) -> LoggedEvent {
    LoggedEvent { seq, session: session(s), event: Event { v: 1, at_ms: 1000 + seq, rid: None, change: Change::SessionDeleted } }
}

/// Every document of the projection, in `_id` order.
async fn dump(store: &Store) -> Vec<Document> {
    let mut out = Vec::new();
    for name in ["keys", "sessions"] {
        let coll = store.database().collection::<Document>(name);
        let mut docs: Vec<Document> = coll.find(doc! {}).await.unwrap().try_collect().await.unwrap();
        docs.sort_by_key(|d| d.get_str("_id").unwrap_or_default().to_owned());
        out.extend(docs);
    }
    out
}

fn history() -> Vec<LoggedEvent> {
    vec![
        creds("a", 1, "c1"),
        keys("a", 2, &[("pre-key", "1", Some("p1")), ("pre-key", "2", Some("p2")), ("session", "u.0", Some("s0"))]),
        keys("b", 3, &[("pre-key", "1", Some("other"))]),
        keys("a", 4, &[("pre-key", "1", None), ("pre-key", "2", Some("p2b"))]),
        creds("a", 5, "c2"),
        keys("a", 6, &[("sender-key", "g::1", Some("sk"))]),
    ]
}

#[tokio::test]
async fn a_redelivered_batch_or_older_events_change_no_document() {
    let server = MongoServer::start();
    let store = store(&server, "redelivery").await;
    let events = history();
    store.apply(&events).await.unwrap();
    let before = dump(&store).await;

    // The whole batch again (an ack was lost).
    let again = store.apply(&events).await.unwrap();
    assert!(again.already_applied > 0, "{again:?}");
    assert_eq!(dump(&store).await, before);
    // Older events after newer ones, one at a time and reversed.
    for e in events.iter().rev() {
        store.apply(std::slice::from_ref(e)).await.unwrap();
    }
    store.apply(&[events[1].clone(), events[3].clone()]).await.unwrap();
    assert_eq!(dump(&store).await, before);

    let a = store.read_session(&session("a")).await.unwrap().unwrap();
    assert_eq!(a.seq, 6);
    assert_eq!(a.creds.as_deref(), Some(&b"c2"[..]));
    assert_eq!(a.counts, BTreeMap::from([("pre-key".to_string(), 1), ("session".to_string(), 1), ("sender-key".to_string(), 1)]));
    assert_eq!(a.keys.get(&("pre-key".into(), "2".into())).map(Vec::as_slice), Some(&b"p2b"[..]));
    assert!(!a.keys.contains_key(&("pre-key".into(), "1".into())), "deleted key is a tombstone");
    assert_eq!(a.tombstones, 1);
}

#[tokio::test]
async fn batching_and_order_do_not_change_the_result() {
    let server = MongoServer::start();
    let (one, many) = (store(&server, "one").await, store(&server, "many").await);
    let events = history();
    one.apply(&events).await.unwrap();
    // Newest first, in two batches.
    let mut rev = events.clone();
    rev.reverse();
    many.apply(&rev[..3]).await.unwrap();
    many.apply(&rev[3..]).await.unwrap();
    for s in ["a", "b"] {
        let (x, y) = (one.read_session(&session(s)).await.unwrap(), many.read_session(&session(s)).await.unwrap());
        assert_eq!(x, y, "session {s}");
    }
}

#[tokio::test]
async fn a_deleted_session_is_tombstoned_and_late_events_cannot_resurrect_it() {
    let server = MongoServer::start();
    let store = store(&server, "deletes").await;
    let set_a = keys("a", 2, &[("pre-key", "1", Some("p1"))]);
    // Never applied before the deletion: arrives late.
    let late = keys("a", 3, &[("pre-key", "9", Some("late"))]);
    store.apply(&[creds("a", 1, "c"), set_a]).await.unwrap();
    store.apply(&[deleted("a", 4)]).await.unwrap();
    let before = dump(&store).await;
    store.apply(&[late, creds("a", 3, "old")]).await.unwrap();
    assert_eq!(dump(&store).await, before, "nothing older than the deletion is written");

    let a = store.read_session(&session("a")).await.unwrap().unwrap();
    assert!(a.keys.is_empty() && a.creds.is_none(), "{a:?}");
    assert_eq!((a.seq, a.tombstones), (4, 1));
    let tomb = store.database().collection::<Document>("keys").find_one(doc! { "sid": "t.a" }).await.unwrap().unwrap();
    assert_eq!(tomb.get_i64("seq").unwrap(), 4);
    assert!(tomb.get_datetime("deleted_at").is_ok() && tomb.get("value").is_none(), "{tomb:?}");

    // Set, delete and set again inside one batch.
    store
        .apply(&[
            keys("c", 10, &[("pre-key", "1", Some("x")), ("pre-key", "2", Some("y"))]),
            deleted("c", 11),
            keys("c", 12, &[("pre-key", "2", Some("z"))]),
        ])
        .await
        .unwrap();
    let c = store.read_session(&session("c")).await.unwrap().unwrap();
    assert_eq!(c.keys.into_iter().collect::<Vec<_>>(), vec![(("pre-key".to_string(), "2".to_string()), b"z".to_vec())]);
    assert_eq!(c.tombstones, 1);
    assert_eq!(c.counts, BTreeMap::from([("pre-key".to_string(), 1)]));
}

#[tokio::test]
async fn values_are_sealed_for_their_place() {
    let server = MongoServer::start();
    let store = store(&server, "sealed").await;
    store.apply(&[keys("a", 1, &[("pre-key", "1", Some("PLAINTEXT-MARKER"))])]).await.unwrap();
    for d in dump(&store).await {
        let bytes = mongodb::bson::to_vec(&d).unwrap();
        assert!(!bytes.windows(16).any(|w| w == b"PLAINTEXT-MARKER"));
    }
    // A value moved to another key's document fails to open.
    let coll = store.database().collection::<Document>("keys");
    let d = coll.find_one(doc! {}).await.unwrap().unwrap();
    let mut moved = d.clone();
    moved.insert("_id", "t.b\u{1f}pre-key\u{1f}1");
    moved.insert("sid", "t.b");
    moved.insert("session", "b");
    coll.insert_one(moved).await.unwrap();
    assert!(matches!(store.read_session(&session("b")).await, Err(crate::MongoError::Unreadable(_))));
    assert_eq!(store.checkpoint("x").await.unwrap(), 0);
    store.save_checkpoint("x", 7).await.unwrap();
    store.save_checkpoint("x", 5).await.unwrap();
    assert_eq!(store.checkpoint("x").await.unwrap(), 7);
}
