//! A session's state and its two functions: `handle` decides, `apply` records.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::delta::{Delta, WrongBase};
use crate::error::DomainError;
use crate::event::{Change, Event, KeyChanges, KeyPatches};
use crate::ids::{KeyId, KeyType};
use crate::limits::Limits;

/// A write a client asks for. Reads are plain methods on [`SessionState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Replace the creds object.
    PutCreds {
        /// The client-encoded creds.
        creds: Bytes,
    },
    /// Write and delete keys, all of them or none.
    SetKeys {
        /// Per type, per id: a value, or `None` to delete.
        keys: KeyChanges,
    },
    /// Forget the session (logout).
    DeleteSession,
}

impl Command {
    /// Bytes of values the command carries: what deciding it (a delta of
    /// each rewritten value) and sealing its event cost in proportion to.
    pub fn value_bytes(&self) -> usize {
        match self {
            Command::PutCreds { creds } => creds.len(),
            Command::SetKeys { keys } => keys.values().flat_map(|ids| ids.values()).map(|v| v.as_ref().map_or(0, Bytes::len)).sum(),
            Command::DeleteSession => 0,
        }
    }
}

/// What `session.info` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Stream sequence of the last event applied (0: none yet).
    pub seq: u64,
    /// Whether the session holds creds or any key.
    pub exists: bool,
    /// Whether creds are stored.
    pub creds: bool,
    /// Number of keys per type.
    pub keys: BTreeMap<String, u64>,
    /// Bytes of creds and key values held.
    pub bytes: u64,
    /// When the last event was decided (ms since the epoch), if any.
    pub updated_at_ms: Option<u64>,
    /// Events applied since the session was last deleted or created.
    pub events: u64,
}

/// Everything known about one session, as of stream sequence `seq`.
///
/// It is also the snapshot format: it serializes whole, so a projection can
/// store it and a loader can continue from `seq`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    seq: u64,
    creds: Option<Bytes>,
    /// Per type, the ids in byte order: a page of `keys.list` is a range,
    /// whatever the number of ids.
    keys: HashMap<KeyType, BTreeMap<KeyId, Bytes>>,
    bytes: u64,
    updated_at_ms: Option<u64>,
    events: u64,
}

impl SessionState {
    /// Rebuilds a state from its parts, as a projection stored them: the
    /// sequence it is current as of, the creds, every key, and the session's
    /// metadata. The byte count is derived, not trusted. Empty key types are
    /// dropped so the result equals the state the events would have built.
    pub fn from_parts(
        seq: u64,
        creds: Option<Bytes>,
        keys: impl IntoIterator<Item = (KeyType, KeyId, Bytes)>,
        updated_at_ms: Option<u64>,
        events: u64,
    ) -> Self {
        let mut map: HashMap<KeyType, BTreeMap<KeyId, Bytes>> = HashMap::new();
        let mut bytes = creds.as_ref().map_or(0, |c| c.len() as u64);
        for (ty, id, value) in keys {
            bytes += value.len() as u64;
            if let Some(old) = map.entry(ty).or_default().insert(id, value) {
                bytes -= old.len() as u64;
            }
        }
        Self { seq, creds, keys: map, bytes, updated_at_ms, events }
    }

    /// When the last event was decided (ms since the epoch), if any.
    pub fn updated_at_ms(&self) -> Option<u64> {
        self.updated_at_ms
    }

    /// Events applied since the session was last deleted or created.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The stream sequence of the last applied event.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The stored creds, if any.
    pub fn creds(&self) -> Option<&Bytes> {
        self.creds.as_ref()
    }

