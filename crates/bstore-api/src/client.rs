//! A Rust client of the protocol, used by the benchmarks, the tests and the
//! command-line tools. It speaks only `docs/protocol.md`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_bytes::ByteBuf;

use bstore_domain::SessionInfo;

use crate::protocol::{ClaimedWrittenReply, CredsReply, IdsReply, InfoReply, KeysReply, RequestBody, WrittenReply};

/// The reply of [`SessionClient::claim`]: the claim (or `None` and how long
/// to wait), its lease and the session's sequence.
pub use crate::protocol::ClaimReply;

/// What a request can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The service answered with a coded error.
    #[error("service error {code}: {message}")]
    Service {
        /// The stable code (`Nats-Service-Error-Code`).
        code: u16,
        /// The text (`Nats-Service-Error`).
        message: String,
    },
    /// No reply in time.
    #[error("no reply within the time-out")]
    TimedOut,
    /// No instance of the service is subscribed.
    #[error("no responders: the service is not running")]
    NoResponders,
    /// Transport or decoding failure.
    #[error("{0}")]
    Other(String),
}

impl ClientError {
    /// Whether the same request (with the same request id) may be sent
    /// again: no answer (a time-out, no responders during a failover),
    /// 503/504, or 409 (a conflict, or another writer's claim whose lease
    /// still runs). Nothing else is retried: the answer would be the same.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::TimedOut | Self::NoResponders) || matches!(self.code(), Some(409 | 503 | 504))
    }

    /// The service's code, if the service answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Service { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One session's handle.
#[derive(Clone)]
pub struct SessionClient {
    nc: async_nats::Client,
    base: String,
    timeout: Duration,
}

/// A page of [`SessionClient::keys_list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPage {
    /// The ids, in byte order.
    pub ids: Vec<String>,
    /// The `after` of the next page; `None` on the last one.
    pub next: Option<String>,
    /// The session's sequence the page was read at.
    pub seq: u64,
}

/// Key changes for [`SessionClient::keys_set`]: type → id → value (`None` deletes).
pub type KeyData = BTreeMap<String, BTreeMap<String, Option<ByteBuf>>>;

impl SessionClient {
    /// A client for `<prefix>.<tenant>.<session>.*`. Ids are not validated
    /// here, so tests can send bad ones.
    pub fn new(nc: async_nats::Client, prefix: &str, tenant: &str, session: &str) -> Self {
        Self { nc, base: format!("{prefix}.{tenant}.{session}"), timeout: Duration::from_secs(10) }
    }

    /// Sets the per-request time-out.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends a raw body to `op` and returns the raw reply body.
    pub async fn raw(&self, op: &str, body: Vec<u8>) -> Result<Bytes, ClientError> {
        self.send(format!("{}.{op}", self.base), body).await
    }

    /// Sends an empty request to `<prefix>.<tail>`, whatever the tail holds;
    /// for tests of malformed subjects.
    pub async fn raw_subject(&self, tail: &str) -> Result<Bytes, ClientError> {
        let prefix = self.base.rsplitn(3, '.').nth(2).unwrap_or_default();
        self.send(format!("{prefix}.{tail}"), Vec::new()).await
    }

