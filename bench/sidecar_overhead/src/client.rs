//! The load generator's HTTP/1.1 client: one connection per `SendRequest` (no pool in between, so
//! the client adds as little as it can), the chat requests it sends, and the SSE reader that times
//! every chunk.

use std::collections::BTreeMap;
use std::error::Error;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::{stamp, unix_ns, DONE};

/// Any error, for a benchmark tool that reports and exits.
pub type BoxError = Box<dyn Error + Send + Sync>;
/// One HTTP/1.1 connection.
pub type Sender = SendRequest<Full<Bytes>>;

/// Where requests go.
#[derive(Clone)]
pub struct Target {
    /// `host:port` to connect to.
    pub addr: String,
    /// The `Host` header (the low-level connection API does not add one; the sidecar checks it).
    pub host: HeaderValue,
}

impl Target {
    /// From a base URL such as `http://127.0.0.1:8080`.
    pub fn parse(url: &str) -> Result<Target, BoxError> {
        let uri: Uri = url.parse()?;
        let authority = uri.authority().ok_or("the URL needs a host:port")?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Target {
            addr: format!("{}:{port}", authority.host()),
            host: HeaderValue::from_str(authority.as_str())?,
        })
    }

    /// A new connection (TCP_NODELAY, as any latency-minded client sets).
    pub async fn connect(&self) -> Result<Sender, BoxError> {
        let tcp = TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Chat request number `n`; `stream` is `(chunks, interval_ms)` for a streamed answer.
    pub fn chat(
        &self,
        n: u64,
        stream: Option<(usize, f64)>,
    ) -> Result<Request<Full<Bytes>>, BoxError> {
        let stream_fields = match stream {
            Some((chunks, interval_ms)) => {
                format!(
                    ",\"stream\":true,\"mock_chunks\":{chunks},\"mock_interval_ms\":{interval_ms}"
                )
            }
            None => ",\"stream\":false".to_owned(),
        };
        let body = format!(
            "{{\"model\":\"mock\",\"max_tokens\":16,\"messages\":[\
             {{\"role\":\"system\",\"content\":\"You are a helpful assistant. Answer briefly and politely.\"}},\
             {{\"role\":\"user\",\"content\":\"Request {n}: what is the weather like in Berlin today, \
             and should I take an umbrella?\"}}]{stream_fields}}}"
        );
        Ok(Request::post("/v1/chat/completions")
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?)
    }
}

/// Send one non-streamed request and read the whole answer.
pub async fn exchange(sender: &mut Sender, request: Request<Full<Bytes>>) -> Result<(), BoxError> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK || body.is_empty() {
        return Err(format!("status {status}, {} body bytes", body.len()).into());
    }
    Ok(())
}

/// A duration in whole nanoseconds.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Nearest-rank percentiles of `values` (nanoseconds), sorted in place.
pub fn percentiles(values: &mut [u64]) -> Value {
    values.sort_unstable();
    let at = |q: f64| -> u64 {
        if values.is_empty() {
            return 0;
        }
        let rank = (q * values.len() as f64).ceil() as usize;
        values[rank.clamp(1, values.len()) - 1]
    };
    let mean = if values.is_empty() {
        0.0
    } else {
        values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64
    };
    json!({
        "count": values.len(), "min": at(0.0), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
        "p999": at(0.999), "max": values.last().copied().unwrap_or(0), "mean": mean.round(),
    })
}

/// Error messages and how often each occurred (bounded, so a storm of failures stays readable).
#[derive(Default)]
pub struct Errors(BTreeMap<String, usize>);

impl Errors {
    /// Count `e`.
    pub fn add(&mut self, e: &BoxError) {
        let mut text = e.to_string();
        if let Some(source) = e.source() {
            text = format!("{text}: {source}");
        }
        if self.0.len() < 20 || self.0.contains_key(&text) {
            *self.0.entry(text).or_default() += 1;
        } else {
            *self.0.entry("(other)".into()).or_default() += 1;
        }
    }

    /// Errors counted.
    pub fn total(&self) -> usize {
        self.0.values().sum()
    }

    /// The counts as a JSON object.
    pub fn json(&self) -> Value {
        json!(self.0)
    }

    /// Add another set of counts to these.
    pub fn merge(&mut self, other: Errors) {
        for (text, count) in other.0 {
            *self.0.entry(text).or_default() += count;
        }
    }
}

/// What one stream delivered.
#[derive(Default)]
pub struct Streamed {
    /// Trip time of each chunk: arrival here minus the mock's stamp (wall clock, nanoseconds).
    pub trips: Vec<u64>,
    /// Body reads it took (chunks that arrive together share one read).
    pub reads: usize,
    /// `data: [DONE]` arrived.
    pub done: bool,
    /// Request sent → first body bytes.
    pub first_chunk: Option<Duration>,
}

/// Read an SSE body to its end, timing every event.
pub async fn read_stream(
    response: hyper::Response<hyper::body::Incoming>,
    started: Instant,
    keep_trips: bool,
    on_first: impl FnOnce(),
) -> Result<Streamed, BoxError> {
    let status = response.status();
    if status != StatusCode::OK {
        let body = response.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(format!("status {status}: {text}").into());
    }
    let mut body = response.into_body();
    let mut out = Streamed::default();
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunks = 0usize;
    let mut on_first = Some(on_first);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        let now = unix_ns();
        out.reads += 1;
        if out.first_chunk.is_none() {
            out.first_chunk = Some(started.elapsed());
            if let Some(f) = on_first.take() {
                f();
            }
        }
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            if event == DONE {
                out.done = true;
            } else if let Some(t) = stamp(&event) {
                chunks += 1;
                if keep_trips {
                    out.trips.push(now.saturating_sub(t));
                }
            } else {
                return Err(
                    format!("unexpected event {:?}", String::from_utf8_lossy(&event)).into(),
                );
            }
        }
    }
    if !keep_trips {
        out.trips = vec![0; chunks];
    }
    Ok(out)
}
