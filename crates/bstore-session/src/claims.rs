//! Writer claims: how a client learns that it is still its session's only
//! writer, so that it may answer reads from what it has read and written.
//!
//! A client claims its session (`session.claim`) and gets a claim id and a
//! lease. While the lease is valid by the client's own clock, counted from
//! when it *sent* the request that granted or renewed it, no other writer is
//! let in: the service stops renewing a claim as soon as another claim or a
//! write without this claim asks to come in (the claim is *superseded*), and
//! lets that other writer in only once the claim's lease has run out by the
//! service's clock, which started after the client's. So the holder has
//! stopped serving from memory before anyone else can change the session.
//! No clock is compared across machines: each side measures a duration on
//! its own monotonic clock.
//!
//! This module is the decision alone, pure and tested without I/O: the
//! actor keeps one [`Claims`] per session and asks it before each claim op
//! and each write, passing the time and the lease.
//!
//! **Invariant:** while a claim's service-side lease runs, no write without
//! that claim is applied, and no other claim is granted. A claim that was
//! superseded is never renewed again.

use std::time::{Duration, Instant};

/// The claim state of one session.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    held: Option<Held>,
}

/// The last claim granted.
#[derive(Debug)]
struct Held {
    id: String,
    /// The ownership epoch it was granted under: renewals under another
    /// epoch are refused (the session may have been served elsewhere since).
    epoch: u64,
    /// No other writer is let in before this instant.
    expires: Instant,
    /// Another writer waits: never renewed again.
    superseded: bool,
}

/// The answer to a request for a new claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claimed {
    /// The session is the caller's, under this id, for the lease.
    Granted(String),
    /// Another claim may still be in use for this long; it will not be
    /// renewed. Ask again then.
    Wait(Duration),
}

/// A claim's renewal or write was refused: another writer claimed the
/// session or wrote without the claim, or the claim is not one this actor
/// granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Superseded;

impl Claims {
    /// A request for a new claim at `now`: granted for `lease` unless the
    /// last claim's lease still runs, which is then superseded.
    pub(crate) fn claim(&mut self, now: Instant, lease: Duration, epoch: u64, new_id: impl FnOnce() -> String) -> Claimed {
        if let Some(held) = &mut self.held
            && held.expires > now
        {
            held.superseded = true;
            return Claimed::Wait(held.expires - now);
        }
        let id = new_id();
        self.held = Some(Held { id: id.clone(), epoch, expires: now + lease, superseded: false });
        Claimed::Granted(id)
    }

    /// The holder of `id` renews its claim at `now` (a renewal or a write
    /// carrying the claim). A claim whose lease ran out is renewed too as
    /// long as nobody else came in meanwhile: what its holder learned is
    /// still the session's state.
    pub(crate) fn renew(&mut self, id: &str, now: Instant, lease: Duration, epoch: u64) -> Result<(), Superseded> {
        match &mut self.held {
            Some(held) if held.id == id && held.epoch == epoch && !held.superseded => {
                held.expires = held.expires.max(now + lease);
                Ok(())
            }
            _ => Err(Superseded),
        }
    }

    /// A write without a claim at `now`: let in when no claim's lease runs
    /// (and any expired claim ends for good, since its holder's knowledge
    /// is about to go stale). Otherwise the claim is superseded and the
    /// write must wait the time returned.
    pub(crate) fn unclaimed_write(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(held) = &mut self.held
            && held.expires > now
        {
            held.superseded = true;
            return Err(held.expires - now);
        }
        self.held = None;
        Ok(())
    }

