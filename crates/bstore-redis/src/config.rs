//! Settings of the Redis projection.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The Redis projection's settings. Every field has a default; without a
/// `url` the projection is off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://` for TLS, `redis+unix://`).
    /// An ACL user and password go in the URL
    /// (`rediss://bstore:secret@redis.internal:6380/`) or in `username` and
    /// `password`. Unset (the default): no Redis projection; sessions load
    /// from the log alone.
    pub url: Option<String>,
    /// ACL user name; overrides one in the URL. Default: none (the URL's, or
    /// Redis's `default` user).
    pub username: Option<String>,
    /// Password (of the ACL user, or `requirepass`); overrides one in the
    /// URL, so the URL can stay free of secrets
    /// (`BSTORE__REDIS__PASSWORD`). Default: none.
    pub password: Option<String>,
    /// TLS for a `rediss://` URL: a private CA and a client certificate.
    pub tls: RedisTls,
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
            username: None,
            password: None,
            tls: RedisTls::default(),
            key_prefix: "bstore".into(),
            ttl_secs: 0,
            timeout: Duration::from_secs(1),
            queue: 64,
            catch_up_interval: Duration::from_secs(2),
        }
    }
}

/// TLS settings, used only with a `rediss://` URL (TLS itself is chosen by
/// the scheme). Every field defaults to none: the server is then verified
/// against the system's roots and no client certificate is sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisTls {
    /// PEM file of the CA(s) that signed the server's certificate, for a
    /// private CA. When set, only these are trusted (not the system roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), for a server with
    /// `tls-auth-clients yes`. Needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl RedisTls {
    /// Whether any TLS file is configured.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}
