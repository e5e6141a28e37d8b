//! `keys.list`: the ids of one type, page by page, against the real service.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bstore_api::client::{ClientError, SessionClient, key_data};

use crate::harness::{Stack, rid};
use crate::isolation::Fleet;

/// The ids-per-call limit the service runs with here: pages are small, so a
/// few dozen ids take several.
const CAP: usize = 10;

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
    let e = r.unwrap_err();
    e.code().unwrap_or_else(|| panic!("expected a coded service error, got {e:?}"))
}

fn message<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
    match r.unwrap_err() {
        ClientError::Service { message, .. } => message,
        other => panic!("expected a service error, got {other:?}"),
    }
}

/// Writes `ids` under `ty`, at most [`CAP`] per `keys.set`.
async fn write(s: &SessionClient, ty: &str, ids: &[String]) {
    for chunk in ids.chunks(CAP) {
        s.keys_set(&rid(), &key_data(chunk.iter().map(|id| (ty, id.as_str(), Some(&b"v"[..]))))).await.unwrap();
    }
}

async fn small_pages() -> Stack {
    Stack::start_with(&[("BSTORE__LIMITS__MAX_IDS_PER_CALL", "10")]).await
}

#[tokio::test]
async fn pages_follow_the_cursor_through_every_id_once_in_byte_order() {
    let stack = small_pages().await;
    let s = stack.session("t", "list");
    // Ids as Baileys writes them, in an order unlike byte order.
    let mut ids: Vec<String> = (0..37).map(|i| format!("{}@s.whatsapp.net.{}", 100 - i, i % 3)).collect();
    ids.push("9".into());
    ids.push("é:0".into());
    write(&s, "session", &ids).await;
    write(&s, "pre-key", &["1".to_string(), "2".to_string()]).await;
    let seq = s.info().await.unwrap().seq;
    ids.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));

    // Without a limit, pages hold the service's cap.
    let first = s.keys_list("session", None, None).await.unwrap();
    assert_eq!(first.ids, ids[..CAP]);
    assert_eq!(first.next.as_deref(), Some(ids[CAP - 1].as_str()), "the cursor is the page's last id");
    assert_eq!(first.seq, seq, "read at the session's sequence");
    let second = s.keys_list("session", first.next.as_deref(), None).await.unwrap();
    assert_eq!(second.ids, ids[CAP..2 * CAP]);

    // Followed to the end, with the cap and with a smaller limit.
    let mut pages = 0;
    let mut after: Option<String> = None;
    let mut listed = Vec::new();
    loop {
        let page = s.keys_list("session", after.as_deref(), Some(3)).await.unwrap();
        assert!(page.ids.len() <= 3 && !page.ids.is_empty(), "{page:?}");
        pages += 1;
        listed.extend(page.ids);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(listed, ids);
    assert_eq!(pages, ids.len().div_ceil(3));
    assert_eq!(s.keys_list_all("session", None).await.unwrap(), ids);
    assert_eq!(s.keys_list_all("pre-key", Some(1)).await.unwrap(), ["1", "2"]);

    // The last page says so; a cursor past every id is an empty last page.
    let last = s.keys_list("session", Some(&ids[ids.len() - 2]), None).await.unwrap();
    assert_eq!((last.ids, last.next), (vec![ids[ids.len() - 1].clone()], None));
    let past = s.keys_list("session", Some("\u{10ffff}"), None).await.unwrap();
    assert_eq!((past.ids.len(), past.next), (0, None));
    // A type with nothing stored, known or not, and a session never written.
    for ty in ["sender-key", "some-new-type"] {
        let empty = s.keys_list(ty, None, None).await.unwrap();
        assert_eq!((empty.ids.len(), empty.next, empty.seq), (0, None, seq), "{ty}");
    }
    let fresh = stack.session("t", "never-written").keys_list("session", None, None).await.unwrap();
    assert_eq!((fresh.ids.len(), fresh.next, fresh.seq), (0, None, 0));

    // Deleted keys leave the listing; a deleted session lists nothing.
    s.keys_set(&rid(), &key_data([("session", ids[0].as_str(), None)])).await.unwrap();
    assert_eq!(s.keys_list_all("session", None).await.unwrap(), ids[1..]);
    s.delete(&rid()).await.unwrap();
    assert!(s.keys_list_all("session", None).await.unwrap().is_empty());
    // Listing wrote nothing.
    assert_eq!(s.info().await.unwrap().events, 0);
}

