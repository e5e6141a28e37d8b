//! Ownership: what partition ownership costs on keys.set and keys.get, and
//! how long a session goes unserved when an instance dies or stops.
//!
//! Every figure comes from real processes started here: nats-servers
//! (`bstore_testkit::NatsServer`, one of them with the partition mapping a
//! deployment puts in its account) and `baileys-store serve` instances
//! (`bstore_testkit::ServiceProcess`).
//!
//! 1. **Cost.** Three set-ups run side by side — (a) one instance, every
//!    partition local; (b) two instances behind a server that maps
//!    `bstore.*.*.*.*` to the owner's partition subject, so every request
//!    reaches its owner directly; (c) two instances and no mapping, so a
//!    request that the queue group hands to the other instance is forwarded
//!    once (about half of them) — beside the bare NATS request-reply floor.
//!    Rows are interleaved in rounds (the order of the set-ups rotates each
//!    round), so that the ratios to (a) are taken under the same machine
//!    conditions; each row pools its rounds' samples.
//! 2. **Failover.** Two instances behind the mapping, one client sending
//!    keys.set to sessions spread over every partition (two per partition),
//!    one request in flight at a time. One instance is killed (SIGKILL) or
//!    stopped (SIGTERM); the client keeps going round the sessions, and a
//!    request that fails with a retryable answer (503, 504, no responders,
//!    a time-out) is retried with the same rid on that session's next turn.
//!    A session is served again at the first success after its last failed
//!    attempt. Then the instance is started again, the partitions spread
//!    back, and the next repetition kills the other one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bstore_api::client::{ClientError, SessionClient, key_data};
use bstore_testkit::{NatsServer, ServiceProcess, TempDir};
use futures_util::StreamExt;

use crate::stats::{Outcome, closed_loop};
use crate::values::{session_record, stamped};

/// The mapping of `deploy/accounts.conf`, in the server's default account.
const MAPPING: &str =
    r#"mappings: { "bstore.*.*.*.*": "bstore-p.{{partition(16,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}.{{wildcard(4)}}" }"#;
/// `cluster.partitions` (the default, and the mapping's count).
const PARTITIONS: u32 = 16;
/// Rounds of the interleaved cost rows.
const ROUNDS: usize = 4;
/// Repetitions of each failover.
const REPEATS: usize = 3;
/// Sessions the cost rows are spread over.
const COST_SESSIONS: usize = 100;
/// Failover: sessions per partition.
const PER_PARTITION: usize = 2;
/// Failover: the time-out of one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Failover: the least pause before a session's failed request is retried.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// The lease settings of the second failover run.
const FAST_LEASES: [(&str, &str); 3] =
    [("BSTORE__CLUSTER__LEASE_TTL", "3"), ("BSTORE__CLUSTER__MARGIN", "1"), ("BSTORE__CLUSTER__RENEW_INTERVAL", "0.5")];

pub struct OwnershipArgs {
    pub service_bin: PathBuf,
    /// Seconds per closed-loop row in each round.
    pub seconds: f64,
    pub value_bytes: usize,
    pub ids: usize,
}

/// A nats-server and the service instances on it. Fields drop in order: the
/// instances stop before their server.
struct Stack {
    services: Vec<ServiceProcess>,
    nats: NatsServer,
    nc: async_nats::Client,
    dir: TempDir,
    bin: PathBuf,
    env: Vec<(String, String)>,
}

