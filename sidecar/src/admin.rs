//! The sidecar's own JSON routes: health, readiness, the merged model list, and the admin API.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::join_all;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ErrorKind};
use crate::logging::{self, Severity};
use crate::workers::backend::{Backend, ModelStatus, State as WorkerState};
use crate::AppState;

/// `GET /health`: liveness, with this host's memory (remote sidecars are probed with it).
pub async fn health() -> Json<Value> {
    let memory = crate::memory::snapshot().ok().map(|s| s.to_json());
    Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "memory": memory}))
}

/// `GET /ready`: 200 once any worker serves, with the models served.
pub async fn ready(State(state): State<AppState>) -> Response {
    let mut models: Vec<String> = Vec::new();
    for b in state.pool.backends() {
        let status = b.status();
        if status.state == WorkerState::Ready {
            models.extend(status.models.iter().cloned());
        }
    }
    models.sort();
    models.dedup();
    if state.pool.any_ready() {
        Json(json!({"status": "ready", "models": models})).into_response()
    } else {
        let body = match state.pool.failures() {
            Some(error) => json!({"status": "failed", "error": error}),
            None => json!({"status": "loading", "error": null}),
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// `GET /v1/models` (and `/models`): the union of every ready backend's list, fetched now; a model
/// listed by several shows its most ready status.
pub async fn models(State(state): State<AppState>, request: axum::extract::Request) -> Response {
    let path = request.uri().path().to_owned();
    let ready = state.pool.ready();
    if ready.is_empty() {
        let message = state
            .pool
            .failures()
            .unwrap_or_else(|| "No worker is ready yet; retry shortly.".into());
        return ApiError::new(&path, ErrorKind::Unavailable(message)).into_response();
    }
    let lists = join_all(ready.iter().map(|b| fetch_models(b))).await;
    let data = merge_models(lists.into_iter().flatten().flatten());
    Json(json!({"object": "list", "data": data})).into_response()
}

/// One entry per id, in order of first appearance, keeping the most ready (loaded > loading >
/// available) of the entries that share it.
fn merge_models(entries: impl IntoIterator<Item = Value>) -> Vec<Value> {
    let mut merged: Vec<Value> = Vec::new();
    for entry in entries {
        let id = entry.get("id");
        match merged.iter_mut().find(|m| m.get("id") == id) {
            Some(kept) if ModelStatus::of(&entry) > ModelStatus::of(kept) => *kept = entry,
            Some(_) => {}
            None => merged.push(entry),
        }
    }
    merged
}

async fn fetch_models(backend: &Backend) -> Option<Vec<Value>> {
    let (status, body) = backend
        .get("/v1/models", Duration::from_secs(5))
        .await
        .ok()?;
    let list: Value = serde_json::from_slice(&body)
        .ok()
        .filter(|_| status == StatusCode::OK)?;
    list.get("data")?.as_array().cloned()
}

fn worker_json(b: &Backend) -> Value {
    let status = b.status().clone();
    let url = match &b.location {
        crate::workers::backend::Location::Local { socket, .. } => {
            format!("unix:{}", socket.display())
        }
        crate::workers::backend::Location::Remote { url, .. } => url.clone(),
    };
    json!({
        "id": &*b.id,
        "url": url,
        "kind": if b.is_local() { "local" } else { "remote" },
        "pid": status.pid,
        "state": status.state,
        "models": status.models,
        "loaded": status.loaded,
        "in_flight": b.in_flight(),
        "weight": b.weight,
        "restarts": status.restarts,
        "last_error": status.last_error,
        "memory": status.memory,
    })
}

/// `GET /admin/api/workers`.
pub async fn workers(State(state): State<AppState>) -> Json<Value> {
    let list: Vec<Value> = state
        .pool
        .backends()
        .iter()
        .map(|b| worker_json(b))
        .collect();
    Json(json!({ "workers": list }))
}

/// `POST /admin/api/workers/{id}/restart`: 202; the supervisor restarts it in the background.
pub async fn restart(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let path = format!("/admin/api/workers/{id}/restart");
    match state.pool.get(&id) {
        Some(b) if b.is_local() => {
            tracing::info!(worker = %id, "restart requested through the admin API");
            b.restart.notify_one();
            (
                StatusCode::ACCEPTED,
                Json(json!({"id": id, "restarting": true})),
            )
                .into_response()
        }
        Some(_) => ApiError::new(
            &path,
            ErrorKind::Forbidden(format!(
                "{id} is a remote backend; it is not supervised here"
            )),
        )
        .into_response(),
        None => {
            ApiError::new(&path, ErrorKind::NotFound(format!("No worker {id:?}"))).into_response()
        }
    }
}

/// `POST /admin/api/shutdown`: drain and stop, like SIGTERM.
pub async fn shutdown(State(state): State<AppState>) -> Response {
    tracing::info!("shutdown requested through the admin API");
    state.shutdown.cancel();
    (StatusCode::ACCEPTED, Json(json!({"shutting_down": true}))).into_response()
}

/// `GET /admin/api/status`: the whole picture in one call.
pub async fn status(State(state): State<AppState>) -> Json<Value> {
    let flags = &state.settings.flags;
    let backends = state.pool.backends();
    let count = |s: WorkerState| backends.iter().filter(|b| b.status().state == s).count();
    let stats = state.policy.stats();
    let memory = crate::memory::snapshot().ok().map(|s| s.to_json());
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "model": flags.model,
        "policy": state.policy.name(),
        "workers": {
            "total": backends.len(),
            "ready": count(WorkerState::Ready),
            "failed": count(WorkerState::Failed),
        },
        "in_flight": backends.iter().map(|b| b.in_flight()).sum::<usize>(),
        "sessions": stats.sessions,
        "memory": memory,
    }))
}

