//! `baileys-store restore`: sessions put back to their state at a sequence
//! or a moment, each as one new event in its history — the answer to "a bug
//! in our bot corrupted 200 sessions yesterday at 14:05".
//!
//! The tool decides nothing and writes nothing itself. It reads the log to
//! find, per session, the point a moment stands for (the last event before
//! the first one decided after it) and which sessions changed after it,
//! then asks the running service on the operator's subject
//! (`bstore_api::admin`), where the session's owning actor folds the state
//! at the point, decides the restore against its current state and appends
//! it fenced, as it does every write — so memory, Redis and Mongo all
//! follow, and no process appends behind the actor's back. A dry run asks
//! the actor the same question and has it write nothing.
//!
//! Each session's request carries a request id of its own, kept across the
//! attempts: a request no instance answered in time (its partition
//! changing hands) or answered 503 is sent again and still lands once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bstore_api::admin::{AdminError, RestoreBody, request_restore};
use bstore_domain::{CredsRestore, KeyCounts, SessionKey, TenantId};
use bstore_log::{EventLog, Replayed};
use bstore_session::RestoreOutcome;
use serde::Serialize;

use crate::Config;
use super::state_at::Point;

/// Which sessions to restore.
#[derive(Debug, Clone)]
pub enum Sessions {
    /// These sessions of the tenant, whatever happened after the point.
    Listed(Vec<SessionKey>),
    /// Every session of the tenant with an event after the point.
    ChangedAfter,
}

/// Options of a run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Have the owners decide and report, write nothing.
    pub dry_run: bool,
    /// Needed to restore more than one session for real.
    pub yes: bool,
    /// One JSON object per session on stdout.
    pub json: bool,
}

/// How long one attempt waits for the owner's answer.
const ATTEMPT: Duration = Duration::from_secs(15);
/// How long a session's request is retried (a failover takes 5-7 s).
const RETRY_FOR: Duration = Duration::from_secs(60);

/// What became of one session.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Session id.
    pub session: String,
    /// `restored`, `would_restore` (dry run), `already_there` (nothing to
    /// write), `retried` (an earlier attempt of this run landed), `skipped`
    /// (a session of the tenant made after the point), `refused` (see
    /// `code`) or `failed`.
    pub status: &'static str,
    /// The point restored to: the session's last event at or before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_seq: Option<u64>,
    /// The moment asked for, if the point was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<u64>,
    /// The session's sequence the restore was decided against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<u64>,
    /// The session's sequence afterwards (the restore's event, when one was
    /// written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// What happens to the creds: `unchanged`, `set` or `removed`.
    pub creds: CredsRestore,
    /// Per key type: keys set back and keys deleted.
    pub keys: BTreeMap<String, KeyCounts>,
    /// The stable code's name when refused or failed (`history_gone`,
    /// `beyond_log`, `empty_point`, `unknown_session`, `unavailable`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Why, when refused or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    fn new(key: &SessionKey, status: &'static str) -> Self {
        Self {
            session: key.session.to_string(),
            status,
            to_seq: None,
            to_ms: None,
            from_seq: None,
            seq: None,
            creds: CredsRestore::Unchanged,
            keys: BTreeMap::new(),
            code: None,
            error: None,
        }
    }

    fn refused(key: &SessionKey, code: &str, error: String) -> Self {
        Self { code: Some(code.to_owned()), error: Some(error), ..Self::new(key, "refused") }
    }
}

/// Where one session's point lies in its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The sequence to restore to.
    pub to_seq: u64,
    /// The session's last message.
    pub last: u64,
}

