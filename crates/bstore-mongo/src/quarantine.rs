//! What the materializer set aside, so that one bad record does not stop
//! the others.
//!
//! A record fails either for a while (Mongo or JetStream down: the batch is
//! retried, nothing is skipped) or for good: an event that does not decode,
//! that the chain check refuses, whose patch fits nothing the log holds,
//! whose write Mongo refuses, or that was delivered `mongo.max_deliver`
//! times without being acknowledged. Such an event is recorded here and
//! then acknowledged on the consumer, so that delivery and the ack floor go
//! on. A key document that does not open when a patch needs its value is
//! recorded too; the value is then taken from the log, and the document
//! written again whole.
//!
//! A record names the session, the stream sequence, why, and when — never
//! a value or a key id (a document is named by its type and id tag). It is
//! written with an upsert on an `_id` made of what it is about, so an event
//! quarantined by two instances is recorded once. `verify` lists them;
//! `rebuild mongo` writes each session again from the log and drops the
//! records it replaced (`rebuild.rs`).

use bstore_domain::SessionKey;
use futures_util::TryStreamExt;
use mongodb::bson::{DateTime, Document, doc};
use mongodb::options::{UpdateOneModel, WriteModel};

use crate::MongoError;
use crate::store::{Store, int, unavailable};

/// What was set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineKind {
    /// An event, skipped (recorded, then acknowledged).
    Event,
    /// A key document that did not open; its value was taken from the log.
    Document,
}

impl QuarantineKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Document => "document",
        }
    }
}

/// One record of the `quarantine` collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// What.
    pub kind: QuarantineKind,
    /// The subject the event was read from.
    pub subject: String,
    /// Whose, when the subject names a session.
    pub session: Option<SessionKey>,
    /// The event's stream sequence (for a document: the event whose patch
    /// needed it).
    pub seq: u64,
    /// For a document: its key type and id tag.
    pub key: Option<(String, String)>,
    /// Why, naming no value and no key id.
    pub reason: String,
    /// When it was recorded, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl Quarantined {
    /// An event set aside.
    pub(crate) fn event(subject: &str, session: Option<&SessionKey>, seq: u64, reason: String) -> Self {
        Self {
            kind: QuarantineKind::Event,
            subject: subject.to_owned(),
            session: session.cloned(),
            seq,
            key: None,
            reason,
            at_ms: now_ms(),
        }
    }

    /// A key document that did not open, found by the event at `seq`.
    pub(crate) fn document(subject: &str, session: &SessionKey, seq: u64, ty: &str, tag: String, reason: String) -> Self {
        Self {
            kind: QuarantineKind::Document,
            subject: subject.to_owned(),
            session: Some(session.clone()),
            seq,
            key: Some((ty.to_owned(), tag)),
            reason,
            at_ms: now_ms(),
        }
    }

    fn id(&self) -> String {
        match &self.key {
            Some((ty, tag)) => format!("document {} {ty} {tag}", self.seq),
            None => format!("event {}", self.seq),
        }
    }
}

impl Store {
    /// Records `entries` (idempotent: a record already there keeps its
    /// first time).
    pub(crate) async fn quarantine(&self, entries: &[Quarantined]) -> Result<(), MongoError> {
        if entries.is_empty() {
            return Ok(());
        }
        let models: Vec<WriteModel> = entries
            .iter()
            .map(|q| {
                let mut set = doc! {
                    "kind": q.kind.as_str(), "subject": &q.subject, "seq": q.seq as i64, "reason": &q.reason,
                };
                if let Some(s) = &q.session {
                    set.insert("tenant", s.tenant.as_str());
                    set.insert("session", s.session.as_str());
                }
                if let Some((ty, tag)) = &q.key {
                    set.insert("type", ty);
                    set.insert("tag", tag);
                }
                UpdateOneModel::builder()
                    .namespace(self.quarantine.namespace())
                    .filter(doc! { "_id": q.id() })
                    .update(doc! { "$set": set, "$setOnInsert": { "at": DateTime::from_millis(q.at_ms as i64) } })
                    .upsert(true)
                    .build()
                    .into()
            })
            .collect();
        self.database().client().bulk_write(models).ordered(false).await.map_err(unavailable)?;
        Ok(())
    }

    /// Everything quarantined, in stream order.
    pub async fn quarantined(&self) -> Result<Vec<Quarantined>, MongoError> {
        let mut cursor = self.quarantine.find(doc! {}).await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
            out.push(from_doc(&d));
        }
        out.sort_by_key(|q| q.seq);
        Ok(out)
    }
}

fn from_doc(d: &Document) -> Quarantined {
    let text = |f: &str| d.get_str(f).unwrap_or_default().to_owned();
    let session = match (d.get_str("tenant"), d.get_str("session")) {
        (Ok(t), Ok(s)) => SessionKey::parse(t, s).ok(),
        _ => None,
    };
    let key = match (d.get_str("type"), d.get_str("tag")) {
        (Ok(t), Ok(g)) => Some((t.to_owned(), g.to_owned())),
        _ => None,
    };
    Quarantined {
        kind: if d.get_str("kind") == Ok("document") { QuarantineKind::Document } else { QuarantineKind::Event },
        subject: text("subject"),
        session,
        seq: int(d, "seq"),
        key,
        reason: text("reason"),
        at_ms: d.get_datetime("at").map_or(0, |t| t.timestamp_millis().max(0) as u64),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
