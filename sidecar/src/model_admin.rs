//! Models across workers: every worker's model table in one call, and load/unload forwarded to one
//! worker or to every ready one. Loading reads gigabytes, so forwards wait far longer than probes.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures_util::future::join_all;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ErrorKind};
use crate::workers::backend::{Answer, Backend};
use crate::AppState;

/// A worker's model table is in memory; it answers at once or not at all.
const TABLE_TIMEOUT: Duration = Duration::from_secs(5);
/// A load may read a large model from disk or download it first.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// `GET /admin/api/models`: each backend's own `/admin/api/models`, fetched concurrently.
pub async fn table(State(state): State<AppState>) -> Json<Value> {
    let rows = join_all(state.pool.backends().iter().map(|b| worker_table(b))).await;
    Json(json!({ "workers": rows }))
}

/// One backend's row: its state, and its table or why there is none.
async fn worker_table(backend: &Backend) -> Value {
    let state = backend.status().state;
    let path = "/admin/api/models";
    let (models, error) = match backend.get(path, TABLE_TIMEOUT).await {
        Ok((StatusCode::OK, body)) => match serde_json::from_slice::<Value>(&body) {
            Ok(table) => (table, None),
            Err(e) => (Value::Null, Some(format!("{path}: not JSON: {e}"))),
        },
        Ok((status, _)) => (Value::Null, Some(format!("{path} answered {status}"))),
        Err(e) => (Value::Null, Some(e)),
    };
    json!({"id": &*backend.id, "state": state, "models": models, "error": error})
}

/// What a model action asks of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Load,
    Unload,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Load => "load",
            Action::Unload => "unload",
        }
    }
}

/// `?worker=ID` sends a model action to that worker only.
#[derive(Debug, Deserialize)]
pub struct Target {
    worker: Option<String>,
}

/// `POST /admin/api/models/{name}/load` and `.../unload` (the name may hold `/`): forwarded to
/// `?worker=ID` with its answer passed through, or to every ready backend with each one's answer.
pub async fn action(
    State(state): State<AppState>,
    Path(rest): Path<String>,
    Query(target): Query<Target>,
    body: Bytes,
) -> Response {
    let path = format!("/admin/api/models/{rest}");
    let Some((name, action)) = parse_action(&rest) else {
        let kind = ErrorKind::NotFound(format!(
            "No model action at {path:?}: use POST /admin/api/models/{{name}}/load or /unload"
        ));
        return ApiError::new(&path, kind).into_response();
    };
    let upstream = format!(
        "/admin/api/models/{}/{}",
        encode_path(name),
        action.as_str()
    );
    let Some(id) = target.worker else {
        return forward_all(&state, &upstream, body).await;
    };
    let Some(backend) = state.pool.get(&id) else {
        return ApiError::new(&path, ErrorKind::NotFound(format!("No worker {id:?}")))
            .into_response();
    };
    tracing::info!(worker = %id, model = %name, action = action.as_str(), "model action through the admin API");
    match forward(backend, &upstream, body).await {
        Ok(answer) => pass_through(answer),
        Err(e) => ApiError::new(&path, ErrorKind::Upstream(e)).into_response(),
    }
}

/// `{name}/load` or `{name}/unload` → the name and the action; `None` for anything else, and for
/// names with `.` or `..` segments, which a server might resolve to another path.
fn parse_action(rest: &str) -> Option<(&str, Action)> {
    let (name, action) = rest.rsplit_once('/')?;
    let action = match action {
        "load" => Action::Load,
        "unload" => Action::Unload,
        _ => return None,
    };
    let plain = name.split('/').all(|s| s != "." && s != "..");
    (!name.is_empty() && plain).then_some((name, action))
}

/// `name` as URL path text: `/` kept (Hugging Face ids are `org/repo`), unreserved bytes kept,
/// every other byte `%XX`.
fn encode_path(name: &str) -> String {
    let mut encoded = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// POST the action; when it succeeds, re-read the backend's model list so routing sees it now.
async fn forward(backend: &Backend, path: &str, body: Bytes) -> Result<Answer, String> {
    let answer = backend
        .send(Method::POST, path, body, FORWARD_TIMEOUT)
        .await?;
    if answer.status.is_success() {
        backend.probe(true).await;
    }
    Ok(answer)
}

/// The worker's answer as ours: status, body, and the headers that matter to the client.
fn pass_through(answer: Answer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = answer.status;
    for name in [CONTENT_TYPE, RETRY_AFTER] {
        if let Some(value) = answer.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// One backend's part of a fanned-out action.
struct Outcome {
    worker: Arc<str>,
    status: StatusCode,
    body: Value,
    retry_after: Option<HeaderValue>,
}

impl Outcome {
    fn of(backend: &Backend, path: &str, answer: Result<Answer, String>) -> Outcome {
        let (status, body, retry_after) = match answer {
            Ok(a) => (
                a.status,
                body_json(&a.body),
                a.headers.get(RETRY_AFTER).cloned(),
            ),
            Err(e) => {
                let (status, body) = ApiError::new(path, ErrorKind::Upstream(e)).to_json();
                (status, body, None)
            }
        };
        Outcome {
            worker: backend.id.clone(),
            status,
            body,
            retry_after,
        }
    }
}

/// The action on every ready backend at once: 200 when all succeed, else the first failure's
/// status (and Retry-After); the body lists every backend's answer.
async fn forward_all(state: &AppState, path: &str, body: Bytes) -> Response {
    let ready = state.pool.ready();
    if ready.is_empty() {
        let kind = ErrorKind::Unavailable("No worker is ready yet; retry shortly.".into());
        return ApiError::new(path, kind).into_response();
    }
    tracing::info!(
        path,
        workers = ready.len(),
        "model action on every ready worker"
    );
    let answers = join_all(ready.iter().map(|b| forward(b, path, body.clone()))).await;
    let outcomes: Vec<Outcome> = ready
        .iter()
        .zip(answers)
        .map(|(b, answer)| Outcome::of(b, path, answer))
        .collect();
    let failed = outcomes.iter().find(|o| !o.status.is_success());
    let status = failed.map_or(StatusCode::OK, |o| o.status);
    let retry_after = failed.and_then(|o| o.retry_after.clone());
    let results: Vec<Value> = outcomes
        .iter()
        .map(|o| json!({"worker": &*o.worker, "status": o.status.as_u16(), "body": o.body}))
        .collect();
    let mut response = (status, Json(json!({ "results": results }))).into_response();
    if let Some(value) = retry_after {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
}

/// A worker's body as JSON; text that is not JSON as a string, nothing as null.
fn body_json(body: &Bytes) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_split_off_the_end_of_the_name() {
        assert_eq!(parse_action("demo/load"), Some(("demo", Action::Load)));
        assert_eq!(
            parse_action("org/repo/unload"),
            Some(("org/repo", Action::Unload))
        );
        assert_eq!(parse_action("org/repo/frobnicate"), None);
        assert_eq!(parse_action("load"), None);
        assert_eq!(parse_action("/load"), None);
        assert_eq!(parse_action("../admin/load"), None);
        assert_eq!(parse_action("org/./load"), None);
    }

    #[test]
    fn names_are_percent_encoded_but_keep_their_slashes() {
        assert_eq!(
            encode_path("mlx-community/Qwen3-0.6B-4bit"),
            "mlx-community/Qwen3-0.6B-4bit"
        );
        assert_eq!(encode_path("my model?#%"), "my%20model%3F%23%25");
        assert_eq!(encode_path("é"), "%C3%A9");
    }
}
