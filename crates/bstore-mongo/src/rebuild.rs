//! Rebuilding Mongo from the log in time proportional to the sessions'
//! states, not to their histories, while every instance's materializer
//! keeps running.
//!
//! [`Materializer::rebuild`] notes the stream's last sequence `T`, then for
//! each session of the log:
//!
//! 1. folds it ([`EventLog::fold`]) from its newest usable snapshot plus the
//!    events after it — or, with `from_scratch`, from its first kept event
//!    (the base snapshot under a retention) — to its state at `S ≥` its last
//!    event through `T`;
//! 2. **overwrites** its documents with that state, whatever they hold (a
//!    deleted, tampered or unreadable copy is replaced): the session
//!    document's registers at `S` — `reset_seq = S` among them, because the
//!    state stands for every key change through `S` the way a deletion
//!    stands for what it removed — then, read after that, every key document
//!    of the session: the state's keys written at `S`, the others made
//!    tombstones at `S`;
//! 3. reads the session's last sequence again; if events came after `S`, it
//!    folds them into the state (at `L`) and writes that state **guarded**,
//!    like an event at `L`: reset register first, then every register, key
//!    and tombstone only over what is older than `L` — and each of the
//!    state's keys also over a tombstone at exactly `L`, which only a key
//!    writer's re-read of the raised reset register (W3) can have left;
//! 4. recounts the session and drops its quarantine records through `S`.
//!
//! Why this is correct while other instances materialize the same sessions:
//! a running materializer writes only events it read from the log, so any
//! of its writes that step 2 replaced was of an event already in the log
//! when step 3 reads it — step 3 writes it back (guarded, so a newer write
//! stays). Its writes that land after step 2 are guarded by sequence
//! against documents at `S`: those of events through `S` (which the state
//! holds already) match nothing, or, for a key the state lacks and no
//! document names, are dropped by the reset register or tombstoned by the
//! writer's own re-read of it (W2/W3 in `store.rs`) — the same argument
//! as a deletion's; those of later events apply as usual. Counts are
//! recounted after all of that, under a generation that outranks every
//! recount that counted before.
//!
//! Then the durable consumer: every event through `T` is in some session's
//! rebuilt state, so the checkpoint is raised to `T`, and a consumer missing
//! or behind `T` is made again from there — a lost consumer does not make
//! the instances replay the whole history. Events after `T` are delivered
//! as usual. Nothing is moved when a session could not be rebuilt.
//!
//! Documents rebuilt from a state carry the state's sequence and time
//! rather than those of the event that last wrote each key (a snapshot does
//! not keep them); every fact `verify` compares is the same.

use std::collections::BTreeSet;

use bstore_domain::{KeyId, KeyType, SessionKey, SessionState};
use bstore_log::{FoldStart, LogError};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{Bson, DateTime, Document, doc};

use crate::plan::{KeyOp, KeyWrite, Mark, SessionWrite};
use crate::store::{Store, Write, binary, sid, unavailable};
use crate::{Materializer, MongoError};

/// Sessions rebuilt at the same time.
const CONCURRENCY: usize = 8;

/// What [`Materializer::rebuild`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// The stream's last sequence when it began: every event through it is
    /// in the documents written.
    pub upto: u64,
    /// Sessions of the log rebuilt.
    pub sessions: u64,
    /// Of which started from a snapshot (the others from their first kept
    /// event).
    pub from_snapshot: u64,
    /// Events read from the log, every session's together (snapshots are
    /// not events).
    pub events_read: u64,
    /// Key documents written with a value.
    pub keys_written: u64,
    /// Key documents made tombstones (keys the state does not hold).
    pub tombstoned: u64,
    /// Sessions written again because events came while they were rebuilt.
    pub caught_up: u64,
    /// Sessions that Mongo held and the log has no event of, removed.
    pub removed: u64,
    /// Sessions whose log could not be folded, and why (their documents are
    /// left as they were).
    pub failing: Vec<(SessionKey, String)>,
    /// Where the durable consumer resumes: after this sequence. `None` when
    /// a session failed and nothing was moved.
    pub resumed_after: Option<u64>,
}

