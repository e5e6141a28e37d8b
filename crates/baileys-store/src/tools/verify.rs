//! `baileys-store verify`: the log replayed as a load replays it — every
//! snapshot must open as its session's state, every event must open, fit
//! the chain and apply — and, when they are configured, Redis and Mongo
//! compared with it. It reports every way they differ — never a value, only
//! where.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use bstore_domain::{SessionKey, SessionState};
use bstore_log::EventLog;
use bstore_mongo::{Store, StoredSession};
use bstore_redis::{RedisError, RedisProjection};

use super::log_sessions;
use crate::Config;

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// Differences and failures found, every kind together.
    pub differences: usize,
    /// The sessions (or, for a quarantined record of no known session, the
    /// subjects) with at least one, in order.
    pub failing: Vec<String>,
}

/// Every stored snapshot of `key` must open as its state and equal the
/// log's events folded up to the sequence it covers.
async fn check_snapshots(diffs: &mut Diffs, log: &EventLog, key: &SessionKey, from_scratch: bool) -> anyhow::Result<()> {
    let stored = log.stored_snapshots(key).await?;
    let usable = log.snapshots(key).await?;
    let erased = log.data_key_state(key).await?.erased.map(|e| e.marker);
    for snap in &stored {
        let opens = usable.iter().any(|s| Some(s.seq()) == snap.covers);
        let before_erasure = snap.covers.zip(erased).is_some_and(|(c, m)| c < m);
        if !opens && !before_erasure {
            diffs.add("snapshot", key, format!("snapshot {} does not open as this session's state", snap.stream_seq));
        }
    }
    // Comparing a snapshot with the events up to it reads the history
    // before it: only in a full check.
    for snapshot in usable.into_iter().filter(|_| from_scratch) {
        let covers = snapshot.seq();
        let (replayed, _, _) = log.fold(key, Some(covers), false, &mut |_, _| {}).await?;
        if replayed != snapshot {
            diffs.add("snapshot", key, format!("the snapshot covering sequence {covers} differs from the log's events up to it"));
        }
    }
    Ok(())
}

/// `baileys-store verify`: replays the log — every event must open and sit
/// where it was written, and the chain of each session must hold — and
/// compares each configured projection with it. With no projection
/// configured (the embedded default) it checks the log alone. Reports every
/// session (and every difference); with `json`, as one JSON object.
pub async fn verify(cfg: Config, only: Option<SessionKey>, json: bool, from_scratch: bool) -> anyhow::Result<Verified> {
    let (client, codec) = crate::connect_tool(&cfg).await?;
    let log = EventLog::open(client.clone(), cfg.stream.clone(), codec.clone()).await.context("opening the event stream")?;
    let sessions = match &only {
        Some(key) => vec![key.clone()],
        None => log_sessions(&log).await?,
    };
    let redis = cfg.redis.url.as_ref().map(|_| RedisProjection::new(cfg.redis.clone(), codec.clone())).transpose()?;
    let mongo = match &cfg.mongo.url {
        Some(_) => Some(Store::connect(&cfg.mongo, codec.clone()).await?),
        None => None,
    };
    let mut diffs = Diffs { json, ..Diffs::default() };
    let mut reports = Vec::new();
    for key in &sessions {
        let before = diffs.count;
        let checked = check_log(&log, key, from_scratch).await?;
        if !checked.refused.is_empty() {
            let seqs: Vec<String> = checked.refused.iter().map(u64::to_string).collect();
            diffs.add(
                "log",
                key,
                format!(
                    "{} events refused as not where they were written (copies; `history` marks them): sequence {}",
                    checked.refused.len(),
                    seqs.join(", ")
                ),
            );
        }
        let truth = match (&checked.failure, checked.state) {
            (None, Some(truth)) => Some(truth),
            // Nothing to compare with; the other sessions are still checked.
            (failure, _) => {
                diffs.add("log", key, format!("cannot be replayed: {}", failure.as_deref().unwrap_or("no state")));
                None
            }
        };
        if let Some(truth) = &truth {
            check_snapshots(&mut diffs, &log, key, from_scratch).await?;
            compare_projections(&mut diffs, key, truth, redis.as_ref(), mongo.as_ref()).await?;
        }
        let problems = diffs.count - before;
        reports.push(SessionReport {
            session: key.to_string(),
            events: checked.events,
            seq: truth.as_ref().map_or(0, SessionState::seq),
            refused: checked.refused,
            log_ok: checked.failure.is_none(),
            problems,
        });
        if !json {
            let last = reports.last().expect("just pushed");
            println!("{}", last.line());
        }
    }
    if only.is_none() {
        let known: BTreeSet<&SessionKey> = sessions.iter().collect();
        if let Some(redis) = &redis {
            for key in redis.sessions().await? {
                if !known.contains(&key) {
                    diffs.add("redis", &key, "holds a session the log has no event of".into());
                }
            }
        }
        if let Some(mongo) = &mongo {
            for key in mongo.sessions().await? {
                if !known.contains(&key) {
                    diffs.add("mongo", &key, "holds a session the log has no event of".into());
                }
            }
        }
    }
    let mut quarantined = 0;
    if let Some(mongo) = &mongo {
        for q in mongo.quarantined().await.context("reading mongo's quarantine")? {
            if only.is_none() || q.session == only {
                quarantined += 1;
                diffs.add_quarantined(&q);
            }
        }
    }
    let mut against: Vec<&str> = [redis.as_ref().map(|_| "redis"), mongo.as_ref().map(|_| "mongo")].into_iter().flatten().collect();
    if against.is_empty() {
        against.push("the log alone");
    }
    let failing: Vec<String> = diffs.failing.iter().cloned().collect();
    if json {
        let out = serde_json::json!({
            "sessions": reports.iter().map(SessionReport::json).collect::<Vec<_>>(),
            "differences": diffs.entries,
            "checked": sessions.len(),
            "against": against,
            "quarantined": quarantined,
            "failing": failing,
            "ok": diffs.count == 0,
        });
        println!("{out}");
    } else {
        let of_which = if quarantined > 0 { format!(" ({quarantined} of them quarantined by the materializer)") } else { String::new() };
        println!("verified {} sessions against {}: {} differences{of_which}", sessions.len(), against.join(" and "), diffs.count);
    }
    Ok(Verified { differences: diffs.count, failing })
}

