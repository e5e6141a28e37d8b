//! Settings of the Redis projection.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The Redis projection's settings. Every field has a default; without a
/// `url` the projection is off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://`, `redis+unix://`). Unset (the
    /// default): no Redis projection; sessions load from the log alone.
    pub url: Option<String>,
    /// First part of every hash's key: `<prefix>:{<tenant>.<session>}`.
    /// Default `bstore`.
    pub key_prefix: String,
    /// Seconds after its last write that a session's hash expires. Redis is
    /// a cache of the log, so this is a cache policy, not retention. 0 (the
    /// default) keeps hashes until the session is deleted.
    pub ttl_secs: u64,
    /// How long one Redis call (a projection write, a load) may take before
    /// it counts as failed. Default 1 s.
    #[serde(with = "bstore_domain::secs")]
    pub timeout: Duration,
    /// Projection writes a session may have waiting; past it the session is
    /// marked behind and caught up later with a snapshot. Default 64.
    pub queue: usize,
    /// How often a session whose projection is behind tries to catch up
    /// while no write arrives. Default 2 s.
    #[serde(with = "bstore_domain::secs")]
    pub catch_up_interval: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "bstore".into(),
            ttl_secs: 0,
            timeout: Duration::from_secs(1),
            queue: 64,
            catch_up_interval: Duration::from_secs(2),
        }
    }
}
