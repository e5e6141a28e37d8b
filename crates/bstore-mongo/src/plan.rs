//! The pure half of writing a batch: given the batch's events and the
//! documents read for it ([`Seen`]), which events are out of place
//! ([`displaced`]), which guarded writes to make ([`plan`]), and, from what
//! those writes did, which to make next ([`Plan::settle`],
//! [`Plan::late_tombstones`]). No I/O: the writer in `store.rs` reads,
//! calls these, and sends what they say.
//!
//! The module documentation of `store.rs` says why each write is safe
//! under every interleaving of instances; the steps here are its steps:
//! deletions raise their session's reset register first (step 1), then
//! every register, tombstone and key is written (step 2), then each key
//! written is checked against the reset register read again (step 3), then
//! the counts are recomputed (step 4).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bstore_domain::{Change, KeyId, KeyType, SessionKey};
use bytes::Bytes;

use crate::MongoError;
use crate::store::{Applied, LoggedEvent};

/// A key: its session, type and id.
pub(crate) type KeyPlace = (SessionKey, KeyType, KeyId);

/// A key document as read: its sequence and whether it holds a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyMark {
    pub seq: u64,
    pub live: bool,
}

/// A session document's registers as read (0: absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SessionMarks {
    pub seq: u64,
    pub creds_seq: u64,
    pub reset_seq: u64,
    pub reset_at_ms: u64,
    /// The newest event passed over (refused by the chain check).
    pub passed_seq: u64,
}

impl SessionMarks {
    /// The newest of the session's messages materialized: applied or
    /// passed over.
    pub fn last(&self) -> u64 {
        self.seq.max(self.passed_seq)
    }
}

/// The value a key document held, for the patches of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Base {
    /// It opened.
    Value(Bytes),
    /// It did not open (tampered, moved, sealed under a key not in the
    /// ring): why, naming no id and no value.
    Unreadable(String),
}

/// The documents read for one batch, each once: the session documents of
/// its sessions, the key documents of the keys it touches, and the values of
/// those it patches.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    pub sessions: HashMap<SessionKey, SessionMarks>,
    pub keys: HashMap<KeyPlace, KeyMark>,
    /// Live documents of patched keys only.
    pub bases: HashMap<KeyPlace, Base>,
}

/// One key's newest change in the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyOp {
    pub seq: u64,
    pub at_ms: u64,
    /// `None`: deleted.
    pub value: Option<Bytes>,
}

/// One event as the session document's `seq` register records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    pub seq: u64,
    pub at_ms: u64,
    pub deleted: bool,
}

/// A write to one register of a session document, guarded by the
/// register's sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionWrite {
    /// Raises the reset register to a deletion's.
    Reset { session: SessionKey, seq: u64, at_ms: u64 },
    /// The newest event: sequence, time, whether it deleted.
    Last { session: SessionKey, last: Mark },
    /// The creds as of `seq`: put, or removed by a deletion.
    Creds { session: SessionKey, seq: u64, creds: Option<Bytes> },
    /// The newest event passed over: refused, so the session's last message
    /// without applying it (as the log's readers do).
    PassOver { session: SessionKey, seq: u64 },
}

/// An event out of its place in the log, refused: its stream sequence and
/// why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Displaced {
    pub session: SessionKey,
    pub seq: u64,
    pub reason: String,
}

/// Splits off the events of `batch` that are out of place: an event whose
/// `prev` (the sequence of its session's previous event when it was
/// appended) is below a message of its session that precedes it — the
/// session document's last materialized one (when older than the event) or
/// an earlier event of the batch. That is a copy of an older event
/// published again at the end of the subject: applied, it would roll the
/// session back. A legitimate event's `prev` is the newest message of its
/// session before it, so it is never below one.
///
/// With several instances applying batches out of order, a copy can pass
/// when no message between its original place and itself has been
/// materialized yet, or when newer events were; the log's readers refuse it
/// in either case, and `verify` then reports the difference. Events
/// written before the chain (no `prev`) are not checked.
pub(crate) fn displaced(batch: Vec<LoggedEvent>, seen: &Seen) -> (Vec<LoggedEvent>, Vec<Displaced>) {
    let mut events = batch;
    events.sort_by_key(|e| e.seq);
    events.dedup_by_key(|e| e.seq);
    let mut last: HashMap<SessionKey, u64> = HashMap::new();
    let (mut kept, mut refused) = (Vec::with_capacity(events.len()), Vec::new());
    for e in events {
        let stored = seen.sessions.get(&e.session).map_or(0, SessionMarks::last);
        let before = last.get(&e.session).copied().unwrap_or(0).max(if stored < e.seq { stored } else { 0 });
        last.insert(e.session.clone(), e.seq);
        match e.event.prev {
            Some(prev) if prev < before => refused.push(Displaced {
                session: e.session,
                seq: e.seq,
                reason: format!("it was appended after sequence {prev} but follows {before}: a copy of an older event"),
            }),
            _ => kept.push(e),
        }
    }
    (kept, refused)
}

