//! The mlx-flash sidecar: the front door in front of N supervised Python workers and any remote
//! backends. Auth, routing, byte-exact streaming, supervision, and aggregated metrics.
//!
//! [`app`] builds the router (tests call it); [`serve`] runs everything until a signal;
//! [`main_with_args`] is the command line shared by the `mlx-flash-sidecar` binary and
//! `mlx_flash._native.serve`.

pub mod admin;
pub mod auth;
pub mod config;
pub mod error;
pub mod logging;
pub mod memory;
pub mod metrics;
mod metrics_merge;
pub mod model_admin;
pub mod proxy;
pub mod routing;
pub mod stream;
pub mod webui;
pub mod workers;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::Guard;
use crate::config::{Config, Settings};
use crate::error::{ApiError, ErrorKind, StartError};
use crate::metrics::Metrics;
use crate::routing::Policy;
use crate::workers::backend::{Backend, Location};
use crate::workers::pool::{watch_remote, Pool};
use crate::workers::supervisor::{socket_path, Supervisor};

/// Shared state of the running sidecar.
#[derive(Clone)]
pub struct AppState {
    /// Validated configuration.
    pub settings: Arc<Settings>,
    /// Every backend.
    pub pool: Arc<Pool>,
    /// The routing policy.
    pub policy: Arc<dyn Policy>,
    /// Our own series.
    pub metrics: Arc<Metrics>,
    /// Key, Host and Origin checks.
    pub guard: Arc<Guard>,
    /// Cancelled to shut down (signal or admin action).
    pub shutdown: CancellationToken,
    /// When the sidecar started.
    pub started: Instant,
}

impl AppState {
    /// State for `settings` over `backends`.
    pub fn new(settings: Settings, backends: Vec<Arc<Backend>>) -> Self {
        let flags = &settings.flags;
        let guard = Guard::new(
            flags.api_key.clone(),
            &flags.host,
            &flags.allowed_hosts,
            &flags.cors_origins,
        );
        let pool = Pool::new(backends);
        // Every series is static and well-formed; failing to register one is a programming error.
        let metrics = Metrics::new().expect("metrics register");
        metrics.describe_workers(&pool);
        AppState {
            policy: routing::build(&settings),
            settings: Arc::new(settings),
            pool: Arc::new(pool),
            metrics: Arc::new(metrics),
            guard: Arc::new(guard),
            shutdown: CancellationToken::new(),
            started: Instant::now(),
        }
    }
}

/// A method one of the sidecar's own routes does not answer, in the shape of the path's API.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    ApiError::new(
        path,
        ErrorKind::MethodNotAllowed(format!("Method {method} is not allowed for {path}")),
    )
}

/// The HTTP application. Everything the sidecar does not own is proxied to a worker.
pub fn app(state: AppState) -> Router {
    let admin_actions = Router::new()
        .route("/admin/api/workers/{id}/restart", post(admin::restart))
        .route("/admin/api/shutdown", post(admin::shutdown))
        .route("/admin/api/logs", get(admin::logs))
        // A wildcard must come last: the handler splits `/load` or `/unload` off the name.
        .route("/admin/api/models/{*rest}", post(model_admin::action))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::admin));
    let mut router = Router::new()
        .route("/health", get(admin::health))
        .route("/ready", get(admin::ready))
        .route("/metrics", get(metrics_route))
        .route("/v1/models", get(admin::models))
        .route("/models", get(admin::models))
        .route("/admin/api/workers", get(admin::workers))
        .route("/admin/api/status", get(admin::status))
        .route("/admin/api/models", get(model_admin::table))
        .route("/admin", get(webui::admin))
        .route("/chat", get(webui::chat))
        .route("/ui/{name}", get(webui::asset))
        .merge(admin_actions)
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(proxy::proxy)
        .layer(middleware::from_fn_with_state(state.clone(), auth::check))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ));
    let origins = &state.settings.flags.cors_origins;
    if !origins.is_empty() {
        let allow = if origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        };
        router = router.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods(tower_http::cors::Any)
                .allow_headers(tower_http::cors::Any)
                .expose_headers(tower_http::cors::Any),
        );
    }
    router.with_state(state)
}

async fn metrics_route(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state.pool, &*state.policy).await;
    Response::builder()
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(text.into())
        .unwrap_or_default()
}

/// Count every response by route and status; time the ones we answer ourselves (proxied bodies
/// are timed by the relay when they end).
async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = proxy::route_label(request.uri().path());
    let response = next.run(request).await;
    let relayed = response.headers().contains_key("x-worker-id");
    if !relayed {
        let m = &state.metrics;
        m.requests
            .with_label_values(&[route, response.status().as_str()])
            .inc();
        m.request_duration
            .with_label_values(&[route])
            .observe(started.elapsed().as_secs_f64());
    }
    response
}

/// Parse `args` (the first is the program name), serve until SIGINT/SIGTERM, and return the exit
/// code. Start-up errors are one line on stderr.
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> i32 {
    let config = match Config::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            return code;
        }
    };
    let result = config.validate().and_then(|settings| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("mlx-flash-sidecar")
            .build()
            .map_err(|source| StartError::Io {
                what: "cannot start the async runtime".into(),
                source,
            })?;
        // Signals are caught from here on: one during a long start-up still stops the workers.
        let signals = {
            let _runtime = runtime.enter();
            shutdown_signals()
        };
        runtime.block_on(serve(settings, signals))
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mlx-flash: error: {e}");
            e.exit_code()
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM.
fn shutdown_signals() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered now, not when first awaited.
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Every proxied stream holds two sockets; allow thousands (macOS starts processes at 256).
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // macOS refuses more than kern.maxfilesperproc even when the hard limit says "unlimited".
    for want in [hard.min(65_536), hard.min(10_240)] {
        if want <= soft || setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
            return;
        }
    }
}

