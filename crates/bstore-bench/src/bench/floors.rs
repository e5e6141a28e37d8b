//! The floors: what the parts under the service cost alone on this machine.
//!
//! - NATS request-reply to a bare echo responder in this process (the
//!   transport of every baileys-store request).
//! - JetStream publish + ack on a stream of the same storage (what a write
//!   waits for).
//! - A Redis round trip (`PING`, and `SET` of a value of the same size) over
//!   a plain TCP connection speaking RESP: the round trip of a Redis-direct
//!   store, without any client library on top.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Answers every request on `bench-echo` with its own payload.
pub async fn spawn_echo(nc: &async_nats::Client) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut sub = nc.subscribe("bench-echo").await?;
    nc.flush().await?;
    let nc = nc.clone();
    Ok(tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = nc.publish(reply, m.payload).await;
            }
        }
    }))
}

/// A redis-server started for the benchmark on a free loopback port.
pub struct RedisServer {
    child: Child,
    dir: PathBuf,
    pub addr: String,
}

impl RedisServer {
    pub fn start(bin: &str, scratch: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = scratch.join("redis");
        std::fs::create_dir_all(&dir)?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bin} (install redis-server or pass --redis-url)"))?;
        let addr = format!("127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, dir, addr })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis://host:port[/db]` or `host:port` to `host:port`.
pub fn redis_addr(url: &str) -> String {
    let rest = url.strip_prefix("redis://").unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// One RESP connection; each call is one command and one reply.
pub struct Resp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Resp {
    pub async fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self { stream, buf: vec![0; 512] })
    }

    /// Sends `*N` bulk strings and reads a one-line reply (`+OK`, `+PONG`).
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<(), String> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&req).await.map_err(|e| e.to_string())?;
        let mut got = 0;
        loop {
            let n = self.stream.read(&mut self.buf[got..]).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("redis closed the connection".into());
            }
            got += n;
            if self.buf[..got].ends_with(b"\r\n") {
                break;
            }
        }
        match self.buf[0] {
            b'+' => Ok(()),
            _ => Err(String::from_utf8_lossy(&self.buf[..got]).into_owned()),
        }
    }
}
