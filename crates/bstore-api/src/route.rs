//! From a NATS message to the session that owns it, and the answer back.
//!
//! Every request — on the wildcard endpoint `<prefix>.>` or on a partition
//! subject `<partition_prefix>.<n>.<tenant>.<session>.<op>` (where a server
//! mapping or another instance put it) — goes through [`Router::handle`]:
//!
//! 1. **The reply subject is checked first.** NATS lets a requester name any
//!    reply subject, and the service would publish there with its own
//!    rights. Only subjects under the configured inbox prefixes are
//!    answered; anything else (`$JS.API.…`, an event subject) is refused,
//!    logged and counted, and nothing is published.
//! 2. **Load is bounded**: past `api.max_in_flight` requests in this
//!    instance a request is shed with a coded 503, before any decoding.
//! 3. The subject and body are decoded (strictly, with the limits checked
//!    before anything is allocated or loaded).
//! 4. **Ownership**: the session's partition is served here if this
//!    instance holds its lease; otherwise the request is forwarded to the
//!    partition's subject, where its owner listens. While no instance owns
//!    the partition (a failover), the request waits and is tried again
//!    until its deadline, rather than being refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, Message, Subject};
use bstore_session::{Reply, Request, SessionError, Sessions};
use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::wire::{self, Refusal};
use crate::{ApiConfig, ErrorCode};

/// Marks a request forwarded by an instance. A forwarded request is never
/// forwarded again: an instance that receives one for a partition it does
/// not serve answers at once with [`NOT_OWNER`], and the forwarder waits
/// and tries again.
pub(crate) const FORWARDED: &str = "Bstore-Forwarded";
/// On a 503 answer to a forwarded request: "not mine (any more), ask again".
pub(crate) const NOT_OWNER: &str = "Bstore-Not-Owner";

/// Answers requests; shared by every subscription of one instance.
pub(crate) struct Router {
    pub client: async_nats::Client,
    pub cfg: ApiConfig,
    pub sessions: Sessions,
    pub metrics: Arc<Metrics>,
    pub routing: Arc<RouteMetrics>,
    pub in_flight: Arc<Semaphore>,
    /// Requests being served by a session actor here (not forwarded): what
    /// a shutdown waits for before it gives the partitions up.
    pub local: AtomicU64,
    pub partition_prefix: String,
}

/// What routing did, beside the per-op figures. Counts only: nothing here
/// names a tenant or a session.
#[derive(Debug, Default)]
pub(crate) struct RouteMetrics {
    refused_replies: AtomicU64,
    shed: AtomicU64,
    forwarded: AtomicU64,
}

impl RouteMetrics {
    /// (refused reply subjects, shed, forwarded).
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (self.refused_replies.load(Relaxed), self.shed.load(Relaxed), self.forwarded.load(Relaxed))
    }

    pub(crate) fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "refused_reply_subjects": self.refused_replies.load(Relaxed),
            "shed_overloaded": self.shed.load(Relaxed),
            "forwarded_to_owner": self.forwarded.load(Relaxed),
        })
    }
}

impl Router {
    /// The subject partition `p`'s owner listens on.
    pub(crate) fn partition_subject(&self, p: u32) -> String {
        format!("{}.{p}.>", self.partition_prefix)
    }

