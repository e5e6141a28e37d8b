//! `rebuild mongo` from snapshots: a session with a long history is written
//! again from its newest snapshot plus the events after it — reading only
//! those — while the service goes on writing and materializing; under an
//! audit retention it starts from the base snapshot and needs no dropped
//! event; `--from-scratch` still reads every event kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bstore_api::client::{SessionClient, key_data};
use bstore_domain::{KeyId, KeyType, SessionKey};
use bstore_log::EventLog;
use bstore_mongo::mongodb::bson::{Binary, Document, doc, spec::BinarySubtype};
use bstore_mongo::{MongoConfig, Store};
use bstore_testkit::MongoServer;

use crate::harness::{KEY1, Stack, rid, service_bin};
use crate::projections::codec;

/// The environment of a service that materializes into `mongo` and
/// snapshots every `every` events.
fn mongo_env(mongo: &MongoServer, every: u64) -> Vec<(&'static str, String)> {
    vec![
        ("BSTORE_MONGO_URL", mongo.url()),
        ("BSTORE__MONGO__BATCH_WAIT", "0.05".into()),
        ("BSTORE__MONGO__RETRY_MAX", "0.5".into()),
        ("BSTORE__SESSIONS__SNAPSHOT_EVERY_EVENTS", every.to_string()),
    ]
}

/// A service with [`mongo_env`], `extra` environment on top.
async fn stack_with_mongo(mongo: &MongoServer, every: u64, extra: &[(&str, &str)]) -> Stack {
    let env = mongo_env(mongo, every);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Stack::start_with(&[&env[..], extra].concat()).await
}

fn tool_log(stack: &Stack) -> EventLog {
    EventLog::attach(async_nats::jetstream::new(stack.nc.clone()), Default::default(), codec())
}

async fn mongo_store(mongo: &MongoServer) -> Store {
    Store::connect(&MongoConfig { url: Some(mongo.url()), ..Default::default() }, codec()).await.unwrap()
}

/// `baileys-store <args>` against the stack's NATS and `mongo`: whether it
/// passed, its stdout, and both outputs for messages.
async fn tool(stack: &Stack, mongo: &MongoServer, args: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(service_bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("BSTORE") {
            cmd.env_remove(k);
        }
    }
    cmd.env("BSTORE_NATS_URL", stack.nats.url())
        .env("BSTORE_KEYS", KEY1)
        .env("BSTORE_MONGO_URL", mongo.url())
        .env("BSTORE_LOG", "warn")
        .env("NO_COLOR", "1")
        .env("BSTORE_DATA_DIR", stack.dir.path().join("tool"));
    let out = cmd.output().await.expect("running baileys-store");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout, all)
}

/// `rebuild mongo <args> --json`: its summary.
async fn rebuild_json(stack: &Stack, mongo: &MongoServer, args: &[&str]) -> serde_json::Value {
    let (ok, stdout, all) = tool(stack, mongo, &[&["rebuild", "mongo", "--json"], args].concat()).await;
    assert!(ok, "rebuild mongo failed:\n{all}");
    let line = stdout.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON summary:\n{all}"));
    serde_json::from_str(line).unwrap()
}

