//! Faults: crashes, concurrent writers, a restarted nats-server, data that
//! cannot be opened.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bstore_api::client::{ClientError, SessionClient, key_data};
use tokio::sync::Mutex;

use crate::harness::{KEY2, Stack, rid, start_service};

/// Writes key `k<i>` = i for i = 0.. until stopped, recording each
/// acknowledged i.
fn spawn_writer(s: SessionClient, acked: Arc<Mutex<Vec<u64>>>, stop: Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let id = format!("k{i}");
            let v = i.to_be_bytes();
            let data = key_data([("session", id.as_str(), Some(&v[..])), ("session", "last", Some(&v[..]))]);
            if s.keys_set(&rid(), &data).await.is_ok() {
                acked.lock().await.push(i);
            }
            i += 1;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_sigkill_in_order() {
    let mut stack = Stack::start().await;
    let s = stack.session("t", "crash").with_timeout(Duration::from_secs(2));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = spawn_writer(s.clone(), acked.clone(), stop.clone());
    bstore_testkit::wait_for(20, "some writes", || (acked.try_lock().map_or(0, |a| a.len()) >= 50).then_some(()));
    stack.service.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    stack.service.start_again();

    let acked = acked.lock().await.clone();
    assert!(acked.len() >= 50);
    let ids: Vec<String> = acked.iter().map(|i| format!("k{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    // The killed instance's partition leases lapse first (the lease TTL):
    // meanwhile requests wait, as a bot's client does.
    let got =
        crate::harness::with_retries(Duration::from_secs(30), crate::harness::retryable, || s.keys_get("session", &refs)).await.unwrap();
    for i in &acked {
        assert_eq!(got.get(&format!("k{i}")).map(Vec::as_slice), Some(&i.to_be_bytes()[..]), "acknowledged write k{i} lost");
    }
    // Order: the last value is that of the newest write that reached the
    // log, never older than the newest acknowledged one.
    let last = u64::from_be_bytes(s.keys_get("session", &["last"]).await.unwrap()["last"].clone().try_into().unwrap());
    assert!(last >= *acked.last().unwrap(), "last = {last}, newest acknowledged = {}", acked.last().unwrap());
}

/// Two instances that both believe they own every session — split brain,
/// made here by giving them different lease buckets — still lose no
/// acknowledged write: the fence on the log's sequence is what decides, not
/// the leases.
#[tokio::test]
async fn two_owners_by_mistake_writing_one_session_lose_nothing() {
    let stack = Stack::start_with(&[("BSTORE__SESSIONS__CONFLICT_RETRIES", "1")]).await;
    let mut second = stack
        .another_service(&[("BSTORE__SESSIONS__CONFLICT_RETRIES", "1"), ("BSTORE__CLUSTER__BUCKET", "BSTORE_LEASES_OF_ANOTHER_CLUSTER")]);
    let s = stack.session("t", "shared");
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (mut acked, mut conflicts) = (Vec::new(), 0);
            for i in 0..40 {
                let id = format!("w{w}-{i}");
                match s.keys_set(&rid(), &key_data([("sender-key", id.as_str(), Some(id.as_bytes()))])).await {
                    Ok(_) => acked.push(id),
                    Err(ClientError::Service { code: 409, .. }) => conflicts += 1,
                    Err(e) => panic!("a write failed with something other than a conflict: {e:?}"),
                }
            }
            (acked, conflicts)
        }));
    }
    let (mut acked, mut conflicts) = (Vec::new(), 0);
    for t in tasks {
        let (a, c) = t.await.unwrap();
        acked.extend(a);
        conflicts += c;
    }
    // Both instances took part and met each other in the log.
    let logs = stack.service.log_text() + &second.log_text();
    assert!(logs.contains("write conflict"), "the two writers never conflicted; the test proved nothing");

    // A fresh instance, loading from the log alone, holds every acknowledged write.
    second.terminate();
    let mut first = stack.service;
    first.terminate();
    let _fresh = start_service(&stack.nats, &stack.dir, &[("BSTORE_KEYS", crate::harness::KEY1)]);
    let refs: Vec<&str> = acked.iter().map(String::as_str).collect();
    let got = s.keys_get("sender-key", &refs).await.unwrap();
    let missing: Vec<&&str> = refs.iter().filter(|id| !got.contains_key(**id)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    assert_eq!(got.len() + conflicts, 320, "every request was either stored or answered with a conflict");
    let stored = s.info().await.unwrap().keys["sender-key"] as usize;
    assert_eq!(stored, acked.len(), "nothing unacknowledged was stored either");
}

