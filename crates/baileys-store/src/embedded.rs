//! The embedded default: a private nats-server with JetStream under the data
//! directory, started and stopped with the service.
//!
//! It is a real nats-server process, not an in-process imitation: the
//! service talks to it exactly as it would to a cluster, and bots on the
//! same machine connect to it on loopback.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::config::{EmbeddedConfig, Sync};

/// A running private nats-server.
pub struct EmbeddedNats {
    child: Child,
    bin: PathBuf,
    /// The client URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
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
    /// Starts the server with its store under `dir` and waits until it
    /// accepts clients.
    pub async fn start(cfg: &EmbeddedConfig, dir: &Path) -> anyhow::Result<Self> {
        let bin = find_server_bin(cfg)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let pid_file = dir.join("nats-server.pid");
        stop_leftover(&bin, &pid_file).await;
        let ports_dir = dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)?;
        let sync = match cfg.sync {
            Sync::Always => "always",
            Sync::Interval => "2m",
        };
        let conf = format!(
            "# Written by baileys-store at start-up; edits are overwritten.\n\
             listen: \"127.0.0.1:{port}\"\n\
             max_payload: {max_payload}\n\
             pid_file: {pid:?}\n\
             ports_file_dir: {ports:?}\n\
             jetstream {{\n  store_dir: {store:?}\n  sync_interval: {sync}\n}}\n",
            port = cfg.port,
            max_payload = cfg.max_payload,
            pid = pid_file.display().to_string(),
            ports = ports_dir.display().to_string(),
            store = dir.join("jetstream").display().to_string(),
        );
        let conf_path = dir.join("nats-server.conf");
        std::fs::write(&conf_path, conf)?;
        let log = std::fs::File::create(dir.join("nats-server.log"))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf_path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("nats-server exited at once")?;
        let url = wait_for_port(&ports_dir, pid, &dir).await?;
        Ok(Self { child, bin, url })
    }

    /// Stops the server gracefully (it flushes JetStream), killing it if it
    /// does not stop within 10 seconds.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new(&self.bin).arg("--signal").arg(format!("term={pid}")).status().await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_ok() {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

async fn wait_for_port(ports_dir: &Path, pid: u32, dir: &Path) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct Ports {
        nats: Vec<String>,
    }
    let file = ports_dir.join(format!("nats-server_{pid}.ports"));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(ports) = serde_json::from_str::<Ports>(&text)
            && let Some(url) = ports.nats.into_iter().next()
        {
            return Ok(url);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nats-server did not come up within 30 s; see {}", dir.join("nats-server.log").display())
}

/// A service killed with SIGKILL leaves its nats-server running on the
/// store. Before starting a new one, stop that one — but only if the pid
/// still belongs to a nats-server, never an unrelated process that reused it.
async fn stop_leftover(bin: &Path, pid_file: &Path) {
    let Ok(pid) = std::fs::read_to_string(pid_file) else { return };
    let pid = pid.trim();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("nats-server") {
        return;
    }
    tracing::warn!(pid, "a nats-server from an earlier run is still running on this data dir; stopping it");
    let _ = Command::new(bin).arg("--signal").arg(format!("term={pid}")).status().await;
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
