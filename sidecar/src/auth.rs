//! Who may talk to us (CORS preflights are answered before this, by tower-http): the API key (constant-time), the Host allowlist that stops DNS rebinding, the
//! Origin check that stops other web pages, and the stricter rule for admin actions.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::config::is_loopback;
use crate::error::{ApiError, ErrorKind};
use crate::AppState;

/// Routes anyone may call (liveness probes).
const PUBLIC: &[&str] = &["/health"];

/// What the guard checks, fixed at start-up.
#[derive(Debug, Clone)]
pub struct Guard {
    api_key: Option<String>,
    /// Check Host against the allowlist (loopback listener without a key).
    check_host: bool,
    allowed_hosts: Vec<String>,
    cors_origins: Vec<String>,
}

impl Guard {
    /// The guard for a listener on `host`.
    pub fn new(
        api_key: Option<String>,
        host: &str,
        allowed_hosts: &[String],
        cors_origins: &[String],
    ) -> Self {
        let mut allowed: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        allowed.extend(allowed_hosts.iter().map(|h| h.to_ascii_lowercase()));
        // The loopback address it is bound to, as a Host names it (an address cannot be rebound).
        if is_loopback(host) {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let named = if bare.contains(':') {
                format!("[{bare}]")
            } else {
                bare.to_owned()
            };
            allowed.push(named.to_ascii_lowercase());
        }
        Guard {
            check_host: api_key.is_none() && is_loopback(host),
            api_key,
            allowed_hosts: allowed,
            cors_origins: cors_origins.to_vec(),
        }
    }

    /// Whether `headers` carry the API key (Bearer or `x-api-key`), compared in constant time.
    pub fn has_key(&self, headers: &HeaderMap) -> bool {
        let Some(key) = &self.api_key else {
            return true;
        };
        // The scheme is case-insensitive (RFC 9110); either header may carry the key.
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(|v| match v.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
                _ => v,
            });
        let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        [x_api_key, bearer]
            .into_iter()
            .flatten()
            .any(|given| bool::from(given.as_bytes().ct_eq(key.as_bytes())))
    }

    fn host_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers.get("host").and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let name = strip_port(host).to_ascii_lowercase();
        self.allowed_hosts.contains(&name)
    }

    /// An `Origin` is fine if absent (not a browser), same-origin, or listed with `--cors-origin`.
    fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get("origin").and_then(|o| o.to_str().ok()) else {
            return true;
        };
        if self.cors_origins.iter().any(|o| o == "*" || o == origin) {
            return true;
        }
        let host = headers.get("host").and_then(|h| h.to_str().ok());
        let origin_host = origin.split_once("://").map(|(_, rest)| rest);
        host.is_some()
            && origin_host.map(|o| o.eq_ignore_ascii_case(host.unwrap_or(""))) == Some(true)
    }

    /// Admin actions: the key when one is set; otherwise a same-origin request from this machine.
    pub fn admin_allowed(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> bool {
        if self.api_key.is_some() {
            return self.has_key(headers);
        }
        let local_peer = peer.is_some_and(|p| p.ip().is_loopback());
        let cross_site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "cross-site" || v == "same-site");
        local_peer && self.host_allowed(headers) && self.origin_allowed(headers) && !cross_site
    }
}

/// `host:port` → `host`, keeping IPv6 brackets.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Middleware on every route: Host and Origin checks, then the API key (except on [`PUBLIC`]).
pub async fn check(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let guard = &state.guard;
    let path = request.uri().path();
    let headers = request.headers();
    let deny = |kind| ApiError::new(path, kind).into_response();
    if guard.check_host && !guard.host_allowed(headers) {
        return deny(ErrorKind::Forbidden(
            "Host not allowed: use localhost or 127.0.0.1, or start with --allowed-host".into(),
        ));
    }
    if !guard.origin_allowed(headers) {
        return deny(ErrorKind::Forbidden(
            "Cross-origin requests are not allowed (start with --cors-origin to allow one)".into(),
        ));
    }
    if !PUBLIC.contains(&path) && !crate::webui::is_public(path) && !guard.has_key(headers) {
        return deny(ErrorKind::Unauthorized);
    }
    next.run(request).await
}

