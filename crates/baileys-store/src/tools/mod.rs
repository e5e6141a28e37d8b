//! The operator's commands, one file per command family, apart from
//! starting the service: the audit (`history`, `state-at`, `diff`),
//! `verify` and `rebuild` of the projections, `restore` (sessions put back
//! to an earlier point of their history as one new event each), moving sessions in and out (`import` from
//! `useMultiFileAuthState` folders and Redis-direct stores, `export` back to
//! them), `erase`, and the key commands (`rotate-key`, `keys …`).

pub mod bufferjson;
pub mod erase;
pub mod export;
pub mod history;
pub mod import;
pub mod keys;
pub mod rebuild;
pub mod redis_layouts;
pub mod restore;
pub mod state_at;
pub mod verify;

use anyhow::Context as _;
use bstore_domain::SessionKey;
use bstore_log::EventLog;

/// Every session with at least one event in the log.
pub async fn log_sessions(log: &EventLog) -> anyhow::Result<Vec<SessionKey>> {
    log.sessions(None).await.context("listing the sessions of the event stream")
}

/// Prints one session's line of a long command above its progress bar and
/// advances the bar; off a terminal the bar draws and prints nothing, so the
/// line goes to stderr.
pub(crate) fn progress_line(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
    bar.inc(1);
}

/// The key types Baileys (v7) writes, longest first so that a file name
/// `sender-key-memory-…` is not read as a `sender-key`.
pub const KNOWN_TYPES: &[&str] = &[
    "app-state-sync-version",
    "app-state-sync-key",
    "sender-key-memory",
    "identity-key",
    "device-list",
    "lid-mapping",
    "sender-key",
    "pre-key",
    "session",
    "tctoken",
];

/// The name `useMultiFileAuthState` gives a key's file: `<type>-<id>.json`
/// with `fixFileName` applied (`/` → `__`, `:` → `-`).
pub fn file_name(ty: &str, id: &str) -> String {
    format!("{ty}-{id}.json").replace('/', "__").replace(':', "-")
}

/// The key a file name stands for. `fixFileName` loses information (`-`
/// and `__` exist in ids too), so the id is given back per type, from what
/// each type's ids are made of: app-state-sync-key ids are base64 (`__` was
/// `/`), sender-key ids are `<group>::<user>::<device>` (`--` was `::`);
/// the ids of the other types hold neither `/` nor `:` (`tctoken`'s
/// `__index` and the `-` of old group jids stay as they are). `None`: not a
/// key file of a known type.
pub fn key_of_file(name: &str) -> Option<(&'static str, String)> {
    let stem = name.strip_suffix(".json")?;
    let ty = KNOWN_TYPES.iter().find(|ty| stem.strip_prefix(**ty).is_some_and(|rest| rest.starts_with('-') && rest.len() > 1))?;
    let raw = &stem[ty.len() + 1..];
    let id = match *ty {
        "app-state-sync-key" => raw.replace("__", "/"),
        "sender-key" => raw.replace("--", "::"),
        _ => raw.to_owned(),
    };
    Some((ty, id))
}

/// The key a field of a Redis-direct store stands for (`<type>-<id>`, the
/// id escaped as in a file name or as it is: both read back alike).
pub fn key_of_field(field: &str) -> Option<(&'static str, String)> {
    key_of_file(&format!("{field}.json"))
}

/// The field a Redis-direct store gives a key: `<type>-<id>`, the id
/// escaped as `useMultiFileAuthState` escapes file names (baileys-redis-auth
/// since 2.0) or, with `escaped` false, as it is (Evolution API).
pub fn field_name(ty: &str, id: &str, escaped: bool) -> String {
    if escaped { format!("{ty}-{id}").replace('/', "__").replace(':', "-") } else { format!("{ty}-{id}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_read_back_as_the_keys_they_were_written_for() {
        for (ty, id) in [
            ("pre-key", "17"),
            ("session", "491511234_1.0"),
            ("sender-key", "1203630@g.us::4915_1::3"),
            ("sender-key-memory", "4915-1600@g.us"),
            ("app-state-sync-key", "AAAA/b+c="),
            ("tctoken", "__index"),
            ("app-state-sync-version", "regular_high"),
        ] {
            let name = file_name(ty, id);
            assert_eq!(key_of_file(&name), Some((ty, id.to_owned())), "{name}");
        }
        assert_eq!(file_name("sender-key", "g@g.us::u::0"), "sender-key-g@g.us--u--0.json");
        assert_eq!(key_of_file("creds.json"), None);
        assert_eq!(key_of_file("unknown-1.json"), None);
        assert_eq!(key_of_file("pre-key-.json"), None);
        // Redis fields, escaped or not, give the same keys.
        for escaped in [true, false] {
            for (ty, id) in [("sender-key", "1203630@g.us::4915_1::3"), ("app-state-sync-key", "AAAA/b+c="), ("session", "4915_1.0")] {
                assert_eq!(key_of_field(&field_name(ty, id, escaped)), Some((ty, id.to_owned())), "{ty} {id} {escaped}");
            }
        }
        assert_eq!(key_of_field("creds"), None);
    }
}
