//! Supervision of local workers: spawn `python -m mlx_flash.worker` on a private Unix socket in its
//! own process group, wait for readiness, ping for liveness, restart with back-off up to a cap,
//! forward its output into our log, and terminate it (and its group) on shutdown.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backend::{Backend, Location, Probe, State};
use super::pool::MODELS_REFRESH_EVERY;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::routing::Policy;

/// Liveness ping interval.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Missed pings in a row after which a worker that was answering counts as hung.
const MISSED_PINGS: u32 = 3;
/// A worker that starts or loads without answering for this long counts as hung.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// First restart delay; doubles per restart up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Restarts are counted against `--max-restarts` within this window.
const RESTART_WINDOW: Duration = Duration::from_secs(600);
/// Time a worker gets to exit after SIGTERM before SIGKILL.
const TERM_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to read what an exited worker printed last.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);
/// An error logged this soon before a worker exited says why it did.
const LAST_WORDS: Duration = Duration::from_secs(5);
/// Exit status of a worker whose models cannot load for a reason a restart does not fix (a damaged
/// or unsupported model, one larger than its memory limit): it is given up on at once. The worker's
/// side is `mlx_flash.worker.EXIT_CANNOT_LOAD`.
const EXIT_CANNOT_LOAD: i32 = 3;

/// Everything a supervisor needs.
pub struct Supervisor {
    /// The worker's backend entry (status, restarts).
    pub backend: Arc<Backend>,
    /// Flags: model, python, restarts cap.
    pub settings: Arc<Settings>,
    /// Told when the worker restarts (its cache is gone).
    pub policy: Arc<dyn Policy>,
    /// Restart counter.
    pub metrics: Arc<Metrics>,
}

/// One life of a worker: its process, and the tasks forwarding its output.
struct Life {
    child: Child,
    output: Vec<JoinHandle<Option<Logged>>>,
}

/// An error line a worker logged, and when.
type Logged = (Instant, String);

/// Why one life of a worker ended.
enum Ended {
    Exited(String),
    CannotLoad(String),
    Hung(String),
    RestartRequested,
    Shutdown,
}