/// What rebuilding one session did.
#[derive(Debug, Default)]
struct One {
    from_snapshot: bool,
    events_read: u64,
    keys_written: u64,
    tombstoned: u64,
    caught_up: bool,
}

impl Materializer {
    /// Writes every session's documents again from the log (see the module
    /// documentation): from each one's newest usable snapshot plus the
    /// events after it, or from its first kept event with `from_scratch`.
    /// `progress(done, total)` is called after each session. Correct while
    /// other instances materialize; an unreachable Mongo or log is an error
    /// (run it again), a session whose log does not fold is reported in
    /// [`Rebuilt::failing`].
    pub async fn rebuild(&self, from_scratch: bool, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Rebuilt, MongoError> {
        self.store.ensure_indexes().await?;
        let log = &self.events;
        let upto = log.stream_last_seq().await.map_err(stream)?;
        // A checkpoint past the stream's end was not written by a
        // materializer of this stream: a consumer made from it would skip.
        self.store.lower_checkpoint(&self.cfg.consumer, upto).await?;
        // Read before the log's list: a session Mongo holds and the log does
        // not has no event through `upto`.
        let in_mongo = self.store.sessions().await?;
        let sessions = log.sessions(None).await.map_err(stream)?;
        let total = sessions.len() as u64;
        let mut out = Rebuilt { upto, ..Rebuilt::default() };
        let mut results = futures_util::stream::iter(sessions.iter().cloned())
            .map(|key| async move {
                let one = self.rebuild_session(&key, from_scratch).await;
                (key, one)
            })
            .buffer_unordered(CONCURRENCY);
        while let Some((key, one)) = results.next().await {
            match one? {
                Ok(one) => {
                    out.from_snapshot += u64::from(one.from_snapshot);
                    out.events_read += one.events_read;
                    out.keys_written += one.keys_written;
                    out.tombstoned += one.tombstoned;
                    out.caught_up += u64::from(one.caught_up);
                }
                Err(why) => {
                    tracing::error!(session = %key, error = %why, "cannot rebuild a session's documents: its log does not fold");
                    out.failing.push((key, why));
                }
            }
            out.sessions += 1;
            progress(out.sessions, total);
        }
        out.failing.sort();
        let known: BTreeSet<&SessionKey> = sessions.iter().collect();
        for key in in_mongo.iter().filter(|k| !known.contains(k)) {
            self.store.remove_session_through(key, upto).await?;
            out.removed += 1;
        }
        if out.failing.is_empty() {
            out.resumed_after = Some(self.resume_after(upto).await?);
            self.store.clear_quarantine(None, upto).await?;
        }
        Ok(out)
    }

    /// Steps 1–4 of the module documentation for one session. The inner
    /// error: its log does not fold (named, not retried).
    async fn rebuild_session(&self, key: &SessionKey, from_scratch: bool) -> Result<Result<One, String>, MongoError> {
        let log = &self.events;
        let (mut state, start, folded) = match log.fold(key, None, !from_scratch, &mut |_, _| {}).await {
            Ok(done) => done,
            Err(LogError::Unavailable(e)) => return Err(MongoError::Stream(e)),
            Err(e) => return Ok(Err(e.to_string())),
        };
        let mut one =
            One { from_snapshot: matches!(start, FoldStart::Snapshot(_)), events_read: folded.applied + folded.refused, ..One::default() };
        let (keys, tombs) = self.store.overwrite_state(key, &state).await?;
        (one.keys_written, one.tombstoned) = (keys, tombs);
        // Read after the overwrite: any event another instance materialized
        // before it is in the log by now.
        let at = state.seq();
        if log.last_seq(key).await.map_err(stream)? > at {
            match log.fold_into(key, &mut state, None, &mut |_, _| {}).await {
                Ok(more) => one.events_read += more.applied + more.refused,
                Err(LogError::Unavailable(e)) => return Err(MongoError::Stream(e)),
                Err(e) => return Ok(Err(e.to_string())),
            }
            if state.seq() > at {
                let (keys, tombs) = self.store.raise_state(key, &state).await?;
                one.keys_written += keys;
                one.tombstoned += tombs;
                one.caught_up = true;
            }
        }
        self.store.recount(&BTreeSet::from([key.clone()])).await?;
        self.store.clear_quarantine(Some(key), state.seq()).await?;
        Ok(Ok(one))
    }

    /// After a rebuild through `upto`: raises the checkpoint to `upto`, and
    /// makes the durable consumer again from there if it is missing or has
    /// not acknowledged everything through `upto` (the events it would
    /// deliver are in the rebuilt documents already). Returns the sequence
    /// after which it resumes.
    async fn resume_after(&self, upto: u64) -> Result<u64, MongoError> {
        self.store.save_checkpoint(&self.cfg.consumer, upto).await?;
        let (_, floor) = self.events.durable_lag(&self.cfg.consumer).await.map_err(stream)?;
        if floor >= upto {
            return Ok(floor);
        }
        // An instance that finds it gone makes it again from the checkpoint
        // too, which is at `upto` or past it now.
        self.events.delete_durable(&self.cfg.consumer).await.map_err(stream)?;
        self.consumer().await?;
        let (_, floor) = self.events.durable_lag(&self.cfg.consumer).await.map_err(stream)?;
        Ok(floor.max(self.store.checkpoint(&self.cfg.consumer).await?))
    }
}

impl Store {
    /// Step 2: `session`'s documents replaced by `state`, whatever they
    /// held. Returns the key documents written with a value and those made
    /// tombstones.
    pub(crate) async fn overwrite_state(&self, session: &SessionKey, state: &SessionState) -> Result<(u64, u64), MongoError> {
        let seq = state.seq() as i64;
        let at_ms = state.updated_at_ms().unwrap_or(0);
        let deleted = is_deleted(state);
        let counts: Document = state.info().keys.into_iter().map(|(t, n)| (t, Bson::Int64(n as i64))).collect();
        let mut set = doc! {
            "tenant": session.tenant.as_str(), "session": session.session.as_str(),
            "seq": seq, "updated_at_ms": at_ms as i64, "deleted": deleted,
            "creds_seq": seq, "reset_seq": seq, "reset_at_ms": at_ms as i64,
            "counts": counts, "counted_gen": 0_i64,
        };
        let mut unset = doc! { "passed_seq": "" };
        if deleted {
            set.insert("deleted_at", DateTime::from_millis(at_ms as i64));
        } else {
            unset.insert("deleted_at", "");
        }
        match state.creds() {
            Some(c) => set.insert("creds", binary(self.codec.seal_value(session, None, c))),
            None => unset.insert("creds", ""),
        };
        let id = sid(session);
        // The registers first, `reset_seq` among them: a key writer that
        // reads it after this drops or tombstones what the state stands for.
        self.sessions.update_one(doc! { "_id": &id }, doc! { "$set": set, "$unset": unset }).upsert(true).await.map_err(unavailable)?;
        // Key documents of an earlier release name their id in clear: gone,
        // rather than kept as tombstones.
        self.keys.delete_many(doc! { "sid": &id, "id": { "$exists": true } }).await.map_err(unavailable)?;
        let (mut writes, keys, tombs) = self.state_writes(session, state).await?;
        // Whatever the document holds: no sequence guard.
        for w in &mut writes {
            w.filter.remove("seq");
        }
        self.write_all(&writes).await?;
        Ok((keys, tombs))
    }

