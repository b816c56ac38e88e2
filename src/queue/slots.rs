//! The producer's slot arithmetic, apart from any I/O so it can be tested
//! on its own.
//!
//! A job holds a slot from its claim until its outcome is written (or until
//! it reports that there is nothing to write). Outcomes waiting to be
//! written still hold their slots, but a write cycle frees them and claims
//! in the same statement, so a cycle may claim as many jobs as the slots
//! free now plus those it is about to free. An outcome whose row was locked
//! by another transaction is deferred: it keeps its slot and is written
//! again once it is due.

use std::time::{Duration, Instant};

use super::completer::Finished;

/// How soon an outcome whose row another transaction holds is tried again:
/// at once at first (another worker's claim may hold it for a moment while
/// it re-checks the row), then backing off to the longest wait, for a row
/// the app holds.
const DEFERRED_FIRST: Duration = Duration::from_millis(2);
const DEFERRED_LONGEST: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct Slots {
    size: usize,
    /// Jobs claimed whose outcome is not yet written.
    in_use: usize,
    /// Outcomes reported and waiting for the next write cycle.
    pub unwritten: Vec<Finished>,
    /// Outcomes whose rows were locked, and when to try them again.
    deferred: Vec<(Finished, Instant)>,
}

impl Slots {
    pub fn new(size: usize) -> Slots {
        Slots {
            size,
            in_use: 0,
            unwritten: Vec::new(),
            deferred: Vec::new(),
        }
    }

    /// Keeps an outcome that could not be written (its row was locked)
    /// and its slot, to try again after a backoff that grows with each
    /// deferral. The write cycle that deferred it claimed one job fewer
    /// for it.
    pub fn defer(&mut self, mut finished: Finished, now: Instant) {
        let wait = DEFERRED_FIRST
            .saturating_mul(1 << finished.deferrals.min(16))
            .min(DEFERRED_LONGEST);
        finished.deferrals += 1;
        self.in_use += 1;
        self.deferred.push((finished, now + wait));
    }

