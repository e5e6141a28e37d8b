//! The operator's subject: requests only the operator's tools may send,
//! served apart from the bots' API.
//!
//! `restore` is here: `_BSTORE_ADMIN.restore.<tenant>.<session>`, answered
//! by the session's actor on the instance that owns its partition.
//!
//! **Who can reach it.** Every instance subscribes on its *store*
//! connection (the service's own identity, in the service's own account),
//! never on the serving connection, and the subject is outside every
//! export: bots import `<prefix>.<tenant>.>` only, and `_BSTORE_ADMIN` is
//! not under it, so no request of a bot's account can arrive here. A
//! serving identity confined as in `deploy/accounts.conf` can publish
//! neither. Only replies to a literal `_INBOX.` subject are sent (the
//! `_R_.` prefix of cross-account replies is not accepted: nothing here is
//! imported by another account), so the service never publishes anywhere
//! else on a request of this subject either.
//!
//! **N instances.** Each instance receives every request (a plain
//! subscription, no queue group); only the owner of the session's partition
//! answers, the others stay silent, and nobody answers while the partition
//! is changing hands. The tool therefore retries a request that is not
//! answered in time, with the same request id, which the actor (and the
//! log's duplicate window) turns into one restore however many attempts
//! reach it.

use std::future::Future;

use async_nats::{HeaderMap, Message, Subject};
use bstore_domain::SessionKey;
use bstore_session::{Op, Reply, Request, Restoration, RestoreRequest, SessionError, Sessions};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::wire::Refusal;
use crate::{ErrorCode, StartError};

/// Operator subjects are `<ADMIN_PREFIX>.<op>.<tenant>.<session>`.
pub const ADMIN_PREFIX: &str = "_BSTORE_ADMIN";

/// The only reply prefix answered on the operator's subject.
const ADMIN_REPLY_PREFIX: &str = "_INBOX.";

/// The body of a `restore` request: a MessagePack map with these fields
/// (no others), strictly decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    /// Request id (1–64 of `[A-Za-z0-9_-]`): a retry with the same one is
    /// applied at most once.
    pub rid: String,
    /// Restore the state after the session's events through this sequence.
    pub to_seq: u64,
    /// The moment the operator named, if the point was a time (recorded in
    /// the event; the tool resolved it to `to_seq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<u64>,
    /// Decide and report, write nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// The subject a restore of `key` is sent to.
pub fn restore_subject(key: &SessionKey) -> String {
    format!("{ADMIN_PREFIX}.restore.{}.{}", key.tenant, key.session)
}

/// The operator's subject, subscribed on the store connection and not yet
/// served: subscribing first means a tool's request sent once the service
/// is ready finds it.
pub struct Admin {
    client: async_nats::Client,
    sub: async_nats::Subscriber,
}

impl Admin {
    /// Subscribes to the operator's subject on `client` (the store
    /// connection).
    pub async fn subscribe(client: async_nats::Client) -> Result<Self, StartError> {
        let sub = client.subscribe(format!("{ADMIN_PREFIX}.restore.*.*")).await.map_err(|e| StartError(e.to_string()))?;
        Ok(Self { client, sub })
    }

    /// Serves the operator's requests until `shutdown` resolves.
    pub async fn serve(self, sessions: Sessions, shutdown: impl Future<Output = ()>) {
        let Self { client, mut sub } = self;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                next = sub.next() => {
                    let Some(msg) = next else { break };
                    tokio::spawn(handle(client.clone(), sessions.clone(), msg));
                }
            }
        }
        let _ = sub.unsubscribe().await;
    }
}

async fn handle(client: async_nats::Client, sessions: Sessions, msg: Message) {
    let Some(reply) = msg.reply.clone() else { return };
    if !crate::route::reply_allowed(&reply, &[ADMIN_REPLY_PREFIX.to_owned()]) {
        tracing::warn!(reply = %reply, "refused an operator's request whose reply subject is not an inbox; nothing was published");
        return;
    }
    let (key, body) = match decode(&msg) {
        Ok(decoded) => decoded,
        Err(refusal) => return respond(&client, &reply, Err(refusal)).await,
    };
    let ownership = sessions.ownership();
    if ownership.serving(ownership.partition(&key)).is_none() {
        // The owner answers; the tool asks again during a hand-over.
        return;
    }
    let op = Op::Restore(RestoreRequest { to_seq: body.to_seq, to_ms: body.to_ms, rid: body.rid, dry_run: body.dry_run });
    let result = match sessions.call(Request { key: key.clone(), op, deadline: sessions.deadline() }).await {
        Err(SessionError::NotOwner) => return,
        Ok(Reply::Restored(r)) => Ok(Bytes::from(rmp_serde::to_vec_named(&r).expect("plain data"))),
        Ok(other) => Err(Refusal(ErrorCode::Internal, format!("a restore was answered with {other:?}"))),
        Err(e) => {
            if let SessionError::Unreadable(detail) = &e {
                tracing::warn!(session = %key, %detail, "a restore met stored data that could not be opened");
            }
            // The operator may see the details the bots' replies leave out.
            Err(Refusal(ErrorCode::of(&e), e.to_string()))
        }
    };
    respond(&client, &reply, result).await;
}