#[tokio::test]
async fn a_restarted_nats_server_costs_retryable_errors_then_service_resumes() {
    let mut stack = Stack::start().await;
    let s = stack.session("t", "nats-restart").with_timeout(Duration::from_secs(2));
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"before"[..]))])).await.unwrap();

    stack.nats.stop();
    let err = s.keys_set(&rid(), &key_data([("pre-key", "2", Some(&b"during"[..]))])).await.unwrap_err();
    // With the server down the client cannot even reach the service.
    assert!(
        matches!(err, ClientError::TimedOut | ClientError::NoResponders | ClientError::Other(_)) || matches!(err.code(), Some(503 | 504)),
        "{err:?}"
    );
    stack.nats.start_again();

    // The service reconnects by itself; writes work again without a restart.
    let mut seen_retryable = HashSet::new();
    let mut ok = false;
    for _ in 0..100 {
        match s.keys_set(&rid(), &key_data([("pre-key", "3", Some(&b"after"[..]))])).await {
            Ok(_) => {
                ok = true;
                break;
            }
            Err(e) => {
                let retryable = matches!(e, ClientError::TimedOut | ClientError::NoResponders) || matches!(e.code(), Some(503 | 504 | 409));
                assert!(retryable, "a non-retryable error while the server came back: {e:?}");
                seen_retryable.insert(format!("{e:?}").chars().take(40).collect::<String>());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(ok, "the service never recovered; errors seen: {seen_retryable:?}");
    let got = s.keys_get("pre-key", &["1", "3"]).await.unwrap();
    assert_eq!(got.len(), 2);
}

#[tokio::test]
async fn data_under_a_key_no_longer_in_the_keyring_is_an_error_not_absent() {
    let mut stack = Stack::start().await;
    let s = stack.session("t", "rotated-away");
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"sealed under key 1"[..]))])).await.unwrap();
    stack.service.terminate();
    // Key 1 removed: pinned to key 2 (the cluster's record still names key
    // 1, and an instance that lacks the recorded key does not start otherwise).
    let _only_key2 = start_service(&stack.nats, &stack.dir, &[("BSTORE_KEYS", KEY2), ("BSTORE__KEYS__CURRENT", "2")]);
    let err = s.keys_get("pre-key", &["1"]).await.unwrap_err();
    assert_eq!(err.code(), Some(520), "{err:?}");
    assert!(err.to_string().contains("key 1"), "the error names the missing key: {err}");
    assert!(!err.to_string().contains("rotated-away"), "but not the session: {err}");
    assert_eq!(s.creds_get().await.unwrap_err().code(), Some(520), "creds.get must not say 'no creds'");
}

#[tokio::test]
async fn rotation_keeps_old_data_readable_and_seals_new_data_with_the_new_key() {
    let mut stack = Stack::start().await;
    let s = stack.session("t", "rotate");
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"old"[..]))])).await.unwrap();
    stack.service.terminate();
    let both = format!("{},{}", crate::harness::KEY1, KEY2);
    // Key 2 made current by configuration (`rotate-key` does it for a running cluster).
    let _rotated = start_service(&stack.nats, &stack.dir, &[("BSTORE_KEYS", both.as_str()), ("BSTORE__KEYS__CURRENT", "2")]);
    s.keys_set(&rid(), &key_data([("pre-key", "2", Some(&b"new"[..]))])).await.unwrap();
    let got = s.keys_get("pre-key", &["1", "2"]).await.unwrap();
    assert_eq!((got["1"].as_slice(), got["2"].as_slice()), (&b"old"[..], &b"new"[..]));
}

#[tokio::test]
async fn a_forged_event_in_the_log_is_reported_as_unreadable() {
    let stack = Stack::start().await;
    let s = stack.session("t", "forged");
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"real"[..]))])).await.unwrap();
    // Someone with publish rights on the event subject appends junk.
    let js = async_nats::jetstream::new(stack.nc.clone());
    js.publish("bstore-events.t.forged", "not a sealed event".into()).await.unwrap().await.unwrap();
    // A fresh instance must load the session from the log and meet the junk.
    drop(stack.service);
    let _fresh = start_service(&stack.nats, &stack.dir, &[("BSTORE_KEYS", crate::harness::KEY1)]);
    let err = s.keys_get("pre-key", &["1"]).await.unwrap_err();
    assert_eq!(err.code(), Some(520), "{err:?}");
}

/// A graceful stop under load: the stopping instance drains its
/// subscriptions and answers what it had been sent — served while it still
/// owns the partitions, or passed to the next owner. What NATS itself may
/// still drop at the edge (a message the server sent just before it saw the
/// unsubscribe) is covered by the client's retry with the same rid, as the
/// Node client does it: every write is acknowledged, exactly once, and reads
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_under_load_loses_no_write_and_answers_what_it_took() {
    let leases = crate::harness::fast_leases();
    let mut stack = Stack::start_with(&leases).await;
    let _second = stack.another_service(&leases);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8 {
        let s = stack.session("t", &format!("load-{c}")).with_timeout(Duration::from_secs(2));
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (id, v) = (rid(), i.to_be_bytes());
                let data = key_data([("session", format!("k{i}").as_str(), Some(&v[..]))]);
                let seq = crate::harness::with_retries(Duration::from_secs(30), crate::harness::retryable, || s.keys_set(&id, &data)).await;
                match seq {
                    Ok(seq) => acked.push((i, seq)),
                    Err(e) => panic!("write k{i} of load-{c} failed for good: {e:?}"),
                }
                i += 1;
            }
            (s, acked)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.service.terminate();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (s, acked) = c.await.unwrap();
        total += acked.len();
        let seqs: Vec<u64> = acked.iter().map(|(_, seq)| *seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "a write was applied twice or out of order: {seqs:?}");
        let ids: Vec<String> = acked.iter().map(|(i, _)| format!("k{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let got = s.keys_get("session", &refs).await.unwrap();
        assert_eq!(got.len(), acked.len(), "acknowledged writes missing");
        let info = s.info().await.unwrap();
        assert_eq!(info.seq, *seqs.last().unwrap(), "nothing but the acknowledged writes was stored");
    }
    assert!(total > 100, "the load ran ({total} writes)");
}
