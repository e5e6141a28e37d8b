//! The one typed configuration, loaded from an optional TOML file and
//! overridden from the environment.
//!
//! Every field has a default, so no file is needed: with nothing configured
//! the service starts its own nats-server under `data_dir` (see
//! `config/default.toml`, which lists every setting with its default).
//!
//! Environment overrides: `BSTORE__<SECTION>__<FIELD>=value` sets any field
//! (`BSTORE__SESSIONS__WORKERS=2`); values are read as TOML when they parse
//! (numbers, booleans) and as strings otherwise. Shorthands for the common
//! ones: `BSTORE_CONFIG` (file path), `BSTORE_DATA_DIR`, `BSTORE_NATS_URL`
//! (comma-separated), `BSTORE_NATS_USER`, `BSTORE_NATS_PASSWORD`,
//! `BSTORE_NATS_TOKEN`, `BSTORE_NATS_NKEY` (a seed), `BSTORE_NATS_NKEY_FILE`,
//! `BSTORE_NATS_CREDS` (a creds file), `BSTORE_NATS_CA`, `BSTORE_NATS_CERT`,
//! `BSTORE_NATS_KEY` (TLS files), `BSTORE_NATS_SERVER_BIN`, `BSTORE_KEYS`,
//! `BSTORE_KEY_FILE`, `BSTORE_LOG` (filter), `BSTORE_LOG_FORMAT`,
//! `BSTORE_REDIS_URL`, `BSTORE_MONGO_URL`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use bstore_api::ApiConfig;
use bstore_cluster::ClusterConfig;
use bstore_domain::Limits;
use bstore_log::LogConfig;
use bstore_mongo::MongoConfig;
use bstore_redis::RedisConfig;
use bstore_session::SessionConfig;
use serde::{Deserialize, Serialize};

/// Everything the service can be told.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the embedded nats-server keeps its store. Default `data`. A
    /// sealing key generated for the embedded default is kept apart from
    /// it (see `keys.generated_file`).
    pub data_dir: PathBuf,
    /// The NATS connection.
    pub nats: NatsConfig,
    /// The private nats-server started when `nats.urls` is empty.
    pub embedded: EmbeddedConfig,
    /// Sealing keys.
    pub keys: KeysConfig,
    /// The event stream.
    pub stream: LogConfig,
    /// The request API.
    pub api: ApiConfig,
    /// Session actors.
    pub sessions: SessionConfig,
    /// Partition ownership among the instances.
    pub cluster: ClusterConfig,
    /// Per-request limits.
    pub limits: Limits,
    /// The Redis projection (off without a URL).
    pub redis: RedisConfig,
    /// The Mongo materializer (off without a URL).
    pub mongo: MongoConfig,
    /// Logs.
    pub telemetry: TelemetryConfig,
    /// The operator's HTTP endpoint: Prometheus metrics and health.
    pub http: HttpConfig,
}

/// The operator's HTTP endpoint: `/metrics` (Prometheus), `/healthz`,
/// `/readyz`. It is the operator's, not the bots': it names tenants, so it
/// listens on loopback unless told otherwise, and never on NATS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// `auto` (the default): `127.0.0.1:9478` on the embedded default, off
    /// when NATS URLs are configured (a cluster's instances are scraped
    /// from elsewhere: give each an address Prometheus reaches). `off`, or
    /// an `ip:port` to listen on (port 0 picks a free one). The address
    /// bound is written to `<data_dir>/http.addr`.
    pub listen: String,
    /// Tenants labelled by name in the per-tenant figures; requests of the
    /// others are counted under `tenant="(other)"`. Default 1000; 0 labels
    /// none.
    pub tenant_labels: usize,
}

/// The port of the HTTP endpoint on the embedded default.
pub const DEFAULT_HTTP_PORT: u16 = 9478;

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: "auto".into(), tenant_labels: bstore_api::DEFAULT_TENANT_LABELS }
    }
}

