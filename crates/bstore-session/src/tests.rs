//! The actors' state machine against a real nats-server: hand-over on
//! eviction, lease loss, no-op writes confirmed by the log, idle stops.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bstore_cluster::{ClusterConfig, Ownership};
use bstore_codec::{Codec, Keyring};
use bstore_domain::{Command, Event, KeyChanges, KeyId, KeyType, Limits, SessionKey};
use bstore_log::{EventLog, LogConfig};
use bstore_testkit::NatsServer;
use bytes::Bytes;

use crate::{Op, Reply, Request, SessionConfig, SessionError, Sessions};

fn codec() -> Codec {
    Codec::new(Keyring::new(vec![(1, [7u8; 32])], None).unwrap())
}

async fn log(nats: &NatsServer) -> EventLog {
    let client = async_nats::connect(nats.url()).await.unwrap();
    EventLog::open(client, LogConfig::default(), codec()).await.unwrap()
}

fn sk(s: &str) -> SessionKey {
    SessionKey::parse("t", s).unwrap()
}

fn set(id: &str, v: &[u8]) -> Command {
    let mut keys = KeyChanges::new();
    keys.entry(KeyType::parse("session").unwrap()).or_default().insert(KeyId::parse(id).unwrap(), Some(Bytes::copy_from_slice(v)));
    Command::SetKeys { keys }
}

fn write(key: &SessionKey, cmd: Command, rid: &str) -> Request {
    Request { key: key.clone(), op: Op::Write { cmd, rid: Some(rid.into()) }, deadline: Instant::now() + Duration::from_secs(10) }
}

fn get(key: &SessionKey, id: &str) -> Request {
    Request {
        key: key.clone(),
        op: Op::GetKeys { ty: KeyType::parse("session").unwrap(), ids: vec![KeyId::parse(id).unwrap()] },
        deadline: Instant::now() + Duration::from_secs(10),
    }
}

fn value(reply: &Reply) -> Option<Vec<u8>> {
    match reply {
        Reply::Keys { values, .. } => values.first().map(|(_, v)| v.to_vec()),
        other => panic!("not a keys reply: {other:?}"),
    }
}

fn seq(reply: &Reply) -> u64 {
    match reply {
        Reply::Written { seq } => *seq,
        other => panic!("not a write reply: {other:?}"),
    }
}

fn run(f: impl std::future::Future<Output = ()>) {
    actix::System::new().block_on(f);
}

#[test]
fn an_evicted_session_hands_over_to_one_actor_in_order() {
    let nats = NatsServer::start();
    run(async {
        let cfg = SessionConfig { max_active: 1, ..Default::default() };
        let sessions = Sessions::start(log(&nats).await, Limits::default(), cfg);
        let (a, b) = (sk("a"), sk("b"));
        // Sixty writes to `a` sent at once, each followed by a read of `b`,
        // which evicts `a` (max_active = 1) while its writes are queued.
        let mut calls = Vec::new();
        for i in 0..60u8 {
            calls.push(sessions.call(write(&a, set(&format!("k{i}"), &[i]), &format!("r{i}"))));
            calls.push(sessions.call(get(&b, "x")));
        }
        let replies = futures_util::future::join_all(calls).await;
        let seqs: Vec<u64> = replies.iter().step_by(2).map(|r| seq(r.as_ref().unwrap())).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "writes applied out of order or on two actors: {seqs:?}");
        for i in 0..60u8 {
            let r = sessions.call(get(&a, &format!("k{i}"))).await.unwrap();
            assert_eq!(value(&r), Some(vec![i]), "acknowledged write k{i} hidden");
        }
        let info =
            sessions.call(Request { key: a.clone(), op: Op::Info, deadline: Instant::now() + Duration::from_secs(5) }).await.unwrap();
        let Reply::Info(info) = info else { panic!() };
        assert_eq!(info.seq, *seqs.last().unwrap(), "the session's sequence is its last acknowledged write's");
        assert!(sessions.active().await <= 2, "at most max_active actors, plus one handing over");
    });
}

