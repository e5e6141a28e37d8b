//! `baileys-store restore` against the real service: a session put back to
//! an earlier point as one new event, through its owning actor, with every
//! copy (memory, Redis, Mongo) following; refused where the history cannot
//! show the point; out of a bot's reach.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bstore_api::admin::{AdminError, RestoreBody, request_restore};
use bstore_api::client::{SessionClient, key_data};
use bstore_domain::SessionKey;
use serde_json::Value;

use crate::harness::{KEY1, Stack, fast_leases, history, rid, service_bin};
use crate::isolation::Fleet;
use crate::projections::Projected;

/// Runs the tool with `args` against the server at `url`: whether it
/// succeeded, its JSON lines (stdout), and its other output.
fn tool(url: &str, dir: &Path, args: &[&str]) -> (bool, Vec<Value>, String) {
    let out = std::process::Command::new(service_bin())
        .args(args)
        .env("BSTORE_NATS_URL", url)
        .env("BSTORE_KEYS", KEY1)
        .env("BSTORE_DATA_DIR", dir.join("tool"))
        .env("BSTORE_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .expect("running baileys-store");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    (out.status.success(), json, format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
}

/// `restore` with `args`, as JSON.
fn restore(url: &str, dir: &Path, args: &[&str]) -> (bool, Vec<Value>, String) {
    tool(url, dir, &[&["restore", "--json"], args].concat())
}

/// The creds and every key of `session` at `point` (`--seq N`, or the
/// latest state), by digest, from `state-at`.
fn contents(url: &str, dir: &Path, tenant: &str, session: &str, point: Option<u64>) -> (Option<String>, BTreeMap<String, String>) {
    let seq = point.unwrap_or(u64::MAX).to_string();
    let (ok, json, out) = tool(url, dir, &["state-at", "--tenant", tenant, "--session", session, "--seq", &seq, "--json"]);
    assert!(ok, "state-at: {out}");
    let at = &json[0];
    let keys = at["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (format!("{}/{}", k["type"].as_str().unwrap(), k["id"].as_str().unwrap()), k["sha256"].as_str().unwrap().to_owned()))
        .collect();
    (at["creds"]["sha256"].as_str().map(str::to_owned), keys)
}

fn last_seq(url: &str, tenant: &str, session: &str) -> u64 {
    history(url, tenant, session).iter().filter_map(|l| l["seq"].as_u64()).max().unwrap_or(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A good state (creds, two pre-keys, a large sender key), then what a
/// buggy bot makes of it; returns the sequence of the good state.
async fn good_then_corrupted(s: &SessionClient) -> u64 {
    let big: String = (0..3000).map(|i| format!("{i},")).collect();
    s.creds_put(&rid(), b"good creds").await.unwrap();
    let good = s
        .keys_set(
            &rid(),
            &key_data([
                ("pre-key", "1", Some(&b"a"[..])),
                ("pre-key", "2", Some(&b"b"[..])),
                ("sender-key", "g::u::0", Some(big.as_bytes())),
            ]),
        )
        .await
        .unwrap();
    s.creds_put(&rid(), b"corrupted creds").await.unwrap();
    let bigger = format!("{big}corrupted");
    s.keys_set(
        &rid(),
        &key_data([
            ("pre-key", "1", Some(&b"X"[..])),
            ("pre-key", "2", None),
            ("pre-key", "3", Some(&b"new"[..])),
            ("sender-key", "g::u::0", Some(bigger.as_bytes())),
        ]),
    )
    .await
    .unwrap();
    good
}

/// The restored state equals the state at its point (creds and every key),
/// `history` shows the restore with its point, the bot's next reads see it
/// from the actor, Redis and Mongo equal it (`verify`), a dry run and a
/// restore to where the session already is write nothing, and writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_puts_the_session_back_as_one_audited_event_and_every_copy_follows() {
    let p = Projected::start(true, true, true).await;
    let (url, dir) = (p.stack.nats.url(), p.stack.dir.path());
    let s = p.session("r1");
    let good = good_then_corrupted(&s).await;
    // The actor holds the corrupted state in memory.
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"corrupted creds"[..]));
    let before = last_seq(&url, "t", "r1");
    let wanted = contents(&url, dir, "t", "r1", Some(good));
    assert_ne!(contents(&url, dir, "t", "r1", None), wanted);

    // A dry run says what would change and writes nothing.
    let (ok, json, out) = restore(&url, dir, &["--tenant", "t", "--session", "r1", "--seq", &good.to_string(), "--dry-run"]);
    assert!(ok, "{out}");
    let r = &json[0];
    assert_eq!(
        (r["status"].as_str(), r["to_seq"].as_u64(), r["from_seq"].as_u64()),
        (Some("would_restore"), Some(good), Some(before)),
        "{r}"
    );
    assert_eq!(r["creds"], "set");
    assert_eq!(r["keys"]["pre-key"], serde_json::json!({ "set": 2, "deleted": 1 }), "{r}");
    assert_eq!(r["keys"]["sender-key"], serde_json::json!({ "set": 1, "deleted": 0 }), "{r}");
    assert_eq!(last_seq(&url, "t", "r1"), before, "a dry run appends nothing");

    // The restore.
    let (ok, json, out) = restore(&url, dir, &["--tenant", "t", "--session", "r1", "--seq", &good.to_string()]);
    assert!(ok, "{out}");
    let restored = json[0]["seq"].as_u64().unwrap();
    assert_eq!(json[0]["status"], "restored", "{out}");
    assert!(restored > before);
    assert_eq!(contents(&url, dir, "t", "r1", None), wanted, "the state after the restore is the state at its point");

    // One event, in the audit, naming its point.
    let lines = history(&url, "t", "r1");
    let last = lines.last().unwrap();
    assert_eq!(
        (last["seq"].as_u64(), last["kind"].as_str(), last["to_seq"].as_u64()),
        (Some(restored), Some("restored"), Some(good)),
        "{last}"
    );
    assert_eq!(lines.iter().filter(|l| l["seq"].as_u64() > Some(before)).count(), 1, "exactly one event was appended");

    // The bot reads the restored state at once, from the same actor.
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"good creds"[..]));
    let keys = s.keys_get("pre-key", &["1", "2", "3"]).await.unwrap();
    assert_eq!(
        (keys.get("1").map(Vec::as_slice), keys.get("2").map(Vec::as_slice), keys.get("3")),
        (Some(&b"a"[..]), Some(&b"b"[..]), None)
    );

    // A session restored to before its creds were written loses them, in
    // every copy too.
    let bare = p.session("r2");
    let keys_only = bare.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"k"[..]))])).await.unwrap();
    bare.creds_put(&rid(), b"creds written later").await.unwrap();
    let (ok, json, out) = restore(&url, dir, &["--tenant", "t", "--session", "r2", "--seq", &keys_only.to_string()]);
    assert!(ok, "{out}");
    assert_eq!((json[0]["status"].as_str(), json[0]["creds"].as_str()), (Some("restored"), Some("removed")), "{out}");
    assert_eq!(bare.creds_get().await.unwrap(), None);
    assert_eq!(bare.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"k");

    // Redis and Mongo hold what the log says (verify compares both).
    let report = p.verify_eventually(30).await;
    assert!(!report.contains("DIFF"), "{report}");

    // Once there, a restore to the same point writes nothing.
    let (ok, json, out) = restore(&url, dir, &["--tenant", "t", "--session", "r1", "--seq", &good.to_string()]);
    assert!(ok, "{out}");
    assert_eq!(json[0]["status"], "already_there", "{out}");
    assert_eq!(last_seq(&url, "t", "r1"), restored);

    // Writes go on after it.
    let next = s.keys_set(&rid(), &key_data([("pre-key", "4", Some(&b"after"[..]))])).await.unwrap();
    assert!(next > restored);
    assert_eq!(s.keys_get("pre-key", &["4"]).await.unwrap()["4"], b"after");
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"good creds"[..]));
}

