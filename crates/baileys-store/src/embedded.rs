//! The embedded default: a private nats-server with JetStream under the data
//! directory, started and stopped with the service.
//!
//! It is a real nats-server process, not an in-process imitation: the
//! service talks to it exactly as it would to a cluster, and bots on the
//! same machine connect to it on loopback.
//!
//! It is safe on a machine shared with others: every client needs a
//! password (generated on first start into owner-only files, kept across
//! restarts), and the server has two accounts. The service's account holds
//! JetStream and exports only the request subjects; the bots' account
//! imports them, so a bot reaches the request subjects and the replies to
//! its own requests, never `$JS.API`, `$SRV` or the event subjects.
//!
//! The server never outlives the service: it runs under a small `sh` that
//! holds the read end of a pipe whose write end only the service holds.
//! When the pipe closes — a clean stop, or the kernel closing the files of
//! a service killed with SIGKILL — the shell stops the server gracefully
//! (SIGTERM, so JetStream is flushed).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, ChildStdin, Command};

use crate::config::{Config, EmbeddedConfig, Sync};

/// The user the service (and the command-line tools) connect as.
pub const SERVICE_USER: &str = "bstore-service";
/// The user bots connect as.
pub const BOT_USER: &str = "bot";
/// The service's account on the embedded server.
pub const SERVICE_ACCOUNT: &str = "BSTORE";
/// The bots' account on the embedded server.
pub const BOT_ACCOUNT: &str = "BOTS";

/// The file under the data dir holding the bots' connection URL, with
/// credentials (owner-only).
pub const BOT_URL_FILE: &str = "bot.url";
/// The file under the data dir holding the server's URL, without
/// credentials, for the command-line tools.
pub const URL_FILE: &str = "nats.url";

/// Waits for the pipe on its stdin to close, then stops nats-server with
/// SIGTERM; exits when nats-server does, with its status. `$0` is the
/// nats-server binary, `$1` its configuration file.
const SUPERVISOR: &str = r#"exec 3<&0
"$0" -c "$1" </dev/null 3<&- &
pid=$!
{ read -r _ <&3 || :; kill -TERM "$pid" 2>/dev/null; } &
watcher=$!
exec 3<&-
wait "$pid"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
"#;

/// The subjects the embedded server's accounts are laid out for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    /// Requests arrive on `<api_prefix>.<tenant>.<session>.<op>` (`api.prefix`).
    pub api_prefix: String,
    /// Partitions of the `partition()` mapping (`cluster.partitions`).
    pub partitions: u32,
    /// Mapped requests go to `<partition_prefix>.<n>.…` (`cluster.partition_prefix`).
    pub partition_prefix: String,
}

impl Subjects {
    /// The subjects of `cfg`.
    pub fn of(cfg: &Config) -> Self {
        Self {
            api_prefix: cfg.api.prefix.clone(),
            partitions: cfg.cluster.partitions,
            partition_prefix: cfg.cluster.partition_prefix.clone(),
        }
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Self::of(&Config::default())
    }
}

/// A user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"<hidden>").finish()
    }
}

/// A running private nats-server.
pub struct EmbeddedNats {
    shell: Child,
    /// The write end of the pipe the supervising shell waits on.
    lifeline: Option<ChildStdin>,
    server_pid: u32,
    bin: PathBuf,
    /// The client URL without credentials, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// What the service and the tools connect with.
    pub service: Credentials,
    /// What bots connect with.
    pub bot: Credentials,
}

/// The embedded server's directory under the data dir.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("nats")
}

/// The service's credentials for the embedded server whose directory is
/// `dir`, as written at its first start (for the command-line tools).
pub fn service_credentials(dir: &Path) -> anyhow::Result<Credentials> {
    let file = dir.join("service.password");
    let password = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok(Credentials { user: SERVICE_USER.into(), password: password.trim().to_owned() })
}

