//! Writer claims (`session.claim`): a client that holds its session's claim
//! answers reads from memory while its lease is valid by its own clock,
//! counted from when it sent the request that granted or renewed it. So the
//! property every test here checks is the one that makes that safe: no other
//! writer gets in — no other claim is granted, no write without the claim is
//! applied — before the lease the holder was given has run out as the holder
//! measures it, whatever happens to the session's actor in between
//! (passivation, a hand-over to another instance, a crash).

use std::time::{Duration, Instant};

use bstore_api::client::{ClientError, SessionClient, key_data};

use crate::harness::{Stack, retryable, rid, with_retries};

const BUDGET: Duration = Duration::from_secs(30);

/// A short lease, so that the tests wait seconds, not more.
const LEASE_MS: &str = "1500";

fn code(r: &Result<impl std::fmt::Debug, ClientError>) -> Option<u16> {
    r.as_ref().err().and_then(ClientError::code)
}

/// A granted claim as its holder sees it: the id, and when its lease ends by
/// the holder's clock (from when it sent the request that granted or renewed
/// it).
struct Held {
    id: String,
    until: Instant,
}

/// Asks for a new claim once; `Err` with the wait when it is not granted.
async fn claim_once(s: &SessionClient) -> Result<Held, Duration> {
    let sent = Instant::now();
    let r = with_retries(BUDGET, retryable, || s.claim(None)).await.expect("session.claim");
    match r.claim.clone() {
        Some(id) => {
            assert!(r.lease_ms > 0 && r.wait_ms == 0, "{r:?}");
            Ok(Held { id, until: sent + Duration::from_millis(r.lease_ms) })
        }
        None => {
            assert!(r.lease_ms == 0 && r.wait_ms > 0, "{r:?}");
            Err(Duration::from_millis(r.wait_ms))
        }
    }
}