    /// Step 3: `state` written like an event at its sequence: the reset
    /// register raised first, then every register, key and tombstone only
    /// over what is older. Returns the key documents written with a value
    /// and those made tombstones (as sent; a newer document stays).
    pub(crate) async fn raise_state(&self, session: &SessionKey, state: &SessionState) -> Result<(u64, u64), MongoError> {
        let (seq, at_ms) = (state.seq(), state.updated_at_ms().unwrap_or(0));
        self.write_all(&[self.session_write(&SessionWrite::Reset { session: session.clone(), seq, at_ms })]).await?;
        let registers = [
            SessionWrite::Last { session: session.clone(), last: Mark { seq, at_ms, deleted: is_deleted(state) } },
            SessionWrite::Creds { session: session.clone(), seq, creds: state.creds().cloned() },
        ];
        let (mut writes, keys, tombs) = self.state_writes(session, state).await?;
        // A key writer that read the reset register just raised tombstones
        // its key at `seq` (W3 in `store.rs`), maybe before the state's
        // value lands: a tombstone at exactly `seq` of a key the state holds
        // is that (no event at `seq` deleted it), and the value replaces it.
        for w in writes.iter_mut().take(keys as usize) {
            let id = w.filter.get("_id").cloned().unwrap_or(Bson::Null);
            w.filter = doc! { "_id": id, "$or": [{ "seq": { "$lt": seq as i64 } }, { "seq": seq as i64, "deleted": true }] };
        }
        writes.extend(registers.iter().map(|w| self.session_write(w)));
        self.write_all(&writes).await?;
        Ok((keys, tombs))
    }

