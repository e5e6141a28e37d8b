//! Events bound to their place in the log.
//!
//! A sealed event cannot be forged or moved to another session, but its
//! sealed bytes can be published again — by anyone who may write to the
//! stream, no key needed. The copy lands at the end of the session's
//! subject, where a replay would apply it after everything that followed the
//! original: a `creds.put` copied so rolls the creds back. So every event
//! seals, in [`Event::prev`], the sequence of the session's previous event
//! when it was appended (the log's expected-last-sequence fence makes that
//! true), and every reader checks it against the sequence of the message
//! that precedes it on the subject. [`Chain`] is that check, pure: a reader
//! feeds it one session's messages in log order.
//!
//! For an event at sequence `seq` whose predecessor on the subject is at
//! `last` (0: none):
//!
//! - `prev == last`: it [fits](Link::Fits).
//! - `prev < last`: it was written at another place — a copy of an older
//!   event put at the end of the subject, or a reorder in a stream restored
//!   from a crafted copy. It is [refused](Link::Refused): never applied, and
//!   the reader goes on. Refusing it rather than failing the session is
//!   deliberate: nothing forged is applied either way, and the bot keeps
//!   working. The reader's state still moves to `seq`
//!   (`SessionState::pass_over`): the copy is the session's last message,
//!   which the next append is fenced on and the next event names as `prev`.
//!   The copy stays in the log (nothing may delete it), so every reader that
//!   passes it refuses it again.
//! - `prev > last`: the event names a predecessor the reader never saw. An
//!   event is missing (a stream restored from an incomplete copy), or the
//!   reader started from a sequence that is not the session's. That is a
//!   [gap](Link::Gap): the state cannot be vouched for, and the reader stops
//!   with an error (the service answers 520 for the session).
//!
//! Events written before the chain existed have no `prev`. They are
//! accepted while no chained event has been seen. After a chained event, an
//! unchained one is either a write by an instance of the previous release
//! (during a rolling upgrade, or after a rollback) or a copy of a pre-chain
//! event. It is accepted only if it was decided no earlier than the newest
//! event seen (`at_ms`) — a write made after the chained events was, a copy
//! of an older event was not — and refused like a copy otherwise. Refusing
//! every unchained event after a chained one would drop the acknowledged
//! writes of the instances not yet upgraded.
//!
//! Limits, stated as what can still pass:
//!
//! - A session whose whole history predates the chain can have any of its
//!   events copied to the end and accepted: nothing in them says where they
//!   belong. Its first write by this release closes that.
//! - After chained events, a copy of the newest unchained event (same
//!   `at_ms`) passes: it changes nothing for whole values, and a patch
//!   applied twice fails (`ApplyError`, the session answers 520).
//! - An instance of the previous release whose clock is behind the chained
//!   writer's by more than the time between their writes of one session has
//!   its write refused (logged and counted like a copy).
//! - The loss of a session's newest events (a stream truncated by a restore)
//!   cannot show in a chain, since no later event names them; a live state
//!   ahead of the log is detected by the actor instead.
//!
//! A reader that starts from the middle — after the sequence of a state it
//! already holds, in memory or from a projection — starts with
//! [`Chain::after`]. That sequence *is* the previous message's: every
//! sequence a state holds is one of the session's messages (an applied or
//! passed-over event) or 0. Whether chained events precede is then unknown,
//! so an unchained first event asks for the predecessor to be read
//! ([`Link::NeedPredecessor`]). A chained predecessor is
//! [learned](Chain::learn); an unchained one (it may itself be a refused
//! copy) says nothing of what came before it, so the reader then checks the
//! history from the start up to it instead.

use crate::event::Event;

/// What one reader knows of a session's log just before its next message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    /// Sequence of the previous message on the session's subject (0: none).
    last: u64,
    /// Whether what precedes the first message read is known: from the
    /// start, or after [`Chain::learn`].
    known: bool,
    /// Whether a chained event was seen (fitting or not).
    chained: bool,
    /// The newest `at_ms` of the events that fitted or were learned.
    newest_at_ms: Option<u64>,
}

/// Where an event stands, as [`Chain::check`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// It is where it was written: apply it.
    Fits,
    /// It is not where it was written: skip it, never apply it.
    Refused(Refusal),
    /// It names a predecessor at `prev` that the reader never saw (the
    /// previous message is at `last`): an event is missing.
    Gap {
        /// The predecessor the event names.
        prev: u64,
        /// The previous message's sequence.
        last: u64,
    },
    /// An unchained event read from the middle: learn the predecessor
    /// ([`Chain::learn`]), then check the event again.
    NeedPredecessor,
}