impl Supervisor {
    /// Keep the worker running until `stop` is cancelled; then terminate it.
    pub async fn run(self, stop: CancellationToken) {
        let mut recent_restarts: Vec<Instant> = Vec::new();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let ended = match self.spawn() {
                Ok(life) => self.watch(life, &stop).await,
                Err(e) => Ended::Exited(format!("cannot start worker: {e}")),
            };
            let (reason, crashed, hopeless) = match ended {
                Ended::Shutdown => break,
                Ended::RestartRequested => ("restart requested".to_owned(), false, false),
                Ended::Exited(r) | Ended::Hung(r) => (r, true, false),
                Ended::CannotLoad(r) => (r, true, true),
            };
            self.policy.forget(&self.backend.id);
            self.metrics
                .worker_restarts
                .with_label_values(&[&*self.backend.id])
                .inc();
            // A worker that served for a while earns a fresh back-off.
            if started.elapsed() > RESTART_WINDOW {
                backoff = FIRST_BACKOFF;
            }
            // A restart someone asked for is not a crash: no back-off, and it never counts towards
            // --max-restarts.
            recent_restarts.retain(|t| t.elapsed() < RESTART_WINDOW);
            if crashed {
                recent_restarts.push(Instant::now());
            }
            let failed =
                hopeless || recent_restarts.len() as u32 > self.settings.flags.max_restarts;
            {
                let mut status = self.backend.status();
                status.pid = None;
                status.restarts += 1;
                status.last_error = Some(reason.clone());
                status.state = if failed {
                    State::Failed
                } else {
                    State::Restarting
                };
            }
            if failed {
                let why = if hopeless {
                    "worker cannot load its models and a restart would not help"
                } else {
                    "worker failed too often"
                };
                tracing::error!(worker = %self.backend.id, error = %reason,
                    "{why}; giving up on it until a restart is requested");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.backend.restart.notified() => {
                        tracing::info!(worker = %self.backend.id, "restarting a failed worker");
                        recent_restarts.clear();
                        backoff = FIRST_BACKOFF;
                        continue;
                    }
                }
            }
            if !crashed {
                continue;
            }
            tracing::warn!(worker = %self.backend.id, error = %reason,
                backoff_seconds = backoff.as_secs_f64(), "worker stopped; restarting");
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        let mut status = self.backend.status();
        status.state = State::Stopped;
        status.pid = None;
    }

    fn spawn(&self) -> std::io::Result<Life> {
        let Location::Local { socket, .. } = &self.backend.location else {
            return Err(std::io::Error::other("not a local worker"));
        };
        let _ = std::fs::remove_file(socket);
        let mut child = worker_command(&self.settings, &self.backend.id, socket).spawn()?;
        let pid = child.id();
        tracing::info!(worker = %self.backend.id, pid = pid.unwrap_or(0), "worker started");
        {
            let mut status = self.backend.status();
            status.pid = pid;
            status.state = State::Starting;
        }
        let mut output = Vec::new();
        if let Some(out) = child.stdout.take() {
            output.push(tokio::spawn(forward_output(self.backend.id.clone(), out)));
        }
        if let Some(err) = child.stderr.take() {
            output.push(tokio::spawn(forward_output(self.backend.id.clone(), err)));
        }
        Ok(Life { child, output })
    }

    /// Watch one life of the worker: exit, hang, restart request, or shutdown.
    async fn watch(&self, life: Life, stop: &CancellationToken) -> Ended {
        let Life { mut child, output } = life;
        match self.watch_child(&mut child, stop).await {
            Ended::Exited(how) => Ended::Exited(said(how, output).await),
            Ended::CannotLoad(how) => Ended::CannotLoad(said(how, output).await),
            ended => ended,
        }
    }

    async fn watch_child(&self, child: &mut Child, stop: &CancellationToken) -> Ended {
        // Since the last answer (or the spawn).
        let mut silent_since = Instant::now();
        let mut answered = false;
        let mut missed = 0u32;
        let mut probes = 0u32;
        loop {
            tokio::select! {
                exit = child.wait() => return exited(exit),
                _ = stop.cancelled() => {
                    terminate(child).await;
                    return Ended::Shutdown;
                }
                _ = self.backend.restart.notified() => {
                    terminate(child).await;
                    return Ended::RestartRequested;
                }
                _ = tokio::time::sleep(PING_INTERVAL) => {}
            }
            let was_ready = self.backend.status().state == State::Ready;
            let probe = tokio::select! {
                p = self.backend.probe(!was_ready || probes.is_multiple_of(MODELS_REFRESH_EVERY)) => p,
                exit = child.wait() => return exited(exit),
            };
            probes = probes.wrapping_add(1);
            let (state, error) = match probe {
                Probe::Ready => (State::Ready, None),
                Probe::Loading => (State::Loading, None),
                // Its model failed to load; it exits by itself, and is restarted then.
                Probe::Failed(e) => (State::Loading, Some(e)),
                Probe::Unreachable(e) => {
                    missed += 1;
                    // A worker busy loading its model may answer slowly; only a serving one is
                    // held to the ping count.
                    let serving = self.backend.status().state != State::Loading;
                    if answered && serving && missed >= MISSED_PINGS {
                        kill_group(child).await;
                        return Ended::Hung(format!("worker stopped answering: {e}"));
                    }
                    if (!answered || !serving) && silent_since.elapsed() > STARTUP_TIMEOUT {
                        kill_group(child).await;
                        return Ended::Hung(format!(
                            "worker did not answer within {STARTUP_TIMEOUT:?}: {e}"
                        ));
                    }
                    if answered && serving {
                        // Route around it while it does not answer; restart it if it stays silent.
                        let mut status = self.backend.status();
                        if status.state != State::Unreachable {
                            tracing::warn!(worker = %self.backend.id, error = %e, "worker missed a ping");
                            status.state = State::Unreachable;
                        }
                        status.last_error = Some(e);
                    }
                    continue;
                }
            };
            answered = true;
            missed = 0;
            silent_since = Instant::now();
            let mut status = self.backend.status();
            if status.state != state {
                tracing::info!(worker = %self.backend.id, state = ?state, "worker state");
            }
            status.state = state;
            if error.is_some() {
                status.last_error = error;
            }
        }
    }
}

/// How a worker's process ended.
fn exited(exit: std::io::Result<std::process::ExitStatus>) -> Ended {
    match exit {
        Ok(status) if status.code() == Some(EXIT_CANNOT_LOAD) => {
            Ended::CannotLoad(format!("worker exited ({status})"))
        }
        Ok(status) => Ended::Exited(format!("worker exited ({status})")),
        Err(e) => Ended::Exited(format!("cannot wait for worker: {e}")),
    }
}

