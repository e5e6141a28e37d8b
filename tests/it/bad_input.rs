//! Bad input gets a clear, coded error, and the session is left unchanged.

use bstore_api::client::{ClientError, SessionClient, key_data};
use bstore_domain::SessionInfo;

use crate::harness::{Stack, rid};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
    let e = r.unwrap_err();
    e.code().unwrap_or_else(|| panic!("expected a coded service error, got {e:?}"))
}

/// A session with known content, and a check that it did not change.
async fn seeded(s: &SessionClient) -> SessionInfo {
    s.creds_put(&rid(), b"creds").await.unwrap();
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"one"[..]))])).await.unwrap();
    s.info().await.unwrap()
}

async fn assert_unchanged(s: &SessionClient, before: &SessionInfo) {
    assert_eq!(&s.info().await.unwrap(), before);
    assert_eq!(s.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"one");
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"creds"[..]));
}

#[tokio::test]
async fn malformed_ids_in_the_subject_are_422_or_404() {
    let stack = Stack::start().await;
    let client = SessionClient::new(stack.nc.clone(), "bstore", "t", "s").with_timeout(std::time::Duration::from_secs(3));
    let long = "x".repeat(129);
    for (tail, want) in [
        ("t.a.b.keys.get", 422), // a dot inside the session
        (&format!("t.{long}.keys.get"), 422),
        ("t.s.keys.drop", 404), // unknown op
        ("t.s.nothing", 404),
    ] {
        assert_eq!(code(client.raw_subject(tail).await), want, "{tail}");
    }
    // NATS itself never delivers a publish to a wildcard subject or one with
    // an empty token, so such an id cannot reach the service at all (the service's own
    // check of '*' and '>' is covered by the API's unit tests).
    for tail in ["*.s.keys.get", "t.>.keys.get", "t..keys.get"] {
        let r = client.raw_subject(tail).await;
        assert!(matches!(r, Err(ClientError::NoResponders) | Err(ClientError::Service { code: 422, .. })), "{tail}: {r:?}");
    }
}

#[tokio::test]
async fn garbage_truncated_or_mistyped_bodies_are_400() {
    let stack = Stack::start().await;
    let s = stack.session("t", "s");
    let before = seeded(&s).await;
    let good = rmp_serde::to_vec_named(&serde_json::json!({"type": "pre-key", "ids": ["1"]})).unwrap();
    assert_eq!(code(s.raw("keys.get", b"\xc1\xc1 not msgpack".to_vec()).await), 400);
    assert_eq!(code(s.raw("keys.get", good[..good.len() - 2].to_vec()).await), 400, "truncated");
    assert_eq!(code(s.raw("keys.set", rmp_serde::to_vec_named(&serde_json::json!({"data": 5})).unwrap()).await), 400);
    assert_eq!(code(s.raw("keys.set", rmp_serde::to_vec_named(&serde_json::json!({"data": {"pre-key": {"1": 7}}})).unwrap()).await), 400);
    assert_eq!(code(s.raw("creds.put", Vec::new()).await), 400);
    assert_unchanged(&s, &before).await;
}

#[tokio::test]
async fn bad_key_types_ids_and_request_ids_are_422() {
    let stack = Stack::start().await;
    let s = stack.session("t", "s");
    let before = seeded(&s).await;
    assert_eq!(code(s.keys_set(&rid(), &key_data([("pre-key", "2", Some(&b"ok"[..])), ("bad type", "1", Some(&b"x"[..]))])).await), 422);
    assert_eq!(
        code(s.keys_set(&rid(), &key_data([("pre-key", "2", Some(&b"ok"[..])), ("pre-key", "a\u{0}b", Some(&b"x"[..]))])).await),
        422
    );
    assert_eq!(code(s.keys_get("pre-key", &[""]).await), 422);
    assert_eq!(code(s.keys_set("not a rid!", &key_data([("pre-key", "2", Some(&b"ok"[..]))])).await), 422);
    assert_unchanged(&s, &before).await;
}

#[tokio::test]
async fn limits_are_enforced_with_413_and_apply_nothing() {
    let stack = Stack::start_with(&[
        ("BSTORE__API__MAX_REQUEST_BYTES", "200000"),
        ("BSTORE__LIMITS__MAX_IDS_PER_CALL", "10"),
        ("BSTORE__LIMITS__MAX_VALUE_BYTES", "1000"),
    ])
    .await;
    let s = stack.session("t", "s");
    let before = seeded(&s).await;

    let ids: Vec<String> = (0..11).map(|i| format!("n{i}")).collect();
    let many = key_data(ids.iter().map(|i| ("pre-key", i.as_str(), Some(&b"v"[..]))));
    assert_eq!(code(s.keys_set(&rid(), &many).await), 413, "too many ids to set");
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(code(s.keys_get("pre-key", &refs).await), 413, "too many ids to get");

    let big = vec![0u8; 1001];
    assert_eq!(code(s.keys_set(&rid(), &key_data([("pre-key", "2", Some(&b"ok"[..])), ("session", "x", Some(&big[..]))])).await), 413);
    assert_eq!(code(s.creds_put(&rid(), &big).await), 413);

    let body = vec![0u8; 200_001];
    assert_eq!(code(s.raw("keys.set", body).await), 413, "body over the request limit");
    assert_unchanged(&s, &before).await;
}
