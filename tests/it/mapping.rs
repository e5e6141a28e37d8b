//! Two instances behind a server with the partition mapping: requests go
//! straight to their session's owner (nothing is forwarded), and reads right
//! after acknowledged writes are never stale.

use std::time::Duration;

use bstore_api::client::{SessionClient, key_data};
use bstore_testkit::{NatsServer, TempDir};
use futures_util::StreamExt;

use crate::harness::{connect, fast_leases, retryable, rid, start_service_at, with_retries};

const MAPPING: &str =
    r#"mappings: { "bstore.*.*.*.*": "bstore-p.{{partition(16,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}.{{wildcard(4)}}" }"#;

/// The routing figures of every running instance, summed.
async fn forwarded(nc: &async_nats::Client, instances: usize) -> (u64, usize) {
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await.unwrap();
    nc.publish_with_reply("$SRV.STATS.baileys-store", inbox, "".into()).await.unwrap();
    let (mut total, mut seen) = (0, 0);
    while seen < instances {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), sub.next()).await else { break };
        let stats: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        total += stats["endpoints"][0]["data"]["routing"]["forwarded_to_owner"].as_u64().unwrap();
        seen += 1;
    }
    (total, seen)
}

#[tokio::test]
async fn with_the_server_mapping_requests_reach_their_owner_directly() {
    let nats = NatsServer::start_conf(MAPPING);
    let dir = TempDir::new("mapping");
    let leases = fast_leases();
    let _a = start_service_at(&nats.url(), &dir, "a", &leases);
    let b = start_service_at(&nats.url(), &dir, "b", &leases);
    let nc = connect(&nats.url()).await;
    // The first instance took every partition; wait until it has handed
    // half of them to the second (a request drained at a hand-over is
    // passed on, and would count as forwarded).
    bstore_testkit::wait_for(30, "the partitions split 8/8", || b.log_text().contains("held=8").then_some(()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (before, seen) = forwarded(&nc, 2).await;
    assert_eq!(seen, 2, "both instances answer $SRV.STATS");

    let mut stale = Vec::new();
    for i in 0..100u32 {
        let s = SessionClient::new(nc.clone(), "bstore", "acme", &format!("s{}", i % 20));
        let v = i.to_be_bytes();
        let data = key_data([("session", "k", Some(&v[..]))]);
        let id = rid();
        let seq = with_retries(Duration::from_secs(30), retryable, || s.keys_set(&id, &data)).await.unwrap();
        let (got, at) = with_retries(Duration::from_secs(30), retryable, || s.keys_get_with_seq("session", &["k"])).await.unwrap();
        if got.get("k").map(Vec::as_slice) != Some(&v[..]) || at < seq {
            stale.push(format!("s{}: wrote {i} at seq {seq}, read {:?} at seq {at}", i % 20, got.get("k")));
        }
    }
    assert!(stale.is_empty(), "stale reads behind the mapping: {stale:?}");
    let (after, _) = forwarded(&nc, 2).await;
    assert_eq!(after - before, 0, "with the mapping no request needs forwarding");
}
