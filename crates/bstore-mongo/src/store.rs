//! The documents, and the one function that writes events into them.
//!
//! `keys`: one document per key ever written —
//! `{_id: "<tenant>.<session>\x1f<type>\x1f<id>", sid, tenant, session, type, id,
//! seq, value: <sealed>, deleted: false, updated_at}`; a deleted key keeps
//! its document as a tombstone: `deleted: true`, no value, `deleted_at`.
//!
//! `sessions`: one per session, made of registers that are each written on
//! their own, last-writer-wins by their own sequence:
//!
//! ```text
//! {_id: "<tenant>.<session>", tenant, session,
//!  seq, updated_at_ms, deleted, deleted_at,      the newest event
//!  creds: <sealed>, creds_seq,                   the newest creds put or deletion
//!  reset_seq, reset_at_ms,                       the newest deletion
//!  counts: {type: n}, counted_gen, count_gen}    recomputed (`Store::recount`)
//! ```
//!
//! (No event counter: a counter cannot be kept exact when a redelivered or
//! reordered event may arrive; everything here is either last-writer-wins
//! by sequence or recomputed.) `reset_seq` is the sequence of the session's
//! last deletion: a key change older than it is never left live, so a late
//! event cannot bring back a key the deletion removed.
//!
//! `checkpoints`: `{_id: <consumer>, last_seq, updated_at}`.
//!
//! # Several instances at once
//!
//! Several instances run the materializer on one durable consumer, so two
//! of them may apply batches of one session at the same time and in any
//! order, apply the same batch at the same time (redelivered after the ack
//! wait), or apply a batch that an instance which died had half written.
//! The server makes each single-document update atomic and nothing more;
//! so every write here is one guarded update, and no decision taken from a
//! read is one that another instance can make wrong in the meantime:
//!
//! - **Registers.** Every write is filtered on its document's (or
//!   register's) sequence being lower than its own (a register never
//!   written counts as 0). Writes of different events commute and a repeat
//!   matches nothing: any order of batches gives each register and each key
//!   the value of its newest event. A read is used only to leave out writes
//!   it shows dead — a sequence only ever rises, so they stay dead.
//! - **Collisions.** A guarded upsert whose filter matched nothing inserts;
//!   if the document exists by then (error 11000) it was either as new or
//!   newer, or created in between by another instance — possibly older.
//!   Such a write is sent again without upsert: the document exists now,
//!   and the same guarded update decides.
//! - **Deletions against key writes.** A deletion at `d` first raises the
//!   session's `reset_seq` to `d` (D1), then tombstones every key document
//!   of the session with `seq < d` (D2). A key write at `w < d` first writes
//!   its key (W1), then reads `reset_seq` again (W2) and, if it is above `w`,
//!   tombstones that key unless it is newer (W3). If W2 reads `d`, W3
//!   removes the key. If it reads less, D1 had not happened yet, so W1 had
//!   committed before D1 and therefore before D2 began: D2 finds the key and
//!   removes it. Either way the one that comes second sees the other. (A key
//!   rewritten while D2 runs is a write with its own W2, after D1.)
//! - **Interrupted batches.** A deletion at or above the `reset_seq` read
//!   tombstones again (the instance that raised it may have died before
//!   D2), and every key of a batch goes through W2/W3, also those found
//!   already written (the instance that wrote them may have died before W2).
//! - **Counts.** Recomputed from the key documents by every batch that may
//!   have changed which keys exist, and stored under a generation taken
//!   after its key writes, so that two crossing recounts end with the newer
//!   one ([`Store::recount`]). Key writes compare-and-set on the sequence
//!   they read, so that when the write lands on the document read, whether
//!   a key appeared or disappeared is known; otherwise (changed in between,
//!   created by another, found already written — perhaps by an attempt that
//!   died before its recount) the session is recounted.
//!
//! Dates are taken from the events (`at_ms`), not from the clock, so a
//! rebuild writes the same documents as the live materializer did.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bstore_codec::Codec;
use bstore_domain::{Change, Event, KeyId, KeyType, SessionKey};
use bytes::Bytes;
use futures_util::TryStreamExt;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, DateTime, Document, doc};
use mongodb::error::PartialBulkWriteResult;
use mongodb::options::{ClientOptions, IndexOptions, UpdateManyModel, UpdateOneModel, WriteModel};
use mongodb::{Client, Collection, Database, IndexModel, Namespace};

use crate::{MongoConfig, MongoError};

/// A key's document as far as patching needs it: its sequence and, unless
/// it is a tombstone, its opened value.
pub type KeyValueAt = (u64, Option<Bytes>);

/// Separates the parts of a key document's `_id`; it cannot occur in a key
/// type or id.
pub const ID_SEP: char = '\x1f';
/// Server error: duplicate key. On a guarded upsert it means the document is
/// already as new or newer.
const DUPLICATE_KEY: i32 = 11000;
/// Server errors when an index exists with other options.
const INDEX_OPTIONS_CONFLICT: i32 = 85;
const INDEX_KEY_SPECS_CONFLICT: i32 = 86;

