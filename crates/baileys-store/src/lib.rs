//! baileys-store: the service, put together.
//!
//! [`run`] takes a loaded [`Config`] and a shutdown future, as mini-redis's
//! `server::run` does, so the binary, the tests and the benchmarks all start
//! it the same way. `main.rs` only parses arguments, loads the config, sets
//! up logging and passes a signal future.

pub mod config;
pub mod embedded;
pub mod http;
pub mod keys;
pub mod nats;
pub mod projections;
pub mod rotation;
pub mod telemetry;
pub mod tools;

use std::future::Future;

use anyhow::Context as _;
use bstore_codec::Codec;
use bstore_log::EventLog;
use bstore_session::Sessions;

pub use config::Config;

/// Written into the data dir (with the process id) once the service takes
/// requests, and removed when it stops taking them: what scripts wait on.
pub const READY_FILE: &str = "ready";

/// Headroom left under the server's `max_payload` for headers.
const HEADER_ROOM: usize = 8 << 10;

/// Runs the service until `shutdown` resolves. Must be called inside an actix
/// system (`actix::System::new().block_on(run(..))`).
///
/// With no NATS URL configured it starts the embedded nats-server first
/// (see [`embedded`]), connects to it as the service user, and writes the
/// bots' URL into `data_dir/bot.url`.
pub async fn run(mut cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // The operator's endpoint comes first: /healthz answers while the rest
    // starts, and a taken port ends the start before anything else.
    let metrics = std::sync::Arc::new(bstore_api::Metrics::new(cfg.http.tenant_labels));
    let endpoint = http::Endpoint::new(&metrics);
    let _ = std::fs::remove_file(cfg.data_dir.join(http::ADDR_FILE));
    if let Some(addr) = cfg.http.address(cfg.nats.urls.is_empty())? {
        endpoint.listen(addr, &cfg.data_dir).await?;
    }
    let embedded = if cfg.nats.urls.is_empty() {
        let server = embedded::EmbeddedNats::start_for(&cfg.embedded, &embedded::dir(&cfg.data_dir), &embedded::Subjects::of(&cfg)).await?;
        server.write_url_files(&cfg.data_dir)?;
        tracing::info!(
            url = %server.url,
            bot_url_file = %cfg.data_dir.join(embedded::BOT_URL_FILE).display(),
            "started the embedded nats-server; bots connect with the URL (and password) in the bot URL file"
        );
        embedded_identity(&mut cfg.nats, &server.service);
        Some(server)
    } else {
        None
    };
    let urls = match &embedded {
        Some(server) => vec![server.url.clone()],
        None => cfg.nats.urls.clone(),
    };
    let addr_file = cfg.data_dir.join(http::ADDR_FILE);
    let result = serve(cfg, urls, embedded.is_some(), (metrics, endpoint), shutdown).await;
    let _ = std::fs::remove_file(addr_file);
    nats::mark_closing();
    if let Some(server) = embedded {
        server.stop().await;
    }
    result
}

/// On the embedded default the service connects as the embedded server's
/// service user, whatever else `[nats]` says.
fn embedded_identity(nats: &mut config::NatsConfig, service: &embedded::Credentials) {
    if nats.auth().is_set() || nats.serve.is_set() || nats.tls != config::NatsTls::default() {
        tracing::warn!("no NATS URL is configured: the credentials and TLS settings under [nats] are ignored for the embedded server");
    }
    *nats = config::NatsConfig {
        user: Some(service.user.clone()),
        password: Some(service.password.clone()),
        connect_timeout: nats.connect_timeout,
        ..Default::default()
    };
}

