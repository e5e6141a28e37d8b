//! Deciding which partitions to take or give up: pure, no I/O, no clock.
//!
//! The lease keeper builds a [`View`] of the bucket from its watch and asks
//! [`plan`] what to do. The plan is only a wish: taking a partition is a KV
//! `create` that fails if someone holds it, so a stale view costs a failed
//! attempt, never a second owner.

use std::collections::BTreeMap;
use std::time::Duration;

/// What the keeper saw of one partition's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartView {
    /// The holder's instance id (empty for a deletion).
    pub owner: String,
    /// A put (held) rather than a deletion or purge (released).
    pub held: bool,
    /// How long ago the keeper saw this entry (a holder renews every
    /// renew interval; not renewed for a lease TTL, it has expired).
    pub age: Duration,
}

/// The bucket as the keeper last saw it.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Per partition, its last entry, if any.
    pub parts: Vec<Option<PartView>>,
    /// Live members (instance id → how long ago it announced itself).
    pub members: BTreeMap<String, Duration>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Try to create the leases of these partitions, in this order.
    Acquire(Vec<u32>),
    /// Hand this partition over (drain, then delete the lease).
    Release(u32),
    /// Nothing.
    Stay,
}

/// Decides the next step for instance `me`, which serves the partitions
/// `mine` (those it is handing over excluded). Partitions spread evenly:
/// each instance ends with ⌊P/N⌋ or ⌈P/N⌉ of them.
pub fn plan(view: &View, me: &str, mine: &[u32], ttl: Duration) -> Action {
    let p_count = view.parts.len();
    if p_count == 0 {
        return Action::Stay;
    }
    let mut members: Vec<&str> = view.members.iter().filter(|(_, age)| **age < ttl).map(|(m, _)| m.as_str()).collect();
    if !members.contains(&me) {
        members.push(me);
    }
    let n = members.len();
    let floor = p_count / n;
    let ceil = p_count.div_ceil(n);

    let free: Vec<u32> = (0..p_count as u32)
        .filter(|p| !mine.contains(p))
        .filter(|p| match &view.parts[*p as usize] {
            None => true,
            Some(v) => !v.held || v.age >= ttl,
        })
        .collect();
    if mine.len() < ceil && !free.is_empty() {
        // Start at an offset of our own so that instances starting together
        // do not all race for partition 0 first.
        let offset = (fnv(me) as usize) % p_count;
        let mut order = free;
        order.sort_by_key(|p| (*p as usize + p_count - offset) % p_count);
        order.truncate(ceil - mine.len());
        return Action::Acquire(order);
    }

    // Counts per live holder, to hand partitions to members below the floor.
    let mut counts: BTreeMap<&str, usize> = members.iter().map(|m| (*m, 0)).collect();
    for v in view.parts.iter().flatten() {
        if v.held
            && v.age < ttl
            && let Some(c) = counts.get_mut(v.owner.as_str())
        {
            *c += 1;
        }
    }
    counts.insert(me, mine.len());
    let someone_starved = counts.values().any(|c| *c < floor);
    let over_ceil = mine.len() > ceil;
    let max = counts.values().copied().max().unwrap_or(0);
    if (over_ceil || (someone_starved && mine.len() > floor && mine.len() == max))
        && free.is_empty()
        && let Some(p) = mine.iter().max()
    {
        return Action::Release(*p);
    }
    Action::Stay
}

fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(5);
    const FRESH: Duration = Duration::from_millis(100);

    fn view(parts: &[Option<(&str, bool, Duration)>], members: &[&str]) -> View {
        View {
            parts: parts.iter().map(|p| p.map(|(o, h, a)| PartView { owner: o.into(), held: h, age: a })).collect(),
            members: members.iter().map(|m| (m.to_string(), FRESH)).collect(),
        }
    }

    #[test]
    fn a_lone_instance_takes_every_partition() {
        let v = view(&[None, None, None, None], &["a"]);
        let Action::Acquire(mut ps) = plan(&v, "a", &[], TTL) else { panic!() };
        ps.sort();
        assert_eq!(ps, vec![0, 1, 2, 3]);
    }

    #[test]
    fn held_partitions_are_left_alone_until_their_lease_is_stale() {
        let v = view(&[Some(("b", true, FRESH)), Some(("b", true, TTL)), Some(("b", false, FRESH)), None], &["a", "b"]);
        let Action::Acquire(mut ps) = plan(&v, "a", &[], TTL) else { panic!() };
        ps.sort();
        assert_eq!(ps, vec![1, 2], "an expired lease and a released one are free; at most ceil(4/2)=2");
    }

    #[test]
    fn an_instance_over_its_share_hands_one_over_when_another_starves() {
        // a holds 3 of 4, b joined with none.
        let v = view(
            &[Some(("a", true, FRESH)), Some(("a", true, FRESH)), Some(("a", true, FRESH)), Some(("c", true, FRESH))],
            &["a", "b", "c"],
        );
        assert_eq!(plan(&v, "a", &[0, 1, 2], TTL), Action::Release(2), "over ceil(4/3)=2");
        // b has nothing free to take, so it waits.
        assert_eq!(plan(&v, "b", &[], TTL), Action::Stay);
    }

    #[test]
    fn an_even_spread_is_stable() {
        let owners = ["a", "a", "b", "b", "c", "c", "a", "b"];
        let parts: Vec<_> = owners.iter().map(|o| Some((*o, true, FRESH))).collect();
        let v = view(&parts, &["a", "b", "c"]);
        for me in ["a", "b", "c"] {
            let mine: Vec<u32> = owners.iter().enumerate().filter(|(_, o)| **o == me).map(|(i, _)| i as u32).collect();
            assert_eq!(plan(&v, me, &mine, TTL), Action::Stay, "{me}");
        }
    }

    #[test]
    fn the_spread_converges_from_a_six_six_four_start() {
        // 16 partitions over 3 members: 6, 6, 4 is below the floor of 5 for c.
        let mut owners: Vec<&str> = [vec!["a"; 6], vec!["b"; 6], vec!["c"; 4]].concat();
        for _round in 0..10 {
            let parts: Vec<_> = owners.iter().map(|o| Some((*o, true, FRESH))).collect();
            let v = view(&parts, &["a", "b", "c"]);
            let mut changed = false;
            for me in ["a", "b", "c"] {
                let mine: Vec<u32> = owners.iter().enumerate().filter(|(_, o)| **o == me).map(|(i, _)| i as u32).collect();
                if let Action::Release(p) = plan(&v, me, &mine, TTL) {
                    owners[p as usize] = "c";
                    changed = true;
                    break;
                }
            }
            if !changed {
                break;
            }
        }
        let count = |m: &str| owners.iter().filter(|o| **o == m).count();
        assert!((5..=6).contains(&count("a")) && (5..=6).contains(&count("b")) && count("c") == 5, "{owners:?}");
    }

    #[test]
    fn dead_members_do_not_count() {
        let mut v = view(&[None, None, None, None], &["a"]);
        v.members.insert("ghost".into(), TTL * 2);
        let Action::Acquire(ps) = plan(&v, "a", &[], TTL) else { panic!() };
        assert_eq!(ps.len(), 4);
    }
}
