//! Which backend serves a request: a pure function of the candidates'
//! loads and the session, so every rule is unit-tested without sockets.
//!
//! - `affinity` (default): rendezvous (highest-random-weight) hashing of
//!   the session over the candidates, so a conversation's turns reach the
//!   same vLLM and find its prefix in that server's prefix cache; when a
//!   backend fails or leaves, only its sessions move, and they move back
//!   when it returns (HRW: Thaler and Ravishankar, 1998). With a bounded
//!   load (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with
//!   Bounded Loads", 2018, as in Vimeo's and HAProxy's `hash-balance-factor`):
//!   a backend whose in-flight count would go above `1.25 x` the pool's
//!   mean is passed over for the next one in the session's order, so a
//!   few busy sessions cannot pile onto one GPU.
//! - `least-loaded`: the power of two random choices (Mitzenmacher): of
//!   two random candidates, the one with fewer requests in flight; nearly
//!   as good as asking every backend, without herding onto one.
//! - `round-robin`: in turn.
//!
//! The session key is (project, device, session): every session of a
//! project shares its system prompt, but spreading sessions (not
//! projects) keeps every GPU busy, and vLLM caches the shared system
//! prompt's blocks on each backend after the first request there anyway.
//!
//! The result is an order, not one backend: the worker tries the first
//! whose circuit admits it, and on a retryable failure the next one.

use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

/// How requests are spread over the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    #[default]
    Affinity,
    LeastLoaded,
    RoundRobin,
}

impl std::str::FromStr for Routing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "affinity" => Ok(Self::Affinity),
            "least-loaded" => Ok(Self::LeastLoaded),
            "round-robin" => Ok(Self::RoundRobin),
            other => Err(format!(
                "{other:?} is not one of affinity, least-loaded, round-robin"
            )),
        }
    }
}

/// A backend as routing sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Its index in the pool.
    pub index: usize,
    /// Its stable identity (a hash of its URL): a session's order must not
    /// change when other backends come and go.
    pub id: u64,
    /// Requests it has in flight from us now.
    pub in_flight: usize,
}

/// How far above the mean a backend may be loaded before affinity passes
/// it over (the paper's `1 + epsilon`; 1.25 is the value its authors and
/// Vimeo's deployment use).
pub const BALANCE_FACTOR: f64 = 1.25;

/// The order in which to try `candidates` for `session` (a hash of the
/// session key). `turn` drives round-robin and the random choices (pass a
/// counter or a random number).
pub fn order(routing: Routing, candidates: &[Candidate], session: u64, turn: u64) -> Vec<usize> {
    match routing {
        Routing::Affinity => affinity(candidates, session),
        Routing::LeastLoaded => least_loaded(candidates, turn),
        Routing::RoundRobin => round_robin(candidates, turn),
    }
}

/// Rendezvous order with the bounded-load rule applied to the head.
fn affinity(candidates: &[Candidate], session: u64) -> Vec<usize> {
    let mut ranked: Vec<(u64, Candidate)> = candidates
        .iter()
        .map(|c| (weight(session, c.id), *c))
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.index.cmp(&b.1.index)));
    // The cap: a backend may take this request if it then holds at most
    // ceil(factor x mean), the mean counting this request too.
    let total: usize = candidates.iter().map(|c| c.in_flight).sum::<usize>() + 1;
    let cap = (BALANCE_FACTOR * total as f64 / candidates.len().max(1) as f64).ceil() as usize;
    // Those over the cap go last, each group in rendezvous order (the
    // sort is stable).
    ranked.sort_by_key(|(_, c)| c.in_flight >= cap);
    ranked.into_iter().map(|(_, c)| c.index).collect()
}

/// Two random choices, the lighter first; then the rest, lightest first.
fn least_loaded(candidates: &[Candidate], turn: u64) -> Vec<usize> {
    let n = candidates.len();
    if n == 0 {
        return Vec::new();
    }
    let a = (mix(turn) % n as u64) as usize;
    let b = if n > 1 {
        (a + 1 + (mix(turn ^ 0x9e37_79b9_7f4a_7c15) % (n as u64 - 1)) as usize) % n
    } else {
        a
    };
    let first = if candidates[b].in_flight < candidates[a].in_flight {
        b
    } else {
        a
    };
    let mut rest: Vec<&Candidate> = candidates
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != first)
        .map(|(_, c)| c)
        .collect();
    rest.sort_by_key(|c| c.in_flight);
    std::iter::once(candidates[first].index)
        .chain(rest.into_iter().map(|c| c.index))
        .collect()
}

