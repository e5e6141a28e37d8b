//! The apply function against a real Mongo-compatible server: repeats,
//! reordering and late events change nothing, and two instances applying
//! racing batches end where one instance applying them in order would.
//!
//! The interleavings of two instances are driven directly: one [`Store`]
//! handle is held at a [`Stage`] of its `apply` (through a [`Gate`]) while
//! another handle on the same database runs, then released — or dropped
//! there, as an instance that crashed mid-batch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bstore_codec::{Codec, Keyring};
use bstore_domain::{Change, Event, KeyChanges, KeyId, KeyType, SessionKey};
use bstore_testkit::MongoServer;
use bytes::Bytes;
use futures_util::TryStreamExt;
use mongodb::bson::{Document, doc};

use crate::store::Stage;
use crate::{Applied, LoggedEvent, MongoConfig, MongoError, Store};

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
        event: Event { v: 1, at_ms: 1000 + seq, rid: None, prev: None, change: Change::KeysChanged { keys, patched: Default::default() } },
    }
}

fn creds(s: &str, seq: u64, v: &str) -> LoggedEvent {
    LoggedEvent {
        seq,
        session: session(s),
        event: Event {
            v: 1,
            at_ms: 1000 + seq,
            rid: None,
            prev: None,
            change: Change::CredsPut { creds: Bytes::copy_from_slice(v.as_bytes()) },
        },
    }
}

fn deleted(s: &str, seq: u64) -> LoggedEvent {
    LoggedEvent {
        seq,
        session: session(s),
        event: Event { v: 1, at_ms: 1000 + seq, rid: None, prev: None, change: Change::SessionDeleted },
    }
}