/// Runs `verify` until it passes; panics with its last output after `secs`.
async fn verify_eventually(stack: &Stack, mongo: &MongoServer, secs: u64) -> String {
    let start = Instant::now();
    loop {
        let (ok, _, out) = tool(stack, mongo, &["verify"]).await;
        if ok {
            return out;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "verify still finds differences after {secs} s:\n{out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `n` writes of the kinds a bot makes; returns the last sequence.
async fn traffic(client: &SessionClient, from: u64, n: u64) -> u64 {
    let mut last = 0;
    for i in from..from + n {
        last = match i % 4 {
            0 => client.creds_put(&rid(), format!("creds {i}").as_bytes()).await.unwrap(),
            1 => {
                let (id, value) = (i.to_string(), format!("pre-key {i}").into_bytes());
                client.keys_set(&rid(), &key_data([("pre-key", id.as_str(), Some(&value[..]))])).await.unwrap()
            }
            2 => {
                let old = (i - 1).to_string();
                client.keys_set(&rid(), &key_data([("pre-key", old.as_str(), None)])).await.unwrap()
            }
            _ => {
                let value = format!("session record after message {i}").into_bytes();
                client.keys_set(&rid(), &key_data([("session", "491511234.0", Some(&value[..]))])).await.unwrap()
            }
        };
    }
    last
}

/// The number of events of `key` the log holds after `after`.
async fn events_after(log: &EventLog, key: &SessionKey, after: u64) -> u64 {
    let mut n = 0;
    log.replay_checked(key, after, |_, _| n += 1).await.unwrap();
    n
}

/// Waits until the newest snapshot of `key` covers at least `seq`; returns
/// what it covers.
async fn snapshot_covering(log: &EventLog, key: &SessionKey, seq: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(covers) = log.stored_snapshots(key).await.unwrap().first().and_then(|s| s.covers)
            && covers >= seq
        {
            return covers;
        }
        assert!(Instant::now() < deadline, "no snapshot of {key} covering {seq}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes on `sessions` in turn until stopped: acknowledged writes counted,
/// the last sequence acknowledged on each kept.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl Writer {
    fn start(sessions: Vec<SessionClient>) -> Self {
        let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (st, ac) = (stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let mut last = vec![0; sessions.len()];
            let mut i = 0u64;
            while !st.load(Ordering::Relaxed) {
                let n = (i as usize) % sessions.len();
                let (id, v) = (format!("w{}", i % 5), format!("written during the rebuild {i}"));
                let seq = sessions[n].keys_set(&rid(), &key_data([("session", id.as_str(), Some(v.as_bytes()))])).await.unwrap();
                last[n] = seq;
                ac.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            last
        });
        Self { stop, acked, task }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    async fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_mongo_copy_is_rebuilt_from_the_snapshot_reading_only_the_tail_while_writes_go_on() {
    let mongo = MongoServer::start();
    let stack = stack_with_mongo(&mongo, 20, &[]).await;
    // A second instance: two materializers share the consumer throughout.
    let env = mongo_env(&mongo, 20);
    let _second = stack.another_service(&env.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>());
    let (long, other) = (stack.session("t", "long"), stack.session("t", "other"));
    let (key_long, key_other) = (SessionKey::parse("t", "long").unwrap(), SessionKey::parse("t", "other").unwrap());
    traffic(&long, 0, 130).await;
    traffic(&other, 0, 6).await;
    let log = tool_log(&stack);
    let covers = snapshot_covering(&log, &key_long, 100).await;
    verify_eventually(&stack, &mongo, 60).await;

    // Damage the session's documents: its session document gone, a key's
    // value replaced by junk under a sequence above anything in the log,
    // and a deleted pre-key brought back.
    let store = mongo_store(&mongo).await;
    let (sessions, keys) = (store.database().collection::<Document>("sessions"), store.database().collection::<Document>("keys"));
    assert_eq!(sessions.delete_one(doc! { "_id": "t.long" }).await.unwrap().deleted_count, 1);
    let record = store.key_doc_id(&key_long, &KeyType::parse("session").unwrap(), &KeyId::parse("491511234.0").unwrap());
    let junk = Binary { subtype: BinarySubtype::Generic, bytes: b"junk".to_vec() };
    let set = doc! { "$set": { "value": junk.clone(), "seq": 1_000_000_000_i64 } };
    assert_eq!(keys.update_one(doc! { "_id": record }, set).await.unwrap().matched_count, 1);
    let gone = store.key_doc_id(&key_long, &KeyType::parse("pre-key").unwrap(), &KeyId::parse("125").unwrap());
    let back = doc! { "$set": { "value": junk, "deleted": false }, "$unset": { "deleted_at": "" } };
    assert_eq!(keys.update_one(doc! { "_id": gone }, back).await.unwrap().matched_count, 1);
    let (ok, _, out) = tool(&stack, &mongo, &["verify"]).await;
    assert!(!ok && out.contains("DIFF mongo t/long"), "verify sees the damage:\n{out}");

    // What a rebuild from the snapshot has to read: the events after it.
    let snapshot_seq = log.stored_snapshots(&key_long).await.unwrap()[0].covers.unwrap();
    assert!(snapshot_seq >= covers);
    let (tail, other_events) = (events_after(&log, &key_long, snapshot_seq).await, events_after(&log, &key_other, 0).await);

    // Both sessions are written while the rebuild runs.
    let writer = Writer::start(vec![stack.session("t", "long"), stack.session("t", "other")]);
    while writer.acked() < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = writer.acked();
    let summary = rebuild_json(&stack, &mongo, &[]).await;
    let during = writer.acked() - before;
    let written = before + during;
    let last = writer.finish().await;

    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["sessions"], 2, "{summary}");
    assert!(summary["from_snapshot"].as_u64() >= Some(1), "the long session starts from its snapshot: {summary}");
    let read = summary["events_read"].as_u64().unwrap();
    // The tail, the short session's events and what the writer added (at
    // most one write in flight per session past the count).
    assert!(read <= tail + other_events + written + 2, "only the tail was read: {read} events, tail {tail}: {summary}");
    assert!(read < 130, "not the history: {summary}");
    let upto = summary["upto"].as_u64().unwrap();
    assert!(summary["resumed_after"].as_u64() >= Some(upto), "{summary}");
    assert!(during > 0, "writes went on during the rebuild");

    // Mongo equals the log's fold, the writes made meanwhile included.
    verify_eventually(&stack, &mongo, 60).await;
    let stored = store.read_session(&key_long).await.unwrap().expect("rebuilt");
    assert_eq!(stored.seq, last[0], "the last write to the long session is in mongo");
    assert!(!stored.keys.contains_key(&("pre-key".into(), "125".into())), "the deleted pre-key stays deleted");
    assert_eq!(stored.keys[&("session".into(), "491511234.0".into())], b"session record after message 127");
    assert_eq!(store.read_session(&key_other).await.unwrap().expect("rebuilt").seq, last[1]);

    // --from-scratch reads every event of both sessions.
    let all = events_after(&log, &key_long, 0).await + events_after(&log, &key_other, 0).await;
    let summary = rebuild_json(&stack, &mongo, &["--from-scratch"]).await;
    assert_eq!(summary["from_snapshot"], 0, "{summary}");
    assert_eq!(summary["events_read"].as_u64(), Some(all), "every event was read: {summary}");
    let out = verify_eventually(&stack, &mongo, 30).await;
    assert!(out.contains("verified 2 sessions against mongo: 0 differences"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_retention_mongo_is_rebuilt_from_the_base_snapshot_without_the_dropped_events() {
    let mongo = MongoServer::start();
    let stack = stack_with_mongo(&mongo, 10, &[("BSTORE__STREAM__RETENTION_SECS", "2")]).await;
    let client = stack.session("t", "old");
    let key = SessionKey::parse("t", "old").unwrap();
    client.keys_set(&rid(), &key_data([("pre-key", "keep-me", Some(&b"written long ago"[..]))])).await.unwrap();
    traffic(&client, 0, 24).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    traffic(&client, 100, 14).await;
    let log = tool_log(&stack);
    let deadline = Instant::now() + Duration::from_secs(20);
    let cut = loop {
        if let Some(cut) = log.refresh_data_key(&key).await.unwrap().cut {
            break cut;
        }
        assert!(Instant::now() < deadline, "no retention cut was recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Mongo lost, and the consumer with it: the service's materializer
    // makes it again from the first event left, so the state at the cut
    // — the old pre-key — is what only a rebuild can bring back.
    let store = mongo_store(&mongo).await;
    store.drop_all().await.unwrap();
    log.delete_durable(&MongoConfig::default().consumer).await.unwrap();
    let kept = events_after(&log, &key, 0).await;
    let summary = rebuild_json(&stack, &mongo, &[]).await;
    assert_eq!((summary["ok"].as_bool(), summary["sessions"].as_u64()), (Some(true), Some(1)), "{summary}");
    assert!(summary["events_read"].as_u64() < Some(kept), "from the newest snapshot: {summary}");
    verify_eventually(&stack, &mongo, 60).await;
    let stored = store.read_session(&key).await.unwrap().expect("rebuilt");
    assert_eq!(stored.keys[&("pre-key".into(), "keep-me".into())], b"written long ago", "the key only dropped events wrote");

    // From scratch: from the base snapshot at the cut, every event kept.
    store.drop_all().await.unwrap();
    let kept = events_after(&log, &key, 0).await;
    let summary = rebuild_json(&stack, &mongo, &["--from-scratch"]).await;
    assert_eq!(summary["events_read"].as_u64(), Some(kept), "every event after the cut ({cut}) and none before: {summary}");
    let out = verify_eventually(&stack, &mongo, 60).await;
    assert!(out.contains("0 differences"), "{out}");
    let stored = store.read_session(&key).await.unwrap().expect("rebuilt");
    assert_eq!(stored.keys[&("pre-key".into(), "keep-me".into())], b"written long ago");
}
