//! `loadgen`: drives `POST /v1/chat/completions` at one base URL (the mock worker directly, or the
//! sidecar in front of it) and prints one JSON object on stdout. Modes:
//!
//! - `open`: a fixed request rate whatever the answers do (open loop); raw latencies.
//! - `closed`: N connections, each sending its next request as soon as the last one answered.
//! - `stream`: streams, one after another; the trip time of every chunk (mock stamp → arrival here).
//! - `hold`: many slow streams at once; how many finish whole.
//!
//! One thread (a current-thread runtime), so the client costs the same on both sides of a comparison
//! and leaves the other core to the servers. Every request carries a distinct prompt, as real traffic
//! does (the sidecar's cache-aware routing hashes it).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mlx_flash_bench::client::{
    exchange, nanos, percentiles, read_stream, BoxError, Errors, Sender, Target,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout};

#[derive(Parser)]
#[command(about = "Load generator for the sidecar overhead benchmark")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Requests at a fixed rate, sent on schedule whether or not earlier ones have answered.
    Open {
        /// Base URL, e.g. http://127.0.0.1:8080.
        #[arg(long)]
        url: String,
        /// Requests per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Connections opened before the clock starts (more are opened if all are busy).
        #[arg(long, default_value_t = 16)]
        connections: usize,
    },
    /// N connections, each sending its next request as soon as the previous one answered.
    Closed {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Streams one after another on one kept-alive connection; the trip time of every chunk.
    Stream {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        chunks: usize,
        /// Milliseconds between the mock's chunks (0: as fast as the connection takes them).
        #[arg(long, default_value_t = 0.0)]
        interval_ms: f64,
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Non-streamed requests sent on the connection first, as a client's pooled connection has
        /// served requests before (TCP's delayed ACKs behave differently on a fresh connection).
        #[arg(long, default_value_t = 1)]
        warm_requests: usize,
    },
    /// Many slow streams held open at once.
    Hold {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        #[arg(long, default_value_t = 100)]
        chunks: usize,
        #[arg(long, default_value_t = 100.0)]
        interval_ms: f64,
        /// Stream starts are spread evenly over this many seconds.
        #[arg(long, default_value_t = 1.0)]
        ramp_seconds: f64,
        /// A stream not finished after this many seconds counts as failed.
        #[arg(long, default_value_t = 60.0)]
        timeout_seconds: f64,
    },
}

struct OpenSample {
    index: usize,
    /// Dispatch time minus scheduled time (the client's own lateness).
    lag: Duration,
    /// Request handed to the connection → whole answer read.
    latency: Duration,
    /// Scheduled time → whole answer read (what a client on schedule would see).
    from_schedule: Duration,
    result: Result<(), BoxError>,
}