impl Stack {
    /// Starts the server (with the mapping or not) and `instances` service
    /// processes, and waits until the partitions are spread over them.
    async fn start(bin: &Path, label: &str, mapping: bool, instances: usize, key: &str, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let nats = NatsServer::start_conf(if mapping { MAPPING } else { "" });
        let dir = TempDir::new(&format!("bench-{label}"));
        let mut env = vec![
            ("BSTORE_NATS_URL".to_owned(), nats.url()),
            ("BSTORE_KEYS".to_owned(), key.to_owned()),
            // Info from the API and the lease keeper only: their start-up and
            // partition lines, nothing per request.
            ("BSTORE_LOG".to_owned(), "warn,bstore_api=info,bstore_cluster=info".to_owned()),
            ("BSTORE_LOG_FORMAT".to_owned(), "json".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let nc = async_nats::connect(nats.url()).await?;
        let mut stack = Self { services: Vec::new(), nats, nc, dir, bin: bin.to_path_buf(), env };
        for i in 0..instances {
            let svc = stack.spawn(i);
            stack.services.push(svc);
        }
        stack.wait_balanced(Duration::from_secs(60)).await?;
        Ok(stack)
    }

    fn spawn(&self, i: usize) -> ServiceProcess {
        let data = self.dir.path().join(format!("data-{i}")).display().to_string();
        let mut env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        env.push(("BSTORE_DATA_DIR", &data));
        let logs = self.dir.path().join("logs");
        tokio::task::block_in_place(|| ServiceProcess::start(&self.bin, &env, &logs))
    }

    /// The owner (instance id) of every partition's lease.
    async fn owners(&self) -> Vec<Option<String>> {
        let js = async_nats::jetstream::new(self.nc.clone());
        let Ok(kv) = js.get_key_value("BSTORE_LEASES").await else { return vec![None; PARTITIONS as usize] };
        let mut out = Vec::new();
        for p in 0..PARTITIONS {
            let owner = match kv.entry(format!("p.{p}")).await {
                Ok(Some(e)) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                    Some(String::from_utf8_lossy(&e.value).into_owned())
                }
                _ => None,
            };
            out.push(owner);
        }
        out
    }

    /// Waits until every partition is held and each running instance holds
    /// its even share, then a little longer for the partition subscriptions.
    async fn wait_balanced(&self, within: Duration) -> anyhow::Result<()> {
        let ids: Vec<String> = self.services.iter().filter_map(instance_id).collect();
        let n = ids.len().max(1);
        let (floor, ceil) = (PARTITIONS as usize / n, (PARTITIONS as usize).div_ceil(n));
        let start = Instant::now();
        loop {
            let owners = self.owners().await;
            let mut counts: HashMap<&str, usize> = ids.iter().map(|i| (i.as_str(), 0)).collect();
            let mut all_held = true;
            for o in &owners {
                match o.as_deref().and_then(|o| counts.get_mut(o)) {
                    Some(c) => *c += 1,
                    None => all_held = false,
                }
            }
            if all_held && counts.values().all(|c| (floor..=ceil).contains(c)) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                return Ok(());
            }
            anyhow::ensure!(start.elapsed() < within, "the partitions did not spread over the instances: {owners:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// CPU seconds (user + system) so far of the service instances
    /// together and of the nats-server.
    fn cpu(&self) -> (f64, f64) {
        let services = (0..self.services.len())
            .filter_map(|i| std::fs::read_to_string(self.dir.path().join(format!("data-{i}")).join(baileys_store::READY_FILE)).ok())
            .filter_map(|t| t.trim().parse::<u32>().ok())
            .map(crate::capacity::cpu_secs)
            .sum();
        let nats = std::fs::read_dir(self.nats.dir().join("ports"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("nats-server_")?.strip_suffix(".ports")?.parse::<u32>().ok())
            .map(crate::capacity::cpu_secs)
            .sum();
        (services, nats)
    }

    /// The number of requests the instances have forwarded to an owner.
    async fn forwarded(&self) -> u64 {
        let inbox = self.nc.new_inbox();
        let Ok(mut sub) = self.nc.subscribe(inbox.clone()).await else { return 0 };
        let _ = self.nc.publish_with_reply("$SRV.STATS.baileys-store", inbox, bytes::Bytes::new()).await;
        let (mut total, mut got) = (0, 0);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while got < self.services.len() {
            let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await else { break };
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            for ep in v["endpoints"].as_array().into_iter().flatten() {
                total += ep["data"]["routing"]["forwarded_to_owner"].as_u64().unwrap_or(0);
            }
            got += 1;
        }
        total
    }
}

/// The instance id of the last start of `svc`, from its "serving requests"
/// log line.
fn instance_id(svc: &ServiceProcess) -> Option<String> {
    let log = svc.log_text();
    let line = log.lines().rev().find(|l| l.contains("serving requests"))?;
    let rest = &line[line.find("\"instance\":\"")? + 12..];
    Some(rest[..rest.find('"')?].to_owned())
}

fn rid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub async fn run(args: &OwnershipArgs) -> anyhow::Result<()> {
    let key = bstore_codec::Keyring::format_entry(1, &bstore_codec::Keyring::generate_key());
    println!();
    println!(
        "## ownership: its cost on keys.set / keys.get, and failover ({PARTITIONS} partitions; service processes: {})",
        args.service_bin.display()
    );
    cost(args, &key).await?;
    failover(args, &key).await
}

/// Samples of one row over the rounds.
#[derive(Default)]
struct Pool {
    latencies: Vec<Duration>,
    errors: usize,
    elapsed: Duration,
    /// Each round's p50 (µs).
    p50s: Vec<f64>,
}

impl Pool {
    fn add(&mut self, o: Outcome) {
        self.p50s.push(o.pct_us(0.5));
        self.latencies.extend(o.latencies);
        self.errors += o.errors;
        self.elapsed += o.elapsed;
    }

    fn outcome(&self) -> Outcome {
        let mut latencies = self.latencies.clone();
        latencies.sort_unstable();
        Outcome { latencies, errors: self.errors, elapsed: self.elapsed, mean_lateness: None }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

const SETUPS: [&str; 3] =
    ["(a) 1 instance, all partitions local", "(b) 2 instances, server mapping", "(c) 2 instances, no mapping (forwarding)"];

async fn cost(args: &OwnershipArgs, key: &str) -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(args.seconds);
    let bin = args.service_bin.clone();
    let stacks = [
        Stack::start(&bin, "own-a", false, 1, key, &[]).await?,
        Stack::start(&bin, "own-b", true, 2, key, &[]).await?,
        Stack::start(&bin, "own-c", false, 2, key, &[]).await?,
    ];
    let template = Arc::new(session_record(11, args.value_bytes));
    let ids: Arc<Vec<String>> = Arc::new((0..args.ids).map(|i| format!("{}.0", 100_000_000 + i)).collect());
    let mut sessions = Vec::new();
    for s in &stacks {
        let clients = crate::clients(&s.nc, "own", COST_SESSIONS);
        crate::prefill(&clients, "session", &ids, &template).await?;
        sessions.push(clients);
    }
    let echo = crate::floors::spawn_echo(&stacks[0].nc).await?;
    let payload = bytes::Bytes::from(session_record(1, args.value_bytes));
    // (concurrency, row) → samples; row 0 is the floor, then set and get per set-up.
    let mut pools: HashMap<(usize, usize), Pool> = HashMap::new();
    // (concurrency, set-up) → (requests forwarded, requests answered).
    let mut forwarding: HashMap<(usize, usize), (u64, u64)> = HashMap::new();
    // (concurrency, set-up) → CPU seconds of the instances, the nats-server
    // and this process over its set and get rows.
    let mut cpu: HashMap<(usize, usize), [f64; 3]> = HashMap::new();
    let me = std::process::id();
    let concurrency = [1usize, 16];
    for round in 0..ROUNDS {
        for &c in &concurrency {
            let (nc, p) = (stacks[0].nc.clone(), payload.clone());
            let floor = closed_loop(c, secs, move |_, _| {
                let (nc, p) = (nc.clone(), p.clone());
                async move { nc.request("bench-echo", p).await.map(|_| ()).map_err(crate::err) }
            })
            .await;
            pools.entry((c, 0)).or_default().add(floor);
            for k in 0..SETUPS.len() {
                let i = (k + round) % SETUPS.len();
                let before = if i == 0 { 0 } else { stacks[i].forwarded().await };
                let (cpu_s, cpu_n, cpu_b) = (stacks[i].cpu().0, stacks[i].cpu().1, crate::capacity::cpu_secs(me));
                let (set, get) = crate::set_get_rows(secs, c, &sessions[i], "session", &ids, &template, 1).await;
                let (cpu_s1, cpu_n1) = stacks[i].cpu();
                let used = cpu.entry((c, i)).or_default();
                used[0] += cpu_s1 - cpu_s;
                used[1] += cpu_n1 - cpu_n;
                used[2] += crate::capacity::cpu_secs(me) - cpu_b;
                let requests = (set.latencies.len() + get.latencies.len()) as u64;
                let forwarded = if i == 0 { 0 } else { stacks[i].forwarded().await.saturating_sub(before) };
                pools.entry((c, 1 + 2 * i)).or_default().add(set);
                pools.entry((c, 2 + 2 * i)).or_default().add(get);
                let f = forwarding.entry((c, i)).or_default();
                f.0 += forwarded;
                f.1 += requests;
            }
        }
        eprintln!("ownership: cost round {} of {ROUNDS} done", round + 1);
    }
    echo.abort();
    println!();
    println!(
        "### cost: {COST_SESSIONS} sessions, one {} B session value per request, closed loop, {ROUNDS} interleaved rounds of {:.1} s per row",
        args.value_bytes, args.seconds
    );
    println!("ratio: this row's p50 over (a)'s p50 of the same op and clients, in each round; the median of the rounds (and their range)");
    println!(
        "{:<52} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>22} {:>10}",
        "operation", "conc", "p50 µs", "p90 µs", "p99 µs", "mean µs", "req/s", "p50 / (a) [range]", "forwarded"
    );
    let mut estimates = Vec::new();
    for &c in &concurrency {
        let floor = pools[&(c, 0)].outcome();
        print_row("floor: NATS request-reply (3 KB echo)", c, &floor, "", "");
        for (op, off) in [("keys.set", 1), ("keys.get", 2)] {
            let base = &pools[&(c, off)].p50s;
            for (i, setup) in SETUPS.iter().enumerate() {
                let pool = &pools[&(c, off + 2 * i)];
                let ratios: Vec<f64> = pool.p50s.iter().zip(base).map(|(x, b)| x / b).collect();
                let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ratio = format!("{:.2} [{lo:.2}–{hi:.2}]", median(ratios));
                // Counted over the set and get rows together.
                let fwd = match forwarding.get(&(c, i)) {
                    Some((f, n)) if i > 0 && off == 2 => format!("{:.0} %", *f as f64 / (*n).max(1) as f64 * 100.0),
                    _ => String::new(),
                };
                print_row(&format!("{op} {setup}"), c, &pool.outcome(), &ratio, &fwd);
            }
            // (c) is a mix of direct requests (as in (b)) and forwarded ones,
            // in the share counted: the forwarded ones' mean follows.
            if let Some((f, n)) = forwarding.get(&(c, 2)) {
                let share = *f as f64 / (*n).max(1) as f64;
                let (direct, mixed) = (mean_us(&pools[&(c, off + 2)].outcome()), mean_us(&pools[&(c, off + 4)].outcome()));
                if share > 0.0 {
                    let fwd = (mixed - (1.0 - share) * direct) / share;
                    estimates.push(format!(
                        "{op}, {c} client(s): a forwarded request ≈ {fwd:.0} µs mean against {direct:.0} µs direct (+{:.0} µs; the floor's mean is {:.0} µs)",
                        fwd - direct,
                        mean_us(&floor)
                    ));
                }
            }
        }
    }
    println!("forwarded: requests an instance passed to the owner, over the set and get rows of that set-up (from $SRV.STATS)");
    println!("the cost of a forwarded request, from the means of (b) and (c) and the forwarded share:");
    for e in estimates {
        println!("  {e}");
    }
    println!("CPU per request over the set and get rows together (µs of user + system; /proc/<pid>/stat, 10 ms ticks):");
    println!("{:<52} {:>5} {:>10} {:>12} {:>8} {:>8}", "set-up", "conc", "instances", "nats-server", "bench", "total");
    for &c in &concurrency {
        for (i, setup) in SETUPS.iter().enumerate() {
            let (Some(used), Some((_, n))) = (cpu.get(&(c, i)), forwarding.get(&(c, i))) else { continue };
            let per = |x: f64| x / (*n).max(1) as f64 * 1e6;
            println!(
                "{setup:<52} {c:>5} {:>10.0} {:>12.0} {:>8.0} {:>8.0}",
                per(used[0]),
                per(used[1]),
                per(used[2]),
                per(used[0] + used[1] + used[2])
            );
        }
    }
    Ok(())
}

fn print_row(name: &str, c: usize, o: &Outcome, ratio: &str, forwarded: &str) {
    let errors = if o.errors > 0 { format!("  ({} errors)", o.errors) } else { String::new() };
    println!(
        "{name:<52} {c:>5} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {ratio:>22} {forwarded:>10}{errors}",
        o.pct_us(0.5),
        o.pct_us(0.9),
        o.pct_us(0.99),
        mean_us(o),
        o.rate()
    );
}

fn mean_us(o: &Outcome) -> f64 {
    if o.latencies.is_empty() {
        return f64::NAN;
    }
    o.latencies.iter().map(Duration::as_secs_f64).sum::<f64>() / o.latencies.len() as f64 * 1e6
}

/// How one attempt of the failover client ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Ok,
    NoResponders,
    TimedOut,
    Code(u16),
    Other,
}

impl End {
    fn of<T>(r: &Result<T, ClientError>) -> Self {
        match r {
            Ok(_) => Self::Ok,
            Err(ClientError::NoResponders) => Self::NoResponders,
            Err(ClientError::TimedOut) => Self::TimedOut,
            Err(ClientError::Service { code, .. }) => Self::Code(*code),
            Err(ClientError::Other(_)) => Self::Other,
        }
    }

    /// What the Node client retries with the same rid.
    fn retryable(self) -> bool {
        matches!(self, Self::NoResponders | Self::TimedOut | Self::Code(503 | 504))
    }

    fn name(self) -> String {
        match self {
            Self::Ok => "ok".into(),
            Self::NoResponders => "no responders".into(),
            Self::TimedOut => "time-out".into(),
            Self::Code(c) => c.to_string(),
            Self::Other => "other".into(),
        }
    }
}

/// One attempt of the failover client.
struct Attempt {
    session: usize,
    sent: Instant,
    done: Instant,
    end: End,
    /// When the call (the first attempt with this rid) began.
    call_start: Instant,
}

/// What one failover gave; times from the signal.
struct Failover {
    /// Sessions of the instance that was stopped.
    victim_sessions: usize,
    /// The first, median and last of those sessions served again.
    first: Duration,
    median: Duration,
    max: Duration,
    /// The last of the other instance's sessions served after the signal.
    others_max: Duration,
    /// The longest call as a bot sees it (first attempt to success).
    longest_call: Duration,
    /// The longest single attempt.
    longest_attempt: Duration,
    /// Failed attempts after the signal by how they ended: the stopped
    /// instance's sessions, the others'.
    failures: [BTreeMap<End, usize>; 2],
    /// SIGTERM: when the process had exited.
    exited: Option<Duration>,
    /// When the other instance logged that it had taken the last of the
    /// partitions (leases created, subjects subscribed).
    taken: Option<Duration>,
}

async fn failover(args: &OwnershipArgs, key: &str) -> anyhow::Result<()> {
    println!();
    println!(
        "### failover: 2 instances behind the mapping; 1 client sending keys.set round {} sessions ({PER_PARTITION} per partition), one request in flight",
        PARTITIONS as usize * PER_PARTITION
    );
    println!(
        "a failed request (503, 504, no responders, time-out) is sent again with the same rid on its session's next turn, at least {} ms later; attempt time-out {} ms",
        RETRY_PAUSE.as_millis(),
        ATTEMPT_TIMEOUT.as_millis()
    );
    println!(
        "times from the signal; leases taken: when the other instance logged that it held the last of them (leases created, subjects subscribed);"
    );
    println!(
        "a session is served again at its first success sent after its last failed attempt (and, for the stopped instance's, after the leases were taken);"
    );
    println!(
        "first / median / max: over the stopped instance's sessions; others: the last of the other instance's sessions served after the signal"
    );
    let bin = args.service_bin.clone();
    for (label, env) in
        [("default leases (ttl 5 s, renew 1 s, margin 1.5 s)", &[][..]), ("ttl 3 s, renew 0.5 s, margin 1 s", &FAST_LEASES[..])]
    {
        let mut stack = Stack::start(&bin, "own-f", true, 2, key, env).await?;
        let (sessions, parts) = failover_sessions(&stack.nc);
        let template = Arc::new(session_record(13, args.value_bytes));
        let ids: Arc<Vec<String>> = Arc::new(vec![FAILOVER_ID.to_owned()]);
        crate::prefill(&sessions, "session", &ids, &template).await?;
        println!();
        println!("{label}:");
        println!(
            "{:<8} {:>6} {:>9} {:>12} {:>10} {:>10} {:>10} {:>10} {:>13} {:>16} {:>8}",
            "signal", "run", "sessions", "leases taken", "first", "median", "max", "others", "longest call", "longest attempt", "exited"
        );
        for signal in ["SIGKILL", "SIGTERM"] {
            let mut runs = Vec::new();
            for r in 0..REPEATS {
                let f = failover_once(&mut stack, &sessions, &parts, &template, r % 2, signal == "SIGKILL").await?;
                print_failover(signal, &(r + 1).to_string(), &f);
                runs.push(f);
            }
            let med = |g: fn(&Failover) -> Duration| Duration::from_secs_f64(median(runs.iter().map(|f| g(f).as_secs_f64()).collect()));
            let opt = |g: fn(&Failover) -> Option<Duration>| {
                let v: Vec<f64> = runs.iter().filter_map(|f| g(f).map(|d| d.as_secs_f64())).collect();
                (!v.is_empty()).then(|| Duration::from_secs_f64(median(v)))
            };
            let summary = Failover {
                victim_sessions: median(runs.iter().map(|f| f.victim_sessions as f64).collect()) as usize,
                first: med(|f| f.first),
                median: med(|f| f.median),
                max: med(|f| f.max),
                others_max: med(|f| f.others_max),
                longest_call: med(|f| f.longest_call),
                longest_attempt: med(|f| f.longest_attempt),
                failures: Default::default(),
                exited: opt(|f| f.exited),
                taken: opt(|f| f.taken),
            };
            print_failover(signal, "median", &summary);
        }
        drop(stack);
    }
    Ok(())
}

fn print_failover(signal: &str, run: &str, f: &Failover) {
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    println!(
        "{signal:<8} {run:>6} {:>9} {:>12} {:>10} {:>10} {:>10} {:>10} {:>13} {:>16} {:>8}",
        f.victim_sessions,
        f.taken.map_or("?".to_owned(), ms),
        ms(f.first),
        ms(f.median),
        ms(f.max),
        ms(f.others_max),
        ms(f.longest_call),
        ms(f.longest_attempt),
        f.exited.map_or("-".to_owned(), ms),
    );
    let list = |m: &BTreeMap<End, usize>| {
        if m.is_empty() { "none".to_owned() } else { m.iter().map(|(e, n)| format!("{} {n}", e.name())).collect::<Vec<_>>().join(", ") }
    };
    if f.failures.iter().any(|m| !m.is_empty()) {
        println!(
            "{:>16} failed attempts: the stopped instance's sessions: {}; the others: {}",
            "",
            list(&f.failures[0]),
            list(&f.failures[1])
        );
    }
}

/// The key id every failover request writes.
const FAILOVER_ID: &str = "100000000.0";

/// `PER_PARTITION` sessions in each partition, with their partitions.
fn failover_sessions(nc: &async_nats::Client) -> (Arc<Vec<SessionClient>>, Vec<u32>) {
    let mut per = vec![0usize; PARTITIONS as usize];
    let (mut out, mut parts) = (Vec::new(), Vec::new());
    let mut k = 0;
    while per.iter().any(|n| *n < PER_PARTITION) && k < 100_000 {
        let name = format!("f{k}");
        k += 1;
        let key = bstore_domain::SessionKey::parse("fo", &name).expect("a valid session key");
        let p = bstore_cluster::partition_of(&key, PARTITIONS) as usize;
        if per[p] < PER_PARTITION {
            per[p] += 1;
            out.push(SessionClient::new(nc.clone(), "bstore", "fo", &name).with_timeout(ATTEMPT_TIMEOUT));
            parts.push(p as u32);
        }
    }
    (Arc::new(out), parts)
}

/// One failover: a steady load, the signal to instance `victim`, the load
/// until every session is served again; then the instance is started again
/// and the partitions spread back.
async fn failover_once(
    stack: &mut Stack,
    sessions: &Arc<Vec<SessionClient>>,
    parts: &[u32],
    template: &Arc<Vec<u8>>,
    victim: usize,
    kill: bool,
) -> anyhow::Result<Failover> {
    let owners = stack.owners().await;
    let victim_id = instance_id(&stack.services[victim]).ok_or_else(|| anyhow::anyhow!("no instance id in the service's log"))?;
    let victims: Vec<bool> = parts.iter().map(|&p| owners[p as usize].as_deref() == Some(victim_id.as_str())).collect();
    let signal_at: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let load = tokio::spawn(load(sessions.clone(), template.clone(), signal_at.clone()));
    // A steady state first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let svc = &mut stack.services[victim];
    let (t0, t0_wall) = (Instant::now(), std::time::SystemTime::now());
    let _ = signal_at.set(t0);
    let exited = tokio::task::block_in_place(|| {
        if kill {
            svc.kill9();
            None
        } else {
            svc.terminate();
            Some(t0.elapsed())
        }
    });
    let attempts = load.await?;
    let taken = last_acquired(&stack.services[1 - victim], t0_wall);
    let f = analyse(&attempts, t0, &victims, exited, taken);
    let svc = &mut stack.services[victim];
    tokio::task::block_in_place(|| svc.start_again());
    stack.wait_balanced(Duration::from_secs(60)).await?;
    Ok(f)
}

/// One client, one request in flight, round the sessions: each turn sends
/// the session's pending request again (same rid) or a new keys.set. Runs
/// until `signal_at` is set and, after it, every session has been served
/// since its last failure and nothing has failed for a second (at most 30 s
/// after the signal).
async fn load(sessions: Arc<Vec<SessionClient>>, template: Arc<Vec<u8>>, signal_at: Arc<OnceLock<Instant>>) -> Vec<Attempt> {
    let n = sessions.len();
    let mut pending: Vec<Option<(String, Vec<u8>, Instant)>> = vec![None; n];
    let mut next_try = vec![Instant::now(); n];
    let mut last_fail: Option<Instant> = None;
    let mut served_since: Vec<bool> = vec![false; n];
    let mut attempts = Vec::new();
    let (mut turn, mut counter) = (0usize, 0u64);
    let hard_end = Instant::now() + Duration::from_secs(60);
    loop {
        let now = Instant::now();
        if now > hard_end {
            break;
        }
        if let Some(&t0) = signal_at.get() {
            let quiet = last_fail.is_none_or(|f| now.duration_since(f) >= Duration::from_secs(1));
            if (now >= t0 + Duration::from_millis(1500) && quiet && served_since.iter().all(|s| *s)) || now >= t0 + Duration::from_secs(30)
            {
                break;
            }
        }
        let Some(s) = (0..n).map(|k| (turn + k) % n).find(|&s| next_try[s] <= now) else {
            let wake = next_try.iter().min().copied().unwrap_or(now);
            tokio::time::sleep_until(wake.into()).await;
            continue;
        };
        turn = s + 1;
        let (rid, value, call_start) = pending[s].take().unwrap_or_else(|| {
            counter += 1;
            (rid(), stamped(&template, counter), now)
        });
        let sent = Instant::now();
        let r = sessions[s].keys_set(&rid, &key_data([("session", FAILOVER_ID, Some(&value[..]))])).await;
        let done = Instant::now();
        let end = End::of(&r);
        attempts.push(Attempt { session: s, sent, done, end, call_start });
        let after_signal = signal_at.get().is_some_and(|t0| sent >= *t0);
        if end == End::Ok {
            served_since[s] |= after_signal;
        } else if end.retryable() {
            pending[s] = Some((rid, value, call_start));
            next_try[s] = done + RETRY_PAUSE;
            if signal_at.get().is_some() {
                last_fail = Some(done);
                served_since[s] = false;
            }
        } else if let Err(e) = r {
            // Not retried: counted, and the next turn writes anew.
            eprintln!("failover client: {e}");
        }
    }
    attempts
}

/// Per session, served again is the first success sent after its last
/// failure and after the other instance had taken the partitions over (a
/// stopping instance answers some requests before it hands over).
fn analyse(attempts: &[Attempt], t0: Instant, victims: &[bool], exited: Option<Duration>, taken: Option<Duration>) -> Failover {
    let n = victims.len();
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.done >= t0).collect();
    let mut last_fail: Vec<Option<Instant>> = vec![None; n];
    let mut failures: [BTreeMap<End, usize>; 2] = Default::default();
    for a in after.iter().filter(|a| a.end != End::Ok) {
        last_fail[a.session] = Some(last_fail[a.session].map_or(a.done, |f| f.max(a.done)));
        *failures[usize::from(!victims[a.session])].entry(a.end).or_default() += 1;
    }
    let mut served: Vec<Option<Duration>> = vec![None; n];
    for a in after.iter().filter(|a| a.end == End::Ok) {
        let from = if victims[a.session] { t0 + taken.unwrap_or_default() } else { t0 };
        if a.sent >= last_fail[a.session].unwrap_or(t0).max(from) && served[a.session].is_none() {
            served[a.session] = Some(a.done - t0);
        }
    }
    // A session never served again counts as the whole window.
    let window = attempts.last().map_or(Duration::ZERO, |a| a.done.saturating_duration_since(t0));
    let times =
        |want: bool| -> Vec<f64> { (0..n).filter(|&s| victims[s] == want).map(|s| served[s].unwrap_or(window).as_secs_f64()).collect() };
    let (v, o) = (times(true), times(false));
    let secs = Duration::from_secs_f64;
    Failover {
        victim_sessions: v.len(),
        first: secs(v.iter().copied().fold(f64::INFINITY, f64::min).min(1e6)),
        median: secs(median(v.clone()).max(0.0)),
        max: secs(v.iter().copied().fold(0.0, f64::max)),
        others_max: secs(o.iter().copied().fold(0.0, f64::max)),
        longest_call: after.iter().filter(|a| a.end == End::Ok).map(|a| a.done - a.call_start).max().unwrap_or_default(),
        longest_attempt: after.iter().map(|a| a.done - a.sent).max().unwrap_or_default(),
        failures,
        exited,
        taken,
    }
}

/// The time after `since` of the last "partitions acquired" line in the
/// instance's (JSON) log.
fn last_acquired(svc: &ServiceProcess, since: std::time::SystemTime) -> Option<Duration> {
    svc.log_text()
        .lines()
        .filter(|l| l.contains("partitions acquired"))
        .filter_map(|l| {
            let rest = &l[l.find("\"timestamp\":\"")? + 13..];
            log_time(&rest[..rest.find('"')?])
        })
        .filter_map(|t| t.duration_since(since).ok())
        .max()
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (the log's timestamps, UTC) as a system time.
fn log_time(s: &str) -> Option<std::time::SystemTime> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = s.get(20..)?.trim_end_matches('Z');
    let nanos = format!("{frac:0<9}").get(..9)?.parse::<u64>().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date.
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_read_as_utc() {
        let t = log_time("1970-01-02T00:00:01.500000Z").unwrap();
        assert_eq!(t.duration_since(std::time::UNIX_EPOCH).unwrap(), Duration::from_millis(86_401_500));
        let t = log_time("2026-12-02T03:40:01.123456Z").unwrap();
        assert_eq!(t.duration_since(std::time::UNIX_EPOCH).unwrap().as_micros(), 1_796_182_801_123_456);
    }
}
