//! Byte deltas: a new version of a value written as copies from its previous
//! version plus the bytes that are new.
//!
//! Baileys rewrites some values whole on every message — a sender-key record
//! grows by ~220 B per group message up to ~446 KB and is rewritten each time
//! — so recording the whole value again would cost the log hundreds of KB per
//! message where a few hundred bytes changed. A delta records only that.
//!
//! The algorithm is rsync's: the old value is cut into fixed blocks indexed by
//! a rolling hash; the new value is scanned byte by byte, and wherever a block
//! of the old value recurs it becomes a copy. Changes anywhere (a counter near
//! the start, an entry appended at the end) cost little more than their size.

use std::collections::HashMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Block size for matching. Smaller finds more matches but indexes more.
const BLOCK: usize = 32;

/// Most distinct blocks of the old value indexed under one rolling hash.
/// Honest values rarely have two; crafted ones can have thousands, and
/// comparing against each of them at every position is what made building
/// a delta quadratic.
const MAX_CANDIDATES: usize = 4;

/// Block comparisons allowed while scanning the new value, per block of it.
/// A value that matches block by block needs about one per block.
const COMPARES_PER_BLOCK: usize = 4;

/// What building one delta cost, counted in steps rather than time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Work {
    /// Block comparisons while indexing the old value.
    index_compares: usize,
    /// Positions of the new value looked up in the index.
    positions: usize,
    /// Block comparisons against candidates while scanning the new value.
    block_compares: usize,
    /// Bytes compared while extending matches beyond their block.
    extended: usize,
}

/// One step of rebuilding the new value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Copy `len` bytes of the old value starting at `from`.
    Copy {
        /// Offset in the old value.
        from: u32,
        /// Length.
        len: u32,
    },
    /// Bytes that were not in the old value.
    Insert(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A new value expressed against an old one. `base_len` and `base_hash`
/// identify the old value, so a delta is never applied to the wrong base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// Length of the old value.
    pub base_len: u32,
    /// FNV-1a 64 of the old value.
    pub base_hash: u64,
    /// Length of the new value.
    pub len: u32,
    /// The steps.
    pub ops: Vec<Op>,
}

/// Why a delta could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the delta does not belong to this base value")]
pub struct WrongBase;

impl Delta {
    /// Bytes this delta costs when encoded (a close estimate).
    pub fn encoded_len(&self) -> usize {
        24 + self
            .ops
            .iter()
            .map(|op| match op {
                Op::Copy { .. } => 12,
                Op::Insert(b) => 4 + b.len(),
            })
            .sum::<usize>()
    }

    /// Computes the delta from `old` to `new`.
    ///
    /// The work is linear in the sizes of both values whatever they hold: at
    /// most [`MAX_CANDIDATES`] distinct blocks of `old` are kept per rolling
    /// hash, and the block comparisons made while scanning `new` are capped
    /// at [`COMPARES_PER_BLOCK`] per block of `new`. A value crafted to defeat
    /// the matching (blocks that share a rolling hash but differ, repeated or
    /// periodic content) uses up that budget; the rest of it is then recorded
    /// as new bytes, and such a delta is too large to be preferred over the
    /// whole value.
    pub fn between(old: &[u8], new: &[u8]) -> Self {
        Self::between_counted(old, new).0
    }

