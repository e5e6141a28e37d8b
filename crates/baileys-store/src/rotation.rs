//! Which key seals, decided once for the whole cluster.
//!
//! A key is rotated in two steps, because an instance that seals under a
//! key another instance lacks makes that one answer 520 for the data:
//!
//! 1. the new key is added to every instance's keys (restarted one at a
//!    time): it opens, nothing is sealed under it yet;
//! 2. `baileys-store rotate-key <id>` makes it current, which it does only
//!    once every live instance reports holding that very key.
//!
//! The current key is a record in the JetStream KV bucket [`META_BUCKET`]
//! (key [`CURRENT_KEY`]), not "the highest id in my config". Every process
//! that seals ([`join`]: `serve` and `materialize`) adopts the record at
//! start — and refuses to start when its ring lacks that key — then watches
//! it and switches its ring ([`Keyring::set_current`]) when it changes, if
//! its ring holds the new key (otherwise it logs an error and keeps sealing
//! under the old one). With no record yet, the first to start records the
//! highest id of its ring. `keys.current` in the config pins an instance to
//! a key instead.
//!
//! Each such process also announces its ring in [`RINGS_BUCKET`] (a bucket
//! whose entries expire [`RINGS_TTL`] after their last renewal): the ids,
//! a check value per key, the key it seals under and where its index key
//! comes from — never key material. `rotate-key` and `keys status` read
//! those announcements.
//!
//! A process announces its ring *before* it reads the record, and
//! `rotate-key` reads the announcements again *after* writing it: a process
//! starting meanwhile either is seen by that second look (and the rotation
//! is undone) or reads the new record (and refuses to start if it lacks the
//! key). Either way no instance keeps serving with a ring that lacks the
//! key the others seal under.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use bstore_codec::{Codec, Keyring};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::Config;

/// The bucket holding the cluster-wide record of the current key.
pub const META_BUCKET: &str = "BSTORE_META";
/// The key of that record in [`META_BUCKET`].
pub const CURRENT_KEY: &str = "seal.current";
/// The bucket where each running process announces its keyring.
pub const RINGS_BUCKET: &str = "BSTORE_KEYRINGS";
/// How long an announcement lives after its last renewal: a process that
/// died stops counting as live after at most this.
pub const RINGS_TTL: Duration = Duration::from_secs(10);
/// How often a process renews its announcement.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);

/// The record of which key seals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentRecord {
    /// The id of the sealing key.
    pub id: u32,
    /// When it was recorded (milliseconds since the epoch).
    pub at_ms: u64,
    /// Who recorded it: `rotate-key`, or the instance that started first.
    pub by: String,
    /// Whether sessions get data keys of their own (format-2 blobs, which
    /// releases before data keys cannot open): on from the first start of
    /// a new cluster; on an upgraded one, once `keys enable-data-keys` has
    /// seen every live process read them. Absent in records of earlier
    /// releases: off.
    #[serde(default)]
    pub data_keys: bool,
}

/// What a running process announces about its keyring. No key material:
/// ids, check values ([`Keyring::fingerprint`]) and choices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingReport {
    /// The process's instance id (as in the lease bucket).
    pub instance: String,
    /// `serve` or `materialize`.
    pub role: String,
    /// Every key id of its ring with the key's check value.
    pub keys: BTreeMap<u32, String>,
    /// The key it seals under now.
    pub current: u32,
    /// Whether `keys.current` pins it (it then ignores the record).
    pub pinned: bool,
    /// Whether its index key is pinned (an `index:` entry).
    pub index_pinned: bool,
    /// The key its index key is derived from, when not pinned.
    pub index_from: Option<u32>,
    /// The check value of its index key: every instance must show the same.
    pub index_fingerprint: String,
    /// Its release.
    pub version: String,
    /// Whether it opens blobs sealed under sessions' data keys (absent in
    /// announcements of earlier releases: no).
    #[serde(default)]
    pub data_keys: bool,
}

