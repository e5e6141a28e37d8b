//! The projection against a real redis-server.

use bstore_codec::{Codec, Keyring};
use bstore_domain::{Change, Command, Event, KeyChanges, KeyId, KeyType, Limits, SessionKey, SessionState};
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
    Event::new(1000, None, Change::KeysChanged { keys, patched: Default::default() })
}

/// A session as the actor holds it, and the digest a projector keeps of it.
#[derive(Clone)]
struct Tracked {
    st: SessionState,
    digest: Digest,
}

impl Tracked {
    fn new() -> Self {
        Self { st: SessionState::default(), digest: Digest::empty(0) }
    }
}

/// Applies `event` to `t` at `seq` and projects it; returns the outcome.
async fn step(p: &RedisProjection, s: &SessionKey, t: &mut Tracked, seq: u64, event: Event) -> DeltaOutcome {
    let before = t.st.clone();
    t.st.apply(seq, &event).unwrap();
    let (outcome, digest) = p.apply(s, &t.digest, &before, &t.st, &event).await.unwrap();
    t.digest = digest;
    outcome
}

fn creds(v: &'static [u8]) -> Event {
    Event::new(5, None, Change::CredsPut { creds: Bytes::from_static(v) })
}

fn untrusted(result: Result<Option<SessionState>, RedisError>) -> bool {
    matches!(result, Err(RedisError::Unreadable { .. }))
}

#[tokio::test]
async fn deltas_apply_in_order_and_load_back() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("a");
    let mut t = Tracked::new();
    assert_eq!(step(&p, &s, &mut t, 3, creds(b"creds")).await, DeltaOutcome::Applied);
    assert_eq!(step(&p, &s, &mut t, 7, keys(&[("pre-key", "1", Some("a")), ("session", "u.0", Some("s"))])).await, DeltaOutcome::Applied);
    assert_eq!(step(&p, &s, &mut t, 9, keys(&[("pre-key", "1", None), ("pre-key", "2", Some("b"))])).await, DeltaOutcome::Applied);
    assert_eq!(p.load(&s).await.unwrap(), Some(t.st.clone()));
    assert_eq!(p.stored_seq(&s).await.unwrap(), Some(9));
    assert_eq!(p.load(&sk("nobody")).await.unwrap(), None);
    assert_eq!(p.sessions().await.unwrap(), vec![s]);
}

#[tokio::test]
async fn a_restore_projects_as_a_delta_that_loads_back_as_the_restored_state() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("r");
    let mut t = Tracked::new();
    step(&p, &s, &mut t, 1, keys(&[("pre-key", "1", Some("a"))])).await;
    let then = t.st.clone();
    step(&p, &s, &mut t, 2, creds(b"creds")).await;
    step(&p, &s, &mut t, 3, keys(&[("pre-key", "1", Some("X")), ("pre-key", "2", Some("new"))])).await;
    // Back to 1: no creds then, key 1 as it was, key 2 not yet there.
    let restore = t.st.restore(&then, 1, None, 9, None).unwrap();
    assert_eq!(step(&p, &s, &mut t, 4, restore).await, DeltaOutcome::Applied);
    let loaded = p.load(&s).await.unwrap().expect("a trusted copy");
    assert_eq!(loaded, t.st);
    assert!(loaded.same_contents(&then) && loaded.creds().is_none(), "the creds field is gone with the rest");
}

