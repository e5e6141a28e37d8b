//! The projections under faults: Redis and Mongo stopped during a write
//! load, corrupt or foreign Redis copies, data at rest scanned for
//! plaintext, and the `verify` and `rebuild` commands run as the real binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bstore_api::client::{SessionClient, key_data};
use bstore_codec::{Codec, Keyring};
use bstore_domain::{SessionKey, SessionState};
use bstore_mongo::mongodb::bson::{Document, RawDocumentBuf, doc};
use bstore_mongo::{Materializer, MongoConfig, Store};
use bstore_redis::redis::{self, AsyncCommands};
use bstore_redis::{RedisConfig, RedisProjection, SnapshotMode};
use bstore_testkit::{MongoServer, RedisServer};

use crate::harness::{KEY1, Stack, rid, service_bin};

/// A service with Redis and/or Mongo configured, and the servers.
/// Fields drop in order: the service stops before the servers.
pub(crate) struct Projected {
    pub(crate) stack: Stack,
    redis: Option<RedisServer>,
    pub(crate) mongo: Option<MongoServer>,
}

/// Short intervals so that catch-up and batches happen within a test.
const FAST: [(&str, &str); 5] = [
    ("BSTORE__REDIS__TIMEOUT", "0.5"),
    ("BSTORE__REDIS__CATCH_UP_INTERVAL", "0.3"),
    ("BSTORE__MONGO__BATCH_WAIT", "0.05"),
    ("BSTORE__MONGO__RETRY_MAX", "0.5"),
    ("BSTORE__MONGO__LAG_LOG_INTERVAL", "1"),
];