/// A deletion's tombstones: every key document of the session older than it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wipe {
    pub session: SessionKey,
    pub seq: u64,
    pub at_ms: u64,
}

/// One key's change. `expect`: the document as read, for a compare-and-set
/// on its sequence (no upsert); `None`: guarded by `seq < new` alone, with
/// upsert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyWrite {
    pub place: KeyPlace,
    pub op: KeyOp,
    pub expect: Option<KeyMark>,
}

/// One key document made a tombstone of the deletion at `seq`, if older.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tombstone {
    pub place: KeyPlace,
    pub seq: u64,
    pub at_ms: u64,
}

/// What one guarded write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It created the document.
    Inserted,
    /// It matched a document older than the write and brought it forward.
    Matched,
    /// It matched nothing: the document is as new or newer (or absent, for
    /// a write without upsert).
    Missed,
}

/// The writes of one batch, step by step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Step 1: reset registers raised by deletions.
    pub resets: Vec<SessionWrite>,
    /// Whether the batch deletes a session.
    pub deletes: bool,
    /// Step 2: the other registers of the session documents.
    pub registers: Vec<SessionWrite>,
    /// Step 2: the deletions' tombstones.
    pub wipes: Vec<Wipe>,
    /// Step 2: the keys.
    pub keys: Vec<KeyWrite>,
    /// Step 4: sessions whose counts per type must be recomputed.
    pub recount: BTreeSet<SessionKey>,
    /// What the batch wrote so far.
    pub stats: Applied,
    /// Every key change of the batch, for step 3.
    changes: BTreeMap<KeyPlace, KeyOp>,
}

/// What a batch brings to one session document, register by register.
struct SessionPlan {
    /// The newest event.
    last: Mark,
    /// The newest creds put (`Some`) or deletion (`None`).
    creds: Option<(u64, Option<Bytes>)>,
    /// The newest deletion: sequence and time.
    reset: Option<(u64, u64)>,
}

