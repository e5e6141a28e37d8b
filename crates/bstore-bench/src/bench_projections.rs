//! `bstore-bench-projections`: what the projections buy and cost.
//!
//! 1. Cold load of one session with `--keys` keys: from its Redis copy (plus
//!    the log's tail, here empty) versus from the log alone, the median of
//!    `--runs` loads each, for the keys written a hundred per event, one per
//!    event, and one per event `--rewrites` times over (a long-lived bot).
//! 2. The Mongo materializer: throughput draining a backlog of `--backlog`
//!    events, then its lag while a steady `--rate` events/s are appended for
//!    `--seconds`. The events are shaped like a bot's traffic over
//!    `--sessions` sessions: each rewrites one peer's Signal session, every
//!    twentieth per session also replaces a pre-key.
//! 3. (`lastseq`) Reading a session's last sequence: the direct get of its
//!    last message, payload included, beside a headers-only consumer's
//!    create answer and the direct get of "the next message after it", for
//!    last messages of 300 B, 64 KiB and 1 MiB.
//! 4. (`logbytes`) What a 1:1 message and a group message at the sender-key
//!    plateau cost the log, events (as the service decides them: deltas)
//!    and snapshots.
//! 5. (`rebuild`) `rebuild mongo` of the realistic session by length of
//!    history: from its snapshot against `--from-scratch`.
//!
//! It starts its own nats-server, redis-server and Mongo-compatible server
//! (`scripts/setup --test` installs them) on free ports, and drives the
//! library directly (the event log, the loader, the materializer), so the
//! figures are those of the projections, not of the request path. It is a
//! benchmark, not a test: it prints figures and asserts nothing. The Mongo
//! figures are those of the test server (SecantusDB, written in Python):
//! they bound the materializer's own overhead from below, not MongoDB's.
//!
//! ```text
//! cargo build --release --bin bstore-bench-projections
//! target/release/bstore-bench-projections
//! ```

#[path = "bench/values.rs"]
#[allow(dead_code)]
mod values;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bstore_codec::{Codec, Keyring};
use bstore_domain::{Change, Event, KeyChanges, KeyId, KeyType, SessionKey};
use bstore_log::{EventLog, LogConfig};
use bstore_mongo::{Materializer, MongoConfig, Store};
use bstore_redis::{RedisConfig, RedisProjection, SnapshotMode};
use bstore_session::load::{self, Source};
use bstore_testkit::{MongoServer, NatsServer, RedisServer};
use bytes::Bytes;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Cold loads from Redis versus the log; Mongo materializer throughput and lag")]
struct Args {
    /// Keys in the session loaded cold.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Bytes of each key's value.
    #[arg(long, default_value_t = 600)]
    value_bytes: usize,
    /// Times each key is written in the long-history row.
    #[arg(long, default_value_t = 10)]
    rewrites: usize,
    /// Cold loads per row; the median is printed.
    #[arg(long, default_value_t = 9)]
    runs: usize,
    /// Events in the backlog the materializer drains.
    #[arg(long, default_value_t = 5000)]
    backlog: usize,
    /// Sessions the materializer's events are spread over.
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Events per second appended during the steady phase.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Seconds of the steady phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Sections to run: load, history, mongo, lastseq, logbytes, rebuild.
    #[arg(long, value_delimiter = ',', default_value = "load,history,mongo,lastseq,logbytes,rebuild")]
    sections: Vec<String>,
    /// Lengths of history for the history section, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    histories: Vec<usize>,
    /// Events after the newest snapshot in the history section (the
    /// service writes one every 1 000 events, so a load replays fewer than
    /// this; 999 is the worst case).
    #[arg(long, default_value_t = 999)]
    tail: usize,
    /// Full replays are timed only for histories up to this length (a
    /// replay of a million events takes seconds).
    #[arg(long, default_value_t = 100_000)]
    max_full_replay: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.context("connecting to nats")?;
    let codec = Codec::new(Keyring::new([(1, Keyring::generate_key())], None)?);
    let log = EventLog::open(client.clone(), LogConfig::default(), codec.clone()).await?;
    if args.sections.iter().any(|s| s == "load") {
        cold_loads(&args, &log, &codec).await?;
    }
    if args.sections.iter().any(|s| s == "history") {
        history(&args, &client, &log, &codec).await?;
    }
    if args.sections.iter().any(|s| s == "mongo") {
        materializer(&args, &client, &log, &codec).await?;
    }
    if args.sections.iter().any(|s| s == "lastseq") {
        last_seq(&args, &client, &log).await?;
    }
    if args.sections.iter().any(|s| s == "logbytes") {
        log_bytes(&client, &log).await?;
    }
    if args.sections.iter().any(|s| s == "rebuild") {
        rebuild(&args, &codec).await?;
    }
    Ok(())
}

