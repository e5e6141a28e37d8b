//! `baileys-store import`: `useMultiFileAuthState` folders and Redis-direct
//! stores moved into the store through the service's own write path, so a
//! bot switches to `useNatsAuthState` without pairing again.
//!
//! A folder holding `creds.json` is one session; a parent of such folders
//! is a fleet (`--all`), each folder named as its session. A Redis-direct
//! store (`redis_layouts`) holds sessions as hashes or keys, each named by
//! its session. Each file, field or key is read as Baileys reads it and
//! stored as the Node client would store the object it gives
//! (`bufferjson`), byte for byte: every source goes through one
//! [`Collector`] and one import of what it collected. A session is written by a few
//! `keys.set` requests (one per key type, split within the service's
//! limits) and a last `creds.put` — creds last, so a session cut off half
//! way has no creds and is plainly incomplete. Every request id is derived
//! from the session and the files, so running the same import again writes
//! nothing new. A session that already has state is refused unless
//! `--force`, except when it holds exactly what the import would write
//! (then it is reported unchanged).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use bstore_api::client::{ClientError, KeyData, SessionClient};
use bstore_domain::{KeyId, KeyType, SessionId, SessionKey, TenantId};
use serde::Serialize;
use serde_bytes::ByteBuf;

use super::bufferjson;
use super::redis_layouts::{self, Found, Wanted};
use crate::Config;

/// Where the sessions are.
#[derive(Debug, Clone)]
pub enum Source {
    /// One session's folder.
    One { session: String, dir: PathBuf },
    /// A parent of session folders, each named as its session.
    All { parent: PathBuf },
    /// A Redis-direct store: one session of it, or all.
    Redis(Wanted),
}

/// A file, field or key left out, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Skipped {
    /// The file name, or the Redis field (hash layout) or record (keys
    /// layout, the part after the session's name).
    pub name: String,
    /// Why.
    pub reason: String,
}

/// What became of one session.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Session id.
    pub session: String,
    /// What was read: the folder, or the Redis hash or keys.
    pub from: String,
    /// `imported`, `unchanged` (it already held exactly this), `would-import`
    /// (dry run), `refused` (it has state; --force) or `failed`.
    pub status: &'static str,
    /// Why, when refused or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the source has creds.
    pub creds: bool,
    /// Keys read, by type.
    pub keys: BTreeMap<String, u64>,
    /// Bytes of the stored values.
    pub bytes: u64,
    /// Requests the import is made of.
    pub requests: u64,
    /// The session's sequence after the import.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Entries left out, and why.
    pub skipped: Vec<Skipped>,
}

/// One session's source, read and converted.
pub struct Folder {
    /// The session's creds in the stored form.
    pub creds: Option<Vec<u8>>,
    /// type → id → stored value.
    pub keys: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Entries left out.
    pub skipped: Vec<Skipped>,
    /// SHA-256 over every entry's name and content read, for request ids.
    pub digest: String,
}

/// Gathers one session's entries (files, Redis fields or keys), each
/// converted as Baileys would read it, into a [`Folder`]. Entries are given
/// in the order of their names: the first of two for one key is kept, and
/// the digest (hence the request ids) depends on what was read alone.
pub struct Collector {
    out: Folder,
    digest: ring::digest::Context,
    from_entry: BTreeMap<(String, String), String>,
    max_value_bytes: usize,
}

impl Collector {
    /// An empty session; values over `max_value_bytes` are skipped.
    pub fn new(max_value_bytes: usize) -> Self {
        Self {
            out: Folder { creds: None, keys: BTreeMap::new(), skipped: Vec::new(), digest: String::new() },
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            from_entry: BTreeMap::new(),
            max_value_bytes,
        }
    }

    /// Leaves an entry out, saying why.
    pub fn skip(&mut self, name: impl Into<String>, reason: impl Into<String>) {
        self.out.skipped.push(Skipped { name: name.into(), reason: reason.into() });
    }