/// The writes of `batch` given what `seen` read. Repeats are removed and
/// the batch taken in sequence order; a write `seen` shows dead (its
/// document or register already as new) is left out, because a sequence
/// only ever rises and it stays dead. Events must hold whole values only
/// (the materializer resolves patches first).
pub(crate) fn plan(batch: &[LoggedEvent], passed: &[Displaced], seen: &Seen) -> Result<Plan, MongoError> {
    let mut events: Vec<&LoggedEvent> = batch.iter().collect();
    events.sort_by_key(|e| e.seq);
    events.dedup_by_key(|e| e.seq);
    let mut out = Plan { stats: Applied { events: events.len() + passed.len(), ..Default::default() }, ..Default::default() };
    let marks = |s: &SessionKey| seen.sessions.get(s).copied().unwrap_or_default();

    let mut pass_overs: BTreeMap<&SessionKey, u64> = BTreeMap::new();
    for d in passed {
        let newest = pass_overs.entry(&d.session).or_default();
        *newest = (*newest).max(d.seq);
    }
    for (session, seq) in pass_overs {
        if seq > marks(session).passed_seq {
            out.registers.push(SessionWrite::PassOver { session: session.clone(), seq });
        } else {
            out.stats.already_applied += 1;
        }
    }

    // Collapse the batch: per session the newest event of each register,
    // per key the newest change; a deletion of the session turns every
    // earlier change of the batch into a tombstone at its sequence.
    let mut sessions: BTreeMap<SessionKey, SessionPlan> = BTreeMap::new();
    for e in &events {
        let reset_before = marks(&e.session).reset_seq;
        let plan = sessions.entry(e.session.clone()).or_insert(SessionPlan { last: Mark::default(), creds: None, reset: None });
        let deleted = matches!(e.event.change, Change::SessionDeleted);
        plan.last = Mark { seq: e.seq, at_ms: e.event.at_ms, deleted };
        match &e.event.change {
            Change::CredsPut { creds } => plan.creds = Some((e.seq, Some(creds.clone()))),
            Change::KeysChanged { patched, .. } | Change::Restored { patched, .. } if !patched.is_empty() => {
                return Err(MongoError::Unreadable(format!("event {} of {} still holds patches", e.seq, e.session)));
            }
            // A restore sets the creds register (to none, when the point had
            // none) and changes keys as a `keys.set` does.
            Change::KeysChanged { keys, .. } | Change::Restored { keys, .. } => {
                if let Change::Restored { creds, .. } = &e.event.change {
                    plan.creds = Some((e.seq, creds.clone()));
                }
                if e.seq <= reset_before {
                    out.stats.already_applied += 1;
                    continue;
                }
                for (ty, ids) in keys {
                    for (kid, value) in ids {
                        let op = KeyOp { seq: e.seq, at_ms: e.event.at_ms, value: value.clone() };
                        out.changes.insert((e.session.clone(), ty.clone(), kid.clone()), op);
                    }
                }
            }
            Change::SessionDeleted => {
                plan.creds = Some((e.seq, None));
                plan.reset = Some((e.seq, e.event.at_ms));
                for ((s, _, _), op) in out.changes.iter_mut() {
                    if *s == e.session && op.seq < e.seq {
                        *op = KeyOp { seq: e.seq, at_ms: e.event.at_ms, value: None };
                    }
                }
            }
        }
    }

    for (session, plan) in &sessions {
        let mark = marks(session);
        // Step 1: a deletion raises its session's reset register before it
        // tombstones anything, so that a key writer coming after that point
        // sees the deletion in its own step 3.
        if let Some((seq, at_ms)) = plan.reset {
            out.deletes = true;
            if seq > mark.reset_seq {
                out.resets.push(SessionWrite::Reset { session: session.clone(), seq, at_ms });
            }
            // A deletion at or above the known reset sequence tombstones
            // again even when that sequence was already raised: the instance
            // that raised it may have died before its tombstones were
            // written. One below it is covered by the newer deletion's own.
            if seq >= mark.reset_seq {
                out.wipes.push(Wipe { session: session.clone(), seq, at_ms });
                out.recount.insert(session.clone());
            }
        }
        if plan.last.seq > mark.seq {
            out.registers.push(SessionWrite::Last { session: session.clone(), last: plan.last });
        } else {
            out.stats.already_applied += 1;
        }
        if let Some((seq, creds)) = &plan.creds {
            if *seq > mark.creds_seq {
                out.registers.push(SessionWrite::Creds { session: session.clone(), seq: *seq, creds: creds.clone() });
            } else {
                out.stats.already_applied += 1;
            }
        }
    }

    for (place, op) in &out.changes {
        match seen.keys.get(place).copied() {
            // Already as new: this event (an earlier, maybe unfinished,
            // attempt of this batch) or a newer one wrote it. Whether the
            // counts caught up with that write is unknown: recount.
            Some(b) if b.seq >= op.seq => {
                out.stats.already_applied += 1;
                out.recount.insert(place.0.clone());
            }
            // Compare-and-set on the sequence read: when it matches, the
            // document replaced is exactly the one read, so whether a key
            // appeared or disappeared is known.
            expect => out.keys.push(KeyWrite { place: place.clone(), op: op.clone(), expect }),
        }
    }
    out.stats.session_writes = out.resets.len() + out.registers.len();
    out.stats.session_wipes = out.wipes.len();
    out.stats.key_writes = out.keys.len();
    Ok(out)
}

