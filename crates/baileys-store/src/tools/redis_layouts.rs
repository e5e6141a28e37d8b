//! The Redis-direct auth stores bot operators use today, read for `import
//! --from-redis` and written for `export --to-redis`.
//!
//! Two layouts are in use, both with Baileys' own field names (`creds`, and
//! `<type>-<id>` as `useMultiFileAuthState` names its files, without
//! `.json`) and each value the text `JSON.stringify(value,
//! BufferJSON.replacer)` gives, the very text a `useMultiFileAuthState` file
//! holds:
//!
//! - **hash**: one hash per session, one field per record.
//!   baileys-redis-auth's `useRedisAuthStateWithHSet` (hbinduni/baileys-redis-auth,
//!   `src/index.ts`) names it `<session>:auth` since 2.0 and escapes ids
//!   with `fixFileName` (`/` → `__`, `:` → `-`); its 1.0 releases named it
//!   `authState:<session>` with ids as they are. Evolution API
//!   (EvolutionAPI/evolution-api, `src/utils/use-multi-file-auth-state-redis-db.ts`
//!   over `src/cache/rediscache.ts`) names it
//!   `<CACHE_REDIS_PREFIX_KEY>:instance:<instance id>` (v2; v1 had
//!   `<PREFIX_KEY>:<instance name>`), ids as they are.
//! - **keys**: one string key per record, `<session>:creds` and
//!   `<session>:<type>-<id>`: baileys-redis-auth's `useRedisAuthState`
//!   (same file; ids escaped since 2.0); `@baileys/redis-auth-state`
//!   (fatomate/baileys-redis-auth, `src/redis-auth-state.ts`) puts
//!   `baileys:session:` before the session and writes Buffers as arrays of
//!   bytes, a form Baileys' reviver reads too.
//!
//! Where the session sits in a name is a pattern with `{session}` as one
//! whole `:`-separated segment (`{session}:auth`,
//! `evolution-cache:instance:{session}`); session ids never hold `:`. Given
//! none, it is found from the names: a hash with a `creds` field, or a
//! string key ending in `:creds`, is a session; its session is the segment
//! before `:auth` when the name ends so, else the last segment. Escaped and
//! plain ids read back alike (`super::key_of_file`), since the ids that
//! escaping changes hold no `__` or `--` of their own.
//!
//! Everything is found with SCAN (never KEYS) and read a session at a
//! time: what is held between sessions is their names (and, in the keys
//! layout, the names of their records, not the values). A failed Redis call
//! is an error, never taken for an absent record.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use bstore_domain::SessionId;
use bstore_redis::redis::{self, aio::MultiplexedConnection};

use super::import::Collector;

/// How the records of a session are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Layout {
    /// Found from what is in Redis.
    Auto,
    /// One hash per session, a field per record.
    Hash,
    /// One string key per record, `<name>:<field>`.
    Keys,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Auto => "auto",
            Layout::Hash => "hash",
            Layout::Keys => "keys",
        })
    }
}

/// A name with `{session}` in it: `<prefix>{session}<suffix>`, the session
/// a whole `:`-separated segment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pattern {
    prefix: String,
    suffix: String,
}

/// The placeholder a pattern holds once.
const SESSION: &str = "{session}";

impl Pattern {
    /// Reads a pattern: `{session}` once, as a whole segment.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let (prefix, suffix) = text.split_once(SESSION).with_context(|| format!("key pattern {text:?} holds no {SESSION}"))?;
        anyhow::ensure!(!suffix.contains(SESSION), "key pattern {text:?} holds {SESSION} more than once");
        anyhow::ensure!(
            (prefix.is_empty() || prefix.ends_with(':')) && (suffix.is_empty() || suffix.starts_with(':')),
            "key pattern {text:?}: {SESSION} must be a whole `:`-separated part of the name"
        );
        Ok(Self { prefix: prefix.to_owned(), suffix: suffix.to_owned() })
    }

    /// The name `session` has.
    pub fn name(&self, session: &str) -> String {
        format!("{}{session}{}", self.prefix, self.suffix)
    }

    /// The session a name stands for, if it is one of this pattern's.
    pub fn session_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        let s = name.strip_prefix(&self.prefix)?.strip_suffix(&self.suffix)?;
        (!s.is_empty() && !s.contains(':')).then_some(s)
    }

    /// A SCAN `MATCH` for every name of the pattern, `tail` appended.
    fn glob(&self, tail: &str) -> String {
        format!("{}*{}{}", glob_escape(&self.prefix), glob_escape(&self.suffix), glob_escape(tail))
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{SESSION}{}", self.prefix, self.suffix)
    }
}

