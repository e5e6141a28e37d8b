//! A real redis-server: plain on loopback, or TLS-only with an ACL user
//! and throw-away certificates ([`TestCerts`]).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::{TempDir, TestCerts, child, find_bin, free_port, wait_for};

/// The ACL rule of the service's user in the secure server: its own keys,
/// the commands the projection sends, nothing dangerous. `docs/deploy.md`
/// recommends the same rule.
pub const SERVICE_ACL: &str = "~bstore:* resetchannels -@all +@connection +@read +@write +@scripting +@keyspace -@dangerous";

/// A redis-server on a free loopback port with its own directory, without
/// persistence: a restart starts empty, as after losing a cache node.
pub struct RedisServer {
    dir: TempDir,
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    secure: Option<Secure>,
}

/// TLS-only with one ACL user; the `default` user is off.
struct Secure {
    certs: TestCerts,
    user: String,
    password: String,
    require_client_cert: bool,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with_bin(find_bin("REDIS_SERVER_BIN", ".tools/redis/bin/redis-server", "redis-server"))
    }

    /// Like [`RedisServer::start`] with a given redis-server binary.
    pub fn start_with_bin(bin: PathBuf) -> Self {
        let mut server = Self { dir: TempDir::new("redis"), bin, child: None, port: free_port(), secure: None };
        server.spawn();
        server
    }

    /// A server that accepts only TLS (`--port 0`, `--tls-port`) and only
    /// the ACL user `user` with `password` (rule [`SERVICE_ACL`]; the
    /// `default` user is off). Its certificate, for `127.0.0.1` and
    /// `localhost`, is signed by a CA made for this server
    /// ([`RedisServer::tls_ca_file`]). With `require_client_cert` a client
    /// must also present a certificate signed by that CA
    /// ([`RedisServer::tls_client_cert`]).
    pub fn start_secure(user: &str, password: &str, require_client_cert: bool) -> Self {
        let bin = find_bin("REDIS_SERVER_BIN", ".tools/redis/bin/redis-server", "redis-server");
        let dir = TempDir::new("redis-tls");
        let certs = TestCerts::generate();
        let acl = format!("user default off\nuser {user} on >{password} {SERVICE_ACL}\n");
        std::fs::write(dir.path().join("users.acl"), acl).unwrap();
        let secure = Secure { certs, user: user.to_owned(), password: password.to_owned(), require_client_cert };
        let mut server = Self { dir, bin, child: None, port: free_port(), secure: Some(secure) };
        server.spawn();
        server
    }

    /// The CA that signed the secure server's certificate (PEM).
    pub fn tls_ca_file(&self) -> PathBuf {
        self.certs().ca()
    }

    /// A client certificate and its key (PEM) signed by the secure server's CA.
    pub fn tls_client_cert(&self) -> (PathBuf, PathBuf) {
        (self.certs().client_cert(), self.certs().client_key())
    }

    fn certs(&self) -> &TestCerts {
        &self.secure.as_ref().expect("a secure server (start_secure)").certs
    }

    fn spawn(&mut self) {
        let dir = self.dir.path();
        let log = dir.join("redis.log");
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]).arg("--dir").arg(dir);
        match &self.secure {
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
            Some(secure) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()]);
                cmd.arg("--tls-cert-file").arg(secure.certs.server_cert()).arg("--tls-key-file").arg(secure.certs.server_key());
                cmd.arg("--tls-ca-cert-file").arg(secure.certs.ca());
                cmd.args(["--tls-auth-clients", if secure.require_client_cert { "yes" } else { "optional" }]);
                cmd.arg("--aclfile").arg(dir.join("users.acl"));
            }
        }
        let starts = std::fs::read_to_string(&log).unwrap_or_default().matches("Ready to accept connections").count();
        let child = child::spawn_logged(cmd, &log, "redis-server");
        self.child = Some(child);
        let port = self.port;
        if self.secure.is_none() {
            wait_for(20, "redis-server to answer PING", || ping(port).then_some(()));
        } else {
            // A TLS port answers no plain PING: wait for the log line and
            // the listening port.
            wait_for(20, "redis-server to accept TLS connections", || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                (text.matches("Ready to accept connections").count() > starts && TcpStream::connect(("127.0.0.1", port)).is_ok())
                    .then_some(())
            });
        }
    }

    /// The client URL: `redis://127.0.0.1:<port>/`, or for a secure server
    /// `rediss://<user>:<password>@127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        match &self.secure {
            None => format!("redis://127.0.0.1:{}/", self.port),
            Some(s) => format!("rediss://{}:{}@127.0.0.1:{}/", s.user, s.password, self.port),
        }
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