impl Plan {
    /// Step 2 done: given what each of [`Plan::keys`] did, the key writes to
    /// send again, guarded by sequence alone (another instance changed the
    /// document after it was read), and the sessions to recount (the set of
    /// live keys may have changed in a way the write does not tell).
    pub(crate) fn settle(&mut self, outcomes: &[Outcome]) -> Vec<KeyWrite> {
        let mut again = Vec::new();
        for (w, outcome) in self.keys.iter().zip(outcomes) {
            let live = w.op.value.is_some();
            // Whether the write is known to have left the set of live keys
            // as it was.
            let same_keys = match (w.expect, outcome) {
                (Some(b), Outcome::Matched) => b.live == live,
                (None, Outcome::Inserted) => !live,
                (Some(_), _) => {
                    again.push(KeyWrite { expect: None, ..w.clone() });
                    false
                }
                (None, Outcome::Missed) => {
                    self.stats.already_applied += 1;
                    false
                }
                (None, Outcome::Matched) => false,
            };
            if !same_keys {
                self.recount.insert(w.place.0.clone());
            }
        }
        again
    }

    /// The sessions whose reset register step 3 reads again.
    pub(crate) fn sessions_with_keys(&self) -> Vec<SessionKey> {
        self.changes.keys().map(|(s, _, _)| s.clone()).collect::<BTreeSet<_>>().into_iter().collect()
    }

