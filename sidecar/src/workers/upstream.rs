//! Connections to workers: Unix sockets for local workers, TCP for remote backends, pooled by hyper.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Give up connecting after this long, and try another worker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Close pooled connections idle this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per backend; a burst beyond this closes its extra connections when done.
pub const MAX_IDLE: usize = 64;

/// The pooled HTTP/1 client for one backend.
pub type UpstreamClient = Client<Connector, Full<Bytes>>;

/// Build the client for a backend reached over `socket` (local) or the request URI's host (remote).
pub fn client(socket: Option<Arc<Path>>) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(MAX_IDLE)
        .pool_timer(TokioTimer::new())
        .build(Connector { socket })
}

/// Connects to a Unix socket, or to the URI's host over TCP.
#[derive(Clone)]
pub struct Connector {
    socket: Option<Arc<Path>>,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Stream>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let socket = self.socket.clone();
        Box::pin(async move {
            let connect = async {
                match socket {
                    Some(path) => Ok(Stream::Unix(UnixStream::connect(&*path).await?)),
                    None => {
                        let host = uri.host().unwrap_or("localhost").trim_matches(['[', ']']);
                        let port = uri.port_u16().unwrap_or(80);
                        let tcp = TcpStream::connect((host, port)).await?;
                        tcp.set_nodelay(true)?;
                        Ok(Stream::Tcp(tcp))
                    }
                }
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(stream) => stream.map(TokioIo::new),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            }
        })
    }
}

/// A TCP or Unix stream.
pub enum Stream {
    /// To a remote backend.
    Tcp(TcpStream),
    /// To a local worker.
    Unix(UnixStream),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