async fn serve(
    mut cfg: Config,
    urls: Vec<String>,
    embedded: bool,
    (metrics, endpoint): (std::sync::Arc<bstore_api::Metrics>, http::Endpoint),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let keyring = keys::load(&cfg.keys, &cfg.data_dir, embedded)?;
    let client = nats::connect(&cfg.nats, &urls, nats::Role::Store).await?;
    let max_payload = client.server_info().max_payload;
    if max_payload < cfg.api.max_request_bytes + HEADER_ROOM {
        let lowered = max_payload.saturating_sub(HEADER_ROOM);
        tracing::warn!(
            max_payload,
            configured = cfg.api.max_request_bytes,
            lowered,
            "the NATS server's max_payload is below the request limit; lowering the limit (set max_payload to 8MB on the server for Baileys' largest calls)"
        );
        cfg.api.max_request_bytes = lowered;
    }
    let codec = Codec::new(keyring);
    let log = open_log(&client, &cfg, &codec).await?;
    // This process's identity in the lease and keyring buckets: new at every
    // start, so a restarted instance never mistakes a dead one's leases for
    // its own.
    let instance = uuid::Uuid::new_v4().simple().to_string();
    // Which key seals is the cluster's record, followed from here on; nothing
    // is sealed before this (opening the log seals nothing).
    let member = rotation::join(&client, &cfg, &codec, &instance, "serve").await?;
    let redis = projections::redis_projection(&cfg, &codec)?;
    let materializer = projections::start_materializer(&cfg, &client, &codec).await?;
    let ownership = bstore_cluster::Ownership::new(&cfg.cluster, instance);
    let sessions = Sessions::start_with(log.clone(), redis, ownership, cfg.limits, cfg.sessions.clone());
    let erasures = tokio::spawn(follow_erasures(log, sessions.clone()));
    // The operator's subject (restore) is served on the store connection, in
    // the service's own account and exported to no one: bots cannot reach it.
    let admin = bstore_api::admin::Admin::subscribe(client.clone()).await.context("subscribing to the operator's subject")?;
    let admin = tokio::spawn(admin.serve(sessions.clone(), std::future::pending()));
    // Bots' requests arrive on a connection of their own, which an operator
    // can confine to publishing replies; JetStream stays on `client`.
    let serving = nats::connect(&cfg.nats, &urls, nats::Role::Serve).await?;
    endpoint.set_live(http::Live { store: client.clone(), serving: serving.clone(), sessions: sessions.clone() });
    let api = bstore_api::ApiConfig { max_reply_bytes: max_payload.saturating_sub(HEADER_ROOM), limits: cfg.limits, ..cfg.api.clone() };
    let cluster = bstore_api::ClusterSetup {
        js: async_nats::jetstream::new(client.clone()),
        cfg: cfg.cluster.clone(),
        replicas: cfg.stream.replicas,
        // The embedded server is this process's own: no other instance can
        // hold a lease there, so leases left by a crash are dropped at once.
        reset: embedded,
    };
    let ready_file = cfg.data_dir.join(READY_FILE);
    let _ = std::fs::remove_file(&ready_file);
    let taking = endpoint.clone();
    let ready = || {
        taking.set_taking(true);
        if let Err(e) =
            std::fs::create_dir_all(&cfg.data_dir).and_then(|()| std::fs::write(&ready_file, format!("{}\n", std::process::id())))
        {
            tracing::warn!(file = %ready_file.display(), error = %e, "could not write the readiness file");
        }
    };
    let shutdown = async {
        shutdown.await;
        endpoint.set_taking(false);
        let _ = std::fs::remove_file(&ready_file);
    };
    let mut more_figures: Vec<bstore_api::MoreFigures> = Vec::new();
    if let Some(m) = &materializer {
        endpoint.set_materializer(m.handle());
        let handle = m.handle();
        more_figures.push((
            "materializer",
            std::sync::Arc::new(move || {
                let s = handle.stats();
                serde_json::json!({
                    "applied_seq": s.applied_seq,
                    "quarantined_events": s.quarantined_events,
                    "unreadable_documents": s.unreadable_documents,
                    "deferred_events": s.deferred_events,
                    "erased_events": s.erased_events,
                })
            }),
        ));
    }
    let served =
        bstore_api::serve(serving.clone(), api, sessions, cluster, bstore_api::Figures { metrics, more: more_figures }, ready, shutdown)
            .await;
    erasures.abort();
    admin.abort();
    if let Some(m) = materializer {
        m.stop().await;
    }
    member.leave().await;
    served?;
    // Replies already handed to the client are written out before exit.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async { tokio::join!(serving.flush(), client.flush()) }).await;
    tracing::info!("stopped");
    Ok(())
}

/// Drops from memory every session whose data key is destroyed (an
/// erasure, run from any process), for as long as the service runs: what
/// the erasure removed must not be served from a state loaded before it.
async fn follow_erasures(log: EventLog, sessions: Sessions) {
    use futures_util::StreamExt as _;
    loop {
        match log.watch_data_keys().await {
            Ok(changes) => {
                let mut changes = std::pin::pin!(changes);
                while let Some((key, gone)) = changes.next().await {
                    if gone {
                        tracing::info!(session = %key, "the session's data key was destroyed; dropping it from memory");
                        sessions.forget(&key).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch the data-key bucket; trying again"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Opens the event stream, waiting for JetStream while it has no leader (a
/// cluster electing one after a node died) rather than giving up at once.
async fn open_log(client: &async_nats::Client, cfg: &Config, codec: &Codec) -> anyhow::Result<EventLog> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        match EventLog::open(client.clone(), cfg.stream.clone(), codec.clone()).await {
            Ok(log) => return Ok(log),
            Err(bstore_log::LogError::Unavailable(e)) if start.elapsed() < std::time::Duration::from_secs(60) => {
                tracing::warn!(error = %e, "the event stream is not available yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(anyhow::Error::new(e).context("opening the event stream")),
        }
    }
}

/// For the command-line tools: a NATS connection (to the configured servers,
/// or to the running embedded one, as its service user) and the codec,
/// sealing under the cluster's current key.
pub(crate) async fn connect_tool(cfg: &Config) -> anyhow::Result<(async_nats::Client, Codec)> {
    let (nats_cfg, urls, embedded) = tool_nats(cfg)?;
    let keyring = keys::load_for_tool(&cfg.keys, &cfg.data_dir, embedded)?;
    let client = nats::connect(&nats_cfg, &urls, nats::Role::Tool).await?;
    let codec = Codec::new(keyring);
    rotation::adopt_for_tool(&client, cfg, &codec).await?;
    Ok((client, codec))
}

/// A tool's connection for requests to the service (as the service's
/// identity, replies to `_INBOX.`); no keys are needed for it.
pub(crate) async fn connect_requester(cfg: &Config) -> anyhow::Result<async_nats::Client> {
    let (nats_cfg, urls, _) = tool_nats(cfg)?;
    nats::connect(&nats_cfg, &urls, nats::Role::Requester).await
}

/// The NATS settings and URLs a tool connects with, and whether they are
/// the embedded server's.
fn tool_nats(cfg: &Config) -> anyhow::Result<(config::NatsConfig, Vec<String>, bool)> {
    let embedded = cfg.nats.urls.is_empty();
    let mut nats_cfg = cfg.nats.clone();
    let urls = if embedded {
        let file = cfg.data_dir.join(embedded::URL_FILE);
        let url = std::fs::read_to_string(&file)
            .with_context(|| format!("no NATS URL configured and no running embedded server ({} missing)", file.display()))?;
        let service = embedded::service_credentials(&embedded::dir(&cfg.data_dir))?;
        embedded_identity(&mut nats_cfg, &service);
        vec![url.trim().to_owned()]
    } else {
        cfg.nats.urls.clone()
    };
    Ok((nats_cfg, urls, embedded))
}
