//! The sidecar against mock workers on port 0: byte-exact streams, failures, cancel, failover,
//! stickiness, auth, Host/Origin, metrics.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{joined, mock, mock_with, open, probe_all, send, sidecar, NDJSON_CHUNKS, SSE_CHUNKS};
use http_body_util::BodyExt;
use serde_json::json;

const STREAM: &str =
    r#"{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}"#;

#[tokio::test]
async fn sse_bytes_reach_the_client_exactly() {
    let w = mock("m").await;
    let s = sidecar(&[(&w.url, "m")], &[]).await;
    let direct = send(
        "POST",
        &format!("{}/v1/chat/completions", w.url),
        &[],
        STREAM,
    )
    .await;
    let proxied = send(
        "POST",
        &format!("{}/v1/chat/completions", s.url),
        &[],
        STREAM,
    )
    .await;
    assert_eq!(direct.body.as_ref(), joined(SSE_CHUNKS).as_slice());
    assert_eq!(proxied.body, direct.body);
    assert_eq!(proxied.header("content-type"), Some("text/event-stream"));
    assert_eq!(proxied.header("x-worker-id"), Some("remote-0"));
    assert!(proxied.header("x-request-id").is_some());
}

#[tokio::test]
async fn ndjson_bytes_reach_the_client_exactly() {
    let w = mock("m").await;
    let s = sidecar(&[(&w.url, "m")], &[]).await;
    let body = r#"{"model": "m", "messages": []}"#;
    let proxied = send("POST", &format!("{}/api/chat", s.url), &[], body).await;
    assert_eq!(proxied.body.as_ref(), joined(NDJSON_CHUNKS).as_slice());
    assert_eq!(proxied.header("content-type"), Some("application/x-ndjson"));
}

