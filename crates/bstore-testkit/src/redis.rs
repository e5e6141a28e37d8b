//! A real redis-server.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::{TempDir, child, find_bin, free_port, wait_for};

/// A redis-server on a free loopback port with its own directory, without
/// persistence: a restart starts empty, as after losing a cache node.
pub struct RedisServer {
    dir: TempDir,
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with_bin(find_bin("REDIS_SERVER_BIN", ".tools/redis/bin/redis-server", "redis-server"))
    }

    /// Like [`RedisServer::start`] with a given redis-server binary.
    pub fn start_with_bin(bin: PathBuf) -> Self {
        let mut server = Self { dir: TempDir::new("redis"), bin, child: None, port: free_port() };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let dir = self.dir.path();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]).arg("--dir").arg(dir);
        let child = child::spawn_logged(cmd, &dir.join("redis.log"), "redis-server");
        self.child = Some(child);
        let port = self.port;
        wait_for(20, "redis-server to answer PING", || ping(port).then_some(()));
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        child::terminate(&mut self.child);
    }

    /// Starts a stopped server again on the same port (empty: no persistence).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        child::kill(&mut self.child);
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}