/// Middleware on admin actions (on top of [`check`]).
pub async fn admin(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if !state.guard.admin_allowed(request.headers(), Some(peer)) {
        let kind = ErrorKind::Forbidden(
            "Admin actions need the API key, or (without one) a same-origin request from this machine"
                .into(),
        );
        return ApiError::new(request.uri().path(), kind).into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn local() -> Option<SocketAddr> {
        Some("127.0.0.1:5000".parse().unwrap())
    }

    #[test]
    fn key_in_either_header() {
        let g = Guard::new(Some("sekret".into()), "0.0.0.0", &[], &[]);
        assert!(g.has_key(&headers(&[("authorization", "Bearer sekret")])));
        assert!(g.has_key(&headers(&[("authorization", "bearer sekret")])));
        assert!(g.has_key(&headers(&[
            ("x-api-key", ""),
            ("authorization", "Bearer sekret")
        ])));
        assert!(g.has_key(&headers(&[("x-api-key", "sekret")])));
        assert!(!g.has_key(&headers(&[("authorization", "Bearer sekre")])));
        assert!(!g.has_key(&headers(&[])));
    }

    #[test]
    fn host_allowlist_blocks_rebinding() {
        let g = Guard::new(None, "127.0.0.1", &["mybox.lan".into()], &[]);
        assert!(g.host_allowed(&headers(&[("host", "localhost:8080")])));
        assert!(g.host_allowed(&headers(&[("host", "127.0.0.1:8080")])));
        assert!(g.host_allowed(&headers(&[("host", "[::1]:8080")])));
        assert!(g.host_allowed(&headers(&[("host", "MyBox.lan")])));
        assert!(!g.host_allowed(&headers(&[("host", "evil.example:8080")])));
        assert!(!g.host_allowed(&headers(&[])));
    }

    #[test]
    fn the_bound_loopback_address_is_an_allowed_host() {
        let g = Guard::new(None, "127.0.0.2", &[], &[]);
        assert!(g.host_allowed(&headers(&[("host", "127.0.0.2:8080")])));
        assert!(g.host_allowed(&headers(&[("host", "localhost:8080")])));
        assert!(!g.host_allowed(&headers(&[("host", "127.0.0.3:8080")])));
        assert!(!g.host_allowed(&headers(&[("host", "evil.example:8080")])));
        let v6 = Guard::new(None, "::1", &[], &[]);
        assert!(v6.host_allowed(&headers(&[("host", "[::1]:8080")])));
    }

    #[test]
    fn origin_must_be_same_or_listed() {
        let g = Guard::new(None, "127.0.0.1", &[], &["https://app.example".into()]);
        let h = |o| headers(&[("host", "localhost:8080"), ("origin", o)]);
        assert!(g.origin_allowed(&headers(&[("host", "localhost:8080")])));
        assert!(g.origin_allowed(&h("http://localhost:8080")));
        assert!(g.origin_allowed(&h("https://app.example")));
        assert!(!g.origin_allowed(&h("https://evil.example")));
        assert!(!g.origin_allowed(&h("http://localhost:9999")));
    }

    #[test]
    fn admin_without_key_is_local_and_same_origin_only() {
        let g = Guard::new(None, "127.0.0.1", &[], &[]);
        let same = headers(&[
            ("host", "localhost:8080"),
            ("origin", "http://localhost:8080"),
        ]);
        assert!(g.admin_allowed(&same, local()));
        assert!(!g.admin_allowed(&same, Some("10.0.0.2:5000".parse().unwrap())));
        let other = headers(&[
            ("host", "localhost:8080"),
            ("origin", "http://evil.example"),
        ]);
        assert!(!g.admin_allowed(&other, local()));
        let fetch = headers(&[("host", "localhost:8080"), ("sec-fetch-site", "cross-site")]);
        assert!(!g.admin_allowed(&fetch, local()));
    }

    #[test]
    fn admin_with_key_needs_the_key() {
        let g = Guard::new(Some("k".into()), "127.0.0.1", &[], &[]);
        assert!(!g.admin_allowed(&headers(&[("host", "localhost")]), local()));
        assert!(g.admin_allowed(&headers(&[("x-api-key", "k")]), None));
    }
}
