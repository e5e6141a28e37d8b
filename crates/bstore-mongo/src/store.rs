//! The documents, and the one function that writes events into them.
//!
//! `keys`: one document per key ever written —
//! `{_id: "<tenant>.<session>\x1f<type>\x1f<id>", sid, tenant, session, type, id,
//! seq, value: <sealed>, deleted: false, updated_at}`; a deleted key keeps
//! its document as a tombstone: `deleted: true`, no value, `deleted_at`.
//!
//! `sessions`: one per session — `{_id: "<tenant>.<session>", tenant,
//! session, seq, creds: <sealed>, updated_at_ms, counts: {type: n},
//! reset_seq, deleted, deleted_at}`. (No event counter: a counter cannot be
//! kept exact when a redelivered or reordered event may arrive; everything
//! here is either last-writer-wins by sequence or recomputed.) `reset_seq` is the sequence of the
//! session's last deletion: a key change older than it is never written, so a
//! late event cannot bring back a key the deletion removed.
//!
//! `checkpoints`: `{_id: <consumer>, last_seq, updated_at}`.
//!
//! Every write is guarded by sequence: an upsert filtered on `seq < new`.
//! When the document is already as new or newer the filter matches nothing
//! and the upsert's insert collides with the existing `_id` (error 11000),
//! which here means "already applied" and is ignored. So applying a batch
//! twice, or an older event after a newer one, changes nothing.
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
use mongodb::options::{ClientOptions, IndexOptions, UpdateManyModel, UpdateOneModel, WriteModel};
use mongodb::{Client, Collection, Database, IndexModel};

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
    /// Writes the server found already applied (11000 on a guarded upsert).
    pub already_applied: usize,
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

    /// Writes a batch of events. Idempotent and order-insensitive: repeats,
    /// events already applied and events older than what a document holds
    /// change nothing.
    pub async fn apply(&self, batch: &[LoggedEvent]) -> Result<Applied, MongoError> {
        let mut events: Vec<&LoggedEvent> = batch.iter().collect();
        events.sort_by_key(|e| e.seq);
        events.dedup_by_key(|e| e.seq);
        let mut stats = Applied { events: events.len(), ..Default::default() };
        if events.is_empty() {
            return Ok(stats);
        }

        // What Mongo knows of each session: how far it is, and when the
        // session was last deleted.
        let sids: BTreeSet<String> = events.iter().map(|e| sid(&e.session)).collect();
        let mut accs: HashMap<String, SessionAcc> = HashMap::new();
        let mut cursor =
            self.sessions.find(doc! { "_id": { "$in": sids.iter().cloned().collect::<Vec<_>>() } }).await.map_err(unavailable)?;
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            let Ok(id) = d.get_str("_id") else { continue };
            accs.insert(id.to_owned(), SessionAcc::from_doc(&d));
        }

        // Collapse the batch: per key the newest change wins; a deletion of
        // the session turns every earlier change of the batch into a
        // tombstone at the deletion's sequence.
        let mut key_ops: BTreeMap<(String, KeyType, KeyId), KeyOp> = BTreeMap::new();
        let mut wipes: Vec<(String, u64, u64)> = Vec::new();
        // Sessions whose counts per type must be recomputed.
        let mut recount: BTreeSet<String> = BTreeSet::new();
        for e in &events {
            let id = sid(&e.session);
            let acc = accs.entry(id.clone()).or_default();
            acc.session = Some(e.session.clone());
            let fresh_for_session = e.seq > acc.seq;
            if fresh_for_session {
                acc.record(e.seq, &e.event);
            }
            match &e.event.change {
                Change::CredsPut { .. } => {}
                // Patches need the previous value; the materializer turns them
                // into whole values first (`Materializer::resolve_patches`).
                Change::KeysChanged { patched, .. } if !patched.is_empty() => {
                    return Err(MongoError::Unreadable(format!("event {} of {} still holds patches", e.seq, e.session)));
                }
                Change::KeysChanged { keys, .. } => {
                    if e.seq <= acc.reset_seq {
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
                    if !fresh_for_session && e.seq < acc.reset_seq {
                        continue;
                    }
                    for ((s, _, _), op) in key_ops.iter_mut() {
                        if *s == id && op.seq < e.seq {
                            *op = KeyOp { seq: e.seq, at_ms: e.event.at_ms, value: None, session: e.session.clone() };
                        }
                    }
                    wipes.push((id.clone(), e.seq, e.event.at_ms));
                    recount.insert(id.clone());
                }
            }
        }

        // Counts change only where a key appears or disappears. Most
        // writes rewrite a live key (a Signal session after each message),
        // so the documents' state before the batch decides which sessions
        // need the (per-session) recount, and most batches need none.
        if !key_ops.is_empty() {
            let ids: Vec<String> = key_ops.keys().map(|(s, t, i)| key_doc_id(s, t, i)).collect();
            let mut before: HashMap<String, (u64, bool)> = HashMap::new();
            for chunk in ids.chunks(1000) {
                let mut cursor = self
                    .keys
                    .find(doc! { "_id": { "$in": chunk } })
                    .projection(doc! { "seq": 1, "deleted": 1 })
                    .await
                    .map_err(unavailable)?;
                while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
                    if let Ok(id) = d.get_str("_id") {
                        before.insert(id.to_owned(), (int(&d, "seq"), d.get_bool("deleted").unwrap_or(false)));
                    }
                }
            }
            for ((s, t, i), op) in &key_ops {
                let was_live = match before.get(&key_doc_id(s, t, i)) {
                    Some(&(seq, _)) if seq >= op.seq => continue,
                    Some(&(_, deleted)) => !deleted,
                    None => false,
                };
                if was_live != op.value.is_some() {
                    recount.insert(s.clone());
                }
            }
        }

        let mut models: Vec<WriteModel> = Vec::new();
        for ((id, ty, kid), op) in &key_ops {
            let filter = doc! { "_id": key_doc_id(id, ty, kid), "seq": { "$lt": op.seq as i64 } };
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
            models
                .push(UpdateOneModel::builder().namespace(self.keys.namespace()).filter(filter).update(update).upsert(true).build().into());
        }
        stats.key_writes = key_ops.len();
        for (id, seq, at_ms) in &wipes {
            let at = DateTime::from_millis(*at_ms as i64);
            let update = doc! {
                "$set": { "seq": *seq as i64, "deleted": true, "deleted_at": at, "updated_at": at },
                "$unset": { "value": "" },
            };
            let filter = doc! { "sid": id, "seq": { "$lt": *seq as i64 } };
            models.push(UpdateManyModel::builder().namespace(self.keys.namespace()).filter(filter).update(update).build().into());
        }
        stats.session_wipes = wipes.len();
        for (id, acc) in &accs {
            if let Some(update) = acc.update(&self.codec) {
                let filter = doc! { "_id": id, "seq": { "$lt": acc.seq as i64 } };
                models.push(
                    UpdateOneModel::builder()
                        .namespace(self.sessions.namespace())
                        .filter(filter)
                        .update(update)
                        .upsert(true)
                        .build()
                        .into(),
                );
                stats.session_writes += 1;
            }
        }
        stats.already_applied += self.bulk(models).await?;

        // Counts are recomputed from the key documents rather than kept by
        // increments, which a repeated or reordered event would skew.
        if !recount.is_empty() {
            let mut counts: BTreeMap<String, Document> = recount.iter().map(|s| (s.clone(), Document::new())).collect();
            let pipeline = vec![
                doc! { "$match": { "sid": { "$in": recount.iter().cloned().collect::<Vec<_>>() }, "deleted": false } },
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
            let models: Vec<WriteModel> = counts
                .into_iter()
                .map(|(id, c)| {
                    UpdateOneModel::builder()
                        .namespace(self.sessions.namespace())
                        .filter(doc! { "_id": id })
                        .update(doc! { "$set": { "counts": c } })
                        .build()
                        .into()
                })
                .collect();
            self.bulk(models).await?;
        }
        Ok(stats)
    }

    /// Sends `models` as one unordered bulk write (ordering does not matter:
    /// every write is guarded by sequence). Returns how many were found
    /// already applied.
    async fn bulk(&self, models: Vec<WriteModel>) -> Result<usize, MongoError> {
        if models.is_empty() {
            return Ok(0);
        }
        match self.client.bulk_write(models).ordered(false).await {
            Ok(_) => Ok(0),
            Err(e) => match *e.kind {
                mongodb::error::ErrorKind::BulkWrite(ref bw)
                    if bw.write_concern_errors.is_empty()
                        && !bw.write_errors.is_empty()
                        && bw.write_errors.values().all(|w| w.code == DUPLICATE_KEY) =>
                {
                    Ok(bw.write_errors.len())
                }
                _ => Err(unavailable(e)),
            },
        }
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

/// The `_id` of a session document.
pub fn sid(session: &SessionKey) -> String {
    format!("{}.{}", session.tenant, session.session)
}

/// The `_id` of a key document.
pub fn key_doc_id(sid: &str, ty: &KeyType, id: &KeyId) -> String {
    format!("{sid}{ID_SEP}{ty}{ID_SEP}{id}")
}

struct KeyOp {
    seq: u64,
    at_ms: u64,
    value: Option<Bytes>,
    session: SessionKey,
}

/// A session document being brought forward through a batch.
#[derive(Default)]
struct SessionAcc {
    session: Option<SessionKey>,
    /// The sequence as stored, then as advanced by the batch.
    seq: u64,
    stored_seq: u64,
    reset_seq: u64,
    updated_at_ms: u64,
    deleted: bool,
    deleted_at_ms: u64,
    /// `Some(None)`: the creds were removed; `None`: untouched.
    creds: Option<Option<Bytes>>,
}

impl SessionAcc {
    fn from_doc(d: &Document) -> Self {
        let seq = int(d, "seq");
        Self {
            seq,
            stored_seq: seq,
            reset_seq: int(d, "reset_seq"),
            updated_at_ms: int(d, "updated_at_ms"),
            deleted: d.get_bool("deleted").unwrap_or(false),
            ..Default::default()
        }
    }

    /// Mirrors `SessionState::apply` for the session-wide fields.
    fn record(&mut self, seq: u64, event: &Event) {
        self.seq = seq;
        self.updated_at_ms = event.at_ms;
        match &event.change {
            Change::CredsPut { creds } => {
                self.creds = Some(Some(creds.clone()));
                self.deleted = false;
            }
            Change::KeysChanged { .. } => self.deleted = false,
            Change::SessionDeleted => {
                self.creds = Some(None);
                self.reset_seq = seq;
                self.deleted = true;
                self.deleted_at_ms = event.at_ms;
            }
        }
    }

    /// The guarded update for the session document, if the batch moved it.
    fn update(&self, codec: &Codec) -> Option<Document> {
        if self.seq <= self.stored_seq {
            return None;
        }
        let session = self.session.as_ref()?;
        let mut set = doc! {
            "tenant": session.tenant.as_str(), "session": session.session.as_str(),
            "seq": self.seq as i64, "updated_at_ms": self.updated_at_ms as i64,
            "reset_seq": self.reset_seq as i64, "deleted": self.deleted,
        };
        let mut unset = Document::new();
        match &self.creds {
            Some(Some(c)) => {
                set.insert("creds", binary(codec.seal_value(session, None, c)));
            }
            Some(None) => {
                unset.insert("creds", "");
            }
            None => {}
        }
        if self.deleted {
            set.insert("deleted_at", DateTime::from_millis(self.deleted_at_ms as i64));
        } else {
            unset.insert("deleted_at", "");
        }
        let mut update = doc! { "$set": set };
        if !unset.is_empty() {
            update.insert("$unset", unset);
        }
        Some(update)
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
