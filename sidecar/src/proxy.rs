//! The proxy: every route the sidecar does not own goes to a worker chosen by the policy. The
//! request body is read (bounded) because routing needs its model and prompt and failover must be
//! able to resend it; the response streams back byte for byte.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};

use crate::error::{ApiError, ErrorKind, Family};
use crate::routing::RouteInfo;
use crate::stream::{Framing, OnEnd, Relay};
use crate::workers::pool::NoBackend;
use crate::AppState;

/// Headers that describe one connection, not the message; never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Routes named in metrics; anything else is `other` (labels stay bounded).
const ROUTES: &[&str] = &[
    "/chat/completions",
    "/completions",
    "/responses",
    "/messages",
    "/messages/count_tokens",
    "/embeddings",
    "/models",
    "/api/chat",
    "/api/generate",
    "/api/tags",
    "/api/show",
    "/api/ps",
    "/api/version",
    "/",
    "/mcp",
    "/health",
    "/ready",
    "/metrics",
];

/// A bounded metric label for `path`.
pub fn route_label(path: &str) -> &'static str {
    let p = path
        .strip_prefix("/v1")
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    if p.starts_with("/models/") {
        return "/models/{model}";
    }
    if p.starts_with("/admin") {
        return "/admin";
    }
    ROUTES.iter().find(|r| **r == p).copied().unwrap_or("other")
}

/// The fallback handler: route, forward, fail over before the first byte, relay the response.
/// Every line logged about the request carries its id, which the response returns.
pub async fn proxy(State(state): State<AppState>, mut request: Request) -> Response {
    let request_id = request_id(request.headers());
    request
        .headers_mut()
        .insert("x-request-id", request_id.clone());
    let id = request_id.to_str().unwrap_or_default().to_owned();
    let span = tracing::info_span!("request", request_id = %id);
    let mut access = Some(AccessLog {
        request_id: id,
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
        started: Instant::now(),
        status: 0,
        worker: None,
        model: None,
    });
    let mut response = route_and_forward(&state, request, &mut access)
        .instrument(span)
        .await;
    response
        .headers_mut()
        .entry("x-request-id")
        .or_insert(request_id);
    // A relayed response took the line, to write when its body ends; one refused here writes it now.
    if let Some(mut access) = access {
        access.status = response.status().as_u16();
        access.write();
    }
    response
}

/// A request's one access line, written when its response has ended (a stream: its last byte).
#[derive(Debug)]
pub struct AccessLog {
    /// The id every line about this request carries.
    pub request_id: String,
    method: String,
    path: String,
    started: Instant,
    status: u16,
    worker: Option<Arc<str>>,
    model: Option<String>,
}

impl AccessLog {
    /// Write the line.
    pub fn write(&self) {
        tracing::info!(
            request_id = %self.request_id,
            worker = self.worker.as_deref(),
            model = self.model.as_deref(),
            method = %self.method,
            path = %self.path,
            status = self.status,
            seconds = (self.started.elapsed().as_secs_f64() * 1e4).round() / 1e4,
            "request"
        );
    }
}

