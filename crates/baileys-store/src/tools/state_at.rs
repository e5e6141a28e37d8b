//! `baileys-store state-at`: a session as it stood at a past sequence or
//! moment, read from the audit log — what a bot's store held then, key by
//! key, and which event last changed each. Values are left out unless asked
//! for: the listing is for finding out what happened, not for copying
//! secrets around.

use std::collections::BTreeMap;

use anyhow::Context as _;
use base64::Engine as _;
use bstore_domain::{Change, SessionKey, SessionState};
use bstore_log::EventLog;

use crate::Config;

/// Where in a session's history to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// After the event at this stream sequence (and every one before it).
    Seq(u64),
    /// After every event decided at or before this time (ms since the Unix
    /// epoch).
    TimeMs(u64),
}

impl Point {
    fn includes(self, seq: u64, at_ms: u64) -> bool {
        match self {
            Self::Seq(n) => seq <= n,
            Self::TimeMs(t) => at_ms <= t,
        }
    }
}

/// One key (or the creds) as it stood: its size, a SHA-256 of its value,
/// and the sequence of the event that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// Key type; `None` for the creds.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub ty: Option<String>,
    /// Key id; `None` for the creds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Bytes of the value.
    pub bytes: usize,
    /// SHA-256 of the value, hex.
    pub sha256: String,
    /// The event that last wrote it.
    pub changed_at_seq: u64,
    /// The value, base64, only with `--values`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A session at a point of its history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StateAt {
    /// The sequence of the last event included (0: none).
    pub seq: u64,
    /// When that event was decided (ms since the Unix epoch).
    pub at_ms: Option<u64>,
    /// Events included since the session was last deleted (or created).
    pub events: u64,
    /// The creds, if the session had them.
    pub creds: Option<Entry>,
    /// Every key, by type then id.
    pub keys: Vec<Entry>,
}

/// Replays `key`'s events up to `point` and describes the state then.
/// Refused events (not where they were written) are passed over as every
/// reader does.
///
/// With an audit retention, the history starts at the session's base
/// snapshot: a point before it cannot be shown, and keys the base holds
/// name the base's sequence as the last change known.
pub async fn read(log: &EventLog, key: &SessionKey, point: Point, values: bool) -> anyhow::Result<StateAt> {
    let mut state: SessionState = log.start_state(key).await.with_context(|| format!("reading the start of {key}'s history"))?;
    let base = state.seq();
    if base > 0 && !point.includes(base, state.updated_at_ms().unwrap_or(0)) {
        anyhow::bail!("the audit retention dropped {key}'s history through sequence {base}: no earlier point can be shown");
    }
    let mut changed: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut creds_seq = 0;
    let mut failed = None;
    log.replay(key, 0, |seq, event| {
        if failed.is_some() || !point.includes(seq, event.at_ms) {
            return;
        }
        if let Err(e) = state.apply(seq, &event) {
            failed = Some(e);
            return;
        }
        match &event.change {
            Change::CredsPut { .. } => creds_seq = seq,
            Change::KeysChanged { .. } | Change::Restored { .. } => {
                if event.touches_creds() {
                    creds_seq = seq;
                }
                for (ty, id) in event.touched_keys() {
                    changed.insert((ty.to_string(), id.to_string()), seq);
                }
            }
            Change::SessionDeleted => {
                changed.clear();
                creds_seq = 0;
            }
        }
    })
    .await
    .with_context(|| format!("replaying {key}"))?;
    if let Some(e) = failed {
        anyhow::bail!("the log of {key} does not replay: {e}");
    }
    let entry = |ty: Option<String>, id: Option<String>, v: &[u8], seq: u64| Entry {
        ty,
        id,
        bytes: v.len(),
        sha256: hex(ring::digest::digest(&ring::digest::SHA256, v).as_ref()),
        changed_at_seq: seq,
        value: values.then(|| base64::engine::general_purpose::STANDARD.encode(v)),
    };
    let keys = state
        .iter_keys()
        .map(|(ty, id, v)| {
            let seq = changed.get(&(ty.to_string(), id.to_string())).copied().unwrap_or(base);
            entry(Some(ty.to_string()), Some(id.to_string()), v, seq)
        })
        .collect();
    Ok(StateAt {
        seq: state.seq(),
        at_ms: state.updated_at_ms(),
        events: state.events(),
        creds: state.creds().map(|c| entry(None, None, c, if creds_seq == 0 { base } else { creds_seq })),
        keys,
    })
}

