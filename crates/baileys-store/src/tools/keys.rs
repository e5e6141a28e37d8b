//! The key commands: `rotate-key`, `keys status`, `keys index`.
//!
//! What is sealed under which key is read from each blob's clear header
//! ([`bstore_codec::sealed_key_id`]), never by opening it, so the counts do
//! not depend on how the log, Redis or Mongo lay their data out: every
//! event payload of the stream, every value of every Redis hash of the
//! projection, every binary of every Mongo document.
//!
//! Events cannot be re-sealed: the log is append-only, and an event is what
//! was decided. What `rotate-key` re-seals are the projections, which are
//! written again from the log under the new key, as `rebuild redis|mongo`
//! do: each session from its newest snapshot plus the events after it,
//! Mongo up to where the log was when the re-seal began. An old key therefore stays needed for as long as
//! events sealed under it are in the log.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream;
use bstore_codec::{Codec, Keyring, SealedUnder, sealed_under};

use bstore_mongo::Store;
use bstore_mongo::mongodb::bson::{Bson, Document, doc};
use bstore_redis::RedisProjection;
use bstore_redis::redis::AsyncCommands as _;
use futures_util::TryStreamExt;
use serde::Serialize;

use crate::Config;
use super::rebuild::{Target, rebuild};
use crate::rotation::{CurrentRecord, Meta, RingReport, now_ms};

/// How long `rotate-key` waits for every instance to report the new key.
const SWITCH_WAIT: Duration = Duration::from_secs(30);
/// How long it then lets writes sealed just before the switch land, before
/// it writes the projections again.
const SETTLE: Duration = Duration::from_secs(1);

/// `baileys-store rotate-key <id>`: makes key `id` the sealing key of the
/// whole cluster, then re-seals the projections (unless `reseal` is off)
/// and prints what is left under each key.
pub async fn rotate(cfg: Config, id: u32, reseal: bool) -> anyhow::Result<()> {
    let (client, codec) = crate::connect_tool(&cfg).await?;
    let ring = codec.keyring();
    ensure!(ring.has(id), "this command's keyring {:?} lacks key {id}: run it with the keys the instances have", ring.ids());
    let js = jetstream::new(client.clone());
    let meta = Meta::open(&js, cfg.stream.replicas).await?;
    let before = meta.current().await?;
    let problems = refusals(&meta, &js, &cfg, id, ring).await?;
    if !problems.is_empty() {
        bail!("not rotating to key {id}:\n  - {}", problems.join("\n  - "));
    }
    match &before {
        Some((record, _)) if record.id == id => println!("key {id} is the cluster's sealing key already"),
        _ => {
            let data_keys = before.as_ref().is_some_and(|(r, _)| r.data_keys);
            let record = CurrentRecord { id, at_ms: now_ms(), by: "rotate-key".into(), data_keys };
            let rev = meta.set_current(&record, before.as_ref().map(|(_, rev)| *rev)).await?;
            // A process that started between the check and the switch has
            // announced its ring by now (it announces before it reads the
            // record): look again, and undo the switch if one lacks the key.
            let late = refusals(&meta, &js, &cfg, id, ring).await?;
            if !late.is_empty() {
                let undone = match &before {
                    Some((old, _)) => {
                        let undo = CurrentRecord {
                            id: old.id,
                            at_ms: now_ms(),
                            by: format!("rotate-key (undoing the switch to key {id})"),
                            data_keys: old.data_keys,
                        };
                        meta.set_current(&undo, Some(rev)).await.context("undoing the switch")?;
                        format!("switched back to key {}", old.id)
                    }
                    None => "there was no record to switch back to".into(),
                };
                bail!("switched to key {id}, then found ({undone}):\n  - {}", late.join("\n  - "));
            }
            println!(
                "key {id} is the cluster's sealing key now (it was {})",
                before.as_ref().map_or("not recorded".into(), |(r, _)| r.id.to_string())
            );
        }
    }
    wait_switched(&meta, id).await?;
    ring.set_current(id)?;
    let log = bstore_log::EventLog::attach(js.clone(), cfg.stream.clone(), codec.clone());
    let rewrapped = log.rewrap_data_keys().await.context("re-wrapping the sessions' data keys")?;
    println!("re-wrapped {rewrapped} sessions' data keys under key {id}");
    let mut resealed = 0;
    for key in super::log_sessions(&log).await? {
        resealed += log.reseal_snapshots(&key).await.with_context(|| format!("re-sealing the snapshots of {key}"))?;
    }
    println!("re-sealed {resealed} snapshots under key {id}");
    if reseal {
        tokio::time::sleep(SETTLE).await;
        if cfg.redis.url.is_some() {
            println!("re-sealing redis: every session's copy written again from the log under key {id}");
            rebuild(cfg.clone(), Target::Redis, false).await.context("re-sealing redis")?;
        }
        if cfg.mongo.url.is_some() {
            println!("re-sealing mongo: every session written again from its newest snapshot and the log under key {id}");
            let target = super::rebuild::rebuild_mongo(&cfg, &client, &codec).await.context("re-sealing mongo")?;
            println!("re-sealed mongo: written again up to sequence {target}");
        }
    } else {
        println!("projections not re-sealed (--no-reseal): `baileys-store rebuild redis|mongo` re-seals them later");
    }
    println!();
    print!("{}", gather(&cfg, &client, &codec).await?.text());
    Ok(())
}

