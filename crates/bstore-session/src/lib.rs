//! Session actors.
//!
//! Each active session is one actix actor ([`SessionActor`]) that owns the
//! session's state in memory. Its mailbox is the session's order: a request
//! is handled as an [`actix::AtomicResponse`], so the next message waits
//! until the current one — including its append to the log — is finished.
//! No mutex guards a session.
//!
//! The [`Registry`] actor maps sessions to actors: it starts them on demand
//! across a few arbiters (threads), bounds how many are alive, and restarts
//! one that stopped. Actors stop themselves after an idle time; the log keeps
//! everything, so stopping loses nothing.
//!
//! With Redis configured, a session loads from its Redis copy plus the log's
//! tail ([`load`]), and each actor projects its writes into Redis through a
//! queue of its own, off the reply path: a Redis outage slows cold loads by
//! at most the Redis time-out and never fails or delays a write.
//!
//! **Architecture invariant:** a write is acknowledged only after the log
//! acknowledged its event, and the state in memory changes only by applying
//! an event the log stored.

mod actor;
mod claims;
pub mod load;
mod projector;
mod registry;
mod rids;
mod snapshotter;
pub mod stats;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use bstore_domain::{Command, DomainError, KeyId, KeyType, SessionInfo, SessionKey};
use bstore_log::LogError;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use actor::SessionActor;
pub use actor::restore::{RestoreOutcome, RestoreRefusal, RestoreRequest, Restoration};
pub use registry::{Registry, Sessions};
pub use snapshotter::snapshot_counts;

/// Tampering with the stores that this process noticed since it started,
/// for the operator's figures. Each was also logged where it was noticed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntegrityCounts {
    /// Events refused by a replay as not where they were written
    /// ([`bstore_log::refused_events`]).
    pub refused_events: u64,
    /// Replays stopped by a gap in a session's chain (answered 520).
    pub broken_chains: u64,
    /// Redis copies not believed and replaced from the log.
    pub untrusted_redis_copies: u64,
}

/// The counts of [`IntegrityCounts`] now.
pub fn integrity_counts() -> IntegrityCounts {
    IntegrityCounts {
        refused_events: bstore_log::refused_events(),
        broken_chains: bstore_log::broken_chains(),
        untrusted_redis_copies: bstore_redis::untrusted_copies(),
    }
}

/// Settings of the session actors. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Most sessions kept in memory at once; past it the least recently used
    /// one is stopped. Default 10 000.
    pub max_active: usize,
    /// A session unused this long is stopped and forgotten by memory.
    /// Default 600 s.
    pub idle_timeout_secs: u64,
    /// How long a request may take inside the service before it is answered
    /// with a time-out. Default 10 s.
    pub request_timeout_secs: u64,
    /// How many times a write retries by itself after a conflict with another
    /// writer (it reloads the session first). Default 3.
    pub conflict_retries: u32,
    /// Threads of their own for session actors. 0 (the default) runs them
    /// on the service's main thread, beside the NATS connection: sealing is
    /// a few percent of a request's cost and every hand-off between threads
    /// costs a wake-up, so one thread is faster until sealing large values
    /// saturates it (many cores, large values: try one per core).
    pub workers: usize,
    /// A snapshot of a session is written to the log once this many events
    /// were appended since the last one (0: never write snapshots). Loads
    /// replay at most about this many events. Default 1 000.
    pub snapshot_every_events: u64,
    /// ... or once this many bytes of values were. Default 4 MiB.
    pub snapshot_every_bytes: u64,
    /// ... or when the session's actor stops (idle or evicted) with at least
    /// this many events since the last one. Default 100.
    pub snapshot_on_idle_events: u64,
    /// The lease of a writer claim (`session.claim`), in milliseconds: how
    /// long a client may answer reads from memory after the request that
    /// granted or renewed its claim, and so how long another writer of the
    /// session may have to wait once it appears. Cut to what is left of the
    /// instance's partition lease when that is shorter. Default 3 000.
    pub claim_lease_ms: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_active: 10_000,
            idle_timeout_secs: 600,
            request_timeout_secs: 10,
            conflict_retries: 3,
            workers: 0,
            snapshot_every_events: 1_000,
            snapshot_every_bytes: 4 << 20,
            snapshot_on_idle_events: 100,
            claim_lease_ms: 3_000,
        }
    }
}

impl SessionConfig {
    /// The idle time as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }

    /// The writer claim lease as a duration (at least 100 ms).
    pub fn claim_lease(&self) -> Duration {
        Duration::from_millis(self.claim_lease_ms.max(100))
    }

    /// The request deadline as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }
}