#[test]
fn a_lost_lease_stops_serving_and_a_regained_one_reloads_from_the_log() {
    let nats = NatsServer::start();
    run(async {
        let cluster = ClusterConfig { partitions: 1, ..Default::default() };
        let ownership = Ownership::new(&cluster, "me");
        let forever = Instant::now() + Duration::from_secs(3600);
        ownership.grant(0, 1, forever);
        let shared = log(&nats).await;
        let sessions = Sessions::start_with(shared.clone(), None, ownership.clone(), Limits::default(), SessionConfig::default());
        let s = sk("owned");
        let first = seq(&sessions.call(write(&s, set("k", b"mine"), "r1")).await.unwrap());

        ownership.revoke(0);
        assert!(matches!(sessions.call(get(&s, "k")).await, Err(SessionError::NotOwner)), "no answer without the lease");
        // Meanwhile the next owner writes.
        let other = Event {
            v: 1,
            at_ms: 1,
            rid: None,
            prev: None,
            change: bstore_domain::Change::KeysChanged {
                keys: BTreeMap::from([(
                    KeyType::parse("session").unwrap(),
                    BTreeMap::from([(KeyId::parse("k").unwrap(), Some(Bytes::from_static(b"theirs")))]),
                )]),
                patched: Default::default(),
            },
        };
        shared.append(&s, first, &other).await.unwrap();

        ownership.grant(0, 2, forever);
        let r = sessions.call(get(&s, "k")).await.unwrap();
        assert_eq!(value(&r), Some(b"theirs".to_vec()), "a new epoch reloads: the state from before the loss is stale");
    });
}

#[test]
fn a_write_judged_unchanged_is_confirmed_against_the_log() {
    let nats = NatsServer::start();
    run(async {
        let shared = log(&nats).await;
        let sessions = Sessions::start(shared.clone(), Limits::default(), SessionConfig::default());
        let s = sk("noop");
        let first = seq(&sessions.call(write(&s, set("k", b"v1"), "r1")).await.unwrap());
        // Another writer (a second owner by mistake) changes the key.
        let mut st = crate::load::from_log(&shared, &s).await.unwrap();
        let ev = st.handle(set("k", b"v2"), &Limits::default(), 2, None).unwrap().unwrap();
        let second = shared.append(&s, first, &ev).await.unwrap().seq;
        st.apply(second, &ev).unwrap();
        // v1 again looks like "no change" to the actor's stale state.
        let third = seq(&sessions.call(write(&s, set("k", b"v1"), "r2")).await.unwrap());
        assert!(third > second, "acknowledged without an event although the log said v2 (seq {third})");
        assert_eq!(value(&sessions.call(get(&s, "k")).await.unwrap()), Some(b"v1".to_vec()));
        let again = seq(&sessions.call(write(&s, set("k", b"v1"), "r3")).await.unwrap());
        assert_eq!(again, third, "a true no-op writes nothing and answers the current seq");
        assert_eq!(shared.last_seq(&s).await.unwrap(), third);
        // A retry of r1 is answered with r1's own seq.
        assert_eq!(seq(&sessions.call(write(&s, set("k", b"v1"), "r1")).await.unwrap()), first);
    });
}

#[test]
fn an_idle_session_is_stopped_by_the_registry() {
    let nats = NatsServer::start();
    run(async {
        let cfg = SessionConfig { idle_timeout_secs: 1, ..Default::default() };
        let sessions = Sessions::start(log(&nats).await, Limits::default(), cfg);
        sessions.call(write(&sk("idle"), set("k", b"v"), "r1")).await.unwrap();
        assert_eq!(sessions.active().await, 1);
        let start = Instant::now();
        while sessions.active().await > 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "an idle actor was never stopped");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Nothing is lost by stopping: the next request loads it again.
        assert_eq!(value(&sessions.call(get(&sk("idle"), "k")).await.unwrap()), Some(b"v".to_vec()));
    });
}