async fn route_and_forward(
    state: &AppState,
    request: Request,
    access: &mut Option<AccessLog>,
) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let fail = |kind| ApiError::new(&path, kind).into_response();
    let body = match Limited::new(body, state.settings.flags.max_body_bytes)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return fail(ErrorKind::PayloadTooLarge(
                state.settings.flags.max_body_bytes,
            ))
        }
        Err(e) => return fail(ErrorKind::BadBody(e.to_string())),
    };
    let mut info = RouteInfo::from_request(&parts.headers, &body);
    if info.model.is_none() {
        // `GET /v1/models/{id}` names its model in the path: ask a worker that serves it.
        info.model = path_model(&path);
    }
    if let Some(access) = access.as_mut() {
        access.model = info.model.clone();
    }
    let route = route_label(&path);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());
    let policy = &state.policy;
    let mut tried: Vec<Arc<str>> = Vec::new();
    let mut last_error = String::new();
    loop {
        let candidates = match state.pool.candidates(info.model.as_deref(), &tried) {
            Ok(c) => c,
            Err(_) if !tried.is_empty() => return fail(ErrorKind::Upstream(last_error)),
            Err(NoBackend::Loading) => {
                return fail(ErrorKind::Unavailable(
                    "The model is still loading; retry shortly.".into(),
                ))
            }
            Err(NoBackend::Down) => {
                let message = state
                    .pool
                    .failures()
                    .unwrap_or_else(|| "No worker is available.".into());
                return fail(ErrorKind::Unavailable(message));
            }
        };
        let views: Vec<_> = candidates.iter().map(|(_, c)| c.clone()).collect();
        let decision = policy.pick(&info, &views);
        let branch = if tried.is_empty() {
            decision.branch
        } else {
            "failover"
        };
        state
            .metrics
            .routing_decisions
            .with_label_values(&[policy.name(), branch])
            .inc();
        let backend = candidates[decision.index].0.clone();
        let guard = backend.begin();
        let upstream = match build_upstream(&backend, &parts, &path_and_query, body.clone()) {
            Ok(r) => r,
            Err(e) => return fail(ErrorKind::BadBody(e.to_string())),
        };
        match backend.client.request(upstream).await {
            Ok(response) => {
                state
                    .metrics
                    .time_to_first_byte
                    .with_label_values(&[route])
                    .observe(started.elapsed().as_secs_f64());
                policy.routed(&info, &backend.id);
                let (mut head, incoming) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                let content_type = head
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok());
                let framing = Framing::of(content_type, Family::of(&path));
                if let Ok(id) = HeaderValue::from_str(&backend.id) {
                    head.headers.insert("x-worker-id", id);
                }
                state
                    .metrics
                    .requests
                    .with_label_values(&[route, head.status.as_str()])
                    .inc();
                let access = access.take().map(|mut a| {
                    a.status = head.status.as_u16();
                    a.worker = Some(backend.id.clone());
                    a
                });
                let on_end = OnEnd {
                    access,
                    started,
                    duration: state.metrics.request_duration.with_label_values(&[route]),
                    stream_errors: state
                        .metrics
                        .stream_errors
                        .with_label_values(&[&*backend.id]),
                };
                let relay = Relay::new(incoming, framing, guard, on_end);
                return Response::from_parts(head, Body::new(relay));
            }
            Err(e) => {
                let source = std::error::Error::source(&e).map(ToString::to_string);
                last_error = format!(
                    "{e}{}",
                    source.map(|s| format!(": {s}")).unwrap_or_default()
                );
                tracing::warn!(worker = %backend.id, error = %last_error, "upstream failed before responding; failing over");
                state
                    .metrics
                    .failovers
                    .with_label_values(&[&*backend.id])
                    .inc();
                tried.push(backend.id.clone());
            }
        }
    }
}

fn path_model(path: &str) -> Option<String> {
    let id = path
        .strip_prefix("/v1")
        .unwrap_or(path)
        .strip_prefix("/models/")?;
    (!id.is_empty()).then(|| id.to_owned())
}

fn build_upstream(
    backend: &crate::workers::backend::Backend,
    parts: &axum::http::request::Parts,
    path_and_query: &str,
    body: Bytes,
) -> Result<hyper::Request<Full<Bytes>>, hyper::http::Error> {
    let mut request = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(backend.uri(path_and_query)?)
        .body(Full::new(body))?;
    let headers = request.headers_mut();
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name) {
            headers.append(name, value.clone());
        }
    }
    if let Some(auth) = backend.authorization() {
        headers.remove("x-api-key");
        if let Ok(value) = HeaderValue::from_str(&auth) {
            headers.insert("authorization", value);
        }
    }
    Ok(request)
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// The client's `X-Request-Id` if it is a sane token (at most 128 of `A-Za-z0-9._:-`, so it cannot
/// forge log lines), else a new one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    let sane = |v: &&HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(c))
    };
    match headers.get("x-request-id").filter(sane) {
        Some(id) => id.clone(),
        None => new_request_id(),
    }
}

/// A random 128-bit hex id (std's per-instance random hasher keys, no extra dependency).
fn new_request_id() -> HeaderValue {
    let a = RandomState::new().hash_one(Instant::now());
    let b = RandomState::new().hash_one(a);
    HeaderValue::from_str(&format!("{a:016x}{b:016x}")).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_are_bounded() {
        assert_eq!(route_label("/v1/chat/completions"), "/chat/completions");
        assert_eq!(route_label("/chat/completions"), "/chat/completions");
        assert_eq!(route_label("/v1/models/demo"), "/models/{model}");
        assert_eq!(route_label("/api/chat"), "/api/chat");
        assert_eq!(route_label("/v1/../../etc/passwd"), "other");
        assert_eq!(route_label("/"), "/");
    }

    #[test]
    fn model_from_the_path() {
        assert_eq!(path_model("/v1/models/demo").as_deref(), Some("demo"));
        assert_eq!(path_model("/models/org/name").as_deref(), Some("org/name"));
        assert_eq!(path_model("/v1/models/"), None);
        assert_eq!(path_model("/v1/chat/completions"), None);
    }

    #[test]
    fn request_ids_differ() {
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn a_client_request_id_is_kept_only_when_sane() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-request-id", HeaderValue::from_str(v).unwrap());
            request_id(&h)
        };
        assert_eq!(with("trace-42.a:b_c"), "trace-42.a:b_c");
        assert_ne!(with("two words"), "two words");
        assert_ne!(with("a\"b"), "a\"b");
        assert_ne!(with(&"x".repeat(129)), "x".repeat(129));
        assert_eq!(request_id(&HeaderMap::new()).len(), 32);
    }
}
