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
    pub fn between(old: &[u8], new: &[u8]) -> Self {
        let mut ops = Vec::new();
        let mut literal_start = 0;
        if old.len() >= BLOCK && new.len() >= BLOCK {
            let mut index: HashMap<u32, Vec<u32>> = HashMap::new();
            for (i, block) in old.chunks_exact(BLOCK).enumerate() {
                index.entry(Rolling::of(block).value()).or_default().push((i * BLOCK) as u32);
            }
            let mut i = 0;
            let mut roll = Rolling::of(&new[..BLOCK]);
            while i + BLOCK <= new.len() {
                let found = index
                    .get(&roll.value())
                    .and_then(|offsets| offsets.iter().copied().find(|&o| old[o as usize..o as usize + BLOCK] == new[i..i + BLOCK]));
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
        Self { base_len: old.len() as u32, base_hash: fnv1a(old), len: new.len() as u32, ops }
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
