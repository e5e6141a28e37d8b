//! `bstore-bench`: request latency and throughput of baileys-store over NATS,
//! beside the floors it is built on, measured in one run on one machine.
//!
//! With no `--nats-url` it starts everything itself: the service in this
//! process (on its embedded nats-server, in a temporary data dir, in-memory
//! stream unless `--file-storage`) and the clients on another thread. It is
//! a benchmark, not a test: it prints figures and asserts nothing.
//!
//! ```text
//! cargo run --release --bin bstore-bench -- --seconds 5 --concurrency 1,64
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bstore_api::client::{SessionClient, key_data};
use clap::Parser;
use futures_util::StreamExt;

#[derive(Parser, Clone)]
#[command(about = "Latency and throughput of keys.set / keys.get over NATS, with the floors beside them")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent clients, comma-separated; each client works on its own session.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Bytes per value written (a Baileys session record is about 3 KB).
    #[arg(long, default_value_t = 3000)]
    value_bytes: usize,
    /// Distinct key ids per session that writes rotate over.
    #[arg(long, default_value_t = 50)]
    ids: usize,
    /// Use a running service and its NATS instead of starting one.
    #[arg(long)]
    nats_url: Option<String>,
    /// Keep the started service's stream on disk rather than in memory.
    #[arg(long)]
    file_storage: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = std::env::temp_dir().join(format!("bstore-bench-{}", std::process::id()));
    let (url, service) = match &args.nats_url {
        Some(url) => (url.clone(), None),
        None => {
            let (url, handle) = start_service(&scratch, args.file_storage)?;
            (url, Some(handle))
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(bench(args, url));
    if let Some((stop, thread)) = service {
        let _ = stop.send(());
        let _ = thread.join();
    }
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

type ServiceHandle = (tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>);

/// Runs the service on its own thread (an actix system) on the embedded
/// default, and returns the NATS URL it announced.
fn start_service(dir: &std::path::Path, file_storage: bool) -> anyhow::Result<(String, ServiceHandle)> {
    let mut cfg = baileys_store::Config::load_from(None, Vec::new())?;
    cfg.data_dir = dir.to_path_buf();
    cfg.embedded.port = -1;
    if !file_storage {
        cfg.stream.storage = bstore_log::Storage::Memory;
    }
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
    let url = loop {
        if let Ok(url) = std::fs::read_to_string(&url_file) {
            break url.trim().to_owned();
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "the service did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((url, (stop, thread)))
}

async fn bench(args: Args, url: String) -> anyhow::Result<()> {
    let nc = async_nats::connect(&url).await.context("connecting")?;
    wait_for_service(&nc).await?;
    let secs = Duration::from_secs_f64(args.seconds);
    println!("# baileys-store request benchmark");
    println!("value {} B, {} ids per session, {:.1} s per row, {} CPUs", args.value_bytes, args.ids, args.seconds, std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!();
    println!("{:<34} {:>5} {:>10} {:>10} {:>10} {:>10}", "operation", "conc", "p50 µs", "p99 µs", "p999 µs", "req/s");

    // Floors first: what NATS itself costs on this machine in this run.
    let echo = spawn_echo(&nc).await?;
    let js = async_nats::jetstream::new(nc.clone());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH_FLOOR".into(),
        subjects: vec!["bench-floor.>".into()],
        storage: if args.file_storage { async_nats::jetstream::stream::StorageType::File } else { async_nats::jetstream::stream::StorageType::Memory },
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![7u8; args.value_bytes]);
    for &c in &args.concurrency {
        let nc2 = nc.clone();
        let p = payload.clone();
        let r = run(c, secs, move |_, _| {
            let (nc, p) = (nc2.clone(), p.clone());
            async move { nc.request("bench-echo", p).await.map(|_| ()).map_err(|e| e.to_string()) }
        })
        .await;
        print_row("floor: NATS request-reply", c, &r);
        let js2 = js.clone();
        let p = payload.clone();
        let r = run(c, secs, move |client, _| {
            let (js, p) = (js2.clone(), p.clone());
            async move {
                let ack = js.publish(format!("bench-floor.{client}"), p).await.map_err(|e| e.to_string())?;
                ack.await.map(|_| ()).map_err(|e| e.to_string())
            }
        })
        .await;
        print_row("floor: JetStream publish + ack", c, &r);
    }
    echo.abort();

    let value = Arc::new(vec![3u8; args.value_bytes]);
    for &c in &args.concurrency {
        let sessions: Arc<Vec<SessionClient>> = Arc::new((0..c).map(|i| SessionClient::new(nc.clone(), "bstore", "bench", &format!("c{c}-s{i}"))).collect());
        let ids = args.ids;
        let (s2, v2) = (sessions.clone(), value.clone());
        let set = run(c, secs, move |client, n| {
            let (s, v) = (s2[client].clone(), v2.clone());
            async move {
                let id = format!("{}.0", n % ids);
                let rid = uuid::Uuid::new_v4().simple().to_string();
                s.keys_set(&rid, &key_data([("session", id.as_str(), Some(&v[..]))])).await.map(|_| ()).map_err(|e| e.to_string())
            }
        })
        .await;
        print_row("keys.set (1 value)", c, &set);
        let s2 = sessions.clone();
        let get = run(c, secs, move |client, n| {
            let s = s2[client].clone();
            async move {
                let id = format!("{}.0", n % ids);
                s.keys_get("session", &[id.as_str()]).await.map(|_| ()).map_err(|e| e.to_string())
            }
        })
        .await;
        print_row("keys.get (1 value)", c, &get);
    }
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

async fn spawn_echo(nc: &async_nats::Client) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut sub = nc.subscribe("bench-echo").await?;
    nc.flush().await?;
    let nc = nc.clone();
    Ok(tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = nc.publish(reply, m.payload).await;
            }
        }
    }))
}

struct Outcome {
    latencies: Vec<Duration>,
    errors: usize,
    elapsed: Duration,
}

/// Runs `c` closed-loop clients for `secs`; client `i` calls `op(i, n)` for
/// its n-th request.
async fn run<F, Fut>(c: usize, secs: Duration, op: F) -> Outcome
where
    F: Fn(usize, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let start = Instant::now();
    let deadline = start + secs;
    let mut tasks = Vec::new();
    for client in 0..c {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut n) = (Vec::new(), 0usize, 0usize);
            while Instant::now() < deadline {
                let t = Instant::now();
                match op(client, n).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        if errors == 1 {
                            eprintln!("client {client}: {e}");
                        }
                    }
                }
                n += 1;
            }
            (lat, errors)
        }));
    }
    let mut out = Outcome { latencies: Vec::new(), errors: 0, elapsed: Duration::ZERO };
    for t in tasks {
        let (lat, errors) = t.await.expect("client task");
        out.latencies.extend(lat);
        out.errors += errors;
    }
    out.elapsed = start.elapsed();
    out.latencies.sort_unstable();
    out
}

fn print_row(name: &str, c: usize, o: &Outcome) {
    let pct = |p: f64| -> f64 {
        if o.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((o.latencies.len() as f64 * p).ceil() as usize).clamp(1, o.latencies.len()) - 1;
        o.latencies[i].as_secs_f64() * 1e6
    };
    let rate = o.latencies.len() as f64 / o.elapsed.as_secs_f64();
    let errors = if o.errors > 0 { format!("  ({} errors)", o.errors) } else { String::new() };
    println!("{name:<34} {c:>5} {:>10.0} {:>10.0} {:>10.0} {rate:>10.0}{errors}", pct(0.50), pct(0.99), pct(0.999));
}
