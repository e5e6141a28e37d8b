//! Snapshots in the log: a session with a long history loads from its
//! latest snapshot plus the events after it, and equals the state replayed
//! from scratch; a snapshot that is corrupt, foreign or erased is never
//! believed.

use std::time::{Duration, Instant};

use bstore_api::client::key_data;
use bstore_codec::{Codec, Keyring};
use bstore_domain::SessionKey;
use bstore_log::{EventLog, LogConfig};
use bstore_session::load::{Source, from_log, from_snapshots};

use crate::harness::{KEY1, Stack, rid, service_bin};

fn tool_log(stack: &Stack) -> EventLog {
    let ring = Keyring::parse_entries(KEY1).unwrap();
    EventLog::attach(async_nats::jetstream::new(stack.nc.clone()), LogConfig::default(), Codec::new(Keyring::new(ring, None).unwrap()))
}

/// A service that snapshots every `every` events.
async fn stack_snapshotting_every(every: u64) -> Stack {
    Stack::start_with(&[("BSTORE__SESSIONS__SNAPSHOT_EVERY_EVENTS", &every.to_string())]).await
}

/// `n` writes of the kinds a bot makes: pre-keys uploaded and consumed,
/// Signal sessions rewritten, creds saved now and then.
async fn traffic(client: &bstore_api::client::SessionClient, n: u64) -> u64 {
    let mut last = 0;
    for i in 0..n {
        last = match i % 4 {
            0 => client.creds_put(&rid(), format!("creds {i}").as_bytes()).await.unwrap(),
            1 => {
                let id = i.to_string();
                let value = format!("pre-key {i}").into_bytes();
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

/// Waits until the newest snapshot of `key` covers at least `seq`; returns
/// what it covers.
async fn newest_snapshot_covering(log: &EventLog, key: &SessionKey, seq: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stored = log.stored_snapshots(key).await.unwrap();
        if let Some(covers) = stored.first().and_then(|s| s.covers)
            && covers >= seq
        {
            return covers;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot of {key} covering {seq}: {:?}",
            stored.iter().map(|s| s.covers).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_long_history_loads_from_its_latest_snapshot_plus_the_tail_and_equals_a_full_replay() {
    let mut stack = stack_snapshotting_every(40).await;
    let client = stack.session("t", "long");
    let key = SessionKey::parse("t", "long").unwrap();
    let last = traffic(&client, 130).await;

    let log = tool_log(&stack);
    let covers = newest_snapshot_covering(&log, &key, 100).await;
    assert!(covers < last, "the last events are after the newest snapshot (covers {covers}, last {last})");
    let stored = log.stored_snapshots(&key).await.unwrap();
    assert_eq!(stored.len(), 2, "the newest snapshot and the one before it are kept");

    let (state, source) = from_snapshots(&log, &key).await.unwrap();
    let Source::Snapshot { seq, tail } = source else { panic!("loaded from {source:?}, not a snapshot") };
    assert_eq!(seq, covers);
    assert!((1..40).contains(&tail), "only the events after the snapshot were replayed: {tail}");
    let replayed = from_log(&log, &key).await.unwrap();
    assert_eq!(state, replayed, "snapshot + tail equals the state replayed from scratch");
    assert_eq!(state.seq(), last);

    // The service, started again, loads the session the same way.
    stack.service.restart();
    assert_eq!(client.creds_get().await.unwrap().as_deref(), Some(&b"creds 128"[..]));
    let session = client.keys_get("session", &["491511234.0"]).await.unwrap();
    assert_eq!(session["491511234.0"], b"session record after message 127");
    let pre_keys = client.keys_get("pre-key", &["125", "126", "129"]).await.unwrap();
    assert_eq!(pre_keys.keys().collect::<Vec<_>>(), vec!["129"], "deleted pre-keys stay deleted: {pre_keys:?}");
    // `verify` checks it from the snapshot on, or every event with --from-scratch.
    let (ok, out) = verify(&stack, &["--tenant", "t", "--session", "long", "--json"]);
    let report: serde_json::Value = serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap_or("{}")).unwrap();
    let checked = report["sessions"][0]["events"].as_u64().unwrap_or(u64::MAX);
    assert!(ok && checked < 40, "from the snapshot on, only the tail is read ({checked} events):\n{out}");
    let (ok, out) = verify(&stack, &["--tenant", "t", "--session", "long", "--json", "--from-scratch"]);
    let report: serde_json::Value = serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap_or("{}")).unwrap();
    assert!(ok && report["sessions"][0]["events"].as_u64() == Some(130), "every event read:\n{out}");
    let log_text = stack.service.log_text();
    let loaded = log_text.lines().rev().find(|l| l.contains("session loaded") && l.contains("t/long")).unwrap_or_default();
    assert!(loaded.contains("Snapshot"), "the service loaded from a snapshot: {loaded}");
}

#[tokio::test]
async fn corrupt_and_foreign_snapshots_are_refused_and_the_load_falls_back_to_an_older_one_then_the_log() {
    let mut stack = stack_snapshotting_every(20).await;
    let (a, b) = (stack.session("t", "a"), stack.session("t", "b"));
    let (key_a, key_b) = (SessionKey::parse("t", "a").unwrap(), SessionKey::parse("t", "b").unwrap());
    let last_a = traffic(&a, 50).await;
    traffic(&b, 30).await;
    let log = tool_log(&stack);
    let covers_a = newest_snapshot_covering(&log, &key_a, 40).await;
    newest_snapshot_covering(&log, &key_b, 20).await;
    let replayed = from_log(&log, &key_a).await.unwrap();

    // Bytes that are no snapshot at all take the newest place (the stream
    // keeps two per session, so the oldest goes): the genuine snapshot
    // before them is used.
    let js = async_nats::jetstream::new(stack.nc.clone());
    let subject_a = log.snapshot_subject(&key_a);
    js.publish(subject_a.clone(), b"not a snapshot".as_slice().into()).await.unwrap().await.unwrap();
    let skipped = bstore_log::skipped_snapshots();
    let (state, source) = from_snapshots(&log, &key_a).await.unwrap();
    let mut after_older = 0;
    log.replay(&key_a, covers_a, |_, _| after_older += 1).await.unwrap();
    assert!(after_older > 0);
    assert_eq!(source, Source::Snapshot { seq: covers_a, tail: after_older });
    assert_eq!(state.seq(), last_a);
    assert_eq!(state, replayed);
    assert!(bstore_log::skipped_snapshots() > skipped, "the corrupt snapshot was counted");

    // b's genuine snapshots, copied onto a's subject, fill both places: they
    // do not open as a's state, and the whole log is replayed.
    for snap in log.stored_snapshots(&key_b).await.unwrap() {
        js.publish(subject_a.clone(), snap.payload).await.unwrap().await.unwrap();
    }
    assert!(log.snapshots(&key_a).await.unwrap().is_empty(), "no snapshot of a is believed");
    let (state, source) = from_snapshots(&log, &key_a).await.unwrap();
    assert!(matches!(source, Source::Log { .. }), "{source:?}");
    assert_eq!(state, replayed);

    // The service falls back the same way and serves a's own state.
    stack.service.restart();
    assert_eq!(a.creds_get().await.unwrap().as_deref(), Some(&b"creds 48"[..]));
    assert!(stack.service.log_text().contains("skipping a snapshot"), "the refusal is logged");

    // `verify` names the session whose snapshots do not hold, and passes b.
    let (ok, out) = verify(&stack, &[]);
    assert!(!ok, "verify must fail:\n{out}");
    assert!(out.contains("DIFF snapshot t/a") && out.contains("does not open as this session's state"), "{out}");
    assert!(!out.contains("DIFF snapshot t/b"), "b's snapshots are sound:\n{out}");
    let (ok, out) = verify(&stack, &["--tenant", "t", "--session", "b"]);
    assert!(ok, "b verifies:\n{out}");
    let (ok, out) = verify(&stack, &["--tenant", "t", "--session", "b", "--from-scratch"]);
    assert!(ok, "b verifies from its first event, its snapshots equal to the events up to them:\n{out}");
}

/// `baileys-store verify <args>`: whether it passed, and what it printed.
fn verify(stack: &Stack, args: &[&str]) -> (bool, String) {
    let (ok, out, err) = tool(&stack.nats.url(), &stack.dir, KEY1, &[&["verify"], args].concat(), &[]);
    (ok, format!("{out}{err}"))
}

/// `baileys-store <args>` with `keys` (and `env`) against the server at
/// `url`: whether it passed, its stdout and its stderr.
fn tool(url: &str, dir: &bstore_testkit::TempDir, keys: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(service_bin())
        .args(args)
        .env("BSTORE_NATS_URL", url)
        .env("BSTORE_KEYS", keys)
        .env("BSTORE_DATA_DIR", dir.path().join("tool"))
        .env("BSTORE_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn an_erasure_removes_the_sessions_snapshots() {
    let stack = stack_snapshotting_every(5).await;
    let a = stack.session("t", "a");
    let key = SessionKey::parse("t", "a").unwrap();
    traffic(&a, 12).await;
    let log = tool_log(&stack);
    newest_snapshot_covering(&log, &key, 5).await;

    let (ok, _, err) = tool(&stack.nats.url(), &stack.dir, KEY1, &["erase", "--tenant", "t", "--session", "a", "--yes"], &[]);
    assert!(ok, "{err}");
    assert!(log.stored_snapshots(&key).await.unwrap().is_empty(), "no snapshot of the erased session is left");
    let (state, _) = from_snapshots(&log, &key).await.unwrap();
    assert!(!state.exists(), "the erased session loads empty");
}

#[tokio::test]
async fn a_retention_drops_only_events_a_base_snapshot_stands_for_and_history_lists_what_it_keeps() {
    let mut stack = Stack::start_with(&[("BSTORE__SESSIONS__SNAPSHOT_EVERY_EVENTS", "10"), ("BSTORE__STREAM__RETENTION_SECS", "2")]).await;
    let client = stack.session("t", "old");
    let key = SessionKey::parse("t", "old").unwrap();
    // An old batch: a pre-key that is never touched again, and traffic.
    client.keys_set(&rid(), &key_data([("pre-key", "keep-me", Some(&b"written long ago"[..]))])).await.unwrap();
    let last_old = traffic(&client, 24).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    // New traffic: its snapshots run the retention, whose cutoff now lies
    // after the old batch.
    let first_new = client.keys_set(&rid(), &key_data([("session", "new-peer.0", Some(&b"new"[..]))])).await.unwrap();
    let last = traffic(&client, 14).await;

    let log = tool_log(&stack);
    let deadline = Instant::now() + Duration::from_secs(15);
    let cut = loop {
        if let Some(cut) = log.refresh_data_key(&key).await.unwrap().cut {
            break cut;
        }
        assert!(Instant::now() < deadline, "no retention cut was recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(cut <= last_old, "only events older than the retention are dropped (cut {cut}, last old event {last_old})");
    assert!(cut > 0);

    // The stream holds nothing of the session through the cut, and every
    // event after it.
    let js = async_nats::jetstream::new(stack.nc.clone());
    let events = js.get_stream("BSTORE_EVENTS").await.unwrap();
    let first = events.direct_get_first_for_subject(log.subject(&key)).await.unwrap().sequence;
    assert_eq!(first, cut + 1, "the purge removed exactly the events through the cut");
    let mut kept = Vec::new();
    log.replay(&key, 0, |seq, _| kept.push(seq)).await.unwrap();
    assert_eq!(kept.first(), Some(&(cut + 1)));
    assert_eq!(kept.last(), Some(&last));
    assert!(kept.contains(&first_new));

    // The state is whole: from the base snapshot on, the old pre-key is there.
    let (state, _) = from_snapshots(&log, &key).await.unwrap();
    let from_start = from_log(&log, &key).await.unwrap();
    assert_eq!(state, from_start, "a fold from the start begins at the base snapshot");
    stack.service.restart();
    let got = client.keys_get("pre-key", &["keep-me"]).await.unwrap();
    assert_eq!(got["keep-me"], b"written long ago", "a key only the dropped events wrote is still served");

    // `history` says where it starts and lists exactly what is kept.
    let lines = crate::harness::history(&stack.nats.url(), "t", "old");
    assert_eq!(lines[0]["retained_from_seq"], cut + 1, "{:?}", lines[0]);
    let listed: Vec<u64> = lines.iter().filter_map(|l| l["seq"].as_u64()).collect();
    assert_eq!(listed, kept);
    // That tool ran without the retention setting and left the stream as
    // it was made: purges allowed, for the retention.
    let config = js.get_stream("BSTORE_EVENTS").await.unwrap().info().await.unwrap().config.clone();
    assert!(!config.deny_purge && config.deny_delete, "a process without the setting does not deny purges for good");
}

#[tokio::test]
async fn a_retention_cannot_be_set_on_a_log_made_to_deny_purges() {
    let stack = Stack::start().await;
    stack.session("t", "a").creds_put(&rid(), b"creds").await.unwrap();
    let history = ["history", "--tenant", "t", "--session", "a"];
    let (ok, _, err) = tool(&stack.nats.url(), &stack.dir, KEY1, &history, &[("BSTORE__STREAM__RETENTION_SECS", "60")]);
    assert!(!ok && err.contains("denies purges"), "{err}");
    // And nothing about the stream changed: purges are still refused.
    let js = async_nats::jetstream::new(stack.nc.clone());
    let events = js.get_stream("BSTORE_EVENTS").await.unwrap();
    assert!(events.purge().filter("bstore-events.t.a").await.is_err(), "the history still cannot be purged");
}

#[tokio::test]
async fn a_rotation_reseals_snapshots_left_under_the_old_ring_key() {
    use async_nats::jetstream::kv;
    use bstore_codec::{SealedUnder, sealed_under};

    // A cluster upgraded from a release before data keys: its record names
    // key 1 and says nothing of data keys, so everything seals under the ring.
    let nats = bstore_testkit::NatsServer::start();
    let nc = crate::harness::connect(&nats.url()).await;
    let js = async_nats::jetstream::new(nc.clone());
    let meta = js.create_key_value(kv::Config { bucket: "BSTORE_META".into(), history: 16, ..Default::default() }).await.unwrap();
    meta.put("seal.current", br#"{"id":1,"at_ms":0,"by":"an earlier release"}"#.as_slice().into()).await.unwrap();
    let both = format!("{KEY1},{}", crate::harness::KEY2);
    let dir = bstore_testkit::TempDir::new("it");
    let _service = crate::harness::start_service(&nats, &dir, &[("BSTORE_KEYS", &both), ("BSTORE__SESSIONS__SNAPSHOT_EVERY_EVENTS", "5")]);
    let client = bstore_api::client::SessionClient::new(nc.clone(), "bstore", "t", "old");
    let key = SessionKey::parse("t", "old").unwrap();
    traffic(&client, 12).await;
    let codec = Codec::new(Keyring::new(Keyring::parse_entries(&both).unwrap(), None).unwrap());
    let log = EventLog::attach(js.clone(), LogConfig::default(), codec);
    newest_snapshot_covering(&log, &key, 10).await;
    let under = |stored: &[bstore_log::StoredSnapshot]| stored.iter().map(|s| sealed_under(&s.payload)).collect::<Vec<_>>();
    let before = log.stored_snapshots(&key).await.unwrap();
    assert!(under(&before).iter().all(|u| *u == Some(SealedUnder::Ring(1))), "sealed under key 1: {:?}", under(&before));

    let (ok, said, err) = tool(&nats.url(), &dir, &both, &["rotate-key", "2"], &[]);
    assert!(ok, "rotate-key failed:\n{said}\n{err}");
    assert!(said.contains("re-sealed 2 snapshots under key 2"), "{said}");
    let after = log.stored_snapshots(&key).await.unwrap();
    assert!(under(&after).iter().all(|u| *u == Some(SealedUnder::Ring(2))), "sealed under key 2 now: {:?}", under(&after));
    let covers = |stored: &[bstore_log::StoredSnapshot]| stored.iter().map(|s| s.covers).collect::<Vec<_>>();
    assert_eq!(covers(&after), covers(&before), "the same two snapshots, newest first");
    let (state, source) = from_snapshots(&log, &key).await.unwrap();
    assert!(matches!(source, Source::Snapshot { .. }), "{source:?}");
    assert_eq!(state, from_log(&log, &key).await.unwrap());
}

/// Counts the requests that create a consumer of the event stream, made by
/// anyone on the server (the service's included), from now on.
async fn count_event_consumers_made(nc: &async_nats::Client) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    use futures_util::StreamExt;
    let made = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut requests = nc.subscribe("$JS.API.CONSUMER.>").await.unwrap();
    nc.flush().await.unwrap();
    let counter = made.clone();
    tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            if m.subject.contains("CREATE") && m.subject.contains(".BSTORE_EVENTS") {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    made
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_load_from_a_current_redis_copy_makes_no_consumer_of_the_event_stream() {
    use bstore_redis::{RedisConfig, RedisProjection};
    use std::sync::atomic::Ordering;

    let redis = bstore_testkit::RedisServer::start();
    let mut stack = Stack::start_with(&[("BSTORE_REDIS_URL", &redis.url())]).await;
    let client = stack.session("t", "warm");
    let key = SessionKey::parse("t", "warm").unwrap();
    let last = traffic(&client, 12).await;
    let ring = Keyring::parse_entries(KEY1).unwrap();
    let copy =
        RedisProjection::new(RedisConfig { url: Some(redis.url()), ..Default::default() }, Codec::new(Keyring::new(ring, None).unwrap()))
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while copy.stored_seq(&key).await.unwrap() != Some(last) {
        assert!(Instant::now() < deadline, "the redis copy never reached {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Loaded again by a new process, with its Redis copy current.
    stack.service.restart();
    let made = count_event_consumers_made(&stack.nc).await;
    assert_eq!(client.creds_get().await.unwrap().as_deref(), Some(&b"creds 8"[..]));
    let record = client.keys_get("session", &["491511234.0"]).await.unwrap();
    assert_eq!(record["491511234.0"], b"session record after message 11");
    let log_text = stack.service.log_text();
    let loaded = log_text.lines().rev().find(|l| l.contains("session loaded") && l.contains("t/warm")).unwrap_or_default();
    assert!(loaded.contains("Redis { tail: 0 }"), "loaded from the redis copy: {loaded}");
    assert_eq!(made.load(Ordering::Relaxed), 0, "the warm load made no consumer of the event stream");

    // The counter sees them when there are: without the copy, the load
    // replays the log through one.
    copy.remove(&key).await.unwrap();
    stack.service.restart();
    let made = count_event_consumers_made(&stack.nc).await;
    assert_eq!(client.creds_get().await.unwrap().as_deref(), Some(&b"creds 8"[..]));
    assert!(made.load(Ordering::Relaxed) > 0, "a load from the log replays through a consumer");
}