/// One event as the log stored it.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    /// Stream sequence.
    pub seq: u64,
    /// Whose event.
    pub session: SessionKey,
    /// The event, opened.
    pub event: Event,
}

/// What one [`Store::apply`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events in the batch (after removing repeats).
    pub events: usize,
    /// Guarded key upserts sent.
    pub key_writes: usize,
    /// Session-wide tombstone updates sent.
    pub session_wipes: usize,
    /// Session document upserts sent.
    pub session_writes: usize,
    /// Writes found already applied: not sent because the document was
    /// read as new enough, or matched nothing on the server.
    pub already_applied: usize,
    /// Sessions whose counts per type were recomputed.
    pub recounts: usize,
}

/// A session as Mongo holds it, values opened. For `verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredSession {
    /// The session document's sequence.
    pub seq: u64,
    /// The creds.
    pub creds: Option<Vec<u8>>,
    /// When the last event was decided.
    pub updated_at_ms: Option<u64>,
    /// Counts of live keys per type, as the session document states them.
    pub counts: BTreeMap<String, u64>,
    /// Live keys by type and id.
    pub keys: BTreeMap<(String, String), Vec<u8>>,
    /// Tombstones left by deletions.
    pub tombstones: u64,
}

/// The Mongo side: collections and the guarded writes.
#[derive(Clone)]
pub struct Store {
    client: Client,
    db: Database,
    keys: Collection<Document>,
    sessions: Collection<Document>,
    checkpoints: Collection<Document>,
    codec: Codec,
    retention_secs: u64,
    #[cfg(test)]
    gate: Option<std::sync::Arc<crate::tests::Gate>>,
}

impl Store {
    /// A store at `cfg.url`. The driver connects lazily, so this succeeds
    /// while Mongo is down (unless the URL is malformed).
    pub async fn connect(cfg: &MongoConfig, codec: Codec) -> Result<Self, MongoError> {
        let url = cfg.url.as_deref().ok_or_else(|| MongoError::Config("no mongo url configured".into()))?;
        let mut opts = ClientOptions::parse(url).await.map_err(|e| MongoError::Config(format!("bad mongo url: {e}")))?;
        opts.server_selection_timeout = Some(cfg.timeout);
        opts.connect_timeout = Some(cfg.timeout);
        opts.app_name.get_or_insert_with(|| "baileys-store".into());
        let client = Client::with_options(opts).map_err(|e| MongoError::Config(e.to_string()))?;
        let db = client.database(&cfg.database);
        Ok(Self {
            keys: db.collection("keys"),
            sessions: db.collection("sessions"),
            checkpoints: db.collection("checkpoints"),
            client,
            db,
            codec,
            retention_secs: cfg.tombstone_retention_secs,
            #[cfg(test)]
            gate: None,
        })
    }

