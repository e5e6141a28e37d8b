//! Capacity: memory and CPU of the service process holding many sessions of
//! realistic size, the cold load of a session, and the event-log bytes a
//! group message costs once sender keys are at their plateau.
//!
//! The service runs as its own process (`baileys-store serve` against a
//! nats-server started here), so `/proc/<pid>/status` VmRSS is the service
//! alone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bstore_api::client::{KeyData, SessionClient, key_data};
use futures_util::StreamExt;
use serde_bytes::ByteBuf;

use crate::values::{pre_key, sender_key_record, session_record, stamped};

/// The service process under measurement.
struct ServiceProc {
    child: Child,
}

impl ServiceProc {
    fn start(bin: &Path, url: &str, key: &str, data: &Path, max_active: usize, redis: Option<&str>) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        if let Some(redis) = redis {
            cmd.env("BSTORE_REDIS_URL", redis);
        }
        let child = cmd
            .arg("serve")
            .env("BSTORE_NATS_URL", url)
            .env("BSTORE_KEYS", key)
            .env("BSTORE_DATA_DIR", data)
            .env("BSTORE__SESSIONS__MAX_ACTIVE", max_active.to_string())
            .env("BSTORE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS and VmHWM in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User + system CPU seconds of a process.
pub fn cpu_secs(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// User and system CPU seconds of a process, from /proc/<pid>/stat.
pub fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return (0.0, 0.0) };
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

async fn wait_ready(nc: &async_nats::Client, child: &mut ServiceProc) -> anyhow::Result<()> {
    let probe = SessionClient::new(nc.clone(), "bstore", "bench", "ready").with_timeout(Duration::from_millis(500));
    let start = Instant::now();
    while probe.info().await.is_err() {
        if let Ok(Some(status)) = child.child.try_wait() {
            anyhow::bail!("the service exited: {status}");
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "the service does not answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn rid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// What one realistic session holds: 812 pre-keys and 50 Signal sessions of
/// ~3 KB, written as a bot writes them (the pre-key upload in one call, the
/// sessions in one call here to keep the set-up short), plus creds.
async fn populate(s: &SessionClient, seed: u64) -> Result<(), String> {
    let mut pk = KeyData::new();
    let of = pk.entry("pre-key".into()).or_default();
    for i in 1..=812u64 {
        of.insert(i.to_string(), Some(ByteBuf::from(pre_key(seed * 1000 + i))));
    }
    s.keys_set(&rid(), &pk).await.map_err(|e| e.to_string())?;
    let mut ss = KeyData::new();
    let of = ss.entry("session".into()).or_default();
    for i in 0..50u64 {
        of.insert(format!("{}.0", 100_000_000 + i), Some(ByteBuf::from(session_record(seed * 100 + i, 3000))));
    }
    s.keys_set(&rid(), &ss).await.map_err(|e| e.to_string())?;
    s.creds_put(&rid(), &session_record(seed, 1100)).await.map_err(|e| e.to_string())?;
    Ok(())
}

pub struct CapacityArgs {
    pub service_bin: PathBuf,
    pub sessions: Vec<usize>,
    pub cold_samples: usize,
    pub group_messages: usize,
    pub stream_max_consumers: i64,
    /// The Redis projection's URL, when it is on.
    pub redis_url: Option<String>,
}

pub async fn run(args: &CapacityArgs, scratch: &Path) -> anyhow::Result<()> {
    let key = bstore_codec::Keyring::format_entry(1, &bstore_codec::Keyring::generate_key());
    println!();
    println!(
        "## capacity (service as its own process: {}; Redis projection {})",
        args.service_bin.display(),
        if args.redis_url.is_some() { "on" } else { "off" }
    );
    println!("each session: creds 1.1 KB, 812 pre-keys (~85 B), 50 Signal sessions (3 KB) = ~222 KB of values; file storage");
    println!();
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>12} {:>14} {:>12} {:>12}",
        "sessions", "load s", "load CPU s", "RSS MiB", "peak MiB", "RSS KiB/sess", "idle CPU %", "get p50 µs"
    );
    let mut first = true;
    for &n in &args.sessions {
        let dir = scratch.join(format!("capacity-{n}"));
        let ecfg = baileys_store::config::EmbeddedConfig { port: -1, ..Default::default() };
        let nats = baileys_store::embedded::EmbeddedNats::start(&ecfg, &dir.join("nats")).await?;
        // The private server demands passwords: the service process gets the
        // service user's URL, and so does this client (it also reaches
        // JetStream to read the stream's figures).
        let nc = async_nats::ConnectOptions::with_user_and_password(nats.service.user.clone(), nats.service.password.clone())
            .connect(&nats.url)
            .await?;
        let service_url = nats.service_url();
        let mut svc = ServiceProc::start(&args.service_bin, &service_url, &key, &dir.join("svc"), n * 2 + 1000, args.redis_url.as_deref())?;
        let outcome = async {
            wait_ready(&nc, &mut svc).await?;
            crate::raise_consumer_limit(&nc, args.stream_max_consumers).await?;
            let pid = svc.pid();
            let (rss0, _) = memory_kib(pid);
            let cpu0 = cpu_secs(pid);
            let t0 = Instant::now();
            let clients: Arc<Vec<SessionClient>> = Arc::new(
                (0..n)
                    .map(|i| SessionClient::new(nc.clone(), "bstore", "cap", &format!("s{i}")).with_timeout(Duration::from_secs(60)))
                    .collect(),
            );
            let errors = futures_util::stream::iter(0..n)
                .map(|i| {
                    let clients = clients.clone();
                    async move { populate(&clients[i], i as u64 + 1).await }
                })
                .buffer_unordered(16)
                .filter(|r| std::future::ready(r.is_err()))
                .count()
                .await;
            let load_s = t0.elapsed().as_secs_f64();
            let load_cpu = cpu_secs(pid) - cpu0;
            anyhow::ensure!(errors == 0, "{errors} sessions failed to load");
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (rss, hwm) = memory_kib(pid);
            let c0 = cpu_secs(pid);
            tokio::time::sleep(Duration::from_secs(5)).await;
            let idle = (cpu_secs(pid) - c0) / 5.0 * 100.0;
            // One read of each resident session (a Signal session key).
            let mut lat = Vec::with_capacity(n);
            for s in clients.iter().take(2000) {
                let t = Instant::now();
                s.keys_get("session", &["100000007.0"]).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                lat.push(t.elapsed());
            }
            lat.sort_unstable();
            let p50 = lat.get(lat.len() / 2).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
            println!(
                "{n:>8} {load_s:>10.1} {load_cpu:>12.1} {:>12.0} {:>12.0} {:>14.1} {idle:>12.1} {p50:>12.0}",
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0,
                (rss.saturating_sub(rss0)) as f64 / n as f64
            );
            if first {
                first = false;
                cold_and_log(&nc, &mut svc, &args.service_bin, &service_url, &key, &dir, n, args).await?;
            }
            anyhow::Ok(())
        }
        .await;
        svc.stop();
        nats.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
        outcome?;
    }
    Ok(())
}

async fn stream_bytes(js: &async_nats::jetstream::Context) -> anyhow::Result<(u64, u64)> {
    let mut stream = js.get_stream("BSTORE_EVENTS").await?;
    let info = stream.info().await?;
    Ok((info.state.bytes, info.state.messages))
}

/// Cold load of sessions holding 1,000 keys, then the log bytes of group
/// messages at the sender-key plateau. Runs on the instance that holds
/// `resident` other sessions, so replay filters a stream of realistic size.
#[allow(clippy::too_many_arguments)]
async fn cold_and_log(
    nc: &async_nats::Client,
    svc: &mut ServiceProc,
    bin: &Path,
    url: &str,
    key: &str,
    dir: &Path,
    resident: usize,
    args: &CapacityArgs,
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(nc.clone());
    // Sessions of 1,000 keys: 812 pre-keys in one call, then 188 Signal
    // sessions of 3 KB in one call each (189 events). The "rewritten" ones
    // then rewrite those sessions 1,000 more times (1,189 events).
    let err = |e: bstore_api::client::ClientError| anyhow::anyhow!("{e}");
    let mut names = Vec::new();
    for (kind, rewrites) in [("fresh", 0usize), ("rewritten", 1000)] {
        for k in 0..args.cold_samples {
            let s = SessionClient::new(nc.clone(), "bstore", "cold", &format!("{kind}{k}"));
            let mut pk = KeyData::new();
            let of = pk.entry("pre-key".into()).or_default();
            for i in 1..=812u64 {
                of.insert(i.to_string(), Some(ByteBuf::from(pre_key(i + k as u64))));
            }
            s.keys_set(&rid(), &pk).await.map_err(err)?;
            let template = session_record(k as u64, 3000);
            for i in 0..188 + rewrites {
                let id = format!("{}.0", 200_000_000 + i % 188);
                let v = stamped(&template, i as u64);
                s.keys_set(&rid(), &key_data([("session", id.as_str(), Some(&v[..]))])).await.map_err(err)?;
            }
            names.push((kind, k, 189 + rewrites, s));
        }
    }
    let old = std::mem::replace(svc, ServiceProc::start(bin, url, key, &dir.join("svc"), resident * 2 + 1000, args.redis_url.as_deref())?);
    old.stop();
    wait_ready(nc, svc).await?;
    println!();
    println!(
        "cold load (service restarted; {resident} other sessions in the stream): first keys.get of a session of 1,000 keys, then a second"
    );
    println!("{:<12} {:>8} {:>14} {:>14}", "session", "events", "cold ms", "warm µs");
    for (kind, k, events, s) in &names {
        let t = Instant::now();
        let got = s.keys_get("session", &["200000001.0"]).await.map_err(err)?;
        let cold = t.elapsed();
        anyhow::ensure!(got.len() == 1, "the cold session lost its key");
        let t = Instant::now();
        s.keys_get("session", &["200000002.0"]).await.map_err(err)?;
        let warm = t.elapsed();
        println!("{:<12} {events:>8} {:>14.1} {:>14.0}", format!("{kind}{k}"), cold.as_secs_f64() * 1e3, warm.as_secs_f64() * 1e6);
    }

    // Four devices in one group, each holding all four sender-key records at
    // the ~446 KB plateau. A group message from device s: s rewrites its own
    // record (one more message key, the oldest dropped) and its
    // sender-key-memory in one call; each of the three others rewrites its
    // copy of s's record.
    let devices: Vec<SessionClient> = (0..4).map(|d| SessionClient::new(nc.clone(), "bstore", "group", &format!("d{d}"))).collect();
    let mut records: Vec<Vec<u8>> = (0..4).map(|s| sender_key_record(s as u64 + 7, 446_000)).collect();
    let sk_id = |s: usize| format!("120363000000000001@g.us::10000000000000{s}::1");
    for d in &devices {
        for (s, r) in records.iter().enumerate() {
            let id = sk_id(s);
            d.keys_set(&rid(), &key_data([("sender-key", id.as_str(), Some(&r[..]))])).await.map_err(err)?;
        }
    }
    let memory =
        br#"{"100000000000000:1@lid":true,"100000000000001:1@lid":true,"100000000000002:1@lid":true,"100000000000003:1@lid":true}"#
            .to_vec();
    let (b0, m0) = stream_bytes(&js).await?;
    let msgs = args.group_messages;
    let mut value_bytes = 0usize;
    for m in 0..msgs {
        let s = m % 4;
        // What one message does to the sender's record at its plateau: the
        // chain key (its iteration and 32-byte seed, ~110 B of JSON near the
        // start) changes, one message key (~220 B) is added at the end and
        // the oldest is dropped, so the size stays the same.
        let mut v = records[s].clone();
        let mut g = crate::values::Gen::new(m as u64 + 99);
        let seed = g.bytes(110);
        v[60..170].copy_from_slice(&seed);
        let entry = g.bytes(220);
        let tail = v.len() - 64;
        v.drain(300..520);
        v.splice(tail - 220..tail - 220, entry);
        records[s] = v.clone();
        let id = sk_id(s);
        let own = key_data([
            ("sender-key", id.as_str(), Some(&v[..])),
            ("sender-key-memory", "120363000000000001@g.us", Some(&stamped(&memory, m as u64)[..])),
        ]);
        devices[s].keys_set(&rid(), &own).await.map_err(err)?;
        value_bytes += v.len() + memory.len();
        for (d, dev) in devices.iter().enumerate() {
            if d != s {
                dev.keys_set(&rid(), &key_data([("sender-key", id.as_str(), Some(&v[..]))])).await.map_err(err)?;
                value_bytes += v.len();
            }
        }
    }
    let (b1, m1) = stream_bytes(&js).await?;
    println!();
    println!("event log per group message among 4 devices, sender keys at ~446 KB ({msgs} messages):");
    println!(
        "  {:.0} KB of stream per message ({} events per message; values written {:.0} KB per message)",
        (b1 - b0) as f64 / msgs as f64 / 1000.0,
        (m1 - m0) / msgs as u64,
        value_bytes as f64 / msgs as f64 / 1000.0
    );
    Ok(())
}