impl Projected {
    /// `redis`: the service projects into a Redis; `mongo`: a Mongo server
    /// runs, and with `mongo_in_service` the service materializes into it.
    pub(crate) async fn start(redis: bool, mongo: bool, mongo_in_service: bool) -> Self {
        let redis = redis.then(RedisServer::start);
        let mongo = mongo.then(MongoServer::start);
        let mut env: Vec<(String, String)> = FAST.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if let Some(r) = &redis {
            env.push(("BSTORE_REDIS_URL".into(), r.url()));
        }
        if let (Some(m), true) = (&mongo, mongo_in_service) {
            env.push(("BSTORE_MONGO_URL".into(), m.url()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let stack = Stack::start_with(&env).await;
        Self { stack, redis, mongo }
    }

    pub(crate) fn session(&self, s: &str) -> SessionClient {
        // Generous: a cold start on a loaded 2-core machine can take seconds.
        self.stack.session("t", s).with_timeout(Duration::from_secs(10))
    }

    pub(crate) fn redis_projection(&self) -> RedisProjection {
        let url = self.redis.as_ref().expect("redis").url();
        RedisProjection::new(RedisConfig { url: Some(url), ..Default::default() }, codec()).unwrap()
    }

    pub(crate) async fn mongo_store(&self) -> Store {
        let cfg = MongoConfig { url: Some(self.mongo.as_ref().expect("mongo").url()), ..Default::default() };
        Store::connect(&cfg, codec()).await.unwrap()
    }

    /// Runs `baileys-store <args>` against this stack's servers; returns
    /// whether it succeeded and what it printed.
    pub(crate) async fn tool(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = tokio::process::Command::new(service_bin());
        cmd.args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("BSTORE") {
                cmd.env_remove(k);
            }
        }
        cmd.env("BSTORE_NATS_URL", self.stack.nats.url()).env("BSTORE_KEYS", KEY1).env("NO_COLOR", "1").env("BSTORE_LOG", "warn");
        cmd.env("BSTORE_DATA_DIR", self.stack.dir.path().join("tool"));
        if let Some(r) = &self.redis {
            cmd.env("BSTORE_REDIS_URL", r.url());
        }
        if let Some(m) = &self.mongo {
            cmd.env("BSTORE_MONGO_URL", m.url());
        }
        let out = cmd.output().await.expect("running baileys-store");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Runs `verify` until it passes; panics with its last output after
    /// `secs`.
    pub(crate) async fn verify_eventually(&self, secs: u64) -> String {
        let start = Instant::now();
        loop {
            let (ok, out) = self.tool(&["verify"]).await;
            if ok {
                return out;
            }
            assert!(start.elapsed() < Duration::from_secs(secs), "verify still finds differences after {secs} s:\n{out}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

pub(crate) fn codec() -> Codec {
    Codec::new(Keyring::new(Keyring::parse_entries(KEY1).unwrap(), None).unwrap())
}

pub(crate) fn sk(s: &str) -> SessionKey {
    SessionKey::parse("t", s).unwrap()
}

/// A write load on one session: sets `k<i>`, deletes `k<i-3>`, puts creds
/// every tenth write. Counts acknowledged and failed writes.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<u64>,
}

impl Load {
    /// `pause` between writes keeps the rate within what the slow test
    /// Mongo server absorbs.
    fn start(s: SessionClient, pause: Duration) -> Self {
        let (stop, acked, failed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (st, ac, fa) = (stop.clone(), acked.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            let mut last_seq = 0;
            while !st.load(Ordering::Relaxed) {
                let id = format!("k{i}");
                let old = format!("k{}", i.wrapping_sub(3));
                let v = i.to_be_bytes();
                let mut entries = vec![("session", id.as_str(), Some(&v[..]))];
                if i >= 3 {
                    entries.push(("session", old.as_str(), None));
                }
                let result = if i % 10 == 9 { s.creds_put(&rid(), &v).await } else { s.keys_set(&rid(), &key_data(entries)).await };
                match result {
                    Ok(seq) => {
                        last_seq = seq;
                        ac.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("write {i} failed: {e}");
                        fa.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            last_seq
        });
        Self { stop, acked, failed, task }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    async fn wait_for_acks(&self, n: u64) {
        let start = Instant::now();
        while self.acked() < n {
            assert!(start.elapsed() < Duration::from_secs(30), "the load stalled at {} writes", self.acked());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the load; returns (acknowledged, failed, last sequence).
    async fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let last = self.task.await.unwrap();
        (self.acked.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), last)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_during_writes_refuses_none_and_catches_up_after() {
    let mut p = Projected::start(true, false, false).await;
    let load = Load::start(p.session("r1"), Duration::ZERO);
    load.wait_for_acks(30).await;

    p.redis.as_mut().unwrap().stop();
    let during = load.acked();
    // A second session written only while Redis is down: no later write
    // carries its catch-up, the actor's timer must.
    let quiet = p.session("r2");
    for i in 0..3u8 {
        quiet.keys_set(&rid(), &key_data([("pre-key", "1", Some(&[i][..]))])).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let written_while_down = load.acked() - during;
    // Started again empty (no persistence), as after losing a cache node.
    p.redis.as_mut().unwrap().start_again();
    let after = load.acked();
    load.wait_for_acks(after + 20).await;
    let (acked, failed, last) = load.finish().await;

    assert_eq!(failed, 0, "a Redis outage must not fail a write");
    assert!(written_while_down >= 10, "writes went on while Redis was down ({written_while_down})");
    assert!(acked > 60);
    let out = p.verify_eventually(20).await;
    assert!(out.contains("0 differences"), "{out}");
    assert_eq!(p.redis_projection().stored_seq(&sk("r1")).await.unwrap(), Some(last));
    // Acknowledged writes are all there.
    let s = p.session("r1");
    let creds = s.creds_get().await.unwrap().expect("creds");
    assert_eq!(creds.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_stopped_during_writes_lags_then_catches_up_without_duplicates_or_resurrections() {
    let mut p = Projected::start(false, true, false).await;
    let cfg = MongoConfig {
        url: Some(p.mongo.as_ref().unwrap().url()),
        batch_wait: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let store = Store::connect(&cfg, codec()).await.unwrap();
    let m = Materializer::new(p.stack.nc.clone(), Default::default(), cfg, store, codec());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(m.clone().run(async {
        let _ = stop_rx.await;
    }));

    // A session deleted and written again, before and during the outage.
    let other = p.session("m2");
    other.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"a"[..])), ("pre-key", "2", Some(&b"b"[..]))])).await.unwrap();
    let load = Load::start(p.session("m1"), Duration::from_millis(15));
    load.wait_for_acks(30).await;
    // Keeping up with the load (it rarely reads exactly 0 while writes go on).
    wait_lag_below(&m, 30, 60).await;

    p.mongo.as_mut().unwrap().stop();
    other.delete(&rid()).await.unwrap();
    other.keys_set(&rid(), &key_data([("pre-key", "3", Some(&b"c"[..]))])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lag1 = m.lag().await.unwrap().events();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let lag2 = m.lag().await.unwrap().events();
    assert!(lag1 > 0 && lag2 > lag1, "the lag grows while Mongo is down: {lag1} then {lag2}");

    p.mongo.as_mut().unwrap().start_again();
    let after = load.acked();
    load.wait_for_acks(after + 20).await;
    let (_, failed, _) = load.finish().await;
    assert_eq!(failed, 0, "a Mongo outage must not fail a write");
    wait_lag_below(&m, 1, 60).await;

    let out = p.verify_eventually(20).await;
    assert!(out.contains("0 differences"), "{out}");
    let store = p.mongo_store().await;
    let m2 = store.read_session(&sk("m2")).await.unwrap().unwrap();
    assert_eq!(m2.keys.keys().cloned().collect::<Vec<_>>(), vec![("pre-key".to_string(), "3".to_string())], "deleted keys stay deleted");
    assert_eq!(m2.tombstones, 2);
    let _ = stop_tx.send(());
    runner.await.unwrap();
}

pub(crate) async fn wait_lag_below(m: &Materializer, below: u64, secs: u64) {
    let start = Instant::now();
    loop {
        let lag = m.lag().await.unwrap();
        if lag.events() < below {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "the materializer did not catch up: {lag:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_corrupt_foreign_or_ahead_redis_copy_is_ignored_logged_and_repaired() {
    let mut p = Projected::start(true, false, false).await;
    let (a, b) = (p.session("a"), p.session("b"));
    a.creds_put(&rid(), b"creds-a").await.unwrap();
    let last_a =
        a.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"value-a"[..])), ("pre-key", "2", Some(&b"two"[..]))])).await.unwrap();
    let last_b = b.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"value-b"[..]))])).await.unwrap();
    let proj = p.redis_projection();
    wait_stored(&proj, "a", last_a).await;
    wait_stored(&proj, "b", last_b).await;
    let mut conn = proj.connection();
    let (ty, id) = (bstore_domain::KeyType::parse("pre-key").unwrap(), bstore_domain::KeyId::parse("1").unwrap());
    let (field, field_b) = (proj.field(&sk("a"), &ty, &id), proj.field(&sk("b"), &ty, &id));
    let (key_a, key_b) = (proj.key(&sk("a")), proj.key(&sk("b")));

    // What is done to a's copy, the warning the load logs, and how many
    // such warnings the service's log holds by then.
    let tamperings = [
        ("corrupt", "ignoring the unreadable redis copy", 1),
        ("foreign", "ignoring the unreadable redis copy", 2),
        ("ahead", "ahead of the log", 1),
    ];
    for (n, (how, warning, times)) in tamperings.into_iter().enumerate() {
        match how {
            "corrupt" => conn.hset::<_, _, _, ()>(&key_a, &field, b"\xb5\x01garbage-that-is-not-a-sealed-blob".as_slice()).await.unwrap(),
            "foreign" => {
                let theirs: Vec<u8> = conn.hget(&key_b, &field_b).await.unwrap();
                conn.hset::<_, _, _, ()>(&key_a, &field, theirs).await.unwrap()
            }
            // A copy that is authentic but ahead of the log (a restored
            // backup, data lost under the log): moving `seq` alone would
            // only make it untrusted.
            _ => {
                let copy = proj.load(&sk("a")).await.unwrap().unwrap();
                let keys = copy.iter_keys().map(|(t, i, v)| (t.clone(), i.clone(), v.clone()));
                let ahead = SessionState::from_parts(last_a + 1000, copy.creds().cloned(), keys, copy.updated_at_ms(), copy.events());
                proj.write_snapshot(&sk("a"), &ahead, SnapshotMode::Replace).await.unwrap();
            }
        }
        let (ok, out) = p.tool(&["verify", "--tenant", "t", "--session", "a"]).await;
        assert!(!ok && out.contains("DIFF redis t/a"), "verify sees the {how} copy:\n{out}");

        // A new process loads the session cold.
        p.stack.service.restart();
        let got = a
            .keys_get("pre-key", &["1"])
            .await
            .unwrap_or_else(|e| panic!("{how}: reading after the restart: {e:?}\n{}", p.stack.service.log_text()));
        assert_eq!(got["1"], b"value-a", "{how}: the log's value");
        assert_eq!(a.creds_get().await.unwrap().as_deref(), Some(&b"creds-a"[..]));
        let log = p.stack.service.log_text();
        assert_eq!(log.lines().filter(|l| l.contains(warning) && l.contains("WARN")).count(), times, "{how}: one warning per load:\n{log}");
        let start = Instant::now();
        loop {
            let (ok, out) = p.tool(&["verify", "--tenant", "t", "--session", "a"]).await;
            if ok {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{how} copy not repaired (round {n}):\n{out}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(proj.load(&sk("a")).await.unwrap().unwrap().seq(), last_a);
    }
    // Session b was never touched.
    assert_eq!(b.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"value-b");
}

pub(crate) async fn wait_stored(proj: &RedisProjection, s: &str, seq: u64) {
    let start = Instant::now();
    while proj.stored_seq(&sk(s)).await.unwrap() != Some(seq) {
        assert!(start.elapsed() < Duration::from_secs(10), "redis copy of {s} never reached {seq}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_written_through_the_api_is_readable_in_clear_anywhere() {
    let p = Projected::start(true, true, true).await;
    let marker: Vec<u8> = format!("CLEAR-{}", rid()).into_bytes();
    let s = p.session("plain");
    s.creds_put(&rid(), &marker).await.unwrap();
    let last = s
        .keys_set(&rid(), &key_data([("pre-key", "1", Some(&marker[..])), ("session", "x.0", Some(&marker.repeat(40)[..]))]))
        .await
        .unwrap();
    wait_stored(&p.redis_projection(), "plain", last).await;
    let js = async_nats::jetstream::new(p.stack.nc.clone());
    let start = Instant::now();
    while bstore_mongo::lag(&js, "BSTORE_EVENTS", "bstore-mongo").await.unwrap().events() > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the materializer inside serve did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p.mongo_store().await.read_session(&sk("plain")).await.unwrap().unwrap().creds.as_deref(), Some(&marker[..]));

    // Each scanner must find a control value written in clear, or finding
    // nothing below would prove nothing. (Another value than the marker:
    // the Mongo server's own oplog keeps what was once written.)
    let control: Vec<u8> = format!("CONTROL-{}", rid()).into_bytes();
    let mut conn = p.redis_projection().connection();
    conn.set::<_, _, ()>("control", &control).await.unwrap();
    assert!(redis_holds(&mut conn, &control).await, "the Redis scanner finds plaintext");
    conn.del::<_, ()>("control").await.unwrap();
    let client = p.mongo_store().await.database().client().clone();
    let binary =
        bstore_mongo::mongodb::bson::Binary { subtype: bstore_mongo::mongodb::bson::spec::BinarySubtype::Generic, bytes: control.clone() };
    client.database("control").collection::<Document>("c").insert_one(doc! { "v": binary }).await.unwrap();
    assert!(mongo_holds(&client, &control).await, "the Mongo scanner finds plaintext");
    client.database("control").drop().await.unwrap();
    let control_file = p.stack.nats.store_dir().join("control");
    std::fs::write(&control_file, &control).unwrap();
    assert!(files_hold(&p.stack.nats.store_dir(), &control), "the file scanner finds plaintext");
    std::fs::remove_file(control_file).unwrap();

    assert!(!redis_holds(&mut conn, &marker).await, "plaintext in Redis");
    assert!(!mongo_holds(&client, &marker).await, "plaintext in Mongo");
    assert!(!files_hold(&p.stack.nats.store_dir(), &marker), "plaintext in the JetStream store");
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every key, and every field and value of every hash or string, in Redis.
async fn redis_holds(conn: &mut redis::aio::ConnectionManager, needle: &[u8]) -> bool {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query_async(conn).await.unwrap();
    for key in keys {
        if contains(&key, needle) {
            return true;
        }
        let ty: String = redis::cmd("TYPE").arg(&key).query_async(conn).await.unwrap();
        let blobs: Vec<Vec<u8>> = match ty.as_str() {
            "hash" => conn.hgetall::<_, Vec<(Vec<u8>, Vec<u8>)>>(&key).await.unwrap().into_iter().flat_map(|(f, v)| [f, v]).collect(),
            "string" => vec![conn.get(&key).await.unwrap()],
            other => panic!("unexpected Redis type {other}"),
        };
        if blobs.iter().any(|b| contains(b, needle)) {
            return true;
        }
    }
    false
}

/// Every document of every collection of every database, as BSON bytes.
pub(crate) async fn mongo_holds(client: &bstore_mongo::mongodb::Client, needle: &[u8]) -> bool {
    use futures_util::TryStreamExt;
    for db in client.list_database_names().await.unwrap() {
        let db = client.database(&db);
        for coll in db.list_collection_names().await.unwrap() {
            let docs: Vec<RawDocumentBuf> =
                db.collection::<RawDocumentBuf>(&coll).find(doc! {}).await.unwrap().try_collect().await.unwrap();
            if docs.iter().any(|d| contains(d.as_bytes(), needle)) {
                return true;
            }
        }
    }
    false
}

fn files_hold(dir: &std::path::Path, needle: &[u8]) -> bool {
    let mut found = false;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        found |=
            if path.is_dir() { files_hold(&path, needle) } else { std::fs::read(&path).map(|b| contains(&b, needle)).unwrap_or(false) };
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_tampering_and_rebuild_repairs_both_projections() {
    let p = Projected::start(true, true, true).await;
    let s = p.session("v");
    s.creds_put(&rid(), b"c").await.unwrap();
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"a"[..])), ("pre-key", "2", Some(&b"b"[..]))])).await.unwrap();
    let last = s.keys_set(&rid(), &key_data([("pre-key", "1", None)])).await.unwrap();
    wait_stored(&p.redis_projection(), "v", last).await;
    p.verify_eventually(30).await;
    // The materializer inside the service reports in $SRV.STATS.
    let stats = p.stack.nc.request("$SRV.STATS.baileys-store", "".into()).await.unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    let m = &stats["endpoints"][0]["data"]["materializer"];
    assert!(m["applied_seq"].as_u64().unwrap() >= last, "{m}");
    assert_eq!(m["quarantined_events"], 0, "{m}");

    // Tamper with both: a key gone from Redis, a session moved back in Mongo.
    let proj = p.redis_projection();
    let (ty, id) = (bstore_domain::KeyType::parse("pre-key").unwrap(), bstore_domain::KeyId::parse("2").unwrap());
    proj.connection().hdel::<_, _, ()>(proj.key(&sk("v")), proj.field(&sk("v"), &ty, &id)).await.unwrap();
    let store = p.mongo_store().await;
    store.database().collection::<Document>("sessions").update_one(doc! { "_id": "t.v" }, doc! { "$set": { "seq": 1_i64 } }).await.unwrap();
    let (ok, out) = p.tool(&["verify"]).await;
    assert!(!ok, "verify must fail:\n{out}");
    assert!(out.contains("DIFF redis t/v: the redis copy of t/v is unreadable: entries: 1 in the hash, 2 in its manifest"), "{out}");
    assert!(out.contains("DIFF mongo t/v: at sequence 1"), "{out}");
    assert!(out.contains("2 differences"), "{out}");

    let (ok, out) = p.tool(&["rebuild", "redis"]).await;
    assert!(ok, "{out}");
    let (ok, out) = p.tool(&["rebuild", "mongo"]).await;
    assert!(ok, "{out}");
    let out = p.verify_eventually(30).await;
    assert!(out.contains("verified 1 sessions against redis and mongo: 0 differences"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patched_values_reach_redis_and_mongo_whole_even_when_mongo_lost_the_base() {
    let p = Projected::start(true, true, true).await;
    let s = p.session("patched");
    let id = "g@g.us::u::0";
    for n in 800..806 {
        s.keys_set(&rid(), &key_data([("sender-key", id, Some(&crate::deltas::sender_key_record(n)[..]))])).await.unwrap();
    }
    let out = p.verify_eventually(30).await;
    assert!(out.contains("0 differences"), "{out}");

    // Mongo loses the key's document; the next patch must be materialized
    // from the log instead.
    let store = p.mongo_store().await;
    let keys = store.database().collection::<Document>("keys");
    let ty = bstore_domain::KeyType::parse("sender-key").unwrap();
    let doc_id = store.key_doc_id(&sk("patched"), &ty, &bstore_domain::KeyId::parse(id).unwrap());
    let gone = keys.delete_one(doc! { "_id": doc_id }).await.unwrap();
    assert_eq!(gone.deleted_count, 1);
    s.keys_set(&rid(), &key_data([("sender-key", id, Some(&crate::deltas::sender_key_record(806)[..]))])).await.unwrap();
    let out = p.verify_eventually(30).await;
    assert!(out.contains("0 differences"), "{out}");
    assert!(p.stack.service.log_text().contains("patch base not in mongo"), "the fallback was taken");
    let stored = store.read_session(&sk("patched")).await.unwrap().unwrap();
    assert_eq!(stored.keys[&("sender-key".to_string(), id.to_string())], crate::deltas::sender_key_record(806));
}
