//! Real servers for tests (nats-server, redis-server, a MongoDB-compatible
//! server, the service itself), started on free loopback ports with their own
//! directories and removed on drop — the way async-nats's own tests run
//! nats-server. Nothing here imitates a server.
//!
//! Binaries are found through environment variables first (set by
//! `.ci/run`), then the project's `.tools/` folder, then `PATH`.

mod child;
mod cluster;
mod mongo;
mod nats;
mod process;
mod redis;
mod tls;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

pub use cluster::NatsCluster;
pub use mongo::MongoServer;
pub use nats::NatsServer;
pub use process::ServiceProcess;
pub use redis::RedisServer;
pub use tls::TestCerts;

/// A directory removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory under the system's temp dir.
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("bstore-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("BSTORE_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// Finds a binary: `$env_var`, then `<repo>/<local>`, then `PATH`.
pub fn find_bin(env_var: &str, local: &str, name: &str) -> PathBuf {
    try_find_bin(env_var, local, name).unwrap_or_else(|| panic!("{name} not found: run scripts/setup (or set {env_var})"))
}

/// Like [`find_bin`], for callers that can do without the binary.
pub fn try_find_bin(env_var: &str, local: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Some(PathBuf::from(p));
    }
    let local = repo_root().join(local);
    if local.exists() {
        return Some(local);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// A loopback port that was free a moment ago: bound to port 0, then
/// released for the server to take.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

/// Sends SIGTERM to a process.
pub fn sigterm(pid: u32) {
    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `secs`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed().as_secs() < secs, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