/// A tenant's sessions that changed after a moment are restored to it,
/// each to its own last event before it: refused without --yes, listed by
/// a dry run, restored with --yes; a session untouched since is left alone.
#[tokio::test]
async fn a_tenant_restored_to_a_moment_needs_yes_and_leaves_unchanged_sessions_alone() {
    let stack = Stack::start().await;
    let (url, dir) = (stack.nats.url(), stack.dir.path());
    let names = ["m1", "m2", "m3"];
    let mut good_seq = BTreeMap::new();
    for name in names {
        let s = stack.session("fleet", name);
        s.creds_put(&rid(), format!("{name} good").as_bytes()).await.unwrap();
        good_seq.insert(name, s.keys_set(&rid(), &key_data([("session", "peer.0", Some(&b"good"[..]))])).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let moment = now_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for name in ["m1", "m2"] {
        let s = stack.session("fleet", name);
        s.keys_set(&rid(), &key_data([("session", "peer.0", Some(&b"broken"[..])), ("session", "peer.1", Some(&b"x"[..]))])).await.unwrap();
    }
    // A session paired after the moment is not put back to nothing.
    let newcomer = stack.session("fleet", "m4");
    newcomer.creds_put(&rid(), b"new").await.unwrap();
    let lasts: Vec<u64> = names.iter().map(|n| last_seq(&url, "fleet", n)).collect();
    let at = moment.to_string();

    let (ok, _, out) = restore(&url, dir, &["--tenant", "fleet", "--at-ms", &at]);
    assert!(!ok && out.contains("--yes") && out.contains("2 sessions"), "more than one session needs --yes: {out}");
    assert_eq!(names.iter().map(|n| last_seq(&url, "fleet", n)).collect::<Vec<_>>(), lasts, "nothing was written");

    let (ok, json, out) = restore(&url, dir, &["--tenant", "fleet", "--at-ms", &at, "--dry-run"]);
    assert!(ok, "{out}");
    let listed: Vec<(&str, &str)> = json.iter().map(|r| (r["session"].as_str().unwrap(), r["status"].as_str().unwrap())).collect();
    assert_eq!(listed, [("m1", "would_restore"), ("m2", "would_restore"), ("m4", "skipped")], "{out}");
    assert_eq!(json[2]["code"], "empty_point");
    assert_eq!(json[0]["keys"]["session"], serde_json::json!({ "set": 1, "deleted": 1 }));

    let (ok, json, out) = restore(&url, dir, &["--tenant", "fleet", "--at-ms", &at, "--yes"]);
    assert!(ok, "{out}");
    assert_eq!(json[2]["status"], "skipped", "{out}");
    assert_eq!(newcomer.creds_get().await.unwrap().as_deref(), Some(&b"new"[..]), "the newcomer is left as it is");
    for (r, name) in json.iter().zip(["m1", "m2"]) {
        assert_eq!(
            (r["session"].as_str(), r["status"].as_str(), r["to_seq"].as_u64()),
            (Some(name), Some("restored"), Some(good_seq[name])),
            "{r}"
        );
        assert_eq!(r["to_ms"], moment);
        let s = stack.session("fleet", name);
        assert_eq!(s.keys_get("session", &["peer.0", "peer.1"]).await.unwrap(), [("peer.0".to_owned(), b"good".to_vec())].into());
        let last = history(&url, "fleet", name).pop().unwrap();
        assert_eq!((last["kind"].as_str(), last["to_ms"].as_u64()), (Some("restored"), Some(moment)), "{last}");
    }
    assert_eq!(last_seq(&url, "fleet", "m3"), lasts[2], "m3 did not change after the moment and was not touched");
}

/// With two instances sharing the partitions, each session's restore is
/// decided by its owner, whichever instance that is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_instances_each_restore_reaches_the_sessions_owner() {
    let env = fast_leases();
    let stack = Stack::start_with(&env).await;
    let second = stack.another_service(&env);
    let (url, dir) = (stack.nats.url(), stack.dir.path());
    // The newcomer takes its share of the 16 partitions: the first hands 8 over.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.service.log_text().matches("handing a partition over to balance the cluster").count() < 8 {
        assert!(Instant::now() < deadline, "the partitions were not shared out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<String> = (0..16).map(|i| format!("n{i}")).collect();
    let mut good = BTreeMap::new();
    for name in &names {
        let s = stack.session("two", name).with_timeout(Duration::from_secs(10));
        let (r, data) = (rid(), key_data([("pre-key", "1", Some(&b"good"[..]))]));
        let seq = crate::harness::with_retries(Duration::from_secs(30), crate::harness::retryable, || s.keys_set(&r, &data)).await.unwrap();
        good.insert(name.clone(), seq);
    }
    let moment = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for name in &names {
        let s = stack.session("two", name).with_timeout(Duration::from_secs(10));
        let (r, bad) = (rid(), key_data([("pre-key", "1", Some(&b"bad"[..]))]));
        crate::harness::with_retries(Duration::from_secs(30), crate::harness::retryable, || s.keys_set(&r, &bad)).await.unwrap();
    }
    let (ok, json, out) = restore(&url, dir, &["--tenant", "two", "--at-ms", &moment.to_string(), "--yes"]);
    assert!(ok, "{out}");
    assert_eq!(json.len(), names.len(), "{out}");
    for r in &json {
        let name = r["session"].as_str().unwrap();
        assert_eq!((r["status"].as_str(), r["to_seq"].as_u64()), (Some("restored"), Some(good[name])), "{r}");
        let s = stack.session("two", name).with_timeout(Duration::from_secs(10));
        let got = crate::harness::with_retries(Duration::from_secs(30), crate::harness::retryable, || s.keys_get("pre-key", &["1"]))
            .await
            .unwrap();
        assert_eq!(got["1"], b"good", "{name}");
    }
    // Both instances decided some of them: each is the owner of half the partitions.
    for (which, log) in [("first", stack.service.log_text()), ("second", second.log_text())] {
        assert!(log.contains("session restored"), "the {which} instance restored none of 16 sessions");
    }
}

/// A bot of the tenant cannot restore its own session: the operator's
/// subject is not in its account (no responder), an op named like it on the
/// bots' subjects is unknown, and nothing is written. The operator's
/// identity, in the service's account, does reach it.
#[tokio::test]
async fn a_bot_cannot_reach_the_restore_subject() {
    let fleet = Fleet::start().await;
    let bot = fleet.bot("acme").await;
    let s = fleet.session(&bot, "acme", "victim");
    let good = s.creds_put(&rid(), b"good").await.unwrap();
    s.creds_put(&rid(), b"later").await.unwrap();
    let key = SessionKey::parse("acme", "victim").unwrap();
    let body = RestoreBody { rid: rid(), to_seq: good, to_ms: None, dry_run: false };
    let before = s.info().await.unwrap().seq;

    let err = request_restore(&bot, &key, &body, Duration::from_secs(3)).await.unwrap_err();
    assert_eq!(err, AdminError::NoResponders, "nothing answers the operator's subject in a bot's account");
    let payload = rmp_serde::to_vec_named(&body).unwrap();
    for subject in ["bstore.acme.victim.restore", "bstore.acme.victim.session.restore", "bstore.acme.victim.admin.restore"] {
        let answer = bot.request(subject, payload.clone().into()).await.unwrap();
        let code = answer.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")).map(|v| v.as_str().to_owned());
        assert_eq!(code.as_deref(), Some("404"), "{subject}");
    }
    // A bot publishing on the operator's subject with any reply: nothing.
    bot.publish_with_reply(bstore_api::admin::restore_subject(&key), "_INBOX.x", payload.clone().into()).await.unwrap();
    bot.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.info().await.unwrap().seq, before, "no restore was written");
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"later"[..]));

    // The operator's connection does reach it: the probes used the right subject.
    let ops = fleet.connect_as("bstore").await;
    let done = request_restore(&ops, &key, &body, Duration::from_secs(10)).await.unwrap();
    assert_eq!((done.to_seq, done.outcome), (good, bstore_session::RestoreOutcome::Restored));
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"good"[..]));
    // The same request again (a retry after a lost answer) lands once.
    let again = request_restore(&ops, &key, &body, Duration::from_secs(10)).await.unwrap();
    assert_eq!((again.outcome, again.seq), (bstore_session::RestoreOutcome::Retried, done.seq));
    assert_eq!(s.info().await.unwrap().seq, done.seq, "the retry wrote nothing");
}