    /// The database, for tools and tests that read it directly.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Creates the indexes (idempotent). A changed tombstone retention is
    /// applied to the existing TTL indexes.
    pub async fn ensure_indexes(&self) -> Result<(), MongoError> {
        let by_session = IndexModel::builder()
            .keys(doc! { "sid": 1, "deleted": 1, "type": 1 })
            .options(IndexOptions::builder().name("by_session".to_string()).build())
            .build();
        self.keys.create_index(by_session).await.map_err(unavailable)?;
        for coll in [&self.keys, &self.sessions] {
            let ttl = IndexModel::builder()
                .keys(doc! { "deleted_at": 1 })
                .options(
                    IndexOptions::builder()
                        .name("tombstone_ttl".to_string())
                        .expire_after(std::time::Duration::from_secs(self.retention_secs))
                        .build(),
                )
                .build();
            match coll.create_index(ttl).await {
                Ok(_) => {}
                Err(e) if matches!(command_code(&e), Some(INDEX_OPTIONS_CONFLICT | INDEX_KEY_SPECS_CONFLICT)) => {
                    let cmd = doc! {
                        "collMod": coll.name(),
                        "index": { "name": "tombstone_ttl", "expireAfterSeconds": self.retention_secs as i64 },
                    };
                    self.db.run_command(cmd).await.map_err(unavailable)?;
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        self.migrate().await
    }

    /// Brings session documents written before the creds had a register of
    /// their own (`creds_seq`) in line: their creds are as of their `seq`.
    /// Without this, such a document's creds would count as older than any
    /// event, and a redelivered older creds put would replace them.
    async fn migrate(&self) -> Result<(), MongoError> {
        let filter = doc! { "creds_seq": { "$exists": false }, "seq": { "$exists": true } };
        let mut cursor = self.sessions.find(filter).projection(doc! { "seq": 1 }).await.map_err(unavailable)?;
        let mut old = Vec::new();
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            if let Ok(id) = d.get_str("_id") {
                old.push((id.to_owned(), int(&d, "seq")));
            }
        }
        for (id, seq) in old {
            let filter = doc! { "_id": id, "creds_seq": { "$exists": false } };
            self.sessions.update_one(filter, doc! { "$set": { "creds_seq": seq as i64 } }).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// The stored sequence and value of each of `wanted` keys that has a
    /// document, by document id. Values are opened (and so checked to belong
    /// to their session, type and id).
    pub async fn values_of(&self, wanted: &[(SessionKey, KeyType, KeyId)]) -> Result<HashMap<String, KeyValueAt>, MongoError> {
        let mut places: HashMap<String, &(SessionKey, KeyType, KeyId)> = HashMap::new();
        for w in wanted {
            places.insert(key_doc_id(&sid(&w.0), &w.1, &w.2), w);
        }
        let ids: Vec<String> = places.keys().cloned().collect();
        let mut out = HashMap::new();
        for chunk in ids.chunks(1000) {
            let mut cursor = self.keys.find(doc! { "_id": { "$in": chunk } }).await.map_err(unavailable)?;
            while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
                let Some((id, (session, ty, kid))) = d.get_str("_id").ok().and_then(|id| places.get_key_value(id)) else { continue };
                let value = match d.get_binary_generic("value") {
                    Ok(blob) if !d.get_bool("deleted").unwrap_or(false) => Some(
                        self.codec
                            .open_value(session, Some((ty, kid)), blob)
                            .map_err(|e| MongoError::Unreadable(format!("{session} key {ty}/{kid}: {e}")))?
                            .into(),
                    ),
                    _ => None,
                };
                out.insert(id.clone(), (int(&d, "seq"), value));
            }
        }
        Ok(out)
    }

    /// Removes every collection this store writes, checkpoints included.
    pub async fn drop_all(&self) -> Result<(), MongoError> {
        for coll in [&self.keys, &self.sessions, &self.checkpoints] {
            coll.drop().await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Writes a batch of events. Idempotent and order-insensitive, also
    /// against other instances applying other batches (or the same one) at
    /// the same time: repeats, events already applied and events older than
    /// what a document holds change no fact. See the module documentation
    /// for why each step is safe under every interleaving.
    pub async fn apply(&self, batch: &[LoggedEvent]) -> Result<Applied, MongoError> {
        let mut events: Vec<&LoggedEvent> = batch.iter().collect();
        events.sort_by_key(|e| e.seq);
        events.dedup_by_key(|e| e.seq);
        let mut stats = Applied { events: events.len(), ..Default::default() };
        if events.is_empty() {
            return Ok(stats);
        }

        // How far each session document's registers are. Each only ever
        // rises, so a write found older than its register here is dead for
        // good and is not sent: nothing another instance does later can
        // make it live again.
        let sids: Vec<String> = events.iter().map(|e| sid(&e.session)).collect::<BTreeSet<_>>().into_iter().collect();
        let known = self.marks(&sids).await?;

        // Collapse the batch: per session the newest event of each register,
        // per key the newest change; a deletion of the session turns every
        // earlier change of the batch into a tombstone at its sequence.
        let mut plans: BTreeMap<String, SessionPlan> = BTreeMap::new();
        let mut key_ops: BTreeMap<KeyPlace, KeyOp> = BTreeMap::new();
        for e in &events {
            let id = sid(&e.session);
            let reset_before = known.get(&id).map_or(0, |m| m.reset_seq);
            let plan = plans.entry(id.clone()).or_insert_with(|| SessionPlan::new(e.session.clone()));
            let deleted = matches!(e.event.change, Change::SessionDeleted);
            plan.last = Mark { seq: e.seq, at_ms: e.event.at_ms, deleted };
            match &e.event.change {
                Change::CredsPut { creds } => plan.creds = Some((e.seq, Some(creds.clone()))),
                // Patches need the previous value; the materializer turns them
                // into whole values first (`Materializer::resolve_patches`).
                Change::KeysChanged { patched, .. } if !patched.is_empty() => {
                    return Err(MongoError::Unreadable(format!("event {} of {} still holds patches", e.seq, e.session)));
                }
                Change::KeysChanged { keys, .. } => {
                    if e.seq <= reset_before {
                        stats.already_applied += 1;
                        continue;
                    }
                    for (ty, ids) in keys {
                        for (kid, value) in ids {
                            let op = KeyOp { seq: e.seq, at_ms: e.event.at_ms, value: value.clone(), session: e.session.clone() };
                            key_ops.insert((id.clone(), ty.clone(), kid.clone()), op);
                        }
                    }
                }
                Change::SessionDeleted => {
                    plan.creds = Some((e.seq, None));
                    plan.reset = Some((e.seq, e.event.at_ms));
                    for ((s, _, _), op) in key_ops.iter_mut() {
                        if *s == id && op.seq < e.seq {
                            *op = KeyOp { seq: e.seq, at_ms: e.event.at_ms, value: None, session: e.session.clone() };
                        }
                    }
                }
            }
        }

        // Each key's document as it stands: its sequence and whether it is a
        // tombstone. Only an optimization and a hint for the counts: every
        // write below is guarded on the server, never decided by this read.
        let doc_ids: Vec<String> = key_ops.keys().map(|(s, t, i)| key_doc_id(s, t, i)).collect();
        let before = self.key_marks(&doc_ids).await?;
        self.stage(Stage::Read).await;

        // Sessions whose counts per type must be recomputed.
        let mut recount: BTreeMap<String, SessionKey> = BTreeMap::new();

        // 1. A deletion first raises its session's reset sequence, before it
        //    tombstones anything (step 2): a key writer that comes after
        //    this point sees the deletion in its own check (step 3).
        let mut resets = Vec::new();
        for (id, plan) in &plans {
            if let Some((seq, at_ms)) = plan.reset
                && seq > known.get(id).map_or(0, |m| m.reset_seq)
            {
                resets.push(self.reset_write(id, &plan.session, seq, at_ms));
            }
        }
        stats.session_writes += resets.len();
        stats.already_applied += count_missed(&self.write_all(&resets).await?);
        if plans.values().any(|p| p.reset.is_some()) {
            self.stage(Stage::ResetRaised).await;
        }

        // 2. Every other write, in one unordered bulk write: the session
        //    documents' registers, the deletions' tombstones, the keys.
        let mut writes: Vec<Write> = Vec::new();
        for (id, plan) in &plans {
            let mark = known.get(id).copied().unwrap_or_default();
            if plan.last.seq > mark.seq {
                writes.push(self.last_write(id, &plan.session, plan.last));
            } else {
                stats.already_applied += 1;
            }
            if let Some((seq, creds)) = &plan.creds {
                if *seq > mark.creds_seq {
                    writes.push(self.creds_write(id, &plan.session, *seq, creds.as_ref()));
                } else {
                    stats.already_applied += 1;
                }
            }
        }
        stats.session_writes += writes.len();
        // A deletion at or above the known reset sequence tombstones again
        // even when that sequence was already raised: the instance that
        // raised it may have died before its tombstones were written. One
        // below it is covered by the newer deletion's own tombstones.
        for (id, plan) in &plans {
            if let Some((seq, at_ms)) = plan.reset
                && seq >= known.get(id).map_or(0, |m| m.reset_seq)
            {
                writes.push(wipe_write(&self.keys, id, seq, at_ms));
                recount.insert(id.clone(), plan.session.clone());
                stats.session_wipes += 1;
            }
        }
        let first_key_write = writes.len();
        // Key writes by their place in `writes`, with what the write knew.
        let mut sent: Vec<(&KeyPlace, &KeyOp, Option<KeyMark>)> = Vec::new();
        for (place, op) in &key_ops {
            let (id, ty, kid) = place;
            let doc_id = key_doc_id(id, ty, kid);
            match before.get(&doc_id).copied() {
                // Already as new: this event (an earlier, maybe unfinished,
                // attempt of this batch) or a newer one wrote it. Whether the
                // counts caught up with that write is unknown: recount.
                Some(b) if b.seq >= op.seq => {
                    stats.already_applied += 1;
                    recount.insert(id.clone(), op.session.clone());
                }
                // Compare-and-set on the sequence read: when it matches, the
                // document replaced is exactly the one read, so whether a key
                // appeared or disappeared is known.
                Some(b) => {
                    writes.push(self.key_write(&doc_id, place, op, Some(b.seq)));
                    sent.push((place, op, Some(b)));
                }
                None => {
                    writes.push(self.key_write(&doc_id, place, op, None));
                    sent.push((place, op, None));
                }
            }
        }
        stats.key_writes = sent.len();
        let outcomes = self.write_all(&writes).await?;
        stats.already_applied += count_missed(&outcomes[..first_key_write]);
        let mut changed_under_us = Vec::new();
        for (&(place, op, b), outcome) in sent.iter().zip(&outcomes[first_key_write..]) {
            let live = op.value.is_some();
            // Whether the write is known to have left the set of live keys
            // as it was.
            let same_keys = match (b, outcome) {
                (Some(b), Outcome::Matched) => b.live == live,
                (None, Outcome::Inserted) => !live,
                (Some(_), _) => {
                    // Another instance changed the document after it was
                    // read: write again, guarded by sequence alone.
                    changed_under_us.push(self.key_write(&key_doc_id(&place.0, &place.1, &place.2), place, op, None));
                    false
                }
                (None, Outcome::Missed) => {
                    stats.already_applied += 1;
                    false
                }
                (None, _) => false,
            };
            if !same_keys {
                recount.insert(place.0.clone(), op.session.clone());
            }
        }
        stats.already_applied += count_missed(&self.write_all(&changed_under_us).await?);
        self.stage(Stage::Written).await;

        // 3. Each key written, then the session's reset sequence read again:
        //    a deletion newer than the key that raised it in the meantime
        //    may have tombstoned before the key was written, so the key is
        //    tombstoned here (guarded, so a newer write survives).
        let with_keys: Vec<String> = key_ops.keys().map(|(s, _, _)| s.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let after = self.marks(&with_keys).await?;
        let mut late_tombstones = Vec::new();
        for ((id, ty, kid), op) in &key_ops {
            let Some(mark) = after.get(id) else { continue };
            if op.seq < mark.reset_seq {
                let at = if mark.reset_at_ms > 0 { mark.reset_at_ms } else { op.at_ms };
                late_tombstones.push(tombstone_write(&self.keys, &key_doc_id(id, ty, kid), mark.reset_seq, at));
                recount.insert(id.clone(), op.session.clone());
            }
        }
        self.write_all(&late_tombstones).await?;

        // 4. Counts, recomputed from the key documents.
        if !recount.is_empty() {
            stats.recounts = recount.len();
            self.recount(&recount).await?;
        }
        Ok(stats)
    }

    /// Recomputes the counts per type of `sessions` from their key
    /// documents, so that they converge whatever else runs at the same time.
    ///
    /// Every instance that may have changed which keys exist recounts after
    /// its writes, but two recounts can cross: one counts, another writes a
    /// key, counts and stores, then the first stores its older count. So a
    /// recount first increments the session's `count_gen` (after its key
    /// writes), then reads it back, counts, and stores its counts only over
    /// counts of a lower generation. The recount that read the highest
    /// generation read it after every increment, so after every key write
    /// of every recount: its counts are the true ones, and no lower
    /// generation can overwrite them.
    async fn recount(&self, sessions: &BTreeMap<String, SessionKey>) -> Result<(), MongoError> {
        let claims: Vec<Write> = sessions
            .iter()
            .map(|(id, key)| Write {
                ns: self.sessions.namespace(),
                filter: doc! { "_id": id },
                update: doc! {
                    "$inc": { "count_gen": 1_i64 },
                    "$set": { "tenant": key.tenant.as_str(), "session": key.session.as_str() },
                },
                upsert: true,
                many: false,
            })
            .collect();
        self.write_all(&claims).await?;
        let ids: Vec<&String> = sessions.keys().collect();
        let mut gens: HashMap<String, u64> = HashMap::new();
        let mut cursor =
            self.sessions.find(doc! { "_id": { "$in": &ids } }).projection(doc! { "count_gen": 1 }).await.map_err(unavailable)?;
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            if let Ok(id) = d.get_str("_id") {
                gens.insert(id.to_owned(), int(&d, "count_gen"));
            }
        }

        let mut counts: BTreeMap<&String, Document> = sessions.keys().map(|s| (s, Document::new())).collect();
        let pipeline = vec![
            doc! { "$match": { "sid": { "$in": &ids }, "deleted": false } },
            doc! { "$group": { "_id": { "sid": "$sid", "type": "$type" }, "n": { "$sum": 1 } } },
        ];
        let mut cursor = self.keys.aggregate(pipeline).await.map_err(unavailable)?;
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            let Ok(group) = d.get_document("_id") else { continue };
            let (Ok(s), Ok(t)) = (group.get_str("sid"), group.get_str("type")) else { continue };
            let n = match d.get("n") {
                Some(Bson::Int32(n)) => *n as i64,
                Some(Bson::Int64(n)) => *n,
                _ => 0,
            };
            if let Some(c) = counts.get_mut(&s.to_owned()) {
                c.insert(t, n);
            }
        }
        self.stage(Stage::Counted).await;
        let writes: Vec<Write> = counts
            .into_iter()
            .filter_map(|(id, c)| {
                let g = *gens.get(id)? as i64;
                Some(Write {
                    ns: self.sessions.namespace(),
                    filter: doc! { "_id": id, "$or": older_than("counted_gen", g) },
                    update: doc! { "$set": { "counts": c, "counted_gen": g } },
                    upsert: false,
                    many: false,
                })
            })
            .collect();
        self.write_all(&writes).await?;
        Ok(())
    }

    /// The registers of each session document among `ids` that exists.
    async fn marks(&self, ids: &[String]) -> Result<HashMap<String, SessionMarks>, MongoError> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(1000) {
            let projection = doc! { "seq": 1, "creds_seq": 1, "reset_seq": 1, "reset_at_ms": 1 };
            let mut cursor = self.sessions.find(doc! { "_id": { "$in": chunk } }).projection(projection).await.map_err(unavailable)?;
            while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
                let Ok(id) = d.get_str("_id") else { continue };
                let marks = SessionMarks {
                    seq: int(&d, "seq"),
                    creds_seq: int(&d, "creds_seq"),
                    reset_seq: int(&d, "reset_seq"),
                    reset_at_ms: int(&d, "reset_at_ms"),
                };
                out.insert(id.to_owned(), marks);
            }
        }
        Ok(out)
    }

    /// The sequence and liveness of each key document among `ids` that
    /// exists.
    async fn key_marks(&self, ids: &[String]) -> Result<HashMap<String, KeyMark>, MongoError> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(1000) {
            let mut cursor =
                self.keys.find(doc! { "_id": { "$in": chunk } }).projection(doc! { "seq": 1, "deleted": 1 }).await.map_err(unavailable)?;
            while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
                if let Ok(id) = d.get_str("_id") {
                    out.insert(id.to_owned(), KeyMark { seq: int(&d, "seq"), live: !d.get_bool("deleted").unwrap_or(false) });
                }
            }
        }
        Ok(out)
    }

