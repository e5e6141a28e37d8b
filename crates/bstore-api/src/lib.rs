//! The request-reply API, as written down in `docs/protocol.md`.
//!
//! One NATS micro-service endpoint listens on `<prefix>.>` in a queue group,
//! so `$SRV.PING/INFO/STATS` answer and several instances share the load.
//! A single wildcard endpoint (rather than one per op) is what lets the
//! service answer a malformed subject or an unknown op with a coded error
//! instead of silence.
//!
//! This crate only translates: subject and body in, [`bstore_session::Request`]
//! out, and the reply or error back. Decisions live in the domain crate.

pub mod client;
mod codes;
mod metrics;
mod protocol;
mod wire;

use std::future::Future;

use async_nats::service::{self, ServiceExt};
use bstore_session::Sessions;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

pub use codes::ErrorCode;
pub use metrics::Metrics;

/// The service name announced on `$SRV.INFO`.
pub const SERVICE_NAME: &str = "baileys-store";

/// Settings of the API. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Request subjects are `<prefix>.<tenant>.<session>.<op>`. Default `bstore`.
    pub prefix: String,
    /// Largest request body accepted, in bytes. Default 4 MiB. Lowered at
    /// start-up to the NATS server's `max_payload` when that is smaller.
    pub max_request_bytes: usize,
    /// Queue group shared by every instance. Default `q`.
    pub queue_group: String,
    /// Largest reply body; set at start-up from the server's `max_payload`.
    #[serde(skip)]
    pub max_reply_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { prefix: "bstore".into(), max_request_bytes: 4 << 20, queue_group: "q".into(), max_reply_bytes: usize::MAX }
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the NATS service: {0}")]
pub struct StartError(String);

/// Serves requests until `shutdown` resolves, then stops taking new ones and
/// waits for those in flight to be answered.
pub async fn serve(
    client: async_nats::Client,
    cfg: ApiConfig,
    sessions: Sessions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let metrics = std::sync::Arc::new(Metrics::default());
    let for_stats = metrics.clone();
    let service = client
        .service_builder()
        .description("Baileys auth-state store: creds and Signal keys over an event log")
        .stats_handler(move |_endpoint, _stats| for_stats.snapshot())
        .queue_group(&cfg.queue_group)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| StartError(e.to_string()))?;
    let mut endpoint =
        service.endpoint_builder().name("api").add(format!("{}.>", cfg.prefix)).await.map_err(|e| StartError(e.to_string()))?;
    // `flush` only writes out the SUB; a message through the server to
    // ourselves proves the server has processed it, so a request sent after
    // "serving requests" is logged finds the endpoint.
    round_trip(&client).await.map_err(|e| StartError(format!("confirming the subscription: {e}")))?;
    tracing::info!(subject = %format!("{}.>", cfg.prefix), "serving requests");

    let cfg = std::sync::Arc::new(cfg);
    let mut in_flight = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            next = endpoint.next() => {
                let Some(request) = next else { break };
                let (cfg, sessions, metrics) = (cfg.clone(), sessions.clone(), metrics.clone());
                in_flight.spawn(async move { wire::handle(&cfg, &sessions, &metrics, request).await });
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    tracing::info!(in_flight = in_flight.len(), "shutting down: no new requests, finishing those in flight");
    // Each step is bounded: with NATS unreachable, unsubscribing or a reply
    // can wait forever, and a shutdown must not.
    let bounded = |secs| std::time::Duration::from_secs(secs);
    let _ = tokio::time::timeout(bounded(2), endpoint.stop()).await;
    let _ = tokio::time::timeout(bounded(15), async { while in_flight.join_next().await.is_some() {} }).await;
    let _ = tokio::time::timeout(bounded(2), service.stop()).await;
    Ok(())
}

/// Publishes to a fresh inbox and waits for the message to come back.
async fn round_trip(client: &async_nats::Client) -> Result<(), String> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    client.publish(inbox, bytes::Bytes::new()).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(std::time::Duration::from_secs(10), sub.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err("no echo from the server within 10 s".into()),
    }
}

/// The error answer for `code`, in the micro-service convention.
fn service_error(code: ErrorCode, message: &str) -> service::error::Error {
    service::error::Error { code: code.number() as usize, status: format!("{}: {message}", code.name()) }
}