#[tokio::test]
async fn repeated_and_older_deltas_change_nothing_and_gaps_are_reported() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("b");
    let mut t = Tracked::new();
    let e1 = keys(&[("pre-key", "1", Some("a"))]);
    let at0 = t.clone();
    step(&p, &s, &mut t, 4, e1.clone()).await;
    let at4 = t.clone();
    let e2 = keys(&[("pre-key", "1", Some("new"))]);
    step(&p, &s, &mut t, 6, e2.clone()).await;
    // The same delta again, and the older one after the newer.
    assert_eq!(p.apply(&s, &at4.digest, &at4.st, &t.st, &e2).await.unwrap().0, DeltaOutcome::AlreadyNewer);
    assert_eq!(p.apply(&s, &at0.digest, &at0.st, &at4.st, &e1).await.unwrap().0, DeltaOutcome::AlreadyNewer);
    assert_eq!(p.load(&s).await.unwrap(), Some(t.st.clone()));
    // A delta whose predecessor the hash has not seen is refused (the
    // event at 10 is projected, and then the copy goes back to 6).
    let mut gap = t.clone();
    step(&p, &s, &mut gap, 10, keys(&[("pre-key", "2", Some("x"))])).await;
    assert!(p.write_snapshot(&s, &t.st, SnapshotMode::Replace).await.unwrap().0);
    let mut ahead = gap.clone();
    assert_eq!(step(&p, &s, &mut ahead, 12, keys(&[("pre-key", "3", Some("c"))])).await, DeltaOutcome::Gap { stored: 6 });
    assert_eq!(p.load(&s).await.unwrap(), Some(t.st.clone()));
    // A guarded snapshot fills the gap; an older guarded one is refused.
    assert!(p.write_snapshot(&s, &ahead.st, SnapshotMode::Guarded).await.unwrap().0);
    assert!(!p.write_snapshot(&s, &t.st, SnapshotMode::Guarded).await.unwrap().0);
    assert_eq!(p.load(&s).await.unwrap(), Some(ahead.st.clone()));
    // Replace overrides the guard.
    assert!(p.write_snapshot(&s, &t.st, SnapshotMode::Replace).await.unwrap().0);
    assert_eq!(p.load(&s).await.unwrap(), Some(t.st));
}

#[tokio::test]
async fn a_deleted_session_keeps_only_its_sequence_so_late_deltas_cannot_resurrect_keys() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("c");
    let mut t = Tracked::new();
    let set = keys(&[("pre-key", "1", Some("a"))]);
    let at0 = t.clone();
    step(&p, &s, &mut t, 2, set.clone()).await;
    let deleted = Event::new(9, None, Change::SessionDeleted);
    assert_eq!(step(&p, &s, &mut t, 5, deleted).await, DeltaOutcome::Applied);
    let mut conn = p.connection();
    let fields: Vec<String> = conn.hkeys(p.key(&s)).await.unwrap();
    assert!(!fields.iter().any(|f| f.contains(FIELD_SEP) || f == "creds"), "{fields:?}");
    let mut old = SessionState::default();
    old.apply(2, &set).unwrap();
    assert_eq!(p.apply(&s, &at0.digest, &at0.st, &old, &set).await.unwrap().0, DeltaOutcome::AlreadyNewer);
    let loaded = p.load(&s).await.unwrap().unwrap();
    assert_eq!(loaded, t.st);
    assert!(!loaded.info().exists);
    // Written again after the deletion, on top of the empty copy.
    assert_eq!(step(&p, &s, &mut t, 8, keys(&[("pre-key", "1", Some("again"))])).await, DeltaOutcome::Applied);
    assert_eq!(p.load(&s).await.unwrap(), Some(t.st));
}

#[tokio::test]
async fn a_blob_of_another_session_or_slot_or_a_corrupt_one_is_unreadable() {
    let server = RedisServer::start();
    let p = projection(&server);
    let (a, b) = (sk("a"), sk("b"));
    for s in [&a, &b] {
        let mut t = Tracked::new();
        step(&p, s, &mut t, 3, keys(&[("pre-key", "1", Some(s.session.as_str())), ("pre-key", "2", Some("two"))])).await;
    }
    let mut conn = p.connection();
    let (ty, one, two) = (KeyType::parse("pre-key").unwrap(), KeyId::parse("1").unwrap(), KeyId::parse("2").unwrap());
    assert_ne!(p.field(&a, &ty, &one), p.field(&b, &ty, &one), "a contact has unrelated names in two sessions");
    // b's value of the same key, in a's field for it.
    let foreign: Vec<u8> = conn.hget(p.key(&b), p.field(&b, &ty, &one)).await.unwrap();
    let _: () = conn.hset(p.key(&a), p.field(&a, &ty, &one), foreign).await.unwrap();
    assert!(untrusted(p.load(&a).await));
    // a's own value of another key, moved to this key's field.
    let other: Vec<u8> = conn.hget(p.key(&b), p.field(&b, &ty, &two)).await.unwrap();
    let _: () = conn.hset(p.key(&b), p.field(&b, &ty, &one), other).await.unwrap();
    assert!(untrusted(p.load(&b).await));
    let _: () = conn.hset(p.key(&b), p.field(&b, &ty, &one), b"garbage".as_slice()).await.unwrap();
    assert!(untrusted(p.load(&b).await));
    let _: () = conn.hset(p.key(&b), "seq", "x").await.unwrap();
    assert!(matches!(p.stored_seq(&b).await, Err(RedisError::Unreadable { .. })));
}