/// A warm load — the Redis copy at the log's last event — and the load of a
/// new session replay nothing, so they make no JetStream consumer; a copy
/// behind the log makes one to read the tail.
#[test]
fn a_load_with_nothing_to_replay_makes_no_consumer() {
    let nats = NatsServer::start();
    let redis_server = bstore_testkit::RedisServer::start();
    run(async {
        let log = log(&nats).await;
        let redis =
            bstore_redis::RedisProjection::new(bstore_redis::RedisConfig { url: Some(redis_server.url()), ..Default::default() }, codec())
                .unwrap();
        let key = sk("warm");
        let mut state = bstore_domain::SessionState::default();
        let event = state.handle(set("k", b"v"), &Limits::default(), 1, None).unwrap().unwrap();
        let appended = log.append(&key, 0, &event).await.unwrap();
        state.apply(appended.seq, &event).unwrap();
        redis.write_snapshot(&key, &state, bstore_redis::SnapshotMode::Guarded).await.unwrap();

        let watcher = async_nats::connect(nats.url()).await.unwrap();
        let mut creates = watcher.subscribe("$JS.API.CONSUMER.CREATE.>").await.unwrap();
        watcher.flush().await.unwrap();
        let consumers_made = |creates: &mut async_nats::Subscriber| {
            let mut n = 0;
            while let Some(Some(_)) = futures_util::FutureExt::now_or_never(futures_util::StreamExt::next(creates)) {
                n += 1;
            }
            n
        };

        let warm = crate::load::load(&log, Some(&redis), &key).await.unwrap();
        assert_eq!(warm.state, state);
        assert_eq!(warm.source, crate::load::Source::Redis { tail: 0 });
        let new = crate::load::load(&log, Some(&redis), &sk("new")).await.unwrap();
        assert!(!new.state.exists());
        watcher.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(consumers_made(&mut creates), 0, "a load with nothing to replay made a consumer");

        // Control: one more event, the copy is behind, the tail is read.
        let event = state.handle(set("k", b"w"), &Limits::default(), 2, None).unwrap().unwrap();
        log.append(&key, appended.seq, &event).await.unwrap();
        let behind = crate::load::load(&log, Some(&redis), &key).await.unwrap();
        assert_eq!(behind.source, crate::load::Source::Redis { tail: 1 });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(consumers_made(&mut creates) >= 1, "the watcher sees the consumer the tail needs");
    });
}

fn claim(key: &SessionKey, id: Option<&str>) -> Request {
    Request { key: key.clone(), op: Op::Claim { claim: id.map(str::to_owned) }, deadline: Instant::now() + Duration::from_secs(10) }
}

/// A claim's lease never outlasts this instance's partition lease (another
/// instance, which knows no claim, could serve the session after it), and a
/// claim granted under one ownership epoch is not renewed under another.
#[test]
fn a_claim_ends_before_the_partition_lease_and_does_not_survive_another_epoch() {
    let nats = NatsServer::start();
    run(async {
        let cluster = ClusterConfig { partitions: 1, ..Default::default() };
        let ownership = Ownership::new(&cluster, "me");
        ownership.grant(0, 1, Instant::now() + Duration::from_millis(800));
        let sessions = Sessions::start_with(log(&nats).await, None, ownership.clone(), Limits::default(), SessionConfig::default());
        let s = sk("claimed");
        let Ok(Reply::Claim { claim: Some(id), lease_ms, wait_ms: 0, .. }) = sessions.call(claim(&s, None)).await else {
            panic!("no claim")
        };
        assert!(lease_ms > 0 && lease_ms <= 800, "a lease of {lease_ms} ms under a partition lease of 800 ms");
        // With a long partition lease the configured lease holds.
        ownership.grant(0, 1, Instant::now() + Duration::from_secs(3600));
        let Ok(Reply::Claim { lease_ms, .. }) = sessions.call(claim(&s, Some(&id))).await else { panic!("not renewed") };
        assert_eq!(lease_ms, SessionConfig::default().claim_lease_ms);
        // Lost and regained under another epoch: the session may have been served elsewhere meanwhile.
        ownership.revoke(0);
        ownership.grant(0, 2, Instant::now() + Duration::from_secs(3600));
        assert!(matches!(sessions.call(claim(&s, Some(&id))).await, Err(SessionError::Superseded)));
        // And nobody else gets in before the old claim's lease has run out.
        let waiting = sessions.call(claim(&s, None)).await;
        assert!(matches!(waiting, Ok(Reply::Claim { claim: None, wait_ms, .. }) if wait_ms > 0), "{waiting:?}");
        let held_off = sessions.call(write(&s, set("k", b"v"), "r1")).await;
        assert!(matches!(held_off, Err(SessionError::Claimed { wait_ms }) if wait_ms > 0), "{held_off:?}");
    });
}