/// Finds `point` in `key`'s history. A moment stands for the session's
/// last event before the first one decided after it; a sequence for
/// itself (the service refuses one beyond the log). `Err`: a refusal (code
/// name, message) the service would give too, found without asking it.
pub async fn resolve(log: &EventLog, key: &SessionKey, point: Point, now_ms: u64) -> anyhow::Result<Result<Resolved, (String, String)>> {
    let (to_seq, last) = match point {
        // Where a sequence lies needs no replay; the service judges it.
        Point::Seq(n) => (n, log.last_seq(key).await?),
        Point::TimeMs(t) => {
            if t > now_ms {
                return Ok(Err(("beyond_log".into(), format!("the moment {t} ms is in the future"))));
            }
            let base = log.start_state(key).await?;
            if base.seq() > 0 && base.updated_at_ms().unwrap_or(0) > t {
                let why = format!("the audit retention dropped the history through sequence {} (decided after {t} ms)", base.seq());
                return Ok(Err(("history_gone".into(), why)));
            }
            let (mut to_seq, mut stop) = (base.seq(), false);
            let last = log
                .replay_checked(key, 0, |seq, replayed| {
                    let (Replayed::Fits(event) | Replayed::Refused(event, _)) = replayed;
                    stop |= event.at_ms > t;
                    if !stop {
                        to_seq = seq;
                    }
                })
                .await?;
            (to_seq, last)
        }
    };
    if last == 0 {
        return Ok(Err(("unknown_session".into(), "the session has no history: nothing to restore".into())));
    }
    if let Some(e) = log.data_key_state(key).await?.erased
        && to_seq < e.marker
    {
        let why = format!("the session was erased at sequence {}: no earlier point can be restored", e.marker);
        return Ok(Err(("history_gone".into(), why)));
    }
    if to_seq == 0 {
        return Ok(Err(("empty_point".into(), "the session did not exist yet at that point; a restore does not delete".into())));
    }
    Ok(Ok(Resolved { to_seq, last }))
}

