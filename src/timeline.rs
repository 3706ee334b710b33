//! A stack's fault timeline as a pure type: which step is due next, and
//! which faults are in force. The playbook engine ([`crate::run`]) sleeps
//! until each step, performs it on the cluster, and tells the timeline
//! what happened; everything about order and overlap is decided here and
//! tested without a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::faults::Lasts;

/// A step of the timeline, for the fault at an index of the stack's faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Inject(usize),
    Revert(usize),
}

#[derive(Debug, Default)]
pub struct Timeline {
    /// Steps by due offset from the load's start; at one offset, injects
    /// before reverts, then by fault order.
    due: BTreeSet<(Duration, Step)>,
    /// Faults injected and not yet reverted, with what they left in place.
    in_force: BTreeMap<usize, Lasts>,
}

impl Timeline {
    /// A timeline that injects each fault at its offset.
    pub fn new(offsets: impl IntoIterator<Item = Duration>) -> Self {
        Self {
            due: offsets
                .into_iter()
                .enumerate()
                .map(|(i, at)| (at, Step::Inject(i)))
                .collect(),
            in_force: BTreeMap::new(),
        }
    }

    /// The next step and when it is due, taken off the timeline.
    pub fn next_step(&mut self) -> Option<(Duration, Step)> {
        self.due.pop_first()
    }

    /// Fault `i`, due at `at`, was injected and lasts so long: a fault that
    /// lasts a while is in force until its revert step (or the end).
    pub fn injected(&mut self, i: usize, at: Duration, lasts: Lasts) {
        match lasts {
            Lasts::Instant => {}
            Lasts::For(d) => {
                self.due.insert((at + d, Step::Revert(i)));
                self.in_force.insert(i, lasts);
            }
            Lasts::UntilEnd => {
                self.in_force.insert(i, lasts);
            }
        }
    }

    /// Fault `i` was reverted (on time, or because the stack ended);
    /// whether it was in force.
    pub fn reverted(&mut self, i: usize) -> bool {
        self.due.remove_if(|(_, step)| *step == Step::Revert(i));
        self.in_force.remove(&i).is_some()
    }

    /// The faults in force now, latest injected last.
    pub fn in_force(&self) -> Vec<usize> {
        self.in_force.keys().copied().collect()
    }
}

trait RemoveIf<T> {
    fn remove_if(&mut self, f: impl Fn(&T) -> bool);
}

impl<T: Ord + Clone> RemoveIf<T> for BTreeSet<T> {
    fn remove_if(&mut self, f: impl Fn(&T) -> bool) {
        self.retain(|item| !f(item));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn steps_come_in_time_order_with_reverts_after_their_duration() {
        // A delay 10–25 s, a kill at 20 s inside it, a drain from 30 s to the end.
        let mut t = Timeline::new([s(10), s(20), s(30)]);
        let mut seen = Vec::new();
        while let Some((at, step)) = t.next_step() {
            seen.push((at.as_secs(), step));
            match step {
                Step::Inject(0) => t.injected(0, at, Lasts::For(s(15))),
                Step::Inject(1) => t.injected(1, at, Lasts::Instant),
                Step::Inject(2) => t.injected(2, at, Lasts::UntilEnd),
                Step::Revert(i) => assert!(t.reverted(i)),
                Step::Inject(_) => unreachable!(),
            }
            if at == s(20) {
                assert_eq!(t.in_force(), vec![0], "a kill is never in force");
            }
        }
        assert_eq!(
            seen,
            vec![
                (10, Step::Inject(0)),
                (20, Step::Inject(1)),
                (25, Step::Revert(0)),
                (30, Step::Inject(2))
            ]
        );
        assert_eq!(t.in_force(), vec![2], "in force until the end");
        assert!(t.reverted(2));
        assert!(!t.reverted(2), "reverted once");
    }

    #[test]
    fn a_fault_reverted_early_has_no_revert_left_to_do() {
        let mut t = Timeline::new([s(5)]);
        let (at, _) = t.next_step().unwrap();
        t.injected(0, at, Lasts::For(s(60)));
        assert!(t.reverted(0), "the stack stopped: reverted at once");
        assert_eq!(t.next_step(), None, "its timed revert is gone");
    }

    #[test]
    fn at_one_instant_injects_come_before_reverts() {
        let mut t = Timeline::new([s(10), s(20)]);
        let (at, _) = t.next_step().unwrap();
        t.injected(0, at, Lasts::For(s(10)));
        assert_eq!(t.next_step(), Some((s(20), Step::Inject(1))));
        assert_eq!(t.next_step(), Some((s(20), Step::Revert(0))));
    }
}
