//! Erasure on request: a session's data made unreadable for good — by
//! anyone, the holder of the sealing key included — while the audit log,
//! which denies purges, keeps its messages.

use std::time::{Duration, Instant};

use bstore_api::client::key_data;
use bstore_codec::{Codec, Keyring, SealedUnder, sealed_under};
use bstore_domain::SessionKey;
use bstore_log::{EventLog, LogConfig};

use crate::harness::{KEY1, Stack, history, retryable, rid, service_bin, with_retries};

/// `baileys-store erase <args>` against the stack's server.
fn erase(stack: &Stack, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(service_bin())
        .arg("erase")
        .args(args)
        .env("BSTORE_NATS_URL", stack.nats.url())
        .env("BSTORE_KEYS", KEY1)
        .env("BSTORE_DATA_DIR", stack.dir.path().join("tool"))
        .env("BSTORE_LOG", "warn")
        .output()
        .expect("running baileys-store erase");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The session's sealed events, by sequence, as the log holds them.
async fn raw_events(log: &EventLog, key: &SessionKey) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    log.replay_raw(key, 0, |seq, _, blob| {
        out.push((seq, blob.to_vec()));
        Ok(())
    })
    .await
    .unwrap();
    out
}

fn tool_log(stack: &Stack) -> EventLog {
    let ring = Keyring::parse_entries(KEY1).unwrap();
    EventLog::attach(async_nats::jetstream::new(stack.nc.clone()), LogConfig::default(), Codec::new(Keyring::new(ring, None).unwrap()))
}

#[tokio::test]
async fn an_erased_session_is_unreadable_with_the_sealing_key_and_starts_empty_while_others_keep_theirs() {
    let stack = Stack::start().await;
    let (a, b) = (stack.session("t", "a"), stack.session("t", "b"));
    a.creds_put(&rid(), b"creds of a").await.unwrap();
    a.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"pre-key of a"[..])), ("session", "491511234.0", Some(&b"signal session"[..]))]))
        .await
        .unwrap();
    b.creds_put(&rid(), b"creds of b").await.unwrap();
    let key_a = SessionKey::parse("t", "a").unwrap();

    // A new cluster seals each session under its own data key.
    let log = tool_log(&stack);
    let before = raw_events(&log, &key_a).await;
    assert_eq!(before.len(), 2);
    assert!(before.iter().all(|(_, blob)| matches!(sealed_under(blob), Some(SealedUnder::DataKey(1)))), "sealed under data key 1");
    // The key opens them before the erasure.
    log.refresh_data_key(&key_a).await.unwrap();
    for (_, blob) in &before {
        log.codec().decode_event(&key_a, blob).expect("opens before the erasure");
    }

    // Without --yes nothing happens.
    let (ok, _, err) = erase(&stack, &["--tenant", "t", "--session", "a"]);
    assert!(!ok && err.contains("--yes"), "{err}");
    assert_eq!(a.creds_get().await.unwrap().as_deref(), Some(&b"creds of a"[..]));

    let (ok, out, err) = erase(&stack, &["--tenant", "t", "--session", "a", "--yes", "--json"]);
    assert!(ok, "erase failed:\n{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["shredded_events"], 2, "{report}");
    assert_eq!(report["destroyed_generation"], 1, "{report}");
    let marker = report["marker"].as_u64().unwrap();

    // The running service dropped what it held in memory.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.creds_get().await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the service still serves the erased creds");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.keys_get("pre-key", &["1"]).await.unwrap().is_empty());
    assert!(a.keys_get("session", &["491511234.0"]).await.unwrap().is_empty());
    assert_eq!(b.creds_get().await.unwrap().as_deref(), Some(&b"creds of b"[..]), "another session keeps its data");

    // The messages are still in the log (no purge), and nobody can open
    // them: not with the sealing key, not after looking the data key up.
    let after = raw_events(&log, &key_a).await;
    assert_eq!(after.len(), 3, "the two events and the erasure's marker");
    let state = log.refresh_data_key(&key_a).await.unwrap();
    assert!(state.key.is_none() && state.erased.is_some_and(|e| e.marker == marker), "{state:?}");
    for (seq, blob) in after.iter().filter(|(seq, _)| *seq < marker) {
        assert!(log.codec().decode_event(&key_a, blob).is_err(), "event {seq} still opens");
    }
    // Not even with a codec that never saw the session.
    let fresh = tool_log(&stack);
    for (seq, blob) in after.iter().filter(|(seq, _)| *seq < marker) {
        fresh.refresh_data_key(&key_a).await.unwrap();
        assert!(fresh.codec().decode_event(&key_a, blob).is_err(), "event {seq} opens in a new process");
    }
    // The bucket keeps no older revision holding the wrapped key.
    let js = async_nats::jetstream::new(stack.nc.clone());
    let mut bucket = js.get_stream("KV_BSTORE_DATAKEYS").await.unwrap();
    let info = bucket.info().await.unwrap();
    assert_eq!(info.config.max_messages_per_subject, 1);

    // The audit says what happened.
    let lines = history(&stack.nats.url(), "t", "a");
    assert_eq!(lines[0]["erased"]["before_seq"], marker, "{lines:?}");
    assert!(lines.iter().any(|l| l["seq"] == marker && l["kind"] == "session_deleted"), "{lines:?}");

    // The session lives on: a write after the erasure gets a new data key
    // and survives a restart.
    a.creds_put(&rid(), b"new creds of a").await.unwrap();
    let mut service = stack.service;
    service.restart();
    let a = stack_session(&stack.nc, "t", "a");
    let got = with_retries(Duration::from_secs(15), retryable, || a.creds_get()).await.unwrap();
    assert_eq!(got.as_deref(), Some(&b"new creds of a"[..]));
    let newest = raw_events(&log, &key_a).await;
    assert!(matches!(sealed_under(&newest.last().unwrap().1), Some(SealedUnder::DataKey(2))), "a new generation");
    drop(service);
}