/// Why an event was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It names an earlier predecessor than the message before it.
    #[error("it was appended after sequence {prev} but follows {last}: a copy of an older event")]
    Displaced {
        /// The predecessor the event names.
        prev: u64,
        /// The previous message's sequence.
        last: u64,
    },
    /// It has no place in the chain and is older than the newest event seen.
    #[error("it predates the chain and is older than the session's newest event ({at_ms} < {newest_at_ms} ms): a copy of an older event")]
    Unchained {
        /// When the event was decided.
        at_ms: u64,
        /// When the newest event seen was decided.
        newest_at_ms: u64,
    },
}

impl Default for Chain {
    fn default() -> Self {
        Self::from_start()
    }
}

impl Chain {
    /// A reader of the session's log from its first message.
    pub fn from_start() -> Self {
        Self { last: 0, known: true, chained: false, newest_at_ms: None }
    }

    /// A reader of the messages after sequence `seq`, which is the session's
    /// message just before them (or 0: the start).
    pub fn after(seq: u64) -> Self {
        match seq {
            0 => Self::from_start(),
            last => Self { last, known: false, chained: false, newest_at_ms: None },
        }
    }

    /// Takes in the event at the sequence the reader started after, as
    /// [`Link::NeedPredecessor`] asks. Only a chained predecessor tells
    /// enough (the log is chained, and how new its events are); after an
    /// unchained one, check the history from the start instead.
    pub fn learn(&mut self, predecessor: &Event) {
        self.known = true;
        self.chained |= predecessor.prev.is_some();
        self.newest_at_ms = Some(self.newest_at_ms.unwrap_or(0).max(predecessor.at_ms));
    }

    /// The sequence of the last message checked (or the one started after).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Checks the event at `seq`, the session's next message, and moves past
    /// it unless the answer is [`Link::Gap`] or [`Link::NeedPredecessor`].
    /// `seq` is above every sequence checked before: a message delivered
    /// again must not be checked again.
    pub fn check(&mut self, seq: u64, event: &Event) -> Link {
        debug_assert!(seq > self.last, "messages are checked once, in log order");
        let link = match event.prev {
            Some(prev) if prev == self.last => Link::Fits,
            Some(prev) if prev < self.last => Link::Refused(Refusal::Displaced { prev, last: self.last }),
            Some(prev) => return Link::Gap { prev, last: self.last },
            // Read from the middle, with nothing to compare it with yet.
            None if !self.known && self.newest_at_ms.is_none() => return Link::NeedPredecessor,
            None if !self.chained => Link::Fits,
            None => match self.newest_at_ms.unwrap_or(0) {
                newest if event.at_ms >= newest => Link::Fits,
                newest_at_ms => Link::Refused(Refusal::Unchained { at_ms: event.at_ms, newest_at_ms }),
            },
        };
        self.last = seq;
        // A chained event, even a refused copy, is sealed proof that the
        // session's log has chained events.
        self.chained |= event.prev.is_some();
        if link == Link::Fits {
            self.newest_at_ms = Some(self.newest_at_ms.unwrap_or(0).max(event.at_ms));
        }
        link
    }
}

#[cfg(test)]
mod tests {
    //! Given the messages a reader has seen, when the next one arrives, then
    //! this is where it stands.

    use super::*;
    use crate::event::Change;

    fn ev(at_ms: u64, prev: Option<u64>) -> Event {
        Event { prev, ..Event::new(at_ms, None, Change::SessionDeleted) }
    }

    /// A reader from the start that has checked `seen` (sequence, event), each of which fitted.
    fn given(seen: &[(u64, Event)]) -> Chain {
        let mut chain = Chain::from_start();
        for (seq, e) in seen {
            assert_eq!(chain.check(*seq, e), Link::Fits, "given: {seq}");
        }
        chain
    }

    #[test]
    fn events_that_name_the_previous_message_fit() {
        let mut chain = given(&[(3, ev(10, Some(0))), (7, ev(11, Some(3)))]);
        assert_eq!(chain.check(12, &ev(12, Some(7))), Link::Fits);
        assert_eq!(chain.last(), 12);
    }

    #[test]
    fn the_first_event_names_zero() {
        assert_eq!(Chain::from_start().check(5, &ev(1, Some(0))), Link::Fits);
        assert_eq!(Chain::from_start().check(5, &ev(1, Some(2))), Link::Gap { prev: 2, last: 0 });
    }

    #[test]
    fn a_copy_of_an_older_event_at_the_end_is_refused_and_passed_over() {
        let mut chain = given(&[(3, ev(10, Some(0))), (7, ev(11, Some(3)))]);
        // The event of seq 3 published again lands at 9.
        assert_eq!(chain.check(9, &ev(10, Some(0))), Link::Refused(Refusal::Displaced { prev: 0, last: 7 }));
        assert_eq!(chain.last(), 9, "the copy is the last message now");
        // The next real append was fenced on 9 and names it.
        assert_eq!(chain.check(10, &ev(12, Some(9))), Link::Fits);
    }

