//! The plain policies: round robin, least loaded, and sticky sessions.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::sessions::Sessions;
use super::{least_loaded, Balance, Candidate, Decision, Policy, PolicyStats, Rotation, RouteInfo};

/// Each candidate in turn.
#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn pick(&self, _request: &RouteInfo, candidates: &[Candidate]) -> Decision {
        Decision {
            index: self.next.fetch_add(1, Ordering::Relaxed) % candidates.len(),
            branch: "round_robin",
        }
    }
}

/// The candidate with the lowest load, preferring lower memory pressure.
#[derive(Default)]
pub struct LeastLoaded {
    ties: Rotation,
}

impl Policy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least_loaded"
    }

    fn pick(&self, _request: &RouteInfo, candidates: &[Candidate]) -> Decision {
        Decision {
            index: least_loaded(candidates, self.ties.next()),
            branch: "least_loaded",
        }
    }
}

/// A conversation stays on the worker it started on, unless that worker is much busier than the
/// least loaded one; new conversations go to the least loaded worker.
pub struct Sticky {
    sessions: Sessions,
    balance: Balance,
    ties: Rotation,
}

impl Sticky {
    /// A sticky policy that gives way under `balance`.
    pub fn new(balance: Balance) -> Self {
        Sticky {
            sessions: Sessions::default(),
            balance,
            ties: Rotation::default(),
        }
    }
}

/// Follow `request`'s session to its worker if that worker is a candidate and not overloaded.
/// Returns the decision, or the branch to report when falling back to the least loaded worker.
pub(super) fn follow_session(
    sessions: &Sessions,
    balance: &Balance,
    request: &RouteInfo,
    candidates: &[Candidate],
    least: usize,
) -> Result<Decision, &'static str> {
    let Some(key) = request.session else {
        return Err("no_session");
    };
    let Some(worker) = sessions.get(key) else {
        return Err("new_session");
    };
    match candidates.iter().position(|c| c.id == worker) {
        None => Err("session_moved"),
        Some(i) if balance.overloaded(&candidates[i], &candidates[least]) => Err("overloaded"),
        Some(index) => Ok(Decision {
            index,
            branch: "session",
        }),
    }
}

impl Policy for Sticky {
    fn name(&self) -> &'static str {
        "sticky"
    }

    fn pick(&self, request: &RouteInfo, candidates: &[Candidate]) -> Decision {
        let least = least_loaded(candidates, self.ties.next());
        follow_session(&self.sessions, &self.balance, request, candidates, least).unwrap_or_else(
            |branch| Decision {
                index: least,
                branch,
            },
        )
    }

    fn routed(&self, request: &RouteInfo, worker: &Arc<str>) {
        if let Some(key) = request.session {
            self.sessions.set(key, worker);
        }
    }

    fn forget(&self, worker: &str) {
        self.sessions.forget(worker);
    }

    fn stats(&self) -> PolicyStats {
        PolicyStats {
            sessions: self.sessions.len(),
            tree_nodes: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{candidates, chat};
    use super::*;

    fn route(p: &dyn Policy, r: &RouteInfo, c: &[Candidate]) -> Decision {
        let d = p.pick(r, c);
        p.routed(r, &c[d.index].id);
        d
    }

    #[test]
    fn round_robin_cycles() {
        let p = RoundRobin::default();
        let c = candidates(&[0.0, 9.0, 0.0]);
        let picks: Vec<usize> = (0..4)
            .map(|_| route(&p, &RouteInfo::default(), &c).index)
            .collect();
        assert_eq!(picks, [0, 1, 2, 0]);
    }

    #[test]
    fn least_loaded_follows_load() {
        let c = candidates(&[2.0, 0.5, 1.0]);
        assert_eq!(
            LeastLoaded::default().pick(&RouteInfo::default(), &c).index,
            1
        );
    }

    #[test]
    fn sticky_keeps_a_conversation_together() {
        let p = Sticky::new(Balance { abs: 4.0, rel: 1.5 });
        let turn1 = chat("m", "hello", &[]);
        let d1 = route(&p, &turn1, &candidates(&[1.0, 0.0]));
        assert_eq!((d1.index, d1.branch), (1, "new_session"));
        // Worker 1 got busier, but within the margin: turn 2 stays.
        let turn2 = chat("m", "hello", &["hi!", "and then?"]);
        let d2 = route(&p, &turn2, &candidates(&[0.0, 3.0]));
        assert_eq!((d2.index, d2.branch), (1, "session"));
        // Far busier: the conversation moves, and stays where it moved.
        let d3 = route(&p, &turn2, &candidates(&[0.0, 9.0]));
        assert_eq!((d3.index, d3.branch), (0, "overloaded"));
        let d4 = route(&p, &turn2, &candidates(&[1.0, 0.0]));
        assert_eq!((d4.index, d4.branch), (0, "session"));
    }

    #[test]
    fn sticky_moves_off_a_vanished_or_forgotten_worker() {
        let p = Sticky::new(Balance { abs: 4.0, rel: 1.5 });
        let r = chat("m", "hello", &[]);
        route(&p, &r, &candidates(&[1.0, 0.0]));
        let only_w0 = &candidates(&[5.0])[..];
        assert_eq!(p.pick(&r, only_w0).branch, "session_moved");
        p.forget("w1");
        assert_eq!(p.pick(&r, &candidates(&[1.0, 0.0])).branch, "new_session");
        assert_eq!(p.pick(&RouteInfo::default(), only_w0).branch, "no_session");
    }
}