    /// The values of the requested ids that exist; missing ids are left out.
    pub fn get_keys<'a>(&self, ty: &KeyType, ids: impl IntoIterator<Item = &'a KeyId>) -> Vec<(KeyId, Bytes)> {
        let Some(of_type) = self.keys.get(ty) else { return Vec::new() };
        ids.into_iter().filter_map(|id| of_type.get(id).map(|v| (id.clone(), v.clone()))).collect()
    }

    /// Iterates over every stored key.
    pub fn iter_keys(&self) -> impl Iterator<Item = (&KeyType, &KeyId, &Bytes)> {
        self.keys.iter().flat_map(|(t, ids)| ids.iter().map(move |(id, v)| (t, id, v)))
    }

    /// Whether the session holds creds or any key.
    pub fn exists(&self) -> bool {
        self.creds.is_some() || self.keys.values().any(|m| !m.is_empty())
    }

    /// A summary for `session.info`.
    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            seq: self.seq,
            exists: self.exists(),
            creds: self.creds.is_some(),
            keys: self.keys.iter().filter(|(_, m)| !m.is_empty()).map(|(t, m)| (t.to_string(), m.len() as u64)).collect(),
            bytes: self.bytes,
            updated_at_ms: self.updated_at_ms,
            events: self.events,
        }
    }

    /// Validates a key read against the limits.
    pub fn check_get(limits: &Limits, ids: usize) -> Result<(), DomainError> {
        limit("ids in one keys.get", limits.max_ids_per_call, ids)
    }

    /// Validates the page size of a `keys.list` against the limits.
    pub fn check_list(limits: &Limits, page: usize) -> Result<(), DomainError> {
        limit("ids in one keys.list", limits.max_ids_per_call, page)
    }

    /// One page of the ids stored under `ty`, in byte order: those strictly
    /// after `after` (all of them without it), at most `limit` (at least
    /// one), and no more than `max_bytes` of ids in all, though always at
    /// least one id when any follows. Returns the ids and the cursor of the
    /// next page: the last id of this one when more follow, else `None`.
    ///
    /// Each type's ids are kept in byte order, so a page is a range: its cost
    /// grows with the page, not with the number of ids stored (a bot cannot
    /// make its pages slow for other tenants by storing many ids).
    pub fn list_ids(&self, ty: &KeyType, after: Option<&KeyId>, limit: usize, max_bytes: usize) -> (Vec<KeyId>, Option<KeyId>) {
        use std::ops::Bound::{Excluded, Unbounded};
        let Some(of_type) = self.keys.get(ty) else { return (Vec::new(), None) };
        let limit = limit.max(1);
        let from = after.map_or(Unbounded, Excluded);
        let mut range = of_type.range::<KeyId, _>((from, Unbounded)).map(|(id, _)| id);
        let (mut page, mut bytes, mut more) = (Vec::new(), 0usize, false);
        for id in range.by_ref() {
            let len = id.as_str().len();
            // At least one id per page, however long.
            if !page.is_empty() && (page.len() == limit || bytes + len > max_bytes) {
                more = true;
                break;
            }
            bytes += len;
            page.push(id.clone());
        }
        let next = if more { page.last().cloned() } else { None };
        (page, next)
    }

    /// Decides what a command changes. Returns `None` when it changes nothing
    /// (every value already as asked, every deleted key already absent), so
    /// no event is written; returns an error, and changes nothing, when any
    /// part of the command breaks a limit.
    pub fn handle(&self, cmd: Command, limits: &Limits, now_ms: u64, rid: Option<String>) -> Result<Option<Event>, DomainError> {
        let change = match cmd {
            Command::PutCreds { creds } => {
                limit("creds size in bytes", limits.max_value_bytes, creds.len())?;
                if self.creds.as_ref() == Some(&creds) {
                    return Ok(None);
                }
                Change::CredsPut { creds }
            }
            Command::SetKeys { keys } => {
                let ids: usize = keys.values().map(BTreeMap::len).sum();
                limit("ids in one keys.set", limits.max_ids_per_call, ids)?;
                let mut total = 0usize;
                for value in keys.values().flat_map(|m| m.values()).flatten() {
                    limit("key value size in bytes", limits.max_value_bytes, value.len())?;
                    total += value.len();
                }
                limit("total value bytes in one keys.set", limits.max_set_bytes, total)?;
                let keys = self.effective_changes(keys);
                if keys.is_empty() {
                    return Ok(None);
                }
                let (keys, patched) = self.as_deltas(keys);
                Change::KeysChanged { keys, patched }
            }
            Command::DeleteSession => {
                if !self.exists() {
                    return Ok(None);
                }
                Change::SessionDeleted
            }
        };
        Ok(Some(Event::new(now_ms, rid, change)))
    }

    /// Drops the parts of a key change that would change nothing.
    fn effective_changes(&self, mut keys: KeyChanges) -> KeyChanges {
        keys.retain(|ty, ids| {
            let current = self.keys.get(ty);
            ids.retain(|id, value| {
                let stored = current.and_then(|m| m.get(id));
                match (value, stored) {
                    (None, None) => false,
                    (Some(new), Some(old)) => new != old,
                    _ => true,
                }
            });
            !ids.is_empty()
        });
        keys
    }

    /// Moves the values that are cheaper to record as a delta against their
    /// current value into the patched set. Only large values are tried:
    /// computing a delta costs a pass over both versions.
    fn as_deltas(&self, mut keys: KeyChanges) -> (KeyChanges, KeyPatches) {
        let mut patched = KeyPatches::new();
        for (ty, ids) in keys.iter_mut() {
            let Some(current) = self.keys.get(ty) else { continue };
            let mut moved = Vec::new();
            for (id, value) in ids.iter() {
                let (Some(new), Some(old)) = (value, current.get(id)) else { continue };
                if new.len() < DELTA_MIN_BYTES {
                    continue;
                }
                let delta = Delta::between(old, new);
                if delta.encoded_len() * 2 <= new.len() {
                    moved.push((id.clone(), delta));
                }
            }
            for (id, delta) in moved {
                ids.remove(&id);
                patched.entry(ty.clone()).or_default().insert(id, delta);
            }
        }
        keys.retain(|_, ids| !ids.is_empty());
        (keys, patched)
    }

    /// Moves the state to sequence `seq` without applying anything: for a
    /// message of the session's subject that was refused (see
    /// [`crate::chain`]), so that the state's sequence is still the session's
    /// last message, which the next append is fenced on. Like
    /// [`SessionState::apply`], it ignores a sequence that is not newer.
    /// Returns whether the state moved.
    pub fn pass_over(&mut self, seq: u64) -> bool {
        if seq <= self.seq {
            return false;
        }
        self.seq = seq;
        true
    }

    /// Records an event that the log stored at `seq`. Applying an event whose
    /// sequence is not newer than the state's changes nothing, so replays and
    /// duplicates are harmless. Returns whether the event was applied.
    ///
    /// The one failure is a patch that does not fit the value it patches,
    /// which only a log inconsistent with this state can cause; the state is
    /// then left exactly as it was.
    pub fn apply(&mut self, seq: u64, event: &Event) -> Result<bool, ApplyError> {
        if seq <= self.seq {
            return Ok(false);
        }
        // Patches are resolved before anything changes, so a bad one leaves
        // the state untouched.
        let mut resolved: Vec<(&KeyType, &KeyId, Bytes)> = Vec::new();
        if let Change::KeysChanged { patched, .. } | Change::Restored { patched, .. } = &event.change {
            for (ty, ids) in patched {
                for (id, delta) in ids {
                    let base = self.keys.get(ty).and_then(|m| m.get(id));
                    let new = base.ok_or(WrongBase).and_then(|b| delta.apply(b));
                    let new = new.map_err(|_| ApplyError { seq, key: format!("{ty}/{id}") })?;
                    resolved.push((ty, id, new));
                }
            }
        }
        self.seq = seq;
        self.updated_at_ms = Some(event.at_ms);
        self.events += 1;
        match &event.change {
            Change::CredsPut { creds } => {
                let old = self.creds.replace(creds.clone()).map_or(0, |c| c.len());
                self.bytes = self.bytes - old as u64 + creds.len() as u64;
            }
            Change::KeysChanged { keys, .. } => self.apply_keys(keys, resolved),
            Change::Restored { creds, keys, .. } => {
                let old = std::mem::replace(&mut self.creds, creds.clone()).map_or(0, |c| c.len());
                self.bytes = self.bytes - old as u64 + creds.as_ref().map_or(0, |c| c.len() as u64);
                self.apply_keys(keys, resolved);
            }
            Change::SessionDeleted => {
                self.creds = None;
                self.keys.clear();
                self.bytes = 0;
                self.events = 0;
            }
        }
        Ok(true)
    }
}