    /// The session's last event: sequence, time, whether it deleted.
    fn last_write(&self, id: &str, session: &SessionKey, last: Mark) -> Write {
        let mut set = doc! {
            "tenant": session.tenant.as_str(), "session": session.session.as_str(),
            "seq": last.seq as i64, "updated_at_ms": last.at_ms as i64, "deleted": last.deleted,
        };
        let update = if last.deleted {
            set.insert("deleted_at", DateTime::from_millis(last.at_ms as i64));
            doc! { "$set": set }
        } else {
            doc! { "$set": set, "$unset": { "deleted_at": "" } }
        };
        Write {
            ns: self.sessions.namespace(),
            filter: doc! { "_id": id, "$or": older_than("seq", last.seq as i64) },
            update,
            upsert: true,
            many: false,
        }
    }

    /// The creds as of `seq`: put, or removed by a deletion.
    fn creds_write(&self, id: &str, session: &SessionKey, seq: u64, creds: Option<&Bytes>) -> Write {
        let set = doc! { "tenant": session.tenant.as_str(), "session": session.session.as_str(), "creds_seq": seq as i64 };
        let update = match creds {
            Some(c) => {
                let mut set = set;
                set.insert("creds", binary(self.codec.seal_value(session, None, c)));
                doc! { "$set": set }
            }
            None => doc! { "$set": set, "$unset": { "creds": "" } },
        };
        Write {
            ns: self.sessions.namespace(),
            filter: doc! { "_id": id, "$or": older_than("creds_seq", seq as i64) },
            update,
            upsert: true,
            many: false,
        }
    }