    /// [`Delta::between`], also reporting the work it did.
    fn between_counted(old: &[u8], new: &[u8]) -> (Self, Work) {
        let mut work = Work::default();
        let mut ops = Vec::new();
        let mut literal_start = 0;
        if old.len() >= BLOCK && new.len() >= BLOCK {
            let mut index: HashMap<u32, Vec<u32>> = HashMap::new();
            for (i, block) in old.chunks_exact(BLOCK).enumerate() {
                let offsets = index.entry(Rolling::of(block).value()).or_default();
                if offsets.len() >= MAX_CANDIDATES {
                    continue;
                }
                // A block equal to one already kept adds nothing: the kept
                // one matches wherever this one would.
                work.index_compares += offsets.len();
                if offsets.iter().all(|&o| &old[o as usize..o as usize + BLOCK] != block) {
                    offsets.push((i * BLOCK) as u32);
                }
            }
            let mut budget = (new.len() / BLOCK + 1) * COMPARES_PER_BLOCK;
            let mut i = 0;
            let mut roll = Rolling::of(&new[..BLOCK]);
            while i + BLOCK <= new.len() {
                work.positions += 1;
                let mut found = None;
                if let Some(offsets) = index.get(&roll.value()) {
                    for &o in offsets {
                        if budget == 0 {
                            break;
                        }
                        budget -= 1;
                        work.block_compares += 1;
                        if old[o as usize..o as usize + BLOCK] == new[i..i + BLOCK] {
                            found = Some(o);
                            break;
                        }
                    }
                    if found.is_none() && budget == 0 {
                        // Out of budget: everything from here is new bytes.
                        break;
                    }
                }
                if let Some(from) = found {
                    // Extend the match forward as far as it goes.
                    let (mut a, mut b) = (from as usize + BLOCK, i + BLOCK);
                    while a < old.len() && b < new.len() && old[a] == new[b] {
                        a += 1;
                        b += 1;
                    }
                    // And backward over literal bytes not yet emitted.
                    let (mut from, mut start) = (from as usize, i);
                    while from > 0 && start > literal_start && old[from - 1] == new[start - 1] {
                        from -= 1;
                        start -= 1;
                    }
                    work.extended += (b - i - BLOCK) + (i - start);
                    if start > literal_start {
                        ops.push(Op::Insert(new[literal_start..start].to_vec()));
                    }
                    push_copy(&mut ops, from as u32, (b - start) as u32);
                    i = b;
                    literal_start = b;
                    if i + BLOCK <= new.len() {
                        roll = Rolling::of(&new[i..i + BLOCK]);
                    }
                    continue;
                }
                if i + BLOCK < new.len() {
                    roll.roll(new[i], new[i + BLOCK]);
                }
                i += 1;
            }
        }
        if literal_start < new.len() {
            ops.push(Op::Insert(new[literal_start..].to_vec()));
        }
        (Self { base_len: old.len() as u32, base_hash: fnv1a(old), len: new.len() as u32, ops }, work)
    }

    /// Rebuilds the new value from `old`.
    pub fn apply(&self, old: &[u8]) -> Result<Bytes, WrongBase> {
        if old.len() != self.base_len as usize || fnv1a(old) != self.base_hash {
            return Err(WrongBase);
        }
        let mut out = Vec::with_capacity(self.len as usize);
        for op in &self.ops {
            match op {
                Op::Copy { from, len } => {
                    let range = *from as usize..(*from as usize).checked_add(*len as usize).ok_or(WrongBase)?;
                    out.extend_from_slice(old.get(range).ok_or(WrongBase)?);
                }
                Op::Insert(bytes) => out.extend_from_slice(bytes),
            }
        }
        if out.len() != self.len as usize {
            return Err(WrongBase);
        }
        Ok(out.into())
    }
}

fn push_copy(ops: &mut Vec<Op>, from: u32, len: u32) {
    if let Some(Op::Copy { from: f, len: l }) = ops.last_mut()
        && *f + *l == from
    {
        *l += len;
        return;
    }
    ops.push(Op::Copy { from, len });
}

/// FNV-1a, 64 bits: a fingerprint of the base, not a security measure (the
/// whole event is authenticated by its seal).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The rsync weak checksum over a window of `BLOCK` bytes.
struct Rolling {
    a: u32,
    b: u32,
}

impl Rolling {
    fn of(block: &[u8]) -> Self {
        let (mut a, mut b) = (0u32, 0u32);
        for (i, &x) in block.iter().enumerate() {
            a = a.wrapping_add(u32::from(x));
            b = b.wrapping_add((block.len() - i) as u32 * u32::from(x));
        }
        Self { a, b }
    }

    fn roll(&mut self, out: u8, inn: u8) {
        self.a = self.a.wrapping_sub(u32::from(out)).wrapping_add(u32::from(inn));
        self.b = self.b.wrapping_sub(BLOCK as u32 * u32::from(out)).wrapping_add(self.a);
    }