    /// Step 3: given the reset registers read after the key writes, the
    /// tombstones to write: a deletion newer than a key that raised its
    /// register in the meantime may have tombstoned before the key was
    /// written, so the key is tombstoned here (guarded, so a newer write
    /// survives).
    pub(crate) fn late_tombstones(&mut self, after: &HashMap<SessionKey, SessionMarks>) -> Vec<Tombstone> {
        let mut out = Vec::new();
        for (place, op) in &self.changes {
            let Some(mark) = after.get(&place.0) else { continue };
            if op.seq < mark.reset_seq {
                let at_ms = if mark.reset_at_ms > 0 { mark.reset_at_ms } else { op.at_ms };
                out.push(Tombstone { place: place.clone(), seq: mark.reset_seq, at_ms });
                self.recount.insert(place.0.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    //! Given the documents read, when a batch is planned (and its writes
    //! report back), then these writes.

    use bstore_domain::{Event, KeyChanges};

    use super::*;

    fn s(name: &str) -> SessionKey {
        SessionKey::parse("t", name).unwrap()
    }

    fn place(session: &str, ty: &str, id: &str) -> KeyPlace {
        (s(session), KeyType::parse(ty).unwrap(), KeyId::parse(id).unwrap())
    }

    fn event(session: &str, seq: u64, change: Change) -> LoggedEvent {
        LoggedEvent { seq, session: s(session), event: Event { v: 1, at_ms: 1000 + seq, rid: None, prev: None, change } }
    }

    fn keys(session: &str, seq: u64, entries: &[(&str, &str, Option<&str>)]) -> LoggedEvent {
        let mut keys = KeyChanges::new();
        for (ty, id, v) in entries {
            keys.entry(KeyType::parse(ty).unwrap())
                .or_default()
                .insert(KeyId::parse(id).unwrap(), v.map(|v| Bytes::copy_from_slice(v.as_bytes())));
        }
        event(session, seq, Change::KeysChanged { keys, patched: Default::default() })
    }

    fn creds(session: &str, seq: u64, v: &str) -> LoggedEvent {
        event(session, seq, Change::CredsPut { creds: Bytes::copy_from_slice(v.as_bytes()) })
    }

    fn deleted(session: &str, seq: u64) -> LoggedEvent {
        event(session, seq, Change::SessionDeleted)
    }

    fn op(seq: u64, v: Option<&str>) -> KeyOp {
        KeyOp { seq, at_ms: 1000 + seq, value: v.map(|v| Bytes::copy_from_slice(v.as_bytes())) }
    }

    fn last(session: &str, seq: u64, deleted: bool) -> SessionWrite {
        SessionWrite::Last { session: s(session), last: Mark { seq, at_ms: 1000 + seq, deleted } }
    }

    #[test]
    fn given_nothing_a_batch_writes_each_register_and_key_once_with_its_newest_change() {
        let batch = [
            creds("a", 1, "c1"),
            keys("a", 2, &[("pre-key", "1", Some("p1")), ("pre-key", "2", Some("p2"))]),
            keys("a", 3, &[("pre-key", "1", None)]),
            creds("a", 4, "c4"),
            creds("a", 4, "c4"), // a repeat
        ];
        let p = plan(&batch, &[], &Seen::default()).unwrap();
        assert_eq!(p.resets, vec![]);
        assert_eq!(
            p.registers,
            vec![last("a", 4, false), SessionWrite::Creds { session: s("a"), seq: 4, creds: Some(Bytes::from_static(b"c4")) }]
        );
        assert_eq!(
            p.keys,
            vec![
                KeyWrite { place: place("a", "pre-key", "1"), op: op(3, None), expect: None },
                KeyWrite { place: place("a", "pre-key", "2"), op: op(2, Some("p2")), expect: None },
            ]
        );
        assert!(p.wipes.is_empty() && p.recount.is_empty());
        assert_eq!(p.stats, Applied { events: 4, key_writes: 2, session_writes: 2, ..Default::default() });
    }

    #[test]
    fn a_restore_sets_the_creds_register_and_writes_and_tombstones_its_keys() {
        let mut changes = KeyChanges::new();
        let ty = KeyType::parse("pre-key").unwrap();
        changes.entry(ty.clone()).or_default().insert(KeyId::parse("1").unwrap(), Some(Bytes::from_static(b"back")));
        changes.entry(ty).or_default().insert(KeyId::parse("2").unwrap(), None);
        let restore = |seq, creds: Option<&'static [u8]>| {
            let change = Change::Restored {
                to_seq: 1,
                to_ms: None,
                creds: creds.map(Bytes::from_static),
                keys: changes.clone(),
                patched: Default::default(),
            };
            event("a", seq, change)
        };
        let batch = [creds("a", 1, "c1"), keys("a", 2, &[("pre-key", "2", Some("new"))]), restore(3, None)];
        let p = plan(&batch, &[], &Seen::default()).unwrap();
        assert_eq!(p.registers, vec![last("a", 3, false), SessionWrite::Creds { session: s("a"), seq: 3, creds: None }], "creds removed");
        assert_eq!(
            p.keys,
            vec![
                KeyWrite { place: place("a", "pre-key", "1"), op: op(3, Some("back")), expect: None },
                KeyWrite { place: place("a", "pre-key", "2"), op: op(3, None), expect: None },
            ]
        );
        let p = plan(&[restore(4, Some(b"c0"))], &[], &Seen::default()).unwrap();
        assert!(p.registers.contains(&SessionWrite::Creds { session: s("a"), seq: 4, creds: Some(Bytes::from_static(b"c0")) }));
    }

    #[test]
    fn given_documents_as_new_as_the_batch_nothing_is_written_but_the_session_is_recounted() {
        let batch = [creds("a", 1, "c"), keys("a", 2, &[("pre-key", "1", Some("p1"))])];
        let seen = Seen {
            sessions: HashMap::from([(s("a"), SessionMarks { seq: 2, creds_seq: 1, ..Default::default() })]),
            keys: HashMap::from([(place("a", "pre-key", "1"), KeyMark { seq: 2, live: true })]),
            bases: HashMap::new(),
        };
        let p = plan(&batch, &[], &seen).unwrap();
        assert!(p.registers.is_empty() && p.keys.is_empty(), "{p:?}");
        // Whoever wrote the key may have died before its recount.
        assert_eq!(p.recount, BTreeSet::from([s("a")]));
        assert_eq!(p.stats.already_applied, 3);
    }

    #[test]
    fn given_an_older_key_document_the_write_compares_and_sets_on_its_sequence() {
        let seen = Seen { keys: HashMap::from([(place("a", "pre-key", "1"), KeyMark { seq: 3, live: true })]), ..Default::default() };
        let mut p = plan(&[keys("a", 5, &[("pre-key", "1", None)])], &[], &seen).unwrap();
        let expect = Some(KeyMark { seq: 3, live: true });
        assert_eq!(p.keys, vec![KeyWrite { place: place("a", "pre-key", "1"), op: op(5, None), expect }]);

        // When it landed on the document read, a key disappeared: recount.
        assert_eq!(p.clone().settle(&[Outcome::Matched]), vec![]);
        // When another instance changed the document in between, it is sent
        // again guarded by sequence alone, and the session recounted.
        let again = p.settle(&[Outcome::Missed]);
        assert_eq!(again, vec![KeyWrite { place: place("a", "pre-key", "1"), op: op(5, None), expect: None }]);
        assert_eq!(p.recount, BTreeSet::from([s("a")]));
    }

    #[test]
    fn when_a_write_lands_as_read_and_leaves_the_live_keys_as_they_were_no_recount() {
        let seen = Seen { keys: HashMap::from([(place("a", "pre-key", "1"), KeyMark { seq: 3, live: true })]), ..Default::default() };
        let mut p = plan(&[keys("a", 5, &[("pre-key", "1", Some("v"))])], &[], &seen).unwrap();
        assert_eq!(p.settle(&[Outcome::Matched]), vec![]);
        assert!(p.recount.is_empty());
        // A first write that found the document made by someone else in the
        // meantime (as new or newer) is already applied.
        let mut p = plan(&[keys("b", 5, &[("pre-key", "1", Some("v"))])], &[], &Seen::default()).unwrap();
        p.settle(&[Outcome::Missed]);
        assert_eq!((p.stats.already_applied, p.recount.len()), (1, 1));
    }

    #[test]
    fn a_deletion_raises_the_reset_first_turns_earlier_changes_into_tombstones_and_wipes() {
        let batch = [
            keys("c", 10, &[("pre-key", "1", Some("x")), ("pre-key", "2", Some("y"))]),
            deleted("c", 11),
            keys("c", 12, &[("pre-key", "2", Some("z"))]),
        ];
        let p = plan(&batch, &[], &Seen::default()).unwrap();
        assert!(p.deletes);
        assert_eq!(p.resets, vec![SessionWrite::Reset { session: s("c"), seq: 11, at_ms: 1011 }]);
        assert_eq!(p.wipes, vec![Wipe { session: s("c"), seq: 11, at_ms: 1011 }]);
        assert_eq!(p.registers, vec![last("c", 12, false), SessionWrite::Creds { session: s("c"), seq: 11, creds: None }]);
        assert_eq!(
            p.keys,
            vec![
                KeyWrite { place: place("c", "pre-key", "1"), op: KeyOp { seq: 11, at_ms: 1011, value: None }, expect: None },
                KeyWrite { place: place("c", "pre-key", "2"), op: op(12, Some("z")), expect: None },
            ]
        );
        assert_eq!(p.recount, BTreeSet::from([s("c")]));
    }

    #[test]
    fn given_a_raised_reset_a_redelivered_deletion_wipes_again_and_older_key_changes_are_dropped() {
        let seen = Seen {
            sessions: HashMap::from([(
                s("b"),
                SessionMarks { seq: 4, creds_seq: 4, reset_seq: 4, reset_at_ms: 1004, ..Default::default() },
            )]),
            ..Default::default()
        };
        let p = plan(&[keys("b", 3, &[("pre-key", "K", Some("v"))]), deleted("b", 4)], &[], &seen).unwrap();
        // The instance that raised it may have died before its tombstones.
        assert_eq!(p.resets, vec![]);
        assert_eq!(p.wipes, vec![Wipe { session: s("b"), seq: 4, at_ms: 1004 }]);
        assert!(p.keys.is_empty() && p.registers.is_empty(), "{p:?}");
        // A deletion below the known reset adds nothing: the newer one's
        // tombstones cover it.
        let p = plan(&[deleted("b", 2)], &[], &seen).unwrap();
        assert!(p.deletes && p.resets.is_empty() && p.wipes.is_empty() && p.registers.is_empty(), "{p:?}");
    }

    #[test]
    fn when_a_deletion_raised_the_reset_meanwhile_the_older_keys_written_are_tombstoned() {
        let mut p =
            plan(&[keys("a", 3, &[("pre-key", "K", Some("v3"))]), keys("a", 6, &[("pre-key", "L", Some("v6"))])], &[], &Seen::default())
                .unwrap();
        assert_eq!(p.sessions_with_keys(), vec![s("a")]);
        let after = HashMap::from([(s("a"), SessionMarks { seq: 5, reset_seq: 5, reset_at_ms: 1005, ..Default::default() })]);
        assert_eq!(p.late_tombstones(&after), vec![Tombstone { place: place("a", "pre-key", "K"), seq: 5, at_ms: 1005 }]);
        assert_eq!(p.recount, BTreeSet::from([s("a")]));
        // No deletion since: nothing.
        let mut p = plan(&[keys("a", 3, &[("pre-key", "K", Some("v3"))])], &[], &Seen::default()).unwrap();
        assert_eq!(p.late_tombstones(&HashMap::from([(s("a"), SessionMarks::default())])), vec![]);
    }

    fn chained(mut e: LoggedEvent, prev: u64) -> LoggedEvent {
        e.event.prev = Some(prev);
        e
    }

    #[test]
    fn given_a_session_materialized_past_its_predecessor_a_copy_at_the_end_is_refused_and_passed_over() {
        let seen =
            Seen { sessions: HashMap::from([(s("a"), SessionMarks { seq: 7, creds_seq: 7, ..Default::default() })]), ..Default::default() };
        // The creds of 3 (whose predecessor was 2) published again at 9.
        let copy = chained(creds("a", 9, "old"), 2);
        let fits = chained(keys("a", 10, &[("pre-key", "1", Some("v"))]), 9);
        let unchained = creds("a", 11, "pre-chain");
        let (kept, refused) = displaced(vec![fits.clone(), copy, unchained.clone()], &seen);
        assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![10, 11]);
        let reason = "it was appended after sequence 2 but follows 7: a copy of an older event".to_string();
        assert_eq!(refused, vec![Displaced { session: s("a"), seq: 9, reason }]);

        let p = plan(&kept, &refused, &seen).unwrap();
        assert!(p.registers.contains(&SessionWrite::PassOver { session: s("a"), seq: 9 }), "{p:?}");
        assert!(!p.registers.iter().any(|w| matches!(w, SessionWrite::Creds { seq: 9, .. })), "{p:?}");
        // Passed over once already: not written again.
        let seen = Seen {
            sessions: HashMap::from([(s("a"), SessionMarks { seq: 7, passed_seq: 9, ..Default::default() })]),
            ..Default::default()
        };
        let p = plan(&[], &refused, &seen).unwrap();
        assert!(p.registers.is_empty() && p.stats.already_applied == 1, "{p:?}");
    }

    #[test]
    fn an_event_is_checked_against_earlier_events_of_its_batch_and_not_against_newer_documents() {
        // 4 and the copy (of an event appended after 3) in one batch.
        let batch = vec![chained(creds("a", 4, "c4"), 3), chained(creds("a", 6, "c-old"), 3), chained(creds("a", 7, "c7"), 6)];
        let (kept, refused) = displaced(batch, &Seen::default());
        assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 7]);
        assert_eq!(refused.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![6]);
        // Below what the document holds, an event is a redelivery or late:
        // the guards decide, not the chain (its predecessor is older still).
        let seen = Seen { sessions: HashMap::from([(s("a"), SessionMarks { seq: 9, ..Default::default() })]), ..Default::default() };
        let (kept, refused) = displaced(vec![chained(creds("a", 5, "c5"), 4)], &seen);
        assert_eq!((kept.len(), refused.len()), (1, 0));
        // Another session's messages do not count.
        let seen = Seen { sessions: HashMap::from([(s("b"), SessionMarks { seq: 9, ..Default::default() })]), ..Default::default() };
        let (kept, _) = displaced(vec![chained(creds("a", 12, "c"), 0)], &seen);
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn an_event_still_holding_patches_is_not_planned() {
        let mut patched = bstore_domain::KeyPatches::new();
        let delta = bstore_domain::delta::Delta::between(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab");
        patched.entry(KeyType::parse("pre-key").unwrap()).or_default().insert(KeyId::parse("1").unwrap(), delta);
        let e = event("a", 1, Change::KeysChanged { keys: Default::default(), patched });
        assert!(matches!(plan(&[e], &[], &Seen::default()), Err(MongoError::Unreadable(_))));
    }
}
