//! Which backend gets a request: the routing policies real stacks use,
//! as pure choices over a list of candidates.

use crate::playbook::RoutingPolicy;
use crate::tokens::mix;

/// What a policy may look at for one request.
pub struct RouteKey<'a> {
    /// The session header's value (policy `session`).
    pub session: Option<&'a str>,
    /// The start of the request body (policy `prefix-hash`).
    pub prefix: &'a [u8],
    /// A counter that advances per request (round-robin and tie-breaks).
    pub turn: usize,
}

fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x1000_0000_01b3)
    })
}

/// Picks an index into `in_flight` (one entry per routable backend, its
/// requests in flight). `None` when there is no candidate.
pub fn pick(policy: RoutingPolicy, in_flight: &[usize], key: &RouteKey) -> Option<usize> {
    let n = in_flight.len();
    if n == 0 {
        return None;
    }
    let rotate = key.turn % n;
    Some(match policy {
        RoutingPolicy::RoundRobin => rotate,
        RoutingPolicy::LeastRequest => (0..n)
            .map(|i| (rotate + i) % n)
            .min_by_key(|&i| in_flight[i])
            .unwrap_or(rotate),
        RoutingPolicy::Session => match key.session {
            Some(value) => (mix(hash(value.as_bytes())) % n as u64) as usize,
            None => rotate,
        },
        RoutingPolicy::PrefixHash => (mix(hash(key.prefix)) % n as u64) as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(turn: usize) -> RouteKey<'static> {
        RouteKey {
            session: None,
            prefix: b"",
            turn,
        }
    }

    #[test]
    fn round_robin_cycles() {
        let picks: Vec<_> = (0..6)
            .map(|t| pick(RoutingPolicy::RoundRobin, &[0, 0, 0], &key(t)).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_request_takes_the_idlest() {
        assert_eq!(
            pick(RoutingPolicy::LeastRequest, &[4, 1, 3], &key(0)),
            Some(1)
        );
        // Ties are broken by rotation, not always the first.
        assert_eq!(
            pick(RoutingPolicy::LeastRequest, &[2, 2, 2], &key(2)),
            Some(2)
        );
    }

    #[test]
    fn session_sticks_to_one_backend() {
        let k = |turn| RouteKey {
            session: Some("user-7"),
            prefix: b"",
            turn,
        };
        let first = pick(RoutingPolicy::Session, &[0; 5], &k(0));
        assert!((1..20).all(|t| pick(RoutingPolicy::Session, &[0; 5], &k(t)) == first));
    }

    #[test]
    fn nothing_to_pick_from_is_none() {
        assert_eq!(pick(RoutingPolicy::RoundRobin, &[], &key(0)), None);
    }
}
