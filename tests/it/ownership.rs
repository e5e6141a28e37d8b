//! One owner per session: a reply — to a write or to a read — is given only
//! from a state that holds every event the log had stored for the session
//! when the request arrived. One test per finding of the issue on session
//! ownership; instances are separate `baileys-store` processes sharing the
//! queue group `q`, so which one serves a request is up to NATS, and the
//! tests count wrong answers over many tries.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bstore_api::client::{ClientError, SessionClient, key_data};

use crate::harness::{Stack, fast_leases, retryable, rid, with_retries};

/// How long a request is retried while the service is unreachable or moving
/// a session, as the Node client does.
const BUDGET: Duration = Duration::from_secs(30);

/// Calls `f` with the Node client's retries (same `rid` for writes).
async fn call<T, F, Fut>(f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    with_retries(BUDGET, retryable, f).await
}

/// Two service processes on one nats-server, in the default queue group.
async fn two_instances(extra: &[(&str, &str)]) -> (Stack, bstore_testkit::ServiceProcess) {
    let env = [&fast_leases()[..], extra].concat();
    let stack = Stack::start_with(&env).await;
    let second = stack.another_service(&env);
    (stack, second)
}

/// Stops both instances and starts the first again: a fresh instance that
/// knows only what the log holds.
fn only_a_fresh_instance(stack: &mut Stack, mut second: bstore_testkit::ServiceProcess) {
    second.terminate();
    stack.service.terminate();
    stack.service.start_again();
}

fn one_key(ty: &str, id: &str, value: Option<&[u8]>) -> bstore_api::client::KeyData {
    key_data([(ty, id, value)])
}

/// `keys.get` with the reply's `seq`.
async fn get_with_seq(s: &SessionClient, ty: &str, ids: &[&str]) -> Result<(HashMap<String, Vec<u8>>, u64), ClientError> {
    s.keys_get_with_seq(ty, ids).await
}

/// Finding 1: `K=v1`, `K=v2`, `K=v1` through instances that NATS picks. When
/// the third lands on the instance that served the first and has not seen
/// the second, its state says "no change"; that must be confirmed against
/// the log before it is acknowledged. The log, read by a fresh instance,
/// must say v1 for every session.
#[tokio::test]
async fn a_write_judged_unchanged_is_acknowledged_only_once_the_log_agrees() {
    let (mut stack, second) = two_instances(&[]).await;
    let rounds = 40;
    let mut acks = Vec::new();
    for i in 0..rounds {
        let s = stack.session("nochange", &format!("s{i}"));
        let mut seqs = Vec::new();
        for v in ["v1", "v2", "v1"] {
            let (r, data) = (rid(), one_key("session", "K", Some(v.as_bytes())));
            seqs.push(call(|| s.keys_set(&r, &data)).await.unwrap());
        }
        acks.push(seqs);
    }
    only_a_fresh_instance(&mut stack, second);
    let mut wrong = Vec::new();
    for (i, seqs) in acks.iter().enumerate() {
        let s = stack.session("nochange", &format!("s{i}"));
        let got = call(|| s.keys_get("session", &["K"])).await.unwrap();
        let got = got.get("K").map(|v| String::from_utf8_lossy(v).into_owned());
        if got.as_deref() != Some("v1") {
            wrong.push(format!("s{i}: log says {got:?}, acks {seqs:?}"));
        }
    }
    assert!(wrong.is_empty(), "{} of {rounds} sessions lost the acknowledged K=v1 (its ack was not in the log): {wrong:?}", wrong.len());
}

/// Finding 1, logout: an instance that loaded the session while it was
/// empty must not acknowledge a `session.delete` as "nothing to delete"
/// after the other instance wrote creds. After the ack the creds are gone.
#[tokio::test]
async fn a_logout_through_an_instance_that_loaded_the_session_empty_removes_the_creds() {
    let (mut stack, second) = two_instances(&[]).await;
    let rounds = 30;
    let mut acks = Vec::new();
    for i in 0..rounds {
        let s = stack.session("logout", &format!("s{i}"));
        // Load the (empty) session on both instances, most likely.
        for _ in 0..4 {
            call(|| s.creds_get()).await.unwrap();
        }
        let r = rid();
        let put = call(|| s.creds_put(&r, b"creds")).await.unwrap();
        let r = rid();
        let deleted = call(|| s.delete(&r)).await.unwrap();
        acks.push((put, deleted));
    }
    only_a_fresh_instance(&mut stack, second);
    let mut survived = Vec::new();
    for (i, (put, deleted)) in acks.iter().enumerate() {
        let s = stack.session("logout", &format!("s{i}"));
        if call(|| s.creds_get()).await.unwrap().is_some() {
            survived.push(format!("s{i}: creds.put seq {put}, session.delete acknowledged with seq {deleted}"));
        }
    }
    assert!(
        survived.is_empty(),
        "{} of {rounds} acknowledged logouts were lost, the creds survive in the log: {survived:?}",
        survived.len()
    );
}