/// The URL on this machine that reaches a listener on `local`: loopback for a wildcard address.
fn callback_url(local: SocketAddr) -> String {
    let ip = match local.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, local.port()))
}

/// Local workers (on sockets in `runtime_dir`) first, then remote backends.
fn backends(settings: &Settings, runtime_dir: &std::path::Path) -> Vec<Arc<Backend>> {
    let local = (0..settings.workers).map(|index| {
        let socket = socket_path(runtime_dir, index);
        Backend::new(
            format!("worker-{index}"),
            Location::Local { index, socket },
            1.0,
        )
    });
    let remote = settings.backends.iter().enumerate().map(|(i, b)| {
        let location = Location::Remote {
            url: b.url.clone(),
            api_key: b.api_key.clone(),
        };
        Backend::new(format!("remote-{i}"), location, b.weight)
    });
    local.chain(remote).map(Arc::new).collect()
}

/// A supervisor per local worker and a prober per remote backend, until `stop`.
fn watch_backends(state: &AppState, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
    let watch = |b: &Arc<Backend>| {
        let stop = stop.clone();
        if b.is_local() {
            let supervisor = Supervisor {
                backend: b.clone(),
                settings: state.settings.clone(),
                policy: state.policy.clone(),
                metrics: state.metrics.clone(),
            };
            tokio::spawn(supervisor.run(stop))
        } else {
            tokio::spawn(watch_remote(b.clone(), state.policy.clone(), stop))
        }
    };
    state.pool.backends().iter().map(watch).collect()
}

/// Run the sidecar: bind, start workers, serve until `signal` (or an admin shutdown), drain
/// in-flight requests up to the grace period, stop the workers.
pub async fn serve(
    settings: Settings,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let flags = &settings.flags;
    logging::init(
        &flags.log_level,
        flags.log_format,
        flags.log_file.as_deref(),
    )
    .map_err(|source| StartError::Io {
        what: format!("cannot open the log file {:?}", flags.log_file),
        source,
    })?;
    let address = format!("{}:{}", flags.host.trim_matches(['[', ']']), flags.port);
    let listener = TcpListener::bind(&address)
        .await
        .map_err(|source| StartError::Io {
            what: format!("cannot listen on {address}"),
            source,
        })?;
    let runtime_dir = tempfile::Builder::new()
        .prefix("mlx-flash-")
        // The workers' sockets live here: private to this user whatever the umask.
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .map_err(|source| StartError::Io {
            what: "cannot create the runtime directory".into(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| StartError::Io {
        what: "cannot read the listening address".into(),
        source,
    })?;
    let mut settings = settings;
    settings.url = Some(callback_url(local));
    let backends = backends(&settings, runtime_dir.path());
    let grace = settings.grace_period;
    let state = AppState::new(settings, backends);
    // Always logged, whatever the level: with --port 0 it is how callers learn the port.
    logging::always(
        "listening",
        serde_json::json!({"host": local.ip().to_string(), "port": local.port(),
            "url": format!("http://{local}"), "workers": state.settings.workers,
            "policy": state.policy.name()}),
    );
    raise_open_files_limit();

    let stop_workers = CancellationToken::new();
    let tasks = watch_backends(&state, &stop_workers);
    let no_worker = state.settings.backends.is_empty().then(|| {
        tokio::spawn(stop_if_none_starts(
            state.pool.clone(),
            state.shutdown.clone(),
        ))
    });

    let shutdown = state.shutdown.clone();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = signal => {}
                _ = shutdown.cancelled() => {}
            }
            shutdown.cancel();
        }
    });
    // Each SSE chunk must leave at once, not wait for Nagle's algorithm and a delayed ACK (~40 ms).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(
        listener,
        app(state.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let mut server = tokio::spawn(async move { server.await });
    tokio::select! {
        result = &mut server => {
            if let Ok(Err(e)) = result {
                tracing::error!(error = %e, "server stopped");
            }
        }
        _ = shutdown.cancelled() => {
            tracing::info!(grace_seconds = grace.as_secs_f64(), "shutting down: draining in-flight requests");
            let second_signal = shutdown_signals();
            tokio::select! {
                _ = &mut server => {}
                _ = tokio::time::sleep(grace) => {
                    tracing::warn!("grace period over; closing remaining connections");
                }
                _ = second_signal => {
                    tracing::warn!("second signal; closing remaining connections now");
                }
            }
            server.abort();
        }
    }
    stop_workers.cancel();
    for task in tasks {
        let _ = task.await;
    }
    drop(runtime_dir);
    tracing::info!("stopped");
    match no_worker {
        Some(task) => match task.await {
            Ok(Some(errors)) => Err(StartError::NoWorker(errors)),
            _ => Ok(()),
        },
        None => Ok(()),
    }
}

/// With only local workers: if every one fails for good before any was ready, nothing can be
/// served (a model that does not load, a flag the workers reject), so stop and say why.
async fn stop_if_none_starts(pool: Arc<Pool>, shutdown: CancellationToken) -> Option<String> {
    loop {
        if pool.any_ready() {
            return None;
        }
        if let Some(errors) = pool.last_errors() {
            tracing::error!(errors = %errors, "no worker could start; stopping");
            shutdown.cancel();
            return Some(errors);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
    }
}
