//! Partition ownership: one owner per session across a cluster.
//!
//! Sessions hash into a fixed number of partitions ([`partition_of`], the
//! same FNV-1a hash as nats-server's `{{partition(n,1,2)}}` subject mapping
//! over the tenant and session tokens). Each partition is owned by at most
//! one instance at a time through a lease in a JetStream KV bucket.

mod config;
mod leases;
mod ownership;
pub mod plan;
#[cfg(test)]
mod tests_leases;

pub use config::ClusterConfig;
pub use leases::{BoxFuture, Handover, LeaseError, Leases};
pub use ownership::Ownership;

use bstore_domain::SessionKey;

/// The partition of `key` among `partitions`: FNV-1a (32 bit) over the
/// tenant token followed by the session token, modulo `partitions` — exactly
/// what nats-server computes for `{{partition(partitions,1,2)}}` on
/// `bstore.<tenant>.<session>.…`, so a server-side mapping and the service
/// always agree.
pub fn partition_of(key: &SessionKey, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.tenant.as_str().bytes().chain(key.session.as_str().bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, s: &str) -> SessionKey {
        SessionKey::parse(t, s).unwrap()
    }

    #[test]
    fn partitions_match_nats_server_mapping() {
        // Read off nats-server 2.15.1 with the mapping
        // bstore.*.*.*.* -> bstore-p.{{partition(4,1,2)}}.…
        assert_eq!(partition_of(&key("acme", "s1"), 4), 3);
        assert_eq!(partition_of(&key("acme", "s2"), 4), 2);
    }

    #[test]
    fn every_partition_is_in_range() {
        for i in 0..1000 {
            assert!(partition_of(&key("t", &format!("s{i}")), 7) < 7);
        }
        assert_eq!(partition_of(&key("t", "s"), 0), 0, "0 partitions is read as 1");
    }
}