/// `baileys-store keys enable-data-keys`: turns sessions' data keys on for
/// the whole cluster, once every live process reads them.
pub async fn enable_data_keys(cfg: Config) -> anyhow::Result<()> {
    let (client, _codec) = crate::connect_tool(&cfg).await?;
    let js = jetstream::new(client.clone());
    let meta = Meta::open(&js, cfg.stream.replicas).await?;
    let Some((record, rev)) = meta.current().await? else {
        bail!("no current-key record yet: start an instance of this release first (a new cluster has data keys on from its first start)")
    };
    if record.data_keys {
        println!("sessions' data keys are on already");
        return Ok(());
    }
    let lacking = |rings: &BTreeMap<String, RingReport>| -> Vec<String> {
        rings
            .values()
            .filter(|r| !r.data_keys)
            .map(|r| format!("{} {} (release {}) does not read data keys: upgrade it first", r.role, r.instance, r.version))
            .collect()
    };
    let announced = meta.rings().await?;
    let mut problems = lacking(&announced);
    for member in lease_members(&js, &cfg.cluster.bucket).await? {
        if !announced.contains_key(&member) {
            problems
                .push(format!("instance {member} holds partition leases but announces no keyring (an older release?): upgrade it first"));
        }
    }
    if !problems.is_empty() {
        bail!("not turning data keys on:\n  - {}", problems.join("\n  - "));
    }
    let on = CurrentRecord { at_ms: now_ms(), by: "keys enable-data-keys".into(), data_keys: true, ..record.clone() };
    let rev = meta.set_current(&on, Some(rev)).await?;
    // A process that started meanwhile has announced itself by now.
    let late = lacking(&meta.rings().await?);
    if !late.is_empty() {
        meta.set_current(&CurrentRecord { at_ms: now_ms(), by: "keys enable-data-keys (undone)".into(), ..record }, Some(rev))
            .await
            .context("undoing the switch")?;
        bail!("turned data keys on, then found (switched back off):\n  - {}", late.join("\n  - "));
    }
    println!("sessions' data keys are on: each session gets one at its next write; `baileys-store erase` can now shred them");
    Ok(())
}

/// Why the cluster may not switch to key `id` now: every live process must
/// hold the same key under `id` and follow the record, and every instance
/// holding leases must have announced its ring.
async fn refusals(meta: &Meta, js: &jetstream::Context, cfg: &Config, id: u32, ring: &Keyring) -> anyhow::Result<Vec<String>> {
    let want = ring.fingerprint(id).expect("checked by the caller");
    let rings = meta.rings().await?;
    let mut out = Vec::new();
    for r in rings.values() {
        match r.keys.get(&id) {
            None => out.push(format!(
                "{} {} lacks key {id} (it has {:?}): add key {id} to its keys and restart it first",
                r.role,
                r.instance,
                r.keys.keys().collect::<Vec<_>>()
            )),
            Some(fp) if *fp != want => out.push(format!(
                "{} {} holds another key under id {id} (check value {fp}, here {want}): give every instance the same key {id}",
                r.role, r.instance
            )),
            Some(_) => {}
        }
        if r.pinned && r.current != id {
            out.push(format!(
                "{} {} pins key {} in its configuration (keys.current) and would keep sealing under it: unset keys.current there",
                r.role, r.instance, r.current
            ));
        }
    }
    for member in lease_members(js, &cfg.cluster.bucket).await? {
        if !rings.contains_key(&member) {
            out.push(format!(
                "instance {member} holds partition leases but announces no keyring (an older release?): upgrade or stop it first"
            ));
        }
    }
    Ok(out)
}