/// A session its bot logged out (deleted) is restored to before the
/// deletion: the creds and keys come back, and the deletion stays in the
/// history.
#[tokio::test]
async fn a_session_deleted_by_its_bot_is_restored_to_before_the_deletion() {
    let stack = Stack::start().await;
    let (url, dir) = (stack.nats.url(), stack.dir.path());
    let s = stack.session("gone", "s");
    s.creds_put(&rid(), b"creds").await.unwrap();
    let before = s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"a"[..]))])).await.unwrap();
    s.delete(&rid()).await.unwrap();
    assert!(!s.info().await.unwrap().exists);
    let (ok, json, out) = restore(&url, dir, &["--tenant", "gone", "--session", "s", "--seq", &before.to_string()]);
    assert!(ok, "{out}");
    assert_eq!((json[0]["status"].as_str(), json[0]["creds"].as_str()), (Some("restored"), Some("set")), "{out}");
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"creds"[..]));
    assert_eq!(s.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"a");
    let kinds: Vec<String> = history(&url, "gone", "s").iter().map(|l| l["kind"].as_str().unwrap().to_owned()).collect();
    assert_eq!(kinds, ["creds_put", "keys_changed", "session_deleted", "restored"]);
}

/// Refusals, each with its code, and nothing written: an unknown session,
/// a point beyond the log, a point where the session held nothing, a point
/// before an erasure.
#[tokio::test]
async fn points_the_history_cannot_show_are_refused_with_their_codes() {
    let stack = Stack::start().await;
    let (url, dir) = (stack.nats.url(), stack.dir.path());
    let s = stack.session("ref", "s");
    stack.session("ref", "other").creds_put(&rid(), b"first in the log").await.unwrap();
    let first = s.creds_put(&rid(), b"one").await.unwrap();
    let last = s.creds_put(&rid(), b"two").await.unwrap();
    let refused = |args: &[&str]| {
        let (ok, json, out) = restore(&url, dir, &[&["--tenant", "ref"], args].concat());
        assert!(!ok, "{args:?} was not refused: {out}");
        (json[0]["status"].as_str().unwrap().to_owned(), json[0]["code"].as_str().unwrap().to_owned())
    };
    let no = |code: &str| ("refused".to_owned(), code.to_owned());
    assert_eq!(refused(&["--session", "nobody", "--seq", "1"]), no("unknown_session"));
    assert_eq!(refused(&["--session", "s", "--seq", &(last + 100).to_string()]), no("beyond_log"));
    assert_eq!(refused(&["--session", "s", "--seq", &(first - 1).to_string()]), no("empty_point"));
    assert_eq!(refused(&["--session", "s", "--at-ms", &(now_ms() + 3_600_000).to_string()]), no("beyond_log"));
    assert_eq!(last_seq(&url, "ref", "s"), last, "nothing was written");

    // After an erasure, nothing before its marker can be restored; after it, as usual.
    let (ok, _, out) = tool(&url, dir, &["erase", "--tenant", "ref", "--session", "s", "--yes"]);
    assert!(ok, "{out}");
    let again = s.creds_put(&rid(), b"after erasure").await.unwrap();
    s.creds_put(&rid(), b"later still").await.unwrap();
    assert_eq!(refused(&["--session", "s", "--seq", &last.to_string()]), no("history_gone"));
    let (ok, json, out) = restore(&url, dir, &["--tenant", "ref", "--session", "s", "--seq", &again.to_string()]);
    assert!(ok && json[0]["status"] == "restored", "{out}");
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"after erasure"[..]));
}