fn round_robin(candidates: &[Candidate], turn: u64) -> Vec<usize> {
    let n = candidates.len();
    (0..n)
        .map(|k| candidates[(turn as usize + k) % n].index)
        .collect()
}

/// The session's weight for one backend: a well-mixed hash of both.
fn weight(session: u64, backend: u64) -> u64 {
    mix(session ^ mix(backend))
}

/// SplitMix64's finaliser: cheap, and every input bit flips about half of
/// the output bits (what rendezvous hashing needs of its weights).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A stable 64-bit hash of anything hashable (the same in every run and
/// every instance of one build: `DefaultHasher::new()` has fixed keys,
/// unlike `RandomState`), for session keys and backend URLs.
pub fn stable_hash(value: &impl Hash) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(loads: &[usize]) -> Vec<Candidate> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &l)| Candidate {
                index: i,
                id: stable_hash(&format!("http://gpu{i}:8000/v1")),
                in_flight: l,
            })
            .collect()
    }

    #[test]
    fn affinity_keeps_a_session_on_one_backend_and_spreads_sessions() {
        let c = pool(&[0, 0, 0]);
        let mut per_backend = [0usize; 3];
        for s in 0..3000u64 {
            let key = stable_hash(&("maze", s));
            let first = order(Routing::Affinity, &c, key, 0)[0];
            // Same answer every time (and every turn).
            assert_eq!(order(Routing::Affinity, &c, key, 7)[0], first);
            per_backend[first] += 1;
        }
        for n in per_backend {
            assert!((800..1200).contains(&n), "{per_backend:?}");
        }
    }

    #[test]
    fn only_a_failed_backends_sessions_move_and_they_move_back() {
        let all = pool(&[0, 0, 0]);
        let without_1: Vec<Candidate> = all.iter().copied().filter(|c| c.index != 1).collect();
        for s in 0..500u64 {
            let key = stable_hash(&s);
            let before = order(Routing::Affinity, &all, key, 0)[0];
            let during = order(Routing::Affinity, &without_1, key, 0)[0];
            if before != 1 {
                assert_eq!(during, before, "a session not on the failed backend stayed");
            } else {
                // Its next choice in its own order.
                assert_eq!(during, order(Routing::Affinity, &all, key, 0)[1]);
            }
            assert_eq!(order(Routing::Affinity, &all, key, 0)[0], before);
        }
    }

    #[test]
    fn a_backend_far_above_the_mean_is_passed_over() {
        // Find a session whose first choice is backend 0.
        let idle = pool(&[0, 0, 0]);
        let key = (0u64..)
            .map(|s| stable_hash(&s))
            .find(|&k| order(Routing::Affinity, &idle, k, 0)[0] == 0)
            .unwrap();
        // Backend 0 holds 10 of 12 in flight: mean with this one 13/3,
        // cap ceil(1.25 x 13 / 3) = 6; it is tried last.
        let busy = pool(&[10, 1, 1]);
        let o = order(Routing::Affinity, &busy, key, 0);
        assert_ne!(o[0], 0);
        assert_eq!(o[2], 0);
        // Slightly above the mean is fine: affinity holds.
        let warm = pool(&[3, 2, 2]);
        assert_eq!(order(Routing::Affinity, &warm, key, 0)[0], 0);
    }

    #[test]
    fn least_loaded_picks_the_lighter_of_two_and_round_robin_turns() {
        let c = pool(&[5, 0, 5]);
        let mut light = 0;
        for t in 0..300 {
            let o = order(Routing::LeastLoaded, &c, 0, t);
            assert_eq!(o.len(), 3);
            if o[0] == 1 {
                light += 1;
            }
        }
        // The light backend wins whenever it is one of the two drawn
        // (2/3 of draws): far more than its 1/3 fair share.
        assert!(light > 170, "{light}");
        let c = pool(&[0, 0, 0]);
        let firsts: Vec<usize> = (0..6)
            .map(|t| order(Routing::RoundRobin, &c, 0, t)[0])
            .collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        assert!(order(Routing::LeastLoaded, &[], 0, 0).is_empty());
    }
}
