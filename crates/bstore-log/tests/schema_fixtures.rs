//! Events of every schema version, as the releases wrote them, read in both
//! directions a rolling upgrade needs.
//!
//! `fixtures/events/` holds one short session history as sealed blobs (the
//! bytes a stream stores), sealed for session `fixtures/s` under the test key
//! `1:AQEB…` (key id 1, 32 bytes of 0x01; the integration tests' `KEY1`):
//!
//! | file | written by | v | prev |
//! |---|---|---|---|
//! | `1-v1-creds.bin`, `2-v1-keys.bin` | the release before deltas (whole values) | 1 | — |
//! | `3-v2-keys-unpatched.bin` | the releases with deltas up to f4c3667, which wrote every event as v2 | 2 | — |
//! | `4-v2-keys-patched.bin` | the same, with a patch | 2 | — |
//! | `5-v1-creds-chained.bin`, `7-v1-deleted-chained.bin` | this release, no patch | 1 | 4, 6 |
//! | `6-v2-keys-patched-chained.bin` | this release, a patch | 2 | 5 |
//! | `8-v3-restored-chained.bin` | the release with restores: back to 6 after the deletion | 3 | 7 |
//!
//! Tests: this build reads every fixture and the history replays, chain
//! checked, to the state it recorded; the previous release (f359395: v1 and
//! v2, no `prev`) reads every fixture but the restore, which it refuses by
//! its version, and what this build writes; the release before deltas (v1
//! only) reads every version-1 event — which is now every event without a
//! patch — and refuses a patched one (and the restore) by its version
//! rather than losing the patch. Those two readers are frozen
//! copies of those releases' event types and of the sealed format 1, kept
//! here so that no later change to the code under test changes them.
//!
//! Fixtures 1–2 were sealed by the code of 1743bfc^ and 3–4 by that of
//! f4c3667 (each release's own `Event` and `Codec`), 5–7 by this build's
//! append path, 8 by the append path of the release that added restores. `BSTORE_WRITE_FIXTURES=1 cargo test -p bstore-log --test
//! schema_fixtures` writes the fixtures that are missing (the older ones as
//! those releases' code made them). Existing ones are never rewritten: they
//! are what the releases wrote, and must stay readable.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bstore_codec::{Codec, Keyring};
use bstore_domain::delta::Delta;
use bstore_domain::{Chain, Change, Command, Event, KeyChanges, KeyId, KeyPatches, KeyType, Limits, Link, SessionKey, SessionState};
use bytes::Bytes;

const KEY: [u8; 32] = [1; 32];
const AT: u64 = 1_700_000_000_000;

fn codec() -> Codec {
    Codec::new(Keyring::new(vec![(1, KEY)], None).unwrap())
}

fn session() -> SessionKey {
    SessionKey::parse("fixtures", "s").unwrap()
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/events")
}

fn t(s: &str) -> KeyType {
    KeyType::parse(s).unwrap()
}

