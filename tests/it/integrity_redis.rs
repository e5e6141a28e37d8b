//! Integrity at rest, the Redis half (issue 10, findings 2 and 4): a copy
//! of a session in Redis is believed as a whole or not at all, and nothing
//! in Redis names a contact. Each test tampers with a real redis-server
//! behind the back of the real service, as someone with write access to
//! Redis (or to a dump of it) could, and restarts the service so that the
//! session loads cold from its copy.

use bstore_api::client::key_data;
use bstore_redis::redis::{self, AsyncCommands};

use crate::harness::rid;
use crate::projections::{Projected, contains, sk, wait_stored};

/// The name of the one field of `session`'s hash that holds a key of type
/// `ty` (the test gives each type it tampers with a single key, so the
/// field is found without knowing how ids are spelled in field names).
async fn field_of(p: &Projected, session: &str, ty: &str) -> String {
    let proj = p.redis_projection();
    let names: Vec<String> = proj.connection().hkeys(proj.key(&sk(session))).await.unwrap();
    let mine: Vec<&String> = names.iter().filter(|n| n.starts_with(&format!("{ty}\u{1f}"))).collect();
    assert_eq!(mine.len(), 1, "one field of type {ty} in {names:?}");
    mine[0].clone()
}

/// Waits until `verify` finds no difference and the untrusted copy was
/// replaced by one the service believes again.
async fn repaired(p: &Projected, session: &str, seq: u64) {
    let out = p.verify_eventually(20).await;
    assert!(out.contains("0 differences"), "{out}");
    let copy = p.redis_projection().load(&sk(session)).await.expect("the repaired copy is believed").expect("a copy");
    assert_eq!(copy.seq(), seq);
}

fn warned(p: &Projected) -> usize {
    let log = p.stack.service.log_text();
    log.lines().filter(|l| l.contains("WARN") && l.contains("ignoring the unreadable redis copy")).count()
}

#[tokio::test]
async fn deleted_creds_and_key_fields_are_noticed_loaded_from_the_log_and_repaired() {
    let mut p = Projected::start(true, false, false).await;
    let s = p.session("hdel");
    s.creds_put(&rid(), b"creds-of-hdel").await.unwrap();
    let last = s
        .keys_set(&rid(), &key_data([("pre-key", "7", Some(&b"pre-key-7"[..])), ("session", "u.0", Some(&b"untouched"[..]))]))
        .await
        .unwrap();
    let proj = p.redis_projection();
    wait_stored(&proj, "hdel", last).await;

    // The creds and one key go from the copy; the other key stays.
    let field = field_of(&p, "hdel", "pre-key").await;
    let removed: usize = proj.connection().hdel(proj.key(&sk("hdel")), &["creds", field.as_str()]).await.unwrap();
    assert_eq!(removed, 2);
    let (ok, out) = p.tool(&["verify", "--tenant", "t", "--session", "hdel"]).await;
    assert!(!ok && out.contains("DIFF redis t/hdel"), "verify sees the copy short of two fields:\n{out}");

    p.stack.service.restart();
    // Not "no creds" (which makes the Node client re-pair): the log's.
    let creds = s.creds_get().await.unwrap_or_else(|e| panic!("{e:?}\n{}", p.stack.service.log_text()));
    assert_eq!(creds.as_deref(), Some(&b"creds-of-hdel"[..]), "the creds as written");
    assert_eq!(s.keys_get("pre-key", &["7"]).await.unwrap()["7"], b"pre-key-7", "the deleted key as written");
    assert_eq!(s.keys_get("session", &["u.0"]).await.unwrap()["u.0"], b"untouched");
    assert_eq!(warned(&p), 1, "one warning for the one load:\n{}", p.stack.service.log_text());
    repaired(&p, "hdel", last).await;
    let fields: Vec<String> = proj.connection().hkeys(proj.key(&sk("hdel"))).await.unwrap();
    assert!(fields.iter().any(|f| f == "creds"), "the creds are back in the copy: {fields:?}");
}