/// Finds the nats-server binary: the configured path, the project's tools
/// folder, then `PATH`.
pub fn find_server_bin(cfg: &EmbeddedConfig) -> anyhow::Result<PathBuf> {
    if let Some(bin) = &cfg.server_bin {
        return Ok(bin.clone());
    }
    let local = Path::new(".tools/nats/bin/nats-server");
    if local.exists() {
        return Ok(local.canonicalize()?);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "no nats-server found: run scripts/setup, put nats-server on PATH, or set BSTORE_NATS_SERVER_BIN (or BSTORE_NATS_URL to use an external server)"
    )
}

impl EmbeddedNats {
    /// [`EmbeddedNats::start_for`] with the default subjects (`bstore.>`,
    /// 16 partitions on `bstore-p`).
    pub async fn start(cfg: &EmbeddedConfig, dir: &Path) -> anyhow::Result<Self> {
        Self::start_for(cfg, dir, &Subjects::default()).await
    }

    /// Starts the server with its store under `dir` (the data dir's `nats`,
    /// see [`dir`]), its accounts laid out for `subjects`, and waits until it
    /// accepts clients. Passwords are generated into `dir` on the first
    /// start and reused after.
    pub async fn start_for(cfg: &EmbeddedConfig, dir: &Path, subjects: &Subjects) -> anyhow::Result<Self> {
        let bin = find_server_bin(cfg)?;
        if let Some(parent) = dir.parent()
            && !parent.as_os_str().is_empty()
            && !parent.exists()
        {
            private_dir(parent)?;
        }
        private_dir(dir)?;
        let dir = dir.canonicalize()?;
        let pid_file = dir.join("nats-server.pid");
        stop_leftover(&bin, &pid_file).await;
        let _ = std::fs::remove_file(&pid_file);
        let ports_dir = dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)?;
        let service = Credentials { user: SERVICE_USER.into(), password: secret(&dir.join("service.password"))? };
        let bot = Credentials { user: BOT_USER.into(), password: secret(&dir.join("bot.password"))? };
        let conf = server_conf(cfg, &dir, subjects, &service, &bot);
        let conf_path = dir.join("nats-server.conf");
        write_private(&conf_path, conf.as_bytes())?;

        // Appended to, so the log of a server that ran during a crash is kept.
        let log_path = dir.join("nats-server.log");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        log.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        writeln!(log, "--- baileys-store (pid {}) starts nats-server at unix time {now} ---", std::process::id())?;
        let mut shell = Command::new("/bin/sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg(&bin)
            .arg(&conf_path)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C at the terminal reaches only
            // the service, which answers what is in flight and then stops
            // the server.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} under /bin/sh", bin.display()))?;
        let lifeline = shell.stdin.take();
        let (server_pid, url) = match wait_for_port(&mut shell, &ports_dir, &log_path).await {
            Ok(up) => up,
            Err(e) => {
                drop(lifeline);
                let _ = tokio::time::timeout(Duration::from_secs(10), shell.wait()).await;
                return Err(e);
            }
        };
        Ok(Self { shell, lifeline, server_pid, bin, url, service, bot })
    }

    /// The bots' URL, with the bot credentials in it.
    pub fn bot_url(&self) -> String {
        with_credentials(&self.url, &self.bot)
    }

    /// The service's URL, with the service credentials in it.
    pub fn service_url(&self) -> String {
        with_credentials(&self.url, &self.service)
    }

    /// The nats-server's process id.
    pub fn server_pid(&self) -> u32 {
        self.server_pid
    }

    /// Writes `nats.url` (no credentials) and `bot.url` (owner-only, with
    /// the bots' credentials) into `data_dir`.
    pub fn write_url_files(&self, data_dir: &Path) -> anyhow::Result<()> {
        std::fs::write(data_dir.join(URL_FILE), format!("{}\n", self.url))?;
        write_private(&data_dir.join(BOT_URL_FILE), format!("{}\n", self.bot_url()).as_bytes())
    }

