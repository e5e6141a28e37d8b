//! The projection against a real redis-server.

use bstore_codec::{Codec, Keyring};
use bstore_domain::{Change, Event, KeyChanges, KeyId, KeyType, SessionKey, SessionState};
use bstore_testkit::RedisServer;
use bytes::Bytes;
use redis::AsyncCommands;

use super::*;

fn codec() -> Codec {
    Codec::new(Keyring::new(vec![(1, [7u8; 32])], None).unwrap())
}

fn projection(server: &RedisServer) -> RedisProjection {
    RedisProjection::new(RedisConfig { url: Some(server.url()), ..Default::default() }, codec()).unwrap()
}

fn sk(s: &str) -> SessionKey {
    SessionKey::parse("t", s).unwrap()
}

fn keys(entries: &[(&str, &str, Option<&str>)]) -> Event {
    let mut keys = KeyChanges::new();
    for (ty, id, v) in entries {
        keys.entry(KeyType::parse(ty).unwrap())
            .or_default()
            .insert(KeyId::parse(id).unwrap(), v.map(|v| Bytes::copy_from_slice(v.as_bytes())));
    }
    Event { v: 1, at_ms: 1000, rid: None, prev: None, change: Change::KeysChanged { keys, patched: Default::default() } }
}

/// Applies `event` to `st` at `seq` and projects it; returns the outcome.
async fn step(p: &RedisProjection, s: &SessionKey, st: &mut SessionState, seq: u64, event: Event) -> DeltaOutcome {
    let prev = st.seq();
    st.apply(seq, &event).unwrap();
    p.apply(s, prev, st, &event).await.unwrap()
}

#[tokio::test]
async fn deltas_apply_in_order_and_load_back() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("a");
    let mut st = SessionState::default();
    let creds = Event { v: 1, at_ms: 5, rid: None, prev: None, change: Change::CredsPut { creds: Bytes::from_static(b"creds") } };
    assert_eq!(step(&p, &s, &mut st, 3, creds).await, DeltaOutcome::Applied);
    assert_eq!(step(&p, &s, &mut st, 7, keys(&[("pre-key", "1", Some("a")), ("session", "u.0", Some("s"))])).await, DeltaOutcome::Applied);
    assert_eq!(step(&p, &s, &mut st, 9, keys(&[("pre-key", "1", None), ("pre-key", "2", Some("b"))])).await, DeltaOutcome::Applied);
    assert_eq!(p.load(&s).await.unwrap(), Some(st.clone()));
    assert_eq!(p.stored_seq(&s).await.unwrap(), Some(9));
    assert_eq!(p.load(&sk("nobody")).await.unwrap(), None);
    assert_eq!(p.sessions().await.unwrap(), vec![s]);
}

#[tokio::test]
async fn repeated_and_older_deltas_change_nothing_and_gaps_are_reported() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("b");
    let mut st = SessionState::default();
    let e1 = keys(&[("pre-key", "1", Some("a"))]);
    step(&p, &s, &mut st, 4, e1.clone()).await;
    let at4 = st.clone();
    let e2 = keys(&[("pre-key", "1", Some("new"))]);
    step(&p, &s, &mut st, 6, e2.clone()).await;
    // The same delta again, and the older one after the newer.
    assert_eq!(p.apply(&s, 4, &st, &e2).await.unwrap(), DeltaOutcome::AlreadyNewer);
    assert_eq!(p.apply(&s, 0, &at4, &e1).await.unwrap(), DeltaOutcome::AlreadyNewer);
    assert_eq!(p.load(&s).await.unwrap(), Some(st.clone()));
    // A delta whose predecessor the hash has not seen is refused.
    let mut ahead = st.clone();
    let e3 = keys(&[("pre-key", "3", Some("c"))]);
    ahead.apply(12, &e3).unwrap();
    assert_eq!(p.apply(&s, 10, &ahead, &e3).await.unwrap(), DeltaOutcome::Gap { stored: 6 });
    assert_eq!(p.load(&s).await.unwrap(), Some(st.clone()));
    // A guarded snapshot fills the gap; an older guarded one is refused.
    assert!(p.write_snapshot(&s, &ahead, SnapshotMode::Guarded).await.unwrap());
    assert!(!p.write_snapshot(&s, &st, SnapshotMode::Guarded).await.unwrap());
    assert_eq!(p.load(&s).await.unwrap(), Some(ahead.clone()));
    // Replace overrides the guard.
    assert!(p.write_snapshot(&s, &st, SnapshotMode::Replace).await.unwrap());
    assert_eq!(p.load(&s).await.unwrap(), Some(st));
}

