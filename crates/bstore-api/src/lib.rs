//! The request-reply API, as written down in `docs/protocol.md`.
//!
//! One queue subscription on `<prefix>.>` (a single wildcard rather than one
//! per op, so that a malformed subject or an unknown op gets a coded error
//! instead of silence), one per owned partition, and a NATS micro service
//! for `$SRV.PING/INFO/STATS`. Subscriptions are drained, never just
//! dropped, so a stopping instance answers everything it was sent.
//!
//! This crate only translates: subject and body in, [`bstore_session::Request`]
//! out, and the reply or error back. Decisions live in the domain crate.

pub mod admin;
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
pub use metrics::{DEFAULT_TENANT_LABELS, Metrics};

/// The micro-service endpoint of an instance is `<INSTANCE_PREFIX>.<instance id>`.
pub const INSTANCE_PREFIX: &str = "_BSTORE_SVC";

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

/// More figures for `$SRV.STATS`, computed when it is asked: a name in the
/// endpoint's `data` and what goes under it (e.g. the Mongo materializer's,
/// when it runs in this process).
pub type MoreFigures = (&'static str, Arc<dyn Fn() -> serde_json::Value + Send + Sync>);

/// What an instance counts and reports.
pub struct Figures {
    /// The request figures, recorded by every request; the caller keeps a
    /// handle to serve them to Prometheus too.
    pub metrics: Arc<Metrics>,
    /// More figures for `$SRV.STATS`.
    pub more: Vec<MoreFigures>,
}

/// Serves requests until `shutdown` resolves, then stops taking new ones,
/// waits for those in flight to be answered, and hands its partitions over.
///
/// `client` is the serving connection: it subscribes to the request and
/// partition subjects and publishes only replies (and forwards to partition
/// subjects). `figures` are what it counts (the request figures are also
/// the caller's, for Prometheus). `ready` is called once requests are being
/// taken.
pub async fn serve(
    client: async_nats::Client,
    cfg: ApiConfig,
    sessions: Sessions,
    cluster: ClusterSetup,
    figures: Figures,
    ready: impl FnOnce(),
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let Figures { metrics, more: more_figures } = figures;
    let routing = metrics.routing.clone();
    let (for_stats, routing_stats) = (metrics.clone(), routing.clone());
    let service = client
        .service_builder()
        .description("Baileys auth-state store: creds and Signal keys over an event log")
        .stats_handler(move |_endpoint, _stats| {
            let mut figures = for_stats.snapshot();
            figures["routing"] = routing_stats.snapshot();
            let integrity = bstore_session::integrity_counts();
            figures["integrity"] = serde_json::json!({
                "refused_events": integrity.refused_events,
                "broken_chains": integrity.broken_chains,
                "untrusted_redis_copies": integrity.untrusted_redis_copies,
            });
            for (name, f) in &more_figures {
                figures[*name] = f();
            }
            figures
        })
        .queue_group(&cfg.queue_group)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| StartError(e.to_string()))?;
    // The micro-service endpoint carries the figures ($SRV.STATS) and this
    // instance's identity; it listens on a private subject of its own.
    // Requests arrive on a plain queue subscription instead, because a
    // micro-service endpoint can only be unsubscribed, which drops what the
    // server had already sent, while a plain subscription can be drained.
    let instance = sessions.ownership().instance().to_owned();
    let mut endpoint =
        service.endpoint_builder().name("api").add(format!("{INSTANCE_PREFIX}.{instance}")).await.map_err(|e| StartError(e.to_string()))?;
    let mut requests =
        client.queue_subscribe(format!("{}.>", cfg.prefix), cfg.queue_group.clone()).await.map_err(|e| StartError(e.to_string()))?;
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
    let subs = Arc::new(PartitionSubs { router: router.clone(), subs: Mutex::new(HashMap::new()) });
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
            next = requests.next() => {
                let Some(msg) = next else { break };
                handlers.spawn(router.clone().handle(msg));
            }
            // Nothing is served on the endpoint's own subject.
            Some(_) = endpoint.next() => {}
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
    // Drain: unsubscribe, and answer what the server had sent before it
    // saw that (the subscription ends once the server confirms).
    if requests.drain().await.is_ok() {
        while let Ok(Some(msg)) = tokio::time::timeout(bounded(5), requests.next()).await {
            handlers.spawn(router.clone().handle(msg));
        }
    }
    let _ = tokio::time::timeout(bounded(2), endpoint.stop()).await;
    subs.stop_all().await;
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
///
/// A subscription is never just dropped: requests the server has already
/// delivered would be lost with it. Stopping one drains it — unsubscribe,
/// then handle every request still buffered (served here while the gate is
/// open, else passed to the new owner) — and only then is it gone.
struct PartitionSubs {
    router: Arc<route::Router>,
    subs: Mutex<HashMap<u32, PartitionSub>>,
}

struct PartitionSub {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// How long draining a subscription may take.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

impl PartitionSubs {
    /// Drains every subscription; resolves when their buffered requests
    /// have all been handed to handlers.
    async fn stop_all(&self) {
        let subs: Vec<PartitionSub> = self.subs.lock().expect("not poisoned").drain().map(|(_, s)| s).collect();
        let tasks: Vec<_> = subs.into_iter().map(PartitionSub::stop).collect();
        let _ = tokio::time::timeout(DRAIN_TIME, futures_util::future::join_all(tasks)).await;
    }
}

impl PartitionSub {
    fn stop(self) -> tokio::task::JoinHandle<()> {
        let _ = self.stop.send(());
        self.task
    }
}

impl Handover for PartitionSubs {
    fn acquired(&self, p: u32) -> BoxFuture {
        let router = self.router.clone();
        let subject = router.partition_subject(p);
        let queue = router.cfg.queue_group.clone();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
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
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    next = sub.next() => match next {
                        Some(msg) => {
                            tokio::spawn(router.clone().handle(msg));
                        }
                        None => return,
                    },
                }
            }
            // Unsubscribe, and take what the server delivered before it
            // saw that.
            if sub.drain().await.is_ok() {
                while let Ok(Some(msg)) = tokio::time::timeout(DRAIN_TIME, sub.next()).await {
                    tokio::spawn(router.clone().handle(msg));
                }
            }
        });
        let old = self.subs.lock().expect("not poisoned").insert(p, PartitionSub { stop, task });
        if let Some(old) = old {
            old.stop();
        }
        Box::pin(async move {
            let _ = started_rx.await;
        })
    }

    fn release(&self, p: u32) -> BoxFuture {
        let sub = self.subs.lock().expect("not poisoned").remove(&p);
        let sessions = self.router.sessions.clone();
        Box::pin(async move {
            if let Some(sub) = sub {
                let _ = tokio::time::timeout(DRAIN_TIME, sub.stop()).await;
            }
            sessions.drop_partition(p).await
        })
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
