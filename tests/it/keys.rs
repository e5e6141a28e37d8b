//! Sealing keys: a rotation that finishes on a running cluster (finding 6 of
//! the issue on integrity at rest), and the embedded default's generated key
//! kept apart from the data it protects (finding 8).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bstore_api::client::{ClientError, SessionClient, key_data};
use bstore_testkit::{MongoServer, NatsServer, RedisServer, ServiceProcess, TempDir};
use serde_json::Value;

use crate::harness::{KEY1, KEY2, connect, fast_leases, retryable, rid, service_bin, start_service_at, with_retries};

/// Both test keys, as `BSTORE_KEYS` takes them.
fn both_keys() -> String {
    format!("{KEY1},{KEY2}")
}

/// Short intervals so that projections catch up within a test.
const FAST: [(&str, &str); 4] = [
    ("BSTORE__REDIS__TIMEOUT", "0.5"),
    ("BSTORE__REDIS__CATCH_UP_INTERVAL", "0.3"),
    ("BSTORE__MONGO__BATCH_WAIT", "0.05"),
    ("BSTORE__MONGO__RETRY_MAX", "0.5"),
];

/// Runs `baileys-store <args>` with `keys` against `nats` (and the
/// projections given); returns whether it succeeded, its stdout and its
/// stderr.
async fn tool(nats: &NatsServer, dir: &TempDir, keys: &str, projections: &[(&str, String)], args: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(service_bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("BSTORE") {
            cmd.env_remove(k);
        }
    }
    cmd.env("BSTORE_NATS_URL", nats.url())
        .env("BSTORE_KEYS", keys)
        .env("BSTORE_DATA_DIR", dir.path().join("tool"))
        .env("NO_COLOR", "1")
        .env("BSTORE_LOG", "warn");
    for (k, v) in projections {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("running baileys-store");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn status_json(nats: &NatsServer, dir: &TempDir, keys: &str, projections: &[(&str, String)]) -> Value {
    let (ok, out, err) = tool(nats, dir, keys, projections, &["keys", "status", "--json"]).await;
    assert!(ok, "keys status failed:\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("keys status --json printed no JSON ({e}):\n{out}"))
}

/// The entry of key `id` in a `keys status --json` report.
fn key_entry(status: &Value, id: u64) -> &Value {
    status["keys"].as_array().unwrap().iter().find(|k| k["id"] == id).unwrap_or_else(|| panic!("no key {id} in {status:#}"))
}

/// What the load saw.
#[derive(Default)]
struct Seen {
    /// Errors by code (or kind), with one example each.
    errors: BTreeMap<String, (u64, String)>,
    /// Reads that did not return the value just acknowledged.
    stale: Vec<String>,
    /// The last acknowledged value of each key, by session.
    acked: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    writes: u64,
}

impl Seen {
    fn error(&mut self, what: &str, e: &ClientError) {
        let code = e.code().map_or_else(|| format!("{e:?}").split('(').next().unwrap_or_default().to_owned(), |c| c.to_string());
        let entry = self.errors.entry(code).or_insert((0, format!("{what}: {e}")));
        entry.0 += 1;
    }
}

/// Writes and reads sessions through both instances (the queue group picks
/// which one takes each request) until stopped: each round sets one of
/// eight keys to a new value, with the Node client's retries and the same
/// `rid`, then reads it back.
fn start_load(
    nc: async_nats::Client,
    sessions: usize,
    stop: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Seen>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..sessions)
        .map(|n| {
            let (nc, stop, seen) = (nc.clone(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let name = format!("s{n}");
                let s = SessionClient::new(nc, "bstore", "rot", &name).with_timeout(Duration::from_secs(5));
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("k{}", i % 8);
                    let value = format!("{name}-{i}").into_bytes();
                    let (r, data) = (rid(), key_data([("session", id.as_str(), Some(&value[..]))]));
                    match with_retries(Duration::from_secs(30), retryable, || s.keys_set(&r, &data)).await {
                        Ok(_) => {
                            let mut seen = seen.lock().unwrap();
                            seen.writes += 1;
                            seen.acked.entry(name.clone()).or_default().insert(id.clone(), value.clone());
                        }
                        Err(e) => seen.lock().unwrap().error("keys.set", &e),
                    }
                    let ids = [id.as_str()];
                    match with_retries(Duration::from_secs(30), retryable, || s.keys_get("session", &ids)).await {
                        Ok(got) => {
                            let acked = seen.lock().unwrap().acked.get(&name).and_then(|m| m.get(&id)).cloned();
                            if got.get(&id) != acked.as_ref() {
                                seen.lock().unwrap().stale.push(format!("{name}/{id} after write {i}"));
                            }
                        }
                        Err(e) => seen.lock().unwrap().error("keys.get", &e),
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            })
        })
        .collect()
}

/// Finding 6. Two instances share one nats-server, Redis and Mongo under a
/// write and read load through both. Key 2 is added to each (a restart at a
/// time), then `rotate-key 2` makes it current: no request is ever answered
/// 520, every acknowledged write reads back, the projections end re-sealed
/// under key 2, and `keys status` says what stays under key 1 (the log's
/// events) and that retiring key 1 would change the index key.
#[tokio::test]
async fn a_rotation_on_a_running_pair_finishes_with_no_unreadable_answer() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let mongo = MongoServer::start();
    let dir = TempDir::new("keys-rotation");
    let projections = [("BSTORE_REDIS_URL", redis.url()), ("BSTORE_MONGO_URL", mongo.url())];
    let key_file = |label: &str| dir.path().join(format!("keys-{label}"));
    let (file_a, file_b) = (key_file("a"), key_file("b"));
    std::fs::write(&file_a, format!("{KEY1}\n")).unwrap();
    std::fs::write(&file_b, format!("{KEY1}\n")).unwrap();
    let env = |file: &Path| -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = fast_leases().iter().chain(FAST.iter()).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        env.push(("BSTORE_KEY_FILE".into(), file.to_str().unwrap().into()));
        env.extend(projections.iter().map(|(k, v)| (k.to_string(), v.clone())));
        env
    };
    let start = |label: &str, file: &Path| {
        let env = env(file);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        start_service_at(&nats.url(), &dir, label, &env)
    };
    let mut a = start("a", &file_a);
    let mut b = start("b", &file_b);

    let nc = connect(&nats.url()).await;
    let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(std::sync::Mutex::new(Seen::default())));
    let load = start_load(nc.clone(), 4, stop.clone(), seen.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Step 1: key 2 opens everywhere before anything is sealed under it. A
    // gets it first; while B still lacks it, A hands its sessions over to
    // B once more (a restart, a crash, a rebalance): B must be able to read
    // everything A wrote meanwhile.
    std::fs::write(&file_a, format!("{KEY1}\n{KEY2}\n")).unwrap();
    a.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.terminate();
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.start_again();
    std::fs::write(&file_b, format!("{KEY1}\n{KEY2}\n")).unwrap();
    b.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Adding a key must not change what seals: an instance sealing under
    // key 2 while the other lacks it would make that one answer 520.
    let errors = seen.lock().unwrap().errors.clone();
    assert!(errors.is_empty(), "errors while key 2 was added one instance at a time (code: count, first): {errors:?}");
    let before = status_json(&nats, &dir, &both_keys(), &projections).await;
    assert_eq!(before["current"]["id"], 1, "adding a key seals nothing under it yet: {before:#}");
    assert_eq!(key_entry(&before, 2)["events"], 0, "{before:#}");

    // Step 2: the switch, and the projections written again under key 2.
    let (ok, out, err) = tool(&nats, &dir, &both_keys(), &projections, &["rotate-key", "2"]).await;
    assert!(ok, "rotate-key 2 failed:\n{out}\n{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.errors.is_empty(), "errors during the rotation (code: count, first): {:?}\nrotate-key said:\n{out}", seen.errors);
    assert!(seen.stale.is_empty(), "reads that missed the write just acknowledged: {:?}", seen.stale);
    assert!(seen.writes > 50, "the load ran ({} writes)", seen.writes);
    for (name, keys) in &seen.acked {
        let s = SessionClient::new(nc.clone(), "bstore", "rot", name).with_timeout(Duration::from_secs(5));
        let ids: Vec<&str> = keys.keys().map(String::as_str).collect();
        let got = with_retries(Duration::from_secs(30), retryable, || s.keys_get("session", &ids)).await.unwrap();
        for (id, v) in keys {
            assert_eq!(got.get(id), Some(v), "the last acknowledged value of {name}/{id}");
        }
    }
    assert!(a.log_text().contains("the cluster's sealing key changed") && b.log_text().contains("the cluster's sealing key changed"));

    // The projections agree with the log, and nothing in them is under key 1.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out, err) = tool(&nats, &dir, &both_keys(), &projections, &["verify"]).await;
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "verify still finds differences after the rotation:\n{out}\n{err}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = status_json(&nats, &dir, &both_keys(), &projections).await;
    assert_eq!(after["current"]["id"], 2, "{after:#}");
    let (k1, k2) = (key_entry(&after, 1), key_entry(&after, 2));
    assert_eq!(k1["redis_values"], 0, "redis re-sealed: {after:#}");
    assert_eq!(k1["mongo_values"], 0, "mongo re-sealed: {after:#}");
    assert!(k2["redis_values"].as_u64().unwrap() > 0 && k2["mongo_values"].as_u64().unwrap() > 0, "{after:#}");
    // Events are sealed under the sessions' data keys, which the rotation
    // re-wrapped: nothing of the log depends on key 1 any more.
    assert!(after["under_data_keys"]["events"].as_u64().unwrap() > 0, "{after:#}");
    assert_eq!(k1["events"], 0, "{after:#}");
    assert_eq!(k1["wrapped_data_keys"], 0, "data keys re-wrapped: {after:#}");
    assert!(k2["wrapped_data_keys"].as_u64().unwrap() > 0, "{after:#}");
    // Only the index key, derived from it, holds key 1 back.
    assert_eq!(k1["retirable"], false, "{after:#}");
    let notes = k1["notes"].to_string();
    assert!(notes.contains("would change the index key"), "{notes}");
    assert_eq!(after["instances"].as_array().unwrap().len(), 2, "{after:#}");
    assert!(after["instances"].as_array().unwrap().iter().all(|i| i["current"] == 2), "{after:#}");
    // The same for people.
    let (ok, text, _) = tool(&nats, &dir, &both_keys(), &projections, &["keys", "status"]).await;
    assert!(ok && text.contains("key 1:") && text.contains("key 2 (current):"), "{text}");
}

/// The other half of finding 6: nothing is sealed under a key some live
/// instance lacks. `rotate-key` refuses while an instance lacks the key or
/// holds another key under its id, and an instance whose ring lacks the
/// cluster's key refuses to start instead of answering 520.
#[tokio::test]
async fn a_key_some_instance_lacks_is_never_made_current() {
    let nats = NatsServer::start();
    let dir = TempDir::new("keys-refusals");
    let env = fast_leases();
    // The first start records the highest key of its ring: key 1 here.
    let _b = start_service_at(&nats.url(), &dir, "b", &env);
    let _a = start_service_at(&nats.url(), &dir, "a", &[&env[..], &[("BSTORE_KEYS", both_keys().as_str())]].concat());

    let (ok, out, err) = tool(&nats, &dir, &both_keys(), &[], &["rotate-key", "2"]).await;
    assert!(!ok, "refused while one instance has only key 1:\n{out}");
    assert!(err.contains("lacks key 2"), "{err}");
    let other2 = format!("{KEY1},{}", bstore_codec::Keyring::format_entry(2, &[3; 32]));
    let (ok, _, err) = tool(&nats, &dir, &other2, &[], &["rotate-key", "2"]).await;
    assert!(!ok && err.contains("another key under id 2"), "a different key 2 is refused too:\n{err}");
    let status = status_json(&nats, &dir, &both_keys(), &[]).await;
    assert_eq!(status["current"]["id"], 1, "{status:#}");
    assert_eq!(key_entry(&status, 2)["missing_on"].as_array().unwrap().len(), 1, "{status:#}");

    // An instance that lacks the recorded key does not start.
    let mut cmd = tokio::process::Command::new(service_bin());
    cmd.arg("serve").kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("BSTORE") {
            cmd.env_remove(k);
        }
    }
    cmd.env("BSTORE_NATS_URL", nats.url()).env("BSTORE_KEYS", KEY2).env("BSTORE_DATA_DIR", dir.path().join("data-c")).env("NO_COLOR", "1");
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.expect("it stops by itself").unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("the cluster seals under key 1") && text.contains("lacks"), "{text}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Finding 8. On the embedded default the generated key lives outside the
/// data dir (beside it, owner-only), nothing under the data dir holds it,
/// and the start-up message says where it is and to back it up apart from
/// the data. A restart reads the same key back.
#[tokio::test]
async fn the_embedded_default_keeps_its_generated_key_outside_the_data_dir() {
    let dir = TempDir::new("keys-embedded");
    let data = dir.path().join("data");
    let bin = bstore_testkit::find_bin("NATS_SERVER_BIN", ".tools/nats/bin/nats-server", "nats-server");
    let env =
        [("BSTORE_DATA_DIR", data.to_str().unwrap()), ("BSTORE__EMBEDDED__PORT", "-1"), ("BSTORE_NATS_SERVER_BIN", bin.to_str().unwrap())];
    let mut service = ServiceProcess::start(service_bin(), &env, &dir.path().join("logs"));

    let key_file = dir.path().join("data.keys").join("sealing.keys");
    let text = std::fs::read_to_string(&key_file).unwrap_or_else(|e| panic!("no key at {}: {e}", key_file.display()));
    let entry = text.lines().find(|l| l.starts_with("1:")).expect("a key entry");
    let key_b64 = entry.strip_prefix("1:").unwrap();
    assert_eq!(mode(&key_file), 0o600);
    assert_eq!(mode(key_file.parent().unwrap()), 0o700);
    for file in files_under(&data) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains(key_b64), "the key is in {}", file.display());
    }
    assert!(!data.join("sealing.keys").exists());
    let log = service.log_text();
    let line = log.lines().find(|l| l.contains("GENERATED A NEW SEALING KEY")).unwrap_or_else(|| panic!("no start-up message:\n{log}"));
    assert!(line.contains(key_file.to_str().unwrap()), "the message names the file: {line}");
    assert!(line.contains("Back this file up separately from the data"), "{line}");

    // What was written is read back after a restart, under the same key.
    let bot_url = std::fs::read_to_string(data.join("bot.url")).unwrap();
    let (bot, _errors) = crate::auth::connect_as(bot_url.trim()).await;
    let s = SessionClient::new(bot, "bstore", "emb", "s").with_timeout(Duration::from_secs(10));
    s.keys_set(&rid(), &key_data([("session", "k", Some(&b"v"[..]))])).await.unwrap();
    service.terminate();
    service.start_again();
    let log = service.log_text();
    assert!(log.contains("using the sealing key generated earlier") && log.contains(key_file.to_str().unwrap()), "{log}");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), text, "the same key");
    let bot_url = std::fs::read_to_string(data.join("bot.url")).unwrap();
    let (bot, _errors) = crate::auth::connect_as(bot_url.trim()).await;
    let s = SessionClient::new(bot, "bstore", "emb", "s").with_timeout(Duration::from_secs(10));
    let got = with_retries(Duration::from_secs(30), retryable, || s.keys_get("session", &["k"])).await.unwrap();
    assert_eq!(got.get("k").map(Vec::as_slice), Some(&b"v"[..]));
}
