//! Multi-round chat sessions, as production-stack's multi-round QA
//! benchmark drives a stack: `users` people, each asking `rounds`
//! questions in one conversation, every question sent with the whole
//! history so far (earlier questions and the answers received), then
//! starting a new conversation. A header names the user, so that a
//! session-affinity router can keep a conversation on one engine.
//!
//! The load stays open loop: the arrival process still decides when a
//! request goes out, and it goes to the user who has waited longest among
//! those neither waiting for an answer nor within `think_time` of the last
//! one. When every user is busy the request is recorded `dropped`, as at
//! `max_in_flight`, instead of being delayed: an outage shows up as drops,
//! never as a quietly slower load. Size `users` for the rate: each user
//! asks at most once per answer time plus think time.

use std::sync::Mutex;

use reqwest::header::HeaderName;

use crate::record::Turn;

#[derive(Debug)]
pub struct Sessions {
    rounds: u32,
    think_s: f64,
    header: HeaderName,
    users: Mutex<Vec<User>>,
    /// The users played here are `first`, `first + step`, …: all of them,
    /// or one load agent's ([`super::shard`]).
    first: u32,
    step: u32,
}

#[derive(Debug, Default)]
struct User {
    busy: bool,
    free_at_s: f64,
    /// Rounds done in the current conversation.
    round: u32,
    /// Earlier (question, answer) pairs of the current conversation.
    history: Vec<(String, String)>,
}

/// One user's turn: what to send and who sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ticket {
    pub turn: Turn,
    pub history: Vec<(String, String)>,
}

impl Sessions {
    /// Every user of `spec`, or one agent's share of them.
    pub fn new(
        spec: &crate::playbook::Sessions,
        shard: Option<super::shard::Shard>,
    ) -> anyhow::Result<Self> {
        let header = HeaderName::from_bytes(spec.user_header.as_bytes())
            .map_err(|_| anyhow::anyhow!("`{}` is not an HTTP header name", spec.user_header))?;
        let (first, step) = shard.map_or((0, 1), |s| (s.index, s.count.max(1)));
        let users = match shard {
            Some(shard) => shard.users(spec.users.max(1)).count(),
            None => spec.users.max(1) as usize,
        };
        anyhow::ensure!(
            users > 0,
            "{} session users cannot be shared by {step} agents: give at least one user per agent",
            spec.users
        );
        Ok(Self {
            rounds: spec.rounds.max(1),
            think_s: spec.think_time.0.as_secs_f64(),
            header,
            users: Mutex::new((0..users).map(|_| User::default()).collect()),
            first,
            step,
        })
    }

    pub fn user_count(&self) -> usize {
        self.lock().len()
    }

    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// The header value that names `user`.
    pub fn user_name(user: u32) -> String {
        format!("user-{user}")
    }

    /// Hands the turn at `now_s` to the user free the longest, or `None`
    /// when every user is waiting for an answer or thinking.
    pub fn take(&self, now_s: f64) -> Option<Ticket> {
        let mut users = self.lock();
        let (index, user) = users
            .iter_mut()
            .enumerate()
            .filter(|(_, u)| !u.busy && u.free_at_s <= now_s)
            .min_by(|a, b| a.1.free_at_s.total_cmp(&b.1.free_at_s))?;
        user.busy = true;
        Some(Ticket {
            turn: Turn {
                user: self.first + index as u32 * self.step,
                round: user.round + 1,
            },
            history: user.history.clone(),
        })
    }

    /// Ends a turn at `now_s`: the answer joins the history (a failed round
    /// adds nothing), and after the last round a new conversation starts.
    pub fn give_back(&self, turn: Turn, question: String, answer: Option<String>, now_s: f64) {
        let mut users = self.lock();
        let Some(local) = turn.user.checked_sub(self.first).map(|u| u / self.step) else {
            return;
        };
        let Some(user) = users.get_mut(local as usize) else {
            return;
        };
        if let Some(answer) = answer {
            user.history.push((question, answer));
        }
        user.round += 1;
        if user.round >= self.rounds {
            user.round = 0;
            user.history.clear();
        }
        user.busy = false;
        user.free_at_s = now_s + self.think_s;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<User>> {
        // A panic elsewhere while holding it leaves plain data: go on with it.
        self.users
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::playbook::HumanDuration;

    fn sessions(users: u32, rounds: u32, think: f64) -> Sessions {
        Sessions::new(
            &crate::playbook::Sessions {
                users,
                rounds,
                think_time: HumanDuration::from_secs_f64(think),
                user_header: "x-user-id".into(),
            },
            None,
        )
        .unwrap()
    }

    #[test]
    fn busy_and_thinking_users_are_skipped_and_the_longest_free_goes_first() {
        let s = sessions(2, 3, 1.0);
        let a = s.take(0.0).unwrap();
        let b = s.take(0.0).unwrap();
        assert_eq!((a.turn.user, b.turn.user), (0, 1));
        assert_eq!(s.take(0.1), None, "both wait for an answer");
        s.give_back(b.turn, "q".into(), Some("a".into()), 0.5);
        s.give_back(a.turn, "q".into(), Some("a".into()), 0.7);
        assert_eq!(s.take(1.2), None, "both still think");
        assert_eq!(s.take(1.6).unwrap().turn, Turn { user: 1, round: 2 });
    }

    #[test]
    fn history_grows_each_round_and_a_new_conversation_starts_after_the_last() {
        let s = sessions(1, 3, 0.0);
        for round in 1..=3 {
            let ticket = s.take(f64::from(round)).unwrap();
            assert_eq!(ticket.turn.round, round);
            assert_eq!(ticket.history.len() as u32, round - 1);
            s.give_back(
                ticket.turn,
                format!("q{round}"),
                Some(format!("a{round}")),
                f64::from(round),
            );
        }
        let fresh = s.take(9.0).unwrap();
        assert_eq!((fresh.turn.round, fresh.history.len()), (1, 0));
        s.give_back(fresh.turn, "q".into(), None, 9.0);
        assert!(
            s.take(9.0).unwrap().history.is_empty(),
            "a failed round adds nothing"
        );
    }

    #[test]
    fn an_agent_plays_its_own_users_by_their_global_numbers() {
        let spec = crate::playbook::Sessions {
            users: 5,
            rounds: 2,
            think_time: HumanDuration::from_secs_f64(0.0),
            user_header: "x-user-id".into(),
        };
        let s = Sessions::new(
            &spec,
            Some(super::super::shard::Shard { index: 1, count: 2 }),
        )
        .unwrap();
        let (a, b) = (s.take(0.0).unwrap(), s.take(0.0).unwrap());
        assert_eq!((a.turn.user, b.turn.user), (1, 3));
        assert_eq!(s.take(0.0), None);
        s.give_back(b.turn, "q".into(), Some("a".into()), 0.0);
        assert_eq!(s.take(0.1).unwrap().turn, Turn { user: 3, round: 2 });
        let lonely = Sessions::new(
            &spec,
            Some(super::super::shard::Shard { index: 5, count: 6 }),
        );
        assert!(lonely.is_err(), "an agent without a user says so");
    }
}