    /// Adds the entry `name` holding `bytes`: the creds when `key` is
    /// `None`, else key `(type, id)`. Skipped with its reason when the store
    /// does not take the key, another entry gave it already, or the text is
    /// not one Baileys reads back.
    pub fn add(&mut self, name: &str, key: Option<(&str, String)>, bytes: &[u8]) {
        if let Some((ty, id)) = &key {
            if let Err(e) = KeyType::parse(ty).and(KeyId::parse(id)) {
                return self.skip(name, format!("not a key the store takes: {e}"));
            }
            if let Some(first) = self.from_entry.get(&((*ty).to_owned(), id.clone())) {
                let first = first.clone();
                return self.skip(name, format!("the same key as {first}"));
            }
        }
        let value = std::str::from_utf8(bytes)
            .map_err(|_| "not UTF-8 text".to_owned())
            .and_then(bufferjson::parse_file)
            .map(|v| bufferjson::to_msgpack(&v));
        let value = match value {
            Ok(v) if v.len() > self.max_value_bytes => {
                return self.skip(name, format!("the value is {} bytes, over the service's limit of {}", v.len(), self.max_value_bytes));
            }
            Ok(v) => v,
            Err(e) => return self.skip(name, format!("Baileys would not read it back: {e}")),
        };
        self.digest.update(name.as_bytes());
        self.digest.update(&[0]);
        self.digest.update(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        match key {
            None => self.out.creds = Some(value),
            Some((ty, id)) => {
                self.from_entry.insert((ty.to_owned(), id.clone()), name.to_owned());
                self.out.keys.entry(ty.to_owned()).or_default().insert(id, value);
            }
        }
    }

    /// The session as read.
    pub fn finish(mut self) -> Folder {
        self.out.digest = hex(self.digest.finish().as_ref());
        self.out
    }
}

/// Reads a `useMultiFileAuthState` folder. A file that does not read is
/// skipped with its reason; an unreadable folder is an error.
pub fn read_folder(dir: &Path, max_value_bytes: usize) -> anyhow::Result<Folder> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        names.push((entry.file_name(), entry.file_type()?.is_file()));
    }
    names.sort();
    let mut out = Collector::new(max_value_bytes);
    for (name, is_file) in names {
        let Some(name) = name.to_str().map(str::to_owned) else {
            out.skip(name.to_string_lossy(), "the name is not UTF-8");
            continue;
        };
        if !is_file {
            out.skip(name, "not a regular file");
            continue;
        }
        let key = if name == "creds.json" {
            None
        } else {
            match super::key_of_file(&name) {
                Some(key) => Some(key),
                None => {
                    out.skip(name, "not a file name useMultiFileAuthState writes for a known key type");
                    continue;
                }
            }
        };
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        out.add(&name, key, &bytes);
    }
    Ok(out.finish())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The folders to import, as (session, folder).
fn folders(source: &Source) -> anyhow::Result<Vec<(String, PathBuf)>> {
    match source {
        Source::One { session, dir } => {
            anyhow::ensure!(dir.is_dir(), "{} is not a folder", dir.display());
            anyhow::ensure!(
                dir.join("creds.json").is_file(),
                "{} holds no creds.json: not a useMultiFileAuthState folder (a parent of several? use --all)",
                dir.display()
            );
            Ok(vec![(session.clone(), dir.clone())])
        }
        Source::Redis(_) => unreachable!("a Redis store has no folders"),
        Source::All { parent } => {
            anyhow::ensure!(parent.is_dir(), "{} is not a folder", parent.display());
            anyhow::ensure!(
                !parent.join("creds.json").exists(),
                "{} is itself a session's folder (it holds creds.json): use --session",
                parent.display()
            );
            let mut out = Vec::new();
            for entry in std::fs::read_dir(parent).with_context(|| format!("reading {}", parent.display()))? {
                let entry = entry?;
                let dir = entry.path();
                if dir.is_dir() && dir.join("creds.json").is_file() {
                    let name = entry
                        .file_name()
                        .to_str()
                        .map(str::to_owned)
                        .with_context(|| format!("{}: the name is not UTF-8", dir.display()))?;
                    out.push((name, dir));
                }
            }
            out.sort();
            anyhow::ensure!(!out.is_empty(), "{} holds no folder with a creds.json", parent.display());
            Ok(out)
        }
    }
}

/// The requests of one session's import: `keys.set` batches, then the creds.
fn batches(folder: &Folder, max_ids: usize, max_bytes: usize) -> Vec<KeyData> {
    // Room for the envelope (op fields, rid) and each entry's framing.
    let budget = max_bytes.saturating_sub(1024).max(1);
    let mut out = Vec::new();
    for (ty, ids) in &folder.keys {
        let mut batch: BTreeMap<String, Option<ByteBuf>> = BTreeMap::new();
        let mut size = 0;
        for (id, value) in ids {
            let entry = id.len() + value.len() + 16;
            if !batch.is_empty() && (batch.len() >= max_ids || size + entry > budget) {
                out.push(KeyData::from([(ty.clone(), std::mem::take(&mut batch))]));
                size = 0;
            }
            size += entry;
            batch.insert(id.clone(), Some(ByteBuf::from(value.clone())));
        }
        if !batch.is_empty() {
            out.push(KeyData::from([(ty.clone(), batch)]));
        }
    }
    out
}

