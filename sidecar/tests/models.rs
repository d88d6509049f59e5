//! The model admin API against mock workers on port 0: every worker's table in one call, load and
//! unload forwarded to one worker or to all, names with slashes, and the admin guard.

mod common;

use common::{mock, mock_with, probe_all, send, sidecar, Sidecar};
use serde_json::json;

/// A port nothing listens on.
async fn dead_url() -> String {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", dead.local_addr().unwrap())
}

fn loaded(s: &Sidecar, worker: &str) -> Vec<String> {
    s.state.pool.get(worker).unwrap().status().loaded.clone()
}

#[tokio::test]
async fn every_workers_model_table_in_one_call() {
    let a = mock_with(&[("m", "loaded"), ("n", "available")]).await;
    let dead = dead_url().await;
    let s = sidecar(&[(&a.url, "m"), (&dead, "m")], &[]).await;
    let r = send("GET", &format!("{}/admin/api/models", s.url), &[], "").await;
    assert_eq!(r.status, 200);
    let workers = r.json()["workers"].clone();
    assert_eq!(workers[0]["id"], "remote-0");
    assert_eq!(workers[0]["state"], "ready");
    assert_eq!(workers[0]["error"], json!(null));
    assert_eq!(workers[0]["models"]["memory_limit"], 8000);
    assert_eq!(workers[0]["models"]["models"][1]["status"], "available");
    assert_eq!(workers[1]["id"], "remote-1");
    assert_eq!(workers[1]["models"], json!(null));
    assert!(workers[1]["error"]
        .as_str()
        .unwrap()
        .contains("/admin/api/models"));
}

#[tokio::test]
async fn load_goes_to_the_named_worker_and_routing_sees_it_at_once() {
    let a = mock_with(&[("m", "available")]).await;
    let b = mock_with(&[("m", "available")]).await;
    let s = sidecar(
        &[(&a.url, "m"), (&b.url, "m")],
        &["--policy", "round_robin"],
    )
    .await;
    probe_all(&s).await;
    let url = format!("{}/admin/api/models/m/load?worker=remote-1", s.url);
    let r = send("POST", &url, &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"id": "m", "status": "loaded"}));
    assert!(a.seen.model_actions.lock().unwrap().is_empty());
    assert_eq!(b.seen.model_actions.lock().unwrap().len(), 1);
    assert_eq!(loaded(&s, "remote-1"), ["m"]);
    assert!(loaded(&s, "remote-0").is_empty());
    for _ in 0..2 {
        let chat = format!("{}/v1/chat/completions", s.url);
        let r = send("POST", &chat, &[], r#"{"model": "m"}"#).await;
        assert_eq!(r.header("x-worker-id"), Some("remote-1"));
    }
}

#[tokio::test]
async fn a_named_workers_failure_is_passed_through() {
    let a = mock_with(&[("m", "loaded")]).await;
    let s = sidecar(&[(&a.url, "m")], &[]).await;
    let base = format!("{}/admin/api/models", s.url);
    let r = send(
        "POST",
        &format!("{base}/nope/load?worker=remote-0"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = send(
        "POST",
        &format!("{base}/busy/load?worker=remote-0"),
        &[],
        "",
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.header("retry-after")),
        (503, Some("7"))
    );
}

#[tokio::test]
async fn unknown_workers_and_actions_are_404_in_the_sidecars_shape() {
    let a = mock_with(&[("m", "loaded")]).await;
    let s = sidecar(&[(&a.url, "m")], &[]).await;
    let base = format!("{}/admin/api/models", s.url);
    for path in ["m/load?worker=nope", "m/frobnicate", "load", "../x/unload"] {
        let r = send("POST", &format!("{base}/{path}"), &[], "").await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()["error"]["code"], "not_found", "{path}");
    }
    assert!(a.seen.model_actions.lock().unwrap().is_empty());
}