/// A copy with creds and keys, several events old, and the sealed bytes of
/// what it held earlier: the material someone with write access to Redis
/// has to tamper with.
struct Material {
    t: Tracked,
    /// The whole hash at seq 2 (`DUMP`).
    whole_at_2: Vec<u8>,
    /// `seq` and `manifest` at seq 2.
    manifest_at_2: Vec<u8>,
    /// pre-key/1's sealed value at seq 2 (it changes at seq 3).
    old_value: Vec<u8>,
    /// pre-key/9's field and sealed value (it is deleted at seq 3).
    deleted: (String, Vec<u8>),
}

async fn material(p: &RedisProjection, s: &SessionKey) -> Material {
    let mut t = Tracked::new();
    step(p, s, &mut t, 1, creds(b"creds-1")).await;
    step(p, s, &mut t, 2, keys(&[("pre-key", "1", Some("old")), ("pre-key", "9", Some("nine")), ("session", "u.0", Some("s"))])).await;
    let mut conn = p.connection();
    let key = p.key(s);
    let ty = KeyType::parse("pre-key").unwrap();
    let (f1, f9) = (p.field(s, &ty, &KeyId::parse("1").unwrap()), p.field(s, &ty, &KeyId::parse("9").unwrap()));
    let whole_at_2: Vec<u8> = redis::cmd("DUMP").arg(&key).query_async(&mut conn).await.unwrap();
    let manifest_at_2: Vec<u8> = conn.hget(&key, MANIFEST).await.unwrap();
    let old_value: Vec<u8> = conn.hget(&key, &f1).await.unwrap();
    let nine: Vec<u8> = conn.hget(&key, &f9).await.unwrap();
    step(p, s, &mut t, 3, keys(&[("pre-key", "1", Some("new")), ("pre-key", "9", None)])).await;
    step(p, s, &mut t, 4, creds(b"creds-4")).await;
    assert_eq!(p.load(s).await.unwrap(), Some(t.st.clone()));
    Material { t, whole_at_2, manifest_at_2, old_value, deleted: (f9, nine) }
}

#[tokio::test]
async fn a_copy_with_a_field_deleted_added_swapped_or_a_sequence_changed_is_untrusted_and_counted() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("tamper");
    let m = material(&p, &s).await;
    let key = p.key(&s);
    let f1 = p.field(&s, &KeyType::parse("pre-key").unwrap(), &KeyId::parse("1").unwrap());
    let session_field = p.field(&s, &KeyType::parse("session").unwrap(), &KeyId::parse("u.0").unwrap());
    let mut conn = p.connection();
    let tamperings: Vec<(&str, redis::Pipeline)> = vec![
        ("the creds deleted", redis::pipe().hdel(&key, CREDS).clone()),
        ("a key deleted", redis::pipe().hdel(&key, &session_field).clone()),
        ("a deleted key put back", redis::pipe().hset(&key, &m.deleted.0, &m.deleted.1).clone()),
        ("an older value of a key", redis::pipe().hset(&key, &f1, &m.old_value).clone()),
        ("the sequence moved back", redis::pipe().hset(&key, SEQ, 2).clone()),
        ("the sequence moved ahead", redis::pipe().hset(&key, SEQ, 40).clone()),
        ("an older manifest", redis::pipe().hset(&key, MANIFEST, &m.manifest_at_2).hset(&key, SEQ, 2).clone()),
        ("no manifest", redis::pipe().hdel(&key, MANIFEST).clone()),
        ("the metadata of an older release added", redis::pipe().hset(&key, "events", 1).clone()),
    ];
    for (what, tampering) in tamperings {
        assert!(p.write_snapshot(&s, &m.t.st, SnapshotMode::Replace).await.unwrap().0);
        assert_eq!(p.load(&s).await.unwrap(), Some(m.t.st.clone()), "{what}: the copy before");
        let before = untrusted_copies();
        let _: () = tampering.query_async(&mut conn).await.unwrap();
        let result = p.load(&s).await;
        assert!(untrusted(result.clone()), "{what}: {result:?}");
        assert!(untrusted_copies() > before, "{what}: counted");
    }
    // The whole copy as it was at seq 2 is not a forgery but a stale copy:
    // believed as of seq 2, so the loader replays the log after it.
    let _: () = redis::cmd("RESTORE").arg(&key).arg(0).arg(&m.whole_at_2).arg("REPLACE").query_async(&mut conn).await.unwrap();
    let stale = p.load(&s).await.unwrap().unwrap();
    assert_eq!((stale.seq(), stale.creds().map(|c| &c[..])), (2, Some(&b"creds-1"[..])));
}