/// Finding 1, one-time pre-keys: a pre-key deleted after use through an
/// instance that loaded the session before the key was uploaded must be
/// gone, not stay usable.
#[tokio::test]
async fn a_used_pre_key_deleted_through_a_stale_instance_is_gone() {
    let (mut stack, second) = two_instances(&[]).await;
    let rounds = 30;
    let mut acks = Vec::new();
    for i in 0..rounds {
        let s = stack.session("prekey", &format!("s{i}"));
        for _ in 0..4 {
            call(|| s.keys_get("pre-key", &["1"])).await.unwrap();
        }
        let (r, data) = (rid(), one_key("pre-key", "1", Some(b"one-time")));
        let uploaded = call(|| s.keys_set(&r, &data)).await.unwrap();
        let (r, data) = (rid(), one_key("pre-key", "1", None));
        let used = call(|| s.keys_set(&r, &data)).await.unwrap();
        acks.push((uploaded, used));
    }
    only_a_fresh_instance(&mut stack, second);
    let mut usable = Vec::new();
    for (i, (uploaded, used)) in acks.iter().enumerate() {
        let s = stack.session("prekey", &format!("s{i}"));
        if !call(|| s.keys_get("pre-key", &["1"])).await.unwrap().is_empty() {
            usable.push(format!("s{i}: uploaded at seq {uploaded}, deletion acknowledged with seq {used}"));
        }
    }
    assert!(usable.is_empty(), "{} of {rounds} deleted pre-keys are still in the log: {usable:?}", usable.len());
}

/// Finding 2: with two instances in `q`, a read sent right after an
/// acknowledged write returns that write, whichever instance answers — and
/// still does later, when nothing else happened.
#[tokio::test]
async fn a_read_right_after_an_acknowledged_write_sees_it_on_every_instance() {
    let (stack, _second) = two_instances(&[]).await;
    let s = stack.session("fresh", "s");
    let tries = 200u32;
    let mut stale = Vec::new();
    let mut last = (0u32, 0u64);
    for i in 0..tries {
        let (r, v) = (rid(), i.to_be_bytes());
        let data = one_key("session", "K", Some(&v[..]));
        let seq = call(|| s.keys_set(&r, &data)).await.unwrap();
        let (got, read_seq) = call(|| get_with_seq(&s, "session", &["K"])).await.unwrap();
        let got = got.get("K").map(|v| u32::from_be_bytes(v.as_slice().try_into().unwrap()));
        if got != Some(i) || read_seq < seq {
            stale.push(format!("wrote {i} (seq {seq}), read {got:?} (seq {read_seq})"));
        }
        last = (i, seq);
    }
    // Nothing happens for a while; every instance must still answer with
    // the last write.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stale_later = Vec::new();
    for _ in 0..20 {
        let (got, read_seq) = call(|| get_with_seq(&s, "session", &["K"])).await.unwrap();
        let got = got.get("K").map(|v| u32::from_be_bytes(v.as_slice().try_into().unwrap()));
        if got != Some(last.0) || read_seq < last.1 {
            stale_later.push(format!("read {got:?} (seq {read_seq})"));
        }
    }
    assert!(
        stale.is_empty() && stale_later.is_empty(),
        "{} of {tries} reads right after an acknowledged write were stale (first: {:?}); {} of 20 reads 1 s after the last write \
         ({} at seq {}) were stale (first: {:?})",
        stale.len(),
        stale.first(),
        stale_later.len(),
        last.0,
        last.1,
        stale_later.first()
    );
}

/// What one write of [`an_evicted_session_hands_over_in_order_to_a_single_actor`] saw.
struct Handover {
    i: usize,
    ack: Result<u64, ClientError>,
    /// After the ack: whether `keys.get` found the key, and `session.info`'s seq.
    visible: Option<bool>,
    info_seq: Option<u64>,
}

impl Handover {
    /// The reads that follow an acknowledged write.
    async fn read_back(s: &SessionClient, i: usize, ack: Result<u64, ClientError>) -> Self {
        let id = format!("w{i}");
        let (mut visible, mut info_seq) = (None, None);
        if ack.is_ok() {
            let ids = [id.as_str()];
            visible = call(|| s.keys_get("session", &ids)).await.ok().map(|got| got.contains_key(&id));
            info_seq = call(|| s.info()).await.ok().map(|info| info.seq);
        }
        Self { i, ack, visible, info_seq }
    }
}