/// The projections' side of `verify` for one session whose log replayed.
async fn compare_projections(
    diffs: &mut Diffs,
    key: &SessionKey,
    truth: &SessionState,
    redis: Option<&RedisProjection>,
    mongo: Option<&Store>,
) -> anyhow::Result<()> {
    if let Some(redis) = redis {
        match redis.load(key).await {
            Ok(Some(copy)) => compare_redis(diffs, key, truth, &copy),
            Ok(None) if truth.seq() == 0 => {}
            Ok(None) if redis.config().ttl_secs > 0 => {} // expired by the cache policy
            Ok(None) => diffs.add("redis", key, format!("missing (the log is at {})", truth.seq())),
            Err(e @ RedisError::Unreadable { .. }) => diffs.add("redis", key, e.to_string()),
            Err(e) => return Err(e).context("reading redis"),
        }
    }
    if let Some(mongo) = mongo {
        match mongo.read_session(key).await {
            Ok(Some(stored)) => compare_mongo(diffs, key, truth, &stored),
            Ok(None) => diffs.add("mongo", key, format!("missing (the log is at {})", truth.seq())),
            Err(bstore_mongo::MongoError::Unreadable(e)) => diffs.add("mongo", key, format!("unreadable: {e}")),
            Err(e) => return Err(e).context("reading mongo"),
        }
    }
    Ok(())
}

/// What replaying one session's log found.
struct LogCheck {
    /// Messages replayed (refused ones included).
    events: u64,
    /// Sequences of the events refused as not where they were written.
    refused: Vec<u64>,
    /// Why the replay stopped: an event that does not open, a gap in the
    /// chain, a patch that fits no value.
    failure: Option<String>,
    /// The session's state, when the replay went through.
    state: Option<SessionState>,
}

/// Replays every event of `key` as a load does (checking each against the
/// chain, applying those that fit, passing over refused ones) and says what
/// it found. Only an unreachable log is an error: the rest is the report.
async fn check_log(log: &EventLog, key: &SessionKey, from_scratch: bool) -> anyhow::Result<LogCheck> {
    if !from_scratch && let Some(snapshot) = log.newest_snapshot(key).await.with_context(|| format!("reading {key}'s snapshot"))? {
        // From the newest snapshot: the events after it must open and
        // follow it. Anything amiss is looked at again from the start.
        let check = check_log_from(log, key, snapshot).await?;
        if check.failure.is_none() && check.refused.is_empty() {
            return Ok(check);
        }
    }
    let start = log.start_state(key).await.with_context(|| format!("reading the start of {key}'s history"))?;
    check_log_from(log, key, start).await
}

/// Replays `key`'s events after `state` into it, checking each.
async fn check_log_from(log: &EventLog, key: &SessionKey, mut state: SessionState) -> anyhow::Result<LogCheck> {
    let (mut events, mut refused, mut failure) = (0, Vec::new(), None);
    let replayed = log
        .replay_checked(key, state.seq(), |seq, replayed| {
            if failure.is_some() {
                return;
            }
            events += 1;
            match replayed {
                bstore_log::Replayed::Fits(event) => {
                    if let Err(e) = state.apply(seq, &event) {
                        failure = Some(format!("event {seq} does not apply: {e}"));
                    }
                }
                bstore_log::Replayed::Refused(..) => {
                    refused.push(seq);
                    state.pass_over(seq);
                }
            }
        })
        .await;
    match replayed {
        Ok(last) => {
            state.pass_over(last);
        }
        Err(e @ (bstore_log::LogError::Unreadable { .. } | bstore_log::LogError::Broken { .. })) => failure = Some(e.to_string()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("replaying {key}"))),
    }
    let state = failure.is_none().then_some(state);
    Ok(LogCheck { events, refused, failure, state })
}

/// One session's line in `verify`'s report.
struct SessionReport {
    session: String,
    events: u64,
    seq: u64,
    refused: Vec<u64>,
    log_ok: bool,
    problems: usize,
}

