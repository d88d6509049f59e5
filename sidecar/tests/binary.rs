//! The standalone `mlx-flash-sidecar` binary: flags, start-up errors, supervision without Python,
//! and signal handling.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{mock, send};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_mlx-flash-sidecar");

/// A running binary and the URL it announced.
struct Running {
    child: Child,
    url: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Running {
    let mut child = Command::new(BIN)
        .args(["--port", "0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("sidecar exited before listening")
            .unwrap();
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
        if entry["msg"] == "listening" {
            break entry["url"].as_str().unwrap().to_owned();
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Running { child, url }
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    let out = Command::new(BIN)
        .args(["--host", "0.0.0.0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("without an API key"));
    let out = Command::new(BIN)
        .args(["--policy", "random"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn proxies_a_remote_backend_and_stops_on_sigterm() {
    let w = mock("m").await;
    let mut running = start(&["--backend", &w.url]);
    let url = running.url.clone();
    wait_for("the backend to be probed ready", async || {
        send("GET", &format!("{url}/ready"), &[], "").await.status == 200
    })
    .await;
    let r = send(
        "POST",
        &format!("{url}/v1/chat/completions"),
        &[],
        r#"{"model":"m"}"#,
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-worker-id")),
        (200, Some("remote-0"))
    );
    kill(Pid::from_raw(running.child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = running.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_worker_that_keeps_dying_is_marked_failed_after_the_restart_cap() {
    // `false` stands in for a Python whose worker exits at once.
    let running = start(&["--python", "false", "--max-restarts", "2"]);
    let url = running.url.clone();
    let workers = format!("{url}/admin/api/workers");
    wait_for("the worker to be marked failed", async || {
        send("GET", &workers, &[], "").await.json()["workers"][0]["state"] == "failed"
    })
    .await;
    let worker = send("GET", &workers, &[], "").await.json()["workers"][0].clone();
    assert_eq!(worker["restarts"], 3);
    assert!(worker["last_error"]
        .as_str()
        .unwrap()
        .contains("exit status: 1"));
    let r = send("POST", &format!("{url}/v1/chat/completions"), &[], "{}").await;
    assert_eq!(r.status, 503);
    let metrics = String::from_utf8(
        send("GET", &format!("{url}/metrics"), &[], "")
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    assert!(metrics.contains("mlx_flash_sidecar_worker_restarts_total{worker=\"worker-0\"} 3"));
}

#[tokio::test]
async fn arguments_after_double_dash_reach_every_worker() {
    // A stand-in Python that records its argv (one file per worker) and exits.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("python");
    let body = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > {0}/$$.tmp && mv {0}/$$.tmp {0}/$$.args\nexit 1\n",
        dir.path().display()
    );
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = script.to_str().unwrap();
    let flags = ["--python", script, "--workers", "2", "--max-restarts", "0"];
    let pass_through = ["--", "--memory-limit", "8G", "--pin", "demo"];
    let _running = start(&[&flags[..], &pass_through[..]].concat());
    let argv_files = || {
        let entries = std::fs::read_dir(dir.path()).unwrap();
        let paths = entries.map(|e| e.unwrap().path());
        let argv = paths.filter(|p| p.extension().is_some_and(|x| x == "args"));
        argv.map(|p| std::fs::read_to_string(p).unwrap())
            .collect::<Vec<_>>()
    };
    wait_for("both workers to start", async || argv_files().len() == 2).await;
    let mut ids: Vec<String> = Vec::new();
    for argv in argv_files() {
        let args: Vec<&str> = argv.lines().collect();
        assert!(args.starts_with(&["-m", "mlx_flash.worker"]), "{args:?}");
        assert!(args.ends_with(&pass_through[1..]), "{args:?}");
        let after = |flag| args[args.iter().position(|a| *a == flag).unwrap() + 1];
        assert_eq!(after("--local-workers"), "2");
        ids.push(after("--worker-id").to_owned());
    }
    ids.sort();
    assert_eq!(ids, ["worker-0", "worker-1"]);
}
