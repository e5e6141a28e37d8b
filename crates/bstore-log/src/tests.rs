//! The log against a real nats-server: events bound to their place (copies
//! published again behind the service's back are refused, not applied) and
//! a stream whose history cannot be purged.

use async_nats::jetstream;
use bstore_codec::{Codec, Keyring};
use bstore_domain::{Change, Event, Refusal, SessionKey};
use bstore_testkit::NatsServer;
use bytes::Bytes;

use super::*;

/// JetStream's "stream purge not permitted" and "message delete not permitted".
const PURGE_NOT_PERMITTED: jetstream::ErrorCode = jetstream::ErrorCode(10110);
const DELETE_NOT_PERMITTED: jetstream::ErrorCode = jetstream::ErrorCode(10057);

fn codec() -> Codec {
    Codec::new(Keyring::new(vec![(1, [7u8; 32])], None).unwrap())
}

fn sk(s: &str) -> SessionKey {
    SessionKey::parse("t", s).unwrap()
}

fn creds(at_ms: u64, v: &'static [u8]) -> Event {
    Event::new(at_ms, None, Change::CredsPut { creds: Bytes::from_static(v) })
}

struct Fixture {
    _nats: NatsServer,
    js: jetstream::Context,
    log: EventLog,
}

async fn fixture() -> Fixture {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let log = EventLog::open(client.clone(), LogConfig::default(), codec()).await.unwrap();
    Fixture { _nats: nats, js: jetstream::new(client), log }
}

impl Fixture {
    /// Publishes `payload` on the session's subject as anyone who may write
    /// to the stream could: no fence, no key.
    async fn publish_raw(&self, key: &SessionKey, payload: Bytes) -> u64 {
        self.js.publish(self.log.subject(key), payload).await.unwrap().await.unwrap().sequence
    }

    /// The stored payload at `seq`.
    async fn payload(&self, seq: u64) -> Bytes {
        self.js.get_stream("BSTORE_EVENTS").await.unwrap().get_raw_message(seq).await.unwrap().payload
    }

    async fn replayed(&self, key: &SessionKey, after: u64) -> (Vec<(u64, Option<Refusal>)>, Result<u64, LogError>) {
        let mut seen = Vec::new();
        let last = self
            .log
            .replay_checked(key, after, |seq, r| {
                seen.push((
                    seq,
                    match r {
                        Replayed::Fits(_) => None,
                        Replayed::Refused(_, why) => Some(why),
                    },
                ))
            })
            .await;
        (seen, last)
    }
}

#[tokio::test]
async fn appended_events_name_the_sequence_they_were_fenced_on() {
    let f = fixture().await;
    let s = sk("chained");
    let first = f.log.append(&s, 0, &creds(1, b"a")).await.unwrap().seq;
    let second = f.log.append(&s, first, &Event { prev: Some(12345), ..creds(2, b"b") }).await.unwrap().seq;
    let mut prevs = Vec::new();
    let last = f.log.replay(&s, 0, |seq, e| prevs.push((seq, e.prev))).await.unwrap();
    assert_eq!(prevs, [(first, Some(0)), (second, Some(first))], "whatever the caller put in prev, the fence is sealed");
    assert_eq!(last, second);
}

#[tokio::test]
async fn a_copy_of_an_older_event_is_refused_counted_and_passed_over() {
    let f = fixture().await;
    let s = sk("copied");
    let first = f.log.append(&s, 0, &creds(1, b"v1")).await.unwrap().seq;
    let second = f.log.append(&s, first, &creds(2, b"v2")).await.unwrap().seq;
    let refused_before = refused_events();
    let copy = f.publish_raw(&s, f.payload(first).await).await;

    let (seen, last) = f.replayed(&s, 0).await;
    assert_eq!(seen, [(first, None), (second, None), (copy, Some(Refusal::Displaced { prev: 0, last: second }))]);
    assert_eq!(last.unwrap(), copy, "the replay ends at the copy, the session's last message");
    assert!(refused_events() > refused_before, "counted");
    let mut applied = Vec::new();
    assert_eq!(f.log.replay(&s, 0, |seq, _| applied.push(seq)).await.unwrap(), copy);
    assert_eq!(applied, [first, second], "replay hands over only what fits");

    // From the middle too: after the sequence of a state that holds the
    // second event.
    let (seen, _) = f.replayed(&s, second).await;
    assert_eq!(seen, [(copy, Some(Refusal::Displaced { prev: 0, last: second }))]);

    // The next append is fenced on the copy's sequence and names it.
    let next = f.log.append(&s, copy, &creds(3, b"v3")).await.unwrap().seq;
    let (seen, _) = f.replayed(&s, copy).await;
    assert_eq!(seen, [(next, None)]);
}