impl RingReport {
    /// The report of `ring`.
    pub fn of(instance: &str, role: &str, ring: &Keyring, pinned: bool) -> Self {
        Self {
            instance: instance.to_owned(),
            role: role.to_owned(),
            keys: ring.ids().into_iter().map(|id| (id, ring.fingerprint(id).expect("an id of the ring"))).collect(),
            current: ring.current(),
            pinned,
            index_pinned: ring.index_pinned(),
            index_from: ring.index_source(),
            index_fingerprint: ring.index_fingerprint(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            data_keys: true,
        }
    }
}

/// The two buckets.
#[derive(Clone)]
pub struct Meta {
    meta: kv::Store,
    rings: kv::Store,
}

impl Meta {
    /// Opens both buckets, creating them when missing.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> anyhow::Result<Self> {
        let meta = open_bucket(
            js,
            kv::Config {
                bucket: META_BUCKET.into(),
                description: "baileys-store cluster records: which key seals (seal.current)".into(),
                history: 16,
                num_replicas: replicas.max(1),
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        let rings = open_bucket(
            js,
            kv::Config {
                bucket: RINGS_BUCKET.into(),
                description: "baileys-store keyrings of the running instances (ids and check values, no keys)".into(),
                history: 1,
                max_age: RINGS_TTL,
                num_replicas: replicas.max(1),
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        Ok(Self { meta, rings })
    }

    /// Both buckets if they exist (no process of this release ever ran
    /// otherwise): for tools that only look.
    pub async fn attach(js: &jetstream::Context) -> Option<Self> {
        let meta = js.get_key_value(META_BUCKET).await.ok()?;
        let rings = js.get_key_value(RINGS_BUCKET).await.ok()?;
        Some(Self { meta, rings })
    }

    /// The record of the current key with its revision, if there is one.
    pub async fn current(&self) -> anyhow::Result<Option<(CurrentRecord, u64)>> {
        let entry = self.meta.entry(CURRENT_KEY).await.context("reading the current-key record")?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = serde_json::from_slice(&e.value).context("the current-key record does not parse")?;
                Ok(Some((record, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Writes the record: creates it when `revision` is `None`, otherwise
    /// updates it only if it is still at `revision` (two rotations at once:
    /// one of them fails).
    pub async fn set_current(&self, record: &CurrentRecord, revision: Option<u64>) -> anyhow::Result<u64> {
        let value = Bytes::from(serde_json::to_vec(record).expect("plain data"));
        match revision {
            None => self.meta.create(CURRENT_KEY, value).await.context("creating the current-key record"),
            Some(rev) => self.meta.update(CURRENT_KEY, value, rev).await.context("updating the current-key record (changed meanwhile?)"),
        }
    }

    /// Every live announcement, by instance.
    pub async fn rings(&self) -> anyhow::Result<BTreeMap<String, RingReport>> {
        let mut out = BTreeMap::new();
        for name in live_keys(&self.rings).await.context("listing the keyring announcements")? {
            if let Some(value) = self.rings.get(&name).await.context("reading a keyring announcement")? {
                match serde_json::from_slice::<RingReport>(&value) {
                    Ok(report) => {
                        out.insert(report.instance.clone(), report);
                    }
                    Err(e) => tracing::warn!(key = %name, error = %e, "a keyring announcement does not parse"),
                }
            }
        }
        Ok(out)
    }

    async fn announce(&self, report: RingReport) -> anyhow::Result<()> {
        let value = Bytes::from(serde_json::to_vec(&report).expect("plain data"));
        self.rings.put(&report.instance, value).await.context("announcing this instance's keyring")?;
        Ok(())
    }

    /// [`Meta::announce`] from the renewing task, where a failure only waits
    /// for the next round.
    async fn renew(&self, report: RingReport) {
        if let Err(e) = self.announce(report).await {
            tracing::warn!(error = %format!("{e:#}"), "could not renew this instance's keyring announcement");
        }
    }
}

/// The keys of a bucket that hold a value now, read from the stream's
/// subjects rather than through a consumer (`kv::Store::keys`), which can
/// miss a key rewritten while it lists: every process rewrites its
/// announcement when it switches keys, just when `rotate-key` looks.
/// Deleted keys are listed too (their marker is a message); reading them
/// gives nothing.
pub async fn live_keys(store: &kv::Store) -> anyhow::Result<Vec<String>> {
    let mut subjects = store.stream.info_with_subjects(format!("{}>", store.prefix)).await?;
    let mut out = Vec::new();
    while let Some(item) = subjects.next().await {
        let (subject, _) = item?;
        if let Some(key) = subject.strip_prefix(&store.prefix) {
            out.push(key.to_owned());
        }
    }
    Ok(out)
}

async fn open_bucket(js: &jetstream::Context, cfg: kv::Config) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(&cfg.bucket).await {
        return Ok(store);
    }
    let name = cfg.bucket.clone();
    match js.create_key_value(cfg).await {
        Ok(store) => Ok(store),
        // Made by another process at the same moment.
        Err(e) => js.get_key_value(&name).await.with_context(|| format!("creating the KV bucket {name}: {e}")),
    }
}

/// Milliseconds since the epoch, for records.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A process taking part in the cluster's choice of sealing key: it
/// announces its ring and follows the record until [`Member::leave`].
pub struct Member {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Joins: announces `ring` as `instance` in role `role`, adopts the
/// current-key record (recording the ring's current key when there is
/// none), and follows the record from then on. Fails when the cluster seals
/// under a key the ring lacks: such an instance could open nothing written
/// under it.
pub async fn join(client: &async_nats::Client, cfg: &Config, codec: &Codec, instance: &str, role: &str) -> anyhow::Result<Member> {
    let ring = codec.keyring();
    let js = jetstream::new(client.clone());
    let meta = patiently("opening the key buckets", || Meta::open(&js, cfg.stream.replicas)).await?;
    let pinned = cfg.keys.current;
    let report = || RingReport::of(instance, role, ring, pinned.is_some());
    // Announced before the record is read (see the module's documentation),
    // and surely: a process nobody sees must not go on to seal.
    patiently("announcing this instance's keyring", || meta.announce(report())).await?;
    let mut record = patiently("reading the current-key record", || meta.current()).await?;
    if record.is_none() {
        // A new cluster: every process of it is of this release, so data
        // keys are on from the start.
        let first =
            CurrentRecord { id: ring.current(), at_ms: now_ms(), by: format!("first start of {role} {instance}"), data_keys: true };
        match meta.set_current(&first, None).await {
            Ok(_) => tracing::info!(key = first.id, "no current-key record yet: recorded this keyring's current key for the cluster"),
            Err(e) => tracing::debug!(error = %e, "the current-key record was made by another instance meanwhile"),
        }
        record = patiently("reading the current-key record", || meta.current()).await?;
    }
    let record = record.map(|(r, _)| r);
    codec.data_keys().set_enabled(record.as_ref().is_some_and(|r| r.data_keys));
    match (pinned, &record) {
        (Some(p), Some(r)) if r.id != p => tracing::warn!(
            pinned = p,
            cluster = r.id,
            "keys.current pins this instance to a key other than the cluster's current one: it seals under the pinned key and \
             ignores rotate-key"
        ),
        (None, Some(r)) => {
            let adopted = ring.set_current(r.id);
            if adopted.is_err() {
                // Not left for `rotate-key` to count as a live instance.
                let _ = meta.rings.delete(instance).await;
                anyhow::bail!(
                    "the cluster seals under key {id} (record {CURRENT_KEY} in {META_BUCKET}), which this keyring ({:?}) lacks: \
                     add key {id} to this instance's keys; started as it is, it could not open what the others write. If key \
                     {id} is gone for good, make a key this instance has current first (`baileys-store rotate-key <id>`) or \
                     pin one (keys.current)",
                    ring.ids(),
                    id = r.id,
                );
            }
        }
        _ => {}
    }
    meta.renew(report()).await;
    tracing::info!(keys = ?ring.ids(), current = ring.current(), pinned = pinned.is_some(), "sealing key chosen");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let follow = pinned.is_none();
    let task = tokio::spawn(keep(meta, codec.clone(), instance.to_owned(), role.to_owned(), follow, stopped));
    Ok(Member { stop, task })
}

/// Retries `f` for up to a minute: JetStream may have no leader for a while
/// (a cluster electing one after a node died), as when the log is opened.
async fn patiently<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        match f().await {
            Err(e) if start.elapsed() < Duration::from_secs(60) => {
                tracing::warn!(error = %format!("{e:#}"), "{what} failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

impl Member {
    /// Stops following and withdraws the announcement, so that a
    /// rotation does not wait for a process that has gone.
    pub async fn leave(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Renews the announcement and follows the record until stopped.
async fn keep(meta: Meta, codec: Codec, instance: String, role: String, follow: bool, mut stop: tokio::sync::watch::Receiver<bool>) {
    let ring = codec.keyring().clone();
    let report = || RingReport::of(&instance, &role, &ring, !follow);
    let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'watch: loop {
        // The watch delivers the record as it is, then every change: made
        // again after a failure, it also catches up with what it missed.
        let mut entries = match follow {
            false => futures_util::stream::pending().boxed(),
            true => match meta.meta.watch_with_history(CURRENT_KEY).await {
                Ok(w) => w.boxed(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the current-key record; trying again at the next announcement");
                    futures_util::stream::pending().boxed()
                }
            },
        };
        let mut watching = follow;
        loop {
            tokio::select! {
                _ = stop.changed() => break 'watch,
                _ = tick.tick() => {
                    meta.renew(report()).await;
                    if follow && !watching {
                        continue 'watch;
                    }
                }
                next = entries.next() => match next {
                    Some(Ok(entry)) if entry.operation == kv::Operation::Put => {
                        if adopt(&codec, &entry.value) {
                            meta.renew(report()).await;
                        }
                    }
                    Some(Ok(_)) => tracing::warn!(key = ring.current(), "the current-key record was deleted; sealing under the same key until it is written again"),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "the current-key watch failed; watching again");
                        watching = false;
                        entries = futures_util::stream::pending().boxed();
                    }
                    None => {
                        watching = false;
                        entries = futures_util::stream::pending().boxed();
                    }
                },
            }
        }
    }
    if let Err(e) = meta.rings.delete(&instance).await {
        tracing::debug!(error = %e, "could not withdraw this instance's keyring announcement");
    }
}

/// Switches `codec`'s ring to the key a record names, if it holds it, and
/// follows its choice of data keys. Returns whether the current key changed.
fn adopt(codec: &Codec, value: &[u8]) -> bool {
    let ring = codec.keyring();
    let record: CurrentRecord = match serde_json::from_slice(value) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "the current-key record does not parse; the sealing key stays as it is");
            return false;
        }
    };
    if record.data_keys != codec.data_keys().enabled() {
        tracing::info!(on = record.data_keys, by = %record.by, "the cluster switched sessions' data keys");
        codec.data_keys().set_enabled(record.data_keys);
    }
    let before = ring.current();
    if record.id == before {
        return false;
    }
    match ring.set_current(record.id) {
        Ok(()) => {
            tracing::info!(from = before, to = record.id, by = %record.by, "the cluster's sealing key changed: sealing under the new key");
            true
        }
        Err(_) => {
            tracing::error!(
                key = record.id,
                keeps = before,
                ring = ?ring.ids(),
                "the cluster now seals under a key this instance's keyring lacks: it keeps sealing under its current key and \
                 cannot open data under the new one (520). Add the key to this instance's keys and restart it"
            );
            false
        }
    }
}

/// For tools: seal under the cluster's current key, if there is a record
/// and `ring` holds that key (and `keys.current` does not pin one).
pub async fn adopt_for_tool(client: &async_nats::Client, cfg: &Config, codec: &Codec) -> anyhow::Result<()> {
    let ring = codec.keyring();
    let js = jetstream::new(client.clone());
    let Some(meta) = Meta::attach(&js).await else { return Ok(()) };
    let record = meta.current().await?;
    codec.data_keys().set_enabled(record.as_ref().is_some_and(|(r, _)| r.data_keys));
    if cfg.keys.current.is_some() {
        return Ok(());
    }
    if let Some((record, _)) = record
        && ring.set_current(record.id).is_err()
    {
        tracing::warn!(
            cluster = record.id,
            here = ring.current(),
            "the cluster seals under a key this keyring lacks: what this command seals is sealed under its own current key"
        );
    }
    Ok(())
}
