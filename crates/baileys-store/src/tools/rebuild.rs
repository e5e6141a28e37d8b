//! `baileys-store rebuild redis|mongo`: a projection written again from the
//! log alone, each session from its newest snapshot plus the events after
//! it (time in proportion to the states, not the history), or from every
//! event kept with `--from-scratch`. Both projections are caches of the log
//! and can be dropped at any time.

use std::collections::BTreeSet;

use anyhow::Context as _;
use bstore_codec::Codec;
use bstore_domain::SessionKey;
use bstore_log::EventLog;
use bstore_mongo::{Materializer, Store};
use bstore_redis::{RedisProjection, SnapshotMode};

use super::log_sessions;
use crate::Config;

/// Which projection `rebuild` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The Redis hashes.
    Redis,
    /// The Mongo collections.
    Mongo,
}

/// `baileys-store rebuild`: writes a projection again from the log alone,
/// each session from its newest snapshot plus the events after it (so the
/// time is that of the states, not of the history), or from every event kept
/// with `from_scratch`. Prints a summary in lines.
pub async fn rebuild(cfg: Config, target: Target, from_scratch: bool) -> anyhow::Result<()> {
    rebuild_reporting(cfg, target, from_scratch, false).await
}

/// [`rebuild`], its summary printed as one JSON object with `json`.
pub async fn rebuild_reporting(cfg: Config, target: Target, from_scratch: bool, json: bool) -> anyhow::Result<()> {
    let (client, codec) = crate::connect_tool(&cfg).await?;
    let log = EventLog::open(client.clone(), cfg.stream.clone(), codec.clone()).await.context("opening the event stream")?;
    match target {
        Target::Redis => {
            anyhow::ensure!(cfg.redis.url.is_some(), "no redis url configured (set BSTORE_REDIS_URL or redis.url)");
            let redis = RedisProjection::new(cfg.redis.clone(), codec)?;
            let sessions = log_sessions(&log).await?;
            let mut from_snapshots = 0;
            let mut progress = Progress::new(sessions.len() as u64);
            for key in &sessions {
                let state = if from_scratch {
                    bstore_session::load::from_log(&log, key).await?
                } else {
                    let (state, source) = bstore_session::load::from_snapshots(&log, key).await?;
                    from_snapshots += u64::from(matches!(source, bstore_session::load::Source::Snapshot { .. }));
                    state
                };
                redis.write_snapshot(key, &state, SnapshotMode::Replace).await?;
                progress.done(1);
            }
            let wanted: BTreeSet<&SessionKey> = sessions.iter().collect();
            let mut removed = 0;
            for key in redis.sessions().await? {
                if !wanted.contains(&key) {
                    redis.remove(&key).await?;
                    removed += 1;
                }
            }
            if json {
                let out = serde_json::json!({
                    "target": "redis", "sessions": sessions.len(), "from_snapshot": from_snapshots, "removed": removed, "ok": true,
                });
                println!("{out}");
            } else {
                println!(
                    "rebuilt redis: {} sessions written from the log ({from_snapshots} starting from a snapshot), {removed} without events removed",
                    sessions.len()
                );
            }
        }
        Target::Mongo => {
            anyhow::ensure!(cfg.mongo.url.is_some(), "no mongo url configured (set BSTORE_MONGO_URL or mongo.url)");
            let done = rebuild_mongo_with(&cfg, &client, &codec, from_scratch).await?;
            let failing: Vec<String> = done.failing.iter().map(|(k, why)| format!("{k}: {why}")).collect();
            if json {
                let out = serde_json::json!({
                    "target": "mongo",
                    "upto": done.upto,
                    "from_scratch": from_scratch,
                    "sessions": done.sessions,
                    "from_snapshot": done.from_snapshot,
                    "events_read": done.events_read,
                    "keys_written": done.keys_written,
                    "tombstoned": done.tombstoned,
                    "caught_up": done.caught_up,
                    "removed": done.removed,
                    "resumed_after": done.resumed_after,
                    "failing": failing,
                    "ok": done.failing.is_empty(),
                });
                println!("{out}");
            } else {
                for line in &failing {
                    println!("FAIL {line}");
                }
                println!(
                    "rebuilt mongo through sequence {}: {} sessions ({} starting from a snapshot), {} events read, {} keys written, \
                     {} tombstones, {} written again for events that came meanwhile, {} without events removed",
                    done.upto,
                    done.sessions,
                    done.from_snapshot,
                    done.events_read,
                    done.keys_written,
                    done.tombstoned,
                    done.caught_up,
                    done.removed
                );
                match done.resumed_after {
                    Some(seq) => println!("the materializers resume after sequence {seq}"),
                    None => println!("the materializers' consumer was left where it was"),
                }
            }
            anyhow::ensure!(
                done.failing.is_empty(),
                "{} sessions could not be rebuilt (their logs do not fold; `verify` says more): {}",
                done.failing.len(),
                done.failing.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(())
}

/// Progress of a rebuild over many sessions, on stderr (stdout keeps the
/// summary): at most one line every two seconds, and the last one when
/// there are a thousand sessions or more.
struct Progress {
    total: u64,
    done: u64,
    last: std::time::Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        Self { total, done: 0, last: std::time::Instant::now() }
    }

    fn done(&mut self, n: u64) {
        self.done += n;
        if self.last.elapsed() >= std::time::Duration::from_secs(2) || (self.done == self.total && self.total >= 1000) {
            self.last = std::time::Instant::now();
            eprintln!("rebuilding: {}/{} sessions", self.done, self.total);
        }
    }
}

/// Writes Mongo again from the log (`Materializer::rebuild`: each session
/// from its newest snapshot plus the events after it, while the instances'
/// materializers go on); returns the sequence through which every event is
/// in the documents. For `rotate-key`, which re-seals everything this way.
pub(crate) async fn rebuild_mongo(cfg: &Config, client: &async_nats::Client, codec: &Codec) -> anyhow::Result<u64> {
    let done = rebuild_mongo_with(cfg, client, codec, false).await?;
    anyhow::ensure!(done.failing.is_empty(), "{} sessions could not be rebuilt", done.failing.len());
    Ok(done.upto)
}

async fn rebuild_mongo_with(
    cfg: &Config,
    client: &async_nats::Client,
    codec: &Codec,
    from_scratch: bool,
) -> anyhow::Result<bstore_mongo::Rebuilt> {
    let store = Store::connect(&cfg.mongo, codec.clone()).await?;
    let m = Materializer::new(client.clone(), cfg.stream.clone(), cfg.mongo.clone(), store, codec.clone());
    let progress = std::sync::Mutex::new(Progress::new(0));
    let report = |done: u64, total: u64| {
        let mut p = progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        p.total = total;
        let n = done - p.done;
        p.done(n);
    };
    m.rebuild(from_scratch, &report).await.context("rebuilding mongo")
}