/// `GET /admin/api/logs?since=N&limit=M&level=L&request_id=R` query.
#[derive(Debug, Deserialize)]
pub struct LogQuery {
    since: Option<u64>,
    limit: Option<usize>,
    level: Option<String>,
    request_id: Option<String>,
}

/// Most lines one call returns.
const MAX_LOG_LINES: usize = 1000;

/// `GET /admin/api/logs`: recent lines of the sidecar and its workers, oldest first, from `since`
/// (the `next` of the previous answer), at `level` or above, about `request_id` if given.
pub async fn logs(query: Result<Query<LogQuery>, QueryRejection>) -> Response {
    let path = "/admin/api/logs";
    let bad = |msg: String| ApiError::new(path, ErrorKind::BadParameter(msg)).into_response();
    let Ok(Query(q)) = query else {
        return bad("since and limit must be non-negative integers".into());
    };
    let level = match q.level.as_deref() {
        None => Severity::Debug,
        Some(name) => match Severity::parse(name) {
            Some(level) => level,
            None => {
                return bad(format!(
                    "level must be debug, info, warning or error, not {name:?}"
                ))
            }
        },
    };
    let limit = q.limit.unwrap_or(200).min(MAX_LOG_LINES);
    let (lines, next) =
        logging::recent(q.since.unwrap_or(0), limit, level, q.request_id.as_deref());
    Json(json!({"lines": lines, "next": next})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_models_keep_the_most_ready_entry_per_id() {
        let entries = [
            json!({"id": "a", "status": "available", "from": 0}),
            json!({"id": "b", "status": "loading", "from": 0}),
            json!({"id": "a", "status": "loading", "from": 1}),
            json!({"id": "b", "status": "available", "from": 1}),
            json!({"id": "a", "from": 2}),
            json!({"id": "c", "status": "available", "from": 2}),
        ];
        let merged = merge_models(entries);
        let picked: Vec<_> = merged
            .iter()
            .map(|m| (m["id"].clone(), m["from"].clone()))
            .collect();
        assert_eq!(
            picked,
            [
                (json!("a"), json!(2)),
                (json!("b"), json!(0)),
                (json!("c"), json!(2))
            ]
        );
    }
}
