//! Stable error codes. The numbers and names are part of the protocol:
//! never renumber one, only add.

use bstore_domain::DomainError;
use bstore_session::{RestoreRefusal, SessionError};

/// Every error a client can receive, with its stable number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: the body is not a MessagePack map of the documented shape.
    BadRequest,
    /// 404: the op is not one the service knows.
    UnknownOp,
    /// 409: another writer changed the session; nothing applied. Retry.
    Conflict,
    /// 413: the body or a limit was exceeded.
    TooLarge,
    /// 422: a tenant, session, key type, key id or rid is malformed.
    InvalidId,
    /// 500: a bug.
    Internal,
    /// 503: the event log is unreachable; nothing acknowledged. Retry.
    Unavailable,
    /// 504: the request's deadline passed. Retry with the same rid.
    Timeout,
    /// 520: stored data cannot be opened or decoded.
    Unreadable,
    /// 410: the writer claim the request carried was superseded; nothing
    /// applied. Drop what was learned under it and go on without it.
    Superseded,
    /// 440 (operator's restore only): the session has no history.
    UnknownSession,
    /// 441 (operator's restore only): the point is before the session's
    /// kept history (an audit retention's cut, an erasure).
    HistoryGone,
    /// 442 (operator's restore only): the point is after the session's
    /// last event.
    BeyondLog,
    /// 443 (operator's restore only): the session held nothing at the
    /// point; a restore does not delete.
    EmptyPoint,
}

impl ErrorCode {
    /// The number sent in `Nats-Service-Error-Code`.
    pub fn number(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::UnknownOp => 404,
            Self::Conflict => 409,
            Self::TooLarge => 413,
            Self::InvalidId => 422,
            Self::Internal => 500,
            Self::Unavailable => 503,
            Self::Timeout => 504,
            Self::Unreadable => 520,
            Self::Superseded => 410,
            Self::UnknownSession => 440,
            Self::HistoryGone => 441,
            Self::BeyondLog => 442,
            Self::EmptyPoint => 443,
        }
    }

    /// The name that starts the `Nats-Service-Error` text.
    pub fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnknownOp => "unknown_op",
            Self::Conflict => "conflict",
            Self::TooLarge => "too_large",
            Self::InvalidId => "invalid_id",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Unreadable => "unreadable",
            Self::Superseded => "superseded",
            Self::UnknownSession => "unknown_session",
            Self::HistoryGone => "history_gone",
            Self::BeyondLog => "beyond_log",
            Self::EmptyPoint => "empty_point",
        }
    }

    /// Whether a client may retry the same request.
    pub fn retryable(self) -> bool {
        matches!(self, Self::Conflict | Self::Unavailable | Self::Timeout)
    }

    /// The code for a session error.
    pub fn of(e: &SessionError) -> Self {
        match e {
            SessionError::Rejected(DomainError::InvalidId(_)) => Self::InvalidId,
            SessionError::Rejected(DomainError::LimitExceeded { .. }) | SessionError::TooLarge(_) => Self::TooLarge,
            // A write held off by another writer's claim: like a conflict,
            // nothing was applied and a retry passes once the claim ends,
            // which clients that know nothing of claims already do.
            SessionError::Conflict | SessionError::Claimed { .. } => Self::Conflict,
            SessionError::Superseded => Self::Superseded,
            SessionError::Unavailable(_) | SessionError::NotOwner => Self::Unavailable,
            SessionError::Timeout => Self::Timeout,
            SessionError::Unreadable(_) => Self::Unreadable,
            SessionError::Refused(r) => match r {
                RestoreRefusal::UnknownSession => Self::UnknownSession,
                RestoreRefusal::HistoryGone { .. } => Self::HistoryGone,
                RestoreRefusal::BeyondLog { .. } => Self::BeyondLog,
                RestoreRefusal::EmptyPoint { .. } => Self::EmptyPoint,
            },
        }
    }
}
