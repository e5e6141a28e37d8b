//! The lease keeper: acquires, renews and hands over partition leases.
//!
//! One KV bucket (`cluster.bucket`) holds a key `p.<n>` per partition whose
//! value is the owning instance's id, and a key `m.<instance>` per live
//! instance. The bucket's `max_age` is the lease TTL: an entry that is not
//! rewritten for that long disappears on the server, and with it the lease
//! (per-key TTLs would apply only on create, not on the renewals).
//!
//! - **Acquire**: `create("p.<n>")`, which succeeds only if the key is absent
//!   or deleted. The revision it returns is the partition's fencing epoch.
//! - **Renew**: every renew interval, `update("p.<n>", rev)`; a wrong
//!   revision means the lease was lost (it expired and someone else took it).
//! - **Validity**: the holder serves a partition only until
//!   `sent + ttl − margin`, where `sent` is when it sent the last successful
//!   renewal — by its own monotonic clock. The server cannot expire the key
//!   before `received + ttl ≥ sent + ttl`, so the holder's validity always
//!   ends at least `margin` before anyone else can acquire the partition.
//! - **Hand-over**: to give a partition up (another instance has too few),
//!   the keeper closes the gate, has the sessions of the partition drained
//!   and dropped ([`Handover::release`]), keeps renewing meanwhile, and only
//!   then deletes the key, which the others see at once through their watch.
//! - **Loss**: a lease not renewed in time closes its gate by itself; the
//!   keeper then drops the partition's sessions.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::plan::{Action, PartView, View, plan};
use crate::{ClusterConfig, Ownership};

/// A boxed future, for the hand-over callbacks.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the layers above do when a partition comes or goes.
pub trait Handover: Send + Sync + 'static {
    /// Partition `p` was acquired and its gate is open: start taking its
    /// requests (subscribe to its subject).
    fn acquired(&self, p: u32) -> BoxFuture;
    /// The gate of `p` is closed: stop taking its requests, drop its
    /// sessions from memory, and resolve once none of them is running.
    fn release(&self, p: u32) -> BoxFuture;
}

/// Why the keeper could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the lease bucket: {0}")]
pub struct LeaseError(String);

struct Held {
    rev: u64,
    epoch: u64,
    until: Instant,
    /// Being handed over: renewed, but the gate stays closed.
    releasing: bool,
}

/// The running keeper.
pub struct Leases {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// What the watch has seen, with the instant it saw each entry.
#[derive(Default)]
struct Seen {
    parts: HashMap<u32, (String, bool, Instant)>,
    members: HashMap<String, Instant>,
}

impl Leases {
    /// Opens (or creates) the bucket and starts keeping leases for
    /// `ownership`. With `reset`, every lease is dropped first — only for a
    /// NATS server this process started itself, where no other instance can
    /// hold one.
    pub async fn start(
        js: jetstream::Context,
        cfg: ClusterConfig,
        replicas: usize,
        ownership: Ownership,
        handover: Arc<dyn Handover>,
        reset: bool,
    ) -> Result<Self, LeaseError> {
        let kv_cfg = kv::Config {
            bucket: cfg.bucket.clone(),
            description: "baileys-store partition leases".into(),
            history: 1,
            max_age: cfg.lease_ttl,
            num_replicas: replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        if reset {
            let _ = js.delete_key_value(&cfg.bucket).await;
        }
        let store = match js.get_key_value(&cfg.bucket).await {
            Ok(store) => {
                let mut stream = store.stream.clone();
                let have = stream.info().await.map_err(|e| LeaseError(e.to_string()))?.config.max_age;
                if have != cfg.lease_ttl {
                    js.update_key_value(kv_cfg).await.map_err(|e| LeaseError(e.to_string()))?;
                }
                store
            }
            Err(_) => js.create_key_value(kv_cfg).await.map_err(|e| LeaseError(e.to_string()))?,
        };
        let (stop, stop_rx) = watch::channel(false);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (wake_tx, wake_rx) = mpsc::channel(16);
        tokio::spawn(watch_bucket(store.clone(), seen.clone(), wake_tx, stop_rx.clone()));
        let first_round = cfg.lease_ttl;
        let keeper = Keeper { store, cfg, ownership, handover, held: BTreeMap::new(), seen };
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(keeper.run(stop_rx, wake_rx, first_tx));
        // Returns once the first round has taken what was free, so that an
        // instance announces itself ready holding its partitions (bounded:
        // an unreachable bucket must not hold the start up for long).
        let _ = tokio::time::timeout(first_round, first_rx).await;
        Ok(Self { stop, task })
    }

    /// Hands every partition over (drains, then deletes each lease and the
    /// membership), so that the others take them at once.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

struct Keeper {
    store: kv::Store,
    cfg: ClusterConfig,
    ownership: Ownership,
    handover: Arc<dyn Handover>,
    held: BTreeMap<u32, Held>,
    seen: Arc<Mutex<Seen>>,
}

fn part_key(p: u32) -> String {
    format!("p.{p}")
}

impl Keeper {
    fn member_key(&self) -> String {
        format!("m.{}", self.ownership.instance())
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>, mut wake: mpsc::Receiver<()>, first: tokio::sync::oneshot::Sender<()>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u32>();
        self.tick(&done_tx).await;
        let _ = first.send(());
        // The first round ran just above; the next one is a renew interval on.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + self.cfg.renew_interval, self.cfg.renew_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => self.tick(&done_tx).await,
                Some(()) = wake.recv() => self.balance(&done_tx).await,
                Some(p) = done_rx.recv() => self.released(p).await,
            }
        }
        self.shutdown().await;
    }