/// Under an audit retention, a point before the cut is refused; the first
/// point kept can be restored.
#[tokio::test]
async fn a_point_before_the_retention_cut_is_refused() {
    let stack = Stack::start_with(&[("BSTORE__SESSIONS__SNAPSHOT_EVERY_EVENTS", "5"), ("BSTORE__STREAM__RETENTION_SECS", "2")]).await;
    let (url, dir) = (stack.nats.url(), stack.dir.path());
    let s = stack.session("ret", "s");
    let oldest = s.creds_put(&rid(), b"old 0").await.unwrap();
    for i in 1..8 {
        s.creds_put(&rid(), format!("old {i}").as_bytes()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut kept = 0;
    for i in 0..8 {
        kept = s.keys_set(&rid(), &key_data([("pre-key", &i.to_string()[..], Some(&b"new"[..]))])).await.unwrap();
    }
    // The retention cuts once a snapshot runs it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let cut = loop {
        if let Some(first) = history(&url, "ret", "s").first().and_then(|l| l["retained_from_seq"].as_u64()) {
            break first - 1;
        }
        assert!(Instant::now() < deadline, "no retention cut was recorded");
        s.keys_set(&rid(), &key_data([("pre-key", "tick", Some(rid().as_bytes()))])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(cut > oldest);
    let (ok, json, out) = restore(&url, dir, &["--tenant", "ret", "--session", "s", "--seq", &oldest.to_string()]);
    assert!(!ok, "{out}");
    assert_eq!((json[0]["status"].as_str(), json[0]["code"].as_str()), (Some("refused"), Some("history_gone")), "{out}");
    let (ok, json, out) = restore(&url, dir, &["--tenant", "ret", "--session", "s", "--seq", &cut.to_string()]);
    assert!(ok && json[0]["status"] == "restored", "the cut itself is kept (its base snapshot): {out}");
    assert!(kept > cut);
    assert!(s.keys_get("pre-key", &["0"]).await.unwrap().is_empty(), "keys written after the cut are gone again");
}

/// Writes racing a restore: the restore applies to whatever state the actor
/// has when it runs, so every write acknowledged before its event is undone
/// by it and every write acknowledged after it stays — none is lost or
/// half-applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_a_restore_are_undone_before_it_and_kept_after_it() {
    let stack = Stack::start().await;
    let (url, dir) = (stack.nats.url(), stack.dir.path());
    let s = stack.session("race", "s");
    s.creds_put(&rid(), b"good").await.unwrap();
    let point = s.keys_set(&rid(), &key_data([("pre-key", "base", Some(&b"v"[..]))])).await.unwrap();
    let writer = {
        let s = s.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u32;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("w{i}");
                acked.push((id.clone(), s.keys_set(&rid(), &key_data([("pre-key", id.as_str(), Some(&b"w"[..]))])).await.unwrap()));
                i += 1;
            }
            acked
        });
        (stop, task)
    };
    // Some writes surely land before the restore.
    while last_seq(&url, "race", "s") < point + 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (url2, dir2) = (url.clone(), dir.to_path_buf());
    let (ok, json, out) =
        tokio::task::spawn_blocking(move || restore(&url2, &dir2, &["--tenant", "race", "--session", "s", "--seq", &point.to_string()]))
            .await
            .unwrap();
    assert!(ok, "{out}");
    let restored = json[0]["seq"].as_u64().unwrap();
    // And some after it.
    while last_seq(&url, "race", "s") < restored + 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.1.await.unwrap();
    let (before, after): (Vec<_>, Vec<_>) = acked.iter().partition(|(_, seq)| *seq < restored);
    assert!(!before.is_empty() && !after.is_empty(), "writes on both sides of the restore at {restored}");
    let ids: Vec<&str> = acked.iter().map(|(id, _)| id.as_str()).collect();
    let stored = s.keys_get("pre-key", &ids).await.unwrap();
    for (id, seq) in &acked {
        assert_eq!(stored.contains_key(id), *seq > restored, "{id} acknowledged at {seq}, restore at {restored}");
    }
    assert_eq!(s.keys_get("pre-key", &["base"]).await.unwrap()["base"], b"v");
}