impl SessionState {
    /// Writes the resolved patches, then the whole values and deletions, of
    /// one event's key changes.
    fn apply_keys(&mut self, keys: &KeyChanges, resolved: Vec<(&KeyType, &KeyId, Bytes)>) {
        for (ty, id, new) in resolved {
            let old = self.keys.entry(ty.clone()).or_default().insert(id.clone(), new.clone());
            self.bytes = self.bytes + new.len() as u64 - old.map_or(0, |v| v.len() as u64);
        }
        for (ty, ids) in keys {
            let of_type = self.keys.entry(ty.clone()).or_default();
            for (id, value) in ids {
                let old = match value {
                    Some(v) => {
                        self.bytes += v.len() as u64;
                        of_type.insert(id.clone(), v.clone())
                    }
                    None => of_type.remove(id),
                };
                self.bytes -= old.map_or(0, |v| v.len() as u64);
            }
            if of_type.is_empty() {
                self.keys.remove(ty);
            }
        }
    }

    /// Whether this state holds exactly the creds and keys of `other`
    /// (sequence and metadata aside).
    pub fn same_contents(&self, other: &SessionState) -> bool {
        let non_empty = |s: &SessionState| s.keys.iter().filter(|(_, m)| !m.is_empty()).count();
        self.creds == other.creds
            && non_empty(self) == non_empty(other)
            && other.keys.iter().filter(|(_, m)| !m.is_empty()).all(|(ty, m)| self.keys.get(ty) == Some(m))
    }

    /// Decides the one event that puts this state back to `target` — the
    /// session's state at sequence `to_seq` of its history (at the moment
    /// `to_ms`, when the operator named one): the creds of `target` whole,
    /// and every key that differs, set to its value then (as a delta when
    /// that is cheaper, as `handle` records rewrites) or deleted when it did
    /// not exist then. `None` when this state already holds what `target`
    /// holds: a restore that changes nothing writes nothing.
    ///
    /// Limits of a client's call do not apply: the event's size is bounded
    /// by the log alone, which refuses one too large for it.
    pub fn restore(&self, target: &SessionState, to_seq: u64, to_ms: Option<u64>, now_ms: u64, rid: Option<String>) -> Option<Event> {
        if self.same_contents(target) {
            return None;
        }
        let mut keys = KeyChanges::new();
        for (ty, ids) in &target.keys {
            let current = self.keys.get(ty);
            for (id, value) in ids {
                if current.and_then(|m| m.get(id)) != Some(value) {
                    keys.entry(ty.clone()).or_default().insert(id.clone(), Some(value.clone()));
                }
            }
        }
        for (ty, ids) in &self.keys {
            let then = target.keys.get(ty);
            for id in ids.keys() {
                if then.is_none_or(|m| !m.contains_key(id)) {
                    keys.entry(ty.clone()).or_default().insert(id.clone(), None);
                }
            }
        }
        let (keys, patched) = self.as_deltas(keys);
        Some(Event::new(now_ms, rid, Change::Restored { to_seq, to_ms, creds: target.creds.clone(), keys, patched }))
    }

