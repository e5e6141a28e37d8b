//! Integrity at rest, the Mongo half (issue "Integrity at rest", findings 4
//! and 7, and the materializer's side of 1): a copy of Mongo names no
//! contact; one poison record — a key document replaced with junk, an event
//! that does not decode — is quarantined, listed by `verify` and counted,
//! while every other session is still materialized; a copy of an old event
//! published again is refused, not materialized.

use std::time::{Duration, Instant};

use base64::Engine as _;
use bstore_api::client::key_data;
use bstore_mongo::mongodb::bson::spec::BinarySubtype;
use bstore_mongo::mongodb::bson::{Binary, Document, doc};
use bstore_mongo::{Materializer, MongoConfig, Store};

use crate::harness::rid;
use crate::projections::{Projected, codec, mongo_holds, sk, wait_lag_below};

/// A materializer inside the test, so that its counters can be read, with
/// short pauses. Stopped when the returned sender is dropped or fired.
async fn materializer(p: &Projected) -> (Materializer, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let cfg = MongoConfig {
        url: Some(p.mongo.as_ref().unwrap().url()),
        batch_wait: Duration::from_millis(50),
        retry_max: Duration::from_millis(300),
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let store = Store::connect(&cfg, codec()).await.unwrap();
    let m = Materializer::new(p.stack.nc.clone(), Default::default(), cfg, store, codec());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(m.clone().run(async {
        let _ = stopped.await;
    }));
    (m, stop, task)
}

/// Waits until Mongo holds key `ty/id` of session `s` with `value`.
async fn wait_materialized(store: &Store, s: &str, ty: &str, id: &str, value: &[u8], secs: u64) {
    let start = Instant::now();
    loop {
        let got = store.read_session(&sk(s)).await.ok().flatten();
        if got.as_ref().and_then(|g| g.keys.get(&(ty.to_string(), id.to_string()))).map(Vec::as_slice) == Some(value) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "session {s} not materialized within {secs} s: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn record(n: u32) -> Vec<u8> {
    crate::deltas::sender_key_record(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_document_replaced_with_junk_is_quarantined_and_repaired_while_other_sessions_go_on() {
    let p = Projected::start(false, true, false).await;
    let (m, stop, task) = materializer(&p).await;
    let store = p.mongo_store().await;
    let (poison, other) = (p.session("poison"), p.session("other"));
    let id = "120363@g.us::4915100000001::0";
    // A growing record: the log holds the rewrites as patches, which the
    // materializer resolves against the value Mongo holds.
    for n in 800..803 {
        poison.keys_set(&rid(), &key_data([("sender-key", id, Some(&record(n)[..]))])).await.unwrap();
    }
    wait_materialized(&store, "poison", "sender-key", id, &record(802), 20).await;

    // The key's document gets a value that does not open.
    let keys = store.database().collection::<Document>("keys");
    let junk = Binary { subtype: BinarySubtype::Generic, bytes: b"\xb5\x01junk-that-is-no-sealed-blob-at-all-0123456789".to_vec() };
    let hit = keys.update_one(doc! { "sid": "t.poison", "type": "sender-key" }, doc! { "$set": { "value": junk } }).await.unwrap();
    assert_eq!(hit.modified_count, 1);

    // A patch of that key, then another session's writes.
    poison.keys_set(&rid(), &key_data([("sender-key", id, Some(&record(803)[..]))])).await.unwrap();
    other.creds_put(&rid(), b"other-creds").await.unwrap();
    other.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"other-key"[..]))])).await.unwrap();

    wait_materialized(&store, "other", "pre-key", "1", b"other-key", 10).await;
    // The poisoned key is written again whole, from the log.
    wait_materialized(&store, "poison", "sender-key", id, &record(803), 10).await;
    wait_lag_below(&m, 1, 10).await;
    assert_eq!(m.stats().unreadable_documents, 1, "{:?}", m.stats());
    assert_eq!(m.stats().quarantined_events, 0, "nothing was skipped: {:?}", m.stats());

    let (ok, out) = p.tool(&["verify"]).await;
    assert!(!ok, "verify fails while something is quarantined:\n{out}");
    assert!(out.contains("QUARANTINED mongo t/poison: sender-key key document"), "{out}");
    assert!(!out.contains(id) && !out.contains("4915100000001"), "the listing names no key id:\n{out}");
    assert!(!out.contains("DIFF"), "mongo is as the log says:\n{out}");
    assert!(out.contains("1 differences (1 of them quarantined"), "{out}");
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_does_not_decode_is_quarantined_and_acknowledged_while_other_sessions_go_on() {
    let p = Projected::start(false, true, false).await;
    let (m, stop, task) = materializer(&p).await;
    let store = p.mongo_store().await;
    let (victim, other) = (p.session("victim"), p.session("other"));
    victim.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"before"[..]))])).await.unwrap();
    wait_materialized(&store, "victim", "pre-key", "1", b"before", 20).await;

    // Junk on the session's subject, published with a plain JetStream client.
    let js = async_nats::jetstream::new(p.stack.nc.clone());
    let junk = bytes::Bytes::from_static(b"\xb5\x01 not an event, not sealed by any key of the ring");
    let seq = js.publish("bstore-events.t.victim", junk).await.unwrap().await.unwrap().sequence;
    other.creds_put(&rid(), b"other-creds").await.unwrap();
    other.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"other-key"[..]))])).await.unwrap();

    wait_materialized(&store, "other", "pre-key", "1", b"other-key", 10).await;
    // Delivery and the ack floor went past it: it is not left pending.
    wait_lag_below(&m, 1, 10).await;
    assert_eq!(m.stats().quarantined_events, 1, "{:?}", m.stats());

    let (ok, out) = p.tool(&["verify"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("QUARANTINED mongo t/victim: event {seq}: sealed under key")), "{out}");
    assert!(out.contains("DIFF log t/victim: cannot be replayed"), "{out}");
    assert!(!out.contains("DIFF mongo t/other"), "{out}");
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_an_old_event_published_at_the_end_is_refused_not_materialized() {
    let p = Projected::start(false, true, false).await;
    let (m, stop, task) = materializer(&p).await;
    let store = p.mongo_store().await;
    let s = p.session("replayed");
    let first = s.creds_put(&rid(), b"creds-1").await.unwrap();
    s.creds_put(&rid(), b"creds-2").await.unwrap();
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"k"[..]))])).await.unwrap();
    wait_materialized(&store, "replayed", "pre-key", "1", b"k", 20).await;

    // The sealed payload of the first creds put, published again: no key
    // needed.
    let js = async_nats::jetstream::new(p.stack.nc.clone());
    let original = js.get_stream("BSTORE_EVENTS").await.unwrap().get_raw_message(first).await.unwrap();
    let copy = js.publish("bstore-events.t.replayed", original.payload).await.unwrap().await.unwrap().sequence;
    wait_lag_below(&m, 1, 10).await;

    let got = store.read_session(&sk("replayed")).await.unwrap().unwrap();
    assert_eq!(got.creds.as_deref(), Some(&b"creds-2"[..]), "the creds were rolled back");
    assert_eq!(got.seq, copy, "the copy is passed over, as the log's readers do");
    assert_eq!(m.stats().quarantined_events, 1, "{:?}", m.stats());
    let (_, out) = p.tool(&["verify"]).await;
    assert!(out.contains(&format!("QUARANTINED mongo t/replayed: event {copy}: it was appended after sequence")), "{out}");
    assert!(!out.contains("DIFF mongo"), "mongo is as the log's readers say:\n{out}");
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_of_an_earlier_release_gets_a_bound_on_redeliveries() {
    use async_nats::jetstream::consumer;
    let p = Projected::start(false, true, false).await;
    let js = async_nats::jetstream::new(p.stack.nc.clone());
    let stream = js.get_stream("BSTORE_EVENTS").await.unwrap();
    // As the earlier release made it: every event redelivered for ever.
    let old = consumer::pull::Config {
        durable_name: Some("bstore-mongo".into()),
        filter_subject: "bstore-events.>".into(),
        ack_policy: consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    stream.create_consumer(old).await.unwrap();
    p.session("x").keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"v"[..]))])).await.unwrap();

    let (_m, stop, task) = materializer(&p).await;
    wait_materialized(&p.mongo_store().await, "x", "pre-key", "1", b"v", 20).await;
    let mut c: consumer::PullConsumer = stream.get_consumer("bstore-mongo").await.unwrap();
    assert_eq!(c.info().await.unwrap().config.max_deliver, MongoConfig::default().max_deliver);
    let _ = stop.send(());
    task.await.unwrap();
}

