//! The service never publishes where a bot chose: reply subjects outside the
//! inbox prefixes are refused, logged and counted — tried in one shared
//! account, where nothing but the service's own check stands in the way.

use std::time::Duration;

use bstore_api::client::key_data;

use crate::harness::{Stack, rid};

async fn stream_state(nc: &async_nats::Client) -> (u64, u64) {
    let js = async_nats::jetstream::new(nc.clone());
    let mut stream = js.get_stream("BSTORE_EVENTS").await.expect("the event stream exists");
    let info = stream.info().await.unwrap();
    (info.state.messages, info.state.last_sequence)
}

#[tokio::test]
async fn reply_subjects_naming_jetstream_or_events_are_refused_logged_and_counted() {
    let stack = Stack::start().await;
    let victim = stack.session("other", "victim");
    victim.creds_put(&rid(), b"victim creds").await.unwrap();
    victim.keys_set(&rid(), &key_data([("session", "a", Some(&b"v"[..]))])).await.unwrap();
    let before = stream_state(&stack.nc).await;

    let hostile = [
        "$JS.API.STREAM.PURGE.BSTORE_EVENTS",
        "$JS.API.STREAM.DELETE.BSTORE_EVENTS",
        "$JS.API.STREAM.MSG.DELETE.BSTORE_EVENTS",
        "bstore-events.other.victim",
        "$KV.BSTORE_LEASES.p.0",
        "_INBOX.>",
    ];
    // Known ops, an unknown op, a malformed subject: none gets a reply out.
    let subjects = ["bstore.acme.bot.creds.get", "bstore.acme.bot.session.delete", "bstore.acme.bot.keys.drop", "bstore.acme"];
    for reply in hostile {
        for subject in subjects {
            stack.nc.publish_with_reply(subject, reply, "".into()).await.unwrap();
        }
    }
    stack.nc.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(stream_state(&stack.nc).await, before, "the event stream was changed through a reply subject");
    assert_eq!(victim.creds_get().await.unwrap().as_deref(), Some(&b"victim creds"[..]), "the victim's session is intact and readable");
    assert_eq!(victim.keys_get("session", &["a"]).await.unwrap()["a"], b"v");

    let stats = stack.nc.request("$SRV.STATS.baileys-store", "".into()).await.unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    let refused = stats["endpoints"][0]["data"]["routing"]["refused_reply_subjects"].as_u64().unwrap();
    assert_eq!(refused, (hostile.len() * subjects.len()) as u64, "every refusal is counted: {stats}");
    let logs = stack.service.log_text();
    assert!(logs.contains("refused a request whose reply subject is outside the inbox prefixes"), "refusals are logged");
    assert!(!stats.to_string().contains("acme") && !stats.to_string().contains("victim"), "figures name no tenant or session: {stats}");
}

#[tokio::test]
async fn an_ordinary_inbox_is_still_answered() {
    let stack = Stack::start().await;
    let s = stack.session("acme", "bot");
    s.creds_put(&rid(), b"c").await.unwrap();
    // A hand-made inbox under _INBOX. is a reply subject like any other.
    let inbox = format!("_INBOX.hand.{}", rid());
    let mut sub = stack.nc.subscribe(inbox.clone()).await.unwrap();
    stack.nc.publish_with_reply("bstore.acme.bot.creds.get", inbox, "".into()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(&mut sub)).await.unwrap().unwrap();
    assert!(answer.headers.is_none_or(|h| h.get("Nats-Service-Error-Code").is_none()), "answered without error");
    assert!(!answer.payload.is_empty());
}

#[tokio::test]
async fn past_max_in_flight_requests_are_shed_with_a_coded_503_and_counted() {
    let stack = Stack::start_with(&[("BSTORE__API__MAX_IN_FLIGHT", "2")]).await;
    let big = vec![7u8; 1 << 20];
    let mut calls = Vec::new();
    for i in 0..40 {
        let s = stack.session("acme", &format!("s{}", i % 8));
        let big = big.clone();
        calls.push(tokio::spawn(async move {
            let id = format!("k{i}");
            s.keys_set(&rid(), &key_data([("app-state-sync-version", id.as_str(), Some(&big[..]))])).await
        }));
    }
    let (mut ok, mut shed) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Some(503) && e.to_string().contains("overloaded") => shed += 1,
            Err(e) => panic!("neither served nor shed: {e:?}"),
        }
    }
    assert!(shed > 0, "40 concurrent 1 MiB writes never exceeded 2 in flight");
    assert!(ok > 0, "the instance still served within its bound");
    let stats = stack.nc.request("$SRV.STATS.baileys-store", "".into()).await.unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    assert_eq!(stats["endpoints"][0]["data"]["routing"]["shed_overloaded"].as_u64(), Some(shed), "{stats}");
}