/// Restores the sessions of `tenant` that `which` names to `point`, and
/// reports each. Fails (after the whole report) if any was refused or
/// failed.
pub async fn run(cfg: Config, tenant: TenantId, which: Sessions, point: Point, opts: Options) -> anyhow::Result<()> {
    let (client, codec) = crate::connect_tool(&cfg).await?;
    let log = EventLog::open(client, cfg.stream.clone(), codec).await?;
    let nc = crate::connect_requester(&cfg).await?;
    let (keys, listed) = match which {
        Sessions::Listed(keys) => (keys, true),
        Sessions::ChangedAfter => (log.sessions(Some(tenant.as_str())).await?, false),
    };
    let now = now_ms();
    // First where each point lies (the log alone), so that --yes is asked
    // for before anything is written.
    let mut reports: Vec<Report> = Vec::new();
    let mut todo: Vec<(SessionKey, Resolved)> = Vec::new();
    for key in keys {
        match resolve(&log, &key, point, now).await {
            Ok(Ok(r)) if !listed && r.last <= r.to_seq => {} // not changed after the point
            Ok(Ok(r)) => todo.push((key, r)),
            // A tenant's session made after the point is not one to put back.
            Ok(Err((code, why))) if !listed && code == "empty_point" => {
                reports.push(Report { status: "skipped", ..Report::refused(&key, &code, why) })
            }
            Ok(Err((code, why))) => reports.push(Report::refused(&key, &code, why)),
            Err(e) => {
                reports.push(Report { code: Some("unavailable".into()), error: Some(format!("{e:#}")), ..Report::new(&key, "failed") })
            }
        }
    }
    if todo.len() > 1 && !opts.dry_run && !opts.yes {
        anyhow::bail!(
            "{} sessions would be restored ({}); see what changes with --dry-run, then run again with --yes",
            todo.len(),
            todo.iter().map(|(k, _)| k.session.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    let to_ms = match point {
        Point::TimeMs(t) => Some(t),
        Point::Seq(_) => None,
    };
    let total = todo.len();
    // A bar on a terminal (over many sessions); a line per session either way.
    let bar = indicatif::ProgressBar::with_draw_target(Some(total as u64), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} sessions, {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for (n, (key, resolved)) in todo.into_iter().enumerate() {
        bar.set_message(key.to_string());
        let body =
            RestoreBody { rid: format!("rs-{}", uuid::Uuid::new_v4().simple()), to_seq: resolved.to_seq, to_ms, dry_run: opts.dry_run };
        let report = restore_one(&nc, &key, &body).await;
        let line = format!("[{}/{total}] {key}: {}", n + 1, describe(&report));
        super::progress_line(&bar, line);
        reports.push(report);
    }
    bar.finish_and_clear();
    reports.sort_by(|a, b| a.session.cmp(&b.session));
    if reports.is_empty() {
        eprintln!("no session of {tenant} changed after the point: nothing to restore");
    }
    for r in &reports {
        if opts.json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            println!("{}: {}", r.session, describe(r));
            for (ty, c) in &r.keys {
                println!("  {ty:<24} {:>7} set {:>7} deleted", c.set, c.deleted);
            }
        }
    }
    let bad: Vec<&str> = reports.iter().filter(|r| matches!(r.status, "refused" | "failed")).map(|r| r.session.as_str()).collect();
    anyhow::ensure!(bad.is_empty(), "not restored: {}", bad.join(", "));
    Ok(())
}

/// One line for a person.
fn describe(r: &Report) -> String {
    let point = r.to_seq.map(|s| format!(" to sequence {s}")).unwrap_or_default();
    let creds = match r.creds {
        CredsRestore::Unchanged => "creds unchanged",
        CredsRestore::Set => "creds set back",
        CredsRestore::Removed => "creds removed",
    };
    let (set, deleted) = r.keys.values().fold((0, 0), |(s, d), c| (s + c.set, d + c.deleted));
    match r.status {
        "restored" => format!("restored{point} at sequence {}: {creds}, {set} keys set, {deleted} deleted", r.seq.unwrap_or(0)),
        "would_restore" => format!("would restore{point} (dry run, nothing written): {creds}, {set} keys set, {deleted} deleted"),
        "already_there" => format!("already at that state{point}: nothing written"),
        "retried" => format!("restored{point} at sequence {} (by an earlier attempt)", r.seq.unwrap_or(0)),
        other => format!("{other}{point}: {} ({})", r.error.as_deref().unwrap_or(""), r.code.as_deref().unwrap_or("")),
    }
}

/// Sends `body` for `key` until the owner answers or the retry time is
/// over, with the same request id every time.
async fn restore_one(nc: &async_nats::Client, key: &SessionKey, body: &RestoreBody) -> Report {
    let started = Instant::now();
    let mut pause = Duration::from_millis(250);
    let base = Report { to_seq: Some(body.to_seq), to_ms: body.to_ms, ..Report::new(key, "failed") };
    loop {
        let error = match request_restore(nc, key, body, ATTEMPT).await {
            Ok(r) => {
                let status = match r.outcome {
                    RestoreOutcome::Restored => "restored",
                    RestoreOutcome::WouldRestore => "would_restore",
                    RestoreOutcome::AlreadyThere => "already_there",
                    RestoreOutcome::Retried => "retried",
                };
                return Report {
                    status,
                    from_seq: Some(r.from_seq),
                    seq: Some(r.seq),
                    creds: r.summary.creds,
                    keys: r.summary.keys,
                    ..base
                };
            }
            Err(e) => e,
        };
        if !error.retryable() || started.elapsed() + pause >= RETRY_FOR {
            let (status, code) = match &error {
                // A 4xx is the service refusing; anything else a failure.
                AdminError::Service { code, name, .. } if (400..500).contains(code) => ("refused", name.clone()),
                AdminError::Service { name, .. } => ("failed", name.clone()),
                AdminError::TimedOut => ("failed", "timeout".into()),
                AdminError::NoResponders => ("failed", "no_responders".into()),
                AdminError::Other(_) => ("failed", "internal".into()),
            };
            let message = match &error {
                AdminError::Service { message, .. } => message.clone(),
                other => other.to_string(),
            };
            return Report { status, code: Some(code), error: Some(message), ..base };
        }
        tracing::debug!(session = %key, error = %error, "restore not answered; asking again with the same request id");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