    /// Moves the deferred outcomes due by `now` back to be written.
    pub fn take_due(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|(_, at)| *at <= now);
        self.deferred = later;
        self.unwritten.extend(due.into_iter().map(|(f, _)| f));
    }

    /// When the next deferred outcome is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.deferred.iter().map(|(_, at)| *at).min()
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Slots free once the unwritten outcomes are recorded. None while
    /// more jobs run than there are slots (the size was lowered by a
    /// reload): they finish, and only then are jobs claimed again.
    pub fn free_after_write(&self) -> usize {
        self.size.saturating_sub(self.in_use - self.unwritten.len())
    }

    /// A new number of slots (a reload). Running jobs keep theirs.
    pub fn resize(&mut self, size: usize) {
        self.size = size;
    }

    /// Whether every running job has reported: nothing more to gather.
    pub fn all_reported(&self) -> bool {
        self.unwritten.len() == self.in_use
    }

    /// An executor's report: an outcome to record, or none, which frees
    /// its slot at once.
    pub fn reported(&mut self, finished: Option<Finished>) {
        match finished {
            Some(f) => self.unwritten.push(f),
            None => self.in_use -= 1,
        }
    }

    /// How many jobs the next write cycle may claim.
    pub fn to_claim(&self, claiming: bool) -> i64 {
        if claiming {
            self.free_after_write() as i64
        } else {
            0
        }
    }

    /// A write cycle handled every unwritten outcome and claimed `claimed`
    /// jobs; returns the outcomes, in the order given (those it deferred go
    /// back through [`Slots::defer`]).
    pub fn cycle_done(&mut self, claimed: usize) -> Vec<Finished> {
        self.in_use -= self.unwritten.len();
        self.in_use += claimed;
        std::mem::take(&mut self.unwritten)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::completer::Outcome;
    use crate::store::Attempt;

    fn finished(n: u128) -> Option<Finished> {
        let key = Attempt {
            id: uuid::Uuid::from_u128(n),
            attempt: 1,
        };
        Some(Finished::new(key, Outcome::Completed))
    }

    #[test]
    fn a_cycle_claims_the_free_slots_plus_those_it_frees() {
        let mut s = Slots::new(4);
        assert_eq!(s.to_claim(true), 4);
        s.cycle_done(4);
        assert_eq!(s.to_claim(true), 0);
        s.reported(finished(1));
        s.reported(finished(2));
        // Two outcomes to write: the cycle that writes them may claim two.
        assert_eq!(s.to_claim(true), 2);
        assert!(!s.all_reported());
        let written = s.cycle_done(1);
        assert_eq!(written.len(), 2);
        assert_eq!(s.in_use(), 3);
        assert_eq!(s.to_claim(true), 1);
    }

    #[test]
    fn a_job_with_nothing_to_write_frees_its_slot_at_once() {
        let mut s = Slots::new(2);
        s.cycle_done(2);
        s.reported(None);
        assert_eq!(s.in_use(), 1);
        assert!(s.unwritten.is_empty());
        assert_eq!(s.to_claim(true), 1);
    }

    #[test]
    fn after_shutdown_begins_nothing_is_claimed_but_outcomes_are_written() {
        let mut s = Slots::new(3);
        s.cycle_done(3);
        s.reported(finished(1));
        assert_eq!(s.to_claim(false), 0);
        assert_eq!(s.cycle_done(0).len(), 1);
        assert_eq!(s.in_use(), 2);
        s.reported(finished(2));
        s.reported(finished(3));
        assert!(s.all_reported());
        s.cycle_done(0);
        assert_eq!(s.in_use(), 0);
    }

    #[test]
    fn a_deferred_outcome_keeps_its_slot_until_it_is_written() {
        let mut s = Slots::new(2);
        s.cycle_done(2);
        s.reported(finished(1));
        let now = Instant::now();
        let written = s.cycle_done(0);
        for f in written {
            s.defer(f, now);
        }
        assert_eq!(s.in_use(), 2, "the deferred job still holds its slot");
        assert_eq!(s.to_claim(true), 0);
        s.take_due(now);
        assert!(s.unwritten.is_empty(), "not due yet");
        assert_eq!(s.next_due(), Some(now + DEFERRED_FIRST));
        s.take_due(now + Duration::from_secs(1));
        assert_eq!(s.unwritten.len(), 1);
        assert_eq!(s.next_due(), None);
        assert_eq!(s.to_claim(true), 1, "writing it frees its slot");
        s.cycle_done(0);
        assert_eq!(s.in_use(), 1);
    }

    #[test]
    fn a_row_held_long_is_retried_ever_less_often_up_to_the_longest_wait() {
        let mut s = Slots::new(1);
        let now = Instant::now();
        let mut waits = Vec::new();
        let mut f = finished(1).unwrap();
        for _ in 0..12 {
            s.defer(f, now);
            waits.push(s.next_due().unwrap() - now);
            s.take_due(now + DEFERRED_LONGEST);
            f = s.cycle_done(0).pop().unwrap();
        }
        assert_eq!(waits[0], DEFERRED_FIRST);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), DEFERRED_LONGEST);
    }

    #[test]
    fn never_more_running_than_slots_whatever_the_order() {
        // Every order of reports (with or without an outcome) and cycles.
        for pattern in 0u32..(1 << 10) {
            let mut s = Slots::new(3);
            let mut running = 0usize;
            let mut next = 0u128;
            for step in 0..10 {
                if pattern & (1 << step) != 0 && running > 0 {
                    running -= 1;
                    next += 1;
                    s.reported(if step % 3 == 0 { None } else { finished(next) });
                } else {
                    let claim = s.to_claim(true) as usize;
                    s.cycle_done(claim);
                    running += claim;
                }
                assert!(running <= 3, "pattern {pattern:b}");
                assert_eq!(
                    s.in_use(),
                    running + s.unwritten.len(),
                    "pattern {pattern:b}"
                );
            }
        }
    }

    #[test]
    fn resizing_claims_more_at_once_or_none_until_running_jobs_fit() {
        let mut s = Slots::new(2);
        s.cycle_done(2);
        assert_eq!(s.to_claim(true), 0);
        s.resize(8);
        assert_eq!(s.to_claim(true), 6);
        s.cycle_done(6);
        s.resize(3);
        // Eight running, three slots: nothing claimed until five finish.
        for n in 0..5 {
            assert_eq!(s.to_claim(true), 0, "after {n} reports");
            s.reported(finished(n));
        }
        assert_eq!(s.to_claim(true), 0, "five written leave three running");
        s.reported(finished(5));
        assert_eq!(s.to_claim(true), 1);
    }
}