    /// The writes that make `session`'s key documents hold `state` — its
    /// keys at its sequence, every other document of the session (read now)
    /// a tombstone at it — each guarded by `seq` below the state's; and how
    /// many of each.
    async fn state_writes(&self, session: &SessionKey, state: &SessionState) -> Result<(Vec<Write>, u64, u64), MongoError> {
        let (seq, at_ms) = (state.seq(), state.updated_at_ms().unwrap_or(0));
        let mut writes = Vec::new();
        let mut wanted = BTreeSet::new();
        for (ty, kid, value) in state.iter_keys() {
            let place: (SessionKey, KeyType, KeyId) = (session.clone(), ty.clone(), kid.clone());
            wanted.insert(self.key_doc_id(session, ty, kid));
            let op = KeyOp { seq, at_ms, value: Some(value.clone()) };
            writes.push(self.key_write(&KeyWrite { place, op, expect: None }, None));
        }
        let keys = writes.len() as u64;
        let mut cursor = self.keys.find(doc! { "sid": sid(session) }).projection(doc! { "_id": 1 }).await.map_err(unavailable)?;
        let mut tombs = 0;
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            let Some(id) = d.get("_id").cloned() else { continue };
            if matches!(&id, Bson::String(s) if wanted.contains(s)) {
                continue;
            }
            writes.push(self.tombstones(doc! { "_id": id }, seq, at_ms, false));
            tombs += 1;
        }
        Ok((writes, keys, tombs))
    }

    /// Lowers the checkpoint of `consumer` to `seq` if it is above it.
    pub(crate) async fn lower_checkpoint(&self, consumer: &str, seq: u64) -> Result<(), MongoError> {
        let filter = doc! { "_id": consumer, "last_seq": { "$gt": seq as i64 } };
        self.checkpoints.update_one(filter, doc! { "$set": { "last_seq": seq as i64 } }).await.map_err(unavailable)?;
        Ok(())
    }

    /// Removes the documents of `session` (a session the log has no event
    /// of) that are of events through `seq`; a later first event's stay.
    pub(crate) async fn remove_session_through(&self, session: &SessionKey, seq: u64) -> Result<(), MongoError> {
        let id = sid(session);
        let old = doc! { "$lte": seq as i64 };
        self.keys
            .delete_many(doc! { "sid": &id, "$or": [{ "seq": old.clone() }, { "seq": { "$exists": false } }] })
            .await
            .map_err(unavailable)?;
        let filter = doc! { "_id": &id, "$or": [{ "seq": old }, { "seq": { "$exists": false } }] };
        self.sessions.delete_one(filter).await.map_err(unavailable)?;
        Ok(())
    }

    /// Drops the quarantine records of events through `seq` — of `session`,
    /// or of no known session with `None` — which a rebuild has replaced.
    pub(crate) async fn clear_quarantine(&self, session: Option<&SessionKey>, seq: u64) -> Result<(), MongoError> {
        let mut filter = doc! { "seq": { "$lte": seq as i64 } };
        match session {
            Some(s) => {
                filter.insert("tenant", s.tenant.as_str());
                filter.insert("session", s.session.as_str());
            }
            None => {
                filter.insert("session", doc! { "$exists": false });
            }
        }
        self.quarantine.delete_many(filter).await.map_err(unavailable)?;
        Ok(())
    }
}

/// Whether a state's last applied event deleted the session (as the
/// session document's `deleted` register says of the newest event): nothing
/// applied since its deletion, and nothing held.
fn is_deleted(state: &SessionState) -> bool {
    state.seq() > 0 && state.events() == 0 && !state.exists()
}

fn stream(e: LogError) -> MongoError {
    MongoError::Stream(e.to_string())
}
