//! `bstore-bench`: request latency and throughput of baileys-store over NATS,
//! beside the floors it is built on, measured in one run on one machine;
//! then the capacity of a service process holding many sessions.
//!
//! With no `--nats-url` it starts everything itself: the service in this
//! process (on its embedded nats-server, in a temporary data dir) and the
//! clients on another thread; a redis-server for the Redis floor; and, for
//! the capacity section, `baileys-store serve` as its own process. It is a
//! benchmark, not a test: it prints figures and asserts nothing.
//! docs/benchmarks.md explains every row.
//!
//! ```text
//! cargo build --release --bin baileys-store --bin bstore-bench
//! target/release/bstore-bench                          # about 4 minutes
//! target/release/bstore-bench --sections capacity --capacity-sessions 1000,10000
//! ```

#[path = "bench/capacity.rs"]
mod capacity;
#[path = "bench/floors.rs"]
mod floors;
#[path = "bench/ownership.rs"]
mod ownership;
#[path = "bench/stats.rs"]
mod stats;
#[path = "bench/values.rs"]
mod values;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bstore_api::client::{KeyData, SessionClient, key_data};
use clap::Parser;
use futures_util::StreamExt;
use serde_bytes::ByteBuf;

use stats::{Outcome, closed_loop, open_loop, print_header, print_row};
use values::{pre_key, sender_key_record, session_record, stamped};

#[derive(Parser, Clone)]
#[command(about = "Latency and throughput of keys.set / keys.get over NATS with the floors beside them, and capacity")]
struct Args {
    /// Sections to run: floors, target, latency, sizes, rate, capacity, ownership.
    #[arg(long, value_delimiter = ',', default_value = "floors,target,latency,sizes,rate,capacity,ownership")]
    sections: Vec<String>,
    /// Seconds per closed-loop row.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    /// Concurrent clients (closed loop), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Numbers of sessions the requests are spread over, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100,10000")]
    sessions: Vec<usize>,
    /// Bytes of a Signal session value (the latency section's value).
    #[arg(long, default_value_t = 3000)]
    value_bytes: usize,
    /// Key ids per session that writes and reads rotate over.
    #[arg(long, default_value_t = 4)]
    ids: usize,
    /// Open-loop request rate per second (the rate section).
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seconds per open-loop row.
    #[arg(long, default_value_t = 5.0)]
    rate_seconds: f64,
    /// Sessions of realistic size for the capacity section, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    capacity_sessions: Vec<usize>,
    /// Cold-load samples per kind of session.
    #[arg(long, default_value_t = 3)]
    cold_samples: usize,
    /// Group messages for the event-log bytes measurement.
    #[arg(long, default_value_t = 20)]
    group_messages: usize,
    /// The service binary for the capacity section (default: next to this one).
    #[arg(long)]
    service_bin: Option<PathBuf>,
    /// Use a running service and its NATS instead of starting one (latency sections only).
    #[arg(long)]
    nats_url: Option<String>,
    /// Use a running Redis for the Redis floor instead of starting redis-server.
    #[arg(long)]
    redis_url: Option<String>,
    /// The redis-server binary started for the Redis floor (default:
    /// $REDIS_SERVER_BIN, then PATH).
    #[arg(long)]
    redis_server_bin: Option<PathBuf>,
    /// Run the service with its Redis projection on (`[redis] url` set to the
    /// Redis of the floor: started here, or --redis-url).
    #[arg(long)]
    redis_projection: bool,
    /// Keep the started service's stream (and the floor stream) in memory instead of on disk.
    #[arg(long)]
    memory_storage: bool,
    /// Raise the event stream's consumer limit to this before loading many
    /// sessions (0: leave the server's default, 1,000 on nats-server 2.15).
    /// Builds before c0da00f left each session load's replay consumer on
    /// the server for 30 s, so loading more than ~1,000 sessions within 30 s
    /// failed with 503 unless the limit was raised (see docs/benchmarks.md).
    #[arg(long, default_value_t = 0)]
    stream_max_consumers: i64,
    /// Also report the CPU per request of these processes (e.g. the
    /// service and nats-server pids when they run on their own), as
    /// `name=pid`, after each open-loop row. This process is always reported.
    #[arg(long, value_delimiter = ',')]
    watch: Vec<String>,
}

/// CPU of watched processes over one row.
struct Watch(Vec<(String, u32)>);