/// `needle` in clear, in hex (both cases) and in base64 (standard and
/// URL-safe, padded or not).
fn forms(needle: &str) -> Vec<Vec<u8>> {
    let raw = needle.as_bytes();
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    vec![raw.to_vec(), hex.clone().into_bytes(), hex.to_uppercase().into_bytes(), b64.clone().into_bytes(), url.into_bytes()]
        .into_iter()
        .chain(std::iter::once(b64.trim_end_matches('=').as_bytes().to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_mongo_collection_names_a_contact_in_clear_hex_or_base64() {
    let p = Projected::start(false, true, true).await;
    // A phone number no other test uses, as the ids Baileys makes of it.
    let phone = format!("49{}", 100_000_000 + rand_digits());
    let session_id = format!("{phone}.0");
    let group_key = format!("120363999{phone}@g.us::{phone}::0");
    let lid = format!("{phone}@lid");
    let s = p.session("contacts");
    s.keys_set(&rid(), &key_data([("session", session_id.as_str(), Some(&b"s"[..])), ("sender-key", group_key.as_str(), Some(&b"g"[..]))]))
        .await
        .unwrap();
    let last = s.keys_set(&rid(), &key_data([("lid-mapping", lid.as_str(), Some(&b"m"[..]))])).await.unwrap();
    // A deleted key leaves a tombstone: it must not name the contact either.
    s.keys_set(&rid(), &key_data([("lid-mapping", lid.as_str(), None)])).await.unwrap();
    let store = p.mongo_store().await;
    let js = async_nats::jetstream::new(p.stack.nc.clone());
    let start = Instant::now();
    while bstore_mongo::lag(&js, "BSTORE_EVENTS", "bstore-mongo").await.unwrap().events() > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the materializer inside serve did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = store.read_session(&sk("contacts")).await.unwrap().unwrap();
    assert!(got.seq > last && got.keys.contains_key(&("session".to_string(), session_id.clone())), "{got:?}");

    // The scanner finds each form when it is there. (Of another value: the
    // server's own oplog keeps what was once written.)
    let client = store.database().client().clone();
    for form in forms(&format!("CONTROL-{}", rid())) {
        let control = client.database("control").collection::<Document>("c");
        control.insert_one(doc! { "v": String::from_utf8(form.clone()).unwrap() }).await.unwrap();
        assert!(mongo_holds(&client, &form).await, "the scanner finds {}", String::from_utf8_lossy(&form));
        client.database("control").drop().await.unwrap();
    }
    for needle in [&phone, &session_id, &group_key, &lid] {
        for form in forms(needle) {
            assert!(!mongo_holds(&client, &form).await, "mongo holds {} (from {needle})", String::from_utf8_lossy(&form));
        }
    }
}

/// Nine digits that differ between runs.
fn rand_digits() -> u64 {
    u64::from_str_radix(&rid()[..12], 16).unwrap() % 900_000_000
}