    async fn tick(&mut self, done: &mpsc::UnboundedSender<u32>) {
        let me = self.ownership.instance().as_bytes().to_vec();
        if let Err(e) = self.store.put(self.member_key(), Bytes::from(me.clone())).await {
            tracing::debug!(error = %e, "could not announce this instance in the lease bucket");
        }
        let mut lost = Vec::new();
        let valid_for = self.cfg.valid_for();
        for (&p, held) in self.held.iter_mut() {
            let sent = Instant::now();
            match self.store.update(part_key(p), Bytes::from(me.clone()), held.rev).await {
                Ok(rev) => {
                    held.rev = rev;
                    held.until = sent + valid_for;
                    if !held.releasing {
                        self.ownership.grant(p, held.epoch, held.until);
                    }
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(partition = p, "partition lease lost: it expired and was taken over");
                    lost.push(p);
                }
                Err(e) => tracing::warn!(partition = p, error = %e, "could not renew a partition lease; it stays valid until its margin"),
            }
        }
        let now = Instant::now();
        for (&p, held) in &self.held {
            if now >= held.until && !lost.contains(&p) {
                tracing::warn!(partition = p, "partition lease not renewed in time; no longer serving it");
                lost.push(p);
            }
        }
        for p in lost {
            self.held.remove(&p);
            self.ownership.revoke(p);
            // Sessions are dropped in the background; their gate is closed
            // already, so none of them answers meanwhile.
            tokio::spawn(self.handover.release(p));
        }
        self.balance(done).await;
    }

    fn view(&self) -> View {
        let seen = self.seen.lock().expect("not poisoned");
        let now = Instant::now();
        let parts = (0..self.ownership.partitions())
            .map(|p| seen.parts.get(&p).map(|(owner, held, at)| PartView { owner: owner.clone(), held: *held, age: now - *at }))
            .collect();
        let members = seen.members.iter().map(|(m, at)| (m.clone(), now - *at)).collect();
        View { parts, members }
    }

