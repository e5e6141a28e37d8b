//! The operator's view: the HTTP endpoint (`/metrics` scraped and parsed as
//! Prometheus would, `/healthz`, `/readyz`), the dashboard and alert rules
//! shipped in `deploy/` checked against a real scrape, and `verify` on the
//! embedded default — a sound log passes, a tampered one fails naming its
//! sessions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bstore_api::client::{SessionClient, key_data};
use bstore_testkit::{ServiceProcess, TempDir};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::{Stack, rid, service_bin};

/// The endpoint's address, as the service wrote it into its data dir.
fn http_addr(data: &Path) -> SocketAddr {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(data.join(baileys_store::http::ADDR_FILE)) {
            return text.trim().parse().expect("an ip:port in http.addr");
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no http.addr in {}", data.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connecting to the metrics endpoint");
    stream.write_all(format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await.expect("an answer in time").unwrap();
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|n| n.trim().parse().ok()).expect("a Content-Length");
    assert_eq!(length, body.len(), "the body is as long as announced");
    (status, body.to_owned())
}

/// A scrape, parsed: every sample with its labels, and the declared
/// metric families.
struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    families: BTreeSet<String>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        assert!(text.ends_with("# EOF\n"), "an OpenMetrics exposition ends with # EOF:\n{text}");
        let (mut samples, mut families) = (Vec::new(), BTreeSet::new());
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                // A family with no sample yet still names what its samples
                // will be called.
                let (name, kind) = rest.split_once(' ').unwrap();
                let suffixes: &[&str] = match kind {
                    "counter" => &["", "_total"],
                    "histogram" => &["", "_bucket", "_sum", "_count"],
                    "info" => &["", "_info"],
                    _ => &[""],
                };
                families.extend(suffixes.iter().map(|s| format!("{name}{s}")));
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {line}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("a number in {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("labels closed in {line}"));
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("a label in {line}"));
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Self { samples, families }
    }

    /// The sum of the samples of `name` whose labels include `labels`, or
    /// `None` if there is none.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in the scrape"))
    }

    /// Every name a query may use: sample names and family names.
    fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|(n, _, _)| n.clone()).chain(self.families.iter().cloned()).collect()
    }
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    Scrape::parse(&body)
}

