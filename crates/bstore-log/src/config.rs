//! Settings of the event stream.

use std::time::Duration;

use async_nats::jetstream::stream;
use serde::{Deserialize, Serialize};

/// Where JetStream keeps the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk (the default). Durability per acknowledged write then depends
    /// on the server's `jetstream.sync_interval`.
    #[default]
    File,
    /// In memory only: lost when the server stops. For tests and benchmarks.
    Memory,
}

/// The event stream's settings. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Stream name. Default `BSTORE_EVENTS`.
    pub stream: String,
    /// Subject prefix; a session's events go to `<prefix>.<tenant>.<session>`.
    /// Must not overlap the API's request subjects. Default `bstore-events`.
    pub subject_prefix: String,
    /// Stream replicas: 1 on one server, 3 in a cluster. Default 1.
    pub replicas: usize,
    /// `file` (default) or `memory`.
    pub storage: Storage,
    /// Largest event the stream accepts, in bytes. Default 8 MiB. The
    /// server's `max_payload` must be at least this.
    pub max_message_bytes: i32,
    /// How long a request id is remembered for deduplication. Default 2 min.
    #[serde(with = "bstore_domain::secs")]
    pub duplicate_window: Duration,
    /// How long a JetStream request (append, replay step) may take before it
    /// is reported as unavailable. Default 5 s.
    #[serde(with = "bstore_domain::secs")]
    pub request_timeout: Duration,
    /// The JetStream stream of the sessions' snapshots (`snapshots.rs`).
    /// Default `BSTORE_SNAPSHOTS`.
    pub snapshot_stream: String,
    /// The subject prefix of that stream: a session's snapshots are on
    /// `<prefix>.<tenant>.<session>`. Default `bstore-snap`.
    pub snapshot_subject_prefix: String,
    /// Audit retention in seconds: a session's events older than this may
    /// be dropped once a base snapshot stands for them (`retention.rs`).
    /// 0 (the default) keeps every event for ever. Anything else makes the
    /// event stream allow subject purges, which can only be chosen when the
    /// stream is created.
    pub retention_secs: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            stream: "BSTORE_EVENTS".into(),
            subject_prefix: "bstore-events".into(),
            replicas: 1,
            storage: Storage::File,
            max_message_bytes: 8 << 20,
            duplicate_window: Duration::from_secs(120),
            request_timeout: crate::DEFAULT_TIMEOUT,
            snapshot_stream: "BSTORE_SNAPSHOTS".into(),
            snapshot_subject_prefix: "bstore-snap".into(),
            retention_secs: 0,
        }
    }
}

/// The event stream's metadata entry saying it was made for an audit
/// retention (and so allows subject purges on purpose).
pub const RETENTION_METADATA: &str = "bstore_retention_secs";

impl LogConfig {
    /// The snapshot stream's settings: the last [`crate::SNAPSHOTS_KEPT`]
    /// messages of each session's subject are kept, older ones dropped by the
    /// server. Snapshots are derived data: nothing is lost with one.
    pub fn snapshot_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.snapshot_stream.clone(),
            description: Some("baileys-store session snapshots, the latest two per session".into()),
            subjects: vec![format!("{}.>", self.snapshot_subject_prefix)],
            num_replicas: self.replicas,
            storage: match self.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            max_message_size: self.max_message_bytes,
            max_messages_per_subject: crate::snapshots::SNAPSHOTS_KEPT,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// The JetStream stream configuration these settings ask for. History is
    /// kept without an age limit: replaying the log is how a session is
    /// rebuilt, so no event may expire before a durable snapshot covers it.
    /// Nor may it be removed through the JetStream API: the stream denies
    /// deleting messages and purging it or a subject (the server refuses to
    /// turn either off again).
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            description: Some("baileys-store auth-state events, one subject per session".into()),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            num_replicas: self.replicas,
            storage: match self.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            max_message_size: self.max_message_bytes,
            duplicate_window: self.duplicate_window,
            allow_direct: true,
            deny_delete: true,
            // Purges of a subject are the retention's (`retention.rs`);
            // a stream made for one says so in its metadata.
            deny_purge: self.retention_secs == 0,
            metadata: if self.retention_secs > 0 {
                [(RETENTION_METADATA.to_string(), self.retention_secs.to_string())].into()
            } else {
                Default::default()
            },
            ..Default::default()
        }
    }
}
