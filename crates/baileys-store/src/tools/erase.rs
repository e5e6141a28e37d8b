//! `baileys-store erase`: a session's (or a whole tenant's) data made
//! unreadable for good, on request, without purging the audit log.
//!
//! The log denies purges, so an erasure destroys keys instead of messages
//! (crypto-shredding, `bstore-log`'s `datakeys.rs`): each session's events
//! are sealed under a data key of its own;
//! erasing destroys that key and appends a marker (a session deletion
//! sealed under the ring, readable for ever) after which the session starts
//! empty. Every running instance drops the session from memory when it sees
//! the key go, the Redis copy is replaced by the empty state, and the Mongo
//! materializer applies the marker like any deletion (tombstones, no
//! values).
//!
//! What an erasure cannot reach, and says: events sealed under ring keys,
//! written before the cluster had data keys on (`keys enable-data-keys`),
//! stay readable to whoever holds those keys until retention drops them;
//! backups of the data-key bucket taken before the erasure still hold the
//! wrapped key (keep them short-lived, or apart from the sealing keys); and
//! projected values are sealed under the ring, so a Redis or Mongo backup
//! taken before the erasure is not shredded (the live copies are cleared).

use std::collections::BTreeMap;

use anyhow::Context as _;
use async_nats::jetstream;
use bstore_domain::{SessionKey, TenantId};
use bstore_log::EventLog;
use serde::Serialize;

use crate::Config;

/// What was erased of one session.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `<tenant>.<session>`.
    pub session: String,
    /// The sequence of the erasure's marker event.
    pub marker: u64,
    /// The destroyed data-key generation, if the session had one.
    pub destroyed_generation: Option<u32>,
    /// Events made unreadable for good.
    pub shredded_events: u64,
    /// Events that stay readable to the holder of a ring key, by key id.
    pub readable_under_ring_keys: BTreeMap<u32, u64>,
    /// Whether the Redis copy was replaced (`None`: no Redis configured).
    pub redis_cleared: Option<bool>,
}

/// The sessions of `tenant` the log knows.
pub(crate) async fn sessions_of(log: &EventLog, tenant: &TenantId) -> anyhow::Result<Vec<SessionKey>> {
    log.sessions(Some(tenant.as_str())).await.context("listing the tenant's sessions")
}

/// Erases `only` (one session) or every session of `tenant`. Without `yes`
/// it lists what would be erased and fails, changing nothing.
pub async fn run(cfg: Config, tenant: TenantId, only: Option<SessionKey>, yes: bool, json: bool) -> anyhow::Result<()> {
    let (client, codec) = crate::connect_tool(&cfg).await?;
    let js = jetstream::new(client.clone());
    let log = EventLog::attach(js.clone(), cfg.stream.clone(), codec.clone());
    let targets = match only {
        Some(key) => vec![key],
        None => sessions_of(&log, &tenant).await?,
    };
    if !yes {
        for key in &targets {
            eprintln!("would erase {key}");
        }
        anyhow::bail!("{} session(s) would be erased, which cannot be undone: run again with --yes to erase them", targets.len());
    }
    let redis = crate::projections::redis_projection(&cfg, &codec)?;
    let total = targets.len();
    for (i, key) in targets.iter().enumerate() {
        let erased = log
            .erase(key, crate::rotation::now_ms())
            .await
            .with_context(|| format!("erasing {key} (run the command again to finish it)"))?;
        let redis_cleared = match &redis {
            None => None,
            Some(redis) => {
                // The empty state at the marker, as any replay now builds it.
                let state = bstore_session::load::from_log(&log, key).await.with_context(|| format!("reading {key} after its erasure"))?;
                match redis.write_snapshot(key, &state, bstore_redis::SnapshotMode::Replace).await {
                    Ok(_) => Some(true),
                    Err(e) => {
                        tracing::warn!(session = %key, error = %e, "could not replace the redis copy; the next load replaces it");
                        Some(false)
                    }
                }
            }
        };
        let report = Report {
            session: key.to_string(),
            marker: erased.marker,
            destroyed_generation: erased.destroyed_generation,
            shredded_events: erased.shredded_events,
            readable_under_ring_keys: erased.under_ring.clone(),
            redis_cleared,
        };
        if json {
            println!("{}", serde_json::to_string(&report).expect("plain data"));
        } else {
            println!("[{}/{total}] {}", i + 1, report.text());
        }
    }
    if total == 0 {
        eprintln!("tenant {tenant} has no sessions in the log: nothing to erase");
    }
    Ok(())
}

impl Report {
    /// The report for people.
    pub fn text(&self) -> String {
        let mut out =
            format!("erased {}: marker event {}; {} events made unreadable for good", self.session, self.marker, self.shredded_events);
        if let Some(g) = self.destroyed_generation {
            out += &format!(" (data key generation {g} destroyed)");
        }
        // The marker itself is under the ring, and says nothing.
        let readable: u64 = self.readable_under_ring_keys.values().sum();
        if readable > 0 {
            let by: Vec<String> = self.readable_under_ring_keys.iter().map(|(k, n)| format!("{n} under key {k}")).collect();
            out += &format!(
                "; {readable} earlier events were sealed under ring keys ({}): erasure markers, or events written before the \
                 cluster had data keys, which stay readable to the holder of those keys",
                by.join(", ")
            );
        }
        match self.redis_cleared {
            Some(true) => out += "; redis copy replaced",
            Some(false) => out += "; redis copy NOT replaced (redis unavailable): the next load replaces it",
            None => {}
        }
        out
    }
}