async fn open(
    target: Target,
    rate: f64,
    seconds: f64,
    connections: usize,
) -> Result<Value, BoxError> {
    let pool: Arc<Mutex<Vec<Sender>>> = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..connections {
        let sender = target.connect().await?;
        pool.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sender);
    }
    let total = (rate * seconds).round() as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    let opened = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<OpenSample>();
    let start = Instant::now() + Duration::from_millis(20);
    let mut last_dispatch = start;
    for index in 0..total {
        let due = start + period.mul_f64(index as f64);
        if due > Instant::now() {
            sleep_until(due.into()).await;
        }
        let dispatched = Instant::now();
        last_dispatch = dispatched;
        let (pool, opened, tx, target) = (pool.clone(), opened.clone(), tx.clone(), target.clone());
        tokio::spawn(async move {
            let pooled = pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let mut sample = OpenSample {
                index,
                lag: dispatched.saturating_duration_since(due),
                latency: Duration::ZERO,
                from_schedule: Duration::ZERO,
                result: Ok(()),
            };
            let sender = match pooled {
                Some(s) if !s.is_closed() => Ok(s),
                _ => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    target.connect().await
                }
            };
            let request = target.chat(index as u64, None);
            sample.result = match (sender, request) {
                (Ok(mut sender), Ok(request)) => {
                    let t0 = Instant::now();
                    let result = exchange(&mut sender, request).await;
                    let t1 = Instant::now();
                    sample.latency = t1 - t0;
                    sample.from_schedule = t1.saturating_duration_since(due);
                    if result.is_ok() {
                        pool.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(sender);
                    }
                    result
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            let _ = tx.send(sample);
        });
    }
    drop(tx);
    let mut samples: Vec<OpenSample> = Vec::with_capacity(total);
    let collect = async {
        while let Some(s) = rx.recv().await {
            samples.push(s);
        }
    };
    let finished = timeout(Duration::from_secs(30), collect).await.is_ok();
    let end = Instant::now();
    samples.sort_by_key(|s| s.index);
    let mut errors = Errors::default();
    let (mut latency, mut from_schedule, mut lag) = (Vec::new(), Vec::new(), Vec::new());
    for s in &samples {
        lag.push(nanos(s.lag));
        match &s.result {
            Ok(()) => {
                latency.push(nanos(s.latency));
                from_schedule.push(nanos(s.from_schedule));
            }
            Err(e) => errors.add(e),
        }
    }
    let send_window = last_dispatch.saturating_duration_since(start).as_secs_f64();
    let achieved = if send_window > 0.0 {
        (total.saturating_sub(1)) as f64 / send_window
    } else {
        0.0
    };
    Ok(json!({
        "mode": "open",
        "requested_rate": rate,
        "sent": total,
        "answered": latency.len(),
        "unanswered": total - samples.len(),
        "finished_in_time": finished,
        "achieved_send_rate": achieved,
        "completion_rate": latency.len() as f64 / end.saturating_duration_since(start).as_secs_f64(),
        "connections_preopened": connections,
        "connections_opened_during_run": opened.load(Ordering::Relaxed),
        "errors": errors.json(),
        "error_count": errors.total(),
        "dispatch_lag_ns": percentiles(&mut lag),
        "latency_ns": latency,
        "from_schedule_ns": from_schedule,
    }))
}

async fn closed(target: Target, connections: usize, seconds: f64) -> Result<Value, BoxError> {
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(target.connect().await?);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = JoinSet::new();
    for (c, mut sender) in senders.into_iter().enumerate() {
        let target = target.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = Errors::default();
            let mut n = c as u64 * 1_000_000_000;
            while Instant::now() < deadline {
                let request = match target.chat(n, None) {
                    Ok(r) => r,
                    Err(e) => {
                        errors.add(&e);
                        break;
                    }
                };
                n += 1;
                let t0 = Instant::now();
                match exchange(&mut sender, request).await {
                    Ok(()) => latencies.push(nanos(t0.elapsed())),
                    Err(e) => {
                        errors.add(&e);
                        match target.connect().await {
                            Ok(s) => sender = s,
                            Err(e) => {
                                errors.add(&e);
                                break;
                            }
                        }
                    }
                }
            }
            (latencies, errors)
        });
    }
    let mut latencies = Vec::new();
    let mut errors = Errors::default();
    while let Some(joined) = tasks.join_next().await {
        let (l, e) = joined?;
        latencies.extend(l);
        errors.merge(e);
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "closed",
        "connections": connections,
        "seconds": elapsed,
        "answered": latencies.len(),
        "requests_per_s": latencies.len() as f64 / elapsed,
        "errors": errors.json(),
        "error_count": errors.total(),
        "latency_ns": percentiles(&mut latencies),
    }))
}

async fn stream(
    target: Target,
    chunks: usize,
    interval_ms: f64,
    repeat: usize,
    warm_requests: usize,
) -> Result<Value, BoxError> {
    let mut sender = target.connect().await?;
    for n in 0..warm_requests {
        exchange(&mut sender, target.chat(u64::MAX - n as u64, None)?).await?;
    }
    let mut runs = Vec::with_capacity(repeat);
    for r in 0..repeat {
        let request = target.chat(r as u64, Some((chunks, interval_ms)))?;
        sender.ready().await?;
        let started = Instant::now();
        let response = sender.send_request(request).await?;
        let s = read_stream(response, started, true, || {}).await?;
        let total = started.elapsed();
        if !s.done || s.trips.len() != chunks {
            return Err(format!(
                "stream {r}: {} of {chunks} chunks, [DONE] {}",
                s.trips.len(),
                s.done
            )
            .into());
        }
        runs.push(json!({
            "chunks": s.trips.len(),
            "reads": s.reads,
            "first_chunk_s": s.first_chunk.map_or(0.0, |d| d.as_secs_f64()),
            "total_s": total.as_secs_f64(),
            "trip_ns": s.trips,
        }));
    }
    Ok(json!({
        "mode": "stream", "chunks": chunks, "interval_ms": interval_ms,
        "warm_requests": warm_requests, "runs": runs,
    }))
}

