//! Test harness: mock workers and a real sidecar, each on port 0, plus a tiny HTTP client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use clap::Parser;
use futures_util::stream;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mlx_flash_sidecar::config::Config;
use mlx_flash_sidecar::workers::backend::{Backend, Location, State as WorkerState};
use mlx_flash_sidecar::{app, AppState};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// SSE chunks with awkward bytes (UTF-8 split across writes, comments, CRLF-free JSON).
pub const SSE_CHUNKS: &[&[u8]] = &[
    b": keep-alive comment\n\n",
    b"data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"h\xc3\"}}]}\n",
    b"\n",
    b"data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"\xa9llo \xf0\x9f\x91\x8b\"}}]}\n\n",
    b"data: [DONE]\n\n",
];

/// NDJSON lines as Ollama writes them.
pub const NDJSON_CHUNKS: &[&[u8]] = &[
    b"{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"hi\"},\"done\":false}\n",
    b"{\"model\":\"m\",\"done\":true,\"done_reason\":\"stop\",\"eval_count\":1}\n",
];

/// What a mock worker saw.
#[derive(Default)]
pub struct Seen {
    /// Requests served.
    pub requests: AtomicUsize,
    /// A `/slow` stream was dropped before it finished (the client went away).
    pub slow_cancelled: AtomicBool,
    /// Model actions posted: the raw path (still percent-encoded) and the body.
    pub model_actions: Mutex<Vec<(String, String)>>,
}

/// A mock worker on 127.0.0.1:0 serving model `model`.
pub struct Mock {
    pub url: String,
    pub seen: Arc<Seen>,
}

/// Listed models and their status (`None`: listed without one, as older workers do).
type Listing = Vec<(String, Option<String>)>;

#[derive(Clone)]
struct MockState {
    model: String,
    seen: Arc<Seen>,
    models: Arc<Mutex<Listing>>,
}

impl MockState {
    fn model_list(&self) -> Value {
        let models = self.models.lock().unwrap();
        let data: Vec<Value> = models
            .iter()
            .map(|(id, status)| {
                let mut entry =
                    json!({"id": id, "object": "model", "created": 1, "owned_by": "mock"});
                if let Some(status) = status {
                    entry["status"] = json!(status);
                }
                entry
            })
            .collect();
        json!({"object": "list", "data": data})
    }

    fn model_table(&self) -> Value {
        let models = self.models.lock().unwrap();
        let rows: Vec<Value> = models
            .iter()
            .map(|(id, status)| {
                json!({"id": id, "status": status.as_deref().unwrap_or("loaded"), "pinned": false,
                       "weight_bytes": 1000, "active_requests": 0})
            })
            .collect();
        json!({"memory_limit": 8000, "memory_used": 1000, "queue_depth": 0, "models": rows})
    }
}

fn openai_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// `POST /admin/api/models/{name}/load|unload`: `busy` is always 503 with Retry-After; unlisted
/// names are 404; others change status.
async fn model_action(
    State(s): State<MockState>,
    uri: Uri,
    Path(rest): Path<String>,
    body: String,
) -> Response {
    s.seen
        .model_actions
        .lock()
        .unwrap()
        .push((uri.path().to_owned(), body));
    let Some((name, action)) = rest.rsplit_once('/') else {
        return openai_error(StatusCode::NOT_FOUND, "not_found", "no action");
    };
    if name == "busy" {
        let mut r = openai_error(StatusCode::SERVICE_UNAVAILABLE, "busy", "memory is busy");
        r.headers_mut().insert("retry-after", "7".parse().unwrap());
        return r;
    }
    let mut models = s.models.lock().unwrap();
    let Some(entry) = models.iter_mut().find(|(id, _)| id == name) else {
        let message = format!("The model '{name}' does not exist");
        return openai_error(StatusCode::NOT_FOUND, "model_not_found", &message);
    };
    let status = if action == "load" {
        "loaded"
    } else {
        "available"
    };
    entry.1 = Some(status.to_owned());
    Json(json!({"id": name, "status": status})).into_response()
}

fn chunked(chunks: &'static [&'static [u8]], content_type: &str) -> Response {
    let s = stream::iter(
        chunks
            .iter()
            .map(|c| Ok::<_, Infallible>(Bytes::from_static(c))),
    );
    ([("content-type", content_type)], Body::from_stream(s)).into_response()
}

async fn chat(State(s): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    s.seen.requests.fetch_add(1, Ordering::Relaxed);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if body["stream"] == json!(true) {
        return chunked(SSE_CHUNKS, "text/event-stream");
    }
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    Json(
        json!({"model": s.model, "authorization": auth, "request_id":
        headers.get("x-request-id").and_then(|v| v.to_str().ok())}),
    )
    .into_response()
}