    /// Raises the session's reset sequence to a deletion's.
    fn reset_write(&self, id: &str, session: &SessionKey, seq: u64, at_ms: u64) -> Write {
        let update = doc! { "$set": {
            "tenant": session.tenant.as_str(), "session": session.session.as_str(),
            "reset_seq": seq as i64, "reset_at_ms": at_ms as i64,
        } };
        Write {
            ns: self.sessions.namespace(),
            filter: doc! { "_id": id, "$or": older_than("reset_seq", seq as i64) },
            update,
            upsert: true,
            many: false,
        }
    }

    /// One key's change. `expect`: the sequence the document was read at
    /// (compare-and-set, no upsert); `None`: guarded by `seq < new` alone,
    /// with upsert.
    fn key_write(&self, doc_id: &str, place: &KeyPlace, op: &KeyOp, expect: Option<u64>) -> Write {
        let (id, ty, kid) = place;
        let at = DateTime::from_millis(op.at_ms as i64);
        let mut set = doc! {
            "sid": id, "tenant": op.session.tenant.as_str(), "session": op.session.session.as_str(),
            "type": ty.as_str(), "id": kid.as_str(), "seq": op.seq as i64, "updated_at": at,
        };
        let update = match &op.value {
            Some(v) => {
                set.insert("value", binary(self.codec.seal_value(&op.session, Some((ty, kid)), v)));
                set.insert("deleted", false);
                doc! { "$set": set, "$unset": { "deleted_at": "" } }
            }
            None => {
                set.insert("deleted", true);
                set.insert("deleted_at", at);
                doc! { "$set": set, "$unset": { "value": "" } }
            }
        };
        let (filter, upsert) = match expect {
            Some(seq) => (doc! { "_id": doc_id, "seq": seq as i64 }, false),
            None => (doc! { "_id": doc_id, "seq": { "$lt": op.seq as i64 } }, true),
        };
        Write { ns: self.keys.namespace(), filter, update, upsert, many: false }
    }

