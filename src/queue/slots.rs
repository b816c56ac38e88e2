//! The producer's slot arithmetic, apart from any I/O so it can be tested
//! on its own.
//!
//! A job holds a slot from its claim until its outcome is written (or until
//! it reports that there is nothing to write). Outcomes waiting to be
//! written still hold their slots, but a write cycle frees them and claims
//! in the same statement, so a cycle may claim as many jobs as the slots
//! free now plus those it is about to free.

use super::completer::Finished;

#[derive(Debug)]
pub struct Slots {
    size: usize,
    /// Jobs claimed whose outcome is not yet written.
    in_use: usize,
    /// Outcomes reported and waiting for the next write cycle.
    pub unwritten: Vec<Finished>,
}

impl Slots {
    pub fn new(size: usize) -> Slots {
        Slots {
            size,
            in_use: 0,
            unwritten: Vec::new(),
        }
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Slots free once the unwritten outcomes are recorded.
    pub fn free_after_write(&self) -> usize {
        self.size - self.in_use + self.unwritten.len()
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

    /// A write cycle recorded every unwritten outcome and claimed `claimed`
    /// jobs; returns the outcomes, in the order written.
    pub fn cycle_done(&mut self, claimed: usize) -> Vec<Finished> {
        self.in_use -= self.unwritten.len();
        self.in_use += claimed;
        debug_assert!(self.in_use <= self.size);
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
        Some(Finished::new(key, None, Outcome::Completed))
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
}