/// The command: prints the state as a table, or as one JSON object.
pub async fn run(cfg: Config, key: SessionKey, point: Point, values: bool, json: bool) -> anyhow::Result<()> {
    let (client, codec) = crate::connect_tool(&cfg).await?;
    let log = EventLog::open(client, cfg.stream.clone(), codec).await?;
    let at = read(&log, &key, point, values).await?;
    if json {
        println!("{}", serde_json::to_string(&at)?);
        return Ok(());
    }
    println!("{key} at sequence {} ({} events; last at {} ms)", at.seq, at.events, at.at_ms.map_or("-".into(), |t| t.to_string()));
    let show = |name: String, e: &Entry| {
        let value = e.value.as_deref().map(|v| format!("  {v}")).unwrap_or_default();
        println!("{name:<48} {:>8} B  sha256 {}  changed at {}{value}", e.bytes, &e.sha256[..16], e.changed_at_seq);
    };
    match &at.creds {
        Some(c) => show("creds".into(), c),
        None => println!("creds: none"),
    }
    for e in &at.keys {
        show(format!("{}/{}", e.ty.as_deref().unwrap_or_default(), e.id.as_deref().unwrap_or_default()), e);
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a session changed between two points of its history, key by key
/// (by their digests: no value is shown).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Diff {
    /// The earlier point's sequence.
    pub from_seq: u64,
    /// The later point's sequence.
    pub to_seq: u64,
    /// `type/id` (or `creds`) present later only.
    pub added: Vec<String>,
    /// Present earlier only.
    pub removed: Vec<String>,
    /// Present at both with another value.
    pub changed: Vec<String>,
}

/// Compares two states read by [`read`].
pub fn diff(from: &StateAt, to: &StateAt) -> Diff {
    let index = |at: &StateAt| -> BTreeMap<String, String> {
        let keys = at
            .keys
            .iter()
            .map(|e| (format!("{}/{}", e.ty.as_deref().unwrap_or_default(), e.id.as_deref().unwrap_or_default()), e.sha256.clone()));
        at.creds.iter().map(|c| ("creds".to_owned(), c.sha256.clone())).chain(keys).collect()
    };
    let (a, b) = (index(from), index(to));
    let mut out = Diff { from_seq: from.seq, to_seq: to.seq, ..Default::default() };
    for (name, digest) in &b {
        match a.get(name) {
            None => out.added.push(name.clone()),
            Some(old) if old != digest => out.changed.push(name.clone()),
            Some(_) => {}
        }
    }
    out.removed = a.keys().filter(|name| !b.contains_key(*name)).cloned().collect();
    out
}

/// The `diff` command: prints what changed between two points, as lines or
/// as one JSON object.
pub async fn run_diff(cfg: Config, key: SessionKey, from: Point, to: Point, json: bool) -> anyhow::Result<()> {
    let (client, codec) = crate::connect_tool(&cfg).await?;
    let log = EventLog::open(client, cfg.stream.clone(), codec).await?;
    let d = diff(&read(&log, &key, from, false).await?, &read(&log, &key, to, false).await?);
    if json {
        println!("{}", serde_json::to_string(&d)?);
        return Ok(());
    }
    println!(
        "{key} from sequence {} to {}: {} added, {} removed, {} changed",
        d.from_seq,
        d.to_seq,
        d.added.len(),
        d.removed.len(),
        d.changed.len()
    );
    for (sign, names) in [("+", &d.added), ("-", &d.removed), ("~", &d.changed)] {
        for name in names {
            println!("{sign} {name}");
        }
    }
    Ok(())
}