/// One device's session as the service keeps it: its state, the events
/// since its last snapshot, and what its snapshots cost.
struct Device {
    key: SessionKey,
    state: bstore_domain::SessionState,
    since_snapshot: u64,
}

impl Device {
    fn new(name: &str) -> anyhow::Result<Self> {
        Ok(Self { key: SessionKey::parse("bytes", name)?, state: Default::default(), since_snapshot: 0 })
    }

    /// Decides `entries` as the service does (a value of 1 KiB or more that
    /// changed little becomes a delta), appends the event, applies it, and
    /// snapshots every 1 000 events as the service does by default.
    async fn write(&mut self, log: &EventLog, entries: Vec<(&str, String, Vec<u8>)>) -> anyhow::Result<()> {
        let mut keys = KeyChanges::new();
        for (ty, id, v) in entries {
            keys.entry(KeyType::parse(ty)?).or_default().insert(KeyId::parse(&id)?, Some(Bytes::from(v)));
        }
        let cmd = bstore_domain::Command::SetKeys { keys };
        let Some(event) = self.state.handle(cmd, &bstore_domain::Limits::default(), 1, None)? else { return Ok(()) };
        let seq = log.append(&self.key, self.state.seq(), &event).await?.seq;
        self.state.apply(seq, &event)?;
        self.since_snapshot += 1;
        if self.since_snapshot >= 1000 {
            log.write_snapshot(&self.key, &self.state).await?;
            self.since_snapshot = 0;
        }
        Ok(())
    }
}

/// Bytes of the event stream and of the snapshot stream.
async fn streams_bytes(js: &async_nats::jetstream::Context) -> anyhow::Result<(u64, u64)> {
    let cfg = LogConfig::default();
    let events = js.get_stream(&cfg.stream).await?.info().await?.state.bytes;
    let snapshots = js.get_stream(&cfg.snapshot_stream).await?.info().await?.state.bytes;
    Ok((events, snapshots))
}