/// `/readyz` until it says 200 (the service writes its readiness just after
/// it logs that it serves).
async fn ready(addr: SocketAddr) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (status, body) = http(addr, "GET", "/readyz").await;
        if status == 200 {
            return serde_json::from_str(&body).expect("a JSON body");
        }
        assert_eq!(status, 503, "{body}");
        assert!(start.elapsed() < Duration::from_secs(30), "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_metrics_endpoint_counts_requests_by_op_tenant_and_code_and_says_when_it_is_ready() {
    let stack = Stack::start().await;
    let addr = http_addr(&stack.dir.path().join("data"));
    let checks = ready(addr).await;
    assert_eq!(checks["jetstream"], true, "{checks}");
    assert_eq!(checks["taking_requests"], true, "{checks}");
    assert!(checks["partitions_owned"].as_u64().unwrap() > 0, "the only instance owns partitions: {checks}");
    assert_eq!(http(addr, "GET", "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(http(addr, "GET", "/nothing").await.0, 404);
    assert_eq!(http(addr, "POST", "/metrics").await.0, 405);

    let s = stack.session("acme", "bot-1");
    s.creds_put(&rid(), b"creds").await.unwrap();
    s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"k"[..]))])).await.unwrap();
    assert_eq!(s.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"k");
    s.creds_get().await.unwrap();
    // Failing requests: a body that does not decode (400, before anyone
    // knows the tenant), and a session whose only event does not open (520,
    // counted under its tenant).
    let bad = s.raw("keys.get", vec![0xc1]).await.unwrap_err();
    assert_eq!(bad.code(), Some(400), "{bad:?}");
    let js = jetstream::new(stack.nc.clone());
    js.publish("bstore-events.acme.broken", "not a sealed event".into()).await.unwrap().await.unwrap();
    let unreadable = stack.session("acme", "broken").info().await.unwrap_err();
    assert_eq!(unreadable.code(), Some(520), "{unreadable:?}");
    stack.session("bravo", "bot-9").info().await.unwrap();

    let m = scrape(addr).await;
    let acme = ("tenant", "acme");
    assert_eq!(m.value("bstore_requests_total", &[("op", "creds.put"), acme]), 1.0);
    assert_eq!(m.value("bstore_requests_total", &[("op", "keys.set"), acme]), 1.0);
    assert_eq!(m.value("bstore_requests_total", &[("op", "session.info"), acme]), 1.0, "the failed one");
    assert_eq!(m.value("bstore_requests_total", &[("op", "session.info"), ("tenant", "bravo")]), 1.0);
    assert_eq!(m.value("bstore_request_duration_seconds_count", &[("op", "session.info")]), 2.0);
    assert_eq!(m.value("bstore_request_duration_seconds_bucket", &[("op", "keys.get"), ("le", "+Inf")]), 1.0);
    assert!(m.value("bstore_request_duration_seconds_sum", &[("op", "keys.get")]) > 0.0);
    assert_eq!(m.get("bstore_request_duration_seconds_count", &[acme]), None, "latency is per op, not per tenant");
    assert_eq!(m.value("bstore_request_errors_total", &[("op", "session.info"), ("code", "520"), acme]), 1.0);
    assert_eq!(m.value("bstore_request_errors_total", &[("code", "400"), ("tenant", "(none)")]), 1.0);
    assert_eq!(m.get("bstore_request_errors_total", &[("op", "creds.put")]), None, "no creds.put failed");
    assert_eq!(m.get("bstore_request_errors_total", &[("tenant", "bravo")]), None, "no request of bravo failed");
    // Two sessions were loaded, from the log (no Redis here; acme/broken
    // failed to load), and two writes appended; three sessions have an actor.
    assert_eq!(m.value("bstore_jetstream_append_duration_seconds_count", &[]), 2.0);
    assert_eq!(m.value("bstore_jetstream_append_duration_seconds_bucket", &[("le", "+Inf")]), 2.0);
    assert_eq!(m.value("bstore_session_loads_total", &[("source", "log")]), 2.0);
    assert_eq!(m.value("bstore_active_sessions", &[]), 3.0);
    let partitions = m.value("bstore_partitions", &[]);
    assert!(partitions > 0.0);
    assert_eq!(m.value("bstore_partitions_owned", &[]), partitions, "the only instance owns every partition");
    assert_eq!(m.value("bstore_ready", &[]), 1.0);
    assert_eq!(m.value("bstore_log_refused_events_total", &[]), 0.0);
    assert_eq!(m.value("bstore_redis_projection_behind_total", &[]), 0.0);
    assert!(m.families.contains("bstore_mongo_lag_events"), "declared, with no sample: no materializer runs here");
    assert_eq!(m.get("bstore_mongo_lag_events", &[]), None);

    // $SRV.STATS stays, with no tenant in it.
    let stats = stack.nc.request("$SRV.STATS.baileys-store", "".into()).await.unwrap();
    let stats = String::from_utf8_lossy(&stats.payload).into_owned();
    assert!(stats.contains("\"keys.get\"") && !stats.contains("acme"), "{stats}");

    // A stopping instance is no longer ready.
    let mut service = stack.service;
    let stopping = std::thread::spawn(move || service.terminate());
    let start = Instant::now();
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => break,
            Ok(_) if start.elapsed() > Duration::from_secs(20) => panic!("the endpoint outlived the service"),
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(stopping.join().unwrap().is_some_and(|s| s.success()));
    assert!(!stack.dir.path().join("data").join(baileys_store::http::ADDR_FILE).exists(), "http.addr is removed at the stop");
}