/// The session of the subject and the body, strictly: a map with string
/// keys of the documented fields and nothing after it.
fn decode(msg: &Message) -> Result<(SessionKey, RestoreBody), Refusal> {
    let rest = msg.subject.as_str().strip_prefix(ADMIN_PREFIX).and_then(|r| r.strip_prefix(".restore.")).unwrap_or_default();
    let Some((tenant, session)) = rest.split_once('.') else {
        return Err(Refusal(ErrorCode::UnknownOp, "the operator's subject is _BSTORE_ADMIN.restore.<tenant>.<session>".into()));
    };
    let key = SessionKey::parse(tenant, session)?;
    let bad =
        |why: String| Refusal(ErrorCode::BadRequest, format!("the restore body must be a map of rid, to_seq, to_ms?, dry_run?: {why}"));
    // A map (not an array standing for one), read to its last byte.
    if !matches!(msg.payload.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Err(bad("not a map".into()));
    }
    let mut cursor = std::io::Cursor::new(msg.payload.as_ref());
    let body: RestoreBody = RestoreBody::deserialize(&mut rmp_serde::Deserializer::new(&mut cursor)).map_err(|e| bad(e.to_string()))?;
    if cursor.position() as usize != msg.payload.len() {
        return Err(bad("bytes follow the map".into()));
    }
    crate::wire::check_rid(Some(&body.rid))?;
    Ok((key, body))
}

async fn respond(client: &async_nats::Client, reply: &Subject, result: Result<Bytes, Refusal>) {
    let sent = match result {
        Ok(body) => client.publish(reply.clone(), body).await,
        Err(Refusal(code, message)) => {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::service::NATS_SERVICE_ERROR_CODE, code.number().to_string().as_str());
            headers.insert(async_nats::service::NATS_SERVICE_ERROR, format!("{}: {message}", code.name()).as_str());
            client.publish_with_headers(reply.clone(), headers, Bytes::new()).await
        }
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not send the reply to an operator's request");
    }
}

/// What a restore request can end with, for the tool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The service refused or failed, with its stable code and name.
    #[error("{name} ({code}): {message}")]
    Service {
        /// The number (`Nats-Service-Error-Code`).
        code: u16,
        /// The code's name (the start of `Nats-Service-Error`).
        name: String,
        /// The rest of the text.
        message: String,
    },
    /// No instance answered within the time-out (the session's partition
    /// may be changing hands): ask again with the same request id.
    #[error("no instance answered in time")]
    TimedOut,
    /// Nothing subscribes to the operator's subject: no instance runs.
    #[error("no instance of the service is running")]
    NoResponders,
    /// Transport or decoding failure.
    #[error("{0}")]
    Other(String),
}

impl AdminError {
    /// Whether the same request may be sent again.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Service { code, .. } => matches!(*code, 409 | 503 | 504),
            Self::TimedOut => true,
            Self::NoResponders | Self::Other(_) => false,
        }
    }
}

/// Sends one restore request for `key` and waits up to `timeout` for the
/// owner's answer.
pub async fn request_restore(
    nc: &async_nats::Client,
    key: &SessionKey,
    body: &RestoreBody,
    timeout: std::time::Duration,
) -> Result<Restoration, AdminError> {
    let payload = Bytes::from(rmp_serde::to_vec_named(body).expect("plain data"));
    let request = async_nats::Request::new().payload(payload).timeout(Some(timeout));
    let msg = match nc.send_request(restore_subject(key), request).await {
        Ok(msg) => msg,
        Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => return Err(AdminError::TimedOut),
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => return Err(AdminError::NoResponders),
        Err(e) => return Err(AdminError::Other(e.to_string())),
    };
    if let Some(headers) = &msg.headers
        && let Some(code) = headers.get(async_nats::service::NATS_SERVICE_ERROR_CODE)
    {
        let code = code.as_str().parse().unwrap_or(500);
        let text = headers.get(async_nats::service::NATS_SERVICE_ERROR).map(|v| v.as_str().to_owned()).unwrap_or_default();
        let (name, message) = text.split_once(": ").map_or((String::new(), text.clone()), |(n, m)| (n.to_owned(), m.to_owned()));
        return Err(AdminError::Service { code, name, message });
    }
    rmp_serde::from_slice(&msg.payload).map_err(|e| AdminError::Other(format!("undecodable answer: {e}")))
}