    /// Stops the server gracefully (it flushes JetStream), killing it if it
    /// does not stop within 10 seconds.
    pub async fn stop(mut self) {
        drop(self.lifeline.take());
        if tokio::time::timeout(Duration::from_secs(10), self.shell.wait()).await.is_ok() {
            return;
        }
        tracing::warn!(pid = self.server_pid, "the embedded nats-server did not stop within 10 s; killing it");
        let _ = Command::new(&self.bin).arg("--signal").arg(format!("kill={}", self.server_pid)).status().await;
        let _ = self.shell.kill().await;
    }
}

fn with_credentials(url: &str, creds: &Credentials) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}:{}@{rest}", creds.user, creds.password),
        None => format!("{}:{}@{url}", creds.user, creds.password),
    }
}

fn server_conf(cfg: &EmbeddedConfig, dir: &Path, subjects: &Subjects, service: &Credentials, bot: &Credentials) -> String {
    let sync = match cfg.sync {
        Sync::Always => "always",
        Sync::Interval => "2m",
    };
    let prefix = &subjects.api_prefix;
    let requests = format!("{prefix}.>");
    let mapped_from = format!("{prefix}.*.*.*.*");
    let mapped_to = format!(
        "{}.{{{{partition({},1,2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}.{{{{wildcard(4)}}}}",
        subjects.partition_prefix,
        subjects.partitions.max(1)
    );
    let q = |s: &str| format!("{s:?}");
    format!(
        "# Written by baileys-store at start-up; edits are overwritten.\n\
         listen: \"127.0.0.1:{port}\"\n\
         max_payload: {max_payload}\n\
         pid_file: {pid}\n\
         ports_file_dir: {ports}\n\
         # No monitoring port.\n\
         jetstream {{\n  store_dir: {store}\n  sync_interval: {sync}\n}}\n\
         accounts {{\n\
         \x20 # The service: JetStream, and the request subjects exported to bots.\n\
         \x20 {svc_acct}: {{\n\
         \x20   jetstream: enabled\n\
         \x20   users: [ {{ user: {svc_user}, password: {svc_pw} }} ]\n\
         \x20   exports: [ {{ service: {requests} }} ]\n\
         \x20   mappings: {{ {mapped_from}: {mapped_to} }}\n\
         \x20 }}\n\
         \x20 # Bots: the request subjects, and the replies to their own requests.\n\
         \x20 {bot_acct}: {{\n\
         \x20   users: [ {{\n\
         \x20     user: {bot_user}, password: {bot_pw}\n\
         \x20     permissions: {{ publish: {{ allow: [{requests}] }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }}\n\
         \x20   }} ]\n\
         \x20   imports: [ {{ service: {{ account: {svc_acct}, subject: {requests} }} }} ]\n\
         \x20 }}\n\
         }}\n",
        port = cfg.port,
        max_payload = cfg.max_payload,
        pid = q(&dir.join("nats-server.pid").display().to_string()),
        ports = q(&dir.join("ports").display().to_string()),
        store = q(&dir.join("jetstream").display().to_string()),
        svc_acct = SERVICE_ACCOUNT,
        bot_acct = BOT_ACCOUNT,
        svc_user = q(&service.user),
        svc_pw = q(&service.password),
        bot_user = q(&bot.user),
        bot_pw = q(&bot.password),
        requests = q(&requests),
        mapped_from = q(&mapped_from),
        mapped_to = q(&mapped_to),
    )
}

/// Creates `dir` if needed and makes it owner-only (0700).
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("making {} owner-only", dir.display()))
}

/// Writes `contents` to `path`, owner-only (0600) before anything is written.
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.set_len(0)?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}

/// The password in `path`, generated (owner-only) if the file does not exist.
fn secret(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let pw = text.trim().to_owned();
            if pw.len() < 16 || !pw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                bail!("{} must hold one password of at least 16 characters of [A-Za-z0-9_-]", path.display());
            }
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(pw)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pw = crate::keys::random_hex(32);
            crate::keys::create_private(path, &format!("{pw}\n"))?;
            Ok(pw)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Waits for the ports file the server writes once it listens; returns its