/// On the embedded default the bots' account (BOTS) may publish only the
/// request subjects: a bot's restore is refused by the server and nothing is
/// written, while the tool, as the service user, restores.
#[tokio::test]
async fn on_the_embedded_default_a_bot_cannot_restore_and_the_tool_can() {
    let embedded = crate::auth::Embedded::start();
    let (bot, mut errors) = crate::auth::connect_as(&embedded.read("bot.url")).await;
    let s = SessionClient::new(bot.clone(), "bstore", "acme", "e1").with_timeout(Duration::from_secs(10));
    let good = s.creds_put(&rid(), b"good").await.unwrap();
    let later = s.creds_put(&rid(), b"later").await.unwrap();
    let key = SessionKey::parse("acme", "e1").unwrap();
    let body = RestoreBody { rid: rid(), to_seq: good, to_ms: None, dry_run: false };

    let tried = request_restore(&bot, &key, &body, Duration::from_secs(3)).await;
    assert!(tried.is_err(), "a bot's restore was answered: {tried:?}");
    let error = tokio::time::timeout(Duration::from_secs(5), errors.recv()).await.expect("the server reports an error").unwrap();
    assert!(error.contains("Permissions Violation for Publish to \"_BSTORE_ADMIN.restore.acme.e1\""), "{error}");
    assert_eq!(s.info().await.unwrap().seq, later, "nothing was written");

    let run = |args: &[&str]| {
        std::process::Command::new(service_bin())
            .args(args)
            .env("BSTORE_DATA_DIR", &embedded.data)
            .env_remove("BSTORE_NATS_URL")
            .env_remove("BSTORE_KEYS")
            .env("BSTORE_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = run(&["restore", "--tenant", "acme", "--session", "e1", "--seq", &good.to_string(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "restored", "{report}");
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"good"[..]));
}

