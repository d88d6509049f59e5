//! One log for the sidecar and its workers. Every line has the workers' keys (`ts`, `level`,
//! `component`, `msg`, then `request_id`, `worker`, `model` when known, then event fields); it is
//! written as JSON or text to stderr or `--log-file`, and kept in a bounded ring that
//! `GET /admin/api/logs` reads.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Lines kept for `GET /admin/api/logs`.
pub const RING_LINES: usize = 2000;

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// `ts LEVEL component msg key=value ...`, for reading on a terminal.
    Text,
}

/// Severity, ordered from most to least verbose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// `debug`
    Debug = 0,
    /// `info`
    Info = 1,
    /// `warning`
    Warning = 2,
    /// `error`
    Error = 3,
}

impl Severity {
    /// `debug`, `info`, `warning` (or `warn`), `error`; anything else is `None`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "debug" => Some(Severity::Debug),
            "info" => Some(Severity::Info),
            "warning" | "warn" => Some(Severity::Warning),
            "error" | "critical" => Some(Severity::Error),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Severity::Debug => "debug",
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }

    fn of(level: Level) -> Self {
        match level {
            Level::ERROR => Severity::Error,
            Level::WARN => Severity::Warning,
            Level::INFO => Severity::Info,
            _ => Severity::Debug,
        }
    }
}

/// Where lines go and the recent ones.
struct Sink {
    level: AtomicU8,
    out: Mutex<Output>,
    ring: Mutex<Ring>,
}

struct Output {
    format: Format,
    file: Option<File>,
    /// On a terminal: model downloads and loads drawn as bars instead of progress lines.
    bars: Option<Bars>,
}

struct Ring {
    lines: VecDeque<(u64, Value)>,
    next: u64,
}

fn sink() -> &'static Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    SINK.get_or_init(|| Sink {
        level: AtomicU8::new(Severity::Info as u8),
        out: Mutex::new(Output {
            format: Format::Json,
            file: None,
            bars: None,
        }),
        ring: Mutex::new(Ring {
            lines: VecDeque::with_capacity(RING_LINES),
            next: 0,
        }),
    })
}

/// Log at `level` in `format` to `file` (appended) or stderr. May be called again (the in-process
/// sidecar can be started more than once in one interpreter): the latest settings apply.
pub fn init(level: &str, format: Format, file: Option<&Path>) -> std::io::Result<()> {
    let file = match file {
        Some(path) => Some(File::options().create(true).append(true).open(path)?),
        None => None,
    };
    let s = sink();
    let level = Severity::parse(level).unwrap_or(Severity::Info);
    s.level.store(level as u8, Ordering::Relaxed);
    let bars = (file.is_none() && std::io::stderr().is_terminal())
        .then(|| Bars::new(ProgressDrawTarget::stderr()));
    *s.out.lock().unwrap_or_else(|e| e.into_inner()) = Output { format, file, bars };
    let _ = tracing_subscriber::registry().with(SinkLayer).try_init();
    Ok(())
}

fn enabled(level: Severity) -> bool {
    level as u8 >= sink().level.load(Ordering::Relaxed)
}

/// Write one info line regardless of the log level (start-up facts callers depend on).
pub fn always(msg: &str, fields: Value) {
    let mut entry = head(Severity::Info, "sidecar", msg);
    if let Value::Object(fields) = fields {
        entry.extend(fields);
    }
    emit(entry);
}

/// One line of a worker's output: its JSON log line (tagged with `worker`), or, for anything else
/// it printed (a crash trace, a library's warning), a line holding that text. An error line is
/// also returned, as "msg: error", to say why the worker stopped if it does.
pub fn worker_line(worker: &str, line: &str) -> Option<String> {
    let mut entry = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(fields)) if fields.contains_key("msg") => fields,
        _ => head(Severity::Info, "worker.output", line),
    };
    entry.insert("worker".into(), worker.into());
    let level = entry
        .get("level")
        .and_then(Value::as_str)
        .and_then(Severity::parse)
        .unwrap_or(Severity::Info);
    let error = (level == Severity::Error).then(|| {
        let text = |key: &str| entry.get(key).and_then(Value::as_str).unwrap_or_default();
        match text("error") {
            "" => text("msg").to_owned(),
            error => format!("{}: {error}", text("msg")),
        }
    });
    if enabled(level) {
        emit(entry);
    }
    error
}