/// Instances announced in the partition lease bucket (`m.<instance>`).
async fn lease_members(js: &jetstream::Context, bucket: &str) -> anyhow::Result<BTreeSet<String>> {
    let Ok(store) = js.get_key_value(bucket).await else { return Ok(BTreeSet::new()) };
    let mut out = BTreeSet::new();
    for key in crate::rotation::live_keys(&store).await.context("listing the lease bucket")? {
        // A deleted membership (an instance that stopped) reads as nothing.
        if let Some(member) = key.strip_prefix("m.")
            && store.get(&key).await.context("reading the lease bucket")?.is_some()
        {
            out.insert(member.to_owned());
        }
    }
    Ok(out)
}

/// Waits until every live process reports sealing under `id`.
async fn wait_switched(meta: &Meta, id: u32) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let behind: Vec<String> = meta
            .rings()
            .await?
            .values()
            .filter(|r| r.current != id)
            .map(|r| format!("{} {} (key {})", r.role, r.instance, r.current))
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if start.elapsed() > SWITCH_WAIT {
            println!("still sealing under another key after {} s: {}", SWITCH_WAIT.as_secs(), behind.join(", "));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `baileys-store keys status`: prints the report (as JSON with `json`).
pub async fn status(cfg: Config, json: bool) -> anyhow::Result<()> {
    let (client, codec) = crate::connect_tool(&cfg).await?;
    let status = gather(&cfg, &client, &codec).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status).expect("plain data"));
    } else {
        print!("{}", status.text());
    }
    Ok(())
}

/// `baileys-store keys index`: the index key as an entry that pins it.
pub fn index(cfg: &Config) -> anyhow::Result<()> {
    let ring = crate::keys::load_for_tool(&cfg.keys, &cfg.data_dir, cfg.nats.urls.is_empty())?;
    match ring.index_source() {
        Some(from) => eprintln!(
            "the index key is derived from key {from}; add this entry to every instance's keys (BSTORE_KEYS or the key file) to pin it:"
        ),
        None => eprintln!("the index key is pinned already; its entry:"),
    }
    println!("{}", Keyring::format_index(ring.index_key()));
    Ok(())
}

/// What is sealed under which key, and who holds which key.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The cluster's record of the sealing key (none before any instance
    /// of this release started).
    pub current: Option<CurrentRecord>,
    /// The live processes' keyrings.
    pub instances: Vec<RingReport>,
    /// Instances holding partition leases without announcing a keyring.
    pub unannounced: Vec<String>,
    /// The index key.
    pub index: IndexStatus,
    /// Per key id, ascending.
    pub keys: Vec<KeyStatus>,
    /// Events in the log that are not sealed blobs.
    pub unsealed_events: u64,
    /// Whether the cluster gives sessions data keys of their own.
    pub data_keys_on: bool,
    /// What is sealed under sessions' data keys (which a rotation of the
    /// ring does not touch: their wrapping is re-sealed instead).
    pub under_data_keys: DataKeyCounts,
    /// What the operator should know first.
    pub warnings: Vec<String>,
}

/// What is sealed under sessions' data keys.
#[derive(Debug, Serialize)]
pub struct DataKeyCounts {
    /// Sessions with a data key now.
    pub sessions: u64,
    /// Sessions erased (their last data key destroyed).
    pub erased_sessions: u64,
    /// Sessions whose erasure began and did not finish: run `erase` again.
    pub unfinished_erasures: Vec<String>,
    /// Events in the log.
    pub events: u64,
    /// Values in the Redis projection (`None`: no Redis configured).
    pub redis_values: Option<u64>,
    /// Values in the Mongo documents (`None`: no Mongo configured).
    pub mongo_values: Option<u64>,
}