/// The bytes a message costs the log: a 1:1 message (each of the two
/// devices rewrites its ~3 KB Signal session of the other: a chain step
/// changes a key and a counter, a message key comes and goes) and a group
/// message among four devices whose sender keys are at their ~446 KB
/// plateau (as `bstore-bench`'s capacity section writes it); the events as
/// the service decides them (deltas), and what one snapshot of each device
/// costs, whole and spread over the 1 000 events between two.
async fn log_bytes(client: &async_nats::Client, log: &EventLog) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    println!("## Log bytes per message (events as the service writes them; a snapshot every 1 000 events)\n");
    println!("| message | events per message | event stream per message | snapshot of a device | snapshots per message (1/1 000) |");
    println!("|---|---:|---:|---:|---:|");

    // 1:1: the two devices' records of each other, 3 KB, after a few dozen turns.
    let mut devices = [Device::new("one-a")?, Device::new("one-b")?];
    let mut records: Vec<Vec<u8>> = (0..2).map(|d| values::session_record(d + 1, 3_000)).collect();
    let peer = |d: usize| format!("4915{:07}.0", 1 - d);
    for (d, dev) in devices.iter_mut().enumerate() {
        dev.write(log, vec![("session", peer(d), records[d].clone())]).await?;
    }
    let msgs = 1000u64;
    let (e0, _) = streams_bytes(&js).await?;
    for m in 0..msgs {
        for (d, dev) in devices.iter_mut().enumerate() {
            let mut g = values::Gen::new(m * 2 + d as u64 + 5);
            let r = &mut records[d];
            // The chain key (44 base64 characters) and its counter change;
            // one message key (~100 B) replaces the oldest.
            let at = 40 + (m as usize % 8) * 60;
            r[at..at + 44].copy_from_slice(g.b64(44).as_bytes());
            let slot = 1_000 + (m as usize % 16) * 110;
            r[slot..slot + 100].copy_from_slice(g.b64(100).as_bytes());
            dev.write(log, vec![("session", peer(d), r.clone())]).await?;
        }
    }
    let (e1, _) = streams_bytes(&js).await?;
    let (_, s0) = streams_bytes(&js).await?;
    log.write_snapshot(&devices[0].key, &devices[0].state).await?;
    let (_, s1) = streams_bytes(&js).await?;
    let snap = s1 - s0;
    println!(
        "| 1:1 (3 KB Signal sessions) | 2 | {:.2} KB | {:.1} KB (one record only) | {:.2} KB |",
        (e1 - e0) as f64 / msgs as f64 / 1000.0,
        snap as f64 / 1000.0,
        2.0 * snap as f64 / 1000.0 / 1000.0
    );

    // A group of four devices, each holding the four sender-key records at
    // their plateau; a message from device s: s rewrites its own record and
    // its sender-key memory, each other device its copy of s's record.
    let mut devices: Vec<Device> = (0..4).map(|d| Device::new(&format!("group-{d}"))).collect::<anyhow::Result<_>>()?;
    let mut records: Vec<Vec<u8>> = (0..4).map(|s| values::sender_key_record(s as u64 + 7, 446_000)).collect();
    let sk_id = |s: usize| format!("120363000000000001@g.us::10000000000000{s}::1");
    for dev in devices.iter_mut() {
        for (s, r) in records.iter().enumerate() {
            dev.write(log, vec![("sender-key", sk_id(s), r.clone())]).await?;
        }
    }
    let memory =
        br#"{"100000000000000:1@lid":true,"100000000000001:1@lid":true,"100000000000002:1@lid":true,"100000000000003:1@lid":true}"#;
    let msgs = 200u64;
    let (e0, _) = streams_bytes(&js).await?;
    for m in 0..msgs {
        let s = (m % 4) as usize;
        let mut v = records[s].clone();
        let mut g = values::Gen::new(m + 99);
        v[60..170].copy_from_slice(&g.bytes(110));
        let entry = g.bytes(220);
        let tail = v.len() - 64;
        v.drain(300..520);
        v.splice(tail - 220..tail - 220, entry);
        records[s] = v.clone();
        let own =
            vec![("sender-key", sk_id(s), v.clone()), ("sender-key-memory", "120363000000000001@g.us".into(), values::stamped(memory, m))];
        devices[s].write(log, own).await?;
        for (d, dev) in devices.iter_mut().enumerate() {
            if d != s {
                dev.write(log, vec![("sender-key", sk_id(s), v.clone())]).await?;
            }
        }
    }
    let (e1, _) = streams_bytes(&js).await?;
    let (_, s0) = streams_bytes(&js).await?;
    log.write_snapshot(&devices[0].key, &devices[0].state).await?;
    let (_, s1) = streams_bytes(&js).await?;
    let snap = s1 - s0;
    println!(
        "| group of 4, sender keys at ~446 KB | 4 | {:.2} KB | {:.0} KB (4 sender keys) | {:.2} KB |",
        (e1 - e0) as f64 / msgs as f64 / 1000.0,
        snap as f64 / 1000.0,
        4.0 * snap as f64 / 1000.0 / 1000.0
    );
    println!();
    Ok(())
}