    /// Handles one message from any of the instance's subscriptions.
    pub(crate) async fn handle(self: Arc<Self>, msg: Message) {
        let Some(reply) = msg.reply.clone() else {
            // Nobody to answer: a publish, not a request.
            self.routing.refused_replies.fetch_add(1, Relaxed);
            return;
        };
        if !reply_allowed(&reply, &self.cfg.reply_prefixes) {
            self.routing.refused_replies.fetch_add(1, Relaxed);
            tracing::warn!(reply = %reply, "refused a request whose reply subject is outside the inbox prefixes; nothing was published");
            return;
        }
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            self.routing.shed.fetch_add(1, Relaxed);
            let refusal = Refusal(ErrorCode::Unavailable, "the instance is overloaded; retry with the same rid".into());
            self.respond(&reply, Err(refusal)).await;
            return;
        };
        let started = Instant::now();
        let forwarded = msg.headers.as_ref().is_some_and(|h| h.get(FORWARDED).is_some());
        let (subject, via_partition): (std::borrow::Cow<'_, str>, _) = match self.strip_partition(&msg.subject) {
            Some((n, rest)) => (format!("{}.{rest}", self.cfg.prefix).into(), Some(n)),
            None => (msg.subject.as_str().into(), None),
        };
        let decoded = wire::parse_request(&self.cfg.prefix, &subject, &msg.payload, &self.cfg.limits, self.cfg.max_request_bytes);
        let (key, op_name, op) = match decoded {
            Ok(d) => d,
            Err(refusal) => {
                self.metrics.record(None, None, Some(refusal.0), started.elapsed());
                self.respond(&reply, Err(refusal)).await;
                return;
            }
        };
        let ownership = self.sessions.ownership();
        let p = ownership.partition(&key);
        if via_partition.is_some_and(|n| n != p) {
            tracing::warn!(
                subject_partition = ?via_partition,
                partition = p,
                partitions = ownership.partitions(),
                "a request arrived on another partition's subject: the server's partition() mapping does not use cluster.partitions"
            );
        }
        let deadline = self.sessions.deadline();
        let mut pause = Duration::from_millis(20);
        loop {
            if ownership.serving(p).is_some() {
                let req = Request { key: key.clone(), op: op.clone(), deadline };
                self.local.fetch_add(1, Relaxed);
                let called = self.sessions.call(req).await;
                self.local.fetch_sub(1, Relaxed);
                match called {
                    Err(SessionError::NotOwner) => {}
                    result => {
                        let result = result
                            .map_err(|e| {
                                if let SessionError::Unreadable(detail) = &e {
                                    // The operator's log names the session;
                                    // the reply does not.
                                    tracing::warn!(session = %key, %detail, "stored data could not be opened");
                                }
                                Refusal::of_session(&e, &key)
                            })
                            .and_then(|r| self.encode(&r));
                        self.metrics.record(
                            Some(op_name.as_str()),
                            Some(&key.tenant),
                            result.as_ref().err().map(|r| r.0),
                            started.elapsed(),
                        );
                        self.respond(&reply, result).await;
                        return;
                    }
                }
            } else if forwarded {
                // Another instance took this for ours: tell it to ask again.
                let mut headers = HeaderMap::new();
                headers.insert(NOT_OWNER, "1");
                let refusal = Refusal(ErrorCode::Unavailable, "this instance does not serve the session now".into());
                self.respond_with(&reply, Err(refusal), headers).await;
                return;
            } else {
                let target = format!(
                    "{}.{p}.{}",
                    self.partition_prefix,
                    subject.strip_prefix(&self.cfg.prefix).unwrap_or_default().trim_start_matches('.')
                );
                let mut headers = HeaderMap::new();
                headers.insert(FORWARDED, "1");
                let left = deadline.saturating_duration_since(Instant::now());
                let request = async_nats::Request::new().headers(headers).payload(msg.payload.clone()).timeout(Some(left));
                match self.client.send_request(target, request).await {
                    Ok(answer) if answer.headers.as_ref().is_some_and(|h| h.get(NOT_OWNER).is_some()) => {}
                    Ok(answer) => {
                        self.routing.forwarded.fetch_add(1, Relaxed);
                        self.relay(&reply, answer).await;
                        return;
                    }
                    Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                    Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                        let refusal =
                            Refusal(ErrorCode::Timeout, "the session's owner did not answer in time; retry with the same rid".into());
                        self.respond(&reply, Err(refusal)).await;
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "could not forward a request; trying again"),
                }
            }
            // No owner right now (a failover, or this instance handing the
            // partition over): wait and look again.
            if Instant::now() + pause >= deadline {
                let refusal = Refusal(ErrorCode::Unavailable, "no instance serves this session right now; retry with the same rid".into());
                self.metrics.record(Some(op_name.as_str()), Some(&key.tenant), Some(refusal.0), started.elapsed());
                self.respond(&reply, Err(refusal)).await;
                return;
            }
            tokio::time::sleep(jitter(pause)).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// `<partition_prefix>.<n>.<rest>` → `(n, rest)`.
    fn strip_partition<'a>(&self, subject: &'a str) -> Option<(u32, &'a str)> {
        let rest = subject.strip_prefix(self.partition_prefix.as_str())?.strip_prefix('.')?;
        let (n, rest) = rest.split_once('.')?;
        Some((n.parse().ok()?, rest))
    }

    fn encode(&self, reply: &Reply) -> Result<Bytes, Refusal> {
        let body = wire::encode_reply(reply);
        if body.len() > self.cfg.max_reply_bytes {
            return Err(Refusal(
                ErrorCode::TooLarge,
                format!(
                    "the reply would be {} bytes, over the server's limit of {}; ask for fewer ids",
                    body.len(),
                    self.cfg.max_reply_bytes
                ),
            ));
        }
        Ok(body.into())
    }

    /// Publishes the answer, in the micro-service convention for errors.
    async fn respond(&self, reply: &Subject, result: Result<Bytes, Refusal>) {
        self.respond_with(reply, result, HeaderMap::new()).await;
    }

    async fn respond_with(&self, reply: &Subject, result: Result<Bytes, Refusal>, mut headers: HeaderMap) {
        let sent = match result {
            Ok(body) => self.client.publish(reply.clone(), body).await,
            Err(Refusal(code, message)) => {
                if code.number() >= 500 {
                    tracing::warn!(code = code.number(), %message, "request failed");
                } else {
                    tracing::debug!(code = code.number(), %message, "request refused");
                }
                headers.insert(async_nats::service::NATS_SERVICE_ERROR_CODE, code.number().to_string().as_str());
                headers.insert(async_nats::service::NATS_SERVICE_ERROR, format!("{}: {message}", code.name()).as_str());
                self.client.publish_with_headers(reply.clone(), headers, Bytes::new()).await
            }
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not send the reply");
        }
    }

    /// Passes the owner's answer on as it came.
    async fn relay(&self, reply: &Subject, answer: Message) {
        let sent = match answer.headers {
            Some(headers) => self.client.publish_with_headers(reply.clone(), headers, answer.payload).await,
            None => self.client.publish(reply.clone(), answer.payload).await,
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not pass a forwarded reply on");
        }
    }
}