    async fn balance(&mut self, done: &mpsc::UnboundedSender<u32>) {
        let mine: Vec<u32> = self.held.iter().filter(|(_, h)| !h.releasing).map(|(p, _)| *p).collect();
        match plan(&self.view(), self.ownership.instance(), &mine, self.cfg.lease_ttl) {
            Action::Stay => {}
            Action::Acquire(ps) => {
                let mut got = Vec::new();
                for p in ps {
                    if self.try_acquire(p).await {
                        got.push(p);
                    }
                }
                if !got.is_empty() {
                    tracing::info!(partitions = ?got, held = self.held.len(), "partitions acquired");
                }
            }
            Action::Release(p) => {
                let Some(held) = self.held.get_mut(&p) else { return };
                held.releasing = true;
                self.ownership.revoke(p);
                tracing::info!(partition = p, "handing a partition over to balance the cluster");
                let (release, done) = (self.handover.release(p), done.clone());
                tokio::spawn(async move {
                    release.await;
                    let _ = done.send(p);
                });
            }
        }
    }

    async fn try_acquire(&mut self, p: u32) -> bool {
        let sent = Instant::now();
        match self.store.create(part_key(p), Bytes::from(self.ownership.instance().as_bytes().to_vec())).await {
            Ok(rev) => {
                let until = sent + self.cfg.valid_for();
                self.held.insert(p, Held { rev, epoch: rev, until, releasing: false });
                self.ownership.grant(p, rev, until);
                tracing::debug!(partition = p, epoch = rev, "partition acquired");
                self.handover.acquired(p).await;
                true
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
            Err(e) => {
                tracing::debug!(partition = p, error = %e, "could not acquire a partition");
                false
            }
        }
    }

    /// The sessions of a partition being handed over are drained: give up
    /// the lease.
    async fn released(&mut self, p: u32) {
        let Some(held) = self.held.remove(&p) else { return };
        if let Err(e) = self.store.delete_expect_revision(part_key(p), Some(held.rev)).await {
            tracing::debug!(partition = p, error = %e, "could not delete a handed-over lease; it expires by itself");
        }
        tracing::debug!(partition = p, "partition handed over");
    }

    async fn shutdown(&mut self) {
        let parts: Vec<u32> = self.held.keys().copied().collect();
        for p in &parts {
            self.ownership.revoke(*p);
        }
        let drains: Vec<_> = parts.iter().map(|p| self.handover.release(*p)).collect();
        let _ = tokio::time::timeout(Duration::from_secs(15), futures_util::future::join_all(drains)).await;
        for p in &parts {
            self.released(*p).await;
        }
        if !parts.is_empty() {
            tracing::info!(partitions = ?parts, "partitions handed over");
        }
        let _ = self.store.delete(self.member_key()).await;
    }
}

/// Keeps `seen` up to date from a watch of the whole bucket, and wakes the
/// keeper when a lease is given up (so a handed-over partition is taken at
/// once rather than at the next tick). Re-watches after an error.
async fn watch_bucket(store: kv::Store, seen: Arc<Mutex<Seen>>, wake: mpsc::Sender<()>, mut stop: watch::Receiver<bool>) {
    loop {
        let mut w = match store.watch_all().await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch the lease bucket; retrying");
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = stop.changed() => return,
                next = w.next() => next,
            };
            let entry = match next {
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "lease watch failed; watching again");
                    break;
                }
                None => break,
            };
            let held = entry.operation == kv::Operation::Put;
            let owner = String::from_utf8_lossy(&entry.value).into_owned();
            // When the entry was written, as far as the clocks agree: an old
            // entry delivered first by a new watch is not taken for fresh.
            // Only a hint — taking a lease is a create that fails if held.
            let written = std::time::SystemTime::from(entry.created);
            let age = std::time::SystemTime::now().duration_since(written).unwrap_or_default();
            let now = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let mut s = seen.lock().expect("not poisoned");
            if let Some(p) = entry.key.strip_prefix("p.").and_then(|n| n.parse::<u32>().ok()) {
                s.parts.insert(p, (owner, held, now));
                if !held {
                    let _ = wake.try_send(());
                }
            } else if let Some(m) = entry.key.strip_prefix("m.") {
                if held {
                    s.members.insert(m.to_owned(), now);
                } else {
                    s.members.remove(m);
                    let _ = wake.try_send(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