fn id(s: &str) -> KeyId {
    KeyId::parse(s).unwrap()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// A value large enough to be recorded as a delta when it grows a little:
/// `0,1,2,…,<n-1>,`.
fn big(n: usize) -> String {
    (0..n).map(|i| format!("{i},")).collect()
}

const SENDER_KEY: (&str, &str) = ("sender-key", "g::u::0");

/// The fixtures in log order: file name, schema version, `prev`, kind.
const FIXTURES: [(&str, u16, Option<u64>, &str); 8] = [
    ("1-v1-creds.bin", 1, None, "creds_put"),
    ("2-v1-keys.bin", 1, None, "keys_changed"),
    ("3-v2-keys-unpatched.bin", 2, None, "keys_changed"),
    ("4-v2-keys-patched.bin", 2, None, "keys_changed"),
    ("5-v1-creds-chained.bin", 1, Some(4), "creds_put"),
    ("6-v2-keys-patched-chained.bin", 2, Some(5), "keys_changed"),
    ("7-v1-deleted-chained.bin", 1, Some(6), "session_deleted"),
    ("8-v3-restored-chained.bin", 3, Some(7), "restored"),
];

fn read_fixture(name: &str) -> Vec<u8> {
    let path = dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (BSTORE_WRITE_FIXTURES=1 writes missing fixtures)", path.display()))
}

/// The sealed fixtures, in log order: (sequence, name, blob).
fn fixtures() -> Vec<(u64, &'static str, Vec<u8>)> {
    FIXTURES.iter().enumerate().map(|(i, (name, ..))| (i as u64 + 1, *name, read_fixture(name))).collect()
}

#[test]
fn the_fixture_directory_holds_exactly_the_listed_fixtures() {
    let mut found: Vec<String> = std::fs::read_dir(dir()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    found.sort();
    let listed: Vec<&str> = FIXTURES.iter().map(|f| f.0).collect();
    assert_eq!(found, listed, "a fixture of a new schema version must be listed here (and read by every test)");
}

#[test]
fn this_build_reads_every_fixture_and_the_history_replays_to_what_it_recorded() {
    let (codec, s) = (codec(), session());
    let mut state = SessionState::default();
    let mut chain = Chain::from_start();
    let big_at = |st: &SessionState| st.get_keys(&t(SENDER_KEY.0), [&id(SENDER_KEY.1)]).pop().map(|(_, v)| v);
    for ((seq, name, blob), (_, v, prev, kind)) in fixtures().into_iter().zip(FIXTURES) {
        let event = codec.decode_event(&s, &blob).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((event.v, event.prev, event.kind()), (v, prev, kind), "{name}");
        assert_eq!(event.at_ms, AT + seq, "{name}");
        assert_eq!(chain.check(seq, &event), Link::Fits, "{name} is where it was written");
        assert!(state.apply(seq, &event).unwrap_or_else(|e| panic!("{name}: {e}")), "{name}");
        match seq {
            1 => assert_eq!(state.creds(), Some(&b("creds-1"))),
            2 => assert_eq!(big_at(&state), Some(b(&big(3000)))),
            4 => {
                assert_eq!(state.creds(), Some(&b("creds-1")));
                assert!(state.get_keys(&t("pre-key"), [&id("1")]).is_empty(), "deleted by 3");
                assert_eq!(state.get_keys(&t("pre-key"), [&id("2"), &id("3")]), vec![(id("2"), b("b")), (id("3"), b("c"))]);
                assert_eq!(state.get_keys(&t("session"), [&id("u.0")]), vec![(id("u.0"), b("s"))]);
                assert_eq!(big_at(&state), Some(b(&big(3001))), "patched by 4");
            }
            5 => assert_eq!(state.creds(), Some(&b("creds-2"))),
            6 => assert_eq!(big_at(&state), Some(b(&big(3002))), "patched by 6"),
            7 => assert!(!state.exists()),
            8 => {
                assert_eq!(state.creds(), Some(&b("creds-2")), "the restore to 6 puts the creds back");
                assert_eq!(big_at(&state), Some(b(&big(3002))));
                assert_eq!(state.get_keys(&t("pre-key"), [&id("2"), &id("3")]), vec![(id("2"), b("b")), (id("3"), b("c"))]);
            }
            _ => {}
        }
    }
    assert_eq!(state.seq(), 8);
}

/// The releases' readers, frozen. Each decodes the opened MessagePack as
/// that release's `Event`/`Change` did (`rmp_serde::from_slice` into types
/// that do not deny unknown fields), then checks the version as its
/// `Event::upgrade` did.
mod frozen {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use serde::Deserialize;

    /// Opens a blob of sealed format 1 (`0xB5 0x01 key_id nonce secretbox`,
    /// subkey = HMAC-SHA256 over "bstore/seal/v1" and the length-prefixed
    /// context parts; inner = flags body, lz4 when flags bit 0): the only
    /// format any release has written.
    pub fn open(key: &[u8; 32], tenant: &str, session: &str, blob: &[u8]) -> Vec<u8> {
        use crypto_secretbox::aead::{Aead, KeyInit};
        assert_eq!(&blob[..2], &[0xB5, 1], "sealed format 1");
        assert_eq!(u32::from_be_bytes(blob[2..6].try_into().unwrap()), 1, "key id 1");
        let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let mut ctx = ring::hmac::Context::with_key(&mac);
        ctx.update(b"bstore/seal/v1");
        for part in [&b"event"[..], tenant.as_bytes(), session.as_bytes()] {
            ctx.update(&(part.len() as u32).to_be_bytes());
            ctx.update(part);
        }
        let subkey = ctx.sign();
        let cipher = crypto_secretbox::XSalsa20Poly1305::new(crypto_secretbox::Key::from_slice(subkey.as_ref()));
        let inner = cipher.decrypt(crypto_secretbox::Nonce::from_slice(&blob[6..30]), &blob[30..]).expect("an authentic event blob");
        let (flags, body) = inner.split_first().unwrap();
        if flags & 1 == 0 { body.to_vec() } else { lz4_flex::decompress_size_prepended(body).unwrap() }
    }

    /// `crates/bstore-domain/src/event.rs` before deltas (e559b77..1743bfc^):
    /// version 1 only.
    pub mod before_deltas {
        use super::*;

        #[derive(Debug, Deserialize)]
        pub struct Event {
            pub v: u16,
            pub at_ms: u64,
            #[serde(default)]
            pub rid: Option<String>,
            pub change: Change,
        }

        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum Change {
            CredsPut { creds: Bytes },
            KeysChanged { keys: BTreeMap<String, BTreeMap<String, Option<Bytes>>> },
            SessionDeleted,
        }

        /// Its `Codec::decode_event`: decode, then `Event::upgrade`. `Err`
        /// carries the version it refused.
        pub fn decode(plain: &[u8]) -> Result<Event, u16> {
            let event: Event = rmp_serde::from_slice(plain).expect("decodes");
            match event.v {
                1 => Ok(event),
                other => Err(other),
            }
        }
    }

    /// `crates/bstore-domain/src/event.rs` and `delta.rs` at f359395, the
    /// previous landed release: versions 1 and 2, patches, no `prev`.
    pub mod f359395 {
        use super::*;

        #[derive(Debug, Deserialize)]
        pub struct Event {
            pub v: u16,
            pub at_ms: u64,
            #[serde(default)]
            pub rid: Option<String>,
            pub change: Change,
        }

        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum Change {
            CredsPut {
                creds: Bytes,
            },
            KeysChanged {
                keys: BTreeMap<String, BTreeMap<String, Option<Bytes>>>,
                #[serde(default)]
                patched: BTreeMap<String, BTreeMap<String, Delta>>,
            },
            SessionDeleted,
        }

        #[derive(Debug, Deserialize)]
        pub struct Delta {
            pub base_len: u32,
            pub base_hash: u64,
            pub len: u32,
            pub ops: Vec<Op>,
        }

        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum Op {
            Copy {
                #[allow(dead_code)]
                from: u32,
                len: u32,
            },
            Insert(#[serde(with = "serde_bytes")] Vec<u8>),
        }

        pub fn decode(plain: &[u8]) -> Result<Event, u16> {
            let event: Event = rmp_serde::from_slice(plain).expect("decodes");
            match event.v {
                1 | 2 => Ok(event),
                other => Err(other),
            }
        }
    }
}

/// What an event says, in terms every release shares: version, time,
/// request id, creds, keys written or deleted, and patches by
/// (type, id, base length, base hash, new length, steps).
#[derive(Debug, PartialEq, Eq)]
struct Said {
    v: u16,
    at_ms: u64,
    rid: Option<String>,
    creds: Option<Bytes>,
    keys: BTreeMap<(String, String), Option<Bytes>>,
    patched: Vec<(String, String, u32, u64, u32, usize)>,
    deleted: bool,
}

fn said(e: &Event) -> Said {
    let mut out =
        Said { v: e.v, at_ms: e.at_ms, rid: e.rid.clone(), creds: None, keys: BTreeMap::new(), patched: Vec::new(), deleted: false };
    match &e.change {
        Change::CredsPut { creds } => out.creds = Some(creds.clone()),
        Change::KeysChanged { keys, patched } => {
            out.keys = keys.iter().flat_map(|(t, ids)| ids.iter().map(move |(i, v)| ((t.to_string(), i.to_string()), v.clone()))).collect();
            out.patched = patched
                .iter()
                .flat_map(|(t, ids)| {
                    ids.iter().map(move |(i, d)| (t.to_string(), i.to_string(), d.base_len, d.base_hash, d.len, d.ops.len()))
                })
                .collect();
        }
        Change::SessionDeleted => out.deleted = true,
        Change::Restored { .. } => panic!("no release before this one wrote a restore"),
    }
    out
}

fn said_before_deltas(e: &frozen::before_deltas::Event) -> Said {
    use frozen::before_deltas::Change as C;
    let mut out =
        Said { v: e.v, at_ms: e.at_ms, rid: e.rid.clone(), creds: None, keys: BTreeMap::new(), patched: Vec::new(), deleted: false };
    match &e.change {
        C::CredsPut { creds } => out.creds = Some(creds.clone()),
        C::KeysChanged { keys } => {
            out.keys = keys.iter().flat_map(|(t, ids)| ids.iter().map(move |(i, v)| ((t.clone(), i.clone()), v.clone()))).collect();
        }
        C::SessionDeleted => out.deleted = true,
    }
    out
}

fn said_f359395(e: &frozen::f359395::Event) -> Said {
    use frozen::f359395::Change as C;
    let mut out =
        Said { v: e.v, at_ms: e.at_ms, rid: e.rid.clone(), creds: None, keys: BTreeMap::new(), patched: Vec::new(), deleted: false };
    match &e.change {
        C::CredsPut { creds } => out.creds = Some(creds.clone()),
        C::KeysChanged { keys, patched } => {
            out.keys = keys.iter().flat_map(|(t, ids)| ids.iter().map(move |(i, v)| ((t.clone(), i.clone()), v.clone()))).collect();
            out.patched = patched
                .iter()
                .flat_map(|(t, ids)| ids.iter().map(move |(i, d)| (t.clone(), i.clone(), d.base_len, d.base_hash, d.len, d.ops.len())))
                .collect();
            // Every step decoded too.
            for d in patched.values().flat_map(|ids| ids.values()) {
                let rebuilt: u64 = d
                    .ops
                    .iter()
                    .map(|op| match op {
                        frozen::f359395::Op::Copy { from: _, len } => u64::from(*len),
                        frozen::f359395::Op::Insert(bytes) => bytes.len() as u64,
                    })
                    .sum();
                assert_eq!(rebuilt, u64::from(d.len), "the steps build a value of the patch's length");
            }
        }
        C::SessionDeleted => out.deleted = true,
    }
    out
}

fn open(blob: &[u8]) -> Vec<u8> {
    frozen::open(&KEY, "fixtures", "s", blob)
}

#[test]
fn the_previous_release_reads_every_fixture_as_this_build_does() {
    let (codec, s) = (codec(), session());
    for (_, name, blob) in fixtures() {
        let ours = codec.decode_event(&s, &blob).unwrap();
        match frozen::f359395::decode(&open(&blob)) {
            Ok(theirs) => {
                assert_eq!(said_f359395(&theirs), said(&ours), "{name}: the previous release ignores prev and reads the rest as it is")
            }
            Err(v) => assert_eq!((v, ours.v), (3, 3), "{name}: only a restore is refused, by its version"),
        }
    }
}

#[test]
fn the_release_before_deltas_reads_every_version_1_fixture_and_refuses_the_others_by_version() {
    let (codec, s) = (codec(), session());
    for (_, name, blob) in fixtures() {
        let ours = codec.decode_event(&s, &blob).unwrap();
        match frozen::before_deltas::decode(&open(&blob)) {
            Ok(theirs) => {
                assert_eq!(ours.v, 1, "{name}");
                assert_eq!(said_before_deltas(&theirs), said(&ours), "{name}");
            }
            Err(v) => {
                assert!(v == ours.v && v >= 2, "{name}: refused by its version");
            }
        }
    }
}

/// Events as this build decides and appends them (the real path:
/// `SessionState::handle`, then what `EventLog::append` seals).
fn written_now() -> Vec<(Event, Vec<u8>)> {
    let (codec, s, limits) = (codec(), session(), Limits::default());
    let mut state = SessionState::default();
    let mut keys = KeyChanges::new();
    keys.entry(t(SENDER_KEY.0)).or_default().insert(id(SENDER_KEY.1), Some(b(&big(2000))));
    keys.entry(t("pre-key")).or_default().insert(id("1"), Some(b("a")));
    let mut grown = KeyChanges::new();
    grown.entry(t(SENDER_KEY.0)).or_default().insert(id(SENDER_KEY.1), Some(b(&big(2001))));
    let mut deleted = KeyChanges::new();
    deleted.entry(t("pre-key")).or_default().insert(id("1"), None);
    let commands = [
        Command::PutCreds { creds: b("creds") },
        Command::SetKeys { keys },
        Command::SetKeys { keys: grown },
        Command::SetKeys { keys: deleted },
        Command::DeleteSession,
    ];
    let mut out = Vec::new();
    for (n, cmd) in commands.into_iter().enumerate() {
        let event = state.handle(cmd, &limits, AT + n as u64, Some(format!("r{n}"))).unwrap().expect("a change");
        let blob = bstore_log::seal_appended(&codec, &s, state.seq(), &event);
        state.apply(state.seq() + 1, &event).unwrap();
        out.push((event, blob));
    }
    out
}

#[test]
fn both_previous_releases_read_what_this_build_writes_except_patches_before_deltas() {
    let (codec, s) = (codec(), session());
    let written = written_now();
    let patched: Vec<bool> =
        written.iter().map(|(e, _)| matches!(&e.change, Change::KeysChanged { patched, .. } if !patched.is_empty())).collect();
    assert_eq!(patched, [false, false, true, false, false], "the third write grows a large value a little: a patch");
    for (n, (event, blob)) in written.iter().enumerate() {
        let ours = codec.decode_event(&s, blob).unwrap();
        assert_eq!(ours.prev, Some(n as u64), "sealed with its place");
        let theirs = frozen::f359395::decode(&open(blob)).unwrap();
        assert_eq!(said_f359395(&theirs), said(event), "write {n}: the previous release reads it whole");
        match frozen::before_deltas::decode(&open(blob)) {
            Ok(theirs) => {
                assert!(!patched[n], "write {n}: a patch must not reach the release before deltas");
                assert_eq!(said_before_deltas(&theirs), said(event), "write {n}");
            }
            Err(v) => {
                assert!(patched[n], "write {n}: an event without a patch is refused (version {v}) by the release before deltas");
                assert_eq!(v, 2);
            }
        }
    }
}

#[test]
fn a_patch_marked_version_1_would_be_lost_by_the_release_before_deltas() {
    // Why an event with patches must say version 2: the older reader takes
    // the rest of it and drops the patch without a word.
    let (event, _) = written_now().swap_remove(2);
    let blob = codec().encode_event(&session(), &Event { v: 1, ..event });
    let read = frozen::before_deltas::decode(&open(&blob)).expect("accepted as version 1");
    assert!(matches!(read.change, frozen::before_deltas::Change::KeysChanged { ref keys } if keys.is_empty()), "and the patch is gone");
}

/// The history the fixtures hold: each event, and whether this release
/// wrote it (chained, through the append path) or an older one did.
fn history() -> Vec<(&'static str, Event, bool)> {
    let legacy =
        |n: u64, v: u16, rid: Option<&str>, change: Change| Event { v, at_ms: AT + n, rid: rid.map(str::to_owned), prev: None, change };
    let keys = |entries: &[(&str, &str, Option<&str>)]| {
        let mut k = KeyChanges::new();
        for (ty, i, v) in entries {
            k.entry(t(ty)).or_default().insert(id(i), v.map(b));
        }
        k
    };
    let mut patch = KeyPatches::new();
    patch.entry(t(SENDER_KEY.0)).or_default().insert(id(SENDER_KEY.1), Delta::between(big(3000).as_bytes(), big(3001).as_bytes()));
    let mut out = vec![
        (FIXTURES[0].0, legacy(1, 1, Some("r1"), Change::CredsPut { creds: b("creds-1") }), false),
        (
            FIXTURES[1].0,
            legacy(
                2,
                1,
                None,
                Change::KeysChanged {
                    keys: keys(&[("pre-key", "1", Some("a")), ("pre-key", "2", Some("b")), (SENDER_KEY.0, SENDER_KEY.1, Some(&big(3000)))]),
                    patched: KeyPatches::new(),
                },
            ),
            false,
        ),
        (
            FIXTURES[2].0,
            legacy(
                3,
                2,
                Some("r3"),
                Change::KeysChanged { keys: keys(&[("pre-key", "1", None), ("session", "u.0", Some("s"))]), patched: KeyPatches::new() },
            ),
            false,
        ),
        (FIXTURES[3].0, legacy(4, 2, None, Change::KeysChanged { keys: keys(&[("pre-key", "3", Some("c"))]), patched: patch }), false),
    ];
    let mut state = SessionState::default();
    for (seq, (_, e, _)) in out.iter().enumerate() {
        state.apply(seq as u64 + 1, e).unwrap();
    }
    let grown = keys(&[(SENDER_KEY.0, SENDER_KEY.1, Some(&big(3002)))]);
    let mut at_6 = SessionState::default();
    for (name, n, cmd) in [
        (FIXTURES[4].0, 5, Command::PutCreds { creds: b("creds-2") }),
        (FIXTURES[5].0, 6, Command::SetKeys { keys: grown }),
        (FIXTURES[6].0, 7, Command::DeleteSession),
    ] {
        let event = state.handle(cmd, &Limits::default(), AT + n, Some(format!("r{n}"))).unwrap().expect("a change");
        if n == 7 {
            at_6 = state.clone();
        }
        state.apply(n, &event).unwrap();
        out.push((name, event, true));
    }
    // After the deletion, back to the state at 6.
    let restore = state.restore(&at_6, 6, Some(AT + 6), AT + 8, Some("r8".into())).expect("a change");
    out.push((FIXTURES[7].0, restore, true));
    out
}

#[test]
fn write_fixtures() {
    if std::env::var_os("BSTORE_WRITE_FIXTURES").is_none() {
        return;
    }
    let (codec, s) = (codec(), session());
    std::fs::create_dir_all(dir()).unwrap();
    for (seq, (name, event, chained)) in history().into_iter().enumerate() {
        let path = dir().join(name);
        if path.exists() {
            continue;
        }
        let blob = if chained { bstore_log::seal_appended(&codec, &s, seq as u64, &event) } else { codec.encode_event(&s, &event) };
        std::fs::write(&path, blob).unwrap();
        eprintln!("wrote {}", path.display());
    }
}

/// A restore as this build decides and appends it: the session back from
/// creds and a key to the key alone.
fn a_restore() -> (Event, Vec<u8>) {
    let (mut before, mut then) = (SessionState::default(), SessionState::default());
    let mut keys = KeyChanges::new();
    keys.entry(t("pre-key")).or_default().insert(id("1"), Some(b("a")));
    let event = then.handle(Command::SetKeys { keys }, &Limits::default(), AT, None).unwrap().unwrap();
    then.apply(1, &event).unwrap();
    before.apply(1, &event).unwrap();
    let event = before.handle(Command::PutCreds { creds: b("c") }, &Limits::default(), AT + 1, None).unwrap().unwrap();
    before.apply(2, &event).unwrap();
    let restore = before.restore(&then, 1, Some(AT), AT + 2, Some("r".into())).expect("a change");
    let blob = bstore_log::seal_appended(&codec(), &session(), 2, &restore);
    (restore, blob)
}

#[test]
fn both_previous_releases_refuse_a_restore_by_its_version() {
    // Written as a key change with a `restored` field, a restore decodes in
    // the earlier releases, which refuse it by its version 3 (the Mongo
    // materializer defers it to an upgraded instance) instead of taking it
    // for corrupt data.
    let (restore, blob) = a_restore();
    assert_eq!(restore.v, 3);
    assert_eq!(codec().decode_event(&session(), &blob).unwrap(), Event { prev: Some(2), ..restore });
    assert_eq!(frozen::f359395::decode(&open(&blob)).unwrap_err(), 3, "the previous release refuses it by its version");
    assert_eq!(frozen::before_deltas::decode(&open(&blob)).unwrap_err(), 3, "and so does the one before deltas");
}

#[test]
fn a_restore_marked_version_2_would_be_misread_by_the_previous_release() {
    // Why a restore must say version 3: the previous release would read a
    // plain key change and lose the creds the restore removes.
    let (restore, _) = a_restore();
    let blob = codec().encode_event(&session(), &Event { v: 2, ..restore });
    let read = frozen::f359395::decode(&open(&blob)).expect("accepted as version 2");
    assert!(matches!(read.change, frozen::f359395::Change::KeysChanged { .. }), "taken for a key change, the restore's creds unseen");
}