/// Where the index key comes from.
#[derive(Debug, Serialize)]
pub struct IndexStatus {
    /// Pinned by an `index:` entry (in this command's keys).
    pub pinned: bool,
    /// The key it is derived from, when not pinned.
    pub derived_from: Option<u32>,
    /// Whether every live process has the same index key as this command.
    pub same_everywhere: bool,
}

/// One key id.
#[derive(Debug, Serialize)]
pub struct KeyStatus {
    /// The id.
    pub id: u32,
    /// The cluster seals under it.
    pub current: bool,
    /// In this command's keyring.
    pub in_this_ring: bool,
    /// Live processes whose ring lacks it.
    pub missing_on: Vec<String>,
    /// Events in the log sealed under it.
    pub events: u64,
    /// Values in the Redis projection sealed under it (`None`: no Redis configured).
    pub redis_values: Option<u64>,
    /// Values in the Mongo documents sealed under it (`None`: no Mongo configured).
    pub mongo_values: Option<u64>,
    /// Sessions' data keys wrapped under it.
    pub wrapped_data_keys: u64,
    /// Some ring derives its index key from it.
    pub derives_index: bool,
    /// Nothing depends on it any more: it can be removed from every ring.
    pub retirable: bool,
    /// What to do about it, in words.
    pub notes: Vec<String>,
}

#[derive(Default)]
struct Counts {
    by_key: BTreeMap<u32, u64>,
    /// Sealed under sessions' data keys: independent of the ring's keys.
    data_key: u64,
    unsealed: u64,
}

impl Counts {
    fn add(&mut self, blob: &[u8]) {
        match sealed_under(blob) {
            Some(SealedUnder::Ring(id)) => *self.by_key.entry(id).or_default() += 1,
            Some(SealedUnder::DataKey(_)) => self.data_key += 1,
            None => self.unsealed += 1,
        }
    }

    fn of(&self, id: u32) -> u64 {
        self.by_key.get(&id).copied().unwrap_or(0)
    }
}