/// What a client asks of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read the creds.
    GetCreds,
    /// Read keys of one type.
    GetKeys {
        /// The type.
        ty: KeyType,
        /// The ids wanted.
        ids: Vec<KeyId>,
    },
    /// Summarize the session.
    Info,
    /// A page of the ids stored under one type, in byte order.
    ListIds {
        /// The type.
        ty: KeyType,
        /// Only ids after this one; from the first without it.
        after: Option<KeyId>,
        /// Most ids in the page; the ids-per-call limit without it.
        limit: Option<usize>,
    },
    /// Change the session.
    Write {
        /// What to change.
        cmd: Command,
        /// The client's request id, for deduplication.
        rid: Option<String>,
    },
    /// Ask for a writer claim on the session (`claim: None`) or renew one.
    Claim {
        /// The claim to renew.
        claim: Option<String>,
    },
    /// Change the session as the holder of a writer claim, which the write
    /// renews; refused once the claim was superseded.
    ClaimedWrite {
        /// The claim id.
        claim: String,
        /// What to change.
        cmd: Command,
        /// The client's request id, for deduplication.
        rid: Option<String>,
    },
    /// Put the session back to its state at an earlier point, as one new
    /// event (an operator's restore; never reachable by a bot's request).
    Restore(RestoreRequest),
}

/// Most bytes of ids in one page of [`Op::ListIds`]: a page stops there
/// even below its count (and says that more follow), so that a page of long
/// ids fits in a reply under NATS's default 1 MB `max_payload`.
pub const MAX_LIST_BYTES: usize = 512 << 10;

/// One request routed to a session.
#[derive(Debug, Clone)]
pub struct Request {
    /// The session.
    pub key: SessionKey,
    /// What to do.
    pub op: Op,
    /// When the caller stops waiting; work not started by then is skipped.
    pub deadline: Instant,
}

impl actix::Message for Request {
    type Result = Result<Reply, SessionError>;
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The creds, if stored.
    Creds {
        /// The client-encoded creds.
        creds: Option<Bytes>,
        /// The session's sequence.
        seq: u64,
    },
    /// The keys found.
    Keys {
        /// Found ids and their values.
        values: Vec<(KeyId, Bytes)>,
        /// The session's sequence.
        seq: u64,
    },
    /// A write was stored (or changed nothing).
    Written {
        /// The session's sequence after the write.
        seq: u64,
    },
    /// A write carrying a writer claim was stored (or changed nothing), and
    /// the claim renewed.
    WrittenClaimed {
        /// The session's sequence after the write.
        seq: u64,
        /// The claim's lease from now, in milliseconds.
        lease_ms: u64,
    },
    /// The answer to [`Op::Claim`].
    Claim {
        /// The claim granted or renewed; `None`: not granted yet.
        claim: Option<String>,
        /// The lease of the claim, in milliseconds (0 when not granted).
        lease_ms: u64,
        /// When not granted: how long to wait before asking again, in
        /// milliseconds (0 when granted).
        wait_ms: u64,
        /// The session's sequence.
        seq: u64,
    },
    /// The session summary.
    Info(SessionInfo),
    /// What a restore did, or would do.
    Restored(Restoration),
    /// A page of ids of one type.
    Ids {
        /// The ids, in byte order.
        ids: Vec<KeyId>,
        /// The cursor of the next page, if more ids follow.
        next: Option<KeyId>,
        /// The session's sequence the page was read at.
        seq: u64,
    },
}

/// Why a request failed, grouped by what the caller should do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// The request breaks a rule; nothing was applied. Do not retry.
    #[error(transparent)]
    Rejected(#[from] DomainError),
    /// The event is too large for the log. Do not retry.
    #[error("{0}")]
    TooLarge(String),
    /// Another writer kept changing the session; nothing was applied. Retry.
    #[error("another writer changed the session at the same time")]
    Conflict,
    /// The log is unreachable; nothing was acknowledged. Retry.
    #[error("{0}")]
    Unavailable(String),
    /// The deadline passed. Retry with the same request id.
    #[error("the request's deadline passed")]
    Timeout,
    /// Stored data cannot be opened or decoded. Operator action needed.
    #[error("{0}")]
    Unreadable(String),
    /// This instance does not serve the session's partition (now): the
    /// request belongs to its owner. Nothing was applied.
    #[error("this instance does not serve the session's partition")]
    NotOwner,
    /// A write without the session's writer claim came while the claim's
    /// lease runs; nothing was applied. The claim is no longer renewed:
    /// retry (after about `wait_ms`).
    #[error("another writer holds a claim on the session for up to {wait_ms} ms more; nothing was applied, retry")]
    Claimed {
        /// How long the claim's lease still runs.
        wait_ms: u64,
    },
    /// The writer claim named by the request is not the session's (another
    /// writer came, or the session moved); nothing was applied. Forget what
    /// was learned under it and go on without it.
    #[error("the writer claim was superseded; nothing was applied")]
    Superseded,
    /// A restore the service will not do; nothing was written. Do not
    /// retry.
    #[error(transparent)]
    Refused(#[from] RestoreRefusal),
}

impl From<LogError> for SessionError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Conflict { .. } => SessionError::Conflict,
            LogError::TooLarge(m) => SessionError::TooLarge(m),
            LogError::Unavailable(m) => SessionError::Unavailable(m),
            e @ (LogError::Unreadable { .. } | LogError::Broken { .. } | LogError::Unfit { .. }) => SessionError::Unreadable(e.to_string()),
        }
    }
}