impl HttpConfig {
    /// Where to listen, if anywhere; `embedded` says whether the service
    /// runs the embedded default (no NATS URL configured).
    pub fn address(&self, embedded: bool) -> anyhow::Result<Option<std::net::SocketAddr>> {
        match self.listen.trim() {
            "auto" if embedded => Ok(Some(std::net::SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT)))),
            "auto" | "off" | "" => Ok(None),
            addr => addr.parse().map(Some).map_err(|_| {
                anyhow::anyhow!("http.listen = {addr:?} is not an ip:port (e.g. 127.0.0.1:{DEFAULT_HTTP_PORT}), `auto` or `off`")
            }),
        }
    }
}

/// How to reach NATS: the servers, who the service is, and TLS.
///
/// One kind of credential at a time: user and password (also accepted in
/// the URLs, `nats://user:pass@host:4222`), a token, an NKey seed, or a
/// creds file (a user JWT and its seed, for decentralized auth). TLS is
/// independent of that: a server may identify clients by certificate alone.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs. Empty (the default) starts the embedded server.
    pub urls: Vec<String>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<String>,
    /// Token for servers that require one.
    pub token: Option<String>,
    /// An NKey user seed (`SU...`), inline. Prefer `nkey_file`.
    pub nkey: Option<String>,
    /// A file holding an NKey user seed.
    pub nkey_file: Option<PathBuf>,
    /// A creds file: user JWT and seed (decentralized auth, as `nsc` writes it).
    pub creds_file: Option<PathBuf>,
    /// TLS to the servers.
    pub tls: NatsTls,
    /// Other credentials for the connection that serves bots' requests;
    /// unset: the ones above. Lets that identity be confined to
    /// subscribing to the request subjects and publishing replies
    /// (`allow_responses`), while only the other one reaches JetStream.
    pub serve: NatsAuth,
    /// Seconds to keep trying to reach a server at start-up before giving
    /// up. A refused credential or a failed TLS handshake ends the start at
    /// once. Default 30.
    #[serde(with = "bstore_domain::secs")]
    pub connect_timeout: std::time::Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            user: None,
            password: None,
            token: None,
            nkey: None,
            nkey_file: None,
            creds_file: None,
            tls: NatsTls::default(),
            serve: NatsAuth::default(),
            connect_timeout: std::time::Duration::from_secs(30),
        }
    }
}

impl NatsConfig {
    /// The main credentials (those of the JetStream connection and the tools).
    pub fn auth(&self) -> NatsAuth {
        NatsAuth {
            user: self.user.clone(),
            password: self.password.clone(),
            token: self.token.clone(),
            nkey: self.nkey.clone(),
            nkey_file: self.nkey_file.clone(),
            creds_file: self.creds_file.clone(),
        }
    }
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("urls", &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>())
            .field("auth", &self.auth())
            .field("tls", &self.tls)
            .field("serve", &self.serve)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// One set of NATS credentials; at most one kind may be set.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsAuth {
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<String>,
    /// Token.
    pub token: Option<String>,
    /// An NKey user seed, inline.
    pub nkey: Option<String>,
    /// A file holding an NKey user seed.
    pub nkey_file: Option<PathBuf>,
    /// A creds file (user JWT and seed).
    pub creds_file: Option<PathBuf>,
}

impl NatsAuth {
    /// Whether any credential is set.
    pub fn is_set(&self) -> bool {
        self.user.is_some()
            || self.password.is_some()
            || self.token.is_some()
            || self.nkey.is_some()
            || self.nkey_file.is_some()
            || self.creds_file.is_some()
    }
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "<hidden>");
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("nkey", &hidden(&self.nkey))
            .field("nkey_file", &self.nkey_file)
            .field("creds_file", &self.creds_file)
            .finish()
    }
}

/// TLS to the NATS servers. A `tls://` URL or a server that requires TLS
/// turns it on as well.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file of the CA(s) to trust for the servers' certificates; unset:
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS. Default false (but see above).
    pub required: bool,
}