/// Counts a stream as open until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn hold(
    target: Target,
    streams: usize,
    chunks: usize,
    interval_ms: f64,
    ramp_seconds: f64,
    timeout_seconds: f64,
) -> Result<Value, BoxError> {
    let open = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let all_open_at: Arc<Mutex<Option<f64>>> = Arc::new(Mutex::new(None));
    let start = Instant::now();
    let limit = Duration::from_secs_f64(timeout_seconds);
    let mut tasks = JoinSet::new();
    for k in 0..streams {
        let due = start + Duration::from_secs_f64(ramp_seconds * k as f64 / streams.max(1) as f64);
        let (target, open, peak, all_open_at) = (
            target.clone(),
            open.clone(),
            peak.clone(),
            all_open_at.clone(),
        );
        tasks.spawn(async move {
            sleep_until(due.into()).await;
            let one = async {
                let mut sender = target.connect().await?;
                let request = target.chat(k as u64, Some((chunks, interval_ms)))?;
                sender.ready().await?;
                let started = Instant::now();
                let response = sender.send_request(request).await?;
                let mut guard = None;
                let s = read_stream(response, started, false, || {
                    let now = open.fetch_add(1, Ordering::Relaxed) + 1;
                    guard = Some(Open(open.clone()));
                    peak.fetch_max(now, Ordering::Relaxed);
                    if now == streams {
                        let at = start.elapsed().as_secs_f64();
                        *all_open_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
                        eprintln!("loadgen: {streams} streams open after {at:.2} s");
                    }
                })
                .await?;
                drop(guard);
                if !s.done || s.trips.len() != chunks {
                    return Err(
                        format!("{} of {chunks} chunks, [DONE] {}", s.trips.len(), s.done).into(),
                    );
                }
                Ok::<_, BoxError>(())
            };
            match timeout(limit, one).await {
                Ok(r) => r,
                Err(_) => Err(format!("not finished after {timeout_seconds} s").into()),
            }
        });
    }
    let mut ok = 0usize;
    let mut errors = Errors::default();
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            Ok(()) => ok += 1,
            Err(e) => errors.add(&e),
        }
    }
    let all_open = *all_open_at.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(json!({
        "mode": "hold",
        "streams": streams,
        "chunks_per_stream": chunks,
        "interval_ms": interval_ms,
        "ramp_seconds": ramp_seconds,
        "succeeded": ok,
        "failed": streams - ok,
        "errors": errors.json(),
        "peak_open": peak.load(Ordering::Relaxed),
        "all_open_after_s": all_open,
        "seconds": start.elapsed().as_secs_f64(),
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Open {
            url,
            rate,
            seconds,
            connections,
        } => match Target::parse(&url) {
            Ok(t) => open(t, rate, seconds, connections).await,
            Err(e) => Err(e),
        },
        Mode::Closed {
            url,
            connections,
            seconds,
        } => match Target::parse(&url) {
            Ok(t) => closed(t, connections, seconds).await,
            Err(e) => Err(e),
        },
        Mode::Stream {
            url,
            chunks,
            interval_ms,
            repeat,
            warm_requests,
        } => match Target::parse(&url) {
            Ok(t) => stream(t, chunks, interval_ms, repeat, warm_requests).await,
            Err(e) => Err(e),
        },
        Mode::Hold {
            url,
            streams,
            chunks,
            interval_ms,
            ramp_seconds,
            timeout_seconds,
        } => match Target::parse(&url) {
            Ok(t) => {
                hold(
                    t,
                    streams,
                    chunks,
                    interval_ms,
                    ramp_seconds,
                    timeout_seconds,
                )
                .await
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(value) => println!("{value}"),
        Err(e) => {
            eprintln!("loadgen: error: {e}");
            std::process::exit(1);
        }
    }
}
