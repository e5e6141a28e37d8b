//! The documents, what a batch reads of them, and the writer that sends
//! what the batch's plan (`plan.rs`) says.
//!
//! `keys`: one document per key ever written —
//! `{_id: "<tenant>.<session>\x1f<type>\x1f<tag>", sid, tenant, session, type,
//! seq, value: <sealed id and value>, deleted: false, updated_at}`; a deleted
//! key keeps its document as a tombstone: `deleted: true`, no value,
//! `deleted_at`. The key id is never in clear: the document is named by the
//! id's tag and the id is sealed with the value (`keydoc.rs`).
//!
//! `sessions`: one per session, made of registers that are each written on
//! their own, last-writer-wins by their own sequence:
//!
//! ```text
//! {_id: "<tenant>.<session>", tenant, session,
//!  seq, updated_at_ms, deleted, deleted_at,      the newest event
//!  creds: <sealed>, creds_seq,                   the newest creds put or deletion
//!  reset_seq, reset_at_ms,                       the newest deletion
//!  passed_seq,                                   the newest event refused (passed over)
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
//! `quarantine`: what the materializer skipped or found unreadable
//! (`quarantine.rs`): `{_id, kind, tenant, session, seq, reason, at}`, no
//! values and no key ids.
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
//! replay writes the same documents as the live materializer did (`rebuild.rs`
//! writes a session from its state: every key at the state's sequence and
//! time).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bstore_codec::Codec;
use bstore_domain::{Change, Event, KeyId, KeyType, SessionKey};
use bytes::Bytes;
use futures_util::TryStreamExt;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, DateTime, Document, doc};
use mongodb::error::PartialBulkWriteResult;
use mongodb::options::{ClientOptions, DeleteOneModel, IndexOptions, UpdateManyModel, UpdateOneModel, WriteModel};
use mongodb::{Client, Collection, Database, IndexModel, Namespace};

use crate::keydoc::{doc_id_of_tag, open_key, seal_key};
use crate::plan::{Base, Displaced, KeyMark, KeyOp, KeyPlace, KeyWrite, Outcome, Seen, SessionMarks, SessionWrite, Tombstone, Wipe, plan};
use crate::{MongoConfig, MongoError};

