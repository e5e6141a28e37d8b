//! The spine end to end: keys.set over NATS to a session actor, one event in
//! JetStream, served back by keys.get, surviving restarts.

use bstore_api::client::{SessionClient, key_data};
use bstore_testkit::{ServiceProcess, TempDir, wait_for};

use crate::harness::{Stack, rid, service_bin};

#[tokio::test]
async fn keys_set_then_get_returns_the_bytes_written_across_types() {
    let stack = Stack::start().await;
    let s = stack.session("acme", "bot-1");
    let session_record = vec![7u8; 3000];
    let seq = s
        .keys_set(
            &rid(),
            &key_data([
                ("pre-key", "1", Some(&b"\x00\x01pk1"[..])),
                ("pre-key", "2", Some(&b"pk2"[..])),
                ("session", "123.0", Some(&session_record[..])),
                ("future-type", "x", Some(&b"unknown types round-trip"[..])),
            ]),
        )
        .await
        .unwrap();
    assert!(seq > 0);

    let got = s.keys_get("pre-key", &["1", "2", "3"]).await.unwrap();
    assert_eq!(got.len(), 2, "missing ids are left out");
    assert_eq!(got["1"], b"\x00\x01pk1");
    assert_eq!(s.keys_get("session", &["123.0"]).await.unwrap()["123.0"], session_record);
    assert_eq!(s.keys_get("future-type", &["x"]).await.unwrap()["x"], b"unknown types round-trip");

    // One call with a delete and a write applies both.
    s.keys_set(&rid(), &key_data([("pre-key", "1", None), ("pre-key", "4", Some(&b"pk4"[..]))])).await.unwrap();
    let got = s.keys_get("pre-key", &["1", "2", "4"]).await.unwrap();
    assert_eq!(got.keys().map(String::as_str).collect::<std::collections::BTreeSet<_>>(), ["2", "4"].into());

    let info = s.info().await.unwrap();
    assert_eq!(info.keys["pre-key"], 2);
    assert_eq!(info.keys["session"], 1);
    assert_eq!(info.events, 2, "two keys.set calls, two events");
    assert!(!info.creds);
}

#[tokio::test]
async fn creds_round_trip_and_delete_forgets_the_session() {
    let stack = Stack::start().await;
    let s = stack.session("acme", "bot-2");
    assert_eq!(s.creds_get().await.unwrap(), None);
    s.creds_put(&rid(), b"creds v1").await.unwrap();
    s.creds_put(&rid(), b"creds v2").await.unwrap();
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"creds v2"[..]));
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"x"[..]))])).await.unwrap();
    s.delete(&rid()).await.unwrap();
    assert_eq!(s.creds_get().await.unwrap(), None);
    assert!(s.keys_get("pre-key", &["1"]).await.unwrap().is_empty());
    assert!(!s.info().await.unwrap().exists);
    // Another session of the same tenant was never touched.
    assert_eq!(stack.session("acme", "bot-3").creds_get().await.unwrap(), None);
}

#[tokio::test]
async fn a_retried_request_id_is_applied_once() {
    let stack = Stack::start().await;
    let s = stack.session("t", "s");
    let id = rid();
    let first = s.keys_set(&id, &key_data([("pre-key", "1", Some(&b"a"[..]))])).await.unwrap();
    // A different write under the same id is a retry of the first, not a new write.
    let again = s.keys_set(&id, &key_data([("pre-key", "1", Some(&b"b"[..]))])).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(s.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"a");
    assert_eq!(s.info().await.unwrap().events, 1);
}

#[tokio::test]
async fn state_survives_a_service_restart() {
    let mut stack = Stack::start().await;
    let s = stack.session("t", "restart");
    s.creds_put(&rid(), b"creds").await.unwrap();
    s.keys_set(&rid(), &key_data([("sender-key", "g@g.us::u::0", Some(&[9u8; 28_000][..]))])).await.unwrap();
    stack.service.restart();
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"creds"[..]));
    assert_eq!(s.keys_get("sender-key", &["g@g.us::u::0"]).await.unwrap()["g@g.us::u::0"], vec![9u8; 28_000]);
}