    async fn send(&self, subject: String, body: Vec<u8>) -> Result<Bytes, ClientError> {
        let req = async_nats::Request::new().payload(body.into()).timeout(Some(self.timeout));
        let msg = self.nc.send_request(subject, req).await.map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::TimedOut => ClientError::TimedOut,
            async_nats::RequestErrorKind::NoResponders => ClientError::NoResponders,
            _ => ClientError::Other(e.to_string()),
        })?;
        if let Some(headers) = &msg.headers
            && let Some(code) = headers.get(async_nats::service::NATS_SERVICE_ERROR_CODE)
        {
            let code = code.as_str().parse().unwrap_or(500);
            let message = headers.get(async_nats::service::NATS_SERVICE_ERROR).map(|m| m.as_str().to_owned()).unwrap_or_default();
            return Err(ClientError::Service { code, message });
        }
        Ok(msg.payload)
    }

    /// Sends `body` to its op and decodes the reply.
    async fn call<T: for<'de> Deserialize<'de>>(&self, body: RequestBody<'_>) -> Result<T, ClientError> {
        let reply = self.raw(body.op().as_str(), body.encode()).await?;
        rmp_serde::from_slice(&reply).map_err(|e| ClientError::Other(format!("undecodable reply: {e}")))
    }

    /// `creds.get`.
    pub async fn creds_get(&self) -> Result<Option<Vec<u8>>, ClientError> {
        let r: CredsReply<ByteBuf> = self.call(RequestBody::CredsGet).await?;
        Ok(r.creds.map(ByteBuf::into_vec))
    }

    /// `creds.put`; returns the sequence.
    pub async fn creds_put(&self, rid: &str, creds: &[u8]) -> Result<u64, ClientError> {
        let r: WrittenReply = self.call(RequestBody::CredsPut { rid: Some(rid), creds }).await?;
        Ok(r.seq)
    }

    /// `keys.get`: the found ids and their values.
    pub async fn keys_get(&self, ty: &str, ids: &[&str]) -> Result<HashMap<String, Vec<u8>>, ClientError> {
        Ok(self.keys_get_with_seq(ty, ids).await?.0)
    }

    /// `keys.get`, with the session's sequence the reply was read at.
    pub async fn keys_get_with_seq(&self, ty: &str, ids: &[&str]) -> Result<(HashMap<String, Vec<u8>>, u64), ClientError> {
        let r: KeysReply<HashMap<String, ByteBuf>> = self.call(RequestBody::KeysGet { ty, ids: ids.to_vec() }).await?;
        Ok((r.values.into_iter().map(|(k, v)| (k, v.into_vec())).collect(), r.seq))
    }

    /// `keys.list`: one page of the ids stored under `ty`, after `after`, at
    /// most `limit` of them (the service's limit without it).
    pub async fn keys_list(&self, ty: &str, after: Option<&str>, limit: Option<usize>) -> Result<IdPage, ClientError> {
        let r: IdsReply<String> = self.call(RequestBody::KeysList { ty, after, limit }).await?;
        Ok(IdPage { ids: r.ids, next: r.next, seq: r.seq })
    }

    /// Every id stored under `ty`, in byte order, page after page of at most
    /// `limit` ids. A page whose cursor does not move forward is an error,
    /// not a loop.
    pub async fn keys_list_all(&self, ty: &str, limit: Option<usize>) -> Result<Vec<String>, ClientError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.keys_list(ty, after.as_deref(), limit).await?;
            all.extend(page.ids);
            match page.next {
                Some(next) if after.as_ref().is_none_or(|a| next > *a) => after = Some(next),
                Some(_) => return Err(ClientError::Other("keys.list: the cursor did not move forward".into())),
                None => return Ok(all),
            }
        }
    }

    /// `keys.set`; returns the sequence.
    pub async fn keys_set(&self, rid: &str, data: &KeyData) -> Result<u64, ClientError> {
        let data = data
            .iter()
            .map(|(ty, ids)| (ty.as_str(), ids.iter().map(|(id, v)| (id.as_str(), v.as_deref().map(|v| &v[..]))).collect()))
            .collect();
        let r: WrittenReply = self.call(RequestBody::KeysSet { rid: Some(rid), data }).await?;
        Ok(r.seq)
    }

    /// `session.delete`; returns the sequence.
    pub async fn delete(&self, rid: &str) -> Result<u64, ClientError> {
        let r: WrittenReply = self.call(RequestBody::SessionDelete { rid: Some(rid) }).await?;
        Ok(r.seq)
    }

    /// `session.info`.
    pub async fn info(&self) -> Result<SessionInfo, ClientError> {
        let r: InfoReply = self.call(RequestBody::SessionInfo).await?;
        Ok(r)
    }

    /// `session.claim`: asks for a writer claim (`claim: None`) or renews
    /// `claim`.
    pub async fn claim(&self, claim: Option<&str>) -> Result<ClaimReply<String>, ClientError> {
        self.call(RequestBody::SessionClaim { claim }).await
    }

    /// `keys.set` as the holder of `claim`; returns the sequence and the
    /// claim's renewed lease in milliseconds.
    pub async fn keys_set_claimed(&self, rid: &str, claim: &str, data: &KeyData) -> Result<(u64, u64), ClientError> {
        let data = data
            .iter()
            .map(|(ty, ids)| (ty.as_str(), ids.iter().map(|(id, v)| (id.as_str(), v.as_deref().map(|v| &v[..]))).collect()))
            .collect();
        let body = RequestBody::KeysSet { rid: Some(rid), data };
        let reply = self.raw(body.op().as_str(), body.encode_claimed(Some(claim))).await?;
        let r: ClaimedWrittenReply = rmp_serde::from_slice(&reply).map_err(|e| ClientError::Other(format!("undecodable reply: {e}")))?;
        Ok((r.seq, r.lease_ms))
    }
}

/// Builds [`KeyData`] from `(type, id, value)` triples.
pub fn key_data<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str, Option<&'a [u8]>)>) -> KeyData {
    let mut data = KeyData::new();
    for (ty, id, value) in entries {
        data.entry(ty.to_owned()).or_default().insert(id.to_owned(), value.map(|v| ByteBuf::from(v.to_vec())));
    }
    data
}