impl SessionReport {
    fn line(&self) -> String {
        if self.problems == 0 {
            format!("OK {}: {} events up to sequence {}, every one opens and the chain holds", self.session, self.events, self.seq)
        } else {
            let log = if !self.log_ok {
                "the log does not replay"
            } else if !self.refused.is_empty() {
                "the log holds refused events"
            } else {
                "the log is sound"
            };
            format!("FAIL {}: {} events; {log}; {} differences (above)", self.session, self.events, self.problems)
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "session": self.session,
            "ok": self.problems == 0,
            "events": self.events,
            "seq": self.seq,
            "log_replays": self.log_ok,
            "refused": self.refused,
            "differences": self.problems,
        })
    }
}

#[derive(Default)]
struct Diffs {
    count: usize,
    /// Print nothing as found; keep the entries for one JSON object.
    json: bool,
    entries: Vec<serde_json::Value>,
    failing: BTreeSet<String>,
}

impl Diffs {
    fn add(&mut self, projection: &str, key: &SessionKey, what: String) {
        self.count += 1;
        self.failing.insert(key.to_string());
        if self.json {
            self.entries.push(serde_json::json!({ "in": projection, "session": key.to_string(), "what": what }));
        } else {
            println!("DIFF {projection} {key}: {what}");
        }
    }

    /// A record the materializer set aside: an event Mongo lacks, or a key
    /// document found unreadable (named by its type and id tag, never its
    /// id). `rebuild mongo` clears the list.
    fn add_quarantined(&mut self, q: &bstore_mongo::Quarantined) {
        self.count += 1;
        let whose = q.session.as_ref().map_or_else(|| q.subject.clone(), ToString::to_string);
        self.failing.insert(whose.clone());
        let what = match (&q.kind, &q.key) {
            (bstore_mongo::QuarantineKind::Document, Some((ty, tag))) => format!("{ty} key document {tag}, read for event {}", q.seq),
            _ => format!("event {}", q.seq),
        };
        if self.json {
            self.entries.push(serde_json::json!({
                "in": "mongo", "quarantined": true, "session": whose, "what": what, "reason": q.reason, "at_ms": q.at_ms,
            }));
        } else {
            println!("QUARANTINED mongo {whose}: {what}: {} (recorded at {} ms Unix time)", q.reason, q.at_ms);
        }
    }
}

fn keys_of(state: &SessionState) -> BTreeMap<(String, String), &[u8]> {
    state.iter_keys().map(|(t, i, v)| ((t.to_string(), i.to_string()), v.as_ref())).collect()
}

fn compare_keys(
    diffs: &mut Diffs,
    projection: &str,
    key: &SessionKey,
    truth: &BTreeMap<(String, String), &[u8]>,
    copy: &BTreeMap<(String, String), &[u8]>,
) {
    for ((t, i), v) in truth {
        match copy.get(&(t.clone(), i.clone())) {
            None => diffs.add(projection, key, format!("key {t}/{i} missing")),
            Some(c) if c != v => diffs.add(projection, key, format!("key {t}/{i} holds another value")),
            Some(_) => {}
        }
    }
    for (t, i) in copy.keys() {
        if !truth.contains_key(&(t.clone(), i.clone())) {
            diffs.add(projection, key, format!("key {t}/{i} present but absent (or deleted) in the log"));
        }
    }
}

fn compare_redis(diffs: &mut Diffs, key: &SessionKey, truth: &SessionState, copy: &SessionState) {
    if copy.seq() != truth.seq() {
        diffs.add("redis", key, format!("at sequence {}, the log at {}", copy.seq(), truth.seq()));
    }
    if copy.creds() != truth.creds() {
        diffs.add("redis", key, "creds differ".into());
    }
    if copy.updated_at_ms() != truth.updated_at_ms() || copy.events() != truth.events() {
        diffs.add("redis", key, "session metadata (updated_at_ms, events) differs".into());
    }
    compare_keys(diffs, "redis", key, &keys_of(truth), &keys_of(copy));
}

fn compare_mongo(diffs: &mut Diffs, key: &SessionKey, truth: &SessionState, stored: &StoredSession) {
    if stored.seq != truth.seq() {
        diffs.add("mongo", key, format!("at sequence {}, the log at {}", stored.seq, truth.seq()));
    }
    if stored.creds.as_deref() != truth.creds().map(|c| c.as_ref()) {
        diffs.add("mongo", key, "creds differ".into());
    }
    if stored.updated_at_ms != truth.updated_at_ms() {
        diffs.add("mongo", key, "updated_at_ms differs".into());
    }
    let counts: BTreeMap<String, u64> = truth.info().keys;
    if stored.counts != counts {
        diffs.add("mongo", key, format!("counts per type {:?}, the log {:?}", stored.counts, counts));
    }
    let copy: BTreeMap<(String, String), &[u8]> = stored.keys.iter().map(|(k, v)| (k.clone(), v.as_slice())).collect();
    compare_keys(diffs, "mongo", key, &keys_of(truth), &copy);
}