#[tokio::test]
async fn an_older_sealed_value_swapped_in_or_a_deleted_one_put_back_is_not_believed() {
    let mut p = Projected::start(true, false, false).await;
    let s = p.session("swap");
    let proj = p.redis_projection();
    let key = proj.key(&sk("swap"));
    let first = s
        .keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"old"[..])), ("sender-key", "g@g.us::u::0", Some(&b"gone"[..]))]))
        .await
        .unwrap();
    wait_stored(&proj, "swap", first).await;
    // The sealed bytes as they are now: authentic, for these very slots.
    let (pre_key, sender_key) = (field_of(&p, "swap", "pre-key").await, field_of(&p, "swap", "sender-key").await);
    let old: Vec<u8> = proj.connection().hget(&key, &pre_key).await.unwrap();
    let gone: Vec<u8> = proj.connection().hget(&key, &sender_key).await.unwrap();
    let last = s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"new"[..])), ("sender-key", "g@g.us::u::0", None)])).await.unwrap();
    wait_stored(&proj, "swap", last).await;

    for (n, (what, field, bytes)) in [("an older value", &pre_key, &old), ("a deleted key", &sender_key, &gone)].into_iter().enumerate() {
        let _: () = proj.connection().hset(&key, field, bytes.as_slice()).await.unwrap();
        p.stack.service.restart();
        let got = s.keys_get("pre-key", &["1"]).await.unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", p.stack.service.log_text()));
        assert_eq!(got["1"], b"new", "{what}: the log's value, not the one swapped in");
        assert!(s.keys_get("sender-key", &["g@g.us::u::0"]).await.unwrap().is_empty(), "{what}: the deleted key stays deleted");
        assert_eq!(warned(&p), n + 1, "{what}: one warning per load:\n{}", p.stack.service.log_text());
        repaired(&p, "swap", last).await;
    }
}

#[tokio::test]
async fn no_key_id_can_be_read_from_redis_in_clear_hex_or_base64() {
    let p = Projected::start(true, false, false).await;
    // Key ids as Baileys writes them: a phone number's JID, a LID, a group.
    let marker = format!("49{}", &rid().bytes().filter(u8::is_ascii_digit).map(char::from).collect::<String>()[..10]);
    let ids = [format!("{marker}.0"), format!("120363{marker}@g.us::{marker}@s.whatsapp.net::0"), format!("{marker}@lid")];
    let s = p.session("contacts");
    let last = s
        .keys_set(
            &rid(),
            &key_data([
                ("session", ids[0].as_str(), Some(&b"v"[..])),
                ("sender-key", ids[1].as_str(), Some(&b"v"[..])),
                ("lid-mapping", ids[2].as_str(), Some(&b"v"[..])),
            ]),
        )
        .await
        .unwrap();
    let proj = p.redis_projection();
    wait_stored(&proj, "contacts", last).await;
    assert_eq!(proj.load(&sk("contacts")).await.unwrap().unwrap().info().keys.len(), 3, "the keys are in the copy");
    let needles = spellings(marker.as_bytes());
    let mut conn = proj.connection();

    // The scanner finds each spelling when it is there.
    for (i, needle) in needles.iter().enumerate() {
        let control = format!("control{i}");
        let _: () = conn.hset(&control, [b"x".as_slice(), needle].concat(), "v").await.unwrap();
        assert!(found(&mut conn, &needles).await.is_some(), "the scanner finds spelling {i}");
        let _: () = conn.del(&control).await.unwrap();
    }
    assert_eq!(found(&mut conn, &needles).await, None, "a key id in Redis");
}

/// The marker in clear, in hex (both cases), and in base64 (standard and
/// URL-safe) at each of the three alignments it can have inside a longer
/// encoded string: the characters that depend on the marker alone.
fn spellings(marker: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    let hex: String = marker.iter().map(|b| format!("{b:02x}")).collect();
    let mut out = vec![marker.to_vec(), hex.clone().into_bytes(), hex.to_uppercase().into_bytes()];
    for k in 0..3usize {
        let padded = [vec![0u8; k], marker.to_vec()].concat();
        let (from, to) = (k.div_ceil(3) * 4, (k + marker.len()) / 3 * 4);
        for engine in [&STANDARD, &URL_SAFE] {
            out.push(engine.encode(&padded).into_bytes()[from..to].to_vec());
        }
    }
    out
}

/// Which spelling, if any, occurs in a key name, in a field name or value of
/// a hash, in a string, or in the `DUMP` of any key.
async fn found(conn: &mut redis::aio::ConnectionManager, needles: &[Vec<u8>]) -> Option<usize> {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query_async(conn).await.unwrap();
    let mut blobs = Vec::new();
    for key in keys {
        let ty: String = redis::cmd("TYPE").arg(&key).query_async(conn).await.unwrap();
        match ty.as_str() {
            "hash" => blobs.extend(conn.hgetall::<_, Vec<(Vec<u8>, Vec<u8>)>>(&key).await.unwrap().into_iter().flat_map(|(f, v)| [f, v])),
            "string" => blobs.push(conn.get(&key).await.unwrap()),
            other => panic!("unexpected Redis type {other}"),
        }
        blobs.push(redis::cmd("DUMP").arg(&key).query_async(conn).await.unwrap());
        blobs.push(key);
    }
    needles.iter().position(|n| blobs.iter().any(|b| contains(b, n)))
}
