//! The projections from the service's side: starting them in `serve`, and
//! the stand-alone materializer. Both are caches of the log and can be
//! dropped at any time: the operator's `rebuild` (`tools/rebuild.rs`)
//! writes one again from the log alone, and `verify` (`tools/verify.rs`)
//! reports every way one differs from it.

use std::future::Future;

use anyhow::Context as _;
use bstore_codec::Codec;
use bstore_log::EventLog;
use bstore_mongo::{Materializer, Store};
use bstore_redis::RedisProjection;

use crate::Config;

/// The Redis projection if a URL is configured; says at start-up which.
pub fn redis_projection(cfg: &Config, codec: &Codec) -> anyhow::Result<Option<RedisProjection>> {
    if cfg.redis.url.is_none() {
        tracing::info!("redis projection off (no redis url configured): sessions load from the log alone");
        return Ok(None);
    }
    let redis = RedisProjection::new(cfg.redis.clone(), codec.clone()).context("configuring the redis projection")?;
    tracing::info!(ttl_secs = cfg.redis.ttl_secs, prefix = %cfg.redis.key_prefix, "redis projection on");
    Ok(Some(redis))
}

/// A materializer running on a thread of its own inside `serve`.
pub struct RunningMaterializer {
    handle: Materializer,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::sync::oneshot::Receiver<()>,
    arbiter: actix::Arbiter,
}

impl RunningMaterializer {
    /// A handle on it, for its figures (`Materializer::stats`).
    pub fn handle(&self) -> Materializer {
        self.handle.clone()
    }

    /// Stops it (the batch in flight is left unacknowledged and comes back).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.done).await;
        self.arbiter.stop();
    }
}

/// Starts the Mongo materializer inside `serve` if a URL is configured; says
/// at start-up which.
pub async fn start_materializer(cfg: &Config, client: &async_nats::Client, codec: &Codec) -> anyhow::Result<Option<RunningMaterializer>> {
    if cfg.mongo.url.is_none() {
        tracing::info!("mongo materializer off (no mongo url configured)");
        return Ok(None);
    }
    let store = Store::connect(&cfg.mongo, codec.clone()).await.context("configuring the mongo materializer")?;
    let m = Materializer::new(client.clone(), cfg.stream.clone(), cfg.mongo.clone(), store, codec.clone());
    tracing::info!(database = %cfg.mongo.database, consumer = %cfg.mongo.consumer, "mongo materializer on");
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (finished, done) = tokio::sync::oneshot::channel();
    // Its own thread: decoding and sealing a large backlog must not slow
    // the request path.
    let arbiter = actix::Arbiter::new();
    let handle = m.clone();
    arbiter.spawn(async move {
        m.run(async {
            let _ = stopped.await;
        })
        .await;
        let _ = finished.send(());
    });
    Ok(Some(RunningMaterializer { handle, stop, done, arbiter }))
}

/// `baileys-store materialize`: the materializer alone, until `shutdown`.
pub async fn materialize(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(cfg.mongo.url.is_some(), "no mongo url configured (set BSTORE_MONGO_URL or mongo.url)");
    let (client, codec) = crate::connect_tool(&cfg).await?;
    EventLog::open(client.clone(), cfg.stream.clone(), codec.clone()).await.context("opening the event stream")?;
    let store = Store::connect(&cfg.mongo, codec.clone()).await?;
    // It seals what it writes: under the cluster's key, switching with it.
    let instance = uuid::Uuid::new_v4().simple().to_string();
    let member = crate::rotation::join(&client, &cfg, &codec, &instance, "materialize").await?;
    tracing::info!(database = %cfg.mongo.database, consumer = %cfg.mongo.consumer, "materializing");
    Materializer::new(client, cfg.stream.clone(), cfg.mongo.clone(), store, codec).run(shutdown).await;
    member.leave().await;
    Ok(())
}