/// Whether the session already holds exactly what the folder holds.
async fn holds_exactly(
    client: &SessionClient,
    info: &bstore_domain::SessionInfo,
    folder: &Folder,
    max_ids: usize,
) -> Result<bool, ClientError> {
    let counts: BTreeMap<String, u64> = folder.keys.iter().map(|(ty, ids)| (ty.clone(), ids.len() as u64)).collect();
    let stored: BTreeMap<String, u64> = info.keys.iter().filter(|(_, n)| **n > 0).map(|(t, n)| (t.clone(), *n)).collect();
    if counts != stored || info.creds != folder.creds.is_some() {
        return Ok(false);
    }
    if client.creds_get().await? != folder.creds {
        return Ok(false);
    }
    for (ty, ids) in &folder.keys {
        let ids: Vec<&str> = ids.keys().map(String::as_str).collect();
        for chunk in ids.chunks(max_ids.clamp(1, 500)) {
            let got = client.keys_get(ty, chunk).await?;
            if chunk.iter().any(|id| got.get(*id) != folder.keys[ty].get(*id)) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Options of a run.
pub struct Options {
    /// Write nothing; say what would be written.
    pub dry_run: bool,
    /// Import into sessions that already have state.
    pub force: bool,
    /// One JSON object per session on stdout.
    pub json: bool,
}

/// Where one session is read from.
enum Target {
    Dir(PathBuf),
    Redis(Found),
}

/// Imports the sessions of `source` into `tenant`. Fails (after the whole
/// report) if any session was refused or failed.
pub async fn run(cfg: Config, tenant: TenantId, source: Source, opts: Options) -> anyhow::Result<()> {
    let mut store = None;
    let targets: Vec<(String, Target)> = match source {
        Source::Redis(wanted) => {
            let mut found = redis_layouts::discover(&wanted).await?;
            eprintln!(
                "{}: {} sessions, layout {}, key pattern '{}'",
                redis_layouts::redact(&wanted.url),
                found.sessions.len(),
                found.layout,
                found.pattern
            );
            let sessions = std::mem::take(&mut found.sessions);
            store = Some(found);
            sessions.into_iter().map(|f| (f.session.clone(), Target::Redis(f))).collect()
        }
        source => {
            let targets = folders(&source)?;
            for (session, _) in &targets {
                SessionId::parse(session).with_context(|| format!("folder {session:?} is not a session id (rename it)"))?;
            }
            targets.into_iter().map(|(s, d)| (s, Target::Dir(d))).collect()
        }
    };
    let nc = crate::connect_requester(&cfg).await?;
    let max_ids = cfg.limits.max_ids_per_call;
    // The service lowers its request limit to the server's max_payload (less room for headers).
    let max_bytes = cfg.limits.max_set_bytes.min(cfg.api.max_request_bytes).min(nc.server_info().max_payload.saturating_sub(8 << 10));
    let total = targets.len();
    // A bar on a terminal (over many sessions); a line per session either way.
    let bar = indicatif::ProgressBar::with_draw_target(Some(total as u64), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} sessions, {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut reports = Vec::new();
    for (n, (session, target)) in targets.into_iter().enumerate() {
        let key = SessionKey::parse(tenant.as_str(), &session)?;
        bar.set_message(key.to_string());
        let max_value = cfg.limits.max_value_bytes;
        let (from, read) = match (target, store.as_mut()) {
            (Target::Dir(dir), _) => (dir.display().to_string(), read_folder(&dir, max_value)),
            (Target::Redis(found), Some(store)) => {
                let mut into = Collector::new(max_value);
                let read = store.read(&found, &mut into).await.map(|()| into.finish());
                (found.describe(store.layout), read)
            }
            (Target::Redis(_), None) => unreachable!("Redis sessions come with their store"),
        };
        let report = import_one(&nc, &cfg, &key, from, read, &opts, max_ids, max_bytes).await;
        let keys: u64 = report.keys.values().sum();
        let line = format!(
            "[{}/{total}] {key}: {} — {keys} keys{}, {} B, {} requests{}{}",
            n + 1,
            report.status,
            if report.creds { " and creds" } else { "" },
            report.bytes,
            report.requests,
            if report.skipped.is_empty() { String::new() } else { format!(", {} skipped", report.skipped.len()) },
            report.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default(),
        );
        super::progress_line(&bar, line);
        reports.push(report);
    }
    bar.finish_and_clear();
    for r in &reports {
        if opts.json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            println!("{} ({}): {}", r.session, r.from, r.status);
            for (ty, n) in &r.keys {
                println!("  {ty:<24} {n:>7}");
            }
            println!(
                "  creds: {}; {} B in {} requests{}",
                if r.creds { "yes" } else { "no" },
                r.bytes,
                r.requests,
                r.seq.map(|s| format!("; at sequence {s}")).unwrap_or_default()
            );
            for s in &r.skipped {
                println!("  skipped {}: {}", s.name, s.reason);
            }
            if let Some(e) = &r.error {
                println!("  {e}");
            }
        }
    }
    let bad: Vec<&str> = reports.iter().filter(|r| matches!(r.status, "refused" | "failed")).map(|r| r.session.as_str()).collect();
    anyhow::ensure!(bad.is_empty(), "not imported: {}", bad.join(", "));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn import_one(
    nc: &async_nats::Client,
    cfg: &Config,
    key: &SessionKey,
    from: String,
    read: anyhow::Result<Folder>,
    opts: &Options,
    max_ids: usize,
    max_bytes: usize,
) -> Report {
    let mut report = Report {
        session: key.session.to_string(),
        from,
        status: "failed",
        error: None,
        creds: false,
        keys: BTreeMap::new(),
        bytes: 0,
        requests: 0,
        seq: None,
        skipped: Vec::new(),
    };
    let folder = match read {
        Ok(f) => f,
        Err(e) => {
            report.error = Some(format!("{e:#}"));
            return report;
        }
    };
    report.creds = folder.creds.is_some();
    report.keys = folder.keys.iter().map(|(ty, ids)| (ty.clone(), ids.len() as u64)).collect();
    report.bytes = folder.creds.as_ref().map_or(0, |c| c.len() as u64)
        + folder.keys.values().flat_map(|ids| ids.values()).map(|v| v.len() as u64).sum::<u64>();
    report.skipped = folder.skipped.clone();
    let Some(creds) = &folder.creds else {
        report.error = Some("the creds do not read (see skipped): nothing imported".into());
        return report;
    };
    let batches = batches(&folder, max_ids, max_bytes);
    report.requests = batches.len() as u64 + 1;
    let client = SessionClient::new(nc.clone(), &cfg.api.prefix, key.tenant.as_str(), key.session.as_str())
        .with_timeout(std::time::Duration::from_secs(30));
    let outcome: Result<(), ClientError> = async {
        let info = client.info().await?;
        if info.exists && !opts.force {
            if holds_exactly(&client, &info, &folder, max_ids).await? {
                report.status = "unchanged";
                report.seq = Some(info.seq);
            } else {
                report.status = "refused";
                report.error = Some(format!("the session already has state (sequence {}); --force imports over it", info.seq));
            }
            return Ok(());
        }
        if opts.dry_run {
            report.status = "would-import";
            return Ok(());
        }
        // Request ids: the session, the files, the request's place.
        let base = {
            let d = ring::digest::digest(&ring::digest::SHA256, format!("{key}\0{}", folder.digest).as_bytes());
            format!("imp-{}", &hex(d.as_ref())[..32])
        };
        let mut seq = 0;
        for (i, data) in batches.iter().enumerate() {
            let rid = format!("{base}-{i}");
            seq = patiently(|| client.keys_set(&rid, data)).await?;
        }
        let rid = format!("{base}-c");
        seq = seq.max(patiently(|| client.creds_put(&rid, creds)).await?);
        report.seq = Some(seq);
        report.status = "imported";
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        report.status = "failed";
        report.error =
            Some(format!("{e}; if part of it was written (the creds go last), run the same import again with --force to finish it"));
    }
    report
}

/// How long one write of an import is sent again while the service cannot
/// take it: a failover takes 5-7 s, a running bot's writer claim a lease.
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Sends a write until it is answered or fails for good
/// ([`ClientError::retryable`]), for up to [`RETRY_FOR`], pausing 250 ms to
/// 2 s between attempts. The request id stays the same, so a write that
/// landed unanswered is not applied twice.
async fn patiently<T, F, Fut>(mut send: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(250);
    loop {
        match send().await {
            Err(e) if e.retryable() && started.elapsed() + pause < RETRY_FOR => {
                tracing::debug!(error = %e, "import: the service cannot take the write yet; sending it again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            other => return other,
        }
    }
}
