//! `mock-worker`: a worker that answers instantly, so a benchmark through it measures whatever sits
//! in front of it. Listens on 127.0.0.1 (port 0 by default) and prints the port on stdout.
//!
//! `POST /v1/chat/completions` answers a small fixed JSON, or with `"stream": true` streams
//! `mock_chunks` stamped SSE chunks (default 1000), `mock_interval_ms` apart (default 0: as fast as
//! the connection takes them), then `data: [DONE]`.

use std::convert::Infallible;
use std::io::Write;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use clap::Parser;
use futures_util::stream::{self, StreamExt};
use mlx_flash_bench::{chunk, unix_ns, DONE};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::time::MissedTickBehavior;

#[derive(Parser)]
#[command(about = "A worker that answers instantly (sidecar overhead benchmark)")]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one, printed on stdout).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

const COMPLETION: &str = "{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion\",\"created\":1,\
    \"model\":\"mock\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"ok\"},\
    \"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}";

#[derive(Deserialize)]
struct ChatBody {
    #[serde(default)]
    stream: bool,
    #[serde(default = "default_chunks")]
    mock_chunks: usize,
    #[serde(default)]
    mock_interval_ms: f64,
}

fn default_chunks() -> usize {
    1000
}

fn json(text: &'static str) -> Response {
    ([(CONTENT_TYPE, "application/json")], text).into_response()
}

async fn chat(body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<ChatBody>(&body) else {
        let error = "{\"error\":{\"message\":\"bad body\",\"type\":\"invalid_request_error\"}}";
        return (axum::http::StatusCode::BAD_REQUEST, json(error)).into_response();
    };
    if !body.stream {
        return json(COMPLETION);
    }
    let n = body.mock_chunks;
    let done = stream::once(async { Ok::<_, Infallible>(Bytes::from_static(DONE)) });
    let stream = if body.mock_interval_ms > 0.0 {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(body.mock_interval_ms / 1e3));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick is immediate, so the first chunk goes out with the headers.
        stream::unfold((0, tick), move |(i, mut tick)| async move {
            if i == n {
                return None;
            }
            tick.tick().await;
            let c = Bytes::from(chunk(i, unix_ns()));
            Some((Ok::<_, Infallible>(c), (i + 1, tick)))
        })
        .chain(done)
        .boxed()
    } else {
        stream::iter((0..n).map(|i| Ok::<_, Infallible>(Bytes::from(chunk(i, unix_ns())))))
            .chain(done)
            .boxed()
    };
    (
        [(CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn app() -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { json("{\"status\":\"ok\",\"memory\":{\"pressure\":\"normal\"}}") }),
        )
        .route("/ready", get(|| async { json("{\"status\":\"ready\"}") }))
        .route(
            "/v1/models",
            get(|| async {
                json(
                    "{\"object\":\"list\",\"data\":[{\"id\":\"mock\",\"object\":\"model\",\
                     \"created\":1,\"owned_by\":\"mock\"}]}",
                )
            }),
        )
        .route(
            "/metrics",
            get(|| async { ([(CONTENT_TYPE, "text/plain; version=0.0.4")], "") }),
        )
        .route("/v1/chat/completions", post(chat))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    let port = listener.local_addr()?.port();
    let mut out = std::io::stdout();
    writeln!(out, "{port}")?;
    out.flush()?;
    // Like uvicorn (asyncio sets TCP_NODELAY on every TCP transport): small writes leave at once.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app()).await
}
