//! The request ids of a session's recent events, so that a retried write
//! is answered with its first attempt's sequence.
//!
//! JetStream's duplicate window answers a retry that reaches the log. A
//! retry can also be judged "no change" before it gets there (its first
//! attempt landed, the session has caught up with it since): then this
//! table answers it, as the protocol promises, with the sequence the first
//! attempt was stored at — not the session's current one.

use std::collections::{HashMap, VecDeque};

/// Bounded map of request id → (sequence, decided at), oldest out first.
#[derive(Debug, Clone, Default)]
pub(crate) struct RecentRids {
    order: VecDeque<String>,
    seqs: HashMap<String, (u64, u64)>,
}

/// How many request ids a session remembers.
const CAPACITY: usize = 512;

impl RecentRids {
    /// Records that the event with `rid` was stored at `seq`, decided at
    /// `at_ms`.
    pub(crate) fn record(&mut self, rid: &str, seq: u64, at_ms: u64) {
        if self.seqs.insert(rid.to_owned(), (seq, at_ms)).is_none() {
            self.order.push_back(rid.to_owned());
            while self.order.len() > CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.seqs.remove(&old);
                }
            }
        }
    }

    /// The sequence `rid` was stored at, if it was stored within `window_ms`
    /// of `now_ms` (the log's duplicate window: an older rid may be reused).
    pub(crate) fn seq_of(&self, rid: &str, now_ms: u64, window_ms: u64) -> Option<u64> {
        let (seq, at) = *self.seqs.get(rid)?;
        (now_ms.saturating_sub(at) <= window_ms).then_some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_rid_answers_with_its_own_seq_within_the_window() {
        let mut r = RecentRids::default();
        r.record("a", 5, 1_000);
        r.record("b", 6, 1_500);
        assert_eq!(r.seq_of("a", 2_000, 120_000), Some(5));
        assert_eq!(r.seq_of("b", 2_000, 120_000), Some(6));
        assert_eq!(r.seq_of("c", 2_000, 120_000), None);
        assert_eq!(r.seq_of("a", 200_000, 120_000), None, "outside the duplicate window a rid may be reused");
    }

    #[test]
    fn the_table_is_bounded_and_drops_the_oldest() {
        let mut r = RecentRids::default();
        for i in 0..(CAPACITY as u64 + 10) {
            r.record(&format!("r{i}"), i + 1, 0);
        }
        assert_eq!(r.seq_of("r0", 0, 1), None);
        assert_eq!(r.seq_of(&format!("r{}", CAPACITY + 9), 0, 1), Some(CAPACITY as u64 + 10));
        assert!(r.seqs.len() <= CAPACITY && r.order.len() <= CAPACITY);
    }
}