#[tokio::test]
async fn a_copy_of_an_event_written_before_the_chain_is_refused_once_the_session_is_chained() {
    let f = fixture().await;
    let (s, c) = (sk("legacy"), codec());
    // Two events as the previous release wrote them: no prev.
    let old1 = f.publish_raw(&s, c.encode_event(&s, &creds(10, b"old1")).into()).await;
    let old2 = f.publish_raw(&s, c.encode_event(&s, &creds(20, b"old2")).into()).await;
    let (seen, _) = f.replayed(&s, 0).await;
    assert_eq!(seen, [(old1, None), (old2, None)], "a history from before the chain is read as it is");

    let chained = f.log.append(&s, old2, &creds(30, b"new")).await.unwrap().seq;
    let copy = f.publish_raw(&s, f.payload(old1).await).await;
    let refused = Some(Refusal::Unchained { at_ms: 10, newest_at_ms: 30 });
    let (seen, last) = f.replayed(&s, 0).await;
    assert_eq!(seen, [(old1, None), (old2, None), (chained, None), (copy, refused)]);
    assert_eq!(last.unwrap(), copy);
    // From the middle, the replay reads the predecessor to judge it.
    let (seen, _) = f.replayed(&s, chained).await;
    assert_eq!(seen, [(copy, refused)]);

    // Read from after the refused copy (where a state that passed over it
    // stands), a second copy is judged by the whole history, not by the
    // first copy, which says nothing of what precedes it.
    let second_copy = f.publish_raw(&s, f.payload(old2).await).await;
    let (seen, _) = f.replayed(&s, copy).await;
    assert_eq!(seen, [(second_copy, Some(Refusal::Unchained { at_ms: 20, newest_at_ms: 30 }))]);

    // A write by an instance of the previous release after the chained one
    // (a rolling upgrade) is newer than every event: it is applied.
    let late = f.publish_raw(&s, c.encode_event(&s, &creds(40, b"old release")).into()).await;
    let (seen, _) = f.replayed(&s, second_copy).await;
    assert_eq!(seen, [(late, None)]);
}

#[tokio::test]
async fn an_event_naming_a_predecessor_never_seen_stops_the_replay() {
    let f = fixture().await;
    let (s, c) = (sk("gap"), codec());
    let first = f.log.append(&s, 0, &creds(1, b"a")).await.unwrap().seq;
    // What an event appended after a message that is gone looks like (only
    // the key holder can make one; a restore from an incomplete copy would
    // leave one).
    let after_gap = f.publish_raw(&s, seal_appended(&c, &s, first + 5, &creds(2, b"b")).into()).await;
    let broken_before = broken_chains();
    match f.replayed(&s, 0).await {
        (seen, Err(LogError::Broken { seq, last, .. })) => {
            assert_eq!(seen, [(first, None)]);
            assert_eq!((seq, last), (after_gap, first));
        }
        other => panic!("not refused as broken: {other:?}"),
    }
    assert!(broken_chains() > broken_before);
}

#[tokio::test]
async fn the_stream_denies_purges_and_deletes() {
    let f = fixture().await;
    let s = sk("kept");
    let first = f.log.append(&s, 0, &creds(1, b"a")).await.unwrap().seq;
    let mut stream = f.js.get_stream("BSTORE_EVENTS").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert!(config.deny_purge && config.deny_delete);

    let purge_denied = |r: Result<_, jetstream::stream::PurgeError>| match r.map(|_| ()).map_err(|e| e.kind()) {
        Err(jetstream::stream::PurgeErrorKind::JetStream(e)) => e.error_code() == PURGE_NOT_PERMITTED,
        _ => false,
    };
    assert!(purge_denied(stream.purge().await), "a purge of the stream is refused");
    assert!(purge_denied(stream.purge().filter(f.log.subject(&s)).await), "a purge of one session is refused");
    match stream.delete_message(first).await.map_err(|e| e.kind()) {
        Err(jetstream::stream::DeleteMessageErrorKind::JetStream(e)) => assert_eq!(e.error_code(), DELETE_NOT_PERMITTED),
        other => panic!("a delete of one event is not refused as such: {other:?}"),
    }
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    // Nor can the settings be turned off again.
    let lax = jetstream::stream::Config { deny_purge: false, deny_delete: false, ..config };
    assert!(f.js.update_stream(lax).await.is_err(), "the server refuses to allow purges again");
}

