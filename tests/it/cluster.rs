//! The cluster checker: a 3-node NATS cluster with the event stream at R3,
//! service instances sharing the sessions, and clients that know what they
//! wrote. Under load, instances and a NATS node die and a new instance joins;
//! every read must return the last acknowledged value and every
//! acknowledged write must be in the log, in order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bstore_api::client::{ClientError, SessionClient, key_data};
use bstore_testkit::{NatsCluster, ServiceProcess, TempDir};

use crate::harness::{connect_ordered, fast_leases, history, retryable, rid, start_service_at, with_retries};

const TENANT: &str = "ck";
/// Concurrent clients; each owns its own sessions, so it knows their values.
const CLIENTS: usize = 4;
const SESSIONS_PER_CLIENT: usize = 10;
/// How long a request is retried with the same `rid`, as the Node client does.
const BUDGET: Duration = Duration::from_secs(30);
/// One attempt's time-out.
const ATTEMPT: Duration = Duration::from_secs(3);
/// Pause between one session's read and the next session's write.
const PAUSE: Duration = Duration::from_millis(8);

/// One session as its client knows it.
#[derive(Default)]
struct Tracked {
    name: String,
    /// Acknowledged writes in the order they were acknowledged: seq, rid, value.
    acked: Vec<(u64, String, String)>,
    /// A write whose outcome stayed unknown (retries ran out): its value may
    /// or may not be the session's. The session takes no more writes.
    pending: Option<(String, String)>,
    /// Every rid sent, acknowledged or not.
    rids: HashSet<String>,
}

impl Tracked {
    fn last(&self) -> Option<&(u64, String, String)> {
        self.acked.last()
    }
}

/// What one client saw.
#[derive(Default)]
struct Report {
    sessions: Vec<Tracked>,
    violations: Vec<String>,
    /// Requests that still failed when their retries ran out.
    gave_up: Vec<String>,
    /// Successful requests: session, when the reply came.
    served: Vec<(String, Instant)>,
    writes: u64,
    reads: u64,
}

fn retry_write(e: &ClientError) -> bool {
    retryable(e) || e.code() == Some(409)
}

/// `keys.get` of the one key `k`, with the reply's `seq`.
async fn read(s: &SessionClient) -> Result<(Option<String>, u64), ClientError> {
    let (values, seq) = s.keys_get_with_seq("session", &["k"]).await?;
    Ok((values.get("k").map(|v| String::from_utf8_lossy(v).into_owned()), seq))
}