/// Every document of the projection, in `_id` order, without the
/// generations of the recounts (a repeated batch recounts, and so moves
/// them, without changing any count).
async fn dump(store: &Store) -> Vec<Document> {
    let mut out = Vec::new();
    for name in ["keys", "sessions"] {
        let coll = store.database().collection::<Document>(name);
        let mut docs: Vec<Document> = coll.find(doc! {}).await.unwrap().try_collect().await.unwrap();
        for d in &mut docs {
            d.remove("count_gen");
            d.remove("counted_gen");
        }
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
async fn values_are_sealed_for_their_place_and_key_ids_are_not_in_clear() {
    let server = MongoServer::start();
    let store = store(&server, "sealed").await;
    store.apply(&[keys("a", 1, &[("pre-key", "ID-MARKER-1", Some("PLAINTEXT-MARKER"))])]).await.unwrap();
    for d in dump(&store).await {
        let bytes = mongodb::bson::to_vec(&d).unwrap();
        assert!(!bytes.windows(16).any(|w| w == b"PLAINTEXT-MARKER"));
        assert!(!bytes.windows(11).any(|w| w == b"ID-MARKER-1"), "a key id in clear: {d:?}");
    }
    let a = store.read_session(&session("a")).await.unwrap().unwrap();
    assert_eq!(
        a.keys.get(&k("pre-key", "ID-MARKER-1")).map(Vec::as_slice),
        Some(&b"PLAINTEXT-MARKER"[..]),
        "the id is sealed beside the value"
    );

    // A value moved to the same key's document of another session, or to
    // another key's document, fails to open.
    let coll = store.database().collection::<Document>("keys");
    let d = coll.find_one(doc! {}).await.unwrap().unwrap();
    let (ty, id) = (KeyType::parse("pre-key").unwrap(), KeyId::parse("ID-MARKER-1").unwrap());
    let mut moved = d.clone();
    moved.insert("_id", store.key_doc_id(&session("b"), &ty, &id));
    moved.insert("sid", "t.b");
    moved.insert("session", "b");
    coll.insert_one(moved).await.unwrap();
    assert!(matches!(store.read_session(&session("b")).await, Err(crate::MongoError::Unreadable(_))));
    let mut moved = d.clone();
    let other = KeyId::parse("2").unwrap();
    moved.insert("_id", store.key_doc_id(&session("a"), &ty, &other));
    coll.insert_one(moved).await.unwrap();
    assert!(matches!(store.read_session(&session("a")).await, Err(crate::MongoError::Unreadable(_))));

    assert_eq!(store.checkpoint("x").await.unwrap(), 0);
    store.save_checkpoint("x", 7).await.unwrap();
    store.save_checkpoint("x", 5).await.unwrap();
    assert_eq!(store.checkpoint("x").await.unwrap(), 7);
}

#[tokio::test]
async fn key_documents_of_the_earlier_release_are_rewritten_under_their_tags() {
    let server = MongoServer::start();
    let store = store(&server, "old-format").await;
    let codec = codec();
    let (s, ty) = (session("a"), KeyType::parse("session").unwrap());
    let coll = store.database().collection::<Document>("keys");
    // As the earlier release wrote them: the id in `_id` and `id`, the value
    // sealed for the id; one live, one a tombstone, one older than the
    // document of its tag that this release already wrote.
    let old = |id: &str, seq: i64, value: Option<&[u8]>| {
        let kid = KeyId::parse(id).unwrap();
        let mut d = doc! {
            "_id": format!("t.a\u{1f}session\u{1f}{id}"), "sid": "t.a", "tenant": "t", "session": "a",
            "type": "session", "id": id, "seq": seq, "deleted": value.is_none(),
            "updated_at": mongodb::bson::DateTime::from_millis(1000 + seq),
        };
        if let Some(v) = value {
            let blob = codec.seal_value(&s, Some((&ty, &kid)), v);
            d.insert("value", mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: blob });
        }
        d
    };
    store.apply(&[keys("a", 9, &[("session", "491.0", Some("new"))])]).await.unwrap();
    coll.insert_many([old("490.0", 3, Some(b"v3")), old("492.0", 4, None), old("491.0", 5, Some(b"older"))]).await.unwrap();

    store.ensure_indexes().await.unwrap();
    let docs: Vec<Document> = coll.find(doc! {}).await.unwrap().try_collect().await.unwrap();
    assert_eq!(docs.len(), 3, "{docs:?}");
    assert!(docs.iter().all(|d| !d.contains_key("id") && !d.get_str("_id").unwrap().contains("49")), "{docs:?}");
    let a = store.read_session(&s).await.unwrap().unwrap();
    assert_eq!(a.keys, BTreeMap::from([(k("session", "490.0"), b"v3".to_vec()), (k("session", "491.0"), b"new".to_vec())]));
    assert_eq!((a.tombstones, a.counts), (1, counts(&[("session", 2)])));
}

/// Holds an `apply` at one [`Stage`], once: it reports reaching the stage,
/// then waits to be released.
pub(crate) struct Gate {
    at: Stage,
    reached: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    resume: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl Gate {
    pub(crate) async fn pass(&self, stage: Stage) {
        if stage != self.at {
            return;
        }
        let Some(reached) = self.reached.lock().unwrap().take() else { return };
        let _ = reached.send(());
        let resume = self.resume.lock().unwrap().take();
        if let Some(resume) = resume {
            let _ = resume.await;
        }
    }
}

/// One instance's `apply` of `batch`, running in a task of its own and held
/// at a stage.
struct Held {
    reached: Option<tokio::sync::oneshot::Receiver<()>>,
    resume: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<Applied, MongoError>>,
}

impl Held {
    /// Starts applying `batch` through a handle of its own, and waits until
    /// it reaches `at`.
    async fn at(store: &Store, at: Stage, batch: Vec<LoggedEvent>) -> Self {
        let (reached_tx, reached) = tokio::sync::oneshot::channel();
        let (resume, resume_rx) = tokio::sync::oneshot::channel();
        let gate = Arc::new(Gate { at, reached: Mutex::new(Some(reached_tx)), resume: Mutex::new(Some(resume_rx)) });
        let held = store.with_gate(gate);
        let task = tokio::spawn(async move { held.apply(&batch).await });
        let mut h = Self { reached: Some(reached), resume, task };
        h.reached.take().unwrap().await.unwrap_or_else(|_| panic!("the held apply finished without reaching {at:?}"));
        h
    }

    /// Lets it go on, and waits for it to finish.
    async fn release(self) -> Applied {
        let _ = self.resume.send(());
        self.task.await.unwrap().unwrap()
    }

    /// Stops it where it is, as an instance that died there.
    async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn k(ty: &str, id: &str) -> (String, String) {
    (ty.to_string(), id.to_string())
}

fn counts(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
    entries.iter().map(|(t, n)| (t.to_string(), *n)).collect()
}

#[tokio::test]
async fn a_key_write_racing_a_session_deletion_never_resurrects_the_key() {
    let server = MongoServer::start();
    let store = store(&server, "resurrect").await;

    // B has read the (fresh) session, found no deletion, and not yet
    // written; A applies the deletion at 4 in full; then B writes K at 3.
    let b = Held::at(&store, Stage::Read, vec![keys("a", 3, &[("pre-key", "K", Some("v3"))])]).await;
    store.apply(&[deleted("a", 4)]).await.unwrap();
    b.release().await;
    let a = store.read_session(&session("a")).await.unwrap().unwrap();
    assert!(a.keys.is_empty(), "a key older than the deletion came back: {a:?}");
    assert_eq!((a.seq, a.counts.clone()), (4, BTreeMap::new()));

    // B has written K at 3 and not yet looked at the session again; A
    // deletes the session at 4 meanwhile.
    let b = Held::at(&store, Stage::Written, vec![keys("b", 3, &[("pre-key", "K", Some("v3"))])]).await;
    store.apply(&[deleted("b", 4)]).await.unwrap();
    b.release().await;
    let s = store.read_session(&session("b")).await.unwrap().unwrap();
    assert!(s.keys.is_empty() && s.counts.is_empty(), "{s:?}");

    // The deleter has raised the session's reset sequence and not yet
    // tombstoned its keys; B writes K at 3 in full meanwhile.
    store.apply(&[keys("c", 1, &[("pre-key", "old", Some("o"))])]).await.unwrap();
    let a = Held::at(&store, Stage::ResetRaised, vec![deleted("c", 4)]).await;
    store.apply(&[keys("c", 3, &[("pre-key", "K", Some("v3"))])]).await.unwrap();
    a.release().await;
    let c = store.read_session(&session("c")).await.unwrap().unwrap();
    assert!(c.keys.is_empty() && c.counts.is_empty(), "{c:?}");
    assert_eq!(c.seq, 4);

    // A later write of the key is not held back by the deletion.
    store.apply(&[keys("c", 5, &[("pre-key", "K", Some("v5"))])]).await.unwrap();
    let c = store.read_session(&session("c")).await.unwrap().unwrap();
    assert_eq!(c.keys.get(&k("pre-key", "K")).map(Vec::as_slice), Some(&b"v5"[..]));
    assert_eq!(c.counts, counts(&[("pre-key", 1)]));
}

#[tokio::test]
async fn a_deletion_applied_after_newer_events_still_removes_what_it_deleted() {
    let server = MongoServer::start();
    let store = store(&server, "late-delete").await;
    // Log: 1 K1 set, 2 creds, 3 K2 set, 4 session deleted, 5 K3 set.
    // Instances apply 1, 2 and 5 first, then 4, then 3.
    store.apply(&[keys("a", 1, &[("pre-key", "K1", Some("v1"))]), creds("a", 2, "c2")]).await.unwrap();
    store.apply(&[keys("a", 5, &[("pre-key", "K3", Some("v5"))])]).await.unwrap();
    store.apply(&[deleted("a", 4)]).await.unwrap();
    store.apply(&[keys("a", 3, &[("pre-key", "K2", Some("v3"))])]).await.unwrap();
    let a = store.read_session(&session("a")).await.unwrap().unwrap();
    assert_eq!(a.keys.keys().cloned().collect::<Vec<_>>(), vec![k("pre-key", "K3")], "{a:?}");
    assert_eq!(a.creds, None, "the deletion at 4 removed the creds of 2");
    assert_eq!((a.seq, a.counts), (5, counts(&[("pre-key", 1)])));
}

/// The log of one session; every prefix of it, applied in any order and
/// split into any batches, must end as the log's own state.
fn one_session_log() -> Vec<LoggedEvent> {
    vec![
        creds("s", 1, "c1"),
        keys("s", 2, &[("pre-key", "1", Some("p1")), ("pre-key", "2", Some("p2")), ("session", "u.0", Some("s0"))]),
        creds("s", 3, "c3"),
        keys("s", 4, &[("pre-key", "1", None), ("session", "u.0", Some("s0b"))]),
        keys("s", 5, &[("sender-key", "g", Some("sk"))]),
        deleted("s", 6),
        keys("s", 7, &[("pre-key", "2", Some("p2c")), ("pre-key", "3", Some("p3"))]),
        creds("s", 8, "c8"),
        keys("s", 9, &[("pre-key", "3", None)]),
        keys("s", 10, &[("session", "u.1", Some("s1"))]),
    ]
}

/// What the log says the session is after `events`.
fn truth(events: &[LoggedEvent]) -> StoredTruth {
    let mut state = bstore_domain::SessionState::default();
    let mut sorted = events.to_vec();
    sorted.sort_by_key(|e| e.seq);
    for e in &sorted {
        state.apply(e.seq, &e.event).unwrap();
    }
    StoredTruth {
        seq: state.seq(),
        creds: state.creds().map(|c| c.to_vec()),
        updated_at_ms: state.updated_at_ms(),
        counts: state.info().keys,
        keys: state.iter_keys().map(|(t, i, v)| ((t.to_string(), i.to_string()), v.to_vec())).collect(),
    }
}

#[derive(Debug, PartialEq, Eq)]
struct StoredTruth {
    seq: u64,
    creds: Option<Vec<u8>>,
    updated_at_ms: Option<u64>,
    counts: BTreeMap<String, u64>,
    keys: BTreeMap<(String, String), Vec<u8>>,
}

impl From<crate::StoredSession> for StoredTruth {
    fn from(s: crate::StoredSession) -> Self {
        Self { seq: s.seq, creds: s.creds, updated_at_ms: s.updated_at_ms, counts: s.counts, keys: s.keys }
    }
}

/// A small deterministic generator, so that a failing order can be rerun.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

#[tokio::test]
async fn events_of_one_session_applied_in_any_order_and_batching_end_as_the_log() {
    let server = MongoServer::start();
    let log = one_session_log();
    let want = truth(&log);
    let mut rng = Lcg(7);
    for round in 0..8 {
        let store = store(&server, &format!("orders-{round}")).await;
        let mut events = log.clone();
        match round {
            0 => {}
            1 => events.reverse(),
            _ => {
                for i in (1..events.len()).rev() {
                    events.swap(i, rng.below(i + 1));
                }
            }
        }
        // Batches of one to three events, as instances would fetch them.
        let mut order = Vec::new();
        let mut rest = &events[..];
        while !rest.is_empty() {
            let n = (1 + rng.below(3)).min(rest.len());
            store.apply(&rest[..n]).await.unwrap();
            order.push(rest[..n].iter().map(|e| e.seq).collect::<Vec<_>>());
            rest = &rest[n..];
        }
        let got: StoredTruth = store.read_session(&session("s")).await.unwrap().unwrap().into();
        assert_eq!(got, want, "batches applied in the order {order:?}");
    }
}

#[tokio::test]
async fn counts_per_type_converge_when_two_instances_interleave() {
    let server = MongoServer::start();
    let store = store(&server, "counts").await;

    // A read K live (at 3) and is about to write K at 5, which by that read
    // changes no count; B deletes K at 4 and recounts meanwhile.
    store.apply(&[keys("a", 3, &[("pre-key", "K", Some("v3"))])]).await.unwrap();
    let a = Held::at(&store, Stage::Read, vec![keys("a", 5, &[("pre-key", "K", Some("v5"))])]).await;
    store.apply(&[keys("a", 4, &[("pre-key", "K", None)])]).await.unwrap();
    a.release().await;
    let s = store.read_session(&session("a")).await.unwrap().unwrap();
    assert_eq!(s.keys.get(&k("pre-key", "K")).map(Vec::as_slice), Some(&b"v5"[..]));
    assert_eq!(s.counts, counts(&[("pre-key", 1)]), "counts after a stale read");

    // A counted the keys (K1 only) and has not written the counts; B adds
    // K2 and writes its (newer) counts meanwhile.
    let a = Held::at(&store, Stage::Counted, vec![keys("b", 5, &[("pre-key", "K1", Some("1"))])]).await;
    store.apply(&[keys("b", 6, &[("pre-key", "K2", Some("2"))])]).await.unwrap();
    a.release().await;
    let s = store.read_session(&session("b")).await.unwrap().unwrap();
    assert_eq!(s.keys.len(), 2);
    assert_eq!(s.counts, counts(&[("pre-key", 2)]), "a stale count was written over a newer one");
}

#[tokio::test]
async fn a_batch_cut_short_by_a_crash_is_completed_by_its_redelivery() {
    let server = MongoServer::start();
    let store = store(&server, "crash").await;

    // The instance died after writing the keys, before the counts.
    let batch = vec![creds("a", 1, "c"), keys("a", 2, &[("pre-key", "1", Some("p1")), ("pre-key", "2", Some("p2"))])];
    Held::at(&store, Stage::Written, batch.clone()).await.crash().await;
    let again = store.apply(&batch).await.unwrap();
    assert!(again.already_applied > 0, "{again:?}");
    let got: StoredTruth = store.read_session(&session("a")).await.unwrap().unwrap().into();
    assert_eq!(got, truth(&batch));

    // The deleter died after raising the reset sequence, before the
    // tombstones; the redelivered deletion must still write them.
    let before = vec![keys("b", 3, &[("pre-key", "K", Some("v"))])];
    store.apply(&before).await.unwrap();
    Held::at(&store, Stage::ResetRaised, vec![deleted("b", 4)]).await.crash().await;
    store.apply(&[deleted("b", 4)]).await.unwrap();
    let s = store.read_session(&session("b")).await.unwrap().unwrap();
    assert!(s.keys.is_empty() && s.counts.is_empty(), "{s:?}");
    assert_eq!(s.tombstones, 1);
}

#[tokio::test]
async fn the_same_batch_applied_by_two_instances_at_once_is_applied_once() {
    let server = MongoServer::start();
    let (one, two) = (store(&server, "once").await, store(&server, "twice").await);
    let log = one_session_log();
    one.apply(&log).await.unwrap();
    // Every stage at which the first instance can be overtaken.
    for stage in [Stage::Read, Stage::Written, Stage::Counted, Stage::ResetRaised] {
        two.drop_all().await.unwrap();
        two.ensure_indexes().await.unwrap();
        let first = Held::at(&two, stage, log.clone()).await;
        two.apply(&log).await.unwrap();
        first.release().await;
        let (x, y) = (one.read_session(&session("s")).await.unwrap(), two.read_session(&session("s")).await.unwrap());
        assert_eq!(x, y, "overtaken at {stage:?}");
    }
}

#[tokio::test]
async fn first_writes_of_a_key_racing_each_other_keep_the_newest() {
    let server = MongoServer::start();
    let store = store(&server, "first").await;
    let other = store.with_gate(Arc::new(Gate { at: Stage::Read, reached: Mutex::new(None), resume: Mutex::new(None) }));

    // Either instance may have read "no document" before the other wrote.
    // The older batch also puts the creds, which the newer one leaves.
    let a = Held::at(&store, Stage::Read, vec![creds("a", 4, "c4"), keys("a", 5, &[("pre-key", "K", Some("v5"))])]).await;
    store.apply(&[keys("a", 7, &[("pre-key", "K", Some("v7"))])]).await.unwrap();
    a.release().await;
    let b = Held::at(&store, Stage::Read, vec![keys("b", 7, &[("pre-key", "K", Some("v7"))])]).await;
    store.apply(&[creds("b", 4, "c4"), keys("b", 5, &[("pre-key", "K", Some("v5"))])]).await.unwrap();
    b.release().await;
    // And truly at once, on many fresh keys and sessions.
    for i in 0..20 {
        let s = format!("c{i}");
        let (older, newer) = (keys(&s, 5, &[("pre-key", "K", Some("v5"))]), keys(&s, 7, &[("pre-key", "K", Some("v7"))]));
        let (x, y) = if i % 2 == 0 { (&store, &other) } else { (&other, &store) };
        let (r1, r2) = tokio::join!(x.apply(std::slice::from_ref(&older)), y.apply(std::slice::from_ref(&newer)));
        r1.unwrap();
        r2.unwrap();
    }
    for s in ["a", "b"].into_iter().map(String::from).chain((0..20).map(|i| format!("c{i}"))) {
        let got = store.read_session(&session(&s)).await.unwrap().unwrap();
        assert_eq!(got.keys.get(&k("pre-key", "K")).map(Vec::as_slice), Some(&b"v7"[..]), "session {s}");
        assert_eq!((got.seq, got.counts), (7, counts(&[("pre-key", 1)])), "session {s}");
    }
    for s in ["a", "b"] {
        let got = store.read_session(&session(s)).await.unwrap().unwrap();
        assert_eq!(got.creds.as_deref(), Some(&b"c4"[..]), "session {s}");
    }
}

/// The state of session `s` at `seq` holding `entries` (type, id, value).
fn state_at(seq: u64, creds: &str, entries: &[(&str, &str, &str)]) -> bstore_domain::SessionState {
    let keys = entries.iter().map(|(t, i, v)| (KeyType::parse(t).unwrap(), KeyId::parse(i).unwrap(), Bytes::copy_from_slice(v.as_bytes())));
    bstore_domain::SessionState::from_parts(seq, Some(Bytes::copy_from_slice(creds.as_bytes())), keys, Some(1000 + seq), seq)
}

#[tokio::test]
async fn a_rebuilt_state_replaces_a_damaged_copy_and_late_older_events_cannot_undo_it() {
    let server = MongoServer::start();
    let store = store(&server, "rebuilt").await;
    let a = session("a");
    // A damaged copy: a key at a sequence no event has, and a key the state
    // does not hold.
    store.apply(&[keys("a", 1_000_000, &[("pre-key", "1", Some("junk"))]), keys("a", 3, &[("pre-key", "9", Some("gone"))])]).await.unwrap();
    let state = state_at(10, "c10", &[("pre-key", "1", "v1"), ("pre-key", "2", "v2")]);
    let (written, tombstoned) = store.overwrite_state(&a, &state).await.unwrap();
    assert_eq!((written, tombstoned), (2, 1));
    store.recount(&[a.clone()].into()).await.unwrap();
    let got = store.read_session(&a).await.unwrap().unwrap();
    assert_eq!((got.seq, got.creds.as_deref()), (10, Some(&b"c10"[..])));
    assert_eq!(got.keys.keys().map(|(_, i)| i.as_str()).collect::<Vec<_>>(), vec!["1", "2"]);
    assert_eq!(got.keys[&("pre-key".into(), "1".into())], b"v1");

    // Events the state already holds, delivered late: a key it lacks with
    // no document (deleted before 10), an older value, older creds. None
    // changes anything.
    let before = dump(&store).await;
    store.apply(&[keys("a", 4, &[("pre-key", "7", Some("late"))]), keys("a", 6, &[("pre-key", "2", Some("older"))])]).await.unwrap();
    store.apply(&[creds("a", 8, "c8")]).await.unwrap();
    let mut after = dump(&store).await;
    // A late creation leaves a tombstone behind, at the state's sequence.
    let tomb = after.iter().position(|d| d.get_bool("deleted") == Ok(true) && !before.iter().any(|b| b.get_str("_id") == d.get_str("_id")));
    if let Some(i) = tomb {
        assert_eq!(after.remove(i).get_i64("seq"), Ok(10));
    }
    assert_eq!(after, before);

    // A key writer that read the reset register raised to 11 tombstones its
    // key there before the state at 11 lands: the state's value wins.
    let keys_coll = store.database().collection::<Document>("keys");
    let one = store.key_doc_id(&a, &KeyType::parse("pre-key").unwrap(), &KeyId::parse("1").unwrap());
    let w3 = doc! { "$set": { "seq": 11_i64, "deleted": true }, "$unset": { "value": "" } };
    assert_eq!(keys_coll.update_one(doc! { "_id": &one }, w3).await.unwrap().matched_count, 1);

    // A newer event applies on top; a state written guarded later than it
    // keeps it.
    store.apply(&[keys("a", 12, &[("pre-key", "2", Some("v12")), ("pre-key", "3", Some("v12"))])]).await.unwrap();
    let state = state_at(11, "c11", &[("pre-key", "1", "v1"), ("pre-key", "2", "v11")]);
    store.raise_state(&a, &state).await.unwrap();
    store.recount(&[a.clone()].into()).await.unwrap();
    let got = store.read_session(&a).await.unwrap().unwrap();
    assert_eq!(got.seq, 12);
    assert_eq!(got.creds.as_deref(), Some(&b"c11"[..]), "the creds register was older");
    assert_eq!(got.keys[&("pre-key".into(), "2".into())], b"v12", "the newer write stays");
    assert_eq!(got.keys[&("pre-key".into(), "3".into())], b"v12");
    assert_eq!(got.keys[&("pre-key".into(), "1".into())], b"v1", "the tombstone at the state's own sequence was replaced");
    assert_eq!(got.counts, BTreeMap::from([("pre-key".to_string(), 3)]));
}