#[tokio::test]
async fn a_hash_of_the_previous_release_is_untrusted() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("old");
    // The layout of the release before manifests: clear ids, clear
    // metadata, values sealed for their session, type and id.
    let (ty, id) = (KeyType::parse("pre-key").unwrap(), KeyId::parse("1").unwrap());
    let mut conn = p.connection();
    let _: () = conn
        .hset_multiple(
            p.key(&s),
            &[
                ("seq", b"3".to_vec()),
                ("updated_at_ms", b"1000".to_vec()),
                ("events", b"2".to_vec()),
                ("creds", p.codec.seal_value(&s, None, b"c")),
                ("pre-key\u{1f}1", p.codec.seal_value(&s, Some((&ty, &id)), b"v")),
            ],
        )
        .await
        .unwrap();
    let err = p.load(&s).await.unwrap_err();
    assert!(err.to_string().contains("no manifest"), "{err}");
    assert!(!err.to_string().contains("pre-key"), "no field name is shown: {err}");
    assert!(matches!(p.stored_seq(&s).await, Err(RedisError::Unreadable { .. })));
    // What the loader then does: a snapshot replaces it whole.
    let st = SessionState::from_parts(3, Some(Bytes::from_static(b"c")), [(ty, id, Bytes::from_static(b"v"))], Some(1000), 2);
    assert!(p.write_snapshot(&s, &st, SnapshotMode::Replace).await.unwrap().0);
    assert_eq!(p.load(&s).await.unwrap(), Some(st));
}

#[tokio::test]
async fn key_ids_appear_in_no_field_name_and_read_back_from_their_sealed_values() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("names");
    let ids = ["4915112345678.0", "120363012345678901@g.us::4915112345678@s.whatsapp.net::0", "1234567890@lid", "ünïcødé::é"];
    let entries: Vec<(&str, &str, Option<&str>)> = ids.iter().map(|id| ("session", *id, Some("v"))).collect();
    let mut t = Tracked::new();
    step(&p, &s, &mut t, 1, keys(&entries)).await;
    let mut conn = p.connection();
    let names: Vec<String> = conn.hkeys(p.key(&s)).await.unwrap();
    for id in ids {
        assert!(!names.iter().any(|n| n.contains(id) || n.contains("4915112345678")), "{id} in {names:?}");
        let field = p.field(&s, &KeyType::parse("session").unwrap(), &KeyId::parse(id).unwrap());
        assert!(names.contains(&field), "{field:?} in {names:?}");
        assert_eq!(field.len(), "session".len() + 1 + 22);
    }
    assert_eq!(p.load(&s).await.unwrap(), Some(t.st.clone()));
    assert!(p.write_snapshot(&s, &t.st, SnapshotMode::Replace).await.unwrap().0);
    assert_eq!(conn.hkeys::<_, Vec<String>>(p.key(&s)).await.unwrap().len(), names.len(), "a snapshot names them alike");
    assert_eq!(p.load(&s).await.unwrap(), Some(t.st));
}