#[tokio::test]
async fn a_large_baileys_call_fits() {
    // 812 pre-keys in one call, as Baileys v7 uploads them, and a 1.3 MB
    // app-state version.
    let stack = Stack::start().await;
    let s = stack.session("t", "big");
    let ids: Vec<String> = (1..=812).map(|i| i.to_string()).collect();
    let value = [1u8; 160];
    let big = vec![2u8; 1_300_000];
    let mut entries: Vec<(&str, &str, Option<&[u8]>)> = ids.iter().map(|i| ("pre-key", i.as_str(), Some(&value[..]))).collect();
    entries.push(("app-state-sync-version", "regular_high", Some(&big[..])));
    s.keys_set(&rid(), &key_data(entries)).await.unwrap();
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(s.keys_get("pre-key", &all).await.unwrap().len(), 812);
    assert_eq!(s.keys_get("app-state-sync-version", &["regular_high"]).await.unwrap()["regular_high"].len(), 1_300_000);
}

#[tokio::test]
async fn the_micro_service_answers_ping_and_stats() {
    let stack = Stack::start().await;
    stack.session("t", "s").info().await.unwrap();
    let ping = stack.nc.request("$SRV.PING.baileys-store", "".into()).await.unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "baileys-store");
    let stats = stack.nc.request("$SRV.STATS.baileys-store", "".into()).await.unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    // The figures are the service's own, in `data` (requests also arrive on
    // partition subjects, which the micro-service counters do not see).
    let data = &stats["endpoints"][0]["data"];
    assert_eq!(data["ops"]["session.info"]["requests"], 1, "{stats}");
    assert_eq!(data["ops"]["session.info"]["latency_us_le"]["+Inf"], 1, "{stats}");
}

#[tokio::test]
async fn with_no_configuration_it_runs_its_own_nats_server_and_keeps_data_across_restarts() {
    let dir = TempDir::new("embedded");
    let data = dir.path().join("data");
    let bin = bstore_testkit::find_bin("NATS_SERVER_BIN", ".tools/nats/bin/nats-server", "nats-server");
    let env =
        [("BSTORE_DATA_DIR", data.to_str().unwrap()), ("BSTORE__EMBEDDED__PORT", "-1"), ("BSTORE_NATS_SERVER_BIN", bin.to_str().unwrap())];
    let mut service = ServiceProcess::start(service_bin(), &env, &dir.path().join("logs"));
    assert!(service.log_text().contains("GENERATED A NEW SEALING KEY"), "the generated key is announced");
    let key_file = dir.path().join("data.keys").join("sealing.keys");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the key file is private to its owner");

    // Bots connect with the URL and password the service wrote for them.
    let s = SessionClient::new(connect_bot(&data).await, "bstore", "t", "s");
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"written"[..]))])).await.unwrap();

    service.restart();
    assert!(!service.log_text().split("serving requests").nth(1).unwrap().contains("GENERATED"), "the key is reused");
    wait_for(10, "the readiness file", || data.join(baileys_store::READY_FILE).exists().then_some(()));
    let s = SessionClient::new(connect_bot(&data).await, "bstore", "t", "s");
    assert_eq!(s.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"written");

    // `verify` means something here too: with no projection it checks the
    // log alone, through the running embedded server, and passes.
    let out = std::process::Command::new(service_bin()).arg("verify").envs(env).env("BSTORE_LOG", "warn").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "verify on the embedded default: {text}");
    assert!(text.contains("verified 1 sessions against the log alone: 0 differences"), "{text}");
}

/// Connects as the embedded server's bot user, from `data/bot.url`
/// (`nats://bot:<password>@127.0.0.1:<port>`).
async fn connect_bot(data: &std::path::Path) -> async_nats::Client {
    let url = wait_for(10, "bot.url", || std::fs::read_to_string(data.join("bot.url")).ok());
    let rest = url.trim().strip_prefix("nats://").expect("a nats:// URL");
    let (userinfo, host) = rest.split_once('@').expect("credentials in the bot URL");
    let (user, password) = userinfo.split_once(':').expect("user:password");
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .connect(format!("nats://{host}"))
        .await
        .expect("the bot URL's credentials are accepted")
}