/// Finding 3: with `max_active = 1`, requests to other sessions evict the
/// session while its mailbox still holds requests. Passivation must hand it
/// over in order — no request runs on a second actor that loaded from the
/// log while the first was still appending, none is dropped:
/// - 60 writes pipelined at once, each followed by a request to another
///   session: every one is acknowledged (none refused because its actor was
///   evicted);
/// - 60 more, one at a time, each starting a new actor and followed, before
///   its answer, by a request to another session and a read of this one:
/// and for all of them, a `keys.get` sent after the ack finds the write,
/// `session.info` never reports a seq below an acknowledged one, and the log
/// holds every acknowledged write.
#[tokio::test]
async fn an_evicted_session_hands_over_in_order_to_a_single_actor() {
    let mut stack = Stack::start_with(&[&fast_leases()[..], &[("BSTORE__SESSIONS__MAX_ACTIVE", "1")]].concat()).await;
    let s = stack.session("evict", "busy");
    let data = |i: usize| one_key("session", &format!("w{i}"), Some(format!("w{i}").as_bytes()));
    // The instance serves (and holds the session's partition) before the burst.
    let (r, warm) = (rid(), one_key("session", "warm", Some(b"up")));
    call(|| s.keys_set(&r, &warm)).await.unwrap();
    let n = 60;

    // Pipelined: one attempt each, so that a refusal shows.
    let mut burst: Vec<Pin<Box<dyn Future<Output = Option<Handover>> + Send>>> = Vec::new();
    for i in 0..n {
        let (s, d) = (s.clone(), data(i));
        burst.push(Box::pin(async move {
            let ack = s.keys_set(&rid(), &d).await;
            Some(Handover::read_back(&s, i, ack).await)
        }));
        let other = stack.session("evict", &format!("burst-{i}"));
        burst.push(Box::pin(async move {
            let _ = other.info().await;
            None
        }));
    }
    let mut results: Vec<Handover> = futures_util::future::join_all(burst).await.into_iter().flatten().collect();

    // One at a time: the write starts a new actor; before its answer,
    // another session evicts that actor and a read of this session starts
    // the next one.
    for i in n..2 * n {
        let (before, other) = (stack.session("evict", &format!("before-{i}")), stack.session("evict", &format!("other-{i}")));
        call(|| before.info()).await.unwrap();
        let (r, d) = (rid(), data(i));
        // Retried with the same rid, as the Node client does.
        let write = call(|| s.keys_set(&r, &d));
        let evict_and_touch = async {
            tokio::task::yield_now().await;
            let touch = async {
                tokio::task::yield_now().await;
                s.info().await
            };
            let _ = tokio::join!(other.info(), touch);
        };
        let (ack, ()) = tokio::join!(write, evict_and_touch);
        results.push(Handover::read_back(&s, i, ack).await);
    }
    assert!(stack.service.log_text().contains("passivating least recently used session"), "no eviction happened; the test proved nothing");

    // Once every write is acknowledged, one keys.get and one session.info
    // of the running instance see them all.
    let acked_ids: Vec<String> = results.iter().filter(|r| r.ack.is_ok()).map(|r| format!("w{}", r.i)).collect();
    let refs: Vec<&str> = acked_ids.iter().map(String::as_str).collect();
    let after_all = call(|| s.keys_get("session", &refs)).await.unwrap();
    let missing_after_all: Vec<&&str> = refs.iter().filter(|id| !after_all.contains_key(**id)).collect();
    let last_acked = results.iter().filter_map(|r| r.ack.as_ref().ok().copied()).max().unwrap_or(0);
    let info_after_all = call(|| s.info()).await.unwrap().seq;

    let (mut invisible, mut went_back, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    for r in &results {
        match &r.ack {
            Ok(seq) => {
                if r.visible != Some(true) {
                    invisible.push(format!("w{} (seq {seq}): keys.get gave {:?}", r.i, r.visible));
                }
                if r.info_seq.is_none_or(|info| info < *seq) {
                    went_back.push(format!("w{} acknowledged at seq {seq}, then session.info seq {:?}", r.i, r.info_seq));
                }
            }
            Err(e) => refused.push(format!("w{}: {e}", r.i)),
        }
    }
    // The log, read by a fresh instance, holds every acknowledged write.
    stack.service.restart();
    let in_log = call(|| s.keys_get("session", &refs)).await.unwrap();
    let lost: Vec<&&str> = refs.iter().filter(|id| !in_log.contains_key(**id)).collect();

    assert!(
        refused.is_empty()
            && invisible.is_empty()
            && went_back.is_empty()
            && missing_after_all.is_empty()
            && info_after_all >= last_acked
            && lost.is_empty(),
        "of {} writes, {} were refused: {refused:?}\n\
         {} of {} acknowledged writes were missing from a keys.get sent after their ack: {invisible:?}\n\
         {} times session.info reported a seq below an acknowledged one: {went_back:?}\n\
         after every write was answered, {} were missing from one keys.get ({missing_after_all:?}) and session.info said seq \
         {info_after_all} (last acknowledged: {last_acked})\n\
         {} acknowledged writes are not in the log: {lost:?}",
        results.len(),
        refused.len(),
        invisible.len(),
        refs.len(),
        went_back.len(),
        missing_after_all.len(),
        lost.len()
    );
}

/// Finding 4: the actor's state is past the log (here: the stream is
/// replaced under a running service by a copy made before the session's
/// events, as a restore from before them, or a power cut with
/// `sync = "interval"`, would leave it; the stream denies purges).
/// The next write must succeed instead of answering 409 for ever, and reads
/// after it must give what the log holds — the same as a fresh instance
/// gives.
#[tokio::test]
async fn a_session_ahead_of_the_log_recovers_on_the_next_write() {
    let mut stack = Stack::start_with(&fast_leases()).await;
    let s = stack.session("ahead", "s");
    let (r1, d1) = (rid(), one_key("pre-key", "1", Some(b"kept")));
    call(|| s.keys_set(&r1, &d1)).await.unwrap();
    let (r2, d2) = (rid(), one_key("pre-key", "2", Some(b"also kept")));
    call(|| s.keys_set(&r2, &d2)).await.unwrap();
    assert_eq!(call(|| s.keys_get("pre-key", &["1", "2"])).await.unwrap().len(), 2, "the session is loaded");

    let js = async_nats::jetstream::new(stack.nc.clone());
    let mut stream = js.get_stream("BSTORE_EVENTS").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    // The copy made before the session's events: an empty stream.
    js.delete_stream("BSTORE_EVENTS").await.unwrap();
    js.create_stream(config).await.unwrap();
    assert_eq!(
        js.get_stream("BSTORE_EVENTS").await.unwrap().info().await.unwrap().state.messages,
        0,
        "the session's events are gone from the log"
    );

    let (r3, d3) = (rid(), one_key("pre-key", "3", Some(b"after")));
    let written = call(|| s.keys_set(&r3, &d3)).await;
    let after = call(|| s.keys_get("pre-key", &["1", "2", "3"])).await;
    let info = call(|| s.info()).await.map(|i| (i.seq, i.keys.get("pre-key").copied()));

    stack.service.restart();
    let fresh = call(|| s.keys_get("pre-key", &["1", "2", "3"])).await.unwrap();
    let fresh_info = call(|| s.info()).await.map(|i| (i.seq, i.keys.get("pre-key").copied())).unwrap();
    let seq = written
        .unwrap_or_else(|e| panic!("a write to a session whose state is ahead of the log failed: {e:?} (the log now holds {fresh:?})"));
    assert_eq!(fresh.get("3").map(Vec::as_slice), Some(&b"after"[..]), "the acknowledged write is in the log");
    assert_eq!(after.unwrap(), fresh, "reads after the write give what the log holds");
    assert_eq!(info.unwrap(), fresh_info, "session.info after the write agrees with the log");
    assert_eq!(fresh_info.0, seq);
}

/// Finding 5: a retry (same `rid`, same body) of a write whose first attempt
/// landed is answered with the first attempt's `seq`, also after a later
/// write, and is not applied again.
#[tokio::test]
async fn a_retry_whose_first_attempt_landed_is_answered_with_the_first_seq() {
    let stack = Stack::start_with(&fast_leases()).await;
    let s = stack.session("retry", "s");
    let (r1, d1) = (rid(), one_key("pre-key", "1", Some(b"first")));
    let first = call(|| s.keys_set(&r1, &d1)).await.unwrap();
    let (r2, d2) = (rid(), one_key("pre-key", "2", Some(b"second")));
    let second = call(|| s.keys_set(&r2, &d2)).await.unwrap();
    assert!(second > first);
    let retried = call(|| s.keys_set(&r1, &d1)).await.unwrap();
    assert_eq!(
        retried, first,
        "the retry of the write acknowledged at seq {first} was answered with seq {retried} (the later write's is {second})"
    );
    assert_eq!(call(|| s.info()).await.unwrap().events, 2, "the retry was not applied again");

    // The same for creds.put.
    let r3 = rid();
    let creds = call(|| s.creds_put(&r3, b"creds")).await.unwrap();
    let (r4, d4) = (rid(), one_key("pre-key", "3", Some(b"third")));
    let later = call(|| s.keys_set(&r4, &d4)).await.unwrap();
    let retried = call(|| s.creds_put(&r3, b"creds")).await.unwrap();
    assert_eq!(
        retried, creds,
        "the creds.put retry was answered with seq {retried}, not its first attempt's {creds} (later write: {later})"
    );
}
