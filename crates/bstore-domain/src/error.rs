//! Errors the core can decide on its own: a request that breaks a rule.

use crate::ids::IdError;

/// A request the core refuses. Every variant is the caller's fault and is
/// answered as a bad request; nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A tenant, session, key type or key id is not acceptable.
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// A request exceeds one of the configured [`Limits`](crate::Limits).
    #[error("{what} is {actual}, over the limit of {limit}")]
    LimitExceeded {
        /// Which limit, in words a client author understands.
        what: &'static str,
        /// The configured maximum.
        limit: u64,
        /// What the request had.
        actual: u64,
    },
}
