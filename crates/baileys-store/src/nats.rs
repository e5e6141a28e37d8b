//! Connections to NATS: authentication, TLS and the connection's role.

use anyhow::Context as _;

use crate::config::NatsConfig;

/// What a connection is for. The service keeps the connection that serves
/// bots' requests apart from the one that reaches JetStream, so that the
/// serving identity can be confined to publishing replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves requests: subscribes to the request subjects, publishes replies.
    Serve,
    /// Reaches JetStream (the event log, the lease bucket) and forwards.
    Store,
    /// A command-line tool.
    Tool,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Serve => "baileys-store",
            Role::Store => "baileys-store-store",
            Role::Tool => "baileys-store-tool",
        }
    }
}

/// Connects to `urls` with the credentials and TLS settings of `cfg` and
/// waits for the first connection.
pub async fn connect(cfg: &NatsConfig, urls: &[String], role: Role) -> anyhow::Result<async_nats::Client> {
    let addrs = urls
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>().with_context(|| format!("bad NATS URL {u:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut opts = async_nats::ConnectOptions::new().name(role.name()).retry_on_initial_connect().max_reconnects(None).event_callback(
        |event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                other => tracing::info!(event = %other, "NATS event"),
            }
        },
    );
    if let Some(token) = &cfg.token {
        opts = opts.token(token.clone());
    }
    let client = opts.connect(addrs).await.context("connecting to NATS")?;
    // With retry_on_initial_connect the client returns at once; wait for the
    // first connection so that server_info() is real.
    let start = std::time::Instant::now();
    while client.connection_state() != async_nats::connection::State::Connected {
        if start.elapsed() > std::time::Duration::from_secs(30) {
            anyhow::bail!("could not reach NATS at {urls:?} within 30 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(client)
}
