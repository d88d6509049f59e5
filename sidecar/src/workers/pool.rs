//! All backends, and which of them can take a request for a model.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::backend::{Backend, Probe, State};
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

    /// Ready backends that serve `model`, minus `exclude`. When none serves the model, every ready
    /// backend is a candidate, so a worker answers "model not found" in its API's own shape.
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
                    let serves = model.is_none_or(|m| status.models.iter().any(|id| id == m));
                    let candidate = Candidate {
                        id: b.id.clone(),
                        load: b.load(),
                        pressure: status.pressure,
                    };
                    ready.push((serves, b.clone(), candidate));
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
        let any_serves = ready.iter().any(|(serves, ..)| *serves);
        Ok(ready
            .into_iter()
            .filter(|(serves, ..)| *serves || !any_serves)
            .map(|(_, b, c)| (b, c))
            .collect())
    }

    /// Whether any backend is ready.
    pub fn any_ready(&self) -> bool {
        self.backends
            .iter()
            .any(|b| b.status().state == State::Ready)
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