/// Two chunks, then the connection dies (a worker killed mid-stream).
async fn dying(content_type: &'static str) -> Response {
    let s = stream::unfold(1u8, |n| async move {
        // Let each chunk reach the client before the next, as a real worker's would.
        tokio::time::sleep(Duration::from_millis(20)).await;
        match n {
            1 | 2 => Some((Ok(Bytes::from(format!("data: {{\"n\":{n}}}\n\n"))), n + 1)),
            3 => Some((Err(std::io::Error::other("worker killed")), 4)),
            _ => None,
        }
    });
    ([("content-type", content_type)], Body::from_stream(s)).into_response()
}

struct DropFlag(Arc<Seen>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.slow_cancelled.store(true, Ordering::SeqCst);
    }
}

/// An endless stream, a chunk every 20 ms; records when it is dropped.
async fn slow(State(s): State<MockState>) -> Response {
    let flag = DropFlag(s.seen.clone());
    let s = stream::unfold((0u64, flag), |(n, flag)| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Some((
            Ok::<_, Infallible>(Bytes::from(format!("data: {n}\n\n"))),
            (n + 1, flag),
        ))
    });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(s),
    )
        .into_response()
}

/// Start a mock worker serving `model`, listed without a status (as older workers do).
pub async fn mock(model: &str) -> Mock {
    start_mock(model, vec![(model.to_owned(), None)]).await
}

/// Start a mock worker listing `models` with their statuses (`loaded`, `loading`, `available`).
/// It names the first in its answers.
pub async fn mock_with(models: &[(&str, &str)]) -> Mock {
    let listed = models
        .iter()
        .map(|(id, status)| (id.to_string(), Some(status.to_string())))
        .collect();
    start_mock(models[0].0, listed).await
}

async fn start_mock(model: &str, models: Listing) -> Mock {
    let seen = Arc::new(Seen::default());
    let state = MockState {
        model: model.to_owned(),
        seen: seen.clone(),
        models: Arc::new(Mutex::new(models)),
    };
    let router = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok", "memory": {"pressure": "normal"}})) }))
        .route("/ready", get(|| async { Json(json!({"status": "ready"})) }))
        .route("/v1/models", get(|State(s): State<MockState>| async move { Json(s.model_list()) }))
        .route("/admin/api/models", get(|State(s): State<MockState>| async move { Json(s.model_table()) }))
        .route("/admin/api/models/{*rest}", post(model_action))
        .route("/metrics", get(|| async {
            "# HELP mlx_flash_requests_total Requests.\n# TYPE mlx_flash_requests_total counter\nmlx_flash_requests_total{route=\"/chat/completions\",status=\"200\"} 3.0\n"
        }))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(|| dying("text/event-stream")))
        .route("/v1/dying", post(|| dying("text/event-stream")))
        .route("/api/chat", post(|| async { chunked(NDJSON_CHUNKS, "application/x-ndjson") }))
        .route("/api/dying", post(|| dying("application/x-ndjson")))
        .route("/v1/slow", post(slow))
        .with_state(state);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    Mock { url, seen }
}

/// A running sidecar in front of `backends` (URLs), with extra flags.
pub struct Sidecar {
    pub url: String,
    pub state: AppState,
}

/// Start a sidecar over remote backends at `urls`, each marked ready with the models they serve.
pub async fn sidecar(urls: &[(&str, &str)], flags: &[&str]) -> Sidecar {
    let keyed: Vec<_> = urls.iter().map(|(u, m)| (*u, *m, None)).collect();
    sidecar_with_keys(&keyed, flags).await
}

/// Like [`sidecar`], with each backend's own API key.
pub async fn sidecar_with_keys(urls: &[(&str, &str, Option<&str>)], flags: &[&str]) -> Sidecar {
    let mut args = vec!["mlx-flash", "--workers", "0"];
    for (url, _, _) in urls {
        args.extend(["--backend", url]);
    }
    args.extend(flags);
    let settings = Config::try_parse_from(args).unwrap().validate().unwrap();
    let backends = urls
        .iter()
        .enumerate()
        .map(|(i, (url, model, key))| {
            let location = Location::Remote {
                url: url.to_string(),
                api_key: key.map(str::to_owned),
            };
            let b = Arc::new(Backend::new(format!("remote-{i}"), location, 1.0));
            {
                let mut status = b.status();
                status.state = WorkerState::Ready;
                status.models = vec![model.to_string()];
                status.loaded = vec![model.to_string()];
            }
            b
        })
        .collect();
    let state = AppState::new(settings, backends);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Sidecar { url, state }
}

/// Probe every backend once, so the sidecar knows what each lists and has loaded.
pub async fn probe_all(s: &Sidecar) {
    for b in s.state.pool.backends() {
        b.probe(true).await;
    }
}

/// A response read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Send a request and read the whole response.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let response = open(method, url, headers, body).await;
    let (head, body) = response.into_parts();
    Reply {
        status: head.status,
        headers: head.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Send a request and return the streaming response.
pub async fn open(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> hyper::Response<hyper::body::Incoming> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if !body.is_empty() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    client.request(request).await.unwrap()
}

/// Concatenate chunks.
pub fn joined(chunks: &[&[u8]]) -> Vec<u8> {
    chunks.concat()
}