/// Asks until granted, waiting as told; when it was granted (reply received).
async fn claim_until_granted(s: &SessionClient) -> (Held, Instant) {
    let start = Instant::now();
    loop {
        match claim_once(s).await {
            Ok(held) => return (held, Instant::now()),
            Err(wait) => {
                assert!(start.elapsed() < BUDGET, "no claim granted in {BUDGET:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Renews `held` once: its new end on success, or the error.
async fn renew(s: &SessionClient, held: &Held) -> Result<Instant, ClientError> {
    let sent = Instant::now();
    let r = s.claim(Some(&held.id)).await?;
    assert_eq!(r.claim.as_deref(), Some(held.id.as_str()));
    Ok(sent + Duration::from_millis(r.lease_ms))
}

fn one(id: &str, v: &[u8]) -> bstore_api::client::KeyData {
    key_data([("tctoken", id, Some(v))])
}

#[tokio::test]
async fn a_second_claim_waits_for_the_first_lease_which_is_renewed_no_more() {
    let stack = Stack::start_with(&[("BSTORE__SESSIONS__CLAIM_LEASE_MS", LEASE_MS)]).await;
    let (a, b) = (stack.session("cl", "two"), stack.session("cl", "two"));
    let mut first = claim_once(&a).await.expect("the first claim is granted at once");
    first.until = renew(&a, &first).await.expect("the holder renews");
    // A claimed write renews too, and says for how long.
    let sent = Instant::now();
    let (seq, lease_ms) = a.keys_set_claimed(&rid(), &first.id, &one("K", b"a1")).await.unwrap();
    assert!(seq > 0 && lease_ms > 0);
    first.until = first.until.max(sent + Duration::from_millis(lease_ms));

    // The second socket asks: not granted while the first lease runs.
    let wait = claim_once(&b).await.err().expect("a second claim is not granted while the first lease runs");
    assert!(wait <= Duration::from_millis(1500), "{wait:?}");
    // From then on the first claim is superseded: renewals and writes are refused, nothing is applied.
    assert_eq!(code(&renew(&a, &first).await), Some(410));
    assert_eq!(code(&a.keys_set_claimed(&rid(), &first.id, &one("K", b"a2")).await), Some(410));
    assert_eq!(a.keys_get("tctoken", &["K"]).await.unwrap()["K"], b"a1");

    let (second, granted_at) = claim_until_granted(&b).await;
    assert!(granted_at >= first.until, "the second claim was granted {:?} before the first lease ended", first.until - granted_at);
    assert_ne!(second.id, first.id);
    // The first never comes back; the second writes.
    assert_eq!(code(&renew(&a, &first).await), Some(410));
    b.keys_set_claimed(&rid(), &second.id, &one("K", b"b1")).await.unwrap();
    assert_eq!(b.keys_get("tctoken", &["K"]).await.unwrap()["K"], b"b1");
    // A claim id of another session is no claim here.
    let other = stack.session("cl", "other");
    assert_eq!(code(&other.keys_set_claimed(&rid(), &second.id, &one("K", b"x")).await), Some(410));
    assert_eq!(code(&other.claim(Some("not-a-claim")).await), Some(410));
    assert_eq!(code(&other.claim(Some("not a claim")).await), Some(422));
}

#[tokio::test]
async fn unclaimed_writers_work_as_before_and_wait_out_a_live_claim() {
    let stack = Stack::start_with(&[("BSTORE__SESSIONS__CLAIM_LEASE_MS", LEASE_MS)]).await;
    let s = stack.session("cl", "plain");
    // No claim on the session: writes and reads as without claims.
    let seq = s.keys_set(&rid(), &one("K", b"v1")).await.unwrap();
    assert_eq!(s.keys_get("tctoken", &["K"]).await.unwrap()["K"], b"v1");
    assert!(s.creds_put(&rid(), b"creds").await.unwrap() > seq);

    // A claimed socket appears; an unclaimed write while its lease runs is
    // refused with 409 (retryable, nothing applied) and supersedes it.
    let holder = stack.session("cl", "plain");
    let mut held = claim_once(&holder).await.unwrap();
    held.until = renew(&holder, &held).await.unwrap();
    let r = rid();
    assert_eq!(code(&s.keys_set(&r, &one("K", b"v2")).await), Some(409));
    assert_eq!(s.keys_get("tctoken", &["K"]).await.unwrap()["K"], b"v1", "the refused write applied nothing");
    assert_eq!(code(&renew(&holder, &held).await), Some(410), "the claim is renewed no more");
    assert_eq!(code(&holder.keys_set_claimed(&rid(), &held.id, &one("K", b"h")).await), Some(410));

    // Retried with the same rid, as every client retries 409, it passes once the lease has run out.
    let retry_409 = |e: &ClientError| retryable(e) || e.code() == Some(409);
    let v2 = one("K", b"v2");
    with_retries(BUDGET, retry_409, || s.keys_set(&r, &v2)).await.unwrap();
    let passed_at = Instant::now();
    assert!(passed_at >= held.until, "an unclaimed write was applied {:?} before the claim's lease ended", held.until - passed_at);
    assert_eq!(s.keys_get("tctoken", &["K"]).await.unwrap()["K"], b"v2");
    // And the superseded claim stays dead.
    assert_eq!(code(&renew(&holder, &held).await), Some(410));
    // An unclaimed delete, with no claim live, goes through at once.
    s.delete(&rid()).await.unwrap();
    assert!(!s.info().await.unwrap().exists);
}

/// The session's actor is evicted (`max_active` 1) while a claim is held;
/// the next actor knows no claim, so it must not grant one before the old
/// lease has run out.
#[tokio::test]
async fn a_new_actor_after_passivation_grants_no_other_claim_within_the_lease() {
    let stack = Stack::start_with(&[("BSTORE__SESSIONS__CLAIM_LEASE_MS", "2500"), ("BSTORE__SESSIONS__MAX_ACTIVE", "1")]).await;
    let s = stack.session("cl", "evicted");
    for round in 0..3 {
        let held = claim_until_granted(&s).await.0;
        // Another session's request evicts this session's actor.
        stack.session("cl", &format!("evictor-{round}")).info().await.unwrap();
        // A second socket of the session asks at once: its request goes to a new actor.
        let (second, granted_at) = claim_until_granted(&stack.session("cl", "evicted")).await;
        assert!(
            granted_at >= held.until,
            "round {round}: a new actor granted a claim {:?} before the old lease ended",
            held.until - granted_at
        );
        // The old claim is unknown to the new actor: superseded.
        assert_eq!(code(&renew(&s, &held).await), Some(410));
        // Let the second claim lapse with its actor for the next round.
        stack.session("cl", &format!("evictor-{round}-b")).info().await.unwrap();
        drop(second);
    }
    assert!(stack.service.log_text().contains("passivating least recently used session"), "no eviction happened; the test proved nothing");
}

/// Claims held on sessions spread over every partition, renewed by their
/// holders, while the partitions move: to a new instance that joins (a
/// hand-over), and away from an instance that is killed (a failover). For
/// every claim the service stops renewing, no other claim is granted before
/// its lease, as its holder measured it, has run out.
#[tokio::test]
async fn no_other_claim_is_granted_within_a_lease_when_sessions_move_between_instances() {
    // Partition leases long enough that claims get their whole 3 s: what
    // keeps a claim from outliving its instance's ownership here is the
    // hand-over waiting for it, and on a crash the partition lease's TTL.
    let env = [
        ("BSTORE__CLUSTER__LEASE_TTL", "6"),
        ("BSTORE__CLUSTER__RENEW_INTERVAL", "0.5"),
        ("BSTORE__CLUSTER__MARGIN", "1"),
        ("BSTORE__SESSIONS__CLAIM_LEASE_MS", "3000"),
    ];
    let mut stack = Stack::start_with(&env).await;
    let sessions: Vec<SessionClient> = (0..32).map(|i| stack.session("cl", &format!("moving-{i}"))).collect();

    // Phase 1: one instance holds every claim; a second joins and takes half the partitions.
    let held = claim_all(&sessions).await;
    let mut second = stack.another_service(&env);
    check_no_early_grant(&renew_then_claim_again(&sessions, held, Duration::from_secs(12)).await, "hand-over");

    // Phase 2: fresh claims everywhere, then the instance serving some of them is killed.
    let held = claim_all(&sessions).await;
    stack.service.kill9();
    check_no_early_grant(&renew_then_claim_again(&sessions, held, Duration::from_secs(15)).await, "failover");
    second.terminate();
}

/// Each holder renews its claim every 200 ms (each renewal moving its lease
/// end) until `budget` has passed; when the service supersedes a claim
/// (410), a second socket of that session asks for a claim at once. Returns,
/// per superseded session, its holder's lease end and when the second claim
/// was granted. Other failures (503, time-outs while a partition moves) are
/// retried on the next round without moving the end.
async fn renew_then_claim_again(sessions: &[SessionClient], held: Vec<Held>, budget: Duration) -> Vec<(usize, Instant, Instant)> {
    let start = Instant::now();
    let tasks = sessions.iter().zip(held).enumerate().map(|(i, (s, mut h))| async move {
        while start.elapsed() < budget {
            match renew(s, &h).await {
                Ok(until) => h.until = h.until.max(until),
                Err(e) if e.code() == Some(410) => {
                    let (_, granted_at) = claim_until_granted(s).await;
                    return Some((i, h.until, granted_at));
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    });
    futures_util::future::join_all(tasks).await.into_iter().flatten().collect()
}

/// A new claim on every session, asked for concurrently.
async fn claim_all(sessions: &[SessionClient]) -> Vec<Held> {
    futures_util::future::join_all(sessions.iter().map(|s| async move { claim_until_granted(s).await.0 })).await
}

fn check_no_early_grant(moved: &[(usize, Instant, Instant)], what: &str) {
    assert!(!moved.is_empty(), "{what}: no claim was superseded; the test proved nothing");
    for &(i, until, granted_at) in moved {
        assert!(granted_at >= until, "{what}: session {i} got another claim {:?} before its holder's lease ended", until - granted_at);
    }
}
