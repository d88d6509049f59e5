//! The sidecar's own Prometheus series, described once here, and `/metrics`: these plus every
//! worker's series, scraped concurrently and relabelled with `worker`.

use std::time::Duration;

use futures_util::future::join_all;
use hyper::StatusCode;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::metrics_merge;
use crate::routing::Policy;
use crate::workers::backend::{Backend, State};
use crate::workers::pool::Pool;

/// A worker's `/metrics` must answer within this long, or its series are left out of this scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Every series the sidecar itself exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: IntCounterVec,
    /// Time from request to the end of the response body.
    pub request_duration: HistogramVec,
    /// Time from request to the worker's response headers.
    pub time_to_first_byte: HistogramVec,
    /// Routing decisions by policy and branch.
    pub routing_decisions: IntCounterVec,
    /// Requests retried on another worker before any response byte.
    pub failovers: IntCounterVec,
    /// Streams that ended with an upstream error after the response started.
    pub stream_errors: IntCounterVec,
    /// Restarts by worker.
    pub worker_restarts: IntCounterVec,
    in_flight: IntGaugeVec,
    worker_up: IntGaugeVec,
    sessions: Gauge,
    prefix_tree_nodes: GaugeVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("mlx_flash_sidecar")
}

impl Metrics {
    /// Describe and register every series.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let o = HistogramOpts::new(name, help)
                .namespace("mlx_flash_sidecar")
                .buckets(LATENCY_BUCKETS.to_vec());
            HistogramVec::new(o, labels)
        };
        let m = Metrics {
            requests: IntCounterVec::new(
                opts("requests_total", "Requests by route and status."),
                &["route", "status"],
            )?,
            request_duration: histogram(
                "request_duration_seconds",
                "Time from request to the end of the response body.",
                &["route"],
            )?,
            time_to_first_byte: histogram(
                "time_to_first_byte_seconds",
                "Time from request to the worker's response headers.",
                &["route"],
            )?,
            routing_decisions: IntCounterVec::new(
                opts("routing_decisions_total", "Routing decisions by policy and branch."),
                &["policy", "branch"],
            )?,
            failovers: IntCounterVec::new(
                opts(
                    "failovers_total",
                    "Requests retried on another worker before any response byte, by failed worker.",
                ),
                &["worker"],
            )?,
            stream_errors: IntCounterVec::new(
                opts(
                    "stream_errors_total",
                    "Responses cut by an upstream failure after they started, by worker.",
                ),
                &["worker"],
            )?,
            worker_restarts: IntCounterVec::new(
                opts("worker_restarts_total", "Worker restarts."),
                &["worker"],
            )?,
            in_flight: IntGaugeVec::new(
                opts("in_flight_requests", "Requests in flight, by worker."),
                &["worker"],
            )?,
            worker_up: IntGaugeVec::new(
                opts("worker_up", "1 if the worker is ready to serve, else 0."),
                &["worker"],
            )?,
            sessions: Gauge::with_opts(opts("sessions", "Conversations the router remembers."))?,
            prefix_tree_nodes: GaugeVec::new(
                opts(
                    "prefix_tree_nodes",
                    "Nodes (64-byte prompt blocks) in each worker's prefix tree.",
                ),
                &["worker"],
            )?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.requests.clone()))?;
        r.register(Box::new(m.request_duration.clone()))?;
        r.register(Box::new(m.time_to_first_byte.clone()))?;
        r.register(Box::new(m.routing_decisions.clone()))?;
        r.register(Box::new(m.failovers.clone()))?;
        r.register(Box::new(m.stream_errors.clone()))?;
        r.register(Box::new(m.worker_restarts.clone()))?;
        r.register(Box::new(m.in_flight.clone()))?;
        r.register(Box::new(m.worker_up.clone()))?;
        r.register(Box::new(m.sessions.clone()))?;
        r.register(Box::new(m.prefix_tree_nodes.clone()))?;
        Ok(m)
    }

    /// Make every worker's series exist from the start (zero), so dashboards see them.
    pub fn describe_workers(&self, pool: &Pool) {
        for b in pool.backends() {
            self.worker_restarts.with_label_values(&[&*b.id]);
            self.failovers.with_label_values(&[&*b.id]);
            self.stream_errors.with_label_values(&[&*b.id]);
        }
    }

    /// The sidecar's own exposition, with gauges read from the pool and policy now.
    pub fn own(&self, pool: &Pool, policy: &dyn Policy) -> String {
        for b in pool.backends() {
            let up = b.status().state == State::Ready;
            self.worker_up
                .with_label_values(&[&*b.id])
                .set(i64::from(up));
            self.in_flight
                .with_label_values(&[&*b.id])
                .set(b.in_flight() as i64);
        }
        let stats = policy.stats();
        self.sessions.set(stats.sessions as f64);
        self.prefix_tree_nodes.reset();
        for (worker, nodes) in stats.tree_nodes {
            self.prefix_tree_nodes
                .with_label_values(&[&*worker])
                .set(nodes as f64);
        }
        let mut out = Vec::new();
        // Encoding our own, well-formed families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// `/metrics`: our series plus every reachable worker's, relabelled.
    pub async fn render(&self, pool: &Pool, policy: &dyn Policy) -> String {
        let scrapes = join_all(pool.backends().iter().map(scrape)).await;
        let own = self.own(pool, policy);
        let workers: Vec<(&str, &str)> = pool
            .backends()
            .iter()
            .zip(&scrapes)
            .filter_map(|(b, text)| Some((&*b.id, text.as_deref()?)))
            .collect();
        metrics_merge::merge(&own, &workers)
    }
}

async fn scrape(backend: &std::sync::Arc<Backend>) -> Option<String> {
    if !matches!(backend.status().state, State::Ready | State::Loading) {
        return None;
    }
    let (status, body) = backend.get("/metrics", SCRAPE_TIMEOUT).await.ok()?;
    (status == StatusCode::OK)
        .then(|| String::from_utf8(body.to_vec()).ok())
        .flatten()
}