    /// What a restore event changes in this state (the one it was decided
    /// against): the creds, and keys set or deleted per type. For reports:
    /// `None` for any other event.
    pub fn restore_summary(&self, event: &Event) -> Option<RestoreSummary> {
        let Change::Restored { creds, keys, patched, .. } = &event.change else { return None };
        let mut summary = RestoreSummary {
            creds: match (&self.creds, creds) {
                (a, b) if a == b => CredsRestore::Unchanged,
                (_, Some(_)) => CredsRestore::Set,
                (_, None) => CredsRestore::Removed,
            },
            keys: BTreeMap::new(),
        };
        for (ty, ids) in keys {
            let counts = summary.keys.entry(ty.to_string()).or_default();
            for value in ids.values() {
                match value {
                    Some(_) => counts.set += 1,
                    None => counts.deleted += 1,
                }
            }
        }
        for (ty, ids) in patched {
            summary.keys.entry(ty.to_string()).or_default().set += ids.len() as u64;
        }
        Some(summary)
    }
}

/// What a restore changes, for the operator's report: no value, no id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSummary {
    /// What happens to the creds.
    pub creds: CredsRestore,
    /// Per key type: how many keys are set (to their value at the point)
    /// and how many deleted (absent at the point).
    pub keys: BTreeMap<String, KeyCounts>,
}

/// Keys of one type a restore sets and deletes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCounts {
    /// Keys written back (changed or deleted since the point).
    pub set: u64,
    /// Keys deleted (created since the point).
    pub deleted: u64,
}

/// What a restore does to the creds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredsRestore {
    /// They are already what they were at the point.
    #[default]
    Unchanged,
    /// They are put back to what they were at the point.
    Set,
    /// The session had no creds at the point: they are removed.
    Removed,
}

/// Values at least this large are considered for recording as deltas.
const DELTA_MIN_BYTES: usize = 1024;

/// An event that cannot be applied to this state: it patches a value that
/// is absent or not the one the patch was computed against.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {seq} patches {key}, but the session's value is not the one the patch was made against")]
pub struct ApplyError {
    /// The event's sequence.
    pub seq: u64,
    /// `type/id` of the key.
    pub key: String,
}