#[tokio::test]
async fn bad_listings_get_coded_errors() {
    let stack = small_pages().await;
    let s = stack.session("t", "bad");
    write(&s, "session", &["a".to_string()]).await;

    // A page over the cap: 413, naming the limit.
    assert_eq!(s.keys_list("session", None, Some(CAP)).await.unwrap().ids.len(), 1);
    let too_large = s.keys_list("session", None, Some(CAP + 1)).await;
    let text = message(too_large.clone());
    assert_eq!(code(too_large), 413);
    assert!(text.contains("too_large") && text.contains("keys.list") && text.contains("11") && text.contains("10"), "{text}");
    assert_eq!(code(s.keys_list("session", None, Some(usize::MAX)).await), 413);

    // Malformed type or cursor: 422, as for every key type and id.
    assert_eq!(code(s.keys_list("bad type", None, None).await), 422);
    assert_eq!(code(s.keys_list("", None, None).await), 422);
    for after in [String::new(), "a\u{0}b".into(), "x".repeat(513)] {
        let r = s.keys_list("session", Some(&after), None).await;
        assert!(message(r.clone()).contains("cursor"), "{after:?}");
        assert_eq!(code(r), 422, "{after:?}");
    }

    // Bodies of the wrong shape: 400.
    let body = |v: serde_json::Value| rmp_serde::to_vec_named(&v).unwrap();
    for bad in [
        body(serde_json::json!({})),
        body(serde_json::json!({"after": "a"})),
        body(serde_json::json!({"type": 5})),
        body(serde_json::json!({"type": "session", "after": null})),
        body(serde_json::json!({"type": "session", "after": 7})),
        body(serde_json::json!({"type": "session", "limit": 0})),
        body(serde_json::json!({"type": "session", "limit": -1})),
        body(serde_json::json!({"type": "session", "limit": 2.0})),
        body(serde_json::json!({"type": "session", "limit": "2"})),
        body(serde_json::json!(["session"])),
        [body(serde_json::json!({"type": "session"})), vec![0xc1]].concat(),
    ] {
        let r = s.raw("keys.list", bad.clone()).await;
        assert_eq!(code(r), 400, "{bad:x?}");
    }
    // And a well-formed one from a general encoder works.
    let reply = s.raw("keys.list", body(serde_json::json!({"type": "session", "limit": 1, "extra": [1]}))).await.unwrap();
    let page: serde_json::Value = rmp_serde::from_slice(&reply).unwrap();
    assert_eq!(page["ids"], serde_json::json!(["a"]));
    assert_eq!(page["next"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_listing_while_writes_go_on_never_repeats_an_id_nor_skips_one_that_stayed() {
    let stack = small_pages().await;
    let s = stack.session("t", "busy");
    // Ids that stay, and between each two of them, in byte order, ids that
    // come and go while the listing runs.
    let stable: Vec<String> = (0..60).map(|i| format!("k{i:03}0")).collect();
    write(&s, "session", &stable).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (s, stop, writes) = (s.clone(), stop.clone(), writes.clone());
        tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Add five churning ids spread over the range, and remove the
                // five of the round before.
                let add: Vec<String> = (0..5).map(|j| format!("k{:03}5", (round * 7 + j * 12) % 60)).collect();
                let old: Vec<String> = (0..5).map(|j| format!("k{:03}5", (round * 7 + 53 + j * 12) % 60)).collect();
                let mut changes: Vec<(&str, &str, Option<&[u8]>)> = old.iter().map(|id| ("session", id.as_str(), None)).collect();
                changes.extend(add.iter().map(|id| ("session", id.as_str(), Some(&b"c"[..]))));
                s.keys_set(&rid(), &key_data(changes)).await.unwrap();
                writes.fetch_add(1, Ordering::Relaxed);
                round += 1;
            }
        })
    };
    let mut moved = false;
    for listing in 0..8 {
        let mut after: Option<String> = None;
        let mut seen: Vec<String> = Vec::new();
        let mut seqs = Vec::new();
        loop {
            let page = s.keys_list("session", after.as_deref(), Some(4)).await.unwrap();
            seqs.push(page.seq);
            seen.extend(page.ids);
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
            // Give the writer room between pages.
            tokio::task::yield_now().await;
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "listing {listing}: an id twice or out of order: {seen:?}");
        for id in &stable {
            assert!(seen.contains(id), "listing {listing}: {id}, stored throughout, was skipped");
        }
        assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "listing {listing}: pages went back in time: {seqs:?}");
        moved |= seqs.first() < seqs.last();
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(writes.load(Ordering::Relaxed) > 0);
    assert!(moved, "no listing saw a write between its pages: the test proved nothing");
}

#[tokio::test]
async fn a_bot_cannot_list_another_tenants_ids() {
    let fleet = Fleet::start().await;
    let (acme, globex) = (fleet.bot("acme").await, fleet.bot("globex").await);
    let victim = fleet.session(&globex, "globex", "victim");
    victim.keys_set(&rid(), &key_data([("session", "4917012345678.0", Some(&b"v"[..]))])).await.unwrap();
    assert_eq!(victim.keys_list_all("session", None).await.unwrap(), ["4917012345678.0"]);

    // acme's bot names globex's session: nothing in acme's account answers,
    // on the service's subject or on a partition's.
    let as_acme = fleet.session(&acme, "globex", "victim");
    assert_eq!(as_acme.keys_list("session", None, None).await.unwrap_err(), ClientError::NoResponders);
    for p in 0..16 {
        let err =
            acme.request(format!("bstore-p.{p}.globex.victim.keys.list"), b"\x81\xa4type\xa7session".to_vec().into()).await.unwrap_err();
        assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
    }
    // acme's own session of the same name is another session.
    let own = fleet.session(&acme, "acme", "victim");
    let page = own.keys_list("session", None, None).await.unwrap();
    assert_eq!((page.ids.len(), page.next, page.seq), (0, None, 0));
}
