//! JSON log lines on stderr with the same keys as the Python workers' (`ts`, `level`, `logger`,
//! `msg`, then fields), so one log stream reads the same from either side.

use std::fmt;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Install the JSON logger at `level` (`debug`, `info`, `warning`, `error`). Later calls do nothing
/// (the in-process sidecar may be started more than once in one interpreter).
pub fn init(level: &str) {
    let level = match level {
        "debug" => Level::DEBUG,
        "warning" => Level::WARN,
        "error" => Level::ERROR,
        _ => Level::INFO,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(JsonLine)
        .try_init();
}

/// Write one info line regardless of the log level (start-up facts callers depend on).
pub fn always(msg: &str, fields: Value) {
    let mut entry = Map::new();
    entry.insert("ts".into(), timestamp().into());
    entry.insert("level".into(), "info".into());
    entry.insert("logger".into(), "mlx_flash_sidecar".into());
    entry.insert("msg".into(), msg.into());
    if let Value::Object(fields) = fields {
        entry.extend(fields);
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{}", Value::Object(entry));
}

/// Formats one event as one JSON object.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut entry = Map::new();
        entry.insert("ts".into(), timestamp().into());
        let level = match *meta.level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "info",
            _ => "debug",
        };
        entry.insert("level".into(), level.into());
        entry.insert("logger".into(), meta.target().replace("::", ".").into());
        entry.insert("msg".into(), "".into());
        event.record(&mut Fields(&mut entry));
        writeln!(writer, "{}", Value::Object(entry))
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
    use super::format_utc;

    #[test]
    fn utc_timestamps() {
        assert_eq!(format_utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(format_utc(1_795_000_000, 999), "2026-11-18T11:06:40.999Z");
    }
}
