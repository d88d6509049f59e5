//! Routing: which worker takes a request. A [`Policy`] picks among candidates that serve the model;
//! every decision reports the branch it took, counted in metrics by policy and branch.

mod cache_aware;
mod prefix_tree;
pub mod request;
mod sessions;
mod simple;

use std::sync::Arc;

pub use cache_aware::CacheAware;
pub use request::{RouteInfo, SessionKey};
pub use simple::{LeastLoaded, RoundRobin, Sticky};

use crate::config::{PolicyName, Settings};
use crate::memory::Pressure;

/// A worker able to take the request, as the policy sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The worker's id (`X-Worker-Id`).
    pub id: Arc<str>,
    /// In-flight requests divided by the worker's weight.
    pub load: f64,
    /// The worker's last reported memory pressure.
    pub pressure: Pressure,
}

/// A policy's choice: an index into the candidates, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Index into the candidate slice.
    pub index: usize,
    /// The branch taken; a bounded metric label.
    pub branch: &'static str,
}

/// A routing policy. Object-safe; shared by all requests.
pub trait Policy: Send + Sync {
    /// The policy's name; a metric label.
    fn name(&self) -> &'static str;
    /// Choose among `candidates` (never empty).
    fn pick(&self, request: &RouteInfo, candidates: &[Candidate]) -> Decision;
    /// The request went to `worker` (after any failover): remember what the policy needs.
    fn routed(&self, _request: &RouteInfo, _worker: &Arc<str>) {}
    /// `worker` restarted or left: whatever it had cached is gone.
    fn forget(&self, _worker: &str) {}
    /// Sessions remembered and prefix-tree nodes per worker, for metrics.
    fn stats(&self) -> PolicyStats {
        PolicyStats::default()
    }
}

/// Sizes a policy reports to metrics.
#[derive(Debug, Default)]
pub struct PolicyStats {
    /// Sessions remembered.
    pub sessions: usize,
    /// Prefix-tree nodes per worker.
    pub tree_nodes: Vec<(Arc<str>, usize)>,
}

/// When a preferred worker is too busy compared with the least loaded one.
#[derive(Debug, Clone, Copy)]
pub struct Balance {
    /// Allowed excess in load (in-flight requests per unit weight).
    pub abs: f64,
    /// Allowed ratio of loads.
    pub rel: f64,
}

impl Balance {
    /// Whether `preferred` should give way to `least` (worse memory pressure, or busier by both margins).
    pub fn overloaded(&self, preferred: &Candidate, least: &Candidate) -> bool {
        preferred.pressure > least.pressure
            || (preferred.load - least.load > self.abs && preferred.load > least.load * self.rel)
    }
}

/// Index of the least loaded candidate, preferring lower memory pressure. Ties go to the first
/// one at or after `start`, so callers that rotate `start` spread new work over idle workers.
pub fn least_loaded(candidates: &[Candidate], start: usize) -> usize {
    let n = candidates.len();
    let mut best = start % n;
    for i in (0..n).map(|k| (start + k) % n) {
        let (c, b) = (&candidates[i], &candidates[best]);
        if (c.pressure, c.load) < (b.pressure, b.load) {
            best = i;
        }
    }
    best
}

/// A rotating start for [`least_loaded`]'s tie-break.
#[derive(Debug, Default)]
pub struct Rotation(std::sync::atomic::AtomicUsize);

impl Rotation {
    /// The next start.
    pub fn next(&self) -> usize {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Build the policy chosen by `--policy`.
pub fn build(settings: &Settings) -> Arc<dyn Policy> {
    let flags = &settings.flags;
    let balance = Balance {
        abs: flags.balance_abs_threshold,
        rel: flags.balance_rel_threshold,
    };
    match flags.policy {
        PolicyName::CacheAware => Arc::new(CacheAware::new(flags.cache_threshold, balance)),
        PolicyName::Sticky => Arc::new(Sticky::new(balance)),
        PolicyName::LeastLoaded => Arc::new(LeastLoaded::default()),
        PolicyName::RoundRobin => Arc::new(RoundRobin::default()),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Candidates `w0..wn` with the given loads and normal pressure.
    pub fn candidates(loads: &[f64]) -> Vec<Candidate> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &load)| Candidate {
                id: format!("w{i}").into(),
                load,
                pressure: Pressure::Normal,
            })
            .collect()
    }

    /// A chat request whose first user turn is `first` and whose later turns are `rest`.
    pub fn chat(model: &str, first: &str, rest: &[&str]) -> RouteInfo {
        let mut messages = vec![serde_json::json!({"role": "user", "content": first})];
        for (i, text) in rest.iter().enumerate() {
            let role = if i % 2 == 0 { "assistant" } else { "user" };
            messages.push(serde_json::json!({"role": role, "content": text}));
        }
        let body = serde_json::json!({"model": model, "messages": messages});
        RouteInfo::from_request(&axum::http::HeaderMap::new(), body.to_string().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::candidates;
    use super::*;

    #[test]
    fn least_loaded_prefers_low_pressure_then_low_load() {
        let mut c = candidates(&[3.0, 1.0, 2.0]);
        assert_eq!(least_loaded(&c, 0), 1);
        assert_eq!(least_loaded(&c, 2), 1);
        c[1].pressure = Pressure::Warning;
        assert_eq!(least_loaded(&c, 0), 2);
    }

    #[test]
    fn least_loaded_ties_rotate() {
        let c = candidates(&[1.0, 1.0, 1.0]);
        let picks: Vec<usize> = (0..4).map(|start| least_loaded(&c, start)).collect();
        assert_eq!(picks, [0, 1, 2, 0]);
    }

    #[test]
    fn balance_needs_both_margins() {
        let b = Balance { abs: 4.0, rel: 1.5 };
        let c = candidates(&[20.0, 14.0, 0.0, 4.0]);
        assert!(!b.overloaded(&c[0], &c[1]), "6 more but under 1.5x");
        assert!(b.overloaded(&c[0], &c[2]));
        assert!(!b.overloaded(&c[3], &c[2]), "4 more is within the margin");
    }

    #[test]
    fn pressure_alone_overloads() {
        let b = Balance { abs: 4.0, rel: 1.5 };
        let mut c = candidates(&[0.0, 1.0]);
        c[0].pressure = Pressure::Critical;
        assert!(b.overloaded(&c[0], &c[1]));
    }
}