/// Every `bstore_…` name in the Grafana dashboard and the alert rules in
/// `deploy/` is one the service exposes.
#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_name_is_in_a_scrape_of_the_service() {
    let stack = Stack::start().await;
    let addr = http_addr(&stack.dir.path().join("data"));
    ready(addr).await;
    // Families with labels show samples once they have one.
    let s = stack.session("acme", "bot-1");
    s.creds_put(&rid(), b"creds").await.unwrap();
    let _ = s.raw("keys.get", vec![0xc1]).await;
    let exposed = scrape(addr).await.names();

    let deploy = bstore_testkit::repo_root().join("deploy");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(deploy.join("grafana/baileys-store.json")).unwrap())
        .expect("the dashboard is valid JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has its panels' queries: {exprs:?}");
    let alerts = std::fs::read_to_string(deploy.join("prometheus/alerts.yml")).unwrap();
    let scrape_config = std::fs::read_to_string(deploy.join("prometheus/prometheus.yml")).unwrap();
    assert!(scrape_config.contains("alerts.yml") && scrape_config.contains(":9478"), "{scrape_config}");
    let mut used = BTreeSet::new();
    for text in exprs.iter().map(String::as_str).chain([alerts.as_str()]) {
        used.extend(metric_names(text));
    }
    assert!(used.len() >= 10, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "named in deploy/ but not exposed: {missing:?}\nexposed: {exposed:?}");
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}

/// The `bstore_…` identifiers in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("bstore_") {
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn an_address_already_taken_stops_the_start_with_a_clear_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("http-taken");
    let mut cmd = std::process::Command::new(service_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("BSTORE") {
            cmd.env_remove(k);
        }
    }
    // The endpoint is bound before NATS is reached: no server is needed to
    // see the refusal.
    let out = cmd
        .arg("serve")
        .env("BSTORE_NATS_URL", "nats://127.0.0.1:1")
        .env("BSTORE_KEYS", crate::harness::KEY1)
        .env("BSTORE_DATA_DIR", dir.path())
        .env("BSTORE__HTTP__LISTEN", &addr)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr} for the metrics and health endpoint")), "{err}");
    assert!(err.contains("set http.listen"), "the message says what to change: {err}");
}

/// The embedded default, and a connection to its JetStream as the service
/// user (what someone who can write the stream could do).
struct Embedded {
    _service: ServiceProcess,
    data: std::path::PathBuf,
    dir: TempDir,
}

impl Embedded {
    fn start() -> Self {
        let dir = TempDir::new("verify-embedded");
        let data = dir.path().join("data");
        let bin = bstore_testkit::find_bin("NATS_SERVER_BIN", ".tools/nats/bin/nats-server", "nats-server");
        let env = [
            ("BSTORE_DATA_DIR", data.to_str().unwrap()),
            ("BSTORE__EMBEDDED__PORT", "-1"),
            ("BSTORE_NATS_SERVER_BIN", bin.to_str().unwrap()),
        ];
        let service = ServiceProcess::start(service_bin(), &env, &dir.path().join("logs"));
        Self { _service: service, data, dir }
    }

    async fn connect(&self, url_file: &str, user: &str, password: &str) -> async_nats::Client {
        let url = std::fs::read_to_string(self.data.join(url_file)).unwrap();
        let host = url.trim().rsplit('@').next().unwrap().trim_start_matches("nats://").to_owned();
        async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
            .connect(format!("nats://{host}"))
            .await
            .expect("the embedded server takes its own credentials")
    }

    async fn bot(&self, tenant: &str, session: &str) -> SessionClient {
        let url = std::fs::read_to_string(self.data.join("bot.url")).unwrap();
        let userinfo = url.trim().trim_start_matches("nats://").split('@').next().unwrap().to_owned();
        let (user, password) = userinfo.split_once(':').unwrap();
        SessionClient::new(self.connect("bot.url", user, password).await, "bstore", tenant, session)
    }

    async fn jetstream(&self) -> jetstream::Context {
        let creds = baileys_store::embedded::service_credentials(&baileys_store::embedded::dir(&self.data)).unwrap();
        jetstream::new(self.connect(baileys_store::embedded::URL_FILE, &creds.user, &creds.password).await)
    }

    /// `verify` with `args`: (success, stdout, stderr).
    fn verify(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = std::process::Command::new(service_bin());
        for (k, _) in std::env::vars() {
            if k.starts_with("BSTORE") {
                cmd.env_remove(k);
            }
        }
        let out = cmd.arg("verify").args(args).env("BSTORE_DATA_DIR", &self.data).env("BSTORE_LOG", "off").output().unwrap();
        let _ = &self.dir;
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn verify_json(&self, args: &[&str]) -> (bool, serde_json::Value) {
        let (ok, out, err) = self.verify(&[&["--json"], args].concat());
        let report = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("one JSON object ({e}):\n{out}\n{err}"));
        (ok, report)
    }
}