async fn gather(cfg: &Config, client: &async_nats::Client, codec: &Codec) -> anyhow::Result<Status> {
    let js = jetstream::new(client.clone());
    let ring = codec.keyring();
    let (current, instances) = match Meta::attach(&js).await {
        Some(meta) => (meta.current().await?.map(|(r, _)| r), meta.rings().await?.into_values().collect::<Vec<_>>()),
        None => (None, Vec::new()),
    };
    let announced: BTreeSet<&str> = instances.iter().map(|r| r.instance.as_str()).collect();
    let unannounced: Vec<String> =
        lease_members(&js, &cfg.cluster.bucket).await?.into_iter().filter(|m| !announced.contains(m.as_str())).collect();
    let log = bstore_log::EventLog::attach(js.clone(), cfg.stream.clone(), codec.clone());
    let mut events = Counts::default();
    log.scan_raw(|payload| events.add(payload)).await.context("reading the event stream")?;
    let records = log.data_key_records().await.context("reading the data-key records")?;
    let mut wrapped: BTreeMap<u32, u64> = BTreeMap::new();
    for (_, under, _, _) in &records {
        if let Some(id) = under {
            *wrapped.entry(*id).or_default() += 1;
        }
    }
    let redis = match cfg.redis.url {
        Some(_) => Some(count_redis(cfg, codec).await?),
        None => None,
    };
    let mongo = match cfg.mongo.url {
        Some(_) => Some(count_mongo(cfg, codec).await?),
        None => None,
    };

    let mut ids: BTreeSet<u32> = ring.ids().into_iter().collect();
    for r in &instances {
        ids.extend(r.keys.keys());
    }
    ids.extend(events.by_key.keys());
    ids.extend(wrapped.keys());
    for c in redis.iter().chain(mongo.iter()) {
        ids.extend(c.by_key.keys());
    }
    let current_id = current.as_ref().map(|r| r.id);
    let index_sources: BTreeSet<u32> = instances.iter().filter_map(|r| r.index_from).chain(ring.index_source()).collect();
    let mut warnings = Vec::new();
    let same_index = instances.iter().all(|r| r.index_fingerprint == ring.index_fingerprint());
    if !same_index {
        warnings.push(
            "the live processes do not all have the index key this command has: they name keys differently in Redis and Mongo; \
             give every instance the same keys (and the same index: entry)"
                .into(),
        );
    }
    for m in &unannounced {
        warnings.push(format!("instance {m} holds partition leases but announces no keyring (an older release?)"));
    }
    if current.is_none() {
        warnings.push("no current-key record yet: the first instance of this release to start records one".into());
    }
    if let Some(id) = current_id {
        for r in instances.iter().filter(|r| r.current != id) {
            warnings.push(format!("{} {} seals under key {}, not the cluster's key {id}", r.role, r.instance, r.current));
        }
    }

    let mut keys = Vec::new();
    for id in ids {
        let missing_on: Vec<String> = instances.iter().filter(|r| !r.keys.contains_key(&id)).map(|r| r.instance.clone()).collect();
        let n_events = events.of(id);
        let n_redis = redis.as_ref().map(|c| c.of(id));
        let n_mongo = mongo.as_ref().map(|c| c.of(id));
        let is_current = current_id == Some(id);
        let sealing_here = instances.iter().any(|r| r.current == id);
        let derives_index = index_sources.contains(&id);
        let n_wrapped = wrapped.get(&id).copied().unwrap_or(0);
        let in_data = n_events + n_redis.unwrap_or(0) + n_mongo.unwrap_or(0) + n_wrapped;
        let retirable = !is_current && !sealing_here && in_data == 0 && !derives_index;
        let mut notes = Vec::new();
        if is_current {
            notes.push("current: new data is sealed under it".into());
        }
        if !is_current && n_events > 0 {
            notes.push(format!(
                "{n_events} events under key {id} (written before the cluster had data keys, or erasure markers) stay until \
                 retention drops them (the log is append-only: events are never re-sealed, and the stream keeps history \
                 without an age limit); retire the key only after that"
            ));
        }
        if !is_current && n_wrapped > 0 {
            notes.push(format!("{n_wrapped} sessions' data keys are wrapped under key {id}: rotate-key re-wraps them"));
        }
        if !is_current && n_redis.unwrap_or(0) > 0 {
            notes.push(format!(
                "{} redis values under key {id}: `baileys-store rebuild redis` (or rotate-key) re-seals them",
                n_redis.unwrap_or(0)
            ));
        }
        if !is_current && n_mongo.unwrap_or(0) > 0 {
            notes.push(format!(
                "{} mongo values under key {id}: `baileys-store rebuild mongo` (or rotate-key) re-seals them",
                n_mongo.unwrap_or(0)
            ));
        }
        if derives_index {
            notes.push(format!(
                "the index key is derived from key {id} (the lowest id): retiring key {id} would change the index key, and with it \
                 every name in Redis and Mongo. Pin it first: add the entry `baileys-store keys index` prints to every \
                 instance's keys"
            ));
        }
        if !missing_on.is_empty() && (in_data > 0 || is_current) {
            notes.push(format!("lacking on {}: they answer 520 for data under it", missing_on.join(", ")));
        }
        if !ring.has(id) {
            notes.push("not in this command's keyring".into());
        }
        if retirable {
            notes.push("nothing is sealed under it and nothing derives from it: it can be removed from every instance's keys".into());
        }
        keys.push(KeyStatus {
            id,
            current: is_current,
            in_this_ring: ring.has(id),
            missing_on,
            events: n_events,
            redis_values: n_redis,
            mongo_values: n_mongo,
            wrapped_data_keys: n_wrapped,
            derives_index,
            retirable,
            notes,
        });
    }
    let index = IndexStatus { pinned: ring.index_pinned(), derived_from: ring.index_source(), same_everywhere: same_index };
    let unfinished: Vec<String> = records.iter().filter(|r| r.3).map(|r| r.0.to_string()).collect();
    for s in &unfinished {
        warnings.push(format!("the erasure of {s} did not finish and the session refuses writes: run `baileys-store erase` for it again"));
    }
    let under_data_keys = DataKeyCounts {
        sessions: records.iter().filter(|r| r.1.is_some()).count() as u64,
        erased_sessions: records.iter().filter(|r| r.2.is_some()).count() as u64,
        unfinished_erasures: unfinished,
        events: events.data_key,
        redis_values: redis.as_ref().map(|c| c.data_key),
        mongo_values: mongo.as_ref().map(|c| c.data_key),
    };
    let data_keys_on = current.as_ref().is_some_and(|r| r.data_keys);
    if !data_keys_on && current.is_some() {
        warnings.push(
            "sessions have no data keys of their own (a cluster upgraded from a release without them): an erasure cannot make \
             their events unreadable. Once every instance runs this release: `baileys-store keys enable-data-keys`"
                .into(),
        );
    }
    Ok(Status { current, instances, unannounced, index, keys, unsealed_events: events.unsealed, data_keys_on, under_data_keys, warnings })
}

