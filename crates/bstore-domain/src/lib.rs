//! The pure core of baileys-store.
//!
//! Everything here is deterministic and does no I/O: identifiers and their
//! validation, the limits a request must respect, the commands a client can
//! send, the events that record what was decided, and the two functions that
//! hold the session's logic — [`SessionState::handle`] (every decision) and
//! [`SessionState::apply`] (no decisions). Adapters (the event log, the actors,
//! the API, the projections) live in other crates and call into this one.
//!
//! **Architecture invariant:** this crate depends on nothing that can block,
//! allocate a socket or read a clock. Time is passed in by the caller.

pub mod chain;
pub mod delta;
mod error;
mod event;
mod ids;
mod limits;
pub mod secs;
mod state;

pub use chain::{Chain, Link, Refusal};
pub use error::DomainError;
pub use event::{Change, EVENT_SCHEMA_VERSION, Event, KeyChanges, KeyPatches};
pub use ids::{IdError, KNOWN_KEY_TYPES, KeyId, KeyType, SessionId, SessionKey, TenantId};
pub use limits::Limits;
pub use state::{ApplyError, Command, CredsRestore, KeyCounts, RestoreSummary, SessionInfo, SessionState};