/// pid and client URL.
async fn wait_for_port(shell: &mut Child, ports_dir: &Path, log: &Path) -> anyhow::Result<(u32, String)> {
    #[derive(serde::Deserialize)]
    struct Ports {
        nats: Vec<String>,
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        for entry in std::fs::read_dir(ports_dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("nats-server_").and_then(|n| n.strip_suffix(".ports")).and_then(|p| p.parse().ok()) else {
                continue;
            };
            if let Ok(text) = std::fs::read_to_string(entry.path())
                && let Ok(ports) = serde_json::from_str::<Ports>(&text)
                && let Some(url) = ports.nats.into_iter().next()
            {
                return Ok((pid, url));
            }
        }
        if let Some(status) = shell.try_wait()? {
            bail!("nats-server exited at start ({status}); the end of {}:\n{}", log.display(), log_tail(log));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nats-server did not come up within 30 s; the end of {}:\n{}", log.display(), log_tail(log))
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// A nats-server left by an earlier run (one from before the server was
/// tied to the service's life, or one whose supervising shell was killed
/// apart from it) still runs on the store: stop it before starting a new
/// one — but only if the pid still belongs to a nats-server, never an
/// unrelated process that reused it.
async fn stop_leftover(bin: &Path, pid_file: &Path) {
    let Ok(pid) = std::fs::read_to_string(pid_file) else { return };
    let pid = pid.trim();
    if !is_nats_server(pid) {
        return;
    }
    tracing::warn!(pid, "a nats-server from an earlier run is still running on this data dir; stopping it");
    let _ = Command::new(bin).arg("--signal").arg(format!("term={pid}")).status().await;
    let start = Instant::now();
    while is_nats_server(pid) && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `pid` is a live nats-server (a zombie has an empty command line).
fn is_nats_server(pid: &str) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).contains("nats-server")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_configuration_maps_partitions_and_separates_accounts() {
        let subjects = Subjects { api_prefix: "bstore".into(), partitions: 16, partition_prefix: "bstore-p".into() };
        let svc = Credentials { user: SERVICE_USER.into(), password: "s".repeat(20) };
        let bot = Credentials { user: BOT_USER.into(), password: "b".repeat(20) };
        let conf = server_conf(&EmbeddedConfig::default(), Path::new("/d"), &subjects, &svc, &bot);
        assert!(
            conf.contains(
                r#""bstore.*.*.*.*": "bstore-p.{{partition(16,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}.{{wildcard(4)}}""#
            ),
            "{conf}"
        );
        assert!(conf.contains(r#"exports: [ { service: "bstore.>" } ]"#), "{conf}");
        assert!(conf.contains(r#"imports: [ { service: { account: BSTORE, subject: "bstore.>" } } ]"#), "{conf}");
        assert!(!conf.contains("http"), "no monitoring port: {conf}");
        assert!(conf.contains("listen: \"127.0.0.1:4222\""), "{conf}");
    }

    #[test]
    fn urls_carry_credentials() {
        let c = Credentials { user: "bot".into(), password: "pw".into() };
        assert_eq!(with_credentials("nats://127.0.0.1:4222", &c), "nats://bot:pw@127.0.0.1:4222");
        assert!(!format!("{c:?}").contains("pw"), "passwords stay out of debug output");
    }

    #[test]
    fn secrets_are_generated_once_and_owner_only() {
        let dir = std::env::temp_dir().join(format!("bstore-secret-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let file = dir.join("x.password");
        let first = secret(&file).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(secret(&file).unwrap(), first, "an existing password is kept");
        std::fs::write(&file, "short\n").unwrap();
        assert!(secret(&file).is_err(), "a password that could break the configuration is refused");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