fn stack_session(nc: &async_nats::Client, tenant: &str, session: &str) -> bstore_api::client::SessionClient {
    bstore_api::client::SessionClient::new(nc.clone(), "bstore", tenant, session)
}

#[tokio::test]
async fn writes_racing_an_erasure_lose_nothing_acknowledged_after_its_marker() {
    let stack = Stack::start().await;
    let a = stack.session("t", "race");
    a.creds_put(&rid(), b"v0").await.unwrap();
    // A bot keeps writing while the operator erases.
    let writer = {
        let a = stack.session("t", "race");
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 1..=60u32 {
                let value = format!("v{i}").into_bytes();
                let r = rid();
                if let Ok(seq) = with_retries(Duration::from_secs(20), retryable, || a.creds_put(&r, &value)).await {
                    acked.push((seq, value));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ok, out, err) = erase(&stack, &["--tenant", "t", "--session", "race", "--yes", "--json"]);
    assert!(ok, "erase failed:\n{out}\n{err}");
    let marker = serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["marker"].as_u64().unwrap();
    let acked = writer.await.unwrap();
    let log = tool_log(&stack);
    assert!(acked.len() >= 55, "most writes acknowledged: {}", acked.len());
    let last = acked.iter().max_by_key(|(seq, _)| *seq).unwrap();
    assert!(last.0 > marker, "writes went on after the erasure");
    // The session as the service serves it, and as a restart loads it.
    let expect = Some(last.1.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = a.creds_get().await.unwrap();
        if got == expect {
            break;
        }
        assert!(Instant::now() < deadline, "served {got:?}, last acknowledged {expect:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut service = stack.service;
    service.restart();
    let a = stack_session(&stack.nc, "t", "race");
    let got = with_retries(Duration::from_secs(15), retryable, || a.creds_get()).await.unwrap();
    assert_eq!(got, expect, "every write acknowledged after the marker is readable after a restart");
    // And each of them opens.
    let key = SessionKey::parse("t", "race").unwrap();
    for (seq, blob) in raw_events(&log, &key).await.iter().filter(|(seq, _)| *seq > marker) {
        log.decode_check(&key, *seq, blob).await;
    }
    drop(service);
}

trait DecodeCheck {
    async fn decode_check(&self, key: &SessionKey, seq: u64, blob: &[u8]);
}

impl DecodeCheck for EventLog {
    async fn decode_check(&self, key: &SessionKey, seq: u64, blob: &[u8]) {
        if self.codec().decode_event(key, blob).is_err() {
            self.refresh_data_key(key).await.unwrap();
        }
        self.codec().decode_event(key, blob).unwrap_or_else(|e| panic!("event {seq}, after the marker, does not open: {e}"));
    }
}
