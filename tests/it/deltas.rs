//! Values Baileys rewrites whole on every message (a sender-key record grows
//! ~220 B per group message up to ~446 KB) are recorded in the log as deltas
//! against their previous version, and read back exactly.

use bstore_api::client::key_data;

use crate::harness::{Stack, rid};

/// A record shaped like Baileys' sender-key JSON after `n` messages: a chain
/// key near the start that changes every time, and a list grown at the end.
pub fn sender_key_record(n: u32) -> Vec<u8> {
    let mut s = format!("{{\"senderKeyId\":77,\"senderChainKey\":{{\"iteration\":{n},\"seed\":\"{:0>44}\"}},\"keys\":[", n * 31);
    for k in 0..n {
        s.push_str(&format!("{{\"iteration\":{k},\"seed\":\"{:0>44}\"}},", u64::from(k) * 7919));
    }
    s.push_str("]}");
    s.into_bytes()
}

async fn stream_bytes(nc: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(nc.clone());
    let mut stream = js.get_stream("BSTORE_EVENTS").await.unwrap();
    stream.info().await.unwrap().state.bytes
}

#[tokio::test]
async fn a_growing_record_costs_the_log_a_fraction_of_its_size_and_reads_back_exactly() {
    let mut stack = Stack::start().await;
    let s = stack.session("t", "group-sender");
    let id = "120363@g.us::4915112345678::0";
    s.keys_set(&rid(), &key_data([("sender-key", id, Some(&sender_key_record(1500)[..]))])).await.unwrap();
    let before = stream_bytes(&stack.nc).await;
    let rounds = 20u32;
    for n in 1501..1501 + rounds {
        let record = sender_key_record(n);
        s.keys_set(&rid(), &key_data([("sender-key", id, Some(&record[..]))])).await.unwrap();
        assert_eq!(s.keys_get("sender-key", &[id]).await.unwrap()[id], record, "read back after message {n}");
    }
    let per_write = (stream_bytes(&stack.nc).await - before) / u64::from(rounds);
    let size = sender_key_record(1520).len() as u64;
    assert!(size > 100_000);
    assert!(per_write * 20 < size, "each rewrite of a {size} B value cost the log {per_write} B");

    // Rebuilt from the log alone, the value is exact.
    stack.service.restart();
    assert_eq!(s.keys_get("sender-key", &[id]).await.unwrap()[id], sender_key_record(1520));
    assert_eq!(s.info().await.unwrap().bytes, size);
}
