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
mod route;
mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use async_nats::service::ServiceExt;
use bstore_cluster::{BoxFuture, ClusterConfig, Handover, Leases};
use bstore_session::Sessions;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
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
    /// Reply subjects the service answers to; a request naming any other
    /// reply subject is refused without a reply, logged and counted.
    /// Default `["_INBOX.", "_R_."]` (clients' inboxes, and the replies of
    /// requests that crossed from another account).
    pub reply_prefixes: Vec<String>,
    /// Requests this instance works on at once; past it new ones are
    /// answered 503 at once. Default 4096.
    pub max_in_flight: usize,
    /// Largest reply body; set at start-up from the server's `max_payload`.
    #[serde(skip)]
    pub max_reply_bytes: usize,
    /// The per-request limits, checked while decoding; set at start-up.
    #[serde(skip)]
    pub limits: bstore_domain::Limits,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            prefix: "bstore".into(),
            max_request_bytes: 4 << 20,
            queue_group: "q".into(),
            reply_prefixes: vec!["_INBOX.".into(), "_R_.".into()],
            max_in_flight: 4096,
            max_reply_bytes: usize::MAX,
            limits: bstore_domain::Limits::default(),
        }
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the NATS service: {0}")]
pub struct StartError(String);

/// Where the partition leases are kept: the JetStream context of the store
/// connection and the cluster settings.
pub struct ClusterSetup {
    /// JetStream, for the lease bucket.
    pub js: async_nats::jetstream::Context,
    /// Partitions, bucket, lease timing.
    pub cfg: ClusterConfig,
    /// Replicas of the lease bucket (the event stream's).
    pub replicas: usize,
    /// Drop every lease first: only for a NATS server this process started.
    pub reset: bool,
}

/// Serves requests until `shutdown` resolves, then stops taking new ones,
/// waits for those in flight to be answered, and hands its partitions over.
///
/// `client` is the serving connection: it subscribes to the request and
/// partition subjects and publishes only replies (and forwards to partition
/// subjects). `ready` is called once requests are being taken.
pub async fn serve(
    client: async_nats::Client,
    cfg: ApiConfig,
    sessions: Sessions,
    cluster: ClusterSetup,
    ready: impl FnOnce(),
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::default());
    let routing = Arc::new(route::RouteMetrics::default());
    let (for_stats, routing_stats) = (metrics.clone(), routing.clone());
    let service = client
        .service_builder()
        .description("Baileys auth-state store: creds and Signal keys over an event log")
        .stats_handler(move |_endpoint, _stats| {
            let mut figures = for_stats.snapshot();
            figures["routing"] = routing_stats.snapshot();
            figures
        })
        .queue_group(&cfg.queue_group)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| StartError(e.to_string()))?;
    let mut endpoint =
        service.endpoint_builder().name("api").add(format!("{}.>", cfg.prefix)).await.map_err(|e| StartError(e.to_string()))?;
    let max_in_flight = cfg.max_in_flight.max(1);
    let router = Arc::new(route::Router {
        client: client.clone(),
        cfg: cfg.clone(),
        sessions: sessions.clone(),
        metrics,
        routing,
        in_flight: Arc::new(Semaphore::new(max_in_flight)),
        local: std::sync::atomic::AtomicU64::new(0),
        partition_prefix: cluster.cfg.partition_prefix.clone(),
    });
    let subs = Arc::new(PartitionSubs { router: router.clone(), tasks: Mutex::new(HashMap::new()) });
    // The lease bucket may be briefly unavailable (a cluster electing a
    // leader): wait for it rather than exit.
    let started = std::time::Instant::now();
    let leases = loop {
        let handover: Arc<dyn Handover> = subs.clone();
        match Leases::start(
            cluster.js.clone(),
            cluster.cfg.clone(),
            cluster.replicas,
            sessions.ownership().clone(),
            handover,
            cluster.reset,
        )
        .await
        {
            Ok(leases) => break leases,
            Err(e) if started.elapsed() < std::time::Duration::from_secs(60) => {
                tracing::warn!(error = %e, "the lease bucket is not available yet; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(StartError(e.to_string())),
        }
    };
    // `flush` only writes out the SUB; a message through the server to
    // ourselves proves the server has processed it, so a request sent after
    // "serving requests" is logged finds the endpoint.
    round_trip(&client).await.map_err(|e| StartError(format!("confirming the subscription: {e}")))?;
    tracing::info!(subject = %format!("{}.>", cfg.prefix), instance = %sessions.ownership().instance(), "serving requests");
    ready();

    let mut handlers = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            next = endpoint.next() => {
                let Some(request) = next else { break };
                handlers.spawn(router.clone().handle(request.message));
            }
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
        }
    }
    tracing::info!(
        in_flight = max_in_flight - router.in_flight.available_permits(),
        "shutting down: no new requests, finishing those in flight"
    );
    // Each step is bounded: with NATS unreachable, unsubscribing or a reply
    // can wait forever, and a shutdown must not.
    let bounded = |secs| std::time::Duration::from_secs(secs);
    let _ = tokio::time::timeout(bounded(2), endpoint.stop()).await;
    subs.stop_all();
    // First the requests served here, which need the leases to answer;
    // then the partitions are given up, so that the others take them over
    // at once rather than after the lease time; then the requests that are
    // only waiting for another instance (forwarded, or in a failover).
    let _ = tokio::time::timeout(bounded(15), async {
        while router.local.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    let _ = tokio::time::timeout(bounded(20), leases.stop()).await;
    let _ = tokio::time::timeout(bounded(15), async {
        while handlers.join_next().await.is_some() {}
        let _ = router.in_flight.acquire_many(max_in_flight as u32).await;
    })
    .await;
    let _ = tokio::time::timeout(bounded(2), service.stop()).await;
    Ok(())
}

/// The subscriptions of the partitions this instance owns, started and
/// stopped by the lease keeper.
struct PartitionSubs {
    router: Arc<route::Router>,
    tasks: Mutex<HashMap<u32, tokio::task::JoinHandle<()>>>,
}

impl PartitionSubs {
    fn stop_all(&self) {
        for (_, task) in self.tasks.lock().expect("not poisoned").drain() {
            task.abort();
        }
    }
}

impl Handover for PartitionSubs {
    fn acquired(&self, p: u32) -> BoxFuture {
        let router = self.router.clone();
        let subject = router.partition_subject(p);
        let queue = router.cfg.queue_group.clone();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut sub = match router.client.queue_subscribe(subject.clone(), queue).await {
                Ok(sub) => sub,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cannot subscribe to a partition's subject; its requests are forwarded");
                    let _ = started_tx.send(());
                    return;
                }
            };
            let _ = started_tx.send(());
            // Dropping the subscriber (when this task is aborted)
            // unsubscribes.
            while let Some(msg) = sub.next().await {
                tokio::spawn(router.clone().handle(msg));
            }
        });
        if let Some(old) = self.tasks.lock().expect("not poisoned").insert(p, task) {
            old.abort();
        }
        Box::pin(async move {
            let _ = started_rx.await;
        })
    }

    fn release(&self, p: u32) -> BoxFuture {
        if let Some(task) = self.tasks.lock().expect("not poisoned").remove(&p) {
            task.abort();
        }
        let sessions = self.router.sessions.clone();
        Box::pin(async move { sessions.drop_partition(p).await })
    }
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