fn limit(what: &'static str, max: usize, actual: usize) -> Result<(), DomainError> {
    if actual > max {
        return Err(DomainError::LimitExceeded { what, limit: max as u64, actual: actual as u64 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Given/when/then: given events applied, when a command is handled, then
    //! these events (or this error) result.

    use super::*;

    fn t(s: &str) -> KeyType {
        KeyType::parse(s).unwrap()
    }
    fn id(s: &str) -> KeyId {
        KeyId::parse(s).unwrap()
    }
    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }
    fn set(entries: &[(&str, &str, Option<&str>)]) -> KeyChanges {
        let mut keys = KeyChanges::new();
        for (ty, i, v) in entries {
            keys.entry(t(ty)).or_default().insert(id(i), v.map(b));
        }
        keys
    }

    struct Given(SessionState);

    fn given(cmds: Vec<Command>) -> Given {
        let mut state = SessionState::default();
        for (n, cmd) in cmds.into_iter().enumerate() {
            if let Some(ev) = state.handle(cmd, &Limits::default(), 1000 + n as u64, None).unwrap() {
                assert!(state.apply(state.seq() + 1, &ev).unwrap());
            }
        }
        Given(state)
    }

    impl Given {
        fn when(&self, cmd: Command) -> Result<Option<Event>, DomainError> {
            self.0.handle(cmd, &Limits::default(), 9, Some("r1".into()))
        }
    }

    fn listed(s: &SessionState, ty: &str, after: Option<&str>, limit: usize, max_bytes: usize) -> (Vec<String>, Option<String>) {
        let after = after.map(id);
        let (ids, next) = s.list_ids(&t(ty), after.as_ref(), limit, max_bytes);
        (ids.iter().map(|i| i.as_str().to_owned()).collect(), next.map(|n| n.as_str().to_owned()))
    }

    #[test]
    fn list_ids_pages_through_a_type_in_byte_order() {
        let names = ["b", "a", "10", "9", "1", "é", "Z", "a.b", "a:0"];
        let entries: Vec<(&str, &str, Option<&str>)> = names.iter().map(|n| ("session", *n, Some("v"))).collect();
        let Given(s) =
            given(vec![Command::SetKeys { keys: set(&entries) }, Command::SetKeys { keys: set(&[("pre-key", "x", Some("v"))]) }]);
        let mut sorted: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        assert_eq!(sorted, ["1", "10", "9", "Z", "a", "a.b", "a:0", "b", "é"], "byte order, not numeric or locale order");
        // All in one page: no cursor.
        assert_eq!(listed(&s, "session", None, 100, usize::MAX), (sorted.clone(), None));
        // Pages of 4: each starts strictly after the previous cursor.
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let (ids, next) = listed(&s, "session", after.as_deref(), 4, usize::MAX);
            assert!(ids.len() <= 4);
            pages += 1;
            all.extend(ids.clone());
            match next {
                Some(n) => {
                    assert_eq!(Some(&n), ids.last(), "the cursor is the page's last id");
                    after = Some(n);
                }
                None => break,
            }
        }
        assert_eq!((all, pages), (sorted.clone(), 3));
        // A page that ends exactly at the last id says so.
        assert_eq!(listed(&s, "session", None, 9, usize::MAX).1, None);
        assert_eq!(listed(&s, "session", None, 8, usize::MAX).1.as_deref(), Some("b"));
        // A cursor need not be a stored id.
        assert_eq!(listed(&s, "session", Some("a0"), 2, usize::MAX), (vec!["a:0".into(), "b".into()], Some("b".into())));
        assert_eq!(listed(&s, "session", Some("é"), 2, usize::MAX), (vec![], None));
        assert_eq!(listed(&s, "session", Some("zzz"), 2, usize::MAX), (vec!["é".into()], None));
        // Other types are apart; an absent type is an empty last page.
        assert_eq!(listed(&s, "pre-key", None, 10, usize::MAX), (vec!["x".into()], None));
        assert_eq!(listed(&s, "sender-key", None, 10, usize::MAX), (vec![], None));
        // A limit of 0 is taken as 1, so a page always moves forward.
        assert_eq!(listed(&s, "session", None, 0, usize::MAX), (vec!["1".into()], Some("1".into())));
    }

    #[test]
    fn list_ids_stops_at_the_byte_budget_but_always_moves_forward() {
        let long = ["a".repeat(300), "b".repeat(300), "c".repeat(300)];
        let entries: Vec<(&str, &str, Option<&str>)> = long.iter().map(|n| ("session", n.as_str(), Some("v"))).collect();
        let Given(s) = given(vec![Command::SetKeys { keys: set(&entries) }]);
        let (ids, next) = listed(&s, "session", None, 10, 700);
        assert_eq!(ids, long[..2]);
        assert_eq!(next.as_deref(), Some(long[1].as_str()), "cut by bytes: more follow");
        // A budget smaller than one id still returns that id.
        let (ids, next) = listed(&s, "session", None, 10, 10);
        assert_eq!((ids, next.as_deref()), (vec![long[0].clone()], Some(long[0].as_str())));
        let (ids, next) = listed(&s, "session", Some(&long[1]), 10, 10);
        assert_eq!((ids, next), (vec![long[2].clone()], None), "the last id fits exactly: no cursor");
    }

    #[test]
    fn deleted_keys_and_sessions_are_not_listed() {
        let Given(mut s) = given(vec![Command::SetKeys { keys: set(&[("pre-key", "1", Some("a")), ("pre-key", "2", Some("b"))]) }]);
        let ev = s.handle(Command::SetKeys { keys: set(&[("pre-key", "1", None)]) }, &Limits::default(), 5, None).unwrap().unwrap();
        s.apply(s.seq() + 1, &ev).unwrap();
        assert_eq!(listed(&s, "pre-key", None, 10, usize::MAX), (vec!["2".into()], None));
        let ev = s.handle(Command::DeleteSession, &Limits::default(), 6, None).unwrap().unwrap();
        s.apply(s.seq() + 1, &ev).unwrap();
        assert_eq!(listed(&s, "pre-key", None, 10, usize::MAX), (vec![], None));
    }

    #[test]
    fn a_page_over_the_id_limit_is_refused() {
        let limits = Limits { max_ids_per_call: 5, ..Limits::default() };
        assert_eq!(SessionState::check_list(&limits, 5), Ok(()));
        assert_eq!(
            SessionState::check_list(&limits, 6),
            Err(DomainError::LimitExceeded { what: "ids in one keys.list", limit: 5, actual: 6 })
        );
    }

    #[test]
    fn keys_set_is_one_event_with_every_type() {
        let ev = given(vec![])
            .when(Command::SetKeys { keys: set(&[("pre-key", "1", Some("a")), ("session", "x.0", Some("s"))]) })
            .unwrap()
            .unwrap();
        assert_eq!(ev.v, 1, "no patch: the lowest version, which the release before deltas reads");
        assert_eq!(ev.prev, None, "the log sets it");
        assert_eq!(ev.rid.as_deref(), Some("r1"));
        let Change::KeysChanged { keys, .. } = ev.change else { panic!("wrong change") };
        assert_eq!(keys.len(), 2);
    }

    #[test]
    fn unchanged_values_and_absent_deletes_write_nothing() {
        let g = given(vec![Command::SetKeys { keys: set(&[("pre-key", "1", Some("a"))]) }]);
        let none = g.when(Command::SetKeys { keys: set(&[("pre-key", "1", Some("a")), ("pre-key", "2", None)]) });
        assert_eq!(none, Ok(None));
        let some = g.when(Command::SetKeys { keys: set(&[("pre-key", "1", Some("a")), ("pre-key", "3", Some("c"))]) });
        let Change::KeysChanged { keys, .. } = some.unwrap().unwrap().change else { panic!() };
        assert_eq!(keys[&t("pre-key")].len(), 1, "only the new key is recorded");
    }

    #[test]
    fn deletes_and_sets_apply_together() {
        let Given(mut s) = given(vec![Command::SetKeys { keys: set(&[("pre-key", "1", Some("a")), ("pre-key", "2", Some("bb"))]) }]);
        let ev = s
            .handle(Command::SetKeys { keys: set(&[("pre-key", "1", None), ("session", "u.1", Some("xyz"))]) }, &Limits::default(), 5, None)
            .unwrap()
            .unwrap();
        s.apply(2, &ev).unwrap();
        assert!(s.get_keys(&t("pre-key"), [&id("1")]).is_empty());
        assert_eq!(s.get_keys(&t("pre-key"), [&id("2")]), vec![(id("2"), b("bb"))]);
        assert_eq!(s.get_keys(&t("session"), [&id("u.1"), &id("missing")]), vec![(id("u.1"), b("xyz"))]);
        let info = s.info();
        assert_eq!(info.bytes, 5);
        assert_eq!(info.keys.get("pre-key"), Some(&1));
        assert_eq!(info.events, 2);
    }

    #[test]
    fn a_limit_broken_anywhere_refuses_the_whole_call() {
        let limits = Limits { max_ids_per_call: 2, max_value_bytes: 4, max_set_bytes: 6 };
        let s = SessionState::default();
        let too_many = set(&[("a", "1", Some("x")), ("b", "2", Some("x")), ("c", "3", None)]);
        assert!(matches!(
            s.handle(Command::SetKeys { keys: too_many }, &limits, 0, None),
            Err(DomainError::LimitExceeded { limit: 2, actual: 3, .. })
        ));
        let too_big = set(&[("a", "1", Some("x")), ("b", "2", Some("12345"))]);
        assert!(matches!(s.handle(Command::SetKeys { keys: too_big }, &limits, 0, None), Err(DomainError::LimitExceeded { limit: 4, .. })));
        let too_much = set(&[("a", "1", Some("1234")), ("b", "2", Some("1234"))]);
        assert!(matches!(
            s.handle(Command::SetKeys { keys: too_much }, &limits, 0, None),
            Err(DomainError::LimitExceeded { limit: 6, .. })
        ));
        assert!(SessionState::check_get(&limits, 3).is_err());
    }

    #[test]
    fn apply_is_idempotent_and_ignores_older_events() {
        let mut s = SessionState::default();
        let put = |v: &str| Event::new(1, None, Change::CredsPut { creds: b(v) });
        assert!(s.apply(5, &put("new")).unwrap());
        assert!(!s.apply(5, &put("new")).unwrap(), "same sequence twice");
        assert!(!s.apply(3, &put("old")).unwrap(), "older event after a newer one");
        assert_eq!(s.creds(), Some(&b("new")));
        assert_eq!(s.seq(), 5);
    }

    #[test]
    fn delete_session_forgets_everything_and_is_a_noop_when_empty() {
        let g = given(vec![Command::PutCreds { creds: b("c") }, Command::SetKeys { keys: set(&[("pre-key", "1", Some("a"))]) }]);
        let mut s = g.0.clone();
        let ev = g.when(Command::DeleteSession).unwrap().unwrap();
        s.apply(10, &ev).unwrap();
        assert_eq!(s.creds(), None);
        assert!(!s.info().exists);
        assert_eq!(s.info().bytes, 0);
        assert_eq!(Given(s).when(Command::DeleteSession), Ok(None));
    }

    #[test]
    fn same_creds_twice_writes_once() {
        let g = given(vec![Command::PutCreds { creds: b("c") }]);
        assert_eq!(g.when(Command::PutCreds { creds: b("c") }), Ok(None));
        assert!(g.when(Command::PutCreds { creds: b("d") }).unwrap().is_some());
    }

    #[test]
    fn a_state_rebuilt_from_its_parts_equals_the_original() {
        let Given(s) = given(vec![
            Command::PutCreds { creds: b("creds") },
            Command::SetKeys { keys: set(&[("pre-key", "1", Some("a")), ("session", "u.1", Some("xyz"))]) },
            Command::SetKeys { keys: set(&[("pre-key", "1", None), ("pre-key", "2", Some("bb"))]) },
        ]);
        let parts: Vec<_> = s.iter_keys().map(|(t, i, v)| (t.clone(), i.clone(), v.clone())).collect();
        let rebuilt = SessionState::from_parts(s.seq(), s.creds().cloned(), parts, s.updated_at_ms(), s.events());
        assert_eq!(rebuilt, s);
        assert_eq!(rebuilt.info().bytes, 5 + 3 + 2);
        let empty = SessionState::from_parts(7, None, Vec::new(), Some(1), 0);
        assert!(!empty.info().exists);
        assert_eq!(empty.seq(), 7);
    }

    #[test]
    fn a_large_value_rewritten_with_a_small_change_is_recorded_as_a_delta() {
        let big: String = (0..4000).map(|i| format!("{i},")).collect();
        let mut bigger = big.clone();
        bigger.push_str("4000,");
        let g = given(vec![Command::SetKeys { keys: set(&[("sender-key", "g::u::0", Some(&big)), ("pre-key", "1", Some("a"))]) }]);
        let ev = g
            .when(Command::SetKeys {
                keys: set(&[("sender-key", "g::u::0", Some(&bigger)), ("pre-key", "1", Some("b")), ("pre-key", "2", Some("c"))]),
            })
            .unwrap()
            .unwrap();
        let Change::KeysChanged { keys, patched } = &ev.change else { panic!() };
        assert_eq!(ev.v, 2, "patches need version 2");
        assert_eq!(patched[&t("sender-key")].len(), 1, "the big value travels as a delta");
        assert!(!keys.contains_key(&t("sender-key")), "and not whole as well");
        assert_eq!(keys[&t("pre-key")].len(), 2, "small values stay whole");
        let Given(mut s) = g;
        let before = s.info().bytes;
        assert!(s.apply(s.seq() + 1, &ev).unwrap());
        assert_eq!(s.get_keys(&t("sender-key"), [&id("g::u::0")]), vec![(id("g::u::0"), b(&bigger))]);
        assert_eq!(s.info().bytes, before + 5 + 1, "byte count follows the patched value");
    }

    #[test]
    fn a_patch_that_does_not_fit_the_state_is_refused_and_changes_nothing() {
        let big: String = (0..4000).map(|i| format!("{i};")).collect();
        let g = given(vec![Command::SetKeys { keys: set(&[("sender-key", "k", Some(&big))]) }]);
        let ev = g
            .when(Command::SetKeys { keys: set(&[("sender-key", "k", Some(&format!("{big}x"))), ("pre-key", "9", Some("new"))]) })
            .unwrap()
            .unwrap();
        // The same event against a state whose value differs.
        let Given(mut other) = given(vec![Command::SetKeys { keys: set(&[("sender-key", "k", Some(&format!("{big}y")))]) }]);
        let snapshot = other.clone();
        let err = other.apply(other.seq() + 1, &ev).unwrap_err();
        assert_eq!(err.key, "sender-key/k");
        assert_eq!(other, snapshot, "nothing applied, not even the whole values");
    }

    #[test]
    fn unknown_schema_versions_are_refused_not_guessed() {
        let ev = Event { v: 7, ..Event::new(0, None, Change::SessionDeleted) };
        assert_eq!(ev.upgrade(), Err(7));
    }

    #[test]
    fn creds_and_deletions_are_version_1() {
        let g = given(vec![Command::SetKeys { keys: set(&[("pre-key", "1", Some("a"))]) }]);
        assert_eq!(g.when(Command::PutCreds { creds: b("c") }).unwrap().unwrap().v, 1);
        assert_eq!(g.when(Command::DeleteSession).unwrap().unwrap().v, 1);
    }

    #[test]
    fn a_refused_message_moves_the_sequence_and_nothing_else() {
        let Given(mut s) = given(vec![Command::PutCreds { creds: b("c") }]);
        let before = s.clone();
        assert!(s.pass_over(9));
        assert_eq!(s.seq(), 9);
        assert_eq!((s.creds(), s.info().events, s.updated_at_ms()), (before.creds(), before.info().events, before.updated_at_ms()));
        assert!(!s.pass_over(9), "not newer");
        assert!(!s.apply(8, &Event::new(1, None, Change::SessionDeleted)).unwrap(), "an older event changes nothing after it");
    }

    /// Applies `cmds` to `st` as the actor does, one sequence each.
    fn run(st: &mut SessionState, cmds: Vec<Command>) {
        for cmd in cmds {
            if let Some(ev) = st.handle(cmd, &Limits::default(), 2000 + st.seq(), None).unwrap() {
                assert!(st.apply(st.seq() + 1, &ev).unwrap());
            }
        }
    }

    #[test]
    fn a_restore_is_one_event_that_brings_back_the_state_at_its_point() {
        let big: String = (0..4000).map(|i| format!("{i},")).collect();
        let Given(mut s) = given(vec![
            Command::PutCreds { creds: b("creds-1") },
            Command::SetKeys { keys: set(&[("pre-key", "1", Some("a")), ("pre-key", "2", Some("b")), ("sender-key", "g", Some(&big))]) },
        ]);
        let then = s.clone();
        // What a buggy bot does afterwards: new creds, a key changed, one
        // deleted, one added, the large value rewritten a little.
        run(
            &mut s,
            vec![
                Command::PutCreds { creds: b("creds-2") },
                Command::SetKeys {
                    keys: set(&[
                        ("pre-key", "1", Some("A")),
                        ("pre-key", "2", None),
                        ("session", "x", Some("new")),
                        ("sender-key", "g", Some(&format!("{big}more,"))),
                    ]),
                },
            ],
        );
        let ev = s.restore(&then, then.seq(), Some(1234), 99, Some("rs-1".into())).expect("something to restore");
        assert_eq!(ev.v, 3, "a restore is schema 3: older readers refuse it by its version");
        assert_eq!(ev.kind(), "restored");
        assert_eq!(ev.rid.as_deref(), Some("rs-1"));
        let Change::Restored { to_seq, to_ms, creds, keys, patched } = &ev.change else { panic!("not a restore") };
        assert_eq!((*to_seq, *to_ms, creds.as_ref()), (then.seq(), Some(1234), Some(&b("creds-1"))));
        assert_eq!(keys[&t("pre-key")].get(&id("1")), Some(&Some(b("a"))), "changed since: set back");
        assert_eq!(keys[&t("pre-key")].get(&id("2")), Some(&Some(b("b"))), "deleted since: set back");
        assert_eq!(keys[&t("session")].get(&id("x")), Some(&None), "created since: deleted");
        assert_eq!(patched[&t("sender-key")].len(), 1, "a large value rewritten a little travels as a delta");
        let summary = s.restore_summary(&ev).unwrap();
        assert_eq!(summary.creds, CredsRestore::Set);
        assert_eq!(summary.keys["pre-key"], KeyCounts { set: 2, deleted: 0 });
        assert_eq!(summary.keys["session"], KeyCounts { set: 0, deleted: 1 });
        assert_eq!(summary.keys["sender-key"], KeyCounts { set: 1, deleted: 0 });
        let events_before = s.events();
        assert!(s.apply(s.seq() + 1, &ev).unwrap());
        assert!(s.same_contents(&then), "creds and every key as they were at the point");
        let rebuilt = SessionState::from_parts(
            s.seq(),
            then.creds().cloned(),
            then.iter_keys().map(|(t, i, v)| (t.clone(), i.clone(), v.clone())),
            s.updated_at_ms(),
            s.events(),
        );
        assert_eq!(s, rebuilt, "byte counts and types follow as well");
        assert_eq!((s.events(), s.updated_at_ms()), (events_before + 1, Some(99)), "the restore is one more event of the session");
        // Once there, restoring again changes nothing.
        assert_eq!(s.restore(&then, then.seq(), None, 100, None), None);
    }

    #[test]
    fn a_restore_to_before_a_deletion_or_to_no_creds_puts_that_back() {
        let Given(mut s) = given(vec![Command::SetKeys { keys: set(&[("pre-key", "1", Some("a"))]) }]);
        let no_creds_yet = s.clone();
        run(&mut s, vec![Command::PutCreds { creds: b("c") }]);
        let before_logout = s.clone();
        run(&mut s, vec![Command::DeleteSession, Command::PutCreds { creds: b("fresh") }]);
        // Back to before the logout: the deleted key and the creds return.
        let ev = s.restore(&before_logout, before_logout.seq(), None, 5, None).unwrap();
        assert_eq!(s.restore_summary(&ev).unwrap().creds, CredsRestore::Set);
        let mut after = s.clone();
        after.apply(after.seq() + 1, &ev).unwrap();
        assert!(after.same_contents(&before_logout));
        // Back to before the creds were first written: they are removed.
        let ev = s.restore(&no_creds_yet, no_creds_yet.seq(), None, 6, None).unwrap();
        assert_eq!(s.restore_summary(&ev).unwrap().creds, CredsRestore::Removed);
        s.apply(s.seq() + 1, &ev).unwrap();
        assert!(s.same_contents(&no_creds_yet));
        assert_eq!((s.creds(), s.info().bytes), (None, 1));
    }

    #[test]
    fn other_events_have_no_restore_summary() {
        let s = SessionState::default();
        assert_eq!(s.restore_summary(&Event::new(1, None, Change::SessionDeleted)), None);
        assert!(!Event::new(1, None, Change::SessionDeleted).touches_creds());
    }
}
