//! Figures of this process's session actors, for the operator's metrics:
//! loads by where they came from, the Redis projection falling behind and
//! catching up, and how long appends to the log take. Process-wide
//! counters (like [`bstore_log::refused_events`]), read when scraped; they
//! name no tenant or session.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bstore_domain::{Event, SessionKey};
use bstore_log::{Appended, EventLog, LogError};

use crate::load::Source;

/// Upper bounds of the append latency buckets, in seconds (+Inf follows).
pub const APPEND_BOUNDS_S: [f64; 12] = [0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

static LOADS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());
static BEHIND: AtomicU64 = AtomicU64::new(0);
static REPAIRED: AtomicU64 = AtomicU64::new(0);
static APPENDS: [AtomicU64; APPEND_BOUNDS_S.len() + 1] = [const { AtomicU64::new(0) }; APPEND_BOUNDS_S.len() + 1];
static APPEND_NANOS: AtomicU64 = AtomicU64::new(0);

/// The label of a load's source. An open set: a new source is a new arm
/// here and a new label value in the figures, nothing else.
pub fn source_label(source: &Source) -> &'static str {
    source.name()
}

pub(crate) fn loaded(source: &Source) {
    *LOADS.lock().expect("not poisoned").entry(source_label(source)).or_default() += 1;
}

/// Sessions loaded into memory since the process started, by source label.
pub fn loads_by_source() -> Vec<(&'static str, u64)> {
    LOADS.lock().expect("not poisoned").iter().map(|(k, v)| (*k, *v)).collect()
}

pub(crate) fn projection_missed() {
    BEHIND.fetch_add(1, Relaxed);
}

pub(crate) fn projection_caught_up() {
    REPAIRED.fetch_add(1, Relaxed);
}

/// Redis projections of an event that were dropped or failed (queue full,
/// Redis down, a gap), each leaving the session's copy behind until a
/// snapshot repairs it.
pub fn redis_behind() -> u64 {
    BEHIND.load(Relaxed)
}

/// Snapshots written into Redis to repair a copy (behind, missing,
/// untrusted or ahead of the log).
pub fn redis_repaired() -> u64 {
    REPAIRED.load(Relaxed)
}

/// Appends to the log, timed: (per-bucket counts, the last being +Inf, and
/// the sum of their durations in seconds). Failed appends are counted too.
pub fn append_latency() -> ([u64; APPEND_BOUNDS_S.len() + 1], f64) {
    let counts = std::array::from_fn(|i| APPENDS[i].load(Relaxed));
    (counts, APPEND_NANOS.load(Relaxed) as f64 / 1e9)
}

fn record_append(took: Duration) {
    let s = took.as_secs_f64();
    let b = APPEND_BOUNDS_S.iter().position(|&b| s <= b).unwrap_or(APPEND_BOUNDS_S.len());
    APPENDS[b].fetch_add(1, Relaxed);
    APPEND_NANOS.fetch_add(took.as_nanos() as u64, Relaxed);
}

/// [`EventLog::append`], timed.
pub(crate) async fn timed_append(log: &EventLog, key: &SessionKey, expected_last: u64, event: &Event) -> Result<Appended, LogError> {
    let started = Instant::now();
    let result = log.append(key, expected_last, event).await;
    record_append(started.elapsed());
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_land_in_their_bucket_and_loads_by_their_source() {
        let (before, _) = append_latency();
        record_append(Duration::from_micros(300));
        record_append(Duration::from_secs(9));
        let (after, sum) = append_latency();
        assert_eq!(after[1] - before[1], 1, "300 µs is under 0.5 ms");
        assert_eq!(after[APPEND_BOUNDS_S.len()] - before[APPEND_BOUNDS_S.len()], 1, "9 s is past the last bound");
        assert!(sum >= 9.0);
        let count = |label| loads_by_source().into_iter().find(|(l, _)| *l == label).map_or(0, |(_, n)| n);
        let redis = count("redis");
        loaded(&Source::Redis { tail: 2 });
        assert_eq!(count("redis"), redis + 1);
    }
}

/// What writer claims did since the process started, for the operator's
/// figures (`session.claim` and the writes that carry a claim).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClaimCounts {
    /// New claims granted.
    pub granted: u64,
    /// Claim renewals (renew requests and claimed writes) accepted.
    pub renewed: u64,
    /// Requests for a new claim told to wait for another claim's lease.
    pub waited: u64,
    /// Renewals and claimed writes refused because the claim was superseded.
    pub superseded: u64,
    /// Writes without a claim refused while a claim's lease ran.
    pub held_off: u64,
}

static CLAIM_GRANTED: AtomicU64 = AtomicU64::new(0);
static CLAIM_RENEWED: AtomicU64 = AtomicU64::new(0);
static CLAIM_WAITED: AtomicU64 = AtomicU64::new(0);
static CLAIM_SUPERSEDED: AtomicU64 = AtomicU64::new(0);
static CLAIM_HELD_OFF: AtomicU64 = AtomicU64::new(0);

/// One outcome of a claim decision.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ClaimEvent {
    Granted,
    Renewed,
    Waited,
    Superseded,
    HeldOff,
}

pub(crate) fn claim_event(e: ClaimEvent) {
    let counter = match e {
        ClaimEvent::Granted => &CLAIM_GRANTED,
        ClaimEvent::Renewed => &CLAIM_RENEWED,
        ClaimEvent::Waited => &CLAIM_WAITED,
        ClaimEvent::Superseded => &CLAIM_SUPERSEDED,
        ClaimEvent::HeldOff => &CLAIM_HELD_OFF,
    };
    counter.fetch_add(1, Relaxed);
}

/// The counts of [`ClaimCounts`] now.
pub fn claim_counts() -> ClaimCounts {
    ClaimCounts {
        granted: CLAIM_GRANTED.load(Relaxed),
        renewed: CLAIM_RENEWED.load(Relaxed),
        waited: CLAIM_WAITED.load(Relaxed),
        superseded: CLAIM_SUPERSEDED.load(Relaxed),
        held_off: CLAIM_HELD_OFF.load(Relaxed),
    }
}
