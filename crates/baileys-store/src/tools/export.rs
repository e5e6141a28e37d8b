//! `baileys-store export`: sessions written out as `useMultiFileAuthState`
//! folders, or as the Redis hashes of baileys-redis-auth and Evolution API
//! (`redis_layouts`), read from the log (no service needed), so nobody is
//! locked in.
//!
//! Each value becomes the text Baileys would have written for it
//! (`bufferjson`), under the file or field name Baileys' stores give it.
//! Every entry of every session is converted before anything is written,
//! and nothing is overwritten without `--force`: a failed export leaves no
//! folder or hash half written by it (a hash is replaced whole, in one
//! transaction).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use async_nats::jetstream;
use bstore_domain::{SessionKey, TenantId};
use bstore_log::EventLog;
use serde::Serialize;

use super::bufferjson;
use super::redis_layouts::{self, Pattern};
use crate::Config;

/// Where sessions go.
#[derive(Debug, Clone)]
pub enum Target {
    /// `<parent>/<session>/`, `useMultiFileAuthState` folders.
    Folders(PathBuf),
    /// One hash per session at the pattern's name, in the Redis at `url`.
    RedisHash {
        /// `redis://host:port/db`.
        url: String,
        /// The hash's name, `{session}` in it.
        pattern: Pattern,
        /// Ids in field names escaped as in file names (baileys-redis-auth
        /// 2.x), or as they are (Evolution API, baileys-redis-auth 1.x).
        escaped: bool,
    },
}

/// What was written of one session.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Session id.
    pub session: String,
    /// The folder, or the Redis hash.
    pub to: String,
    /// The sequence of the state exported.
    pub seq: u64,
    /// Whether `creds.json` was written.
    pub creds: bool,
    /// Keys written, by type.
    pub keys: BTreeMap<String, u64>,
    /// Bytes of the values written.
    pub bytes: u64,
}

/// One session's files (or fields), converted.
struct Folder {
    report: Report,
    dir: PathBuf,
    files: Vec<(String, String)>,
}

/// Exports `only` (one session) or every session of `tenant` to `target`.
pub async fn run(cfg: Config, tenant: TenantId, only: Option<SessionKey>, target: Target, force: bool, json: bool) -> anyhow::Result<()> {
    let (client, codec) = crate::connect_tool(&cfg).await?;
    let js = jetstream::new(client.clone());
    let log = EventLog::attach(js.clone(), cfg.stream.clone(), codec);
    let targets = match only {
        Some(key) => vec![key],
        None => super::erase::sessions_of(&log, &tenant).await?,
    };
    let mut folders = Vec::new();
    for key in &targets {
        let (state, _) = bstore_session::load::from_snapshots(&log, key).await.with_context(|| format!("reading {key}"))?;
        if !state.exists() {
            eprintln!("{key}: empty, not exported");
            continue;
        }
        folders.push(convert(key, &state, &target)?);
    }
    anyhow::ensure!(!folders.is_empty(), "tenant {tenant}: no session with state to export");
    match &target {
        Target::Folders(_) => {
            if !force {
                for f in &folders {
                    for (name, _) in &f.files {
                        let path = f.dir.join(name);
                        anyhow::ensure!(!path.exists(), "{} exists (--force overwrites)", path.display());
                    }
                }
            }
            for f in &folders {
                write_folder(&f.dir, &f.files)?;
            }
        }
        Target::RedisHash { url, .. } => {
            let hashes: Vec<(String, Vec<(String, String)>)> =
                folders.iter_mut().map(|f| (f.report.to.clone(), std::mem::take(&mut f.files))).collect();
            redis_layouts::write_hashes(url, &hashes, force).await?;
        }
    }
    for f in &folders {
        let r = &f.report;
        if json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            let keys: u64 = r.keys.values().sum();
            eprintln!(
                "{}/{}: {} keys{} ({} B) at sequence {} -> {}",
                tenant,
                r.session,
                keys,
                if r.creds { " and creds" } else { "" },
                r.bytes,
                r.seq,
                r.to
            );
        }
    }
    Ok(())
}

fn convert(key: &SessionKey, state: &bstore_domain::SessionState, target: &Target) -> anyhow::Result<Folder> {
    let (dir, to) = match target {
        Target::Folders(out) => {
            let dir = out.join(key.session.as_str());
            let to = dir.display().to_string();
            (dir, to)
        }
        Target::RedisHash { pattern, .. } => (PathBuf::new(), pattern.name(key.session.as_str())),
    };
    let what = if matches!(target, Target::Folders(_)) { "file name" } else { "field name" };
    let mut files = Vec::new();
    let mut report = Report { session: key.session.to_string(), to, seq: state.seq(), creds: false, keys: BTreeMap::new(), bytes: 0 };
    if let Some(creds) = state.creds() {
        let v =
            bufferjson::from_msgpack(creds).map_err(|e| anyhow::anyhow!("{key}: the creds are not a value the Node client wrote: {e}"))?;
        let name = if matches!(target, Target::Folders(_)) { "creds.json" } else { "creds" };
        files.push((name.to_owned(), bufferjson::to_file(&v)));
        report.creds = true;
    }
    for (ty, id, value) in state.iter_keys() {
        let v =
            bufferjson::from_msgpack(value).map_err(|e| anyhow::anyhow!("{key}: {ty} {id} is not a value the Node client wrote: {e}"))?;
        let name = match target {
            Target::Folders(_) => {
                let name = super::file_name(ty.as_str(), id.as_str());
                // A file system takes names of up to 255 bytes; found here, before anything is written.
                anyhow::ensure!(name.len() <= 255, "{key}: {ty} {id} makes a file name longer than 255 bytes, which no file system takes");
                name
            }
            Target::RedisHash { escaped, .. } => super::field_name(ty.as_str(), id.as_str(), *escaped),
        };
        files.push((name, bufferjson::to_file(&v)));
        *report.keys.entry(ty.to_string()).or_default() += 1;
    }
    // Baileys' escaping can give two ids one name (`a/b` and `a__b`): refused rather than one lost.
    let mut names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        anyhow::bail!("{key}: two keys make the same {what} {}", w[0]);
    }
    report.bytes = files.iter().map(|(_, t)| t.len() as u64).sum();
    Ok(Folder { report, dir, files })
}

/// Writes each file through a temporary name and a rename, so a file is
/// either the old one or the new one whole.
fn write_folder(dir: &Path, files: &[(String, String)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in files {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.export-tmp"));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