#[tokio::test]
async fn external_servers_without_a_key_are_refused() {
    let nats = bstore_testkit::NatsServer::start();
    let dir = TempDir::new("nokey");
    let out = std::process::Command::new(service_bin())
        .arg("serve")
        .env("BSTORE_NATS_URL", nats.url())
        .env("BSTORE_DATA_DIR", dir.path())
        .env_remove("BSTORE_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sealing key configured"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_shipped_nats_server_configurations_are_valid() {
    let bin = bstore_testkit::find_bin("NATS_SERVER_BIN", ".tools/nats/bin/nats-server", "nats-server");
    let deploy = bstore_testkit::repo_root().join("deploy");
    let mut checked = 0;
    for entry in std::fs::read_dir(deploy).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "conf") {
            let out = std::process::Command::new(&bin).arg("-c").arg(&path).arg("-t").output().unwrap();
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 4);
}

#[tokio::test]
async fn history_lists_every_change_in_order_without_values() {
    let stack = Stack::start().await;
    let s = stack.session("acme", "audited");
    s.creds_put("r-creds", b"SECRET-CREDS").await.unwrap();
    s.keys_set("r-keys", &key_data([("pre-key", "1", Some(&b"SECRET-KEY"[..])), ("pre-key", "2", Some(&b"x"[..]))])).await.unwrap();
    s.keys_set("r-del", &key_data([("pre-key", "1", None)])).await.unwrap();
    s.delete("r-logout").await.unwrap();

    let out = std::process::Command::new(service_bin())
        .args(["history", "--tenant", "acme", "--session", "audited"])
        .env("BSTORE_NATS_URL", stack.nats.url())
        .env("BSTORE_KEYS", crate::harness::KEY1)
        .env("BSTORE_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("SECRET"), "history must not print values: {text}");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["creds_put", "keys_changed", "keys_changed", "session_deleted"]);
    let rids: Vec<&str> = lines.iter().map(|l| l["rid"].as_str().unwrap()).collect();
    assert_eq!(rids, ["r-creds", "r-keys", "r-del", "r-logout"]);
    assert_eq!(lines[1]["keys"]["pre-key"]["set"], serde_json::json!(["1", "2"]));
    assert_eq!(lines[2]["keys"]["pre-key"]["deleted"], serde_json::json!(["1"]));
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in log order: {seqs:?}");
}

#[tokio::test]
async fn sessions_past_the_bound_and_idle_sessions_stop_and_come_back_intact() {
    // On two arbiter threads of their own, the other way sessions can run.
    let mut stack = Stack::start_with(&[
        ("BSTORE__SESSIONS__MAX_ACTIVE", "2"),
        ("BSTORE__SESSIONS__IDLE_TIMEOUT_SECS", "1"),
        ("BSTORE__SESSIONS__WORKERS", "2"),
    ])
    .await;
    let names = ["a", "b", "c", "d"];
    for n in names {
        stack.session("t", n).keys_set(&rid(), &key_data([("pre-key", "1", Some(n.as_bytes()))])).await.unwrap();
    }
    // Four sessions through a bound of two: the least recently used were stopped...
    assert!(stack.service.log_text().contains("passivating least recently used session"));
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    assert!(stack.service.log_text().contains("stopping idle session"), "idle sessions stop");
    // ...and every one of them reloads from the log with its data.
    for n in names {
        assert_eq!(stack.session("t", n).keys_get("pre-key", &["1"]).await.unwrap()["1"], n.as_bytes());
    }
    let status = stack.service.terminate().unwrap();
    assert!(status.success(), "SIGTERM is a clean shutdown: {status}");
    assert!(stack.service.log_text().contains("stopped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_sessions_than_the_servers_consumer_limit_load_in_quick_succession() {
    // Each load replays its session through a JetStream consumer; the server
    // caps consumers per stream (1,000 by default in nats-server 2.15), so
    // consumers must not outlive their load.
    let mut stack = Stack::start().await;
    let n = 1100;
    let clients: Vec<_> = (0..n).map(|i| stack.session("many", &format!("s{i}"))).collect();
    let data = key_data([("pre-key", "1", Some(&b"v"[..]))]);
    let write = clients.iter().map(|c| c.keys_set("r1", &data));
    for r in futures_util::future::join_all(write).await {
        r.unwrap();
    }
    stack.service.restart();
    let mut failures = Vec::new();
    for chunk in clients.chunks(50) {
        let reads = futures_util::future::join_all(chunk.iter().map(|c| c.keys_get("pre-key", &["1"]))).await;
        failures.extend(reads.into_iter().filter_map(|r| match r {
            Ok(v) if v.get("1").map(Vec::as_slice) == Some(&b"v"[..]) => None,
            other => Some(format!("{other:?}")),
        }));
    }
    assert!(failures.is_empty(), "{} of {n} loads failed, first: {:?}", failures.len(), failures.first());
}