#[tokio::test]
async fn a_deleted_session_keeps_only_its_sequence_so_late_deltas_cannot_resurrect_keys() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("c");
    let mut st = SessionState::default();
    let set = keys(&[("pre-key", "1", Some("a"))]);
    step(&p, &s, &mut st, 2, set.clone()).await;
    let deleted = Event { v: 1, at_ms: 9, rid: None, prev: None, change: Change::SessionDeleted };
    assert_eq!(step(&p, &s, &mut st, 5, deleted).await, DeltaOutcome::Applied);
    let mut conn = p.connection();
    let fields: Vec<String> = conn.hkeys(p.key(&s)).await.unwrap();
    assert!(!fields.iter().any(|f| f.contains(FIELD_SEP) || f == "creds"), "{fields:?}");
    let mut old = SessionState::default();
    old.apply(2, &set).unwrap();
    assert_eq!(p.apply(&s, 0, &old, &set).await.unwrap(), DeltaOutcome::AlreadyNewer);
    let loaded = p.load(&s).await.unwrap().unwrap();
    assert_eq!(loaded, st);
    assert!(!loaded.info().exists);
}

#[tokio::test]
async fn a_blob_of_another_session_or_a_corrupt_one_is_unreadable() {
    let server = RedisServer::start();
    let p = projection(&server);
    let (a, b) = (sk("a"), sk("b"));
    for s in [&a, &b] {
        let mut st = SessionState::default();
        step(&p, s, &mut st, 3, keys(&[("pre-key", "1", Some(s.session.as_str()))])).await;
    }
    let mut conn = p.connection();
    let field = RedisProjection::field(&KeyType::parse("pre-key").unwrap(), &KeyId::parse("1").unwrap());
    let foreign: Vec<u8> = conn.hget(p.key(&b), &field).await.unwrap();
    let _: () = conn.hset(p.key(&a), &field, foreign).await.unwrap();
    assert!(matches!(p.load(&a).await, Err(RedisError::Unreadable { .. })));
    let _: () = conn.hset(p.key(&b), &field, b"garbage".as_slice()).await.unwrap();
    assert!(matches!(p.load(&b).await, Err(RedisError::Unreadable { .. })));
    let _: () = conn.hset(p.key(&b), "seq", "x").await.unwrap();
    assert!(matches!(p.stored_seq(&b).await, Err(RedisError::Unreadable { .. })));
}

#[tokio::test]
async fn large_writes_go_through_in_chunks() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("big");
    let ids: Vec<String> = (0..2500).map(|i| i.to_string()).collect();
    let entries: Vec<(&str, &str, Option<&str>)> = ids.iter().map(|i| ("pre-key", i.as_str(), Some("v"))).collect();
    let mut st = SessionState::default();
    assert_eq!(step(&p, &s, &mut st, 1, keys(&entries)).await, DeltaOutcome::Applied);
    let deletes: Vec<(&str, &str, Option<&str>)> = ids.iter().take(2100).map(|i| ("pre-key", i.as_str(), None)).collect();
    assert_eq!(step(&p, &s, &mut st, 2, keys(&deletes)).await, DeltaOutcome::Applied);
    assert_eq!(p.load(&s).await.unwrap(), Some(st.clone()));
    assert!(p.write_snapshot(&s, &st, SnapshotMode::Replace).await.unwrap());
    assert_eq!(p.load(&s).await.unwrap().unwrap().info().keys["pre-key"], 400);
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_within_the_time_out() {
    let mut server = RedisServer::start();
    let p = projection(&server);
    server.stop();
    let start = std::time::Instant::now();
    assert!(matches!(p.load(&sk("a")).await, Err(RedisError::Unavailable(_))));
    assert!(start.elapsed() < std::time::Duration::from_secs(3));
    server.start_again();
    let mut ok = false;
    for _ in 0..50 {
        if p.load(&sk("a")).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "the projection reconnects by itself");
}

// ACL users and TLS, against a redis-server that accepts only TLS and only
// its one ACL user.

fn secure_projection(url: String, tls: RedisTls) -> RedisProjection {
    RedisProjection::new(RedisConfig { url: Some(url), tls, ..Default::default() }, codec()).unwrap()
}

fn private_ca(server: &RedisServer) -> RedisTls {
    RedisTls { ca_file: Some(server.tls_ca_file()), ..Default::default() }
}

/// Writes one delta and loads it back; the error if Redis refused.
async fn round_trip(p: &RedisProjection, name: &str) -> Result<SessionState, RedisError> {
    let s = sk(name);
    let mut st = SessionState::default();
    let event = keys(&[("pre-key", "1", Some("a"))]);
    st.apply(1, &event).unwrap();
    assert_eq!(p.apply(&s, 0, &st, &event).await?, DeltaOutcome::Applied);
    assert_eq!(p.load(&s).await?, Some(st.clone()));
    Ok(st)
}