fn session<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session"] == name)
        .unwrap_or_else(|| panic!("{name} not reported: {report:#}"))
}

#[tokio::test]
async fn verify_on_the_embedded_default_passes_a_sound_log_and_fails_naming_the_sessions_a_copy_or_an_unreadable_event_broke() {
    let e = Embedded::start();
    let a = e.bot("t", "a").await;
    let first = a.creds_put(&rid(), b"creds v1").await.unwrap();
    a.creds_put(&rid(), b"creds v2").await.unwrap();
    let b = e.bot("t", "b").await;
    let b_seq = b.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"k"[..]))])).await.unwrap();

    let (ok, report) = e.verify_json(&[]);
    assert!(ok, "a sound log passes: {report:#}");
    assert_eq!((report["ok"].as_bool(), report["checked"].as_u64()), (Some(true), Some(2)), "{report:#}");
    assert_eq!(report["against"], serde_json::json!(["the log alone"]));
    assert_eq!((session(&report, "t/a")["events"].as_u64(), session(&report, "t/a")["ok"].as_bool()), (Some(2), Some(true)));
    assert_eq!(session(&report, "t/b")["events"], 1);
    let (ok, out, err) = e.verify(&[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("OK t/a: 2 events") && out.contains("OK t/b: 1 events"), "{out}");
    assert!(out.contains("verified 2 sessions against the log alone: 0 differences"), "{out}");

    // A copy of a's first event published again at the end of its subject.
    let js = e.jetstream().await;
    let stored = js.get_stream("BSTORE_EVENTS").await.unwrap().get_raw_message(first).await.unwrap();
    let copy = js.publish(stored.subject.to_string(), stored.payload).await.unwrap().await.unwrap().sequence;
    let (ok, report) = e.verify_json(&[]);
    assert!(!ok, "a refused copy fails verify: {report:#}");
    assert_eq!(report["failing"], serde_json::json!(["t/a"]), "{report:#}");
    assert_eq!(session(&report, "t/a")["refused"], serde_json::json!([copy]), "{report:#}");
    assert_eq!(session(&report, "t/b")["ok"], true, "{report:#}");
    let (ok, out, err) = e.verify(&[]);
    assert!(!ok);
    assert!(
        out.contains(&format!(
            "DIFF log t/a: 1 events refused as not where they were written (copies; `history` marks them): sequence {copy}"
        )),
        "{out}"
    );
    assert!(out.contains("FAIL t/a") && out.contains("OK t/b"), "{out}");
    assert!(err.contains("failing sessions: t/a"), "the exit names the failing sessions: {err}");

    // An event that does not open: b's event moved onto another session's
    // subject (sealed for b, it opens nowhere else).
    let stored = js.get_stream("BSTORE_EVENTS").await.unwrap().get_raw_message(b_seq).await.unwrap();
    js.publish("bstore-events.t.c", stored.payload).await.unwrap().await.unwrap();
    let (ok, report) = e.verify_json(&[]);
    assert!(!ok, "{report:#}");
    assert_eq!(report["failing"], serde_json::json!(["t/a", "t/c"]), "{report:#}");
    assert_eq!(session(&report, "t/c")["log_replays"], false, "{report:#}");
    let (ok, out, err) = e.verify(&[]);
    assert!(!ok && out.contains("DIFF log t/c: cannot be replayed") && err.contains("failing sessions: t/a, t/c"), "{out}{err}");

    // One session alone: b's log is still sound.
    let (ok, report) = e.verify_json(&["--tenant", "t", "--session", "b"]);
    assert!(ok, "{report:#}");
    assert_eq!(report["checked"], 1);
}

