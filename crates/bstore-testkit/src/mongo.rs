//! A real MongoDB-wire-compatible server (SecantusDB, installed by
//! `scripts/setup --test`; `MONGO_SERVER_BIN` points elsewhere).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::{TempDir, child, find_bin, free_port, wait_for};

/// A Mongo-compatible server on a free loopback port with its own storage.
/// Its data survives [`MongoServer::stop`] and [`MongoServer::start_again`].
pub struct MongoServer {
    dir: TempDir,
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
}

impl MongoServer {
    /// Starts a server and waits until it answers a `ping` command.
    pub fn start() -> Self {
        let bin = find_bin("MONGO_SERVER_BIN", ".tools/secantus/bin/secantusd-py", "secantusd-py");
        let mut server = Self { dir: TempDir::new("mongo"), bin, child: None, port: free_port() };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let dir = self.dir.path();
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string(), "--log-level", "WARNING"]).arg("--storage-path").arg(&data);
        let child = child::spawn_logged(cmd, &dir.join("mongo.log"), "the Mongo-compatible server");
        self.child = Some(child);
        let port = self.port;
        wait_for(60, "the Mongo-compatible server to answer ping", || ping(port).then_some(()));
    }

    /// The client URL. Retryable writes are off: the test server slows down
    /// with them, and every write here is idempotent anyway.
    pub fn url(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?retryWrites=false&directConnection=true", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        child::terminate(&mut self.child);
    }

    /// Starts a stopped server again on the same port and storage.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.spawn();
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        // A graceful stop lets it close its storage; it gets five seconds.
        child::terminate_within(&mut self.child, Duration::from_secs(5));
    }
}

/// Sends `{ping: 1, $db: "admin"}` as an OP_MSG and checks for an `ok: 1`
/// reply, without a driver.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut doc = Vec::new();
    doc.extend_from_slice(&[0; 4]);
    doc.push(0x10);
    doc.extend_from_slice(b"ping\0");
    doc.extend_from_slice(&1i32.to_le_bytes());
    doc.push(0x02);
    doc.extend_from_slice(b"$db\0");
    doc.extend_from_slice(&6i32.to_le_bytes());
    doc.extend_from_slice(b"admin\0");
    doc.push(0);
    let len = doc.len() as i32;
    doc[..4].copy_from_slice(&len.to_le_bytes());
    let mut msg = Vec::new();
    let total = 16 + 4 + 1 + doc.len();
    msg.extend_from_slice(&(total as i32).to_le_bytes());
    msg.extend_from_slice(&1i32.to_le_bytes()); // request id
    msg.extend_from_slice(&0i32.to_le_bytes()); // response to
    msg.extend_from_slice(&2013i32.to_le_bytes()); // OP_MSG
    msg.extend_from_slice(&0u32.to_le_bytes()); // flags
    msg.push(0); // section kind: body
    msg.extend_from_slice(&doc);
    if s.write_all(&msg).is_err() {
        return false;
    }
    let mut header = [0u8; 16];
    if s.read_exact(&mut header).is_err() {
        return false;
    }
    let total = i32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    if !(21..1 << 20).contains(&total) {
        return false;
    }
    let mut body = vec![0u8; total - 16];
    if s.read_exact(&mut body).is_err() {
        return false;
    }
    // The reply's `ok` field: type 0x01 (double) named "ok", value 1.0.
    let mut ok = vec![0x01];
    ok.extend_from_slice(b"ok\0");
    ok.extend_from_slice(&1.0f64.to_le_bytes());
    body.windows(ok.len()).any(|w| w == ok.as_slice())
}