/// How to read a session's last sequence: the direct get of its last
/// message (what `EventLog::last_seq` does, payload included) beside the
/// only way nats-server 2.15 offers without the payload — an ephemeral
/// consumer filtered to the subject with `deliver_policy = last` and
/// `headers_only`, whose create answer names the sequence
/// (`delivered.stream_seq + 1`), deleted right after — for a last message
/// that is a small delta and one that is a whole large value. Also the
/// direct get of the next message after a sequence, which answers only
/// "is there anything after it" (404, no payload, when there is not).
async fn last_seq(args: &Args, client: &async_nats::Client, log: &EventLog) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer;
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream(&LogConfig::default().stream).await?;
    println!("## The last sequence of a session (median of {} reads)\n", args.runs.max(50));
    println!("| last message | direct get of the last message | headers-only consumer: create + delete | direct get next after it (404) |");
    println!("|---:|---:|---:|---:|");
    for (label, bytes) in [("a 300 B delta", 300usize), ("a 64 KiB value", 64 << 10), ("a 1 MiB set", 1 << 20)] {
        let key = SessionKey::parse("bench", &format!("last-{bytes}"))?;
        let seq = log.append(&key, 0, &keys_event([("session", "a.0".to_string(), Some(noise(bytes, bytes)))])).await?.seq;
        let subject = log.subject(&key);
        let (mut direct, mut consumer_way, mut next) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.runs.max(50) {
            let t = Instant::now();
            anyhow::ensure!(log.last_seq(&key).await? == seq, "direct get");
            direct.push(t.elapsed());

            let t = Instant::now();
            let c = stream
                .create_consumer(consumer::pull::Config {
                    filter_subject: subject.clone(),
                    deliver_policy: consumer::DeliverPolicy::Last,
                    headers_only: true,
                    ..Default::default()
                })
                .await?;
            let info = c.cached_info();
            let found = if info.num_pending > 0 { info.delivered.stream_sequence + 1 } else { 0 };
            stream.delete_consumer(&info.name).await?;
            consumer_way.push(t.elapsed());
            anyhow::ensure!(found == seq, "the consumer's start names the last sequence ({found}, {seq})");

            let t = Instant::now();
            let body = serde_json::json!({ "seq": seq + 1, "next_by_subj": subject }).to_string();
            let answer = client.request(format!("$JS.API.DIRECT.GET.{}", LogConfig::default().stream), body.into()).await?;
            next.push(t.elapsed());
            anyhow::ensure!(answer.status == Some(async_nats::StatusCode::NOT_FOUND), "nothing after the last message");
        }
        println!("| {label} | {} | {} | {} |", ms(median(&mut direct)), ms(median(&mut consumer_way)), ms(median(&mut next)));
    }
    println!();
    Ok(())
}

fn value(n: usize, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i.wrapping_mul(31) ^ n.wrapping_mul(7)) as u8;
    }
    Bytes::from(v)
}

fn event(entries: impl IntoIterator<Item = (String, Bytes)>) -> Event {
    keys_event(entries.into_iter().map(|(id, v)| ("session", id, Some(v))))
}

fn keys_event<'a>(entries: impl IntoIterator<Item = (&'a str, String, Option<Bytes>)>) -> Event {
    let mut keys = KeyChanges::new();
    for (ty, id, v) in entries {
        keys.entry(KeyType::parse(ty).unwrap()).or_default().insert(KeyId::parse(&id).unwrap(), v);
    }
    Event { v: 1, at_ms: 1, rid: None, prev: None, change: Change::KeysChanged { keys, patched: Default::default() } }
}

async fn cold_loads(args: &Args, log: &EventLog, codec: &Codec) -> anyhow::Result<()> {
    let redis_server = RedisServer::start();
    let redis = RedisProjection::new(RedisConfig { url: Some(redis_server.url()), ..Default::default() }, codec.clone())?;
    println!("## Cold load of a session with {} keys of {} B (median of {} loads)\n", args.keys, args.value_bytes, args.runs);
    println!("| keys per event | writes per key | events in the log | from redis | from the log alone | speed-up |");
    println!("|---:|---:|---:|---:|---:|---:|");
    // A long-lived bot rewrites its Signal sessions on every message, so its
    // log holds many events per key: the last row.
    for (per_event, rewrites) in [(100usize, 1usize), (1, 1), (1, args.rewrites.max(1))] {
        let key = SessionKey::parse("bench", &format!("cold-{per_event}-{rewrites}"))?;
        let mut seq = 0;
        let mut events = 0;
        for round in 0..rewrites {
            for chunk in (0..args.keys).collect::<Vec<_>>().chunks(per_event) {
                let e = event(chunk.iter().map(|&i| (format!("{i}.0"), value(i + round, args.value_bytes))));
                seq = log.append(&key, seq, &e).await?.seq;
                events += 1;
            }
        }
        let state = load::from_log(log, &key).await?;
        redis.write_snapshot(&key, &state, SnapshotMode::Replace).await?;
        let mut from_redis = Vec::new();
        let mut from_log = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            let loaded = load::load(log, Some(&redis), &key).await?;
            from_redis.push(t.elapsed());
            anyhow::ensure!(loaded.source == Source::Redis { tail: 0 } && loaded.state == state, "the redis copy was not used");
            let t = Instant::now();
            let loaded = load::load(log, None, &key).await?;
            from_log.push(t.elapsed());
            anyhow::ensure!(loaded.state == state, "the log gave another state");
        }
        let (r, l) = (median(&mut from_redis), median(&mut from_log));
        println!("| {per_event} | {rewrites} | {events} | {} | {} | {:.1}x |", ms(r), ms(l), l.as_secs_f64() / r.as_secs_f64());
    }
    println!();
    Ok(())
}