#[tokio::test]
async fn open_brings_a_stream_made_by_an_older_release_in_line() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let older = jetstream::stream::Config { deny_purge: false, ..LogConfig::default().stream_config() };
    js.create_stream(older).await.unwrap();
    EventLog::open(client, LogConfig::default(), codec()).await.unwrap();
    let config = js.get_stream("BSTORE_EVENTS").await.unwrap().info().await.unwrap().config.clone();
    assert!(config.deny_purge && config.deny_delete);
    assert!(js.get_stream("BSTORE_EVENTS").await.unwrap().purge().await.is_err());
}

/// `len` bytes that do not compress.
fn noise(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn a_state_larger_than_a_message_is_snapshotted_in_parts_and_a_lost_part_is_never_believed() {
    use bstore_domain::{KeyChanges, KeyId, KeyType};
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let cfg = LogConfig { max_message_bytes: 64 << 10, ..LogConfig::default() };
    let log = EventLog::open(client.clone(), cfg, codec()).await.unwrap();
    let js = jetstream::new(client);
    let key = sk("big");
    // 320 KB of values that do not compress, 40 KB an event: five messages'
    // worth sealed.
    let mut last = 0;
    for i in 0..8u64 {
        let mut keys = KeyChanges::new();
        keys.entry(KeyType::parse("sender-key").unwrap())
            .or_default()
            .insert(KeyId::parse(&format!("g{i}")).unwrap(), Some(noise(i, 40_000)));
        last = log.append(&key, last, &Event::new(i, None, Change::KeysChanged { keys, patched: Default::default() })).await.unwrap().seq;
    }
    let (state, _, _) = log.fold(&key, None, false, &mut |_, _| {}).await.unwrap();
    assert_eq!(state.seq(), last);
    log.write_snapshot(&key, &state).await.unwrap();
    let stored = log.stored_snapshots(&key).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].parts >= 5, "stored in parts: {}", stored[0].parts);
    assert_eq!(log.snapshots(&key).await.unwrap(), vec![state.clone()], "the parts put together open as the state");
    let (folded, start, done) = log.fold(&key, None, true, &mut |_, _| {}).await.unwrap();
    assert_eq!((folded, start, done.applied), (state.clone(), crate::FoldStart::Snapshot(last), 0));

    // A second snapshot: each part subject now keeps both snapshots' parts.
    let mut keys = KeyChanges::new();
    keys.entry(KeyType::parse("pre-key").unwrap()).or_default().insert(KeyId::parse("1").unwrap(), Some(noise(99, 10)));
    let newer = log.append(&key, last, &Event::new(9, None, Change::KeysChanged { keys, patched: Default::default() })).await.unwrap().seq;
    let (state2, _, _) = log.fold(&key, None, true, &mut |_, _| {}).await.unwrap();
    log.write_snapshot(&key, &state2).await.unwrap();
    assert_eq!(log.snapshots(&key).await.unwrap(), vec![state2.clone(), state.clone()]);

    // Something else written on a part's subject pushes the older
    // snapshot's part out: that one no longer opens, the newer still does.
    let part = crate::snapshots::part_subject(&log.snapshot_subject(&key), 1);
    js.publish(part.clone(), noise(7, 100)).await.unwrap().await.unwrap();
    assert_eq!(log.snapshots(&key).await.unwrap(), vec![state2.clone()], "the snapshot whose part is gone is skipped");
    // And once the newer's part is gone too, the load goes to the log.
    js.publish(part, noise(8, 100)).await.unwrap().await.unwrap();
    assert!(log.snapshots(&key).await.unwrap().is_empty());
    let (folded, start, done) = log.fold(&key, None, true, &mut |_, _| {}).await.unwrap();
    assert_eq!((folded.seq(), start, done.applied), (newer, crate::FoldStart::Scratch, 9));
    assert_eq!(folded, state2);

    // An erasure's purge takes the parts too.
    log.purge_snapshots(&key).await.unwrap();
    let mut info = js.get_stream("BSTORE_SNAPSHOTS").await.unwrap();
    assert_eq!(info.info().await.unwrap().state.messages, 0, "no part is left behind");
}