/// A restore changes the session behind the memory of the client that holds
/// its writer claim, which answers reads from memory while its lease runs.
/// So the restore supersedes the claim as an unclaimed write does: it lands
/// only once the holder's lease has run out (the tool retries meanwhile),
/// the holder's next renewal or claimed write is refused (410) and applies
/// nothing, and what is read afterwards is the restored state.
#[tokio::test]
async fn a_restore_supersedes_a_writer_claim_and_lands_only_after_its_lease() {
    let stack = Stack::start_with(&[("BSTORE__SESSIONS__CLAIM_LEASE_MS", "1500")]).await;
    let (url, dir) = (stack.nats.url(), stack.dir.path());
    let s = stack.session("claimed", "s");
    let claim = s.claim(None).await.expect("session.claim");
    let id = claim.claim.clone().expect("the first claim is granted at once");
    let one = |v: &'static [u8]| key_data([("tctoken", "K", Some(v))]);
    let (good, _) = s.keys_set_claimed(&rid(), &id, &one(b"good")).await.expect("a claimed write");
    let (bad, _) = s.keys_set_claimed(&rid(), &id, &one(b"bad")).await.expect("a claimed write");
    // The holder keeps renewing while the restore runs.
    let renewing = {
        let s = stack.session("claimed", "s");
        let id = id.clone();
        tokio::spawn(async move {
            loop {
                match s.claim(Some(&id)).await {
                    Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(300)).await,
                    Err(e) => return e.code(),
                }
            }
        })
    };
    let dir2 = dir.to_owned();
    let url2 = url.clone();
    let (ok, json, out) =
        tokio::task::spawn_blocking(move || restore(&url2, &dir2, &["--tenant", "claimed", "--session", "s", "--seq", &good.to_string()]))
            .await
            .unwrap();
    assert!(ok, "{out}");
    assert_eq!(json[0]["status"].as_str(), Some("restored"), "{out}");
    let restored_at = json[0]["seq"].as_u64().expect("the restore's sequence");
    assert!(restored_at > bad, "{out}");
    // The holder was superseded: its renewals stopped with 410 ...
    assert_eq!(tokio::time::timeout(std::time::Duration::from_secs(30), renewing).await.expect("renewals end").unwrap(), Some(410));
    // ... and its claimed writes apply nothing.
    let refused = s.keys_set_claimed(&rid(), &id, &one(b"late")).await;
    assert_eq!(refused.as_ref().err().and_then(bstore_api::client::ClientError::code), Some(410), "{refused:?}");
    assert_eq!(s.keys_get("tctoken", &["K"]).await.unwrap()["K"], b"good");
    assert_eq!(last_seq(&url, "claimed", "s"), restored_at, "nothing after the restore");
}