/// `len` bytes that do not compress, as keys do not.
fn noise(n: usize, len: usize) -> Bytes {
    let mut x = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The realistic session's state: creds, 812 pre-keys, 50 Signal sessions,
/// a few sender keys and app-state keys, at their usual sizes (about 236 KB).
fn realistic_state_events() -> Vec<Event> {
    let mut out = vec![Event::new(1, None, Change::CredsPut { creds: noise(0, 2_000) })];
    for chunk in (0..812usize).collect::<Vec<_>>().chunks(100) {
        out.push(keys_event(chunk.iter().map(|&i| ("pre-key", i.to_string(), Some(noise(i, 90))))));
    }
    out.push(keys_event((0..50usize).map(|i| ("session", format!("4915{i:07}.0"), Some(noise(i, 3_000))))));
    out.push(keys_event((0..3usize).map(|i| ("sender-key", format!("group{i}@g.us::4915{i:07}::0"), Some(noise(i, 3_000))))));
    out.push(keys_event((0..6usize).map(|i| ("app-state-sync-key", format!("AAAAA{i}"), Some(noise(i, 130))))));
    out
}

/// One event of a bot's steady traffic: one peer's Signal session
/// rewritten, or a tctoken / device list stored — small values, as the
/// deltas of a long-lived session are.
fn traffic_event(n: usize) -> Event {
    match n % 3 {
        0 => keys_event([("session", format!("4915{:07}.0", n % 50), Some(noise(n, 3_000)))]),
        1 => keys_event([("tctoken", format!("4915{:07}@s.whatsapp.net", n % 50), Some(noise(n, 60)))]),
        _ => keys_event([("device-list", format!("4915{:07}", n % 50), Some(noise(n, 40)))]),
    }
}

/// Cold loads of the realistic session with long histories: from the newest
/// snapshot plus `--tail` events, and from the whole log. The history is
/// published pipelined (each message still fenced on the one before it).
/// Writes the realistic session `key` followed by steady traffic, `n`
/// events in all (at least enough for the state and the tail), pipelined
/// (each message still fenced on the one before it), and stores a snapshot
/// `tail` events before the end. Returns the events written, the state at
/// the end, the state snapshotted and the bytes of the sealed events.
async fn write_history(
    js: &async_nats::jetstream::Context,
    log: &EventLog,
    codec: &Codec,
    key: &SessionKey,
    n: usize,
    tail: usize,
) -> anyhow::Result<(usize, bstore_domain::SessionState, bstore_domain::SessionState, usize)> {
    use async_nats::jetstream::message::PublishMessage as Publish;
    let subject = log.subject(key);
    let mut state = bstore_domain::SessionState::default();
    let mut snapshot_at = None;
    let mut seq = 0u64;
    let mut log_bytes = 0usize;
    let mut acks = std::collections::VecDeque::new();
    let base = realistic_state_events();
    let total = n.max(base.len() + tail + 1);
    for i in 0..total {
        let e = if i < base.len() { base[i].clone() } else { traffic_event(i) };
        // Pipelined: the next message is fenced on this one's sequence,
        // which it will have if nothing else writes the stream meanwhile.
        let expected = seq;
        let payload = bstore_log::seal_appended(codec, key, expected, &e);
        log_bytes += payload.len();
        let ack =
            js.send_publish(subject.clone(), Publish::build().payload(payload.into()).expected_last_subject_sequence(expected)).await?;
        if expected == 0 {
            seq = ack.await?.sequence;
        } else {
            seq = expected + 1;
            acks.push_back((seq, ack));
        }
        state.apply(seq, &e).map_err(|e| anyhow::anyhow!("{e}"))?;
        if acks.len() >= 512 {
            let (want, ack) = acks.pop_front().unwrap();
            anyhow::ensure!(ack.await?.sequence == want, "the history was not written in order");
        }
        if i + 1 + tail == total {
            snapshot_at = Some(state.clone());
        }
    }
    while let Some((want, ack)) = acks.pop_front() {
        anyhow::ensure!(ack.await?.sequence == want, "the history was not written in order");
    }
    anyhow::ensure!(log.last_seq(key).await? == seq, "the pipelined history is not where it was expected");
    let snap = snapshot_at.context("no snapshot point")?;
    log.write_snapshot(key, &snap).await?;
    Ok((total, state, snap, log_bytes))
}

async fn history(args: &Args, client: &async_nats::Client, log: &EventLog, codec: &Codec) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    println!(
        "## Cold load of a realistic session (812 pre-keys, 50 sessions; no Redis) by length of history: newest snapshot + {} events, against the whole log\n",
        args.tail
    );
    println!("| events in the log | state KB | snapshot KB | log MB | from snapshot p50 | p99 | from the whole log p50 | ratio |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (row, &n) in args.histories.iter().enumerate() {
        let key = SessionKey::parse("bench", &format!("history-{row}-{n}"))?;
        let (total, state, snap, log_bytes) = write_history(&js, log, codec, &key, n, args.tail).await?;
        let snapshot_kb = codec.encode_snapshot(&key, &snap).len() as f64 / 1024.0;
        let mut from_snapshot = Vec::new();
        for _ in 0..args.runs.max(1) * 3 {
            let t = Instant::now();
            let (loaded, source) = load::from_snapshots(log, &key).await?;
            from_snapshot.push(t.elapsed());
            anyhow::ensure!(matches!(source, Source::Snapshot { .. }) && loaded == state, "the snapshot was not used: {source:?}");
        }
        let full = if total <= args.max_full_replay {
            let mut runs = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                let loaded = load::from_log(log, &key).await?;
                runs.push(t.elapsed());
                anyhow::ensure!(loaded == state, "the log gave another state");
            }
            Some(median(&mut runs))
        } else {
            None
        };
        from_snapshot.sort();
        let p99 = from_snapshot[(from_snapshot.len() * 99).div_ceil(100) - 1];
        let p50 = median(&mut from_snapshot);
        println!(
            "| {total} | {:.0} | {snapshot_kb:.0} | {:.0} | {} | {} | {} | {} |",
            state.info().bytes as f64 / 1000.0,
            log_bytes as f64 / 1e6,
            ms(p50),
            ms(p99),
            full.map_or("(not run)".into(), ms),
            full.map_or("".into(), |f| format!("{:.0}x", f.as_secs_f64() / p50.as_secs_f64())),
        );
    }
    println!();
    Ok(())
}

