//! One backend (a local worker or a remote host): identity, live status, in-flight count, and the
//! health probe that keeps the status current.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode, Uri};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;

use super::upstream::{self, UpstreamClient};
use crate::memory::Pressure;

/// A health probe gives up after this long; a worker that misses several in a row is hung.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a backend lives.
#[derive(Debug, Clone)]
pub enum Location {
    /// A supervised worker process on a Unix socket.
    Local {
        /// Its index (`worker-<index>`).
        index: usize,
        /// The socket path.
        socket: Arc<Path>,
    },
    /// Another host.
    Remote {
        /// Base URL.
        url: String,
        /// Key to send (`Authorization: Bearer`), if any.
        api_key: Option<String>,
    },
}

/// Lifecycle of a backend, as reported by the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Process started, not answering yet.
    Starting,
    /// Answering, model still loading.
    Loading,
    /// Serving.
    Ready,
    /// Not answering (remote down, or a local worker about to be restarted).
    Unreachable,
    /// Waiting out the back-off before a restart.
    Restarting,
    /// Gave up after too many restarts.
    Failed,
    /// Shut down.
    Stopped,
}

/// How ready one model is on a backend, from the `status` of its `/v1/models` entry; ordered from
/// least to most ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    /// Listed: the backend can load it on demand.
    Available,
    /// Being loaded.
    Loading,
    /// In memory and serving.
    Loaded,
}

impl ModelStatus {
    /// The status of a `/v1/models` entry. Entries without one (older workers, other servers)
    /// serve what they list, so they count as loaded.
    pub fn of(entry: &Value) -> ModelStatus {
        match entry.get("status").and_then(Value::as_str) {
            None | Some("loaded") => ModelStatus::Loaded,
            Some("loading") => ModelStatus::Loading,
            Some(_) => ModelStatus::Available,
        }
    }
}

/// Live status, updated by the supervisor and the probes.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Lifecycle state.
    pub state: State,
    /// Model ids from the backend's `/v1/models`, whatever their status: all the backend serves.
    pub models: Vec<String>,
    /// The ones among `models` already loaded, which routing prefers.
    pub loaded: Vec<String>,
    /// Process id of a local worker.
    pub pid: Option<u32>,
    /// Restarts so far.
    pub restarts: u32,
    /// What last went wrong.
    pub last_error: Option<String>,
    /// The backend's memory snapshot from `/health`.
    pub memory: Option<Value>,
    /// Pressure level taken from `memory`.
    #[serde(skip)]
    pub pressure: Pressure,
}

/// A backend requests can be routed to.
pub struct Backend {
    /// Stable id: `worker-<n>` for local workers, `remote-<n>` for remote backends.
    pub id: Arc<str>,
    /// Where it lives.
    pub location: Location,
    /// Relative capacity.
    pub weight: f64,
    /// Pooled connections.
    pub client: UpstreamClient,
    /// Admin asked for a restart.
    pub restart: Notify,
    in_flight: AtomicUsize,
    status: Mutex<Status>,
}

impl Backend {
    /// A backend in the `Starting` state.
    pub fn new(id: String, location: Location, weight: f64) -> Self {
        let socket = match &location {
            Location::Local { socket, .. } => Some(socket.clone()),
            Location::Remote { .. } => None,
        };
        Backend {
            id: id.into(),
            client: upstream::client(socket),
            location,
            weight,
            restart: Notify::new(),
            in_flight: AtomicUsize::new(0),
            status: Mutex::new(Status {
                state: State::Starting,
                models: Vec::new(),
                loaded: Vec::new(),
                pid: None,
                restarts: 0,
                last_error: None,
                memory: None,
                pressure: Pressure::Normal,
            }),
        }
    }

    /// The live status (a short lock; never held across an await).
    pub fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests currently being served through this backend.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Load as routing sees it: in-flight requests per unit of weight.
    pub fn load(&self) -> f64 {
        self.in_flight() as f64 / self.weight
    }