#[tokio::test]
async fn upstream_drop_mid_stream_ends_with_an_error_in_the_streams_format() {
    let w = mock("m").await;
    let s = sidecar(&[(&w.url, "m")], &[]).await;
    let body = r#"{"model": "m"}"#;
    let openai = send("POST", &format!("{}/v1/dying", s.url), &[], body).await;
    let text = String::from_utf8(openai.body.to_vec()).unwrap();
    assert!(
        text.starts_with("data: {\"n\":1}\n\ndata: {\"n\":2}\n\ndata: {\"error\":{"),
        "{text}"
    );
    assert!(
        text.ends_with("}\n\n") && text.contains("\"type\":\"server_error\""),
        "{text}"
    );

    let anthropic = send("POST", &format!("{}/v1/messages", s.url), &[], body).await;
    let text = String::from_utf8(anthropic.body.to_vec()).unwrap();
    let last = text.rsplit("\n\n").nth(1).unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{text}");
    let event: serde_json::Value =
        serde_json::from_str(&last["event: error\ndata: ".len()..]).unwrap();
    assert_eq!(
        (event["type"].as_str(), event["error"]["type"].as_str()),
        (Some("error"), Some("api_error"))
    );

    let ollama = send("POST", &format!("{}/api/dying", s.url), &[], body).await;
    let last_line = std::str::from_utf8(&ollama.body)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let line: serde_json::Value = serde_json::from_str(&last_line).unwrap();
    assert!(line["error"]
        .as_str()
        .unwrap()
        .contains("failed mid-response"));
    let errors = s
        .state
        .metrics
        .stream_errors
        .with_label_values(&["remote-0"])
        .get();
    assert_eq!(errors, 3);
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let w = mock("m").await;
    let s = sidecar(&[(&w.url, "m")], &[]).await;
    let response = open(
        "POST",
        &format!("{}/v1/slow", s.url),
        &[],
        r#"{"model": "m"}"#,
    )
    .await;
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().unwrap().starts_with(b"data: 0"));
    let backend = s.state.pool.get("remote-0").unwrap().clone();
    assert_eq!(backend.in_flight(), 1);
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !w.seen.slow_cancelled.load(Ordering::SeqCst) || backend.in_flight() != 0 {
        assert!(
            Instant::now() < deadline,
            "upstream stream still running after the client left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn failover_before_the_first_byte() {
    // A backend that refuses connections, listed first so least-loaded tries it first.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let w = mock("m").await;
    let s = sidecar(
        &[(&dead_url, "m"), (&w.url, "m")],
        &["--policy", "least_loaded"],
    )
    .await;
    let r = send(
        "POST",
        &format!("{}/v1/chat/completions", s.url),
        &[],
        r#"{"model": "m"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-worker-id"), Some("remote-1"));
    assert_eq!(
        s.state
            .metrics
            .failovers
            .with_label_values(&["remote-0"])
            .get(),
        1
    );
    let failover = s
        .state
        .metrics
        .routing_decisions
        .with_label_values(&["least_loaded", "failover"]);
    assert_eq!(failover.get(), 1);
}

#[tokio::test]
async fn every_backend_failing_is_a_502_in_the_api_shape() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let s = sidecar(&[(&dead_url, "m")], &[]).await;
    let r = send(
        "POST",
        &format!("{}/v1/chat/completions", s.url),
        &[],
        r#"{"model": "m"}"#,
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_error");
    let r = send(
        "POST",
        &format!("{}/v1/messages", s.url),
        &[],
        r#"{"model": "m"}"#,
    )
    .await;
    assert_eq!(
        (
            r.json()["type"].as_str(),
            r.json()["error"]["type"].as_str()
        ),
        (Some("error"), Some("api_error"))
    );
}

#[tokio::test]
async fn multi_turn_chats_without_ids_stay_on_their_worker() {
    let (a, b) = (mock("m").await, mock("m").await);
    let s = sidecar(&[(&a.url, "m"), (&b.url, "m")], &[]).await;
    let mut placements = std::collections::HashMap::new();
    for turn in 0..3 {
        for chat in 0..8 {
            let mut messages =
                vec![json!({"role": "user", "content": format!("conversation {chat}")})];
            for t in 0..turn {
                messages.push(json!({"role": "assistant", "content": format!("answer {t}")}));
                messages.push(json!({"role": "user", "content": format!("follow-up {t}")}));
            }
            let body = json!({"model": "m", "messages": messages}).to_string();
            let r = send(
                "POST",
                &format!("{}/v1/chat/completions", s.url),
                &[],
                &body,
            )
            .await;
            let worker = r.header("x-worker-id").unwrap().to_owned();
            let first = placements.entry(chat).or_insert_with(|| worker.clone());
            assert_eq!(*first, worker, "chat {chat} moved at turn {turn}");
        }
    }
    let used: std::collections::HashSet<_> = placements.values().collect();
    assert_eq!(
        used.len(),
        2,
        "new conversations should spread over both workers"
    );
}

#[tokio::test]
async fn requests_go_only_to_workers_serving_the_model() {
    let (a, b) = (mock("alpha").await, mock("beta").await);
    let s = sidecar(
        &[(&a.url, "alpha"), (&b.url, "beta")],
        &["--policy", "round_robin"],
    )
    .await;
    for _ in 0..4 {
        let r = send(
            "POST",
            &format!("{}/v1/chat/completions", s.url),
            &[],
            r#"{"model": "beta"}"#,
        )
        .await;
        assert_eq!(r.json()["model"], "beta");
    }
    let models = send("GET", &format!("{}/v1/models", s.url), &[], "")
        .await
        .json();
    let ids: Vec<_> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("alpha"), json!("beta")]);
}