/// `text` matched literally by a Redis glob.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The pattern and session a name found in Redis stands for, when no
/// pattern is given: the segment before a last `:auth`, else the last one.
fn guess(name: &str) -> Option<(Pattern, &str)> {
    let (body, suffix) = match name.strip_suffix(":auth") {
        Some(body) => (body, ":auth"),
        None => (name, ""),
    };
    let (prefix, session) = match body.rfind(':') {
        Some(i) => (&body[..=i], &body[i + 1..]),
        None => ("", body),
    };
    (!session.is_empty()).then(|| (Pattern { prefix: prefix.to_owned(), suffix: suffix.to_owned() }, session))
}

/// What to import from Redis.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// `redis://host:port/db` (or `rediss://`).
    pub url: String,
    /// The layout, or `Auto`.
    pub layout: Layout,
    /// Where the session sits in a name; found when not given.
    pub pattern: Option<String>,
    /// One session; every one found when not given.
    pub session: Option<String>,
}

/// One session found in Redis.
#[derive(Debug)]
pub struct Found {
    /// Its session id.
    pub session: String,
    /// Its hash, or (keys layout) the name its records' keys start with.
    pub name: String,
    /// Keys layout: its records' keys, sorted.
    records: Vec<String>,
}

impl Found {
    /// How a report names where the session came from.
    pub fn describe(&self, layout: Layout) -> String {
        match layout {
            Layout::Keys => format!("redis keys {}:*", self.name),
            _ => format!("redis hash {}", self.name),
        }
    }
}

/// The sessions of one store in Redis.
pub struct Store {
    conn: MultiplexedConnection,
    /// The layout found or given (never `Auto`).
    pub layout: Layout,
    /// The pattern found or given.
    pub pattern: Pattern,
    /// The sessions, by session id.
    pub sessions: Vec<Found>,
}

/// A connection to `url`, with timeouts for a tool (a slow Redis is waited
/// for; one that does not answer is an error).
pub async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url).with_context(|| format!("redis url {url:?}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client.get_multiplexed_async_connection_with_config(&config).await.with_context(|| format!("connecting to {}", redact(url)))
}

/// `url` without a password in it, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// One page of `SCAN cursor MATCH m COUNT 1000 [TYPE t]`.
async fn scan_page(conn: &mut MultiplexedConnection, cursor: u64, m: &str, ty: Option<&str>) -> anyhow::Result<(u64, Vec<Vec<u8>>)> {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor).arg("MATCH").arg(m).arg("COUNT").arg(1000);
    if let Some(ty) = ty {
        cmd.arg("TYPE").arg(ty);
    }
    cmd.query_async(conn).await.context("SCAN")
}