/// `url` with any password (or token) in it replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = match userinfo.find(':') {
                Some(colon) => format!("{}:***", &userinfo[..colon]),
                None => "***".to_owned(),
            };
            format!("{scheme}{user}{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// How durable an acknowledged write is on the embedded server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sync {
    /// fsync on every write before it is acknowledged: nothing acknowledged
    /// is lost in a power cut, at about a quarter of the write throughput.
    Always,
    /// nats-server's default, fsync every 2 minutes: acknowledged writes
    /// survive a crash of the process, but a power cut or kernel crash can
    /// lose up to the last 2 minutes.
    #[default]
    Interval,
}

/// The private nats-server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Path of the nats-server binary. Default: `.tools/nats/bin/nats-server`
    /// under the working directory (where `scripts/setup` installs it), then
    /// `PATH`.
    pub server_bin: Option<PathBuf>,
    /// Loopback port for clients (bots connect here); -1 picks a free one.
    /// Default 4222.
    pub port: i32,
    /// Durability of acknowledged writes. Default `interval`.
    pub sync: Sync,
    /// The server's `max_payload` in bytes. Default 8 MiB.
    pub max_payload: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self { server_bin: None, port: 4222, sync: Sync::Interval, max_payload: 8 << 20 }
    }
}

/// Where sealing keys come from. Never from the repository.
///
/// Key texts hold `id:base64` entries (sealing keys) and at most one
/// `index:base64` entry, which pins the index key (the key that names
/// things in the projections; derived from the lowest-id key when not
/// pinned, so pin it before that key is retired).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// Keys as `id:base64` entries, comma-separated. Prefer the `BSTORE_KEYS`
    /// variable or a key file over writing keys into a config file.
    pub keys: Option<String>,
    /// A file of `id:base64` lines.
    pub file: Option<PathBuf>,
    /// Pins the id that seals new data on this instance. Default: unset,
    /// and the cluster's choice is followed: the `seal.current` record in
    /// the JetStream KV bucket `BSTORE_META`, which `baileys-store
    /// rotate-key` changes once every instance holds the new key (on a
    /// first start with no record, the highest id is recorded).
    pub current: Option<u32>,
    /// Where the embedded default keeps the sealing key it generates when
    /// no key is configured. Default: `sealing.keys` in a directory beside
    /// the data dir, `<data_dir>.keys/` (so `data.keys/sealing.keys`): a
    /// copy of the data dir does not carry the key that opens it.
    pub generated_file: Option<PathBuf>,
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An `EnvFilter` directive. Default `info`.
    pub filter: String,
    /// `pretty` (default) or `json`.
    pub format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { filter: "info".into(), format: LogFormat::Pretty }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// Loads the file (if any) and applies the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let from_env = env.iter().find(|(k, _)| k == "BSTORE_CONFIG").map(|(_, v)| PathBuf::from(v));
        let mut table = match file.map(Path::to_path_buf).or(from_env) {
            Some(path) => {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                text.parse::<toml::Table>().with_context(|| format!("parsing {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        for (name, value) in &env {
            apply_env(&mut table, name, value)?;
        }
        let mut cfg: Config = table.try_into().context("invalid configuration")?;
        if cfg.data_dir.as_os_str().is_empty() {
            cfg.data_dir = PathBuf::from("data");
        }
        Ok(cfg)
    }
}

fn apply_env(table: &mut toml::Table, name: &str, value: &str) -> anyhow::Result<()> {
    let set = |table: &mut toml::Table, path: &[&str], v: toml::Value| {
        let (last, parents) = path.split_last().expect("non-empty path");
        let mut t = table;
        for p in parents {
            t = t.entry(*p).or_insert_with(|| toml::Value::Table(Default::default())).as_table_mut().expect("a section is a table");
        }
        t.insert((*last).to_owned(), v);
    };
    let s = |v: &str| toml::Value::String(v.to_owned());
    match name {
        "BSTORE_DATA_DIR" => set(table, &["data_dir"], s(value)),
        "BSTORE_NATS_URL" => {
            let urls = value.split(',').map(str::trim).filter(|u| !u.is_empty()).map(s).collect();
            set(table, &["nats", "urls"], toml::Value::Array(urls));
        }
        "BSTORE_NATS_USER" => set(table, &["nats", "user"], s(value)),
        "BSTORE_NATS_PASSWORD" => set(table, &["nats", "password"], s(value)),
        "BSTORE_NATS_TOKEN" => set(table, &["nats", "token"], s(value)),
        "BSTORE_NATS_NKEY" => set(table, &["nats", "nkey"], s(value)),
        "BSTORE_NATS_NKEY_FILE" => set(table, &["nats", "nkey_file"], s(value)),
        "BSTORE_NATS_CREDS" => set(table, &["nats", "creds_file"], s(value)),
        "BSTORE_NATS_CA" => set(table, &["nats", "tls", "ca_file"], s(value)),
        "BSTORE_NATS_CERT" => set(table, &["nats", "tls", "cert_file"], s(value)),
        "BSTORE_NATS_KEY" => set(table, &["nats", "tls", "key_file"], s(value)),
        "BSTORE_NATS_SERVER_BIN" => set(table, &["embedded", "server_bin"], s(value)),
        "BSTORE_KEYS" => set(table, &["keys", "keys"], s(value)),
        "BSTORE_KEY_FILE" => set(table, &["keys", "file"], s(value)),
        "BSTORE_LOG" => set(table, &["telemetry", "filter"], s(value)),
        "BSTORE_LOG_FORMAT" => set(table, &["telemetry", "format"], s(value)),
        "BSTORE_REDIS_URL" => set(table, &["redis", "url"], s(value)),
        "BSTORE_MONGO_URL" => set(table, &["mongo", "url"], s(value)),
        _ => {
            let Some(rest) = name.strip_prefix("BSTORE__") else { return Ok(()) };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                anyhow::bail!("bad override variable {name}");
            }
            let parsed = format!("v = {value}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| s(value));
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            set(table, &path, parsed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn nothing_configured_means_embedded_defaults() {
        let cfg = Config::load_from(None, env(&[])).unwrap();
        assert!(cfg.nats.urls.is_empty());
        assert_eq!(cfg.data_dir, PathBuf::from("data"));
        assert_eq!(cfg.api.prefix, "bstore");
        assert_eq!(cfg.embedded.port, 4222);
        assert_eq!(cfg.redis.url, None, "the Redis projection is off by default");
        assert_eq!(cfg.mongo.url, None, "the Mongo materializer is off by default");
    }

    #[test]
    fn the_http_endpoint_is_on_at_loopback_for_the_embedded_default_only_unless_told() {
        let cfg = Config::load_from(None, env(&[])).unwrap();
        let fixed = std::net::SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT));
        assert_eq!(cfg.http.address(true).unwrap(), Some(fixed), "auto, embedded: loopback on the fixed port");
        assert_eq!(cfg.http.address(false).unwrap(), None, "auto, NATS URLs configured: off");
        let told = Config::load_from(None, env(&[("BSTORE__HTTP__LISTEN", "10.0.0.11:9478")])).unwrap();
        assert_eq!(told.http.address(false).unwrap(), Some("10.0.0.11:9478".parse().unwrap()));
        let off = Config::load_from(None, env(&[("BSTORE__HTTP__LISTEN", "off")])).unwrap();
        assert_eq!(off.http.address(true).unwrap(), None);
        let bad = Config::load_from(None, env(&[("BSTORE__HTTP__LISTEN", "localhost:9478")])).unwrap();
        let err = bad.http.address(true).unwrap_err().to_string();
        assert!(err.contains("not an ip:port"), "{err}");
    }

    #[test]
    fn projection_urls_have_shorthands() {
        let cfg = Config::load_from(
            None,
            env(&[
                ("BSTORE_REDIS_URL", "redis://127.0.0.1:6390/"),
                ("BSTORE_MONGO_URL", "mongodb://127.0.0.1:27018/?retryWrites=false"),
                ("BSTORE__REDIS__TTL_SECS", "3600"),
                ("BSTORE__MONGO__BATCH_SIZE", "50"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.redis.url.as_deref(), Some("redis://127.0.0.1:6390/"));
        assert_eq!(cfg.mongo.url.as_deref(), Some("mongodb://127.0.0.1:27018/?retryWrites=false"));
        assert_eq!(cfg.redis.ttl_secs, 3600);
        assert_eq!(cfg.mongo.batch_size, 50);
    }

    #[test]
    fn environment_overrides_any_field() {
        let cfg = Config::load_from(
            None,
            env(&[
                ("BSTORE_NATS_URL", "nats://127.0.0.1:1, nats://127.0.0.1:2"),
                ("BSTORE__SESSIONS__WORKERS", "3"),
                ("BSTORE__STREAM__STORAGE", "memory"),
                ("BSTORE__EMBEDDED__SYNC", "always"),
                ("BSTORE__API__PREFIX", "bots.v1"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.nats.urls, vec!["nats://127.0.0.1:1", "nats://127.0.0.1:2"]);
        assert_eq!(cfg.sessions.workers, 3);
        assert_eq!(cfg.stream.storage, bstore_log::Storage::Memory);
        assert_eq!(cfg.embedded.sync, Sync::Always);
        assert_eq!(cfg.api.prefix, "bots.v1");
    }

    #[test]
    fn nats_credentials_and_tls_have_shorthands_and_stay_out_of_debug_output() {
        let cfg = Config::load_from(
            None,
            env(&[
                ("BSTORE_NATS_URL", "tls://store:pw-in-url@nats-1:4222"),
                ("BSTORE_NATS_USER", "store"),
                ("BSTORE_NATS_PASSWORD", "12345"),
                ("BSTORE_NATS_CREDS", "/etc/b.creds"),
                ("BSTORE_NATS_NKEY_FILE", "/etc/b.nk"),
                ("BSTORE_NATS_CA", "/etc/ca.pem"),
                ("BSTORE_NATS_CERT", "/etc/c.pem"),
                ("BSTORE_NATS_KEY", "/etc/c.key"),
                ("BSTORE__NATS__SERVE__USER", "responder"),
                ("BSTORE__NATS__CONNECT_TIMEOUT", "2.5"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.nats.password.as_deref(), Some("12345"), "a numeric password stays a string");
        assert_eq!(cfg.nats.creds_file.as_deref(), Some(Path::new("/etc/b.creds")));
        assert_eq!(cfg.nats.nkey_file.as_deref(), Some(Path::new("/etc/b.nk")));
        assert_eq!(cfg.nats.tls.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(cfg.nats.tls.cert_file.as_deref(), Some(Path::new("/etc/c.pem")));
        assert_eq!(cfg.nats.tls.key_file.as_deref(), Some(Path::new("/etc/c.key")));
        assert_eq!(cfg.nats.serve.user.as_deref(), Some("responder"));
        assert_eq!(cfg.nats.connect_timeout, std::time::Duration::from_millis(2500));
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("12345") && !shown.contains("pw-in-url"), "{shown}");
        assert!(shown.contains("tls://store:***@nats-1:4222"), "{shown}");
    }

    #[test]
    fn urls_are_redacted_for_logs() {
        assert_eq!(redact_url("nats://u:p@h:1"), "nats://u:***@h:1");
        assert_eq!(redact_url("nats://token@h:1/x@y"), "nats://***@h:1/x@y");
        assert_eq!(redact_url("nats://h:1"), "nats://h:1");
        assert_eq!(redact_url("u:p@h"), "u:***@h");
    }

    #[test]
    fn unknown_fields_are_errors_not_ignored() {
        let err = Config::load_from(None, env(&[("BSTORE__SESSIONS__WORKRES", "3")])).unwrap_err();
        assert!(format!("{err:#}").contains("workres"), "{err:#}");
    }

    #[test]
    fn the_shipped_default_file_matches_the_built_in_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
        let from_file = Config::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(from_file, Config::load_from(None, env(&[])).unwrap());
    }

    #[test]
    fn the_example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/example.toml");
        Config::load_from(Some(&path), env(&[])).unwrap();
    }
}