    #[test]
    fn an_event_naming_a_predecessor_never_seen_is_a_gap_and_the_reader_stays() {
        let mut chain = given(&[(3, ev(10, Some(0)))]);
        assert_eq!(chain.check(9, &ev(11, Some(7))), Link::Gap { prev: 7, last: 3 });
        assert_eq!(chain.last(), 3);
        assert_eq!(chain.check(9, &ev(11, Some(8))), Link::Gap { prev: 8, last: 3 }, "a name of itself or later too");
    }

    #[test]
    fn unchained_events_fit_while_no_chained_one_was_seen() {
        let mut chain = given(&[(1, ev(50, None)), (2, ev(40, None))]);
        // Even an older one: a history that predates the chain cannot be checked.
        assert_eq!(chain.check(3, &ev(10, None)), Link::Fits);
        assert_eq!(chain.check(4, &ev(60, Some(3))), Link::Fits, "the first chained event names the last unchained one");
    }

    #[test]
    fn after_a_chained_event_an_older_unchained_one_is_refused() {
        let mut chain = given(&[(1, ev(10, None)), (2, ev(20, Some(1)))]);
        assert_eq!(chain.check(3, &ev(10, None)), Link::Refused(Refusal::Unchained { at_ms: 10, newest_at_ms: 20 }));
        assert_eq!(chain.check(4, &ev(21, Some(3))), Link::Fits);
    }

    #[test]
    fn after_a_chained_event_a_newer_unchained_one_is_a_write_of_the_previous_release() {
        let mut chain = given(&[(1, ev(10, Some(0)))]);
        assert_eq!(chain.check(2, &ev(10, None)), Link::Fits, "decided in the same millisecond");
        assert_eq!(chain.check(3, &ev(30, None)), Link::Fits);
        // A copy of the first of them after the second is older than the newest.
        assert_eq!(chain.check(4, &ev(10, None)), Link::Refused(Refusal::Unchained { at_ms: 10, newest_at_ms: 30 }));
        assert_eq!(chain.check(5, &ev(31, Some(4))), Link::Fits, "and an upgraded writer goes on from it");
    }

    #[test]
    fn a_reader_from_the_middle_takes_the_sequence_it_starts_after_as_the_previous_message() {
        let mut chain = Chain::after(7);
        assert_eq!(chain.check(9, &ev(1, Some(7))), Link::Fits);
        let mut chain = Chain::after(7);
        assert_eq!(chain.check(9, &ev(1, Some(3))), Link::Refused(Refusal::Displaced { prev: 3, last: 7 }));
        let mut chain = Chain::after(7);
        assert_eq!(chain.check(9, &ev(1, Some(8))), Link::Gap { prev: 8, last: 7 });
    }

    #[test]
    fn a_reader_from_the_middle_learns_the_predecessor_before_judging_an_unchained_event() {
        let copy = ev(10, None);
        let mut chain = Chain::after(7);
        assert_eq!(chain.check(9, &copy), Link::NeedPredecessor);
        assert_eq!(chain.last(), 7, "nothing moved");
        chain.learn(&ev(20, Some(3)));
        assert_eq!(chain.check(9, &copy), Link::Refused(Refusal::Unchained { at_ms: 10, newest_at_ms: 20 }));

        // A predecessor that predates the chain too: the history cannot be checked.
        let mut chain = Chain::after(7);
        assert_eq!(chain.check(9, &copy), Link::NeedPredecessor);
        chain.learn(&ev(20, None));
        assert_eq!(chain.check(9, &copy), Link::Fits);
    }

    #[test]
    fn a_reader_from_the_middle_that_saw_only_a_refused_copy_learns_before_judging() {
        let mut chain = Chain::after(7);
        assert!(matches!(chain.check(9, &ev(50, Some(2))), Link::Refused(_)));
        assert_eq!(chain.check(10, &ev(5, None)), Link::NeedPredecessor);
        chain.learn(&ev(20, None));
        assert_eq!(chain.check(10, &ev(5, None)), Link::Refused(Refusal::Unchained { at_ms: 5, newest_at_ms: 20 }));
    }

    #[test]
    fn a_reader_from_the_middle_that_saw_a_chained_event_fit_needs_no_predecessor() {
        let mut chain = Chain::after(7);
        assert_eq!(chain.check(9, &ev(50, Some(7))), Link::Fits);
        assert_eq!(chain.check(10, &ev(40, None)), Link::Refused(Refusal::Unchained { at_ms: 40, newest_at_ms: 50 }));
        assert_eq!(chain.check(11, &ev(50, None)), Link::Fits);
    }
}
