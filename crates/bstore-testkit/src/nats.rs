//! A real nats-server with JetStream.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};

use crate::{TempDir, child, find_bin, wait_for};

/// A nats-server on a free loopback port with its own store directory.
pub struct NatsServer {
    dir: TempDir,
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    monitor: u16,
    /// Configuration text appended to the generated file (accounts,
    /// authorization, TLS, mappings).
    extra: String,
}

impl NatsServer {
    /// Starts a server and waits until JetStream is ready.
    pub fn start() -> Self {
        Self::start_conf("")
    }

    /// Starts a server whose configuration file ends with `extra` (accounts,
    /// authorization, TLS, mappings). `extra` may name files under
    /// [`NatsServer::dir`] only after the start, so write such files
    /// elsewhere first.
    pub fn start_conf(extra: &str) -> Self {
        let bin = find_bin("NATS_SERVER_BIN", ".tools/nats/bin/nats-server", "nats-server");
        let mut server = Self { dir: TempDir::new("nats"), bin, child: None, port: 0, monitor: 0, extra: extra.to_owned() };
        server.spawn();
        server
    }

    /// The server's own directory (config, log, store).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let dir = self.dir.path();
        let ports_dir = dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        // First start: free ports picked by the server. Restarts: the same
        // ports, as a real restart would have.
        let (port, monitor) =
            if self.port == 0 { ("-1".to_string(), "-1".to_string()) } else { (self.port.to_string(), self.monitor.to_string()) };
        let conf = format!(
            "listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\nmax_payload: 8388608\nports_file_dir: {:?}\njetstream {{ store_dir: {:?} }}\n{}\n",
            ports_dir.display().to_string(),
            dir.join("js").display().to_string(),
            self.extra
        );
        std::fs::write(dir.join("nats.conf"), conf).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c").arg(dir.join("nats.conf"));
        let child = child::spawn_logged(cmd, &dir.join("nats.log"), "nats-server");
        let pid = child.id();
        self.child = Some(child);
        let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let ports: serde_json::Value = wait_for(20, "nats-server ports file", || {
            std::fs::read_to_string(&ports_file).ok().and_then(|t| serde_json::from_str(&t).ok())
        });
        let port_of = |key: &str| -> u16 {
            let url = ports[key][0].as_str().expect("a port");
            url.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap()
        };
        self.port = port_of("nats");
        self.monitor = port_of("monitoring");
        let monitor = self.monitor;
        wait_for(20, "JetStream ready", || healthz(monitor).then_some(()));
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server gracefully.
    pub fn stop(&mut self) {
        child::terminate(&mut self.child);
    }

    /// Kills the server with SIGKILL.
    pub fn kill(&mut self) {
        child::kill(&mut self.child);
    }

    /// Starts the server again on the same ports and store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts a stopped server again.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.spawn();
    }

    /// The JetStream store directory, to scan for plaintext.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn healthz(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let req = "GET /healthz?js-enabled-only=true HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200")
}