    /// Sends `writes` as one unordered bulk write (the order does not
    /// matter: each is guarded on its own) and says what each did.
    ///
    /// A guarded upsert fails with a duplicate key (11000) when its filter
    /// matched nothing and the document exists by the time it inserts:
    /// either the document is as new or newer, or another instance created
    /// it in between — possibly older than this write. Such a write is sent
    /// again without upsert: the document exists now, so the same guarded
    /// update decides, and matching nothing then truly means "as new or
    /// newer".
    async fn write_all(&self, writes: &[Write]) -> Result<Vec<Outcome>, MongoError> {
        let (mut out, collided) = self.send(writes.iter().map(|w| w.model(w.upsert)).collect(), writes).await?;
        if !collided.is_empty() {
            let models = collided.iter().map(|&i| writes[i].model(false)).collect();
            let retried: Vec<&Write> = collided.iter().map(|&i| &writes[i]).collect();
            let (again, still) = self.send(models, &retried).await?;
            if !still.is_empty() {
                return Err(MongoError::Unavailable("an update without upsert reported a duplicate key".into()));
            }
            for (i, o) in collided.into_iter().zip(again) {
                out[i] = o;
            }
        }
        Ok(out)
    }

    /// One bulk write: the outcome of each model, and which upserts
    /// collided (their outcome is left as `Missed`).
    async fn send<W: std::borrow::Borrow<Write>>(
        &self,
        models: Vec<WriteModel>,
        writes: &[W],
    ) -> Result<(Vec<Outcome>, Vec<usize>), MongoError> {
        if models.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let n = models.len();
        let (results, errors) = match self.client.bulk_write(models).ordered(false).verbose_results().await {
            Ok(r) => (r.update_results, HashMap::new()),
            Err(e) => {
                if !matches!(e.kind.as_ref(), mongodb::error::ErrorKind::BulkWrite(bw) if bw.write_concern_errors.is_empty()) {
                    return Err(unavailable(e));
                }
                let mongodb::error::ErrorKind::BulkWrite(bw) = *e.kind else { unreachable!("checked above") };
                let results = match bw.partial_result {
                    Some(PartialBulkWriteResult::Verbose(v)) => v.update_results,
                    _ => HashMap::new(),
                };
                (results, bw.write_errors)
            }
        };
        let mut out = vec![Outcome::Missed; n];
        let mut collided = Vec::new();
        for (i, slot) in out.iter_mut().enumerate() {
            if let Some(err) = errors.get(&i) {
                if err.code == DUPLICATE_KEY && writes[i].borrow().upsert {
                    collided.push(i);
                    continue;
                }
                return Err(MongoError::Unavailable(format!("mongo refused a write ({}): {}", err.code, err.message)));
            }
            *slot = match results.get(&i) {
                Some(r) if r.upserted_id.is_some() => Outcome::Inserted,
                Some(r) if r.matched_count > 0 => Outcome::Matched,
                Some(_) => Outcome::Missed,
                None => return Err(MongoError::Unavailable("mongo reported no result for a write".into())),
            };
        }
        Ok((out, collided))
    }

