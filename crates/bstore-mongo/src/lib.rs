//! The Mongo materializer: a durable copy of every session, one document per
//! key and one per session, for queries and audits that should not replay
//! the log.
//!
//! A durable JetStream pull consumer with explicit acks reads the event
//! stream in batches ([`Materializer`]); each batch is written with
//! unordered `bulk_write`s whose every operation is guarded by stream
//! sequence ([`Store::apply`]), then acknowledged. Client-level `bulk_write`
//! needs MongoDB 8.0+ (the test server reports 8.2). Several instances may
//! share the consumer: `apply` is correct when they apply batches of one
//! session at the same time, in any order, or the same batch twice.
//!
//! [`Materializer::rebuild`] (`rebuild.rs`) writes every session's documents
//! again from the log — from its newest snapshot plus the events after it —
//! while the instances' materializers go on, then lets the durable consumer
//! resume after what it rebuilt.
//!
//! **Architecture invariants:** Mongo never holds a fact the stream lacks —
//! only events read back from the log are written; writes are idempotent and
//! ordered by stream sequence, also across instances — a redelivered or
//! older event changes no fact; deletions leave tombstones carrying their
//! sequence, purged by a TTL index only after the configured retention, and
//! a key change older than a deletion is never left live; values stay
//! sealed for their session, type and id; no key id is stored in clear
//! (documents are named by keyed hashes, `keydoc.rs`); one poison event or
//! document never stops the others: it is quarantined, recorded and
//! acknowledged, while Mongo being down is waited out (`quarantine.rs`).

mod config;
mod keydoc;
mod materializer;
mod plan;
mod quarantine;
mod rebuild;
mod store;

pub use bstore_log::session_of;
pub use config::MongoConfig;
pub use materializer::{Lag, Materializer, Stats, lag};
/// The MongoDB driver, for tools and tests that read the documents.
pub use mongodb;
pub use quarantine::{QuarantineKind, Quarantined};
pub use rebuild::Rebuilt;
pub use store::{Applied, ID_SEP, LoggedEvent, Store, StoredSession, sid};

/// Why the materializer could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MongoError {
    /// The configuration cannot work (no URL, malformed URL).
    #[error("mongo configuration: {0}")]
    Config(String),
    /// Mongo did not answer or refused; retry.
    #[error("mongo is unavailable: {0}")]
    Unavailable(String),
    /// JetStream did not answer or refused; retry.
    #[error("the event stream is unavailable: {0}")]
    Stream(String),
    /// Stored data cannot be opened or decoded.
    #[error("unreadable: {0}")]
    Unreadable(String),
    /// Mongo refused a write for what it holds (not for being unavailable):
    /// the same write fails again. `seq`: the event whose change it was.
    #[error("refused: {reason}")]
    Refused {
        /// The stream sequence of the event, if the write carried one.
        seq: Option<u64>,
        /// Why, naming no value and no key id.
        reason: String,
    },
}

#[cfg(test)]
mod tests;
