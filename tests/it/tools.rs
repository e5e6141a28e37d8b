//! The operators' tools on a real log: `state-at`.

use base64::Engine as _;
use bstore_api::client::key_data;
use serde_json::Value;

use crate::harness::{KEY1, Stack, rid, service_bin};

fn state_at(stack: &Stack, args: &[&str]) -> Value {
    let out = std::process::Command::new(service_bin())
        .args(["state-at", "--tenant", "ops", "--session", "s", "--json"])
        .args(args)
        .env("BSTORE_NATS_URL", stack.nats.url())
        .env("BSTORE_KEYS", KEY1)
        .env("BSTORE_LOG", "warn")
        .output()
        .expect("running baileys-store state-at");
    assert!(out.status.success(), "state-at {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn value_of(at: &Value, id: &str) -> Option<(Vec<u8>, u64)> {
    at["keys"].as_array().unwrap().iter().find(|k| k["type"] == "pre-key" && k["id"] == id).map(|k| {
        let v = k["value"].as_str().map(|v| base64::engine::general_purpose::STANDARD.decode(v).unwrap()).unwrap_or_default();
        (v, k["changed_at_seq"].as_u64().unwrap())
    })
}

/// Each point of a session's history reads back as it was: values, the
/// event that last changed each key, keys deleted later still there before,
/// creds from when they were put; values only when asked for.
#[tokio::test]
async fn state_at_shows_a_session_as_it_stood_at_each_point_of_its_history() {
    let stack = Stack::start().await;
    let s = stack.session("ops", "s");
    let a = s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"one"[..])), ("pre-key", "2", Some(&b"two"[..]))])).await.unwrap();
    let b = s.creds_put(&rid(), b"creds").await.unwrap();
    let c = s.keys_set(&rid(), &key_data([("pre-key", "1", None), ("pre-key", "2", Some(&b"TWO"[..]))])).await.unwrap();

    let at_a = state_at(&stack, &["--seq", &a.to_string(), "--values"]);
    assert_eq!(at_a["seq"], a);
    assert_eq!(value_of(&at_a, "1"), Some((b"one".to_vec(), a)));
    assert_eq!(value_of(&at_a, "2"), Some((b"two".to_vec(), a)));
    assert!(at_a["creds"].is_null(), "no creds before they were put: {at_a}");

    let at_b = state_at(&stack, &["--seq", &b.to_string()]);
    assert_eq!(at_b["creds"]["changed_at_seq"], b);
    assert_eq!(at_b["creds"]["bytes"], 5);
    assert!(at_b["keys"][0].get("value").is_none(), "values only with --values: {at_b}");

    let at_c = state_at(&stack, &["--seq", &c.to_string(), "--values"]);
    assert_eq!(value_of(&at_c, "1"), None, "deleted at {c}");
    assert_eq!(value_of(&at_c, "2"), Some((b"TWO".to_vec(), c)));
    assert_eq!(at_c["creds"]["changed_at_seq"], b);
    assert_eq!(at_c["keys"][0]["sha256"], sha256_hex(b"TWO"));

    // By time: everything up to now is the latest state; before the first
    // event, nothing.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert_eq!(state_at(&stack, &["--at-ms", &now_ms.to_string()])["seq"], c);
    let empty = state_at(&stack, &["--at-ms", "1"]);
    assert_eq!(empty["seq"], 0);
    assert!(empty["keys"].as_array().unwrap().is_empty());
}

/// `diff` between two points lists keys added, removed and changed.
#[tokio::test]
async fn diff_lists_what_changed_between_two_points() {
    let stack = Stack::start().await;
    let s = stack.session("ops", "s");
    let a = s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"one"[..])), ("pre-key", "2", Some(&b"two"[..]))])).await.unwrap();
    s.creds_put(&rid(), b"creds").await.unwrap();
    let c = s
        .keys_set(&rid(), &key_data([("pre-key", "1", None), ("pre-key", "2", Some(&b"TWO"[..])), ("pre-key", "3", Some(&b"3"[..]))]))
        .await
        .unwrap();
    let out = std::process::Command::new(service_bin())
        .args(["diff", "--tenant", "ops", "--session", "s", "--json", "--from", &a.to_string(), "--to", &c.to_string()])
        .env("BSTORE_NATS_URL", stack.nats.url())
        .env("BSTORE_KEYS", KEY1)
        .env("BSTORE_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["added"], serde_json::json!(["creds", "pre-key/3"]), "{d}");
    assert_eq!(d["removed"], serde_json::json!(["pre-key/1"]), "{d}");
    assert_eq!(d["changed"], serde_json::json!(["pre-key/2"]), "{d}");
}

fn history(stack: &Stack, args: &[&str]) -> Vec<u64> {
    let out = std::process::Command::new(service_bin())
        .args(["history", "--tenant", "ops", "--session", "s"])
        .args(args)
        .env("BSTORE_NATS_URL", stack.nats.url())
        .env("BSTORE_KEYS", KEY1)
        .env("BSTORE_LOG", "warn")
        .output()
        .expect("running baileys-store history");
    assert!(out.status.success(), "history {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap()).collect()
}

/// `history --type/--id` answers "what changed this key, when": only the
/// events that touched it, and the session's deletion, which touches all.
#[tokio::test]
async fn history_lists_only_the_events_that_changed_a_key_type_or_id() {
    let stack = Stack::start().await;
    let s = stack.session("ops", "s");
    let a = s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"one"[..]))])).await.unwrap();
    let b = s.creds_put(&rid(), b"creds").await.unwrap();
    let c = s.keys_set(&rid(), &key_data([("pre-key", "2", Some(&b"two"[..])), ("session", "x.0", Some(&b"s"[..]))])).await.unwrap();
    let d = s.keys_set(&rid(), &key_data([("pre-key", "1", None)])).await.unwrap();
    let e = s.delete(&rid()).await.unwrap();
    assert_eq!(history(&stack, &[]), [a, b, c, d, e]);
    assert_eq!(history(&stack, &["--type", "creds"]), [b, e]);
    assert_eq!(history(&stack, &["--type", "pre-key"]), [a, c, d, e]);
    assert_eq!(history(&stack, &["--type", "pre-key", "--id", "1"]), [a, d, e]);
    assert_eq!(history(&stack, &["--type", "session", "--id", "x.0"]), [c, e]);
}

fn sha256_hex(v: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, v).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