    /// The last sequence `consumer` recorded as applied (0: none).
    pub async fn checkpoint(&self, consumer: &str) -> Result<u64, MongoError> {
        let d = self.checkpoints.find_one(doc! { "_id": consumer }).await.map_err(unavailable)?;
        Ok(d.map_or(0, |d| int(&d, "last_seq")))
    }

    /// Records that `consumer` applied everything up to `seq` (never moves
    /// back).
    pub async fn save_checkpoint(&self, consumer: &str, seq: u64) -> Result<(), MongoError> {
        let update = doc! { "$max": { "last_seq": seq as i64 }, "$set": { "updated_at": DateTime::now() } };
        self.checkpoints.update_one(doc! { "_id": consumer }, update).upsert(true).await.map_err(unavailable)?;
        Ok(())
    }

    /// Every session with a session document.
    pub async fn sessions(&self) -> Result<Vec<SessionKey>, MongoError> {
        let mut out = Vec::new();
        let mut cursor = self.sessions.find(doc! {}).projection(doc! { "tenant": 1, "session": 1 }).await.map_err(unavailable)?;
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            if let (Ok(t), Ok(s)) = (d.get_str("tenant"), d.get_str("session"))
                && let Ok(key) = SessionKey::parse(t, s)
            {
                out.push(key);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads one session back, values opened. `Ok(None)`: no session
    /// document and no key documents.
    pub async fn read_session(&self, session: &SessionKey) -> Result<Option<StoredSession>, MongoError> {
        let id = sid(session);
        let doc = self.sessions.find_one(doc! { "_id": &id }).await.map_err(unavailable)?;
        let mut out = StoredSession::default();
        let found = doc.is_some();
        if let Some(d) = &doc {
            out.seq = int(d, "seq");
            out.updated_at_ms = Some(int(d, "updated_at_ms")).filter(|&t| t > 0);
            if let Ok(c) = d.get_binary_generic("creds") {
                out.creds =
                    Some(self.codec.open_value(session, None, c).map_err(|e| MongoError::Unreadable(format!("{session} creds: {e}")))?);
            }
            if let Ok(counts) = d.get_document("counts") {
                for (t, n) in counts {
                    out.counts.insert(t.clone(), n.as_i64().or_else(|| n.as_i32().map(i64::from)).unwrap_or(-1) as u64);
                }
            }
        }
        let mut cursor = self.keys.find(doc! { "sid": &id }).await.map_err(unavailable)?;
        let mut any_key = false;
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            any_key = true;
            if d.get_bool("deleted").unwrap_or(false) {
                out.tombstones += 1;
                continue;
            }
            let (Ok(t), Ok(i)) = (d.get_str("type"), d.get_str("id")) else {
                return Err(MongoError::Unreadable(format!("{session}: a key document without type or id")));
            };
            let (ty, kid) = match (KeyType::parse(t), KeyId::parse(i)) {
                (Ok(ty), Ok(kid)) => (ty, kid),
                _ => return Err(MongoError::Unreadable(format!("{session}: malformed key {t:?}/{i:?}"))),
            };
            let blob = d.get_binary_generic("value").map_err(|_| MongoError::Unreadable(format!("{session} key {t}/{i}: no value")))?;
            let v = self
                .codec
                .open_value(session, Some((&ty, &kid)), blob)
                .map_err(|e| MongoError::Unreadable(format!("{session} key {t}/{i}: {e}")))?;
            out.keys.insert((t.to_owned(), i.to_owned()), v);
        }
        Ok((found || any_key).then_some(out))
    }
}

/// Points inside [`Store::apply`] where a test can hold one instance while
/// another runs, to drive the interleavings of two instances directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// The documents were read; nothing is written yet.
    Read,
    /// A deletion raised its session's reset sequence; no key is
    /// tombstoned yet.
    ResetRaised,
    /// Keys and session documents are written; counts are not.
    Written,
    /// Counts were computed but not yet written.
    Counted,
}

