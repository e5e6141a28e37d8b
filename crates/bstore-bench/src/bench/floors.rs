//! The floors: what the parts under the service cost alone on this machine.
//!
//! - NATS request-reply to a bare echo responder in this process (the
//!   transport of every baileys-store request).
//! - JetStream publish + ack on a stream of the same storage (what a write
//!   waits for).
//! - A Redis round trip (`PING`, and `SET` of a value of the same size) over
//!   a plain TCP connection speaking RESP: the round trip of a Redis-direct
//!   store, without any client library on top.

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

/// Creates, afresh, the stream the JetStream floor publishes to: the same
/// storage as the service's stream.
pub async fn floor_stream(js: &async_nats::jetstream::Context, memory: bool) -> anyhow::Result<()> {
    use async_nats::jetstream::stream::{Config, StorageType};
    let _ = js.delete_stream("BENCH_FLOOR").await;
    let storage = if memory { StorageType::Memory } else { StorageType::File };
    js.create_stream(Config { name: "BENCH_FLOOR".into(), subjects: vec!["bench-floor.>".into()], storage, ..Default::default() }).await?;
    Ok(())
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
