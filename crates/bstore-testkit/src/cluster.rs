//! A real three-node nats-server cluster with JetStream, on loopback.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::{TempDir, child, find_bin, wait_for};

/// Three nats-server processes routed to each other (one `cluster {}` with
/// `routes`), each with its own ports and store directory. Nodes can be
/// killed, stopped and started again on the same ports and store.
pub struct NatsCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// Configuration text appended to every node's file (mappings, accounts).
    extra: String,
}

struct Node {
    dir: TempDir,
    child: Option<Child>,
    port: u16,
    cluster_port: u16,
    monitor: u16,
}

/// Nodes in a cluster.
const NODES: usize = 3;

impl NatsCluster {
    /// Starts three nodes and waits until every one of them knows the
    /// JetStream meta leader.
    pub fn start() -> Self {
        Self::start_conf("")
    }

    /// Like [`NatsCluster::start`], with `extra` appended to every node's
    /// configuration (subject mappings, accounts).
    pub fn start_conf(extra: &str) -> Self {
        let bin = find_bin("NATS_SERVER_BIN", ".tools/nats/bin/nats-server", "nats-server");
        // Every port is chosen before any server starts (routes name them
        // all); the listeners are held together so no two picks collide.
        let listeners: Vec<TcpListener> = (0..NODES * 3).map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a free port")).collect();
        let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().expect("local address").port()).collect();
        drop(listeners);
        let nodes = (0..NODES)
            .map(|i| Node {
                dir: TempDir::new(&format!("nats-cluster-{i}")),
                child: None,
                port: ports[i * 3],
                cluster_port: ports[i * 3 + 1],
                monitor: ports[i * 3 + 2],
            })
            .collect();
        let mut cluster = Self { bin, nodes, extra: extra.to_owned() };
        for i in 0..NODES {
            cluster.spawn(i);
        }
        cluster.wait_ready();
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("\"nats-route://127.0.0.1:{}\"", n.cluster_port))
            .collect();
        let node = &mut self.nodes[i];
        let dir = node.dir.path();
        let conf = format!(
            "server_name: \"n{i}\"\nlisten: \"127.0.0.1:{}\"\nhttp: \"127.0.0.1:{}\"\nmax_payload: 8388608\n\
             jetstream {{ store_dir: {:?} }}\n\
             cluster {{\n  name: \"bstore-it\"\n  listen: \"127.0.0.1:{}\"\n  routes: [ {} ]\n}}\n{}\n",
            node.port,
            node.monitor,
            dir.join("js").display().to_string(),
            node.cluster_port,
            routes.join(", "),
            self.extra
        );
        std::fs::write(dir.join("nats.conf"), conf).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c").arg(dir.join("nats.conf"));
        node.child = Some(child::spawn_logged(cmd, &dir.join("nats.log"), "nats-server"));
    }

    /// Waits (up to 30 s) until every running node passes its full health
    /// check and names the same JetStream meta leader, itself a running node (after
    /// the leader was killed, the others elect a new one within seconds).
    pub fn wait_ready(&self) {
        let running: Vec<String> = (0..self.nodes.len()).filter(|i| self.is_running(*i)).map(|i| format!("n{i}")).collect();
        wait_for(30, "the NATS cluster to have a JetStream meta leader", || {
            let mut leader = None;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                // The full health check: JetStream on, current with the
                // meta leader, and every stream and consumer of this node
                // current.
                if http_get(node.monitor, "/healthz").is_none_or(|(code, _)| code != 200) {
                    return None;
                }
                let this = meta_leader(node.monitor)?;
                if leader.get_or_insert_with(|| this.clone()) != &this {
                    return None;
                }
            }
            leader.filter(|l| running.contains(l)).map(|_| ())
        });
    }

    /// The server name of node `i` (`n0`, `n1`, `n2`), as JetStream names
    /// leaders and replicas.
    pub fn name(&self, i: usize) -> String {
        format!("n{i}")
    }

    /// The client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The client URLs of every node, node 0 first.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// The monitoring port of node `i` (`/healthz`, `/jsz`, `/varz`).
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.nodes[i].monitor
    }

    /// Node `i`'s own directory (config, log, store).
    pub fn dir(&self, i: usize) -> &Path {
        self.nodes[i].dir.path()
    }

    /// SIGKILL of node `i`: no shutdown work at all.
    pub fn kill(&mut self, i: usize) {
        child::kill(&mut self.nodes[i].child);
    }

    /// SIGTERM of node `i`, waiting for its exit.
    pub fn stop(&mut self, i: usize) {
        child::terminate(&mut self.nodes[i].child);
    }

    /// Starts a stopped or killed node again on the same ports and store,
    /// and waits until the cluster has a meta leader again.
    pub fn start_again(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is already running");
        self.spawn(i);
        self.wait_ready();
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            child::kill(&mut node.child);
        }
    }
}

/// The meta leader's name as node `monitor` sees it, if it knows one.
fn meta_leader(monitor: u16) -> Option<String> {
    let (code, body) = http_get(monitor, "/jsz")?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let leader = v["meta_cluster"]["leader"].as_str()?;
    (!leader.is_empty()).then(|| leader.to_owned())
}

/// A plain HTTP/1.0 GET on loopback: status code and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}
