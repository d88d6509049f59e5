//! The default policy: send a request where its prompt prefix is most likely cached.
//!
//! In order: an explicit session's worker; the worker whose recent prompts share the longest prefix
//! (at least `threshold` of this prompt); a derived session's worker (turn 2 of a chat that sends no
//! id); otherwise the least loaded worker. A preferred worker gives way when it is overloaded
//! relative to the least loaded one.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use super::prefix_tree::PrefixTree;
use super::sessions::Sessions;
use super::simple::follow_session;
use super::{least_loaded, Balance, Candidate, Decision, Policy, PolicyStats, Rotation, RouteInfo};

/// Prefix-tree nodes kept per worker (× 64 bytes of distinct prompt text: 4 MiB).
const TREE_NODES: NonZeroUsize = match NonZeroUsize::new(65_536) {
    Some(n) => n,
    None => unreachable!(),
};

/// Cache-aware routing with session affinity and load balancing.
pub struct CacheAware {
    threshold: f64,
    balance: Balance,
    sessions: Sessions,
    trees: Mutex<HashMap<Arc<str>, PrefixTree>>,
    ties: Rotation,
}

impl CacheAware {
    /// Prefer a prefix match covering at least `threshold` of the prompt, within `balance`.
    pub fn new(threshold: f64, balance: Balance) -> Self {
        CacheAware {
            threshold,
            balance,
            sessions: Sessions::default(),
            trees: Mutex::new(HashMap::new()),
            ties: Rotation::default(),
        }
    }

    fn trees(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, PrefixTree>> {
        self.trees.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The candidate with the longest prefix match covering at least `threshold` of the prompt.
    fn best_match(&self, prefix: &str, candidates: &[Candidate]) -> Option<usize> {
        let trees = self.trees();
        let (index, len) = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (i, trees.get(&c.id).map_or(0, |t| t.match_len(prefix))))
            .max_by_key(|&(i, len)| (len, std::cmp::Reverse(i)))?;
        let enough = len > 0 && len as f64 >= self.threshold * prefix.len() as f64;
        enough.then_some(index)
    }
}

impl Policy for CacheAware {
    fn name(&self) -> &'static str {
        "cache_aware"
    }

    fn pick(&self, request: &RouteInfo, candidates: &[Candidate]) -> Decision {
        let least = least_loaded(candidates, self.ties.next());
        let session = follow_session(&self.sessions, &self.balance, request, candidates, least);
        let explicit = request.session.is_some_and(|s| s.explicit);
        if let (Ok(decision), true) = (session, explicit) {
            return decision;
        }
        let mut fallback = "least_loaded";
        if let Some(index) = self.best_match(&request.prefix, candidates) {
            if !self
                .balance
                .overloaded(&candidates[index], &candidates[least])
            {
                return Decision {
                    index,
                    branch: "prefix_match",
                };
            }
            fallback = "overloaded";
        }
        match session {
            Ok(decision) => decision,
            Err("overloaded") => Decision {
                index: least,
                branch: "overloaded",
            },
            Err(_) => Decision {
                index: least,
                branch: fallback,
            },
        }
    }

    fn routed(&self, request: &RouteInfo, worker: &Arc<str>) {
        if let Some(key) = request.session {
            self.sessions.set(key, worker);
        }
        self.trees()
            .entry(worker.clone())
            .or_insert_with(|| PrefixTree::new(TREE_NODES))
            .insert(&request.prefix);
    }

    fn forget(&self, worker: &str) {
        self.sessions.forget(worker);
        self.trees().remove(worker);
    }

    fn stats(&self) -> PolicyStats {
        PolicyStats {
            sessions: self.sessions.len(),
            tree_nodes: self
                .trees()
                .iter()
                .map(|(w, t)| (w.clone(), t.len()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{candidates, chat};
    use super::*;
    use axum::http::HeaderMap;
    use serde_json::json;

    fn policy() -> CacheAware {
        CacheAware::new(0.5, Balance { abs: 4.0, rel: 1.5 })
    }

    fn route(p: &CacheAware, r: &RouteInfo, c: &[Candidate]) -> Decision {
        let d = p.pick(r, c);
        p.routed(r, &c[d.index].id);
        d
    }

    fn completion(prompt: &str) -> RouteInfo {
        let body = json!({"model": "m", "prompt": prompt});
        RouteInfo::from_request(&HeaderMap::new(), body.to_string().as_bytes())
    }

    #[test]
    fn shared_prefix_goes_where_it_went_before() {
        let p = policy();
        let doc = "a long shared document ".repeat(40);
        let first = route(
            &p,
            &completion(&format!("{doc} question one")),
            &candidates(&[1.0, 0.0]),
        );
        assert_eq!((first.index, first.branch), (1, "least_loaded"));
        // w1 is now busier, but the prompt's cached prefix wins within the margin.
        let again = route(
            &p,
            &completion(&format!("{doc} question two")),
            &candidates(&[0.0, 2.0]),
        );
        assert_eq!((again.index, again.branch), (1, "prefix_match"));
        let unrelated = route(
            &p,
            &completion(&"zzz ".repeat(300)),
            &candidates(&[0.0, 2.0]),
        );
        assert_eq!((unrelated.index, unrelated.branch), (0, "least_loaded"));
    }

    #[test]
    fn overloaded_match_gives_way() {
        let p = policy();
        let doc = "shared ".repeat(100);
        route(&p, &completion(&doc), &candidates(&[1.0, 0.0]));
        let d = p.pick(&completion(&doc), &candidates(&[0.0, 8.0]));
        assert_eq!((d.index, d.branch), (0, "overloaded"));
    }

    #[test]
    fn chat_without_id_sticks_even_below_one_block() {
        let p = policy();
        let d1 = route(&p, &chat("m", "hi", &[]), &candidates(&[1.0, 0.0, 1.0]));
        let turn2 = chat(
            "m",
            "hi",
            &["hello! how can I help you today?", "tell me a story"],
        );
        let d2 = route(&p, &turn2, &candidates(&[0.0, 2.0, 0.0]));
        assert_eq!((d2.index, d2.branch), (d1.index, "session"));
    }

    #[test]
    fn explicit_session_beats_a_prefix_match_elsewhere() {
        let p = policy();
        let doc = "shared ".repeat(100);
        route(&p, &completion(&doc), &candidates(&[1.0, 0.0]));
        let mut headers = HeaderMap::new();
        headers.insert("x-session-id", "s1".parse().unwrap());
        let body = json!({"model": "m", "prompt": doc}).to_string();
        let with_id = RouteInfo::from_request(&headers, body.as_bytes());
        p.sessions.set(with_id.session.unwrap(), &"w0".into());
        let d = p.pick(&with_id, &candidates(&[0.0, 0.0]));
        assert_eq!((d.index, d.branch), (0, "session"));
    }

    #[test]
    fn forget_drops_a_workers_cache_and_sessions() {
        let p = policy();
        let doc = "shared ".repeat(100);
        route(&p, &completion(&doc), &candidates(&[1.0, 0.0]));
        assert_eq!(p.stats().tree_nodes.len(), 1);
        p.forget("w1");
        assert!(p.stats().tree_nodes.is_empty());
        assert_eq!(
            p.pick(&completion(&doc), &candidates(&[0.0, 0.0])).branch,
            "least_loaded"
        );
    }
}
