//! Errors: [`StartError`] stops the process with one line; [`ApiError`] answers one request in the
//! error shape of the API the client speaks (OpenAI, Anthropic, Ollama or MCP's JSON-RPC).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Anything that prevents the sidecar from starting or makes it stop.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad flags or config file.
    #[error("{0}")]
    Config(String),
    /// The listening socket or the runtime directory could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Every local worker failed before any was ready: there is nothing to serve.
    #[error("no worker could start ({0}); stopping")]
    NoWorker(String),
}

impl StartError {
    /// Process exit code: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) => 2,
            StartError::Io { .. } | StartError::NoWorker(_) => 1,
        }
    }
}

/// The API family a path belongs to; it decides error shapes, in and out of streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI (and everything not claimed by another family).
    OpenAi,
    /// Anthropic Messages: `/v1/messages*`.
    Anthropic,
    /// Ollama: `/api/*`.
    Ollama,
    /// MCP's Streamable HTTP: `/mcp`, whose errors are JSON-RPC error responses.
    Mcp,
}

impl Family {
    /// The family of a request path.
    pub fn of(path: &str) -> Family {
        if path.starts_with("/v1/messages") || path.starts_with("/messages") {
            Family::Anthropic
        } else if path.starts_with("/api/") {
            Family::Ollama
        } else if path == "/mcp" || path.starts_with("/mcp/") {
            Family::Mcp
        } else {
            Family::OpenAi
        }
    }
}

/// What went wrong with one request. Each variant knows its status and whether a retry can help.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// Missing or wrong API key.
    #[error("Missing or incorrect API key (send 'Authorization: Bearer <key>' or 'x-api-key').")]
    Unauthorized,
    /// Host or Origin not allowed, or an admin action from elsewhere than this machine.
    #[error("{0}")]
    Forbidden(String),
    /// The body is over `--max-body-bytes`.
    #[error("Request body is larger than {0} bytes.")]
    PayloadTooLarge(usize),
    /// The body could not be read from the client.
    #[error("Could not read the request body: {0}")]
    BadBody(String),
    /// A query parameter of one of our own routes is invalid.
    #[error("{0}")]
    BadParameter(String),
    /// An admin route named an unknown worker.
    #[error("{0}")]
    NotFound(String),
    /// A method one of our own routes does not answer.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// No worker can take the request now (all loading, restarting or down).
    #[error("{0}")]
    Unavailable(String),
    /// Every worker we tried failed before answering.
    #[error("The worker failed before responding: {0}")]
    Upstream(String),
}

impl ErrorKind {
    fn status(&self) -> StatusCode {
        match self {
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden(_) => StatusCode::FORBIDDEN,
            ErrorKind::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BadBody(_) | ErrorKind::BadParameter(_) => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound(_) => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ErrorKind::Unauthorized => "invalid_api_key",
            ErrorKind::Forbidden(_) => "forbidden",
            ErrorKind::PayloadTooLarge(_) => "request_too_large",
            ErrorKind::BadBody(_) => "invalid_body",
            ErrorKind::BadParameter(_) => "invalid_parameter",
            ErrorKind::NotFound(_) => "not_found",
            ErrorKind::MethodNotAllowed(_) => "method_not_allowed",
            ErrorKind::Unavailable(_) => "no_worker_available",
            ErrorKind::Upstream(_) => "upstream_error",
        }
    }
}

/// An [`ErrorKind`] rendered in one API family's shape.
#[derive(Debug)]
pub struct ApiError {
    /// Which shape to answer in.
    pub family: Family,
    /// What went wrong.
    pub kind: ErrorKind,
}

impl ApiError {
    /// An error for a request to `path`.
    pub fn new(path: &str, kind: ErrorKind) -> Self {
        ApiError {
            family: Family::of(path),
            kind,
        }
    }

    /// The status and JSON body this error answers with.
    pub fn to_json(&self) -> (StatusCode, serde_json::Value) {
        let status = self.kind.status();
        let message = self.kind.to_string();
        let body = error_body(self.family, status, self.kind.code(), &message);
        (status, body)
    }
}

/// The JSON error body of `family` for `message`; also used inside streams.
pub fn error_body(
    family: Family,
    status: StatusCode,
    code: &str,
    message: &str,
) -> serde_json::Value {
    match family {
        Family::OpenAi => {
            let kind = if status.is_server_error() {
                "server_error"
            } else if status == StatusCode::UNAUTHORIZED {
                "authentication_error"
            } else {
                "invalid_request_error"
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        }
        Family::Anthropic => {
            let kind = match status {
                StatusCode::UNAUTHORIZED => "authentication_error",
                StatusCode::FORBIDDEN => "permission_error",
                StatusCode::NOT_FOUND => "not_found_error",
                StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
                StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
                s if s.is_server_error() => "api_error",
                _ => "invalid_request_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Family::Ollama => json!({ "error": message }),
        Family::Mcp => {
            // JSON-RPC: -32600 for a request we cannot read, the server-error range otherwise;
            // the HTTP status and our code ride along in `data`.
            let rpc =
                if status == StatusCode::BAD_REQUEST || status == StatusCode::PAYLOAD_TOO_LARGE {
                    -32600
                } else {
                    -32000
                };
            json!({"jsonrpc": "2.0", "id": null, "error": {"code": rpc, "message": message,
                "data": {"status": status.as_u16(), "code": code}}})
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.to_json();
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self.kind {
            ErrorKind::Unavailable(_) => {
                headers.insert("retry-after", HeaderValue::from_static("2"));
            }
            // RFC 9110: a 401 names the scheme it wants.
            ErrorKind::Unauthorized => {
                headers.insert("www-authenticate", HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcp_errors_are_json_rpc() {
        assert_eq!(Family::of("/mcp"), Family::Mcp);
        assert_eq!(Family::of("/mcpx"), Family::OpenAi);
        let (status, body) = ApiError::new("/mcp", ErrorKind::Unauthorized).to_json();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["jsonrpc"], "2.0");
        assert!(body["id"].is_null());
        assert_eq!(body["error"]["code"], -32000);
        assert_eq!(body["error"]["data"]["status"], 401);
        assert_eq!(body["error"]["data"]["code"], "invalid_api_key");
        let (_, body) = ApiError::new("/mcp", ErrorKind::PayloadTooLarge(10)).to_json();
        assert_eq!(body["error"]["code"], -32600);
    }
}