impl Store {
    #[cfg(test)]
    pub(crate) fn with_gate(&self, gate: std::sync::Arc<crate::tests::Gate>) -> Self {
        Self { gate: Some(gate), ..self.clone() }
    }

    #[cfg(test)]
    async fn stage(&self, stage: Stage) {
        if let Some(g) = &self.gate {
            g.pass(stage).await;
        }
    }

    #[cfg(not(test))]
    async fn stage(&self, _stage: Stage) {}
}

/// The `_id` of a session document.
pub fn sid(session: &SessionKey) -> String {
    format!("{}.{}", session.tenant, session.session)
}

/// The `_id` of a key document.
pub fn key_doc_id(sid: &str, ty: &KeyType, id: &KeyId) -> String {
    format!("{sid}{ID_SEP}{ty}{ID_SEP}{id}")
}

/// A key by session document id, type and id.
type KeyPlace = (String, KeyType, KeyId);

struct KeyOp {
    seq: u64,
    at_ms: u64,
    value: Option<Bytes>,
    session: SessionKey,
}

/// A key document as read: its sequence and whether it holds a value.
#[derive(Debug, Clone, Copy)]
struct KeyMark {
    seq: u64,
    live: bool,
}

/// A session document's registers as read (0: absent).
#[derive(Debug, Clone, Copy, Default)]
struct SessionMarks {
    seq: u64,
    creds_seq: u64,
    reset_seq: u64,
    reset_at_ms: u64,
}

/// One event as the session document's `seq` register records it.
#[derive(Debug, Clone, Copy, Default)]
struct Mark {
    seq: u64,
    at_ms: u64,
    deleted: bool,
}

/// What a batch brings to one session document, register by register.
struct SessionPlan {
    session: SessionKey,
    /// The newest event.
    last: Mark,
    /// The newest creds put (`Some`) or deletion (`None`).
    creds: Option<(u64, Option<Bytes>)>,
    /// The newest deletion: sequence and time.
    reset: Option<(u64, u64)>,
}

impl SessionPlan {
    fn new(session: SessionKey) -> Self {
        Self { session, last: Mark::default(), creds: None, reset: None }
    }
}

/// One guarded write.
struct Write {
    ns: Namespace,
    filter: Document,
    update: Document,
    upsert: bool,
    many: bool,
}

impl Write {
    fn model(&self, upsert: bool) -> WriteModel {
        let (ns, filter, update) = (self.ns.clone(), self.filter.clone(), self.update.clone());
        if self.many {
            UpdateManyModel::builder().namespace(ns).filter(filter).update(update).upsert(upsert).build().into()
        } else {
            UpdateOneModel::builder().namespace(ns).filter(filter).update(update).upsert(upsert).build().into()
        }
    }
}

/// What one [`Write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// It created the document.
    Inserted,
    /// It matched a document older than the write and brought it forward.
    Matched,
    /// It matched nothing: the document is as new or newer (or absent, for
    /// a write without upsert).
    Missed,
}

fn count_missed(outcomes: &[Outcome]) -> usize {
    outcomes.iter().filter(|o| **o == Outcome::Missed).count()
}

/// `$or` clauses matching a document whose `field` is below `n` or absent
/// (a register never written counts as 0).
fn older_than(field: &str, n: i64) -> Vec<Document> {
    vec![doc! { field: { "$lt": n } }, doc! { field: { "$exists": false } }]
}

/// A deletion's tombstones: every key document of the session older than it.
fn wipe_write(keys: &Collection<Document>, id: &str, seq: u64, at_ms: u64) -> Write {
    tombstones(keys, doc! { "sid": id }, seq, at_ms, true)
}

/// One key document made a tombstone of the deletion at `seq`, if older.
fn tombstone_write(keys: &Collection<Document>, doc_id: &str, seq: u64, at_ms: u64) -> Write {
    tombstones(keys, doc! { "_id": doc_id }, seq, at_ms, false)
}

/// Makes the key documents matching `filter` that are older than `seq`
/// tombstones of the deletion at `seq`.
fn tombstones(keys: &Collection<Document>, mut filter: Document, seq: u64, at_ms: u64, many: bool) -> Write {
    let at = DateTime::from_millis(at_ms as i64);
    filter.insert("seq", doc! { "$lt": seq as i64 });
    Write {
        ns: keys.namespace(),
        filter,
        update: doc! {
            "$set": { "seq": seq as i64, "deleted": true, "deleted_at": at, "updated_at": at },
            "$unset": { "value": "" },
        },
        upsert: false,
        many,
    }
}

fn binary(bytes: Vec<u8>) -> Bson {
    Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes })
}

fn int(d: &Document, field: &str) -> u64 {
    match d.get(field) {
        Some(Bson::Int64(n)) => (*n).max(0) as u64,
        Some(Bson::Int32(n)) => (*n).max(0) as u64,
        Some(Bson::Double(n)) => n.max(0.0) as u64,
        _ => 0,
    }
}

fn command_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

fn unavailable(e: mongodb::error::Error) -> MongoError {
    MongoError::Unavailable(e.to_string())
}
