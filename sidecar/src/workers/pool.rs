//! All backends, and which of them can take a request for a model.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::backend::{Backend, Probe, State, Status};
use crate::routing::{Candidate, Policy};

/// How often remote backends are probed.
const REMOTE_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Model lists are refreshed every this many probes (and whenever a backend becomes ready).
pub const MODELS_REFRESH_EVERY: u32 = 10;

/// The fixed set of backends (local workers first, then remote backends).
pub struct Pool {
    backends: Vec<Arc<Backend>>,
}

/// Why no backend can take a request.
#[derive(Debug, PartialEq, Eq)]
pub enum NoBackend {
    /// Some are starting or loading their model: retry shortly.
    Loading,
    /// None is up.
    Down,
}

impl Pool {
    /// A pool over `backends`.
    pub fn new(backends: Vec<Arc<Backend>>) -> Self {
        Pool { backends }
    }

    /// Every backend, in order.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The backend with this id.
    pub fn get(&self, id: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| &*b.id == id)
    }

    /// Ready backends for `model`, minus `exclude`: those that have it loaded, else those that list
    /// it, else every ready one, so a worker answers "model not found" in its API's own shape.
    pub fn candidates(
        &self,
        model: Option<&str>,
        exclude: &[Arc<str>],
    ) -> Result<Vec<(Arc<Backend>, Candidate)>, NoBackend> {
        let mut ready = Vec::new();
        let mut loading = false;
        for b in &self.backends {
            let status = b.status();
            match status.state {
                State::Ready if !exclude.contains(&b.id) => {
                    let candidate = Candidate {
                        id: b.id.clone(),
                        load: b.load(),
                        pressure: status.pressure,
                    };
                    ready.push((fit(&status, model), b.clone(), candidate));
                }
                State::Starting | State::Loading | State::Restarting => loading = true,
                _ => {}
            }
        }
        if ready.is_empty() {
            return Err(if loading {
                NoBackend::Loading
            } else {
                NoBackend::Down
            });
        }
        let best = ready.iter().map(|(fit, ..)| *fit).max();
        Ok(ready
            .into_iter()
            .filter(|(fit, ..)| Some(*fit) == best)
            .map(|(_, b, c)| (b, c))
            .collect())
    }

    /// Whether any backend is ready.
    pub fn any_ready(&self) -> bool {
        self.backends
            .iter()
            .any(|b| b.status().state == State::Ready)
    }

    /// When every backend has failed for good: what each last said ("worker-0: ..."), to tell clients.
    pub fn failures(&self) -> Option<String> {
        self.last_errors().map(|each| {
            format!(
                "Every worker failed ({each}); see the log, then restart them (POST /admin/api/workers/{{id}}/restart) or the server."
            )
        })
    }

    /// When every backend has failed for good: "worker-0: its last error; worker-1: ...".
    pub fn last_errors(&self) -> Option<String> {
        let all_failed = !self.backends.is_empty()
            && self
                .backends
                .iter()
                .all(|b| b.status().state == State::Failed);
        all_failed.then(|| {
            let each: Vec<String> = self
                .backends
                .iter()
                .map(|b| {
                    let error = b.status().last_error.clone().unwrap_or_default();
                    format!("{}: {error}", b.id)
                })
                .collect();
            each.join("; ")
        })
    }

    /// The backends that are ready now.
    pub fn ready(&self) -> Vec<Arc<Backend>> {
        self.backends
            .iter()
            .filter(|b| b.status().state == State::Ready)
            .cloned()
            .collect()
    }
}

/// How well a ready backend fits a request; candidates come from the best fit present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fit {
    /// Does not list the model.
    Unlisted,
    /// Lists it, but may have to load it first.
    Listed,
    /// Has it loaded (or the request names no model).
    Loaded,
}

fn fit(status: &Status, model: Option<&str>) -> Fit {
    let Some(model) = model else {
        return Fit::Loaded;
    };
    let has = |ids: &[String]| ids.iter().any(|id| id == model);
    if has(&status.loaded) {
        Fit::Loaded
    } else if has(&status.models) {
        Fit::Listed
    } else {
        Fit::Unlisted
    }
}

