//! `bare-proxy`: the least a reverse proxy can do, built from the sidecar's own stack, so a benchmark
//! can tell the cost of one more hop on the machine from the sidecar's own work. Listens on 127.0.0.1
//! (port 0 by default) and prints the port on stdout; forwards every request to `--upstream`.
//!
//! The same pieces as the sidecar: axum 0.8 `serve` on a multi-thread tokio runtime, TCP_NODELAY on
//! accepted sockets, a pooled `hyper_util` legacy client with TCP_NODELAY to the upstream (same pool
//! settings), and the response body streamed back as it arrives (`Body::new(incoming)`). Nothing
//! else: no auth, routing, metrics, request-body buffering or parsing. Hop-by-hop headers are
//! dropped both ways (as any proxy must); an upstream failure is a bare 502.

use std::io::Write;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::HeaderMap;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use axum::Router;
use clap::Parser;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(about = "A minimal reverse proxy (sidecar overhead benchmark baseline)")]
struct Args {
    /// Base URL requests are forwarded to, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    upstream: String,
    /// Port on 127.0.0.1 (0 picks a free one, printed on stdout).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

/// The sidecar's list (`sidecar/src/proxy.rs`): headers about one connection, never forwarded.
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

#[derive(Clone)]
struct Upstream {
    base: String,
    client: Client<HttpConnector, Body>,
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

async fn forward(State(upstream): State<Upstream>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let Ok(uri) = format!("{}{path}", upstream.base).parse::<Uri>() else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    parts.uri = uri;
    strip_hop_by_hop(&mut parts.headers);
    match upstream
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => {
            let (mut head, incoming) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            Response::from_parts(head, Body::new(incoming))
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    // The sidecar's pool settings (sidecar/src/workers/upstream.rs).
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .pool_timer(TokioTimer::new())
        .build(connector);
    let upstream = Upstream {
        base: args.upstream.trim_end_matches('/').to_owned(),
        client,
    };
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    let port = listener.local_addr()?.port();
    let mut out = std::io::stdout();
    writeln!(out, "{port}")?;
    out.flush()?;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        Router::new().fallback(forward).with_state(upstream),
    )
    .await
}
