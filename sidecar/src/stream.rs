//! The response body relay: upstream frames pass through untouched (never re-wrapped), the request
//! stays counted until the body ends, and an upstream failure after the response started becomes a
//! final error in the stream's own format.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::StatusCode;
use prometheus::{Histogram, IntCounter};

use crate::error::{error_body, Family};
use crate::proxy::AccessLog;
use crate::workers::backend::InFlight;

/// How a response body is framed, which decides how a mid-stream failure is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `text/event-stream`.
    Sse(Family),
    /// `application/x-ndjson`.
    Ndjson,
    /// Anything else: a failure aborts the connection, so the client cannot mistake a cut body for
    /// a whole one.
    Opaque,
}

impl Framing {
    /// Framing from the response's content type and the API family of the request.
    pub fn of(content_type: Option<&str>, family: Family) -> Framing {
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        if ct.starts_with("text/event-stream") {
            Framing::Sse(family)
        } else if ct.starts_with("application/x-ndjson") {
            Framing::Ndjson
        } else {
            Framing::Opaque
        }
    }

    /// The final event telling the client the worker failed mid-stream.
    pub fn error_event(self, message: &str) -> Option<Bytes> {
        let status = StatusCode::BAD_GATEWAY;
        let code = "upstream_error";
        let text = match self {
            Framing::Sse(Family::Anthropic) => format!(
                "event: error\ndata: {}\n\n",
                error_body(Family::Anthropic, status, code, message)
            ),
            Framing::Sse(family) => {
                format!("data: {}\n\n", error_body(family, status, code, message))
            }
            Framing::Ndjson => format!("{}\n", error_body(Family::Ollama, status, code, message)),
            Framing::Opaque => return None,
        };
        Some(Bytes::from(text))
    }
}

/// Observations made when the body ends, however it ends.
pub struct OnEnd {
    /// The request's access line.
    pub access: Option<AccessLog>,
    /// Request start.
    pub started: Instant,
    /// Observes the whole request's duration.
    pub duration: Histogram,
    /// Counted when the stream was cut by the upstream.
    pub stream_errors: IntCounter,
}

/// The relayed body.
pub struct Relay {
    inner: Incoming,
    framing: Framing,
    tail: Option<Bytes>,
    done: bool,
    guard: Option<InFlight>,
    on_end: Option<OnEnd>,
}

impl Relay {
    /// Relay `inner`, holding `guard` until the body ends or is dropped.
    pub fn new(inner: Incoming, framing: Framing, guard: InFlight, on_end: OnEnd) -> Self {
        Relay {
            inner,
            framing,
            tail: None,
            done: false,
            guard: Some(guard),
            on_end: Some(on_end),
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.guard = None;
        if let Some(end) = self.on_end.take() {
            end.duration.observe(end.started.elapsed().as_secs_f64());
            if let Some(access) = &end.access {
                access.write();
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // A client that went away: the duration still counts; dropping `inner` closes the upstream
        // connection, which cancels generation in the worker.
        self.finish();
    }
}

/// Why a relayed body ended early.
#[derive(Debug, thiserror::Error)]
#[error("upstream failed mid-response: {0}")]
pub struct RelayError(String);

impl Body for Relay {
    type Data = Bytes;
    type Error = RelayError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RelayError>>> {
        let this = self.get_mut();
        if let Some(tail) = this.tail.take() {
            this.finish();
            return Poll::Ready(Some(Ok(Frame::data(tail))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let worker = this.guard.as_ref().map(|g| g.backend().id.clone());
                let message = format!(
                    "worker {} failed mid-response: {e}",
                    worker.as_deref().unwrap_or("?")
                );
                let request_id = this.on_end.as_ref().and_then(|e| e.access.as_ref());
                let request_id = request_id.map(|a| a.request_id.as_str());
                tracing::warn!(request_id, worker = worker.as_deref(), error = %e,
                    "upstream failed mid-response");
                if let Some(end) = &this.on_end {
                    end.stream_errors.inc();
                }
                match this.framing.error_event(&message) {
                    Some(event) => {
                        this.finish();
                        Poll::Ready(Some(Ok(Frame::data(event))))
                    }
                    None => {
                        this.finish();
                        Poll::Ready(Some(Err(RelayError(message))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.tail.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_events_in_each_format() {
        let openai = Framing::of(Some("text/event-stream; charset=utf-8"), Family::OpenAi);
        let event = openai.error_event("boom").unwrap();
        let text = std::str::from_utf8(&event).unwrap();
        assert!(text.starts_with("data: {\"error\":{") && text.ends_with("\n\n"));
        assert!(text.contains("\"message\":\"boom\""));

        let anthropic = Framing::of(Some("text/event-stream"), Family::Anthropic);
        let event = anthropic.error_event("boom").unwrap();
        assert!(event.starts_with(b"event: error\ndata: {\"type\":\"error\",\"error\":{"));

        let ndjson = Framing::of(Some("application/x-ndjson"), Family::Ollama);
        assert_eq!(
            ndjson.error_event("boom").unwrap(),
            "{\"error\":\"boom\"}\n"
        );

        assert_eq!(
            Framing::of(Some("application/json"), Family::OpenAi).error_event("x"),
            None
        );
    }
}
