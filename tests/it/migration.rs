//! `import` and `export`: `useMultiFileAuthState` folders and Redis-direct
//! stores into the store through the running service, and back out from
//! the log.

use std::path::Path;

use serde_json::Value;

use bstore_redis::redis::{self, AsyncCommands};
use bstore_testkit::RedisServer;

use crate::harness::{KEY1, Stack, service_bin};

/// Runs the command; (succeeded, stdout lines as JSON, stderr).
fn cli(stack: &Stack, args: &[&str]) -> (bool, Vec<Value>, String) {
    let out = std::process::Command::new(service_bin())
        .args(args)
        .env("BSTORE_NATS_URL", stack.nats.url())
        .env("BSTORE_KEYS", KEY1)
        .env("BSTORE_LOG", "warn")
        .output()
        .expect("running baileys-store");
    let lines =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
    (out.status.success(), lines, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn import(stack: &Stack, session: &str, from: &Path, extra: &[&str]) -> (bool, Value) {
    let mut args = vec!["import", "--tenant", "mig", "--session", session, "--from", from.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let (ok, mut lines, err) = cli(stack, &args);
    assert_eq!(lines.len(), 1, "one report: {err}");
    (ok, lines.remove(0))
}

async fn events(stack: &Stack) -> u64 {
    let js = async_nats::jetstream::new(stack.nc.clone());
    js.get_stream("BSTORE_EVENTS").await.unwrap().info().await.unwrap().state.last_sequence
}

/// Files as Baileys' `useMultiFileAuthState` writes them (no new line, the
/// replacer's Buffer form), with ids that its file-name escaping changes.
const FILES: &[(&str, &str)] = &[
    (
        "creds.json",
        r#"{"noiseKey":{"private":{"type":"Buffer","data":"AQID"},"public":{"type":"Buffer","data":"BAUG"}},"registrationId":1234,"advSecretKey":"c2VjcmV0","nextPreKeyId":813,"me":{"id":"4915112345:7@s.whatsapp.net","name":"bot"},"accountSyncCounter":0,"accountSettings":{"unarchiveChats":false},"registered":true,"lastPropHash":"3Yz","routingInfo":{"type":"Buffer","data":"CAUIAg=="},"platform":null}"#,
    ),
    ("pre-key-1.json", r#"{"private":{"type":"Buffer","data":"AQI="},"public":{"type":"Buffer","data":"AwQ="}}"#),
    ("pre-key-2.json", r#"{"private":{"type":"Buffer","data":"BQY="},"public":{"type":"Buffer","data":"Bwg="}}"#),
    (
        "session-4915112345.0.json",
        r#"{"_sessions":{"BQk=":{"registrationId":42,"currentRatchet":{"rootKey":"q83v","previousCounter":-1.5e-7}}},"version":"v1"}"#,
    ),
    ("sender-key-120363@g.us--4915112345--0.json", r#"{"type":"Buffer","data":"W3sia2V5IjoxfV0="}"#),
    ("sender-key-memory-4915-1600@g.us.json", r#"{"4915112345:3@s.whatsapp.net":true}"#),
    (
        "app-state-sync-key-AAAA__b+c=.json",
        r#"{"keyData":"AAEC","fingerprint":{"rawId":1,"currentIndex":2,"deviceIndexes":[0,3]},"timestamp":"1700000000000"}"#,
    ),
    ("tctoken-__index.json", r#"["4915112345@s.whatsapp.net"]"#),
    ("lid-mapping-4915112345.json", r#""123456789""#),
];

/// The keys FILES stand for: file names un-escaped.
const KEYS: &[(&str, &str)] = &[
    ("pre-key", "1"),
    ("pre-key", "2"),
    ("session", "4915112345.0"),
    ("sender-key", "120363@g.us::4915112345::0"),
    ("sender-key-memory", "4915-1600@g.us"),
    ("app-state-sync-key", "AAAA/b+c="),
    ("tctoken", "__index"),
    ("lid-mapping", "4915112345"),
];

/// A folder is imported (junk skipped and reported, file names un-escaped,
/// values in the Node client's form), exported back to the very files
/// Baileys wrote, and that export imported into another session holds every
/// value byte for byte; running an import again adds no event; a session
/// with state is refused without --force; --dry-run writes nothing.
#[tokio::test]
async fn folders_move_in_and_out_byte_for_byte_and_imports_are_idempotent() {
    let stack = Stack::start().await;
    let src = stack.dir.path().join("auth-a");
    std::fs::create_dir_all(&src).unwrap();
    for (name, text) in FILES {
        std::fs::write(src.join(name), text).unwrap();
    }
    std::fs::write(src.join("pre-key-9.json"), "{\"private\":").unwrap();
    std::fs::write(src.join("notes.txt"), "hello").unwrap();

    // A dry run reads everything and writes nothing.
    let before = events(&stack).await;
    let (ok, dry) = import(&stack, "a", &src, &["--dry-run"]);
    assert!(ok, "{dry}");
    assert_eq!(dry["status"], "would-import");
    assert_eq!(events(&stack).await, before, "a dry run appends nothing");
    assert!(!stack.session("mig", "a").info().await.unwrap().exists);

    let (ok, rep) = import(&stack, "a", &src, &[]);
    assert!(ok, "{rep}");
    assert_eq!(rep["status"], "imported");
    assert_eq!(rep["creds"], true);
    assert_eq!(rep["keys"]["pre-key"], 2);
    assert_eq!(rep["keys"]["sender-key"], 1);
    let skipped: Vec<&str> = rep["skipped"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(skipped, ["notes.txt", "pre-key-9.json"], "{rep}");
    assert!(rep["skipped"][1]["reason"].as_str().unwrap().contains("would not read"), "{rep}");
    // One keys.set per type and the creds: few events.
    assert_eq!(events(&stack).await - before, 8, "{rep}");

    let a = stack.session("mig", "a");
    // The stored form is the Node client's: MessagePack, Buffers as bin.
    let pk = a.keys_get("pre-key", &["1"]).await.unwrap();
    assert_eq!(pk["1"], b"\x82\xa7private\xc4\x02\x01\x02\xa6public\xc4\x02\x03\x04");
    let lid = a.keys_get("lid-mapping", &["4915112345"]).await.unwrap();
    assert_eq!(lid["4915112345"], b"\xa9123456789");
    for (ty, id) in KEYS {
        assert!(a.keys_get(ty, &[id]).await.unwrap().contains_key(*id), "{ty} {id} imported under its un-escaped id");
    }
    assert!(a.keys_get("pre-key", &["9"]).await.unwrap().is_empty(), "the junk file was not imported");

    // Export: the files Baileys wrote, exactly.
    let out = stack.dir.path().join("out");
    let (ok, lines, err) = cli(&stack, &["export", "--tenant", "mig", "--session", "a", "--out", out.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    assert_eq!(lines[0]["keys"]["pre-key"], 2);
    let exported = out.join("a");
    let mut names: Vec<String> = std::fs::read_dir(&exported).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let mut expected: Vec<String> = FILES.iter().map(|(n, _)| n.to_string()).collect();
    expected.sort();
    assert_eq!(names, expected);
    for (name, text) in FILES {
        assert_eq!(std::fs::read_to_string(exported.join(name)).unwrap(), *text, "{name} as Baileys wrote it");
    }
    // Nothing is overwritten without --force.
    let (ok, _, err) = cli(&stack, &["export", "--tenant", "mig", "--session", "a", "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("--force"), "{err}");

    // The export imported into another session: every value byte for byte.
    let (ok, rep) = import(&stack, "b", &exported, &[]);
    assert!(ok, "{rep}");
    assert!(rep["skipped"].as_array().unwrap().is_empty(), "{rep}");
    let b = stack.session("mig", "b");
    assert_eq!(b.creds_get().await.unwrap(), a.creds_get().await.unwrap());
    for (ty, id) in KEYS {
        assert_eq!(b.keys_get(ty, &[id]).await.unwrap(), a.keys_get(ty, &[id]).await.unwrap(), "{ty} {id}");
    }
    let info_a = a.info().await.unwrap();
    let info_b = b.info().await.unwrap();
    assert_eq!((info_a.keys, info_a.bytes), (info_b.keys, info_b.bytes));

    // Again: unchanged, and with --force the same request ids: no event.
    let last = events(&stack).await;
    let (ok, rep) = import(&stack, "b", &exported, &[]);
    assert!(ok, "{rep}");
    assert_eq!(rep["status"], "unchanged");
    let (ok, rep) = import(&stack, "b", &exported, &["--force"]);
    assert!(ok, "{rep}");
    assert_eq!(rep["status"], "imported");
    assert_eq!(events(&stack).await, last, "a re-run appends nothing");

    // Different files into a session with state: refused without --force.
    std::fs::write(exported.join("pre-key-3.json"), FILES[1].1).unwrap();
    let (ok, rep) = import(&stack, "b", &exported, &[]);
    assert!(!ok, "{rep}");
    assert_eq!(rep["status"], "refused");
    assert_eq!(events(&stack).await, last, "a refused import appends nothing");
    let (ok, rep) = import(&stack, "b", &exported, &["--dry-run", "--force"]);
    assert!(ok && rep["status"] == "would-import", "{rep}");
    assert_eq!(events(&stack).await, last, "a dry run appends nothing");
    let (ok, rep) = import(&stack, "b", &exported, &["--force"]);
    assert!(ok, "{rep}");
    assert!(b.keys_get("pre-key", &["3"]).await.unwrap().contains_key("3"));
}

/// `--all` imports every session folder under a parent; a parent given as
/// one session, or a session folder given as a parent, is an error.
#[tokio::test]
async fn a_parent_of_folders_imports_each_as_its_session() {
    let stack = Stack::start().await;
    let parent = stack.dir.path().join("fleet");
    for s in ["bot-1", "bot-2"] {
        std::fs::create_dir_all(parent.join(s)).unwrap();
        std::fs::write(parent.join(s).join("creds.json"), FILES[0].1).unwrap();
        std::fs::write(parent.join(s).join("pre-key-1.json"), FILES[1].1).unwrap();
    }
    std::fs::create_dir_all(parent.join("empty")).unwrap();
    let p = parent.to_str().unwrap();
    let (ok, _, err) = cli(&stack, &["import", "--tenant", "mig", "--session", "x", "--from", p]);
    assert!(!ok && err.contains("--all"), "{err}");
    let (ok, _, err) = cli(&stack, &["import", "--tenant", "mig", "--all", "--from", parent.join("bot-1").to_str().unwrap()]);
    assert!(!ok && err.contains("--session"), "{err}");
    let (ok, lines, err) = cli(&stack, &["import", "--tenant", "mig", "--all", "--from", p, "--json"]);
    assert!(ok, "{err}");
    assert_eq!(lines.iter().map(|l| l["session"].as_str().unwrap()).collect::<Vec<_>>(), ["bot-1", "bot-2"]);
    assert!(err.contains("[2/2] mig/bot-2: imported"), "{err}");
    for s in ["bot-1", "bot-2"] {
        let info = stack.session("mig", s).info().await.unwrap();
        assert!(info.creds && info.keys["pre-key"] == 1, "{s}: {info:?}");
    }
}

/// An export that could not be faithful writes nothing: a value that is not
/// the Node client's MessagePack, or two ids that Baileys' escaping gives
/// one file name.
#[tokio::test]
async fn an_export_that_cannot_be_faithful_writes_nothing() {
    use bstore_api::client::key_data;
    let stack = Stack::start().await;
    let good = stack.session("mig", "good");
    good.creds_put(&crate::harness::rid(), b"\x80").await.unwrap();
    let bad = stack.session("mig", "bad");
    bad.creds_put(&crate::harness::rid(), b"\x80").await.unwrap();
    bad.keys_set(&crate::harness::rid(), &key_data([("pre-key", "1", Some(&b"junk"[..]))])).await.unwrap();
    let twins = stack.session("mig", "twins");
    twins.creds_put(&crate::harness::rid(), b"\x80").await.unwrap();
    twins
        .keys_set(
            &crate::harness::rid(),
            &key_data([("app-state-sync-key", "x/y", Some(&b"\xc0"[..])), ("app-state-sync-key", "x__y", Some(&b"\xc0"[..]))]),
        )
        .await
        .unwrap();
    let out = stack.dir.path().join("out");
    let (ok, _, err) = cli(&stack, &["export", "--tenant", "mig", "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("pre-key 1 is not a value the Node client wrote"), "{err}");
    assert!(!out.exists(), "nothing written");
    let (ok, _, err) = cli(&stack, &["export", "--tenant", "mig", "--session", "twins", "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("the same file name app-state-sync-key-x__y.json"), "{err}");
    assert!(!out.exists(), "nothing written");
    let (ok, _, err) = cli(&stack, &["export", "--tenant", "mig", "--session", "good", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(out.join("good/creds.json")).unwrap(), "{}");
}

/// FILES as a Redis-direct store holds them: `creds` and the file name
/// without `.json` (baileys-redis-auth 2.x escapes ids as file names; with
/// `raw`, the ids as they are, as Evolution API writes them), each value the
/// very text of the file.
fn fields(raw: bool) -> Vec<(String, String)> {
    FILES
        .iter()
        .map(|(name, text)| {
            let field = match name.strip_suffix(".json").unwrap() {
                "creds" => "creds".to_owned(),
                escaped if raw => {
                    let (ty, id) = baileys_store::tools::key_of_file(name).unwrap();
                    assert!(escaped.starts_with(ty));
                    format!("{ty}-{id}")
                }
                escaped => escaped.to_owned(),
            };
            (field, text.to_string())
        })
        .collect()
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

fn import_redis(stack: &Stack, tenant: &str, url: &str, extra: &[&str]) -> (bool, Vec<Value>, String) {
    let mut args = vec!["import", "--tenant", tenant, "--from-redis", url, "--json"];
    args.extend_from_slice(extra);
    cli(stack, &args)
}

/// Every key of FILES in `a` and `b` holds the same bytes, and so do the creds.
async fn same_values(stack: &Stack, a: (&str, &str), b: (&str, &str)) {
    let (a, b) = (stack.session(a.0, a.1), stack.session(b.0, b.1));
    assert_eq!(b.creds_get().await.unwrap(), a.creds_get().await.unwrap());
    for (ty, id) in KEYS {
        let got = b.keys_get(ty, &[id]).await.unwrap();
        assert!(got.contains_key(*id), "{ty} {id}");
        assert_eq!(got, a.keys_get(ty, &[id]).await.unwrap(), "{ty} {id}");
    }
}

/// A Redis hash per session (baileys-redis-auth's `<session>:auth`, ids
/// escaped; Evolution API's `<prefix>:instance:<id>`, ids as they are) is
/// imported into exactly the values the same files give, junk and corrupt
/// fields skipped with their reason; two stores in one Redis are named, not
/// guessed between; a re-run writes nothing, a session with other state is
/// refused without --force, a dry run writes nothing, a session that is not
/// there and a Redis that does not answer are errors.
#[tokio::test]
async fn redis_hashes_import_byte_for_byte_and_imports_are_idempotent() {
    let stack = Stack::start().await;
    let mut server = RedisServer::start();
    let url = server.url();
    let mut conn = redis_conn(&url).await;
    let mut hash = fields(false);
    hash.push(("pre-key-9".into(), "{\"private\":".into()));
    hash.push(("notes".into(), "hello".into()));
    let () = conn.hset_multiple("bot-1:auth", &hash).await.unwrap();
    // Not a session: no creds field; another kind of value.
    let () = conn.hset("other:auth", "x", "1").await.unwrap();
    let () = conn.set("plain", "1").await.unwrap();

    // The reference: the same files imported as a folder.
    let src = stack.dir.path().join("files");
    std::fs::create_dir_all(&src).unwrap();
    for (name, text) in FILES {
        std::fs::write(src.join(name), text).unwrap();
    }
    let (ok, rep) = import(&stack, "files", &src, &[]);
    assert!(ok, "{rep}");

    let before = events(&stack).await;
    let (ok, dry, err) = import_redis(&stack, "mig", &url, &["--all", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(err.contains("1 sessions, layout hash, key pattern '{session}:auth'"), "{err}");
    assert_eq!(dry.len(), 1);
    assert_eq!(dry[0]["status"], "would-import");
    assert_eq!(events(&stack).await, before, "a dry run appends nothing");
    assert!(!stack.session("mig", "bot-1").info().await.unwrap().exists);

    let (ok, lines, err) = import_redis(&stack, "mig", &url, &["--all"]);
    assert!(ok, "{err}");
    let rep = &lines[0];
    assert_eq!((rep["session"].as_str(), rep["status"].as_str()), (Some("bot-1"), Some("imported")), "{rep}");
    assert_eq!(rep["from"], "redis hash bot-1:auth");
    assert_eq!(rep["keys"]["pre-key"], 2);
    assert_eq!(rep["keys"]["app-state-sync-key"], 1);
    let skipped: Vec<(&str, &str)> =
        rep["skipped"].as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap(), s["reason"].as_str().unwrap())).collect();
    assert_eq!(skipped.len(), 2, "{rep}");
    assert_eq!(skipped[0].0, "notes");
    assert!(skipped[0].1.contains("known key type"), "{rep}");
    assert_eq!(skipped[1].0, "pre-key-9");
    assert!(skipped[1].1.contains("would not read"), "{rep}");
    assert_eq!(events(&stack).await - before, 8, "one keys.set per type and the creds");
    same_values(&stack, ("mig", "files"), ("mig", "bot-1")).await;
    let pk = stack.session("mig", "bot-1").keys_get("pre-key", &["1"]).await.unwrap();
    assert_eq!(pk["1"], b"\x82\xa7private\xc4\x02\x01\x02\xa6public\xc4\x02\x03\x04");

    // Again: unchanged; with --force, the same request ids: no event.
    let last = events(&stack).await;
    let (ok, lines, err) = import_redis(&stack, "mig", &url, &["--session", "bot-1"]);
    assert!(ok && lines[0]["status"] == "unchanged", "{err} {lines:?}");
    let (ok, lines, err) = import_redis(&stack, "mig", &url, &["--session", "bot-1", "--force"]);
    assert!(ok && lines[0]["status"] == "imported", "{err} {lines:?}");
    assert_eq!(events(&stack).await, last, "a re-run appends nothing");

    // Other state in the store: refused without --force; a dry run writes nothing.
    let () = conn.hset("bot-1:auth", "pre-key-3", FILES[1].1).await.unwrap();
    let (ok, lines, _) = import_redis(&stack, "mig", &url, &["--session", "bot-1"]);
    assert!(!ok && lines[0]["status"] == "refused", "{lines:?}");
    let (ok, lines, _) = import_redis(&stack, "mig", &url, &["--session", "bot-1", "--force", "--dry-run"]);
    assert!(ok && lines[0]["status"] == "would-import", "{lines:?}");
    assert_eq!(events(&stack).await, last, "neither a refusal nor a dry run appends");
    let (ok, _, err) = import_redis(&stack, "mig", &url, &["--session", "bot-1", "--force"]);
    assert!(ok, "{err}");
    assert!(stack.session("mig", "bot-1").keys_get("pre-key", &["3"]).await.unwrap().contains_key("3"));

    // Evolution API's hash beside it: two stores, named rather than guessed between.
    let () = conn.hset_multiple("evolution-cache:instance:evo-1", &fields(true)).await.unwrap();
    let (ok, lines, err) = import_redis(&stack, "mig", &url, &["--all"]);
    assert!(!ok && lines.is_empty(), "{lines:?}");
    assert!(err.contains("more than one store fits") && err.contains("--key-pattern 'evolution-cache:instance:{session}'"), "{err}");
    let (ok, lines, err) =
        import_redis(&stack, "mig", &url, &["--all", "--layout", "hash", "--key-pattern", "evolution-cache:instance:{session}"]);
    assert!(ok, "{err}");
    assert_eq!((lines.len(), lines[0]["session"].as_str(), lines[0]["status"].as_str()), (1, Some("evo-1"), Some("imported")));
    assert!(lines[0]["skipped"].as_array().unwrap().is_empty(), "{lines:?}");
    same_values(&stack, ("mig", "files"), ("mig", "evo-1")).await;

    // A session that is not there is an error, not an empty import.
    let (ok, lines, err) = import_redis(&stack, "mig", &url, &["--session", "bot-9", "--key-pattern", "{session}:auth"]);
    assert!(!ok && lines.is_empty() && err.contains("no Baileys auth state found"), "{err}");
    // A Redis that does not answer is an error, not "nothing there".
    let last = events(&stack).await;
    server.stop();
    let (ok, lines, err) = import_redis(&stack, "mig", &url, &["--all"]);
    assert!(!ok && lines.is_empty(), "{lines:?}");
    assert!(err.contains("connecting to") && !err.contains("no Baileys auth state"), "{err}");
    assert_eq!(events(&stack).await, last);
}

/// One key per record (baileys-redis-auth's `useRedisAuthState`) is
/// imported like the files; the session exported as a hash holds the very
/// texts Baileys wrote under the field names baileys-redis-auth reads, is
/// not overwritten without --force, and imported again holds every value
/// byte for byte.
#[tokio::test]
async fn redis_keys_import_and_hash_exports_round_trip() {
    let stack = Stack::start().await;
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = redis_conn(&url).await;
    for (field, text) in fields(false) {
        let () = conn.set(format!("bot-2:{field}"), text).await.unwrap();
    }
    let () = conn.set("bot-2:pre-key-7", "not json").await.unwrap();
    let () = conn.hset("bot-2:pre-key-8", "x", "1").await.unwrap();
    let src = stack.dir.path().join("files");
    std::fs::create_dir_all(&src).unwrap();
    for (name, text) in FILES {
        std::fs::write(src.join(name), text).unwrap();
    }
    let (ok, rep) = import(&stack, "files", &src, &[]);
    assert!(ok, "{rep}");

    let (ok, lines, err) = import_redis(&stack, "mig", &url, &["--all"]);
    assert!(ok, "{err}");
    assert!(err.contains("layout keys, key pattern '{session}'"), "{err}");
    assert_eq!((lines[0]["session"].as_str(), lines[0]["status"].as_str()), (Some("bot-2"), Some("imported")), "{lines:?}");
    assert_eq!(lines[0]["from"], "redis keys bot-2:*");
    let skipped = lines[0]["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{lines:?}");
    assert_eq!(skipped[0]["name"], "pre-key-8", "a record that is not a string key is reported");
    assert!(skipped[0]["reason"].as_str().unwrap().contains("no longer a string key"), "{lines:?}");
    assert_eq!(skipped[1]["name"], "pre-key-7");
    assert!(skipped[1]["reason"].as_str().unwrap().contains("would not read"), "{lines:?}");
    same_values(&stack, ("mig", "files"), ("mig", "bot-2")).await;
    // The Redis flags are refused beside a folder, not ignored.
    let (ok, _, err) = cli(&stack, &["import", "--tenant", "mig", "--all", "--from", src.to_str().unwrap(), "--layout", "keys"]);
    assert!(!ok && err.contains("go with --from-redis"), "{err}");
    let (ok, _, err) = cli(&stack, &["export", "--tenant", "mig", "--out", src.to_str().unwrap(), "--raw-ids"]);
    assert!(!ok && err.contains("go with --to-redis"), "{err}");
    let (ok, lines, _) = import_redis(&stack, "mig", &url, &["--session", "bot-2", "--layout", "keys"]);
    assert!(ok && lines[0]["status"] == "unchanged", "{lines:?}");

    // Out to a hash in another database, as baileys-redis-auth 2.x lays it out.
    let db1 = format!("{url}1");
    let (ok, out, err) = cli(&stack, &["export", "--tenant", "mig", "--session", "bot-2", "--to-redis", &db1, "--json"]);
    assert!(ok, "{err}");
    assert_eq!((out[0]["to"].as_str(), out[0]["keys"]["pre-key"].as_u64()), (Some("bot-2:auth"), Some(2)), "{out:?}");
    let mut conn1 = redis_conn(&db1).await;
    let written: std::collections::BTreeMap<String, String> = conn1.hgetall("bot-2:auth").await.unwrap();
    let expected: std::collections::BTreeMap<String, String> = fields(false).into_iter().collect();
    assert_eq!(written, expected, "the texts Baileys wrote, under the fields baileys-redis-auth reads");
    let (ok, _, err) = cli(&stack, &["export", "--tenant", "mig", "--session", "bot-2", "--to-redis", &db1]);
    assert!(!ok && err.contains("--force"), "{err}");
    // --force replaces the hash whole: a field the session does not have goes.
    let () = conn1.hset("bot-2:auth", "pre-key-99", FILES[1].1).await.unwrap();
    let (ok, _, err) = cli(&stack, &["export", "--tenant", "mig", "--session", "bot-2", "--to-redis", &db1, "--force"]);
    assert!(ok, "{err}");
    let written: std::collections::BTreeMap<String, String> = conn1.hgetall("bot-2:auth").await.unwrap();
    assert_eq!(written, expected);

    // Evolution API's form: ids as they are, under its name.
    let (ok, _, err) =
        cli(&stack, &["export", "--tenant", "mig", "--to-redis", &db1, "--key-pattern", "evolution:instance:{session}", "--raw-ids"]);
    assert!(ok, "{err}");
    let written: std::collections::BTreeMap<String, String> = conn1.hgetall("evolution:instance:bot-2").await.unwrap();
    assert_eq!(written, fields(true).into_iter().collect());

    // And back in: every value byte for byte.
    let (ok, lines, err) = import_redis(&stack, "back", &db1, &["--session", "bot-2", "--key-pattern", "{session}:auth"]);
    assert!(ok && lines[0]["status"] == "imported", "{err} {lines:?}");
    same_values(&stack, ("mig", "bot-2"), ("back", "bot-2")).await;
    let (a, b) = (stack.session("mig", "bot-2").info().await.unwrap(), stack.session("back", "bot-2").info().await.unwrap());
    assert_eq!((a.keys, a.bytes), (b.keys, b.bytes));
}

/// An import onto a session whose bot still runs on baileys-store (and so
/// holds its writer claim, answering reads from memory) is not refused nor
/// applied under the bot's feet: its writes wait out the claim's lease (409,
/// sent again with the same request ids) and then supersede it, so the bot's
/// next renewal is refused (410) and it stops reading from memory.
#[tokio::test]
async fn an_import_onto_a_claimed_session_waits_out_the_lease_and_supersedes_it() {
    let stack = Stack::start_with(&[("BSTORE__SESSIONS__CLAIM_LEASE_MS", "1500")]).await;
    let src = stack.dir.path().join("auth-claimed");
    std::fs::create_dir_all(&src).unwrap();
    for (name, text) in FILES {
        std::fs::write(src.join(name), text).unwrap();
    }
    let bot = stack.session("mig", "claimed");
    let claim = bot.claim(None).await.expect("session.claim").claim.expect("granted at once");
    let data = bstore_api::client::key_data([("pre-key", "99", Some(&b"the bot's"[..]))]);
    bot.keys_set_claimed("bot-1", &claim, &data).await.expect("the bot writes under its claim");
    // The bot keeps renewing (every 300 ms) while the import runs.
    let renewing = {
        let bot = stack.session("mig", "claimed");
        let claim = claim.clone();
        tokio::spawn(async move {
            loop {
                match bot.claim(Some(&claim)).await {
                    Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(300)).await,
                    Err(e) => return e.code(),
                }
            }
        })
    };
    let url = stack.nats.url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(service_bin())
            .args(["import", "--tenant", "mig", "--session", "claimed", "--force", "--json", "--from", src.to_str().unwrap()])
            .env("BSTORE_NATS_URL", url)
            .env("BSTORE_KEYS", KEY1)
            .env("BSTORE_LOG", "warn")
            .output()
            .expect("running baileys-store")
    })
    .await
    .unwrap();
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{rep}");
    assert_eq!(rep["status"], "imported", "{rep}");
    assert_eq!(tokio::time::timeout(std::time::Duration::from_secs(30), renewing).await.expect("the renewals end").unwrap(), Some(410));
    let info = bot.info().await.unwrap();
    assert!(info.creds && info.keys["pre-key"] == 3, "{info:?}");
}