/// `how` a worker exited, with the error it logged last if that says why.
async fn said(how: String, output: Vec<JoinHandle<Option<Logged>>>) -> String {
    match last_error(output).await {
        Some(error) => format!("{how}: {error}"),
        None => how,
    }
}

/// The command line of local worker `id` on `socket`: our flags, then the user's `--` arguments
/// last, so a repeated flag overrides ours (or, like `--model`, adds to it).
fn worker_command(settings: &Settings, id: &str, socket: &Path) -> Command {
    let flags = &settings.flags;
    let mut command = Command::new(&flags.python);
    command
        .args(["-m", "mlx_flash.worker", "--model", &flags.model])
        .arg("--uds")
        .arg(socket)
        .args(["--parent-pid", &std::process::id().to_string()])
        .args(["--log-level", &flags.log_level])
        // We parse its lines, tag them, and write them in our format to our destination.
        .args(["--log-format", "json"])
        .args(["--max-body-bytes", &flags.max_body_bytes.to_string()])
        // Workers on one machine share its memory; each learns its name and how many share it.
        .args(["--worker-id", id])
        .args(["--local-workers", &settings.workers.to_string()])
        .args(settings.url.iter().flat_map(|url| ["--sidecar-url", url]))
        .args(&flags.worker_args)
        // The worker is reachable only through its private socket: no key, host or port of ours.
        .env_remove("MLX_FLASH_API_KEY")
        .env_remove("MLX_FLASH_HOST")
        .env_remove("MLX_FLASH_PORT")
        .env_remove("MLX_FLASH_LOG_FILE")
        .env_remove("MLX_FLASH_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: a terminal's Ctrl-C reaches only us, and we stop the group in order.
        .process_group(0)
        .kill_on_drop(true);
    command
}

/// SIGTERM the worker's group, wait up to [`TERM_TIMEOUT`], then SIGKILL it.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(TERM_TIMEOUT, child.wait())
            .await
            .is_ok()
        {
            // Anything the worker left in its group goes too.
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return;
        }
    }
    kill_group(child).await;
}

/// SIGKILL the worker's whole group and reap it.
async fn kill_group(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let _ = child.kill().await;
}

/// Copy a worker's output into our log, one line at a time, tagged with the worker's id, until it
/// closes; the last error line it logged, and when.
async fn forward_output(worker: Arc<str>, stream: impl AsyncRead + Unpin) -> Option<Logged> {
    let mut lines = BufReader::new(stream).lines();
    let mut error = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(e) = crate::logging::worker_line(&worker, &line) {
            error = Some((Instant::now(), e));
        }
    }
    error
}

/// Why an exited worker stopped, in its words: an error it logged just before (its output read to
/// the end, or for at most [`OUTPUT_DRAIN`]); an older one may be about some request.
async fn last_error(output: Vec<JoinHandle<Option<Logged>>>) -> Option<String> {
    let mut last: Option<Logged> = None;
    for task in output {
        if let Ok(Ok(Some(logged))) = tokio::time::timeout(OUTPUT_DRAIN, task).await {
            if last.as_ref().is_none_or(|(at, _)| logged.0 > *at) {
                last = Some(logged);
            }
        }
    }
    last.filter(|(at, _)| at.elapsed() < LAST_WORDS)
        .map(|(_, e)| e)
}

/// Remove a stale socket file (a previous run's) so the worker can bind.
pub fn socket_path(dir: &Path, index: usize) -> Arc<Path> {
    dir.join(format!("worker-{index}.sock")).into()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::Config;

    fn args_of(command: &Command) -> Vec<String> {
        let args = command.as_std().get_args();
        args.map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn worker_command_carries_id_count_and_pass_through_args() {
        let flags = [
            "mlx-flash",
            "--workers",
            "2",
            "--model",
            "m",
            "--",
            "--pin",
            "demo",
        ];
        let settings = Config::try_parse_from(flags).unwrap().validate().unwrap();
        let socket = Path::new("/tmp/worker-1.sock");
        let args = args_of(&worker_command(&settings, "worker-1", socket));
        let pair = |flag: &str, value: &str| args.windows(2).any(|w| w == [flag, value]);
        assert!(pair("--worker-id", "worker-1"), "{args:?}");
        assert!(pair("--local-workers", "2"), "{args:?}");
        assert!(pair("--uds", "/tmp/worker-1.sock"), "{args:?}");
        assert!(
            args.ends_with(&["--pin".to_owned(), "demo".to_owned()]),
            "{args:?}"
        );
    }
}