/// Finds the sessions `wanted` names: the layout and pattern when not
/// given, then every session (or the one asked for). Fails when there is
/// none, or when more than one store would fit (naming each).
pub async fn discover(wanted: &Wanted) -> anyhow::Result<Store> {
    let mut conn = connect(&wanted.url).await?;
    let given = wanted.pattern.as_deref().map(Pattern::parse).transpose()?;
    if let Some(s) = &wanted.session {
        SessionId::parse(s).with_context(|| format!("{s:?} is not a session id"))?;
    }
    // (layout, pattern) → session → name
    let mut groups: BTreeMap<(Layout, Pattern), BTreeMap<String, String>> = BTreeMap::new();
    let mut unnamed = 0u64;
    let mut accept = |layout: Layout, name: &str, groups: &mut BTreeMap<(Layout, Pattern), BTreeMap<String, String>>| {
        let found = match &given {
            Some(p) => p.session_of(name).map(|s| (p.clone(), s)),
            None => guess(name),
        };
        match found {
            Some((pattern, session)) if SessionId::parse(session).is_ok() => {
                if wanted.session.as_deref().is_none_or(|w| w == session) {
                    groups.entry((layout, pattern)).or_default().insert(session.to_owned(), name.to_owned());
                }
            }
            _ => unnamed += 1,
        }
    };
    let layouts: &[Layout] = match wanted.layout {
        Layout::Auto => &[Layout::Hash, Layout::Keys],
        Layout::Hash => &[Layout::Hash],
        Layout::Keys => &[Layout::Keys],
    };
    for &layout in layouts {
        // One session asked for under a given pattern: its one name, no scan.
        if let (Some(p), Some(s)) = (&given, &wanted.session) {
            let name = p.name(s);
            let probe = if layout == Layout::Hash { name.clone() } else { format!("{name}:creds") };
            let ty: String = redis::cmd("TYPE").arg(&probe).query_async(&mut conn).await.with_context(|| format!("TYPE {probe}"))?;
            let there = match layout {
                Layout::Hash if ty == "hash" => {
                    redis::cmd("HEXISTS").arg(&name).arg("creds").query_async(&mut conn).await.with_context(|| format!("HEXISTS {name}"))?
                }
                Layout::Hash => false,
                _ => ty == "string",
            };
            if there {
                accept(layout, &name, &mut groups);
            }
            continue;
        }
        let (m, ty) = match (&given, layout) {
            (Some(p), Layout::Hash) => (p.glob(""), "hash"),
            (Some(p), _) => (p.glob(":creds"), "string"),
            (None, Layout::Hash) => ("*".to_owned(), "hash"),
            (None, _) => ("*:creds".to_owned(), "string"),
        };
        let mut cursor = 0;
        loop {
            let (next, names) = scan_page(&mut conn, cursor, &m, Some(ty)).await?;
            let names: Vec<String> = names.into_iter().filter_map(|n| String::from_utf8(n).ok()).collect();
            match layout {
                Layout::Hash => {
                    // Only hashes with creds are sessions (the service's own projection is not:
                    // its names give no session id).
                    let mut pipe = redis::pipe();
                    for n in &names {
                        pipe.cmd("HEXISTS").arg(n).arg("creds");
                    }
                    let has: Vec<bool> =
                        if names.is_empty() { Vec::new() } else { pipe.query_async(&mut conn).await.context("HEXISTS")? };
                    for (n, has) in names.iter().zip(has) {
                        if has {
                            accept(layout, n, &mut groups);
                        }
                    }
                }
                _ => {
                    for n in &names {
                        if let Some(base) = n.strip_suffix(":creds") {
                            accept(layout, base, &mut groups);
                        }
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    let what = || {
        let mut w = format!("{} (layout {}", redact(&wanted.url), wanted.layout);
        if let Some(p) = &wanted.pattern {
            w.push_str(&format!(", key pattern {p}"));
        }
        if let Some(s) = &wanted.session {
            w.push_str(&format!(", session {s}"));
        }
        w + ")"
    };
    if groups.len() > 1 {
        let list: Vec<String> =
            groups.iter().map(|((l, p), s)| format!("--layout {l} --key-pattern '{p}' ({} sessions)", s.len())).collect();
        anyhow::bail!("{}: more than one store fits; name one: {}", what(), list.join(", "));
    }
    let Some(((layout, pattern), sessions)) = groups.into_iter().next() else {
        let note = if unnamed > 0 {
            format!(" ({unnamed} names with creds give no session id: --key-pattern names where it is)")
        } else {
            String::new()
        };
        anyhow::bail!("{}: no Baileys auth state found (no hash with a creds field, no key ending in :creds){note}", what());
    };
    let mut sessions: Vec<Found> = sessions.into_iter().map(|(session, name)| Found { session, name, records: Vec::new() }).collect();
    if layout == Layout::Keys {
        list_records(&mut conn, &pattern, &mut sessions).await?;
    }
    Ok(Store { conn, layout, pattern, sessions })
}

/// The keys layout: the records of each session (`<name>:<field>`, creds
/// included), by one SCAN over the pattern's names (or, for one session,
/// over its own).
async fn list_records(conn: &mut MultiplexedConnection, pattern: &Pattern, sessions: &mut [Found]) -> anyhow::Result<()> {
    let index: BTreeMap<String, usize> = sessions.iter().enumerate().map(|(i, f)| (f.name.clone(), i)).collect();
    let m = match sessions {
        [one] => format!("{}:*", glob_escape(&one.name)),
        _ => pattern.glob(":*"),
    };
    let mut cursor = 0;
    loop {
        // Every type: a record that is not a string is reported, not passed over.
        let (next, names) = scan_page(conn, cursor, &m, None).await?;
        for n in names.into_iter().filter_map(|n| String::from_utf8(n).ok()) {
            // `<name>:<field>`, the name's session one segment: the first `:` after the prefix ends it.
            let Some(rest) = n.strip_prefix(&pattern.prefix) else { continue };
            let Some(colon) = rest.find(':') else { continue };
            let Some(field) = rest[colon..].strip_prefix(&pattern.suffix).and_then(|t| t.strip_prefix(':')) else { continue };
            let base = &n[..n.len() - field.len() - 1];
            if let Some(&i) = index.get(base) {
                sessions[i].records.push(n.clone());
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    for f in sessions {
        f.records.sort();
        f.records.dedup();
    }
    Ok(())
}

impl Store {
    /// Reads one session's records into `into`, in the order of their
    /// names. A field or key that is not Baileys' is skipped with its
    /// reason; a failed call is an error.
    pub async fn read(&mut self, found: &Found, into: &mut Collector) -> anyhow::Result<()> {
        let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        match self.layout {
            Layout::Keys => {
                let prefix = found.name.len() + 1;
                for chunk in found.records.chunks(500) {
                    let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                        .arg(chunk)
                        .query_async(&mut self.conn)
                        .await
                        .with_context(|| format!("MGET {}:…", found.name))?;
                    for (name, value) in chunk.iter().zip(values) {
                        let field = name[prefix..].to_owned();
                        match value {
                            Some(v) => {
                                entries.insert(field, v);
                            }
                            None => into.skip(field, "no longer a string key when read: it went or changed while the store was read (is a bot still running on it?)"),
                        }
                    }
                }
            }
            _ => {
                let mut cursor = 0u64;
                loop {
                    let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("HSCAN")
                        .arg(&found.name)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut self.conn)
                        .await
                        .with_context(|| format!("HSCAN {}", found.name))?;
                    let mut it = page.into_iter();
                    while let (Some(field), Some(value)) = (it.next(), it.next()) {
                        match String::from_utf8(field) {
                            Ok(f) => {
                                entries.insert(f, value);
                            }
                            Err(e) => into.skip(String::from_utf8_lossy(e.as_bytes()).into_owned(), "the name is not UTF-8"),
                        }
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        for (field, value) in entries {
            let key = if field == "creds" {
                None
            } else {
                match super::key_of_field(&field) {
                    Some((ty, id)) => Some((ty, id)),
                    None => {
                        into.skip(field, "not a field name Baileys' Redis stores write for a known key type");
                        continue;
                    }
                }
            };
            into.add(&field, key, &value);
        }
        Ok(())
    }
}

/// Writes hashes for `export --to-redis`: each `(name, fields)` replaces
/// the hash of that name whole, in one MULTI/EXEC (no reader sees half of
/// one, and no field of an older hash stays). Unless `force`, refused
/// before anything is written when any of them exists.
pub async fn write_hashes(url: &str, hashes: &[(String, Vec<(String, String)>)], force: bool) -> anyhow::Result<()> {
    let mut conn = connect(url).await?;
    if !force {
        for (name, _) in hashes {
            let n: u64 = redis::cmd("EXISTS").arg(name).query_async(&mut conn).await.with_context(|| format!("EXISTS {name}"))?;
            anyhow::ensure!(n == 0, "{name} exists in {} (--force replaces it)", redact(url));
        }
    }
    for (name, fields) in hashes {
        let mut pipe = redis::pipe();
        pipe.atomic().del(name).ignore();
        for chunk in fields.chunks(1000) {
            pipe.hset_multiple(name, chunk).ignore();
        }
        let () = pipe.query_async(&mut conn).await.with_context(|| format!("writing {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_find_the_session_in_a_name() {
        let p = Pattern::parse("{session}:auth").unwrap();
        assert_eq!(p.name("bot-1"), "bot-1:auth");
        assert_eq!(p.session_of("bot-1:auth"), Some("bot-1"));
        assert_eq!(p.session_of("a:b:auth"), None);
        assert_eq!(p.glob(":creds"), "*:auth:creds");
        let e = Pattern::parse("evolution-cache:instance:{session}").unwrap();
        assert_eq!(e.session_of("evolution-cache:instance:0b5e-11"), Some("0b5e-11"));
        assert_eq!(e.session_of("other:0b5e"), None);
        assert_eq!(Pattern::parse("p*[x]:{session}").unwrap().glob(""), "p\\*\\[x\\]:*");
        assert!(Pattern::parse("nothing").is_err());
        assert!(Pattern::parse("a{session}").is_err());
        assert!(Pattern::parse("{session}:{session}").is_err());

        for (name, pattern, session) in [
            ("bot-1:auth", "{session}:auth", "bot-1"),
            ("authState:bot-1", "authState:{session}", "bot-1"),
            ("evolution:instance:0b5e", "evolution:instance:{session}", "0b5e"),
            ("bot-1", "{session}", "bot-1"),
        ] {
            let (p, s) = guess(name).unwrap();
            assert_eq!((p.to_string().as_str(), s), (pattern, session), "{name}");
        }
        assert_eq!(redact("redis://u:secret@h:1/2"), "redis://…@h:1/2");
    }
}