/// Whether the service may publish to `reply`: a literal subject (no
/// wildcard, no whitespace, no empty token) under one of `prefixes`.
pub(crate) fn reply_allowed(reply: &str, prefixes: &[String]) -> bool {
    let literal = !reply.is_empty()
        && reply.split('.').all(|t| !t.is_empty() && t != "*" && t != ">")
        && !reply.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
    literal && prefixes.iter().any(|p| !p.is_empty() && reply.starts_with(p.as_str()) && reply.len() > p.len())
}

/// A pause drawn from [d/2, d].
fn jitter(d: Duration) -> Duration {
    let nanos = d.as_nanos() as u64;
    let r = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.subsec_nanos() as u64);
    Duration::from_nanos(nanos / 2 + r % (nanos / 2 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inbox_replies_are_answered() {
        let prefixes = vec!["_INBOX.".to_string(), "_R_.".to_string()];
        assert!(reply_allowed("_INBOX.abc.def", &prefixes));
        assert!(reply_allowed("_R_.Xy12.z", &prefixes));
        for bad in [
            "$JS.API.STREAM.PURGE.BSTORE_EVENTS",
            "$JS.API.STREAM.DELETE.BSTORE_EVENTS",
            "bstore-events.other.victim",
            "$KV.BSTORE_LEASES.p.1",
            "_INBOX.",
            "_INBOX.>",
            "_INBOX.*.x",
            "_INBOX..x",
            "_INBOX.a b",
            "_INBOXX.a",
            "",
            "_BSTORE_JS.abc",
        ] {
            assert!(!reply_allowed(bad, &prefixes), "{bad:?} must be refused");
        }
        assert!(!reply_allowed("_INBOX.a", &[String::new()]), "an empty prefix allows nothing");
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(50) && j <= Duration::from_millis(100), "{j:?}");
        }
    }
}