    fn value(&self) -> u32 {
        (self.a & 0xffff) | (self.b << 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(old: &[u8], new: &[u8]) -> Delta {
        let d = Delta::between(old, new);
        assert_eq!(d.apply(old).unwrap(), new, "round trip");
        d
    }

    /// A record shaped like Baileys' sender-key JSON: a chain key near the
    /// start that changes on every message, and a list that grows at the end.
    fn record(iteration: u32, keys: u32) -> Vec<u8> {
        let mut s = format!(
            "[{{\"senderKeyId\":1234,\"senderChainKey\":{{\"iteration\":{iteration},\"seed\":\"{:044}\"}},\"senderMessageKeys\":[",
            iteration
        );
        for k in 0..keys {
            s.push_str(&format!("{{\"iteration\":{k},\"seed\":\"{:0>44}\"}},", k * 7919));
        }
        s.push_str("]}]");
        s.into_bytes()
    }

    #[test]
    fn a_growing_record_costs_about_what_changed() {
        let old = record(1000, 2000);
        let new = record(1001, 2001);
        let d = round_trip(&old, &new);
        assert!(old.len() > 100_000);
        assert!(d.encoded_len() < 400, "delta of {} bytes for a {} byte value", d.encoded_len(), new.len());
    }

    #[test]
    fn edge_cases_round_trip() {
        round_trip(b"", b"");
        round_trip(b"", b"new");
        round_trip(b"old", b"");
        round_trip(b"short", b"shorter");
        let big: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
        round_trip(&big, &big);
        round_trip(&big, &big[100..]);
        round_trip(&big[100..], &big);
        let mut changed = big.clone();
        changed[2500] ^= 1;
        changed.extend_from_slice(b"tail");
        let d = round_trip(&big, &changed);
        assert!(d.encoded_len() < 200);
        round_trip(&big, &big.iter().rev().copied().collect::<Vec<_>>());
    }

    #[test]
    fn unrelated_values_round_trip_as_one_insert() {
        let a: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
        let b: Vec<u8> = (0..3000u32).map(|i| (i * 13 % 253) as u8 ^ 0x5a).collect();
        let d = round_trip(&a, &b);
        assert!(d.encoded_len() >= b.len());
    }

    #[test]
    fn a_delta_refuses_the_wrong_base() {
        let old = record(1, 50);
        let d = Delta::between(&old, &record(2, 51));
        assert_eq!(d.apply(&record(1, 49)), Err(WrongBase));
        let mut same_len = old.clone();
        same_len[10] ^= 1;
        assert_eq!(d.apply(&same_len), Err(WrongBase));
    }

    /// A 32-byte block of eight groups `x, 255-x, 255-x, x`, with `x` the
    /// bytes of `n`: every such block has the same rolling hash (the sums and
    /// the weighted sums of all groups are equal), yet any two differ.
    fn colliding_block(n: u64) -> [u8; BLOCK] {
        let mut block = [0u8; BLOCK];
        for (g, x) in n.to_le_bytes().into_iter().enumerate() {
            block[4 * g..4 * g + 4].copy_from_slice(&[x, 255 - x, 255 - x, x]);
        }
        block
    }

    fn colliding_value(blocks: u64, first: u64) -> Vec<u8> {
        (first..first + blocks).flat_map(|n| colliding_block(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))).collect()
    }

    /// The comparisons an index without a cap per hash would make: at each
    /// position of `new`, one per indexed block of `old` with that hash.
    fn uncapped_candidates(old: &[u8], new: &[u8]) -> usize {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for block in old.chunks_exact(BLOCK) {
            *counts.entry(Rolling::of(block).value()).or_default() += 1;
        }
        let mut roll = Rolling::of(&new[..BLOCK]);
        let mut total = counts.get(&roll.value()).copied().unwrap_or(0);
        for i in 0..new.len() - BLOCK {
            roll.roll(new[i], new[i + BLOCK]);
            total += counts.get(&roll.value()).copied().unwrap_or(0);
        }
        total
    }

    /// Checks the delta and that the work stayed within its linear bound.
    fn bounded(old: &[u8], new: &[u8]) -> (Delta, Work) {
        let (d, work) = Delta::between_counted(old, new);
        assert_eq!(d.apply(old).unwrap(), new, "round trip");
        assert!(work.block_compares <= (new.len() / BLOCK + 1) * COMPARES_PER_BLOCK, "{work:?}");
        assert!(work.index_compares <= (old.len() / BLOCK) * MAX_CANDIDATES, "{work:?}");
        assert!(work.positions <= new.len(), "{work:?}");
        let touched = (work.index_compares + work.block_compares) * BLOCK + work.positions + work.extended;
        assert!(touched <= 8 * (old.len() + new.len()), "{touched} bytes touched for {} + {}: {work:?}", old.len(), new.len());
        (d, work)
    }

    #[test]
    fn blocks_crafted_to_share_one_rolling_hash_cost_linear_work() {
        // 512 KiB of distinct blocks, all under one rolling hash, against
        // another 512 KiB of them: none matches, every aligned window
        // collides with every block of the base.
        let old = colliding_value(16_384, 0);
        let new = colliding_value(16_384, 1 << 20);
        assert_eq!(old.len(), 512 << 10);
        let naive = uncapped_candidates(&old, &new);
        assert!(naive >= 16_384 * 16_384, "the input is adversarial: {naive} candidates uncapped");
        let (d, work) = bounded(&old, &new);
        assert!(naive > 1000 * work.block_compares, "{naive} uncapped, {work:?}");
        assert!(d.encoded_len() >= new.len(), "nothing matched, so the value is stored whole");

        // The same blocks shuffled into a new order still match where the
        // index kept them, and the work stays bounded.
        let mut shuffled = old.clone();
        shuffled.rotate_left(BLOCK * 5_000);
        bounded(&old, &shuffled);
    }

    #[test]
    fn repeated_and_periodic_values_cost_linear_work() {
        // One block repeated: the base indexes it once.
        let block = colliding_block(7);
        let old: Vec<u8> = block.iter().copied().cycle().take(BLOCK * 16_384).collect();
        let (d, _) = bounded(&old, &old);
        assert_eq!(d.ops, vec![Op::Copy { from: 0, len: old.len() as u32 }]);
        // The repeated block with a byte changed every 1000 bytes.
        let mut new = old.clone();
        for i in (0..new.len()).step_by(1000) {
            new[i] ^= 0x55;
        }
        bounded(&old, &new);
        // Periods that do not divide the block size, shifted by one byte.
        for period in [3usize, 7, 31, 33, 64] {
            let pattern: Vec<u8> = (0..period).map(|i| (i * 37 % 256) as u8).collect();
            let old: Vec<u8> = pattern.iter().copied().cycle().take(300_000).collect();
            let new: Vec<u8> = pattern.iter().copied().cycle().skip(1).take(300_000).collect();
            let (d, _) = bounded(&old, &new);
            assert!(d.encoded_len() < 200, "period {period}: {} bytes", d.encoded_len());
        }
        // Colliding blocks interleaved with copies of one base block.
        let old: Vec<u8> = (0..16_384u64).flat_map(|n| if n % 2 == 0 { colliding_block(1) } else { colliding_block(n) }).collect();
        let new: Vec<u8> = (0..16_384u64).flat_map(|n| colliding_block(n * 3 + 1)).collect();
        bounded(&old, &new);
    }

    #[test]
    fn honest_rewrites_stay_within_the_budget() {
        let old = record(1000, 2000);
        let new = record(1001, 2001);
        let (d, work) = bounded(&old, &new);
        assert!(d.encoded_len() < 400);
        assert!(work.block_compares < new.len() / BLOCK, "{work:?}");
    }

    #[test]
    fn corrupt_ops_are_refused_not_panicked_on() {
        let old = b"0123456789abcdef0123456789abcdef0123456789".to_vec();
        let mut d = Delta::between(&old, &old);
        d.ops = vec![Op::Copy { from: 40, len: 10 }];
        assert_eq!(d.apply(&old), Err(WrongBase));
        d.ops = vec![Op::Copy { from: u32::MAX, len: u32::MAX }];
        assert_eq!(d.apply(&old), Err(WrongBase));
    }
}