#[tokio::test]
async fn the_digest_a_delta_writes_is_the_one_a_snapshot_of_the_same_state_writes() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("digest");
    let mut t = Tracked::new();
    let limits = Limits::default();
    let big = |n: u8| -> Vec<u8> { (0..4096u32).map(|i| (i % 251) as u8 ^ (u8::from(i == 100) * n)).collect() };
    // Every kind of event: creds put and replaced, keys written, rewritten
    // as patches, deleted, the session deleted and written again.
    let commands = vec![
        Command::PutCreds { creds: Bytes::from_static(b"c1") },
        set_keys(&[("pre-key", "1", Some(big(1))), ("session", "u.0", Some(b"s".to_vec()))]),
        set_keys(&[("pre-key", "1", Some(big(2))), ("pre-key", "2", Some(b"two".to_vec()))]),
        Command::PutCreds { creds: Bytes::from_static(b"c2") },
        set_keys(&[("session", "u.0", None), ("pre-key", "2", Some(b"2".to_vec()))]),
        Command::DeleteSession,
        set_keys(&[("pre-key", "1", Some(b"after".to_vec()))]),
    ];
    let mut patched = false;
    for (n, cmd) in commands.into_iter().enumerate() {
        let event = t.st.handle(cmd, &limits, 10 + n as u64, None).unwrap().expect("a change");
        patched |= matches!(&event.change, Change::KeysChanged { patched, .. } if !patched.is_empty());
        assert_eq!(step(&p, &s, &mut t, 2 * n as u64 + 1, event).await, DeltaOutcome::Applied);
        assert_eq!(p.load(&s).await.unwrap(), Some(t.st.clone()), "after event {n}");
        assert_eq!(p.digest_at(&s, t.st.seq()).await.unwrap(), Some(t.digest));
        let (_, elsewhere) = p.write_snapshot(&sk("digest-elsewhere"), &t.st, SnapshotMode::Replace).await.unwrap();
        assert_eq!((elsewhere.entries, elsewhere.seq), (t.digest.entries, t.digest.seq));
        if t.digest.entries > 0 {
            assert_ne!(elsewhere.sum, t.digest.sum, "after event {n}: the same entries in another session hash otherwise");
        }
        let mine = p.write_snapshot(&s, &t.st, SnapshotMode::Guarded).await.unwrap();
        assert_eq!(mine, (false, t.digest), "after event {n}: the snapshot of the same state has the same digest");
    }
    assert!(patched, "a value was recorded as a patch");
    assert_eq!(p.digest_at(&s, 3).await.unwrap(), None, "another sequence");
    assert_eq!(p.digest_at(&sk("nobody"), 0).await.unwrap(), Some(Digest::empty(0)));
}

fn set_keys(entries: &[(&str, &str, Option<Vec<u8>>)]) -> Command {
    let mut keys = KeyChanges::new();
    for (ty, id, v) in entries {
        keys.entry(KeyType::parse(ty).unwrap()).or_default().insert(KeyId::parse(id).unwrap(), v.clone().map(Bytes::from));
    }
    Command::SetKeys { keys }
}

#[tokio::test]
async fn large_writes_go_through_in_chunks() {
    let server = RedisServer::start();
    let p = projection(&server);
    let s = sk("big");
    let ids: Vec<String> = (0..2500).map(|i| i.to_string()).collect();
    let entries: Vec<(&str, &str, Option<&str>)> = ids.iter().map(|i| ("pre-key", i.as_str(), Some("v"))).collect();
    let mut t = Tracked::new();
    assert_eq!(step(&p, &s, &mut t, 1, keys(&entries)).await, DeltaOutcome::Applied);
    let deletes: Vec<(&str, &str, Option<&str>)> = ids.iter().take(2100).map(|i| ("pre-key", i.as_str(), None)).collect();
    assert_eq!(step(&p, &s, &mut t, 2, keys(&deletes)).await, DeltaOutcome::Applied);
    assert_eq!(p.load(&s).await.unwrap(), Some(t.st.clone()));
    assert!(p.write_snapshot(&s, &t.st, SnapshotMode::Replace).await.unwrap().0);
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
    assert_eq!(p.apply(&s, &Digest::empty(0), &SessionState::default(), &st, &event).await?.0, DeltaOutcome::Applied);
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
