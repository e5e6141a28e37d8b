//! Integrity of the log at rest (issue 10, findings 1, 3 and 5): an event
//! published again behind the service's back is refused, never applied; the
//! stream's history cannot be purged; events of every schema version, as the
//! releases wrote them, are read.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use bstore_api::client::{ClientError, key_data};

use crate::harness::{Stack, retryable, rid, with_retries};

const STREAM: &str = "BSTORE_EVENTS";

/// Calls `f` with the Node client's retries (same `rid` for writes).
async fn call<T, F, Fut>(f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    with_retries(Duration::from_secs(30), retryable, f).await
}

/// Publishes the stored bytes of the event at `seq` again on its subject, as
/// anyone who may write to the stream could: a plain JetStream publish, no
/// key, no fence. Returns the copy's sequence.
async fn publish_again(js: &jetstream::Context, seq: u64) -> u64 {
    let stored = js.get_stream(STREAM).await.unwrap().get_raw_message(seq).await.unwrap();
    js.publish(stored.subject.to_string(), stored.payload).await.unwrap().await.unwrap().sequence
}

/// Finding 1: the payload of an older `creds.put`, published again on the
/// session's subject, rolled the creds back after a restart. Now the copy
/// is refused — logged, and marked in `history` — and the creds stay as the
/// last real write left them; the next write lands after the copy.
#[tokio::test]
async fn an_older_creds_put_published_again_is_refused_after_a_restart() {
    let mut stack = Stack::start().await;
    let s = stack.session("replayed", "s");
    let (r1, r2) = (rid(), rid());
    let first = call(|| s.creds_put(&r1, b"creds v1")).await.unwrap();
    call(|| s.creds_put(&r2, b"creds v2")).await.unwrap();
    let js = jetstream::new(stack.nc.clone());
    let copy = publish_again(&js, first).await;

    stack.service.restart();
    let creds = call(|| s.creds_get()).await.unwrap();
    assert_eq!(creds.as_deref(), Some(&b"creds v2"[..]), "the copy of the first creds.put (seq {copy}) rolled the creds back");
    assert_eq!(call(|| s.info()).await.unwrap().seq, copy, "the session stands at its last message, the refused copy");

    let log = stack.service.log_text();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && l.contains("refused an event") && l.contains(&format!("seq={copy}"))),
        "the refusal is logged at error level with its sequence:\n{log}"
    );
    let history = crate::harness::history(&stack.nats.url(), "replayed", "s");
    let refused: Vec<u64> = history.iter().filter(|l| l.get("refused").is_some()).map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(refused, [copy], "history marks the copy: {history:?}");
    assert_eq!(history.last().unwrap()["prev"], 0, "the copy names the first event's predecessor");
    // `verify`, with no projection configured, checks the log and reports
    // the copy.
    let out = std::process::Command::new(crate::harness::service_bin())
        .arg("verify")
        .env("BSTORE_NATS_URL", stack.nats.url())
        .env("BSTORE_KEYS", crate::harness::KEY1)
        .env("BSTORE_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "verify passes a log holding a refused copy: {text}");
    assert!(text.contains("DIFF log replayed/s: 1 events refused"), "{text}");

    // The next write is fenced on the copy's sequence and lands.
    let r3 = rid();
    let third = call(|| s.creds_put(&r3, b"creds v3")).await.unwrap();
    assert!(third > copy);
    stack.service.restart();
    assert_eq!(call(|| s.creds_get()).await.unwrap().as_deref(), Some(&b"creds v3"[..]));
}

/// The same copy published under a running service: the session's state in
/// memory is behind the log by the copy, so the next write conflicts,
/// catches up — refusing the copy — and lands; nothing is answered from the
/// copy, before or after.
#[tokio::test]
async fn an_older_event_published_under_a_running_service_is_refused_when_the_session_catches_up() {
    let stack = Stack::start().await;
    let s = stack.session("replayed", "live");
    let (r1, r2) = (rid(), rid());
    let one = key_data([("pre-key", "1", Some(&b"first"[..]))]);
    let first = call(|| s.keys_set(&r1, &one)).await.unwrap();
    let two = key_data([("pre-key", "1", Some(&b"second"[..]))]);
    call(|| s.keys_set(&r2, &two)).await.unwrap();
    let copy = publish_again(&jetstream::new(stack.nc.clone()), first).await;

    let r3 = rid();
    let three = key_data([("pre-key", "2", Some(&b"third"[..]))]);
    let written = call(|| s.keys_set(&r3, &three)).await.unwrap();
    assert!(written > copy, "the write landed after the copy");
    let keys = call(|| s.keys_get("pre-key", &["1", "2"])).await.unwrap();
    assert_eq!(keys["1"], b"second", "the copy's value was not applied");
    assert_eq!(keys["2"], b"third");
    // The operator sees it in the figures.
    let stats = stack.nc.request("$SRV.STATS.baileys-store", "".into()).await.unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    let integrity = &stats["endpoints"][0]["data"]["integrity"];
    assert!(integrity["refused_events"].as_u64().unwrap() >= 1, "the refusal is counted: {integrity}");
    assert_eq!(integrity["broken_chains"], 0, "{integrity}");
}