/// `rebuild mongo` of the realistic session by length of history (the
/// `--histories` up to `--max-full-replay`, the snapshot `--tail` events
/// before the end): from the snapshot against `--from-scratch`, one run
/// each, the events read as it reports them. Each row has a nats-server of
/// its own, so the log holds that one session.
async fn rebuild(args: &Args, codec: &Codec) -> anyhow::Result<()> {
    let mongo = MongoServer::start();
    println!("## rebuild mongo of one realistic session (812 pre-keys, 50 sessions), newest snapshot + {} events\n", args.tail);
    println!("| events in the log | from the snapshot: s | events read | --from-scratch: s | events read |");
    println!("|---:|---:|---:|---:|---:|");
    for (row, &n) in args.histories.iter().filter(|&&n| n <= args.max_full_replay).enumerate() {
        let nats = NatsServer::start();
        let client = async_nats::connect(nats.url()).await.context("connecting to nats")?;
        let log = EventLog::open(client.clone(), LogConfig::default(), codec.clone()).await?;
        let js = async_nats::jetstream::new(client.clone());
        let key = SessionKey::parse("bench", &format!("rebuild-{row}-{n}"))?;
        let (total, _, _, _) = write_history(&js, &log, codec, &key, n, args.tail).await?;
        // A database of its own per row: one session in it.
        let cfg = MongoConfig { url: Some(mongo.url()), database: format!("rebuild{row}"), ..Default::default() };
        let m =
            Materializer::new(client.clone(), LogConfig::default(), cfg.clone(), Store::connect(&cfg, codec.clone()).await?, codec.clone());
        let mut cells = Vec::new();
        for from_scratch in [false, true] {
            let t = Instant::now();
            let done = m.rebuild(from_scratch, &|_, _| {}).await?;
            anyhow::ensure!(done.failing.is_empty(), "the rebuild failed: {:?}", done.failing);
            cells.push(format!("{:.2} | {}", t.elapsed().as_secs_f64(), done.events_read));
        }
        println!("| {total} | {} | {} |", cells[0], cells[1]);
    }
    println!();
    Ok(())
}