    /// The session's actor stops: no claim is renewed any more. Returns how
    /// long the last claim's lease still runs, which the actor waits out
    /// before it stops, so that the session's next actor (here or on
    /// another instance), which knows no claim, lets nobody in too early.
    pub(crate) fn close(&mut self, now: Instant) -> Duration {
        match &mut self.held {
            Some(held) => {
                held.superseded = true;
                held.expires.saturating_duration_since(now)
            }
            None => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(3);

    fn id(s: &str) -> impl FnOnce() -> String + '_ {
        move || s.to_owned()
    }

    #[test]
    fn a_second_claim_waits_for_the_first_lease_which_is_no_longer_renewed() {
        let t0 = Instant::now();
        let mut c = Claims::default();
        assert_eq!(c.claim(t0, LEASE, 1, id("a")), Claimed::Granted("a".into()));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(c.renew("a", t1, LEASE, 1), Ok(()));
        // Renewed at t1: the lease now ends at t1 + 3 s.
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(c.claim(t2, LEASE, 1, id("b")), Claimed::Wait(Duration::from_secs(2)));
        // From now on "a" is superseded: renewals and writes are refused.
        assert_eq!(c.renew("a", t2, LEASE, 1), Err(Superseded));
        // Before the end of a's lease "b" still waits, however often it asks.
        assert_eq!(c.claim(t1 + LEASE - Duration::from_millis(1), LEASE, 1, id("b")), Claimed::Wait(Duration::from_millis(1)));
        // At its end "b" is granted, and "a" never comes back.
        assert_eq!(c.claim(t1 + LEASE, LEASE, 1, id("b")), Claimed::Granted("b".into()));
        assert_eq!(c.renew("a", t1 + LEASE, LEASE, 1), Err(Superseded));
        assert_eq!(c.renew("b", t1 + LEASE, LEASE, 1), Ok(()));
    }

    #[test]
    fn an_unclaimed_write_supersedes_a_live_claim_and_waits_for_its_end() {
        let t0 = Instant::now();
        let mut c = Claims::default();
        assert_eq!(c.unclaimed_write(t0), Ok(()), "no claim: writes go in as without claims");
        assert_eq!(c.claim(t0, LEASE, 1, id("a")), Claimed::Granted("a".into()));
        assert_eq!(c.unclaimed_write(t0 + Duration::from_secs(1)), Err(Duration::from_secs(2)));
        assert_eq!(c.renew("a", t0 + Duration::from_secs(1), LEASE, 1), Err(Superseded));
        assert_eq!(c.unclaimed_write(t0 + LEASE), Ok(()));
        // The expired claim ended for good with that write.
        assert_eq!(c.renew("a", t0 + LEASE, LEASE, 1), Err(Superseded));
        assert_eq!(c.claim(t0 + LEASE, LEASE, 1, id("b")), Claimed::Granted("b".into()));
    }

    #[test]
    fn a_lapsed_claim_nobody_else_came_for_is_renewed() {
        let t0 = Instant::now();
        let mut c = Claims::default();
        c.claim(t0, LEASE, 1, id("a"));
        assert_eq!(c.renew("a", t0 + 10 * LEASE, LEASE, 1), Ok(()));
        // And its renewed lease holds others off again.
        assert_eq!(c.unclaimed_write(t0 + 10 * LEASE + Duration::from_secs(1)), Err(Duration::from_secs(2)));
    }

    #[test]
    fn unknown_ids_and_other_epochs_are_superseded() {
        let t0 = Instant::now();
        let mut c = Claims::default();
        assert_eq!(c.renew("a", t0, LEASE, 1), Err(Superseded), "a claim this actor never granted");
        c.claim(t0, LEASE, 1, id("a"));
        assert_eq!(c.renew("x", t0, LEASE, 1), Err(Superseded));
        assert_eq!(c.renew("a", t0, LEASE, 2), Err(Superseded), "granted under another ownership epoch");
        // An unknown id supersedes nothing: "a" is still the holder.
        assert_eq!(c.renew("a", t0, LEASE, 1), Ok(()));
    }

    #[test]
    fn a_renewal_never_shortens_the_lease() {
        let t0 = Instant::now();
        let mut c = Claims::default();
        c.claim(t0, LEASE, 1, id("a"));
        // A shorter lease (ownership left for less than the full lease).
        c.renew("a", t0 + Duration::from_millis(500), Duration::from_millis(100), 1).unwrap();
        assert_eq!(c.unclaimed_write(t0 + Duration::from_secs(2)), Err(Duration::from_secs(1)));
    }

    #[test]
    fn closing_supersedes_and_says_how_long_the_lease_still_runs() {
        let t0 = Instant::now();
        let mut c = Claims::default();
        assert_eq!(c.close(t0), Duration::ZERO);
        c.claim(t0, LEASE, 1, id("a"));
        assert_eq!(c.close(t0 + Duration::from_secs(1)), Duration::from_secs(2));
        assert_eq!(c.renew("a", t0 + Duration::from_secs(1), LEASE, 1), Err(Superseded));
        assert_eq!(c.close(t0 + LEASE + LEASE), Duration::ZERO);
    }
}