/// Scrapes until `check` passes on a scrape (at most 20 s); returns that
/// scrape.
async fn scrape_until(addr: SocketAddr, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let start = Instant::now();
    loop {
        let m = scrape(addr).await;
        if check(&m) {
            return m;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{what}: never seen in\n{:?}", m.samples);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With both projections on: the Mongo materializer's sequence and lag, a
/// Redis copy falling behind while Redis is down and repaired once it is
/// back, and after a restart a session loaded from its Redis copy.
#[tokio::test]
async fn the_projections_figures_follow_redis_going_down_and_the_materializer_catching_up() {
    let mut redis = bstore_testkit::RedisServer::start();
    let mongo = bstore_testkit::MongoServer::start();
    let (redis_url, mongo_url) = (redis.url(), mongo.url());
    let env = [
        ("BSTORE_REDIS_URL", redis_url.as_str()),
        ("BSTORE_MONGO_URL", mongo_url.as_str()),
        ("BSTORE__REDIS__TIMEOUT", "0.5"),
        ("BSTORE__REDIS__CATCH_UP_INTERVAL", "0.3"),
        ("BSTORE__MONGO__BATCH_WAIT", "0.05"),
    ];
    let mut stack = Stack::start_with(&env).await;
    let data = stack.dir.path().join("data");
    let addr = http_addr(&data);
    let s = stack.session("acme", "projected").with_timeout(Duration::from_secs(10));
    let last = s.creds_put(&rid(), b"creds v1").await.unwrap();
    let m = scrape_until(addr, "the materializer applied the write", |m| {
        m.get("bstore_mongo_applied_seq", &[]).is_some_and(|v| v >= last as f64) && m.get("bstore_mongo_lag_events", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(m.value("bstore_mongo_quarantined_events_total", &[]), 0.0);
    let m = scrape_until(addr, "the Redis copy is current", |m| {
        m.value("bstore_redis_projection_behind_total", &[]) <= m.value("bstore_redis_projection_repaired_total", &[])
    })
    .await;
    let (behind, repaired) = (m.value("bstore_redis_projection_behind_total", &[]), m.value("bstore_redis_projection_repaired_total", &[]));

    // Redis down: the next write's projection fails, the copy is behind.
    redis.stop();
    s.creds_put(&rid(), b"creds v2").await.unwrap();
    scrape_until(addr, "the projection counted behind", |m| m.value("bstore_redis_projection_behind_total", &[]) > behind).await;
    // Redis back (empty): the catch-up snapshot repairs the copy.
    redis.start_again();
    let last = s.creds_put(&rid(), b"creds v3").await.unwrap();
    scrape_until(addr, "the copy repaired", |m| m.value("bstore_redis_projection_repaired_total", &[]) > repaired).await;
    let redis_copy = bstore_redis::RedisProjection::new(
        bstore_redis::RedisConfig { url: Some(redis_url.clone()), ..Default::default() },
        bstore_codec::Codec::new(bstore_codec::Keyring::new(vec![(1, [1u8; 32])], None).unwrap()),
    )
    .unwrap();
    let key = bstore_domain::SessionKey::parse("acme", "projected").unwrap();
    let start = Instant::now();
    while redis_copy.stored_seq(&key).await.unwrap() != Some(last) {
        assert!(start.elapsed() < Duration::from_secs(20), "the Redis copy never reached {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A new process loads the session from its Redis copy.
    stack.service.restart();
    let addr = http_addr(&data);
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"creds v3"[..]));
    let m = scrape(addr).await;
    assert_eq!(m.value("bstore_session_loads_total", &[("source", "redis")]), 1.0, "{:?}", m.samples);
    assert_eq!(m.get("bstore_session_loads_total", &[("source", "log")]), None);
}

/// `/readyz` follows NATS: 503 (with the failing check named) while the
/// server is down, 200 again once the service has reconnected; `/healthz`
/// stays 200 throughout.
#[tokio::test]
async fn readyz_is_503_while_nats_is_down_and_200_again_once_reconnected() {
    let mut stack = Stack::start().await;
    let addr = http_addr(&stack.dir.path().join("data"));
    ready(addr).await;
    stack.nats.stop();
    let start = Instant::now();
    let checks = loop {
        let (status, body) = http(addr, "GET", "/readyz").await;
        if status == 503 {
            break serde_json::from_str::<serde_json::Value>(&body).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "still ready with NATS down: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(checks["ready"], false, "{checks}");
    assert_eq!(checks["nats_store_connection"], false, "{checks}");
    assert_eq!(http(addr, "GET", "/healthz").await.0, 200, "the process is alive all the same");
    assert_eq!(scrape(addr).await.value("bstore_ready", &[]), 0.0);
    stack.nats.start_again();
    let checks = ready(addr).await;
    assert_eq!(checks["jetstream"], true, "{checks}");
}