#[tokio::test]
async fn an_acl_user_over_tls_with_a_private_ca_projects_and_loads() {
    let server = RedisServer::start_secure("bstore", "s3cret", false);
    assert!(server.url().starts_with("rediss://bstore:s3cret@"));
    let p = secure_projection(server.url(), private_ca(&server));
    round_trip(&p, "tls").await.unwrap();
    let mut conn = p.connection();
    let fields: usize = conn.hlen(p.key(&sk("tls"))).await.unwrap();
    assert!(fields >= 2, "seq and the key at least: {fields}");
    // The ACL rule confines the user to the projection's own keys.
    let err = conn.set::<_, _, ()>("other:key", "x").await.unwrap_err();
    assert!(err.to_string().to_ascii_lowercase().contains("noperm"), "{err}");
}

#[tokio::test]
async fn a_wrong_password_or_no_user_is_refused_and_reported_as_unavailable() {
    let server = RedisServer::start_secure("bstore", "s3cret", false);
    let port = server.port();
    let wrong = secure_projection(format!("rediss://bstore:wrong@127.0.0.1:{port}/"), private_ca(&server));
    let err = round_trip(&wrong, "w").await.unwrap_err();
    assert!(matches!(err, RedisError::Unavailable(_)), "{err}");
    // Without a user, the connection is Redis's `default` user, which is off.
    let anonymous = secure_projection(format!("rediss://127.0.0.1:{port}/"), private_ca(&server));
    assert!(matches!(round_trip(&anonymous, "w").await, Err(RedisError::Unavailable(_))));
    // The same server with the right password works: the refusals were the password's.
    round_trip(&secure_projection(server.url(), private_ca(&server)), "w").await.unwrap();
}

#[tokio::test]
async fn username_and_password_settings_override_the_url() {
    let server = RedisServer::start_secure("bstore", "s3cret", false);
    let cfg = RedisConfig {
        url: Some(format!("rediss://someone:else@127.0.0.1:{}/", server.port())),
        username: Some("bstore".into()),
        password: Some("s3cret".into()),
        tls: private_ca(&server),
        ..Default::default()
    };
    round_trip(&RedisProjection::new(cfg, codec()).unwrap(), "o").await.unwrap();
}

#[tokio::test]
async fn a_server_certificate_from_an_unknown_ca_is_not_trusted() {
    let server = RedisServer::start_secure("bstore", "s3cret", false);
    // No ca_file: only the system's roots, which did not sign the test CA.
    let p = secure_projection(server.url(), RedisTls::default());
    assert!(matches!(round_trip(&p, "u").await, Err(RedisError::Unavailable(_))));
    // Another CA's file: not trusted either.
    let other = RedisServer::start_secure("bstore", "s3cret", false);
    let p = secure_projection(server.url(), private_ca(&other));
    assert!(matches!(round_trip(&p, "u").await, Err(RedisError::Unavailable(_))));
}

#[tokio::test]
async fn a_client_certificate_is_sent_when_the_server_requires_one() {
    let server = RedisServer::start_secure("bstore", "s3cret", true);
    let without = secure_projection(server.url(), private_ca(&server));
    assert!(matches!(round_trip(&without, "c").await, Err(RedisError::Unavailable(_))));
    let (cert, key) = server.tls_client_cert();
    let with = secure_projection(server.url(), RedisTls { cert_file: Some(cert), key_file: Some(key), ..private_ca(&server) });
    round_trip(&with, "c").await.unwrap();
}

#[tokio::test]
async fn tls_settings_need_a_rediss_url_and_readable_files() {
    let new = |url: &str, tls: RedisTls| RedisProjection::new(RedisConfig { url: Some(url.into()), tls, ..Default::default() }, codec());
    let ca = RedisTls { ca_file: Some("/nonexistent/ca.pem".into()), ..Default::default() };
    let err = new("redis://127.0.0.1:1/", ca.clone()).err().unwrap();
    assert!(err.to_string().contains("not rediss://"), "{err}");
    let err = new("rediss://127.0.0.1:1/", ca).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    let half = RedisTls { cert_file: Some("/x.pem".into()), ..Default::default() };
    let err = new("rediss://127.0.0.1:1/", half).err().unwrap();
    assert!(err.to_string().contains("go together"), "{err}");
    assert!(new("redis://127.0.0.1:1/", RedisTls::default()).is_ok());
}