/// Writes `k` = a fresh value and reads it back, session after session,
/// until `stop`; checks every read against what this client knows.
async fn run_client(c: usize, nc: async_nats::Client, stop: Arc<AtomicBool>, t0: Instant) -> Report {
    let mut report = Report::default();
    let clients: Vec<SessionClient> = (0..SESSIONS_PER_CLIENT)
        .map(|j| SessionClient::new(nc.clone(), "bstore", TENANT, &format!("c{c}-s{j}")).with_timeout(ATTEMPT))
        .collect();
    report.sessions = (0..SESSIONS_PER_CLIENT).map(|j| Tracked { name: format!("c{c}-s{j}"), ..Default::default() }).collect();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for (s, t) in clients.iter().zip(report.sessions.iter_mut()) {
            let at = || format!("{:.1} s", t0.elapsed().as_secs_f64());
            if t.pending.is_none() {
                n += 1;
                let (r, value) = (rid(), format!("{}-n{n}", t.name));
                t.rids.insert(r.clone());
                let data = key_data([("session", "k", Some(value.as_bytes()))]);
                report.writes += 1;
                match with_retries(BUDGET, retry_write, || s.keys_set(&r, &data)).await {
                    Ok(seq) => {
                        if let Some((prev, prev_rid, _)) = t.last()
                            && seq <= *prev
                        {
                            report.violations.push(format!(
                                "{} at {}: write {r} acknowledged with seq {seq}, not after the previous acknowledged write {prev_rid} (seq {prev})",
                                t.name,
                                at()
                            ));
                        }
                        t.acked.push((seq, r, value));
                        report.served.push((t.name.clone(), Instant::now()));
                    }
                    Err(e) if retry_write(&e) => {
                        report.gave_up.push(format!("{} at {}: write {r} still failing after {BUDGET:?}: {e}", t.name, at()));
                        t.pending = Some((r, value));
                    }
                    Err(e) => {
                        // A refusal: nothing was applied, but nothing here is
                        // refusable either.
                        report.violations.push(format!("{} at {}: write {r} refused: {e}", t.name, at()));
                    }
                }
            }
            report.reads += 1;
            match with_retries(BUDGET, retryable, || read(s)).await {
                Ok((got, seq)) => {
                    report.served.push((t.name.clone(), Instant::now()));
                    let want = t.last().map(|(_, _, v)| v.clone());
                    let want_seq = t.last().map_or(0, |(s, _, _)| *s);
                    let pending = t.pending.as_ref().map(|(_, v)| v.clone());
                    let ok_value = got == want || (got.is_some() && got == pending);
                    if !ok_value || (got == want && seq < want_seq) {
                        let kind = match &got {
                            _ if ok_value => "stale seq".to_string(),
                            None => "hidden (nothing)".to_string(),
                            Some(v) => match t.acked.iter().position(|(_, _, a)| a == v) {
                                Some(p) => format!("stale ({} acknowledged writes behind)", t.acked.len() - 1 - p),
                                None => "a value never acknowledged".to_string(),
                            },
                        };
                        report.violations.push(format!(
                            "{} at {}: read {kind}: got {got:?} at seq {seq}, last acknowledged {want:?} at seq {want_seq}{}",
                            t.name,
                            at(),
                            pending.map(|p| format!(" (or pending {p})")).unwrap_or_default()
                        ));
                    }
                }
                Err(e) => report.gave_up.push(format!("{} at {}: read still failing after {BUDGET:?}: {e}", t.name, at())),
            }
            tokio::time::sleep(PAUSE).await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    report
}

/// Sessions an instance loaded, from its log (`session loaded` lines).
fn sessions_served_by(service: &ServiceProcess) -> HashSet<String> {
    let prefix = format!("session={TENANT}/");
    service
        .log_text()
        .lines()
        .filter(|l| l.contains("session loaded"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(prefix.as_str())).map(|s| s.trim_matches('"').to_owned()))
        .collect()
}

/// From `from` to the first reply on each of `sessions` after it: the first
/// and the slowest, and the sessions never served again.
fn failover(served: &[(String, Instant)], sessions: &HashSet<String>, from: Instant) -> (Option<Duration>, Option<Duration>, Vec<String>) {
    let mut first: HashMap<&str, Instant> = HashMap::new();
    for (s, at) in served {
        if *at > from && sessions.contains(s) {
            let e = first.entry(s.as_str()).or_insert(*at);
            *e = (*e).min(*at);
        }
    }
    let times: Vec<Duration> = first.values().map(|at| *at - from).collect();
    let never = sessions.iter().filter(|s| !first.contains_key(s.as_str())).cloned().collect();
    (times.iter().min().copied(), times.iter().max().copied(), never)
}

/// Compares one session's acknowledged writes with its history in the log.
fn check_log(t: &Tracked, log: &[serde_json::Value], violations: &mut Vec<String>) {
    let events: Vec<(u64, String)> =
        log.iter().map(|e| (e["seq"].as_u64().unwrap_or(0), e["rid"].as_str().unwrap_or_default().to_owned())).collect();
    let by_seq: HashMap<u64, &str> = events.iter().map(|(s, r)| (*s, r.as_str())).collect();
    let mut seen = HashSet::new();
    for (seq, r) in &events {
        if !seen.insert(r.as_str()) {
            violations.push(format!("{}: rid {r} applied twice (again at seq {seq})", t.name));
        }
        if !t.rids.contains(r) {
            violations.push(format!("{}: event at seq {seq} with a rid never sent: {r:?}", t.name));
        }
    }
    for (seq, r, _) in &t.acked {
        match by_seq.get(seq) {
            Some(logged) if logged == r => {}
            Some(logged) => violations.push(format!("{}: acknowledged write {r} at seq {seq}, but the log has {logged} there", t.name)),
            None => {
                let elsewhere = events.iter().find(|(_, lr)| lr == r).map(|(s, _)| *s);
                violations.push(format!(
                    "{}: acknowledged write {r} (seq {seq}) lost: not in the log at that seq (found at {elsewhere:?})",
                    t.name
                ))
            }
        }
    }
    // The log's last event is the last acknowledged write, or the unknown one.
    if let (Some((lseq, lrid)), Some((aseq, arid, _))) = (events.last(), t.last()) {
        let pending = t.pending.as_ref().map(|(r, _)| r.as_str());
        if lrid != arid && Some(lrid.as_str()) != pending {
            violations
                .push(format!("{}: the log ends with {lrid} at seq {lseq}, after the last acknowledged write {arid} (seq {aseq})", t.name));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_checker_finds_no_stale_read_and_no_lost_write_through_failures() {
    let started = Instant::now();
    let mut nats = NatsCluster::start();
    let urls = nats.urls();
    let all_urls = urls.join(",");
    let dir = TempDir::new("cluster");
    let env: Vec<(&str, &str)> = [
        &[("BSTORE__STREAM__REPLICAS", "3"), ("BSTORE__CLUSTER__PARTITIONS", "16"), ("BSTORE__SESSIONS__REQUEST_TIMEOUT_SECS", "10")][..],
        &fast_leases()[..],
    ]
    .concat();
    let mut services: Vec<ServiceProcess> = (0..3).map(|i| start_service_at(&all_urls, &dir, &format!("i{i}"), &env)).collect();
    eprintln!("cluster and 3 instances up in {:.1} s", started.elapsed().as_secs_f64());

    // Clients on different nodes: client c's home node is c % 3.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let home = c % urls.len();
        let order: Vec<String> = urls[home..].iter().chain(&urls[..home]).cloned().collect();
        let nc = connect_ordered(&order).await;
        tasks.push(tokio::spawn(run_client(c, nc, stop.clone(), t0)));
    }

    let pause = Duration::from_secs(5);
    tokio::time::sleep(pause).await;
    let served_by_killed = sessions_served_by(&services[0]);
    let killed_at = Instant::now();
    services[0].kill9();
    eprintln!("{:.1} s: SIGKILL of instance 0", t0.elapsed().as_secs_f64());
    tokio::time::sleep(pause).await;
    let served_by_stopped = sessions_served_by(&services[1]);
    let stopped_at = Instant::now();
    services[1].terminate();
    eprintln!("{:.1} s: SIGTERM of instance 1 done", t0.elapsed().as_secs_f64());
    tokio::time::sleep(pause).await;
    let node_killed_at = Instant::now();
    nats.kill(2);
    eprintln!("{:.1} s: SIGKILL of NATS node 2", t0.elapsed().as_secs_f64());
    tokio::time::sleep(pause).await;
    // The new instance joins once the NATS cluster has elected new leaders
    // (elections after a node's death take seconds); the load went on meanwhile.
    nats.wait_ready();
    let live_urls = urls[..2].join(",");
    let js = async_nats::jetstream::new(connect_ordered(&urls[..2]).await);
    let elected = with_retries(
        Duration::from_secs(30),
        |_| true,
        || async {
            let stream = js.get_stream("BSTORE_EVENTS").await.map_err(|e| ClientError::Other(e.to_string()))?;
            match stream.cached_info().cluster.as_ref().and_then(|c| c.leader.clone()) {
                Some(leader) if leader != nats.name(2) => Ok(leader),
                other => Err(ClientError::Other(format!("stream leader {other:?}"))),
            }
        },
    )
    .await;
    eprintln!("{:.1} s: event stream leader {elected:?}", t0.elapsed().as_secs_f64());
    services.push(start_service_at(&live_urls, &dir, "i3", &env));
    eprintln!("{:.1} s: instance 3 joined", t0.elapsed().as_secs_f64());
    tokio::time::sleep(pause).await;
    stop.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await.unwrap());
    }
    eprintln!("{:.1} s: load stopped", t0.elapsed().as_secs_f64());

    // Every acknowledged write is in the log, in order.
    let mut log_violations = Vec::new();
    let tracked: Vec<&Tracked> = reports.iter().flat_map(|r| &r.sessions).collect();
    std::thread::scope(|scope| {
        let chunks: Vec<_> = tracked
            .chunks(tracked.len().div_ceil(4))
            .map(|chunk| {
                let live_urls = &live_urls;
                scope.spawn(move || {
                    let mut v = Vec::new();
                    for t in chunk {
                        check_log(t, &history(live_urls, TENANT, &t.name), &mut v);
                    }
                    v
                })
            })
            .collect();
        for c in chunks {
            log_violations.extend(c.join().unwrap());
        }
    });

    let served: Vec<(String, Instant)> = reports.iter().flat_map(|r| r.served.iter().cloned()).collect();
    let all: HashSet<String> = tracked.iter().map(|t| t.name.clone()).collect();
    for (what, at, sessions) in [
        ("SIGKILL of instance 0", killed_at, &served_by_killed),
        ("SIGTERM of instance 1", stopped_at, &served_by_stopped),
        ("SIGKILL of NATS node 2", node_killed_at, &all),
    ] {
        let (first, slowest, never) = failover(&served, sessions, at);
        eprintln!(
            "failover after {what}: first reply on one of its {} sessions after {first:?}, every one served again within {slowest:?}{}",
            sessions.len(),
            if never.is_empty() { String::new() } else { format!(", never again: {never:?}") }
        );
        assert!(slowest.is_none_or(|d| d < Duration::from_secs(30)), "sessions waited {slowest:?} after the {what}");
    }

    let violations: Vec<&String> = reports.iter().flat_map(|r| &r.violations).chain(&log_violations).collect();
    let gave_up: Vec<&String> = reports.iter().flat_map(|r| &r.gave_up).collect();
    let (writes, reads): (u64, u64) = (reports.iter().map(|r| r.writes).sum(), reports.iter().map(|r| r.reads).sum());
    let acked: usize = tracked.iter().map(|t| t.acked.len()).sum();
    let stale = violations.iter().filter(|v| v.contains(": read ")).count();
    let lost = violations.iter().filter(|v| v.contains("lost") || v.contains("log has") || v.contains("log ends")).count();
    eprintln!(
        "{writes} writes ({acked} acknowledged), {reads} reads over {} sessions; {stale} stale or hidden reads, {lost} lost or misplaced \
         writes, {} other violations, {} requests given up; whole test {:.1} s",
        tracked.len(),
        violations.len() - stale - lost,
        gave_up.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(acked > 500, "too little load to prove anything: {acked} acknowledged writes");
    assert!(
        violations.is_empty(),
        "{} violations ({stale} stale or hidden reads, {lost} lost or misplaced acknowledged writes); the first 25:\n{}",
        violations.len(),
        violations.iter().take(25).map(|v| v.as_str()).collect::<Vec<_>>().join("\n")
    );
    assert!(gave_up.is_empty(), "{} requests failed for longer than {BUDGET:?}: {gave_up:?}", gave_up.len());
    drop(services);
    drop(nats);
}

/// The test cluster itself: a killed node comes back on its ports with its
/// store, and a stream at R3 is whole again.
#[tokio::test]
async fn a_killed_cluster_node_comes_back_with_its_store() {
    let mut nats = NatsCluster::start();
    let nc = connect_ordered(&nats.urls()).await;
    let js = async_nats::jetstream::new(nc);
    let cfg =
        async_nats::jetstream::stream::Config { name: "R3".into(), subjects: vec!["r3.>".into()], num_replicas: 3, ..Default::default() };
    let created = with_retries(
        Duration::from_secs(20),
        |_| true,
        || async { js.get_or_create_stream(cfg.clone()).await.map(|_| ()).map_err(|e| ClientError::Other(e.to_string())) },
    )
    .await;
    created.unwrap();
    // A new stream, or one that lost its leader, takes a moment to elect
    // one: each message is retried under its own id until a leader takes it.
    let publish = |payload: &'static str, id: &'static str| {
        let js = js.clone();
        async move {
            with_retries(
                Duration::from_secs(20),
                |_| true,
                || async {
                    let msg = async_nats::jetstream::message::PublishMessage::build().payload(payload.into()).message_id(id);
                    let ack = js.send_publish("r3.a", msg).await.map_err(|e| ClientError::Other(e.to_string()))?;
                    ack.await.map_err(|e| ClientError::Other(e.to_string()))
                },
            )
            .await
        }
    };
    publish("before", "m1").await.unwrap();
    nats.kill(1);
    publish("while one node is down", "m2").await.unwrap();
    nats.start_again(1);
    let whole = with_retries(
        Duration::from_secs(20),
        |_| true,
        || async {
            let stream = js.get_stream("R3").await.map_err(|e| ClientError::Other(e.to_string()))?;
            let info = stream.cached_info();
            let cluster = info.cluster.clone().unwrap_or_default();
            let current = cluster.replicas.iter().filter(|r| r.current).count();
            if info.state.messages == 2 && cluster.leader.is_some() && current == 2 {
                Ok(())
            } else {
                Err(ClientError::Other(format!(
                    "{} messages, leader {:?}, {current} current replicas",
                    info.state.messages, cluster.leader
                )))
            }
        },
    )
    .await;
    whole.unwrap();
}