/// Finding 3: a purge of the stream, or of one session's subject, through
/// the JetStream API is refused by the server, and so is deleting one
/// event; the session reads back intact, also from a fresh instance.
#[tokio::test]
async fn purges_and_deletes_of_the_history_are_refused_by_the_server() {
    let mut stack = Stack::start().await;
    let s = stack.session("kept", "s");
    let r1 = rid();
    call(|| s.creds_put(&r1, b"creds")).await.unwrap();
    let (r2, data) = (rid(), key_data([("pre-key", "1", Some(&b"key"[..]))]));
    let seq = call(|| s.keys_set(&r2, &data)).await.unwrap();
    let js = jetstream::new(stack.nc.clone());
    let before = js.get_stream(STREAM).await.unwrap().info().await.unwrap().state.clone();

    let refused = |reply: async_nats::Message, code: u64| {
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(body["error"]["err_code"], code, "refused: {body}");
    };
    let purge = format!("$JS.API.STREAM.PURGE.{STREAM}");
    refused(stack.nc.request(purge.clone(), "".into()).await.unwrap(), 10110);
    refused(stack.nc.request(purge, r#"{"filter":"bstore-events.kept.s"}"#.into()).await.unwrap(), 10110);
    refused(stack.nc.request(format!("$JS.API.STREAM.MSG.DELETE.{STREAM}"), format!(r#"{{"seq":{seq}}}"#).into()).await.unwrap(), 10057);

    let after = js.get_stream(STREAM).await.unwrap().info().await.unwrap().state.clone();
    assert_eq!((after.messages, after.last_sequence), (before.messages, before.last_sequence), "nothing was removed");
    stack.service.restart();
    assert_eq!(call(|| s.creds_get()).await.unwrap().as_deref(), Some(&b"creds"[..]));
    assert_eq!(call(|| s.keys_get("pre-key", &["1"])).await.unwrap()["1"], b"key");
}

/// Finding 5: the committed fixture events, sealed by the releases that
/// wrote them (v1 by the release before deltas, v2 with and without patches
/// by the releases up to f4c3667, and this release's chained v1 and v2),
/// published as a session's history, are read by the service as one
/// history. A chained fixture published again out of its place is refused.
#[tokio::test]
async fn the_service_reads_events_of_every_schema_version_as_the_releases_wrote_them() {
    let stack = Stack::start().await;
    let js = jetstream::new(stack.nc.clone());
    let dir = bstore_testkit::repo_root().join("crates/bstore-log/tests/fixtures/events");
    let mut names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let fixture = |name: &str| bytes::Bytes::from(std::fs::read(dir.join(name)).unwrap());
    // The chained fixtures name sequences 4..6 as their predecessors: the
    // history is published first in a fresh stream, as sequences 1..6.
    for (n, name) in names.iter().take(6).enumerate() {
        let seq = js.publish("bstore-events.fixtures.s", fixture(name)).await.unwrap().await.unwrap().sequence;
        assert_eq!(seq, n as u64 + 1, "{name}");
    }

    let s = stack.session("fixtures", "s");
    let info = call(|| s.info()).await.unwrap();
    assert_eq!((info.seq, info.events), (6, 6));
    assert_eq!(call(|| s.creds_get()).await.unwrap().as_deref(), Some(&b"creds-2"[..]), "creds of fixture 5 (v1, chained)");
    let pre = call(|| s.keys_get("pre-key", &["1", "2", "3"])).await.unwrap();
    assert_eq!((pre.get("1"), &pre["2"][..], &pre["3"][..]), (None, &b"b"[..], &b"c"[..]), "fixtures 2 (v1), 3 (v2) and 4 (v2)");
    assert_eq!(call(|| s.keys_get("session", &["u.0"])).await.unwrap()["u.0"], b"s", "fixture 3 (v2, no patch)");
    let big: String = (0..3002).map(|i| format!("{i},")).collect();
    let sender = call(|| s.keys_get("sender-key", &["g::u::0"])).await.unwrap();
    assert_eq!(sender["g::u::0"], big.as_bytes(), "fixture 2's value patched by 4 (v2) and 6 (v2, chained)");

    // A write of this build goes on from the fixtures; fixture 7 (the
    // deletion appended after 6), published now, is out of place.
    let (r, nine) = (rid(), key_data([("pre-key", "9", Some(&b"new"[..]))]));
    let written = call(|| s.keys_set(&r, &nine)).await.unwrap();
    assert_eq!(written, 7);
    js.publish("bstore-events.fixtures.s", fixture(&names[6])).await.unwrap().await.unwrap();
    let (r, ten) = (rid(), key_data([("pre-key", "10", Some(&b"newer"[..]))]));
    call(|| s.keys_set(&r, &ten)).await.unwrap();
    assert_eq!(call(|| s.creds_get()).await.unwrap().as_deref(), Some(&b"creds-2"[..]), "the out-of-place deletion was not applied");
    let history = crate::harness::history(&stack.nats.url(), "fixtures", "s");
    let kinds: Vec<(&str, bool)> = history.iter().map(|l| (l["kind"].as_str().unwrap(), l.get("refused").is_some())).collect();
    assert_eq!(kinds[6..], [("keys_changed", false), ("session_deleted", true), ("keys_changed", false)]);
}
