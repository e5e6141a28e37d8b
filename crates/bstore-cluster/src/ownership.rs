//! The gate: which partitions this instance may serve right now.
//!
//! Read on every request, so it is lock-free: per partition the epoch it
//! was acquired under and the instant (by this process's monotonic clock)
//! until which the lease is known to be valid with the margin taken off.
//! Written only by the lease keeper.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bstore_domain::SessionKey;

use crate::{ClusterConfig, partition_of};

struct Slot {
    /// Nanoseconds after `Inner::base` until which the partition may be
    /// served; 0: not owned.
    until: AtomicU64,
    /// The lease's revision when it was acquired: the fencing epoch.
    epoch: AtomicU64,
}

struct Inner {
    partitions: u32,
    instance: String,
    base: Instant,
    slots: Box<[Slot]>,
}

/// Which partitions this instance owns. Cheap to clone.
#[derive(Clone)]
pub struct Ownership(Arc<Inner>);

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership").field("instance", &self.0.instance).field("partitions", &self.0.partitions).finish()
    }
}

impl Ownership {
    /// Nothing owned yet; the lease keeper grants partitions as it acquires
    /// them.
    pub fn new(cfg: &ClusterConfig, instance: impl Into<String>) -> Self {
        let partitions = cfg.partitions.max(1);
        let slots = (0..partitions).map(|_| Slot { until: AtomicU64::new(0), epoch: AtomicU64::new(0) }).collect();
        Self(Arc::new(Inner { partitions, instance: instance.into(), base: Instant::now(), slots }))
    }

    /// Every partition owned for good, under epoch 1: for a process that is
    /// the only writer by construction (tools, unit tests).
    pub fn sole(cfg: &ClusterConfig) -> Self {
        let o = Self::new(cfg, "sole");
        for slot in o.0.slots.iter() {
            slot.epoch.store(1, Ordering::Release);
            slot.until.store(u64::MAX, Ordering::Release);
        }
        o
    }

    /// This instance's id (in the lease values).
    pub fn instance(&self) -> &str {
        &self.0.instance
    }

    /// How many partitions there are.
    pub fn partitions(&self) -> u32 {
        self.0.partitions
    }

    /// The partition of `key`.
    pub fn partition(&self, key: &SessionKey) -> u32 {
        partition_of(key, self.0.partitions)
    }

    /// The epoch of partition `p` if this instance may serve it now.
    pub fn serving(&self, p: u32) -> Option<u64> {
        let slot = self.0.slots.get(p as usize)?;
        let until = slot.until.load(Ordering::Acquire);
        if until == 0 || self.nanos(Instant::now()) >= until {
            return None;
        }
        Some(slot.epoch.load(Ordering::Acquire))
    }

    /// Whether partition `p` is served now under `epoch`.
    pub fn still_serving(&self, p: u32, epoch: u64) -> bool {
        self.serving(p) == Some(epoch)
    }

    /// How much longer partition `p` may be served under `epoch`, by this
    /// process's clock: `None` if it is not served under `epoch` now. A
    /// promise that outlives ownership (a writer claim's lease) is cut to
    /// this, so that it ends before another instance can serve `p`.
    pub fn serving_for(&self, p: u32, epoch: u64) -> Option<std::time::Duration> {
        let slot = self.0.slots.get(p as usize)?;
        let until = slot.until.load(Ordering::Acquire);
        let now = self.nanos(Instant::now());
        if until == 0 || now >= until || slot.epoch.load(Ordering::Acquire) != epoch {
            return None;
        }
        Some(std::time::Duration::from_nanos(until - now))
    }

    /// The partitions served now.
    pub fn served(&self) -> Vec<u32> {
        (0..self.0.partitions).filter(|p| self.serving(*p).is_some()).collect()
    }

    /// Opens the gate of `p` under `epoch` until `until`. The lease keeper's
    /// (public for the tests of the layers above).
    pub fn grant(&self, p: u32, epoch: u64, until: Instant) {
        let slot = &self.0.slots[p as usize];
        slot.epoch.store(epoch, Ordering::Release);
        slot.until.store(self.nanos(until).max(1), Ordering::Release);
    }

    /// Closes the gate of `p`. The lease keeper's (public for tests).
    pub fn revoke(&self, p: u32) {
        self.0.slots[p as usize].until.store(0, Ordering::Release);
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.0.base).as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_grant_lasts_until_its_instant_and_a_revoke_ends_it() {
        let o = Ownership::new(&ClusterConfig { partitions: 4, ..Default::default() }, "i");
        assert_eq!(o.serving(1), None);
        o.grant(1, 7, Instant::now() + Duration::from_secs(60));
        assert_eq!(o.serving(1), Some(7));
        assert!(o.still_serving(1, 7));
        assert!(!o.still_serving(1, 8), "another epoch is another ownership");
        assert_eq!(o.served(), vec![1]);
        o.revoke(1);
        assert_eq!(o.serving(1), None);
        o.grant(2, 9, Instant::now());
        assert_eq!(o.serving(2), None, "a lease whose validity has passed is not served");
        assert_eq!(o.serving(99), None, "out of range");
    }

    #[test]
    fn serving_for_is_what_is_left_of_the_grant_under_its_epoch() {
        let o = Ownership::new(&ClusterConfig { partitions: 2, ..Default::default() }, "i");
        assert_eq!(o.serving_for(0, 3), None);
        o.grant(0, 3, Instant::now() + Duration::from_secs(60));
        let left = o.serving_for(0, 3).unwrap();
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50), "{left:?}");
        assert_eq!(o.serving_for(0, 4), None, "another epoch");
        o.revoke(0);
        assert_eq!(o.serving_for(0, 3), None);
        let sole = Ownership::sole(&ClusterConfig { partitions: 1, ..Default::default() });
        assert!(sole.serving_for(0, 1).unwrap() > Duration::from_secs(1 << 30));
    }

    #[test]
    fn sole_owns_everything() {
        let o = Ownership::sole(&ClusterConfig { partitions: 3, ..Default::default() });
        assert_eq!(o.served(), vec![0, 1, 2]);
    }
}