/// Probe a remote backend until shutdown, keeping its state and model list current.
pub async fn watch_remote(backend: Arc<Backend>, policy: Arc<dyn Policy>, stop: CancellationToken) {
    let mut probes = 0u32;
    loop {
        let was_ready = backend.status().state == State::Ready;
        let probe = backend
            .probe(!was_ready || probes.is_multiple_of(MODELS_REFRESH_EVERY))
            .await;
        probes = probes.wrapping_add(1);
        let (state, error) = match probe {
            Probe::Ready => (State::Ready, None),
            Probe::Loading => (State::Loading, None),
            Probe::Failed(e) => (State::Failed, Some(e)),
            Probe::Unreachable(e) => (State::Unreachable, Some(e)),
        };
        let changed = {
            let mut status = backend.status();
            let changed = state != status.state;
            status.state = state;
            if error.is_some() {
                status.last_error = error.clone();
            }
            changed
        };
        if changed {
            tracing::info!(worker = %backend.id, state = ?state, error = ?error, "backend state");
            if was_ready {
                // Whatever it had cached may be gone; let routing relearn.
                policy.forget(&backend.id);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REMOTE_PROBE_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::backend::Location;

    /// A ready backend listing `models`, of which `loaded` are loaded.
    fn ready(id: &str, models: &[&str], loaded: &[&str]) -> Arc<Backend> {
        let location = Location::Remote {
            url: format!("http://{id}:1"),
            api_key: None,
        };
        let b = Arc::new(Backend::new(id.to_owned(), location, 1.0));
        {
            let mut status = b.status();
            status.state = State::Ready;
            status.models = models.iter().map(|m| m.to_string()).collect();
            status.loaded = loaded.iter().map(|m| m.to_string()).collect();
        }
        b
    }

    fn ids(pool: &Pool, model: Option<&str>, exclude: &[&str]) -> Vec<String> {
        let exclude: Vec<Arc<str>> = exclude.iter().map(|&e| e.into()).collect();
        let candidates = pool.candidates(model, &exclude).unwrap();
        candidates.iter().map(|(b, _)| b.id.to_string()).collect()
    }

    #[test]
    fn backends_with_the_model_loaded_come_first() {
        let pool = Pool::new(vec![
            ready("w0", &["m", "x"], &["x"]),
            ready("w1", &["m"], &["m"]),
            ready("w2", &["x"], &["x"]),
        ]);
        assert_eq!(ids(&pool, Some("m"), &[]), ["w1"]);
        // Failing over from the one that has it loaded: those that list it.
        assert_eq!(ids(&pool, Some("m"), &["w1"]), ["w0"]);
        assert_eq!(ids(&pool, Some("x"), &[]), ["w0", "w2"]);
    }

    #[test]
    fn backends_that_list_the_model_beat_those_that_do_not() {
        let pool = Pool::new(vec![ready("w0", &["x"], &["x"]), ready("w1", &["m"], &[])]);
        assert_eq!(ids(&pool, Some("m"), &[]), ["w1"]);
    }

    #[test]
    fn every_ready_backend_when_none_lists_the_model_or_none_is_named() {
        let pool = Pool::new(vec![ready("w0", &["x"], &["x"]), ready("w1", &["m"], &[])]);
        assert_eq!(ids(&pool, Some("unknown"), &[]), ["w0", "w1"]);
        assert_eq!(ids(&pool, None, &[]), ["w0", "w1"]);
    }

    #[test]
    fn no_ready_backend_says_why() {
        let pool = Pool::new(vec![ready("w0", &["m"], &["m"])]);
        pool.get("w0").unwrap().status().state = State::Loading;
        assert_eq!(
            pool.candidates(Some("m"), &[]).err(),
            Some(NoBackend::Loading)
        );
        pool.get("w0").unwrap().status().state = State::Failed;
        assert_eq!(pool.candidates(Some("m"), &[]).err(), Some(NoBackend::Down));
    }
}