#[tokio::test]
async fn without_a_worker_the_action_goes_to_every_ready_one() {
    let a = mock_with(&[("m", "loaded")]).await;
    let b = mock_with(&[("m", "loaded")]).await;
    let idle = mock_with(&[("m", "loaded")]).await;
    let s = sidecar(&[(&a.url, "m"), (&b.url, "m"), (&idle.url, "m")], &[]).await;
    probe_all(&s).await;
    s.state.pool.get("remote-2").unwrap().status().state =
        mlx_flash_sidecar::workers::backend::State::Loading;
    let r = send(
        "POST",
        &format!("{}/admin/api/models/m/unload", s.url),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let results = r.json()["results"].clone();
    assert_eq!(
        results,
        json!([
            {"worker": "remote-0", "status": 200, "body": {"id": "m", "status": "available"}},
            {"worker": "remote-1", "status": 200, "body": {"id": "m", "status": "available"}},
        ])
    );
    assert!(idle.seen.model_actions.lock().unwrap().is_empty());
    assert!(loaded(&s, "remote-0").is_empty() && loaded(&s, "remote-1").is_empty());
}

#[tokio::test]
async fn the_first_failing_worker_sets_the_status_of_an_action_on_all() {
    let a = mock_with(&[("m", "available")]).await;
    let b = mock_with(&[("other", "loaded")]).await;
    let s = sidecar(&[(&a.url, "m"), (&b.url, "other")], &[]).await;
    let base = format!("{}/admin/api/models", s.url);
    let r = send("POST", &format!("{base}/m/load"), &[], "").await;
    assert_eq!((r.status.as_u16(), r.header("retry-after")), (404, None));
    let statuses: Vec<_> = r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(200), json!(404)]);
    assert_eq!(
        r.json()["results"][1]["body"]["error"]["code"],
        "model_not_found"
    );

    let r = send("POST", &format!("{base}/busy/load"), &[], "").await;
    assert_eq!(
        (r.status.as_u16(), r.header("retry-after")),
        (503, Some("7"))
    );
}

#[tokio::test]
async fn an_unreachable_worker_is_a_502_result() {
    let a = mock_with(&[("m", "available")]).await;
    let dead = dead_url().await;
    let s = sidecar(&[(&dead, "m"), (&a.url, "m")], &[]).await;
    let r = send(
        "POST",
        &format!("{}/admin/api/models/m/load", s.url),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 502);
    let results = r.json()["results"].clone();
    assert_eq!(results[0]["status"], 502);
    assert_eq!(results[0]["body"]["error"]["code"], "upstream_error");
    assert_eq!(results[1]["status"], 200);
}

#[tokio::test]
async fn names_with_slashes_reach_the_worker_percent_encoded() {
    let a = mock_with(&[("org/repo", "available"), ("org/my model", "loaded")]).await;
    let s = sidecar(&[(&a.url, "org/repo")], &[]).await;
    let base = format!("{}/admin/api/models", s.url);
    let r = send(
        "POST",
        &format!("{base}/org/repo/load?worker=remote-0"),
        &[],
        r#"{"pin": true}"#,
    )
    .await;
    assert_eq!(r.json(), json!({"id": "org/repo", "status": "loaded"}));
    let r = send(
        "POST",
        &format!("{base}/org%2Fmy%20model/unload?worker=remote-0"),
        &[],
        "",
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"id": "org/my model", "status": "available"})
    );
    let seen = a.seen.model_actions.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (
                "/admin/api/models/org/repo/load".to_owned(),
                r#"{"pin": true}"#.to_owned()
            ),
            (
                "/admin/api/models/org/my%20model/unload".to_owned(),
                String::new()
            ),
        ]
    );
}

#[tokio::test]
async fn model_actions_need_the_admin_guard() {
    let a = mock("m").await;
    let s = sidecar(&[(&a.url, "m")], &[]).await;
    let url = format!("{}/admin/api/models/m/load", s.url);
    let cross = send("POST", &url, &[("origin", "https://evil.example")], "").await;
    assert_eq!(cross.status, 403);
    let fetch = send("POST", &url, &[("sec-fetch-site", "cross-site")], "").await;
    assert_eq!(fetch.status, 403);
    assert!(a.seen.model_actions.lock().unwrap().is_empty());

    let keyed = sidecar(&[(&a.url, "m")], &["--api-key", "k"]).await;
    let url = format!("{}/admin/api/models/m/load", keyed.url);
    assert_eq!(send("POST", &url, &[], "").await.status, 401);
    assert_eq!(
        send("POST", &url, &[("x-api-key", "k")], "").await.status,
        200
    );
}
