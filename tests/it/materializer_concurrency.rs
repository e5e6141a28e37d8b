//! Two `baileys-store materialize` processes on the same durable consumer:
//! each fetches its own small batches, so events of one session are applied
//! by both, concurrently and out of order. Over many sessions with key
//! writes, key deletions, growing values (patches), creds and session
//! deletions, `baileys-store verify` must then find no difference between
//! the log and Mongo.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bstore_api::client::{SessionClient, key_data};
use bstore_testkit::{MongoServer, TempDir, sigterm, wait_for};

use crate::harness::{KEY1, Stack, rid, service_bin};

/// One `baileys-store materialize` process, stopped (SIGTERM) on drop.
struct Materialize {
    child: Option<Child>,
    log: PathBuf,
}

impl Materialize {
    fn start(stack: &Stack, mongo: &MongoServer, dir: &TempDir, name: &str) -> Self {
        let log = dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(service_bin());
        cmd.arg("materialize");
        for (k, _) in std::env::vars() {
            if k.starts_with("BSTORE") {
                cmd.env_remove(k);
            }
        }
        cmd.env("BSTORE_NATS_URL", stack.nats.url())
            .env("BSTORE_KEYS", KEY1)
            .env("BSTORE_MONGO_URL", mongo.url())
            .env("BSTORE_DATA_DIR", dir.path().join(name))
            .env("BSTORE_LOG", "info,bstore_mongo=debug")
            .env("NO_COLOR", "1")
            // Small batches, fetched often: the two processes take turns
            // within every session's history.
            .env("BSTORE__MONGO__BATCH_SIZE", "3")
            .env("BSTORE__MONGO__BATCH_WAIT", "0.05")
            .env("BSTORE__MONGO__RETRY_MAX", "0.5");
        cmd.stdin(std::process::Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
        let child = cmd.spawn().expect("starting baileys-store materialize");
        let m = Self { child: Some(child), log };
        wait_for(30, "the materializer to start", || m.log_text().contains("materializing").then_some(()));
        m
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Batches this process wrote.
    fn batches(&self) -> usize {
        self.log_text().matches("batch materialized").count()
    }
}

impl Drop for Materialize {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            sigterm(child.id());
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log_text());
        }
    }
}

/// A small deterministic generator, so that a failing history can be rerun.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// One session's history: key writes (some of them rewriting a growing
/// record, which the log holds as patches), key deletions, creds and a
/// deletion of the whole session. Creds and deletions are rare and followed
/// by key writes, so that an instance applying one of them after a
/// neighbouring batch leaves a difference that no later event hides.
async fn write_history(s: SessionClient, seed: u64, writes: u32) {
    let mut rng = Lcg(seed);
    let mut record = 800 + seed as u32;
    for i in 0..writes {
        let result = if i == 0 || i == writes - 6 {
            s.creds_put(&rid(), format!("creds-{seed}-{i}").as_bytes()).await
        } else if i == writes / 2 {
            s.delete(&rid()).await
        } else {
            match rng.below(10) {
                0 | 1 => {
                    // Grows the record by one message, as Baileys does.
                    record += 1;
                    let v = crate::deltas::sender_key_record(record);
                    s.keys_set(&rid(), &key_data([("sender-key", "g@g.us::u::0", Some(&v[..]))])).await
                }
                2 | 3 => {
                    let gone = format!("{}", rng.below(8));
                    s.keys_set(&rid(), &key_data([("pre-key", gone.as_str(), None)])).await
                }
                _ => {
                    let (a, b) = (format!("{}", rng.below(8)), format!("u{}.0", rng.below(3)));
                    let v = format!("value-{seed}-{i}");
                    let entries = [("pre-key", a.as_str(), Some(v.as_bytes())), ("session", b.as_str(), Some(v.as_bytes()))];
                    s.keys_set(&rid(), &key_data(entries)).await
                }
            }
        };
        if let Err(e) = result {
            panic!("write {i} of session {seed} failed: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_materializers_on_one_consumer_leave_mongo_equal_to_the_log() {
    let mongo = MongoServer::start();
    let stack = Stack::start().await;
    let dir = TempDir::new("two-materializers");

    // Sessions written concurrently, three at a time, so that neighbouring
    // batches share sessions. The materializers start after the first
    // waves: both then drain that backlog at once, taking neighbouring
    // batches, before keeping up with the rest.
    const SESSIONS: u64 = 24;
    let mut materializers = None;
    for wave in 0..SESSIONS / 3 {
        if wave == 4 {
            materializers = Some((Materialize::start(&stack, &mongo, &dir, "m1"), Materialize::start(&stack, &mongo, &dir, "m2")));
        }
        let tasks: Vec<_> = (0..3)
            .map(|n| {
                let seed = wave * 3 + n;
                let s = stack.session("t", &format!("s{seed}")).with_timeout(Duration::from_secs(10));
                tokio::spawn(write_history(s, seed, 30))
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }

    let (m1, m2) = materializers.unwrap();
    let js = async_nats::jetstream::new(stack.nc.clone());
    let start = Instant::now();
    loop {
        let lag = bstore_mongo::lag(&js, "BSTORE_EVENTS", "bstore-mongo").await.unwrap();
        if lag.events() == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the materializers did not catch up: {lag:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(m1.batches() > 0 && m2.batches() > 0, "both materializers wrote batches ({} and {})", m1.batches(), m2.batches());

    let mut cmd = tokio::process::Command::new(service_bin());
    cmd.arg("verify");
    for (k, _) in std::env::vars() {
        if k.starts_with("BSTORE") {
            cmd.env_remove(k);
        }
    }
    cmd.env("BSTORE_NATS_URL", stack.nats.url())
        .env("BSTORE_KEYS", KEY1)
        .env("BSTORE_MONGO_URL", mongo.url())
        .env("BSTORE_DATA_DIR", dir.path().join("verify"))
        .env("BSTORE_LOG", "warn")
        .env("NO_COLOR", "1");
    let out = cmd.output().await.expect("running baileys-store verify");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "verify found differences:\n{text}");
    assert!(text.contains(&format!("verified {SESSIONS} sessions against mongo: 0 differences")), "{text}");
}