impl Watch {
    fn new(args: &Args) -> Self {
        let mut v = vec![("bench".to_owned(), std::process::id())];
        for w in &args.watch {
            if let Some((name, pid)) = w.split_once('=').and_then(|(n, p)| p.parse().ok().map(|p| (n.to_owned(), p))) {
                v.push((name, pid));
            }
        }
        Self(v)
    }

    fn snapshot(&self) -> Vec<(f64, f64)> {
        self.0.iter().map(|(_, pid)| capacity::cpu_split(*pid)).collect()
    }

    /// Prints µs of user and system CPU per completed request, by process.
    fn print(&self, before: &[(f64, f64)], requests: usize) {
        let after = self.snapshot();
        let n = requests.max(1) as f64;
        let parts: Vec<String> = self
            .0
            .iter()
            .zip(before.iter().zip(after))
            .map(|((name, _), (b, a))| format!("{name} {:.0}+{:.0}", (a.0 - b.0) / n * 1e6, (a.1 - b.1) / n * 1e6))
            .collect();
        println!("{:<44} CPU µs per request (user+system): {}", "", parts.join(", "));
    }
}

impl Args {
    fn has(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = std::env::temp_dir().join(format!("bstore-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let needs_service = ["floors", "target", "latency", "sizes", "rate"].iter().any(|s| args.has(s));
    // One Redis for the floor and, when asked, the projections.
    let redis_server = match (&args.redis_url, args.has("floors") || args.redis_projection) {
        (None, true) => {
            let bin = args
                .redis_server_bin
                .clone()
                .or_else(|| bstore_testkit::try_find_bin("REDIS_SERVER_BIN", ".tools/redis/bin/redis-server", "redis-server"));
            match bin {
                Some(bin) => Some(bstore_testkit::RedisServer::start_with_bin(bin)),
                None if !args.redis_projection => {
                    println!("(Redis floor skipped: no redis-server; install it or pass --redis-url)");
                    None
                }
                None => anyhow::bail!("--redis-projection needs a redis-server or --redis-url"),
            }
        }
        _ => None,
    };
    let redis_addr =
        args.redis_url.as_deref().map(floors::redis_addr).or_else(|| redis_server.as_ref().map(|r| format!("127.0.0.1:{}", r.port())));
    let projection_url = if args.redis_projection { redis_addr.as_ref().map(|a| format!("redis://{a}/")) } else { None };
    let (service_at, service) = match (&args.nats_url, needs_service) {
        (Some(url), _) => (Some((url.clone(), None)), None),
        (None, true) => {
            let (url, creds, handle) = start_service(&scratch, args.memory_storage, projection_url.clone())?;
            (Some((url, Some(creds))), Some(handle))
        }
        (None, false) => (None, None),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(bench(args, service_at, redis_addr, projection_url, scratch.clone()));
    if let Some((stop, thread)) = service {
        let _ = stop.send(());
        let _ = thread.join();
    }
    drop(redis_server);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

type ServiceHandle = (tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>);

/// Runs the service on its own thread (an actix system) on the embedded
/// default, and returns the NATS URL it announced and the service user.
fn start_service(
    dir: &std::path::Path,
    memory: bool,
    redis: Option<String>,
) -> anyhow::Result<(String, baileys_store::embedded::Credentials, ServiceHandle)> {
    let mut cfg = baileys_store::Config::load_from(None, Vec::new())?;
    cfg.redis.url = redis;
    cfg.data_dir = dir.to_path_buf();
    cfg.embedded.port = -1;
    if memory {
        cfg.stream.storage = bstore_log::Storage::Memory;
    }
    // Every session of the largest row stays resident.
    cfg.sessions.max_active = 100_000;
    cfg.telemetry.filter = "warn".into();
    baileys_store::telemetry::init(&cfg.telemetry)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) = actix::System::new().block_on(baileys_store::run(cfg, shutdown)) {
            eprintln!("service failed: {e:#}");
        }
    });
    let url_file: PathBuf = dir.join("nats.url");
    let start = Instant::now();
    let ready = dir.join(baileys_store::READY_FILE);
    let url = loop {
        if let (Ok(url), true) = (std::fs::read_to_string(&url_file), ready.exists()) {
            break url.trim().to_owned();
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "the service did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The private server demands a password: the benchmark connects as the
    // service user (it also reaches JetStream for the floors).
    let creds = baileys_store::embedded::service_credentials(&baileys_store::embedded::dir(dir))?;
    Ok((url, creds, (stop, thread)))
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map_or("?".into(), |s| s.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    format!("{} CPUs ({model}), {:.1} GiB", std::thread::available_parallelism().map_or(1, |n| n.get()), mem_kib / 1048576.0)
}

fn rid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

async fn bench(
    args: Args,
    service: Option<(String, Option<baileys_store::embedded::Credentials>)>,
    redis_addr: Option<String>,
    projection: Option<String>,
    scratch: PathBuf,
) -> anyhow::Result<()> {
    println!("# baileys-store request benchmark");
    println!(
        "{}; {:.1} s per closed-loop row; stream storage: {}; Redis projection: {}",
        machine(),
        args.seconds,
        if args.memory_storage { "memory" } else { "file" },
        if projection.is_some() { "on" } else { "off" }
    );
    if let Some((url, creds)) = &service {
        let nc = match creds {
            Some(c) => async_nats::ConnectOptions::with_user_and_password(c.user.clone(), c.password.clone()).connect(url).await,
            None => async_nats::connect(url).await,
        }
        .context("connecting")?;
        wait_for_service(&nc).await?;
        raise_consumer_limit(&nc, args.stream_max_consumers).await?;
        if args.has("floors") {
            floors(&args, &nc, redis_addr.as_deref()).await?;
        }
        if args.has("target") {
            target(&args, &nc).await?;
        }
        if args.has("latency") {
            latency(&args, &nc).await?;
        }
        if args.has("sizes") {
            sizes(&args, &nc).await?;
        }
        if args.has("rate") {
            rate(&args, &nc).await?;
        }
    }
    if args.has("capacity") {
        let bin = match &args.service_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?.with_file_name("baileys-store"),
        };
        if bin.exists() {
            let cargs = capacity::CapacityArgs {
                service_bin: bin,
                sessions: args.capacity_sessions.clone(),
                cold_samples: args.cold_samples,
                group_messages: args.group_messages,
                stream_max_consumers: args.stream_max_consumers,
                redis_url: projection.clone(),
            };
            capacity::run(&cargs, &scratch).await?;
        } else {
            println!("\ncapacity: skipped, {} not found (cargo build --release --bin baileys-store)", bin.display());
        }
    }
    if args.has("ownership") {
        let bin = args.service_bin.clone().unwrap_or_else(|| std::env::current_exe().unwrap_or_default().with_file_name("baileys-store"));
        if bin.exists() {
            let oargs = ownership::OwnershipArgs { service_bin: bin, seconds: args.seconds, value_bytes: args.value_bytes, ids: args.ids };
            ownership::run(&oargs).await?;
        } else {
            println!("\nownership: skipped, {} not found (cargo build --release --bin baileys-store)", bin.display());
        }
    }
    Ok(())
}

/// Sets the event stream's `max_consumers` (see `--stream-max-consumers`).
pub async fn raise_consumer_limit(nc: &async_nats::Client, limit: i64) -> anyhow::Result<()> {
    if limit <= 0 {
        return Ok(());
    }
    let js = async_nats::jetstream::new(nc.clone());
    let mut stream = js.get_stream("BSTORE_EVENTS").await.context("the service's event stream")?;
    let mut config = stream.info().await?.config.clone();
    let before = config.max_consumers;
    config.max_consumers = limit as i32;
    js.update_stream(config).await.context("raising the stream's consumer limit")?;
    println!("(event stream max_consumers raised from {before} to {limit} for this run)");
    Ok(())
}

async fn wait_for_service(nc: &async_nats::Client) -> anyhow::Result<()> {
    let s = SessionClient::new(nc.clone(), "bstore", "bench", "ready").with_timeout(Duration::from_secs(1));
    let start = Instant::now();
    while s.info().await.is_err() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "the service does not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Bare NATS request-reply, bare JetStream publish + ack, bare Redis round trips.
async fn floors(args: &Args, nc: &async_nats::Client, redis_addr: Option<&str>) -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(args.seconds);
    println!();
    println!("## floors ({} B payloads)", args.value_bytes);
    print_header();
    let echo = floors::spawn_echo(nc).await?;
    let js = async_nats::jetstream::new(nc.clone());
    floors::floor_stream(&js, args.memory_storage).await?;
    let payload = bytes::Bytes::from(session_record(1, args.value_bytes));
    for &c in &args.concurrency {
        let cs = c.to_string();
        let (nc2, p) = (nc.clone(), payload.clone());
        let r = closed_loop(c, secs, move |_, _| {
            let (nc, p) = (nc2.clone(), p.clone());
            async move { nc.request("bench-echo", p).await.map(|_| ()).map_err(err) }
        })
        .await;
        print_row("floor: NATS request-reply", &cs, "-", &r);
        let (js2, p) = (js.clone(), payload.clone());
        let r = closed_loop(c, secs, move |client, _| {
            let (js, p) = (js2.clone(), p.clone());
            async move {
                let ack = js.publish(format!("bench-floor.{client}"), p).await.map_err(err)?;
                ack.await.map(|_| ()).map_err(err)
            }
        })
        .await;
        print_row("floor: JetStream publish + ack", &cs, "-", &r);
        if let Some(addr) = redis_addr {
            for (name, set) in [("floor: Redis PING round trip", false), ("floor: Redis SET round trip", true)] {
                let mut conns = Vec::new();
                for _ in 0..c {
                    conns.push(Arc::new(tokio::sync::Mutex::new(floors::Resp::connect(addr).await?)));
                }
                let conns = Arc::new(conns);
                let p = payload.clone();
                let r = closed_loop(c, secs, move |client, n| {
                    let (conns, p) = (conns.clone(), p.clone());
                    async move {
                        let mut conn = conns[client].lock().await;
                        if set {
                            let key = format!("bench:{client}:{}", n % 4);
                            conn.call(&[b"SET", key.as_bytes(), &p]).await
                        } else {
                            conn.call(&[b"PING"]).await
                        }
                    }
                })
                .await;
                print_row(name, &cs, "-", &r);
            }
        }
    }
    echo.abort();
    let _ = js.delete_stream("BENCH_FLOOR").await;
    Ok(())
}

/// keys.set beside its two floors, interleaved: one client sends 20 bare
/// NATS requests, 20 bare JetStream publishes, 20 keys.set (over 100
/// sessions), and again, for `rounds` rounds. Interleaving puts the three
/// under the same machine conditions, which on a shared machine drift
/// within seconds; the ratio of medians is the figure to compare with 1.2.
async fn target(args: &Args, nc: &async_nats::Client) -> anyhow::Result<()> {
    let echo = floors::spawn_echo(nc).await?;
    let js = async_nats::jetstream::new(nc.clone());
    floors::floor_stream(&js, args.memory_storage).await?;
    let template = Arc::new(session_record(7, args.value_bytes));
    let ids: Arc<Vec<String>> = Arc::new((0..args.ids).map(|i| format!("{}.0", 100_000_000 + i)).collect());
    let sessions = clients(nc, "target", 100);
    prefill(&sessions, "session", &ids, &template).await?;
    let payload = bytes::Bytes::from(session_record(1, args.value_bytes));
    let (mut rr, mut ack, mut set) = (Vec::new(), Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds * 4.0);
    let mut n = 0usize;
    while Instant::now() < deadline {
        for _ in 0..20 {
            let t = Instant::now();
            nc.request("bench-echo", payload.clone()).await?;
            rr.push(t.elapsed());
        }
        for _ in 0..20 {
            let t = Instant::now();
            js.publish("bench-floor.target", payload.clone()).await?.await?;
            ack.push(t.elapsed());
        }
        for _ in 0..20 {
            let s = &sessions[n % sessions.len()];
            let id = ids[(n / sessions.len()) % ids.len()].as_str();
            let v = stamped(&template, n as u64 + 1);
            let t = Instant::now();
            s.keys_set(&rid(), &key_data([("session", id, Some(&v[..]))])).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            set.push(t.elapsed());
            n += 1;
        }
    }
    echo.abort();
    let _ = js.delete_stream("BENCH_FLOOR").await;
    let outcome = |mut v: Vec<Duration>| {
        v.sort_unstable();
        Outcome { latencies: v, errors: 0, elapsed: Duration::from_secs_f64(args.seconds * 4.0), mean_lateness: None }
    };
    let (rr, ack, set) = (outcome(rr), outcome(ack), outcome(set));
    println!();
    println!("## keys.set against its floors, interleaved (1 client, 20 of each in turn, {:.0} s)", args.seconds * 4.0);
    print_header();
    print_row("floor: NATS request-reply", "1", "-", &rr);
    print_row("floor: JetStream publish + ack", "1", "-", &ack);
    print_row("keys.set (1 session value)", "1", "100", &set);
    println!(
        "keys.set p50 / (NATS request-reply p50 + JetStream ack p50) = {:.0} / ({:.0} + {:.0}) = {:.2} (target ≤ 1.2)",
        set.pct_us(0.5),
        rr.pct_us(0.5),
        ack.pct_us(0.5),
        set.pct_us(0.5) / (rr.pct_us(0.5) + ack.pct_us(0.5))
    );
    Ok(())
}

/// Writes `ids` values of `template` into each of `n` sessions, untimed, so
/// that reads find them and writes replace them.
async fn prefill(
    sessions: &Arc<Vec<SessionClient>>,
    ty: &'static str,
    ids: &Arc<Vec<String>>,
    template: &Arc<Vec<u8>>,
) -> anyhow::Result<()> {
    let failed = futures_util::stream::iter(0..sessions.len())
        .map(|i| {
            let (sessions, ids, template) = (sessions.clone(), ids.clone(), template.clone());
            async move {
                let mut data = KeyData::new();
                let of = data.entry(ty.into()).or_default();
                for (k, id) in ids.iter().enumerate() {
                    of.insert(id.clone(), Some(ByteBuf::from(stamped(&template, (i * 1000 + k) as u64))));
                }
                sessions[i].keys_set(&rid(), &data).await
            }
        })
        .buffer_unordered(64)
        .filter(|r| std::future::ready(r.is_err()))
        .count()
        .await;
    anyhow::ensure!(failed == 0, "{failed} sessions failed to fill");
    Ok(())
}

fn clients(nc: &async_nats::Client, tenant: &str, n: usize) -> Arc<Vec<SessionClient>> {
    Arc::new((0..n).map(|i| SessionClient::new(nc.clone(), "bstore", tenant, &format!("s{i}"))).collect())
}

/// One `keys.set` row and one `keys.get` row of `ty` values, closed loop.
/// Request n of client i goes to session (i + n·c) mod S: every session is
/// visited in turn, and with S ≥ c no two clients share a session at once.
#[allow(clippy::too_many_arguments)]
async fn set_get_rows(
    secs: Duration,
    c: usize,
    sessions: &Arc<Vec<SessionClient>>,
    ty: &'static str,
    ids: &Arc<Vec<String>>,
    template: &Arc<Vec<u8>>,
    per_call: usize,
) -> (Outcome, Outcome) {
    let s_n = sessions.len();
    let (s2, i2, t2) = (sessions.clone(), ids.clone(), template.clone());
    let set = closed_loop(c, secs, move |client, n| {
        let (s, ids, t) = (s2.clone(), i2.clone(), t2.clone());
        async move {
            let session = &s[(client + n * c) % s_n];
            let mut data = KeyData::new();
            let of = data.entry(ty.into()).or_default();
            for k in 0..per_call {
                let id = &ids[(n * per_call + k) % ids.len()];
                of.insert(id.clone(), Some(ByteBuf::from(stamped(&t, (n * 1_000_003 + client * 7919 + k) as u64 + 1))));
            }
            session.keys_set(&rid(), &data).await.map(|_| ()).map_err(err)
        }
    })
    .await;
    let (s2, i2) = (sessions.clone(), ids.clone());
    let get = closed_loop(c, secs, move |client, n| {
        let (s, ids) = (s2.clone(), i2.clone());
        async move {
            let session = &s[(client + n * c) % s_n];
            let want: Vec<&str> = (0..per_call).map(|k| ids[(n * per_call + k) % ids.len()].as_str()).collect();
            let got = session.keys_get(ty, &want).await.map_err(err)?;
            if got.len() != want.len() {
                return Err(format!("asked {} ids, got {}", want.len(), got.len()));
            }
            Ok(())
        }
    })
    .await;
    (set, get)
}

/// keys.set / keys.get of one 3 KB Signal session value, over 1, 100 and
/// 10,000 sessions, at 1, 16 and 64 concurrent clients.
async fn latency(args: &Args, nc: &async_nats::Client) -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(args.seconds);
    println!();
    println!("## keys.set / keys.get of one {} B session value (closed loop; every write changes the value)", args.value_bytes);
    print_header();
    let template = Arc::new(session_record(2, args.value_bytes));
    let ids: Arc<Vec<String>> = Arc::new((0..args.ids).map(|i| format!("{}.0", 100_000_000 + i)).collect());
    for &s_n in &args.sessions {
        let sessions = clients(nc, &format!("lat{s_n}"), s_n);
        let t = Instant::now();
        prefill(&sessions, "session", &ids, &template).await?;
        eprintln!("filled {s_n} sessions in {:.1} s", t.elapsed().as_secs_f64());
        for &c in &args.concurrency {
            let (set, get) = set_get_rows(secs, c, &sessions, "session", &ids, &template, 1).await;
            print_row("keys.set (1 session value)", &c.to_string(), &s_n.to_string(), &set);
            print_row("keys.get (1 session value)", &c.to_string(), &s_n.to_string(), &get);
        }
    }
    Ok(())
}

/// Other value sizes from real traffic: sender keys at 28 KB and at the
/// 446 KB plateau, and the first pre-key upload (812 values in one call).
async fn sizes(args: &Args, nc: &async_nats::Client) -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(args.seconds);
    println!();
    println!("## other sizes from Baileys traffic (100 sessions, closed loop)");
    print_header();
    let conc: Vec<usize> = args.concurrency.iter().copied().filter(|&c| c <= 16).collect();
    let cases: [(&str, &'static str, Vec<u8>, usize, usize); 3] = [
        ("sender-key 28 KB", "sender-key", sender_key_record(3, 28_000), 1, 4),
        ("sender-key 446 KB", "sender-key", sender_key_record(4, 446_000), 1, 4),
        ("pre-key x812 in one call (~69 KB)", "pre-key", pre_key(5), 812, 812),
    ];
    for (i, (label, ty, template, per_call, n_ids)) in cases.into_iter().enumerate() {
        let sessions = clients(nc, &format!("size{i}"), 100);
        let template = Arc::new(template);
        let ids: Arc<Vec<String>> = Arc::new(if ty == "pre-key" {
            (1..=n_ids).map(|i| i.to_string()).collect()
        } else {
            (0..n_ids).map(|i| format!("120363000000000001@g.us::10000000000000{i}::1")).collect()
        });
        prefill(&sessions, ty, &ids, &template).await?;
        for &c in &conc {
            let (set, get) = set_get_rows(secs, c, &sessions, ty, &ids, &template, per_call).await;
            print_row(&format!("keys.set ({label})"), &c.to_string(), "100", &set);
            print_row(&format!("keys.get ({label})"), &c.to_string(), "100", &get);
        }
    }
    Ok(())
}

/// Open loop at a fixed rate: latency from the scheduled send time.
async fn rate(args: &Args, nc: &async_nats::Client) -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(args.rate_seconds);
    println!();
    println!(
        "## open loop at {:.0} requests/s, {:.0} s per row, one {} B session value per request",
        args.rate, args.rate_seconds, args.value_bytes
    );
    println!("latency from the scheduled send time (no coordinated omission); req/s is the rate achieved");
    print_header();
    let template = Arc::new(session_record(6, args.value_bytes));
    let ids: Arc<Vec<String>> = Arc::new((0..args.ids).map(|i| format!("{}.0", 100_000_000 + i)).collect());
    for &s_n in args.sessions.iter().filter(|&&s| s >= 100) {
        let sessions = clients(nc, &format!("rate{s_n}"), s_n);
        prefill(&sessions, "session", &ids, &template).await?;
        let watch = Watch::new(args);
        let (s2, i2, t2) = (sessions.clone(), ids.clone(), template.clone());
        let cpu0 = watch.snapshot();
        let set = open_loop(args.rate, secs, move |k| {
            let (s, ids, t) = (s2.clone(), i2.clone(), t2.clone());
            async move {
                let id = ids[(k / s_n) % ids.len()].as_str();
                let v = stamped(&t, k as u64 + 1);
                s[k % s_n].keys_set(&rid(), &key_data([("session", id, Some(&v[..]))])).await.map(|_| ()).map_err(err)
            }
        })
        .await;
        print_row("keys.set (open loop)", "-", &s_n.to_string(), &set);
        watch.print(&cpu0, set.latencies.len());
        let (s2, i2) = (sessions.clone(), ids.clone());
        let cpu0 = watch.snapshot();
        let get = open_loop(args.rate, secs, move |k| {
            let (s, ids) = (s2.clone(), i2.clone());
            async move {
                let id = ids[(k / s_n) % ids.len()].as_str();
                s[k % s_n].keys_get("session", &[id]).await.map(|_| ()).map_err(err)
            }
        })
        .await;
        print_row("keys.get (open loop)", "-", &s_n.to_string(), &get);
        watch.print(&cpu0, get.latencies.len());
    }
    Ok(())
}