async fn materializer(args: &Args, client: &async_nats::Client, log: &EventLog, codec: &Codec) -> anyhow::Result<()> {
    let mongo = MongoServer::start();
    let cfg = MongoConfig { url: Some(mongo.url()), ..Default::default() };
    let store = Store::connect(&cfg, codec.clone()).await?;
    store.ensure_indexes().await?;
    let m = Materializer::new(client.clone(), LogConfig::default(), cfg.clone(), store, codec.clone());
    let sessions: Vec<SessionKey> = (0..args.sessions.max(1)).map(|i| SessionKey::parse("bench", &format!("m{i}")).unwrap()).collect();
    let mut last: HashMap<SessionKey, u64> = HashMap::new();
    let mut n = 0usize;
    let mut append = async |n: usize| -> anyhow::Result<()> {
        let key = &sessions[n % sessions.len()];
        // Like a bot's traffic: every event rewrites the Signal session of
        // one of five peers; every twentieth also uses up a pre-key and
        // uploads a new one.
        let round = n / sessions.len();
        let mut entries = vec![("session", format!("peer{}.0", round % 5), Some(value(n, args.value_bytes)))];
        if round.is_multiple_of(20) {
            entries.push(("pre-key", format!("{}", round / 20), Some(value(n, 100))));
            if round >= 20 {
                entries.push(("pre-key", format!("{}", round / 20 - 1), None));
            }
        }
        let e = keys_event(entries);
        let prev = last.get(key).copied().unwrap_or(0);
        let seq = log.append(key, prev, &e).await?.seq;
        last.insert(key.clone(), seq);
        Ok(())
    };

    println!("## Mongo materializer (batch size {}, test server)\n", cfg.batch_size);
    // The backlog includes what the load section wrote, if it ran.
    for _ in 0..args.backlog {
        append(n).await?;
        n += 1;
    }
    let backlog = m.lag().await?.events();
    let t = Instant::now();
    m.drain().await?;
    let took = t.elapsed();
    println!("| phase | events | seconds | events/s |");
    println!("|---|---:|---:|---:|");
    println!("| drain a backlog | {backlog} | {:.2} | {:.0} |", took.as_secs_f64(), backlog as f64 / took.as_secs_f64());

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(m.clone().run(async {
        let _ = stopped.await;
    }));
    let start_applied = m.lag().await?.applied_seq;
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut next = Instant::now();
    let mut lags = Vec::new();
    let mut last_sample = Instant::now();
    let mut written = 0u64;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        append(n).await?;
        n += 1;
        written += 1;
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        if last_sample.elapsed() >= Duration::from_millis(100) {
            last_sample = Instant::now();
            lags.push(m.lag().await?.events());
        }
    }
    let window = start.elapsed();
    let end = m.lag().await?;
    let t = Instant::now();
    while m.lag().await?.events() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up = t.elapsed();
    let _ = stop.send(());
    runner.await?;
    let applied = end.applied_seq - start_applied;
    println!(
        "| steady load | {written} written, {applied} applied | {:.2} | {:.0} written, {:.0} applied |",
        window.as_secs_f64(),
        written as f64 / window.as_secs_f64(),
        applied as f64 / window.as_secs_f64()
    );
    lags.sort_unstable();
    let pct = |p: f64| lags.get(((lags.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0);
    println!(
        "\nLag under the steady load, in events (sampled every 100 ms): median {}, p95 {}, max {}; {} behind when the load stopped, caught up {} ms later.",
        pct(0.5),
        pct(0.95),
        lags.last().copied().unwrap_or(0),
        end.events(),
        catch_up.as_millis()
    );
    Ok(())
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
