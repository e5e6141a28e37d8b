//! Settings of the Mongo materializer.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The materializer's settings. Every field has a default; without a `url`
/// there is no materializer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MongoConfig {
    /// `mongodb://host:port/?...` (`mongodb+srv://` is not supported: the
    /// driver is built without a DNS resolver). Unset (the default): no
    /// materializer runs inside `serve`.
    pub url: Option<String>,
    /// Database holding the `keys`, `sessions`, `checkpoints` and
    /// `quarantine` collections. Default `bstore`.
    pub database: String,
    /// Name of the durable JetStream consumer. Instances sharing a name share
    /// the work; a second name materializes the log a second time.
    /// Default `bstore-mongo`.
    pub consumer: String,
    /// Most events written in one batch. Default 500.
    pub batch_size: usize,
    /// How long a fetch waits to fill a batch before writing what it has.
    /// Default 0.2 s.
    #[serde(with = "bstore_domain::secs")]
    pub batch_wait: Duration,
    /// How long JetStream waits for an acknowledgement before delivering an
    /// event again. Default 30 s.
    #[serde(with = "bstore_domain::secs")]
    pub ack_wait: Duration,
    /// How many times an event is delivered at most. One that was delivered
    /// this many times without being acknowledged (each instance it went to
    /// died or hung on it) is quarantined on its last delivery, unapplied;
    /// one of a newer schema than the instance reads is handed back (for an
    /// upgraded instance) until then. Default 5.
    pub max_deliver: i64,
    /// How long a deleted key or session stays as a tombstone (so that a
    /// late replay cannot bring it back) before the TTL index purges it.
    /// Default 7 days.
    pub tombstone_retention_secs: u64,
    /// Longest pause between retries while Mongo fails. Default 5 s.
    #[serde(with = "bstore_domain::secs")]
    pub retry_max: Duration,
    /// How long a Mongo call may wait for a usable server. Default 5 s.
    #[serde(with = "bstore_domain::secs")]
    pub timeout: Duration,
    /// How often the materializer logs its lag. Default 30 s.
    #[serde(with = "bstore_domain::secs")]
    pub lag_log_interval: Duration,
}

impl Default for MongoConfig {
    fn default() -> Self {
        Self {
            url: None,
            database: "bstore".into(),
            consumer: "bstore-mongo".into(),
            batch_size: 500,
            batch_wait: Duration::from_millis(200),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            tombstone_retention_secs: 7 * 24 * 3600,
            retry_max: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            lag_log_interval: Duration::from_secs(30),
        }
    }
}