#[tokio::test]
async fn requests_go_to_the_worker_that_has_the_model_loaded() {
    let a = mock_with(&[("other", "loaded"), ("m", "available")]).await;
    let b = mock_with(&[("m", "loaded")]).await;
    let s = sidecar(
        &[(&a.url, "other"), (&b.url, "m")],
        &["--policy", "round_robin"],
    )
    .await;
    probe_all(&s).await;
    let chat = format!("{}/v1/chat/completions", s.url);
    for _ in 0..4 {
        let r = send("POST", &chat, &[], r#"{"model": "m"}"#).await;
        assert_eq!(r.header("x-worker-id"), Some("remote-1"));
    }
    let r = send("POST", &chat, &[], r#"{"model": "other"}"#).await;
    assert_eq!(r.header("x-worker-id"), Some("remote-0"));
}

#[tokio::test]
async fn api_key_is_required_except_on_health() {
    let w = mock("m").await;
    let s = sidecar(&[(&w.url, "m")], &["--api-key", "sekret"]).await;
    let url = format!("{}/v1/chat/completions", s.url);
    let denied = send("POST", &url, &[], r#"{"model": "m"}"#).await;
    assert_eq!(denied.status, 401);
    assert_eq!(denied.json()["error"]["code"], "invalid_api_key");
    let wrong = send("POST", &url, &[("authorization", "Bearer sekreT")], "{}").await;
    assert_eq!(wrong.status, 401);
    let bearer = send("POST", &url, &[("authorization", "Bearer sekret")], "{}").await;
    assert_eq!(bearer.status, 200);
    let x_api_key = send("POST", &url, &[("x-api-key", "sekret")], "{}").await;
    assert_eq!(x_api_key.status, 200);
    let messages = send("POST", &format!("{}/v1/messages", s.url), &[], "{}").await;
    assert_eq!(messages.json()["error"]["type"], "authentication_error");
    assert_eq!(
        send("GET", &format!("{}/health", s.url), &[], "")
            .await
            .status,
        200
    );
    assert_eq!(
        send("GET", &format!("{}/metrics", s.url), &[], "")
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn host_and_origin_guard_a_keyless_loopback_server() {
    let w = mock("m").await;
    let s = sidecar(&[(&w.url, "m")], &[]).await;
    let url = format!("{}/v1/chat/completions", s.url);
    let rebinding = send("POST", &url, &[("host", "evil.example:8080")], "{}").await;
    assert_eq!(rebinding.status, 403);
    let cross = send("POST", &url, &[("origin", "https://evil.example")], "{}").await;
    assert_eq!(cross.status, 403);
    let port = s.url.rsplit(':').next().unwrap();
    let same = format!("http://127.0.0.1:{port}");
    assert_eq!(
        send("POST", &url, &[("origin", same.as_str())], "{}")
            .await
            .status,
        200
    );

    // Admin actions: same-origin from loopback only.
    let restart = format!("{}/admin/api/workers/remote-0/restart", s.url);
    let cross = send("POST", &restart, &[("origin", "https://evil.example")], "").await;
    assert_eq!(cross.status, 403);
    let fetch = send("POST", &restart, &[("sec-fetch-site", "cross-site")], "").await;
    assert_eq!(fetch.status, 403);
    let local = send("POST", &restart, &[("origin", same.as_str())], "").await;
    assert_eq!(local.status, 403, "a remote backend is not ours to restart");
    assert!(local.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("remote backend"));
    let missing = send(
        "POST",
        &format!("{}/admin/api/workers/nope/restart", s.url),
        &[],
        "",
    )
    .await;
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn cors_is_off_unless_configured() {
    let w = mock("m").await;
    let off = sidecar(&[(&w.url, "m")], &[]).await;
    let preflight = [
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
    ];
    let r = send(
        "OPTIONS",
        &format!("{}/v1/chat/completions", off.url),
        &preflight,
        "",
    )
    .await;
    assert!(r.header("access-control-allow-origin").is_none());
    let on = sidecar(&[(&w.url, "m")], &["--cors-origin", "https://app.example"]).await;
    let r = send(
        "OPTIONS",
        &format!("{}/v1/chat/completions", on.url),
        &preflight,
        "",
    )
    .await;
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let r = send(
        "POST",
        &format!("{}/v1/chat/completions", on.url),
        &preflight[..1],
        "{}",
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.header("access-control-allow-origin")),
        (200, Some("https://app.example"))
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused_in_the_api_shape() {
    let w = mock("m").await;
    let s = sidecar(&[(&w.url, "m")], &["--max-body-bytes", "2048"]).await;
    let big = format!("{{\"model\": \"m\", \"prompt\": \"{}\"}}", "x".repeat(4096));
    let r = send("POST", &format!("{}/v1/completions", s.url), &[], &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    let r = send("POST", &format!("{}/api/generate", s.url), &[], &big).await;
    assert!(r.json()["error"].as_str().unwrap().contains("2048"));
    assert_eq!(w.seen.requests.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn wrong_methods_on_the_sidecars_own_routes_are_405_in_the_api_shape() {
    let w = mock("m").await;
    let s = sidecar(&[(&w.url, "m")], &[]).await;
    for (method, path) in [
        ("POST", "/v1/models"),
        ("DELETE", "/health"),
        ("PUT", "/metrics"),
    ] {
        let r = send(method, &format!("{}{path}", s.url), &[], "{}").await;
        assert_eq!(r.status, 405, "{method} {path}");
        let error = &r.json()["error"];
        assert_eq!(error["code"], "method_not_allowed", "{method} {path}");
        assert_eq!(error["type"], "invalid_request_error");
        assert!(error["message"].as_str().unwrap().contains(path));
        assert!(
            r.header("allow").unwrap().contains("GET"),
            "{method} {path}"
        );
    }
    assert_eq!(w.seen.requests.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn no_ready_worker_is_a_503_with_retry_after() {
    let w = mock("m").await;
    let s = sidecar(&[(&w.url, "m")], &[]).await;
    s.state.pool.get("remote-0").unwrap().status().state =
        mlx_flash_sidecar::workers::backend::State::Loading;
    let r = send("POST", &format!("{}/v1/chat/completions", s.url), &[], "{}").await;
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        send("GET", &format!("{}/ready", s.url), &[], "")
            .await
            .status,
        503
    );
}

#[tokio::test]
async fn metrics_merge_own_and_worker_series() {
    let (a, b) = (mock("m").await, mock("m").await);
    let s = sidecar(&[(&a.url, "m"), (&b.url, "m")], &[]).await;
    send(
        "POST",
        &format!("{}/v1/chat/completions", s.url),
        &[],
        STREAM,
    )
    .await;
    let text = String::from_utf8(
        send("GET", &format!("{}/metrics", s.url), &[], "")
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("mlx_flash_sidecar_routing_decisions_total{branch=\"least_loaded\",policy=\"cache_aware\"} 1"), "{text}");
    assert!(text.contains(
        "mlx_flash_sidecar_requests_total{route=\"/chat/completions\",status=\"200\"} 1"
    ));
    assert!(text.contains("mlx_flash_sidecar_worker_up{worker=\"remote-1\"} 1"));
    assert!(text.contains("mlx_flash_requests_total{worker=\"remote-0\",route=\"/chat/completions\",status=\"200\"} 3"));
    assert!(text.contains("mlx_flash_requests_total{worker=\"remote-1\","));
    assert_eq!(
        text.matches("# TYPE mlx_flash_requests_total counter")
            .count(),
        1
    );
}

#[tokio::test]
async fn remote_backend_key_replaces_the_clients() {
    let w = mock("m").await;
    let s =
        common::sidecar_with_keys(&[(&w.url, "m", Some("theirs"))], &["--api-key", "ours"]).await;
    let url = format!("{}/v1/chat/completions", s.url);
    let r = send(
        "POST",
        &url,
        &[("x-api-key", "ours"), ("x-request-id", "req-1")],
        "{}",
    )
    .await;
    assert_eq!(r.json()["authorization"], "Bearer theirs");
    assert_eq!(r.json()["request_id"], "req-1");
}
