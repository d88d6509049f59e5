//! The admin dashboard (`/admin`) and chat page (`/chat`): static assets compiled into the binary,
//! no CDN. The pages carry no data, so anyone who may reach the server may load them; every call
//! they make goes through the usual API key, Host and Origin checks. uPlot is vendored from npm
//! (version and checksums in `assets/vendor/`).

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// `/ui/{name}`: every asset the pages load, with its content type.
const ASSETS: &[(&str, &str, &str)] = &[
    ("common.js", JS, include_str!("../assets/common.js")),
    ("markdown.js", JS, include_str!("../assets/markdown.js")),
    ("admin.js", JS, include_str!("../assets/admin.js")),
    ("chat.js", JS, include_str!("../assets/chat.js")),
    ("ui.css", CSS, include_str!("../assets/ui.css")),
    (
        "uPlot.iife.min.js",
        JS,
        include_str!("../assets/vendor/uplot-1.6.32/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        CSS,
        include_str!("../assets/vendor/uplot-1.6.32/uPlot.min.css"),
    ),
];

/// Paths served without the API key: the pages and their assets.
pub fn is_public(path: &str) -> bool {
    path == "/admin" || path == "/chat" || path.starts_with("/ui/")
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// `GET /admin`.
pub async fn admin() -> Response {
    page(HTML, include_str!("../assets/admin.html"))
}

/// `GET /chat`.
pub async fn chat() -> Response {
    page(HTML, include_str!("../assets/chat.html"))
}

/// `GET /ui/{name}`.
pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => page(content_type, body),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_reference_only_served_assets() {
        for html in [
            include_str!("../assets/admin.html"),
            include_str!("../assets/chat.html"),
        ] {
            for part in html.split("\"/ui/").skip(1) {
                let name = part.split('"').next().unwrap();
                assert!(
                    ASSETS.iter().any(|(n, _, _)| *n == name),
                    "{name} is not served"
                );
            }
            assert!(!html.contains("http://") && !html.contains("https://"));
        }
    }

    #[test]
    fn public_paths_are_only_the_pages() {
        assert!(is_public("/admin") && is_public("/chat") && is_public("/ui/admin.js"));
        assert!(
            !is_public("/admin/api/workers") && !is_public("/v1/models") && !is_public("/adminx")
        );
    }
}