fn head(level: Severity, component: &str, msg: &str) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("ts".into(), timestamp().into());
    entry.insert("level".into(), level.name().into());
    entry.insert("component".into(), component.into());
    entry.insert("msg".into(), msg.into());
    entry
}

fn emit(entry: Map<String, Value>) {
    let entry = Value::Object(entry);
    let s = sink();
    {
        let mut out = s.out.lock().unwrap_or_else(|e| e.into_inner());
        let line = match out.format {
            Format::Json => entry.to_string(),
            Format::Text => text(&entry),
        };
        let Output { file, bars, .. } = &mut *out;
        match (file, bars) {
            (Some(file), _) => {
                let _ = writeln!(file, "{line}");
            }
            (None, Some(bars)) => bars.show(&entry, &line),
            (None, None) => {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
        }
    }
    let mut ring = s.ring.lock().unwrap_or_else(|e| e.into_inner());
    if ring.lines.len() == RING_LINES {
        ring.lines.pop_front();
    }
    let seq = ring.next;
    ring.next += 1;
    ring.lines.push_back((seq, entry));
}

/// Progress bars of model downloads and loads, fed by the workers' progress lines (`percent`,
/// `bytes`, `total_bytes`); a bar goes when its model's `model loaded`, `model downloaded` or
/// `model failed to load` line comes. Other lines print above the bars.
struct Bars {
    multi: MultiProgress,
    active: Vec<(String, ProgressBar)>,
}

impl Bars {
    fn new(target: ProgressDrawTarget) -> Self {
        Bars {
            multi: MultiProgress::with_draw_target(target),
            active: Vec::new(),
        }
    }

    /// Draw `entry` as a bar, or print its `line`.
    fn show(&mut self, entry: &Value, line: &str) {
        let get = |key: &str| entry.get(key).and_then(Value::as_str).unwrap_or("");
        let (msg, model, worker) = (get("msg"), get("model"), get("worker"));
        let num = |key: &str| entry.get(key).and_then(Value::as_u64);
        if let ("loading model" | "downloading model", Some(done), Some(total)) =
            (msg, num("bytes"), num("total_bytes"))
        {
            let key = format!("{worker}\0{model}\0{msg}");
            let bar = match self.active.iter().find(|(k, _)| *k == key) {
                Some((_, bar)) => bar.clone(),
                None => {
                    let bar = self.multi.add(ProgressBar::new(total));
                    let style = ProgressStyle::with_template(
                        "{msg} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {elapsed}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                    bar.set_style(style);
                    let on = if worker.is_empty() {
                        String::new()
                    } else {
                        format!(" ({worker})")
                    };
                    bar.set_message(format!("{msg} {model}{on}"));
                    self.active.push((key, bar.clone()));
                    bar
                }
            };
            bar.set_length(total);
            bar.set_position(done);
            return;
        }
        if matches!(
            msg,
            "model loaded" | "model downloaded" | "model failed to load"
        ) {
            let prefix = format!("{worker}\0{model}\0");
            self.active.retain(|(key, bar)| {
                let done = key.starts_with(&prefix);
                if done {
                    bar.finish_and_clear();
                    self.multi.remove(bar);
                }
                !done
            });
        }
        if self.active.is_empty() {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}

/// `ts LEVEL component msg key=value ...` (values that hold spaces are JSON-quoted).
fn text(entry: &Value) -> String {
    let get = |key: &str| entry.get(key).and_then(Value::as_str).unwrap_or("");
    let mut line = format!(
        "{} {:<7} {} {}",
        get("ts"),
        get("level").to_uppercase(),
        get("component"),
        get("msg")
    );
    if let Value::Object(fields) = entry {
        for (key, value) in fields {
            if matches!(key.as_str(), "ts" | "level" | "component" | "msg") {
                continue;
            }
            let value = match value {
                Value::String(s) if !s.is_empty() && !s.contains([' ', '"', '=', '\n']) => {
                    s.clone()
                }
                other => other.to_string(),
            };
            line.push_str(&format!(" {key}={value}"));
        }
    }
    line
}

/// Lines after `since` (a `next` from an earlier answer; 0 for the oldest kept), at most `limit`,
/// at `level` or above, about `request_id` if given; and the `next` to ask with.
pub fn recent(
    since: u64,
    limit: usize,
    level: Severity,
    request_id: Option<&str>,
) -> (Vec<Value>, u64) {
    let ring = sink().ring.lock().unwrap_or_else(|e| e.into_inner());
    let lines: Vec<Value> = ring
        .lines
        .iter()
        .filter(|(seq, _)| *seq >= since)
        .filter(|(_, line)| {
            let of = line.get("level").and_then(Value::as_str);
            of.and_then(Severity::parse).unwrap_or(Severity::Info) >= level
        })
        .filter(|(_, line)| {
            request_id.is_none_or(|id| line.get("request_id").and_then(Value::as_str) == Some(id))
        })
        .take(limit)
        .map(|(seq, line)| {
            let mut line = line.clone();
            if let Value::Object(fields) = &mut line {
                fields.insert("seq".into(), (*seq).into());
            }
            line
        })
        .collect();
    let next = match lines
        .last()
        .and_then(|l| l.get("seq"))
        .and_then(Value::as_u64)
    {
        Some(last) if lines.len() == limit => last + 1,
        _ => ring.next,
    };
    (lines, next)
}

/// `mlx_flash_sidecar::workers::supervisor` → `sidecar.supervisor`, the crate root → `sidecar`;
/// other crates keep their path.
fn component(target: &str) -> String {
    match target.strip_prefix("mlx_flash_sidecar") {
        Some(rest) => match rest.rsplit("::").next().filter(|s| !s.is_empty()) {
            Some(module) => format!("sidecar.{module}"),
            None => "sidecar".into(),
        },
        None => target.replace("::", "."),
    }
}

/// Formats tracing events into the sink; fields of enclosing spans (a request's `request_id`,
/// `model`, `worker`) come first, so every line about a request carries them.
struct SinkLayer;

/// A span's recorded fields.
struct SpanFields(Map<String, Value>);

impl<S> Layer<S> for SinkLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // The level can change at run time (`init` again): ask every time.
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        let ours = metadata.target().starts_with("mlx_flash");
        // Libraries (hyper, tower) only for warnings and errors.
        let level = Severity::of(*metadata.level());
        metadata.is_span() || (enabled(level) && (ours || level >= Severity::Warning))
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Map::new();
        attrs.record(&mut Fields(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<SpanFields>() {
                values.record(&mut Fields(&mut fields.0));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut entry = head(Severity::of(*meta.level()), &component(meta.target()), "");
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    entry.extend(fields.0.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        event.record(&mut Fields(&mut entry));
        emit(entry);
    }
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, value.into());
    }
}

impl Fields<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        let name = if field.name() == "message" {
            "msg"
        } else {
            field.name()
        };
        self.0.insert(name.to_owned(), value);
    }
}

/// Now as `2026-01-02T03:04:05.678Z` (UTC, milliseconds), the workers' format.
pub fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format_utc(now.as_secs(), now.subsec_millis())
}

fn format_utc(secs: u64, millis: u32) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn utc_timestamps() {
        assert_eq!(format_utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(format_utc(1_795_000_000, 999), "2026-11-18T11:06:40.999Z");
    }

    #[test]
    fn components_are_short() {
        assert_eq!(
            component("mlx_flash_sidecar::workers::supervisor"),
            "sidecar.supervisor"
        );
        assert_eq!(component("mlx_flash_sidecar"), "sidecar");
        assert_eq!(component("hyper::proto"), "hyper.proto");
    }

    #[test]
    fn text_lines_quote_only_what_needs_it() {
        let entry = json!({"ts": "T", "level": "info", "component": "sidecar.proxy",
            "msg": "request", "request_id": "abc", "path": "/v1/x y", "status": 200});
        assert_eq!(
            text(&entry),
            "T INFO    sidecar.proxy request request_id=abc path=\"/v1/x y\" status=200"
        );
    }

    #[test]
    fn progress_lines_become_bars_until_their_model_is_loaded() {
        let mut bars = Bars::new(ProgressDrawTarget::hidden());
        let progress = |worker: &str, done: u64| {
            json!({"msg": "loading model", "model": "demo", "worker": worker, "percent": done,
                "bytes": done, "total_bytes": 100})
        };
        bars.show(&progress("worker-0", 10), "");
        bars.show(&progress("worker-0", 50), "");
        assert_eq!(bars.active.len(), 1);
        assert_eq!(bars.active[0].1.position(), 50);
        assert_eq!(bars.active[0].1.length(), Some(100));
        bars.show(&progress("worker-1", 20), "");
        assert_eq!(bars.active.len(), 2);
        // A line without progress fields is printed, not drawn.
        bars.show(
            &json!({"msg": "loading model", "model": "demo", "worker": "worker-0"}),
            "",
        );
        assert_eq!(bars.active.len(), 2);
        bars.show(
            &json!({"msg": "model loaded", "model": "demo", "worker": "worker-0"}),
            "",
        );
        assert_eq!(bars.active.len(), 1);
        assert!(bars.active[0].0.starts_with("worker-1"));
    }

    #[test]
    fn the_ring_pages_filters_and_forgets_the_oldest() {
        // One test owns the global ring (tests run in threads of one process).
        let before = recent(0, usize::MAX, Severity::Debug, None).1;
        for i in 0..RING_LINES + 5 {
            let level = if i % 2 == 0 { "info" } else { "error" };
            let line = json!({"ts": "T", "level": level, "component": "worker.engine",
                "msg": format!("line {i}"), "request_id": format!("r{}", i % 3)});
            worker_line("worker-0", &line.to_string());
        }
        let (all, next) = recent(0, usize::MAX, Severity::Debug, None);
        assert!(all.len() <= RING_LINES);
        assert_eq!(next, before + RING_LINES as u64 + 5);
        let (page, after) = recent(before + 10, 3, Severity::Debug, None);
        let seqs: Vec<u64> = page.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [before + 10, before + 11, before + 12]);
        assert_eq!(after, before + 13);
        assert_eq!(page[0]["worker"], "worker-0");
        let (errors, _) = recent(before + 10, 10, Severity::Error, None);
        assert!(errors.iter().all(|l| l["level"] == "error"));
        let (one, _) = recent(before + 10, 10, Severity::Debug, Some("r1"));
        assert!(one.iter().all(|l| l["request_id"] == "r1"));
        let (none, later) = recent(next, 10, Severity::Debug, None);
        assert!(none.is_empty());
        assert_eq!(later, next);
        // An error line is also handed back, to say why a worker stopped.
        let failed =
            json!({"level": "error", "msg": "model failed to load", "error": "no weights"});
        let said = worker_line("worker-0", &failed.to_string());
        assert_eq!(said.as_deref(), Some("model failed to load: no weights"));
        let plain = json!({"level": "error", "msg": "generation failed"});
        assert_eq!(
            worker_line("worker-0", &plain.to_string()).as_deref(),
            Some("generation failed")
        );
        assert_eq!(
            worker_line("worker-0", r#"{"level": "info", "msg": "ready"}"#),
            None
        );
        assert_eq!(
            worker_line("worker-0", "Traceback (most recent call last):"),
            None
        );
    }
}