/// Separates the parts of a key document's `_id`; it cannot occur in a key
/// type, an id tag or a session name.
pub const ID_SEP: char = '\x1f';
/// Server error: duplicate key. On a guarded upsert it means the document is
/// already as new or newer.
const DUPLICATE_KEY: i32 = 11000;
/// Server errors when an index exists with other options.
const INDEX_OPTIONS_CONFLICT: i32 = 85;
const INDEX_KEY_SPECS_CONFLICT: i32 = 86;
/// Server errors on a single write that pass: the network, a server
/// stepping down, shutting down or interrupted, a time limit. Any other
/// error on a write is the server refusing that document.
const TRANSIENT_WRITE_ERRORS: [i32; 15] = [6, 7, 50, 89, 91, 112, 189, 262, 9001, 10107, 11600, 11601, 11602, 13435, 13436];
/// Documents per `$in` read.
const READ_CHUNK: usize = 1000;

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
    pub(crate) keys: Collection<Document>,
    pub(crate) sessions: Collection<Document>,
    pub(crate) checkpoints: Collection<Document>,
    pub(crate) quarantine: Collection<Document>,
    pub(crate) codec: Codec,
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
            quarantine: db.collection("quarantine"),
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

    /// The `_id` of the document of key `id` of type `ty` of `session`.
    pub fn key_doc_id(&self, session: &SessionKey, ty: &KeyType, id: &KeyId) -> String {
        crate::keydoc::key_doc_id(&self.codec, session, ty, id)
    }

    /// Creates the indexes (idempotent) and brings documents of earlier
    /// releases in line. A changed tombstone retention is applied to the
    /// existing TTL indexes.
    pub async fn ensure_indexes(&self) -> Result<(), MongoError> {
        let by_session = IndexModel::builder()
            .keys(doc! { "sid": 1, "deleted": 1, "type": 1 })
            .options(IndexOptions::builder().name("by_session".to_string()).build())
            .build();
        self.keys.create_index(by_session).await.map_err(unavailable)?;
        // Only documents of earlier releases have an `id` field: a sparse
        // index holds just those (whose ids are in clear in the documents
        // anyway, until they are rewritten), so looking for them at every
        // start reads the index, not the whole collection.
        let earlier = IndexModel::builder()
            .keys(doc! { "id": 1 })
            .options(IndexOptions::builder().name("earlier_release_ids".to_string()).sparse(true).build())
            .build();
        self.keys.create_index(earlier).await.map_err(unavailable)?;
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
        self.migrate().await?;
        self.migrate_key_ids().await.map(|_| ())
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

    /// Rewrites the key documents of earlier releases, which named their key
    /// in clear (`_id` ending in the id, an `id` field, the value sealed for
    /// the id), into documents named by the id's tag; returns how many.
    ///
    /// Each becomes a guarded key write like any other (a document of the
    /// tag that is as new or newer wins), then the old document is removed
    /// if it did not change since it was read (an instance of the earlier
    /// release still running may write it again: the next start converts
    /// that too), and the sessions touched are recounted. A value that does
    /// not open is dropped with a warning; `verify` then reports the key
    /// missing and `rebuild mongo` writes it again from the log.
    async fn migrate_key_ids(&self) -> Result<usize, MongoError> {
        let mut cursor = self.keys.find(doc! { "id": { "$exists": true } }).await.map_err(unavailable)?;
        let mut old = Vec::new();
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            old.push(d);
        }
        if old.is_empty() {
            return Ok(0);
        }
        tracing::info!(documents = old.len(), "rewriting key documents of an earlier release, which named their key ids in clear");
        for chunk in old.chunks(500) {
            let (mut writes, mut removals, mut recount) = (Vec::new(), Vec::new(), BTreeSet::new());
            for d in chunk {
                let Ok(old_id) = d.get_str("_id") else { continue };
                removals.push(
                    DeleteOneModel::builder()
                        .namespace(self.keys.namespace())
                        .filter(doc! { "_id": old_id, "seq": d.get("seq").cloned().unwrap_or(Bson::Null) })
                        .build(),
                );
                let place = match (d.get_str("tenant"), d.get_str("session"), d.get_str("type"), d.get_str("id")) {
                    (Ok(t), Ok(s), Ok(ty), Ok(id)) => match (SessionKey::parse(t, s), KeyType::parse(ty), KeyId::parse(id)) {
                        (Ok(s), Ok(ty), Ok(id)) => (s, ty, id),
                        _ => continue,
                    },
                    _ => continue,
                };
                let at_ms = d.get_datetime("updated_at").map_or(0, |t| t.timestamp_millis().max(0) as u64);
                let value = match d.get_binary_generic("value") {
                    Ok(blob) if !d.get_bool("deleted").unwrap_or(false) => {
                        match self.codec.open_value(&place.0, Some((&place.1, &place.2)), blob) {
                            Ok(v) => Some(Bytes::from(v)),
                            Err(e) => {
                                tracing::warn!(session = %place.0, error = %e, "dropping an unreadable key document of an earlier release");
                                continue;
                            }
                        }
                    }
                    _ => None,
                };
                recount.insert(place.0.clone());
                let op = KeyOp { seq: int(d, "seq"), at_ms, value };
                writes.push(self.key_write(&KeyWrite { place, op, expect: None }, None));
            }
            self.write_all(&writes).await?;
            self.client.bulk_write(removals).ordered(false).await.map_err(unavailable)?;
            self.recount(&recount).await?;
        }
        Ok(old.len())
    }

    /// Removes every collection this store writes, checkpoints and
    /// quarantine included.
    pub async fn drop_all(&self) -> Result<(), MongoError> {
        for coll in [&self.keys, &self.sessions, &self.checkpoints, &self.quarantine] {
            coll.drop().await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Writes a batch of events holding whole values only (no patches):
    /// [`Store::read`], then [`Store::write`].
    pub async fn apply(&self, batch: &[LoggedEvent]) -> Result<Applied, MongoError> {
        let seen = self.read(batch).await?;
        self.write(batch, &[], &seen).await
    }

    /// Reads what writing `batch` needs to know, each document once: the
    /// registers of its sessions' documents, the sequence and liveness of
    /// the documents of the keys it touches, and the values of those it
    /// patches (opened, or why they do not open).
    pub(crate) async fn read(&self, batch: &[LoggedEvent]) -> Result<Seen, MongoError> {
        let sessions: BTreeSet<&SessionKey> = batch.iter().map(|e| &e.session).collect();
        let mut seen = Seen { sessions: self.marks(sessions.into_iter().cloned()).await?, ..Default::default() };
        // By document id: the key, its tag, and whether its value is wanted.
        let mut places: HashMap<String, (KeyPlace, String, bool)> = HashMap::new();
        for e in batch {
            if let Change::KeysChanged { keys, patched } | Change::Restored { keys, patched, .. } = &e.event.change {
                let whole = keys.iter().flat_map(|(t, ids)| ids.keys().map(move |i| (t, i, false)));
                let patches = patched.iter().flat_map(|(t, ids)| ids.keys().map(move |i| (t, i, true)));
                for (ty, kid, wanted) in whole.chain(patches) {
                    let tag = self.codec.id_tag(&e.session, ty, kid);
                    let entry = places
                        .entry(doc_id_of_tag(&e.session, ty, &tag))
                        .or_insert_with(|| ((e.session.clone(), ty.clone(), kid.clone()), tag, false));
                    entry.2 |= wanted;
                }
            }
        }
        for with_values in [false, true] {
            let ids: Vec<&String> = places.iter().filter(|(_, (_, _, w))| *w == with_values).map(|(id, _)| id).collect();
            for chunk in ids.chunks(READ_CHUNK) {
                let find = self.keys.find(doc! { "_id": { "$in": chunk } });
                let find = if with_values { find } else { find.projection(doc! { "seq": 1, "deleted": 1 }) };
                let mut cursor = find.await.map_err(unavailable)?;
                while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
                    let Some((place, tag, _)) = d.get_str("_id").ok().and_then(|id| places.get(id)) else { continue };
                    let mark = KeyMark { seq: int(&d, "seq"), live: !d.get_bool("deleted").unwrap_or(false) };
                    if with_values && mark.live {
                        seen.bases.insert(place.clone(), self.base(place, tag, &d));
                    }
                    seen.keys.insert(place.clone(), mark);
                }
            }
        }
        Ok(seen)
    }

    /// The value the live document of the key tagged `tag` holds, opened
    /// (the id sealed inside hashes to the tag, so it is the key's).
    fn base(&self, (session, ty, _): &KeyPlace, tag: &str, d: &Document) -> Base {
        let opened = match d.get_binary_generic("value") {
            Ok(blob) => open_key(&self.codec, session, ty, tag, blob).map(|(_, v)| Bytes::from(v)),
            Err(_) => Err("no value".into()),
        };
        opened.map_or_else(Base::Unreadable, Base::Value)
    }

    /// Writes a batch of events holding whole values, and passes over the
    /// `passed` ones (refused by the chain check), given what [`Store::read`]
    /// read for it (a batch with patches resolved touches the same keys).
    /// Idempotent and order-insensitive, also against other
    /// instances applying other batches (or the same one) at the same time:
    /// repeats, events already applied and events older than what a
    /// document holds change no fact. See the module documentation for why
    /// each step is safe under every interleaving.
    pub(crate) async fn write(&self, batch: &[LoggedEvent], passed: &[Displaced], seen: &Seen) -> Result<Applied, MongoError> {
        let mut plan = plan(batch, passed, seen)?;
        if plan.stats.events == 0 {
            return Ok(plan.stats);
        }
        self.stage(Stage::Read).await;

        // 1. Deletions raise their sessions' reset registers.
        let resets: Vec<Write> = plan.resets.iter().map(|w| self.session_write(w)).collect();
        plan.stats.already_applied += count_missed(&self.write_all(&resets).await?);
        if plan.deletes {
            self.stage(Stage::ResetRaised).await;
        }

        // 2. Every other write, in one unordered bulk write: the session
        //    documents' registers, the deletions' tombstones, the keys.
        let mut writes: Vec<Write> = plan.registers.iter().map(|w| self.session_write(w)).collect();
        writes.extend(plan.wipes.iter().map(|w| self.wipe_write(w)));
        let first_key_write = writes.len();
        writes.extend(plan.keys.iter().map(|w| self.key_write(w, w.expect.map(|b| b.seq))));
        let outcomes = self.write_all(&writes).await?;
        plan.stats.already_applied += count_missed(&outcomes[..first_key_write]);
        let again: Vec<Write> = plan.settle(&outcomes[first_key_write..]).iter().map(|w| self.key_write(w, None)).collect();
        plan.stats.already_applied += count_missed(&self.write_all(&again).await?);
        self.stage(Stage::Written).await;

        // 3. Each key written, then its session's reset register read again.
        let after = self.marks(plan.sessions_with_keys()).await?;
        let late: Vec<Write> = plan.late_tombstones(&after).iter().map(|t| self.tombstone_write(t)).collect();
        self.write_all(&late).await?;

        // 4. Counts, recomputed from the key documents.
        if !plan.recount.is_empty() {
            plan.stats.recounts = plan.recount.len();
            self.recount(&plan.recount).await?;
        }
        Ok(plan.stats)
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
    pub(crate) async fn recount(&self, sessions: &BTreeSet<SessionKey>) -> Result<(), MongoError> {
        let claims: Vec<Write> = sessions
            .iter()
            .map(|key| Write {
                ns: self.sessions.namespace(),
                filter: doc! { "_id": sid(key) },
                update: doc! {
                    "$inc": { "count_gen": 1_i64 },
                    "$set": { "tenant": key.tenant.as_str(), "session": key.session.as_str() },
                },
                upsert: true,
                many: false,
                event: None,
            })
            .collect();
        self.write_all(&claims).await?;
        let ids: Vec<String> = sessions.iter().map(sid).collect();
        let mut gens: HashMap<String, u64> = HashMap::new();
        let mut cursor =
            self.sessions.find(doc! { "_id": { "$in": &ids } }).projection(doc! { "count_gen": 1 }).await.map_err(unavailable)?;
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            if let Ok(id) = d.get_str("_id") {
                gens.insert(id.to_owned(), int(&d, "count_gen"));
            }
        }

        let mut counts: BTreeMap<&str, Document> = ids.iter().map(|s| (s.as_str(), Document::new())).collect();
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
            if let Some(c) = counts.get_mut(s) {
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
                    event: None,
                })
            })
            .collect();
        self.write_all(&writes).await?;
        Ok(())
    }

    /// The registers of each of `sessions` that has a document.
    async fn marks(&self, sessions: impl IntoIterator<Item = SessionKey>) -> Result<HashMap<SessionKey, SessionMarks>, MongoError> {
        let by_id: HashMap<String, SessionKey> = sessions.into_iter().map(|s| (sid(&s), s)).collect();
        let ids: Vec<&String> = by_id.keys().collect();
        let mut out = HashMap::new();
        for chunk in ids.chunks(READ_CHUNK) {
            let projection = doc! { "seq": 1, "creds_seq": 1, "reset_seq": 1, "reset_at_ms": 1, "passed_seq": 1 };
            let mut cursor = self.sessions.find(doc! { "_id": { "$in": chunk } }).projection(projection).await.map_err(unavailable)?;
            while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
                let Some(session) = d.get_str("_id").ok().and_then(|id| by_id.get(id)) else { continue };
                let marks = SessionMarks {
                    seq: int(&d, "seq"),
                    creds_seq: int(&d, "creds_seq"),
                    reset_seq: int(&d, "reset_seq"),
                    reset_at_ms: int(&d, "reset_at_ms"),
                    passed_seq: int(&d, "passed_seq"),
                };
                out.insert(session.clone(), marks);
            }
        }
        Ok(out)
    }

    /// One register of a session document, guarded by its sequence.
    pub(crate) fn session_write(&self, w: &SessionWrite) -> Write {
        let (session, register, seq, update) = match w {
            SessionWrite::Reset { session, seq, at_ms } => {
                (session, "reset_seq", *seq, doc! { "$set": { "reset_seq": *seq as i64, "reset_at_ms": *at_ms as i64 } })
            }
            SessionWrite::Last { session, last } => {
                let set = doc! { "seq": last.seq as i64, "updated_at_ms": last.at_ms as i64, "deleted": last.deleted };
                let update = if last.deleted {
                    let mut set = set;
                    set.insert("deleted_at", DateTime::from_millis(last.at_ms as i64));
                    doc! { "$set": set }
                } else {
                    doc! { "$set": set, "$unset": { "deleted_at": "" } }
                };
                (session, "seq", last.seq, update)
            }
            SessionWrite::PassOver { session, seq } => (session, "passed_seq", *seq, doc! { "$set": { "passed_seq": *seq as i64 } }),
            SessionWrite::Creds { session, seq, creds } => {
                let update = match creds {
                    Some(c) => doc! { "$set": { "creds_seq": *seq as i64, "creds": binary(self.codec.seal_value(session, None, c)) } },
                    None => doc! { "$set": { "creds_seq": *seq as i64 }, "$unset": { "creds": "" } },
                };
                (session, "creds_seq", *seq, update)
            }
        };
        let mut update = update;
        if let Ok(set) = update.get_document_mut("$set") {
            set.insert("tenant", session.tenant.as_str());
            set.insert("session", session.session.as_str());
        }
        Write {
            ns: self.sessions.namespace(),
            filter: doc! { "_id": sid(session), "$or": older_than(register, seq as i64) },
            update,
            upsert: true,
            many: false,
            event: Some(seq),
        }
    }

    /// One key's change. `expect`: the sequence the document was read at
    /// (compare-and-set, no upsert); `None`: guarded by `seq < new` alone,
    /// with upsert.
    pub(crate) fn key_write(&self, w: &KeyWrite, expect: Option<u64>) -> Write {
        let (session, ty, kid) = &w.place;
        let op = &w.op;
        let tag = self.codec.id_tag(session, ty, kid);
        let doc_id = doc_id_of_tag(session, ty, &tag);
        let at = DateTime::from_millis(op.at_ms as i64);
        let mut set = doc! {
            "sid": sid(session), "tenant": session.tenant.as_str(), "session": session.session.as_str(),
            "type": ty.as_str(), "seq": op.seq as i64, "updated_at": at,
        };
        let update = match &op.value {
            Some(v) => {
                set.insert("value", binary(seal_key(&self.codec, session, ty, &tag, kid, v)));
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
        Write { ns: self.keys.namespace(), filter, update, upsert, many: false, event: Some(op.seq) }
    }

    /// A deletion's tombstones: every key document of the session older
    /// than it.
    fn wipe_write(&self, w: &Wipe) -> Write {
        self.tombstones(doc! { "sid": sid(&w.session) }, w.seq, w.at_ms, true)
    }

    /// One key document made a tombstone of the deletion at `seq`, if older.
    fn tombstone_write(&self, t: &Tombstone) -> Write {
        let (session, ty, kid) = &t.place;
        self.tombstones(doc! { "_id": self.key_doc_id(session, ty, kid) }, t.seq, t.at_ms, false)
    }

    /// Makes the key documents matching `filter` that are older than `seq`
    /// tombstones of the deletion at `seq`.
    pub(crate) fn tombstones(&self, mut filter: Document, seq: u64, at_ms: u64, many: bool) -> Write {
        let at = DateTime::from_millis(at_ms as i64);
        filter.insert("seq", doc! { "$lt": seq as i64 });
        Write {
            ns: self.keys.namespace(),
            filter,
            update: doc! {
                "$set": { "seq": seq as i64, "deleted": true, "deleted_at": at, "updated_at": at },
                "$unset": { "value": "" },
            },
            upsert: false,
            many,
            event: Some(seq),
        }
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
    pub(crate) async fn write_all(&self, writes: &[Write]) -> Result<Vec<Outcome>, MongoError> {
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
                let what = format!("mongo refused a write ({}): {}", err.code, err.message);
                if TRANSIENT_WRITE_ERRORS.contains(&err.code) {
                    return Err(MongoError::Unavailable(what));
                }
                // The document, not the server: the same write fails again.
                // Only the code: the message may quote the document.
                return Err(MongoError::Refused {
                    seq: writes[i].borrow().event,
                    reason: format!("mongo refused a write (error {})", err.code),
                });
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
            // A message passed over (refused) still moves the session's
            // sequence, as it moves the log readers' state.
            out.seq = int(d, "seq").max(int(d, "passed_seq"));
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
            // The tag is read from the document's name, which the value is
            // sealed for. Errors name the type and the tag, never an id.
            let unreadable = |what: &str| MongoError::Unreadable(format!("{session}: a key document {what}"));
            if d.contains_key("id") {
                return Err(unreadable("in the format of an earlier release"));
            }
            let (Ok(name), Ok(t)) = (d.get_str("_id"), d.get_str("type")) else { return Err(unreadable("without name or type")) };
            let ty = KeyType::parse(t).map_err(|_| unreadable("of a malformed type"))?;
            let tag = name.rsplit(ID_SEP).next().unwrap_or_default();
            if doc_id_of_tag(session, &ty, tag) != name {
                return Err(unreadable("named for another session or type"));
            }
            let blob = d.get_binary_generic("value").map_err(|_| MongoError::Unreadable(format!("{session} key {t}/{tag}: no value")))?;
            let (kid, v) = open_key(&self.codec, session, &ty, tag, blob)
                .map_err(|e| MongoError::Unreadable(format!("{session} key {t}/{tag}: {e}")))?;
            out.keys.insert((t.to_owned(), kid.as_str().to_owned()), v);
        }
        Ok((found || any_key).then_some(out))
    }
}

/// Points inside [`Store::write`] where a test can hold one instance while
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

/// One guarded write.
pub(crate) struct Write {
    ns: Namespace,
    pub(crate) filter: Document,
    update: Document,
    upsert: bool,
    many: bool,
    /// The stream sequence of the event whose change it writes, if one.
    event: Option<u64>,
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

fn count_missed(outcomes: &[Outcome]) -> usize {
    outcomes.iter().filter(|o| **o == Outcome::Missed).count()
}

/// `$or` clauses matching a document whose `field` is below `n` or absent
/// (a register never written counts as 0).
fn older_than(field: &str, n: i64) -> Vec<Document> {
    vec![doc! { field: { "$lt": n } }, doc! { field: { "$exists": false } }]
}

pub(crate) fn binary(bytes: Vec<u8>) -> Bson {
    Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes })
}

pub(crate) fn int(d: &Document, field: &str) -> u64 {
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

pub(crate) fn unavailable(e: mongodb::error::Error) -> MongoError {
    MongoError::Unavailable(e.to_string())
}
