//! Settings of partition ownership.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the instances of a deployment share the sessions. Every field has a
/// default; `partitions` must be the same on every instance (and in the
/// NATS server's subject mapping, when one is used).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Sessions hash into this many partitions; each is owned by one
    /// instance at a time. A setting of the deployment: the same on every
    /// instance and in the server's `partition()` mapping. Default 16.
    pub partitions: u32,
    /// JetStream KV bucket holding the leases. Default `BSTORE_LEASES`.
    pub bucket: String,
    /// Requests for partition `n` are served on
    /// `<partition_prefix>.<n>.<tenant>.<session>.<op>`. Default `bstore-p`.
    pub partition_prefix: String,
    /// How long a lease lives on the server after its last renewal; a dead
    /// instance's partitions move after at most this (plus one poll).
    /// Default 5 s.
    #[serde(with = "bstore_domain::secs")]
    pub lease_ttl: Duration,
    /// How often leases are renewed and free partitions looked for.
    /// Default 1 s.
    #[serde(with = "bstore_domain::secs")]
    pub renew_interval: Duration,
    /// An instance stops serving a partition this long before its lease
    /// could expire on the server, by its own monotonic clock. Default 1.5 s.
    #[serde(with = "bstore_domain::secs")]
    pub margin: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            partitions: 16,
            bucket: "BSTORE_LEASES".into(),
            partition_prefix: "bstore-p".into(),
            lease_ttl: Duration::from_secs(5),
            renew_interval: Duration::from_secs(1),
            margin: Duration::from_millis(1500),
        }
    }
}

impl ClusterConfig {
    /// How long after sending a successful create or renewal its holder may
    /// serve the partition: the lease TTL less the margin.
    pub fn valid_for(&self) -> Duration {
        self.lease_ttl.saturating_sub(self.margin)
    }
}
