//! Splitting one open-loop schedule between load agents.
//!
//! Every agent draws the whole schedule from the playbook's seed and sends
//! only its shard of it: request `id` belongs to agent `(id − 1) mod N`,
//! and a session user `u` to agent `u mod N`. So the shards' union is
//! exactly the schedule one generator would send, request for request
//! (same ids, same send times), and the coordinator can tell, from the
//! schedule alone, which requests a lost agent owed. Pure: no I/O.

use serde::{Deserialize, Serialize};

use super::arrival::Arrivals;

/// One agent's part of the load: agent `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// The agent that sends request `id` (ids count from 1).
    pub fn of_request(id: u64, count: u32) -> u32 {
        (id.saturating_sub(1) % u64::from(count.max(1))) as u32
    }

    pub fn owns_request(&self, id: u64) -> bool {
        Self::of_request(id, self.count) == self.index
    }

    /// The session users this agent plays, in order.
    pub fn users(&self, total: u32) -> impl Iterator<Item = u32> + use<> {
        (self.index..total).step_by(self.count.max(1) as usize)
    }

    /// This agent's share of `max_in_flight`, rounded up: the agents
    /// together hold at least as many requests in flight as one would.
    pub fn max_in_flight(&self, total: usize) -> usize {
        total.div_ceil(self.count.max(1) as usize).max(1)
    }
}

/// The schedule: each request's id (from 1) and its send time in seconds
/// from the load's start, until `end`.
pub struct Offsets {
    arrivals: Arrivals,
    offset: f64,
    id: u64,
    end: f64,
}

impl Offsets {
    pub fn new(arrivals: Arrivals, end: f64) -> Self {
        Self {
            arrivals,
            offset: 0.0,
            id: 0,
            end,
        }
    }
}

impl Iterator for Offsets {
    type Item = (u64, f64);

    fn next(&mut self) -> Option<(u64, f64)> {
        self.offset += self.arrivals.next_gap(self.offset);
        if self.offset >= self.end {
            return None;
        }
        self.id += 1;
        Some((self.id, self.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::playbook::Arrival;

    #[test]
    fn the_shards_cover_the_schedule_once() {
        let count = 3;
        let mut owners = vec![0u32; 100];
        for index in 0..count {
            let shard = Shard { index, count };
            for id in 1..=100u64 {
                if shard.owns_request(id) {
                    owners[id as usize - 1] += 1;
                }
            }
        }
        assert!(owners.iter().all(|&n| n == 1), "{owners:?}");
        let users: Vec<Vec<u32>> = (0..count)
            .map(|index| Shard { index, count }.users(7).collect())
            .collect();
        assert_eq!(users, vec![vec![0, 3, 6], vec![1, 4], vec![2, 5]]);
        assert_eq!(Shard { index: 0, count }.max_in_flight(10), 4);
        assert_eq!(Shard { index: 0, count }.max_in_flight(1), 1);
    }

    #[test]
    fn the_schedule_is_the_seed_s_alone() {
        let draw = || {
            let arrivals = Arrivals::new(Arrival::Poisson, 50.0, None, 7).unwrap();
            Offsets::new(arrivals, 2.0).collect::<Vec<_>>()
        };
        let (a, b) = (draw(), draw());
        assert_eq!(a, b);
        assert!(a.len() > 50 && a.len() < 150, "{}", a.len());
        assert!(
            a.windows(2)
                .all(|w| w[1].0 == w[0].0 + 1 && w[1].1 >= w[0].1)
        );
        assert!(a.last().unwrap().1 < 2.0);
    }
}