    /// Count a request until the returned guard drops (when its response stream ends).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The URL for `path_and_query` on this backend.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, hyper::http::Error> {
        let base = match &self.location {
            // The authority is ignored on a Unix socket; it names the worker in upstream logs.
            Location::Local { index, .. } => format!("http://worker-{index}"),
            Location::Remote { url, .. } => url.trim_end_matches('/').to_owned(),
        };
        Ok(Uri::try_from(format!("{base}{path_and_query}"))?)
    }

    /// The `Authorization` value to send, if this backend has its own key.
    pub fn authorization(&self) -> Option<String> {
        match &self.location {
            Location::Remote {
                api_key: Some(key), ..
            } => Some(format!("Bearer {key}")),
            _ => None,
        }
    }

    /// Whether this is a supervised local worker.
    pub fn is_local(&self) -> bool {
        matches!(self.location, Location::Local { .. })
    }

    /// Ask the backend how it is, and record the answer. Returns whether it answered at all.
    pub async fn probe(&self, refresh_models: bool) -> Probe {
        let health = match self.get_json("/health").await {
            Ok((StatusCode::OK, body)) => body,
            Ok((status, _)) => return Probe::Unreachable(format!("/health answered {status}")),
            Err(e) => return Probe::Unreachable(e),
        };
        let ready = match self.get_json("/ready").await {
            Ok((status, body)) => (status == StatusCode::OK, body),
            Err(e) => return Probe::Unreachable(e),
        };
        let models = if ready.0 && refresh_models {
            match self.get_json("/v1/models").await {
                Ok((StatusCode::OK, body)) => Some(model_list(&body)),
                _ => None,
            }
        } else {
            None
        };
        let mut status = self.status();
        status.pressure = health
            .pointer("/memory/pressure")
            .and_then(Value::as_str)
            .map_or(Pressure::Normal, parse_pressure);
        status.memory = health.get("memory").cloned();
        if let Some(models) = models {
            let loaded = models.iter().filter(|(_, s)| *s == ModelStatus::Loaded);
            status.loaded = loaded.map(|(id, _)| id.clone()).collect();
            status.models = models.into_iter().map(|(id, _)| id).collect();
        }
        if ready.0 {
            Probe::Ready
        } else if ready.1.get("status").and_then(Value::as_str) == Some("failed") {
            let error = ready.1.get("error").and_then(Value::as_str).unwrap_or("");
            Probe::Failed(error.to_owned())
        } else {
            Probe::Loading
        }
    }

    async fn get_json(&self, path: &str) -> Result<(StatusCode, Value), String> {
        let (status, body) = self.get(path, PROBE_TIMEOUT).await?;
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// GET `path` (with this backend's key) and read the whole body, within `timeout`.
    pub async fn get(&self, path: &str, timeout: Duration) -> Result<(StatusCode, Bytes), String> {
        let answer = self.send(Method::GET, path, Bytes::new(), timeout).await?;
        Ok((answer.status, answer.body))
    }

    /// Send `body` (JSON, if any) to `path` with this backend's key, and read the whole answer
    /// within `timeout`.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let uri = self.uri(path).map_err(|e| e.to_string())?;
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(auth) = self.authorization() {
            request = request.header("authorization", auth);
        }
        if !body.is_empty() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                let source = std::error::Error::source(&e).map(ToString::to_string);
                format!(
                    "{path}: {e}{}",
                    source.map(|s| format!(": {s}")).unwrap_or_default()
                )
            })?;
            let (head, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("{path}: {e}"))?
                .to_bytes();
            Ok(Answer {
                status: head.status,
                headers: head.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("{path}: no answer within {timeout:?}")))
    }
}

/// A backend's whole answer to one request.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body, read whole.
    pub body: Bytes,
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Serving.
    Ready,
    /// Up, model loading.
    Loading,
    /// Up, but its model failed to load.
    Failed(String),
    /// No (timely) answer.
    Unreachable(String),
}

/// Each entry's id and status from a `/v1/models` body.
fn model_list(body: &Value) -> Vec<(String, ModelStatus)> {
    let items = body.get("data").and_then(Value::as_array);
    let id_and_status = |m: &Value| {
        let id = m.get("id").and_then(Value::as_str)?;
        Some((id.to_owned(), ModelStatus::of(m)))
    };
    items
        .map(|items| items.iter().filter_map(id_and_status).collect())
        .unwrap_or_default()
}

fn parse_pressure(s: &str) -> Pressure {
    match s {
        "critical" => Pressure::Critical,
        "warning" => Pressure::Warning,
        _ => Pressure::Normal,
    }
}

/// Holds one in-flight request on a backend; dropping it (when the response ends) releases it.
pub struct InFlight(Arc<Backend>);

impl InFlight {
    /// The backend serving the request.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn model_entries_without_a_status_count_as_loaded() {
        let body = json!({"object": "list", "data": [
            {"id": "a", "status": "loaded"},
            {"id": "b", "status": "loading"},
            {"id": "c", "status": "available"},
            {"id": "d"},
            {"object": "model"},
        ]});
        let list = model_list(&body);
        let expected = [
            ("a", ModelStatus::Loaded),
            ("b", ModelStatus::Loading),
            ("c", ModelStatus::Available),
            ("d", ModelStatus::Loaded),
        ];
        let expected: Vec<_> = expected.iter().map(|(i, s)| (i.to_string(), *s)).collect();
        assert_eq!(list, expected);
        assert!(ModelStatus::Loaded > ModelStatus::Loading);
        assert!(ModelStatus::Loading > ModelStatus::Available);
    }
}