impl Status {
    /// The report for people.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = match &self.current {
            Some(r) => writeln!(out, "sealing key of the cluster: {} (recorded by {})", r.id, r.by),
            None => writeln!(out, "sealing key of the cluster: not recorded yet"),
        };
        let _ = writeln!(out, "live processes: {}", self.instances.len());
        for r in &self.instances {
            let index = match r.index_from {
                Some(from) => format!("index derived from key {from}"),
                None => "index pinned".into(),
            };
            let pinned = if r.pinned { " (pinned by keys.current)" } else { "" };
            let ids: Vec<String> = r.keys.keys().map(u32::to_string).collect();
            let _ = writeln!(out, "  {} {:<11} keys {:<8} seals under {}{pinned}, {index}", r.instance, r.role, ids.join(","), r.current);
        }
        let index = match self.index.derived_from {
            Some(from) => format!("derived from key {from}"),
            None => "pinned".into(),
        };
        let _ = writeln!(out, "index key: {index}{}", if self.index.same_everywhere { "" } else { " (NOT the same everywhere)" });
        for k in &self.keys {
            let shown = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
            let _ = writeln!(
                out,
                "key {}{}: {} events, {} redis values, {} mongo values, {} data keys wrapped{}",
                k.id,
                if k.current { " (current)" } else { "" },
                k.events,
                shown(k.redis_values),
                shown(k.mongo_values),
                k.wrapped_data_keys,
                if k.retirable { " — can be retired" } else { "" }
            );
            for note in &k.notes {
                let _ = writeln!(out, "  - {note}");
            }
        }
        let d = &self.under_data_keys;
        let shown = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
        let _ = writeln!(
            out,
            "sessions' data keys: {} ({} sessions with one, {} erased): {} events, {} redis values, {} mongo values",
            if self.data_keys_on { "on" } else { "off" },
            d.sessions,
            d.erased_sessions,
            d.events,
            shown(d.redis_values),
            shown(d.mongo_values)
        );
        if self.unsealed_events > 0 {
            let _ = writeln!(out, "{} events in the log are not sealed blobs", self.unsealed_events);
        }
        for w in &self.warnings {
            let _ = writeln!(out, "WARNING: {w}");
        }
        out
    }
}

/// Every field value of every session hash of the projection that is a
/// sealed blob (the metadata fields are not).
async fn count_redis(cfg: &Config, codec: &Codec) -> anyhow::Result<Counts> {
    let redis = RedisProjection::new(cfg.redis.clone(), codec.clone())?;
    let mut conn = redis.connection();
    let mut counts = Counts::default();
    for session in redis.sessions().await? {
        let fields: Vec<(Vec<u8>, Vec<u8>)> = conn.hgetall(redis.key(&session)).await.context("reading redis")?;
        for (_, value) in fields {
            if sealed_under(&value).is_some() {
                counts.add(&value);
            }
        }
    }
    Ok(counts)
}

/// Every binary value (at any depth) of every document of the database
/// that is a sealed blob.
async fn count_mongo(cfg: &Config, codec: &Codec) -> anyhow::Result<Counts> {
    fn walk(value: &Bson, counts: &mut Counts) {
        match value {
            Bson::Binary(b) if sealed_under(&b.bytes).is_some() => counts.add(&b.bytes),
            Bson::Document(d) => d.values().for_each(|v| walk(v, counts)),
            Bson::Array(a) => a.iter().for_each(|v| walk(v, counts)),
            _ => {}
        }
    }
    let store = Store::connect(&cfg.mongo, codec.clone()).await?;
    let db = store.database();
    let mut counts = Counts::default();
    for name in db.list_collection_names().await.context("listing the mongo collections")? {
        let mut cursor = db.collection::<Document>(&name).find(doc! {}).await.context("reading mongo")?;
        while let Some(d) = cursor.try_next().await.context("reading mongo")? {
            d.values().for_each(|v| walk(v, &mut counts));
        }
    }
    Ok(counts)
}
