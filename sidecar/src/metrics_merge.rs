//! Merges the sidecar's own Prometheus exposition with its workers' into one valid exposition.
//!
//! Input is the text format 0.0.4 as written by the `prometheus` crate and by Python's
//! `prometheus_client` (`generate_latest()`). Each input is parsed into metric families the way
//! Prometheus' own text parser (`expfmt`, used by `promtool check metrics`) groups them: a sample
//! belongs to the family of the same name, or, for `_bucket`/`_sum`/`_count` samples, to the
//! histogram or summary it names. Families of the same name are then merged so that each appears
//! once, with one `# HELP`, one `# TYPE` and all of its samples together.
//!
//! A worker that answers with something broken must not break `/metrics`, so anything that does
//! not parse (a bad line, a bad escape, a sample that does not fit its family) is skipped rather
//! than copied.

use std::collections::{HashMap, HashSet};

/// Spaces and tabs: the only separators the text format knows.
const BLANKS: [char; 2] = [' ', '\t'];

/// Merge Prometheus text-format (0.0.4) expositions into one valid exposition.
/// `own` is the sidecar's own exposition (emitted as-is, families first);
/// each `(worker_id, text)` is a worker's exposition whose every sample gets a `worker="<id>"` label.
///
/// `worker="<id>"` becomes each worker sample's first label; a `worker` label the sample already
/// had is kept as `exported_worker` (Prometheus' `honor_labels: false` convention). Families are
/// ordered own first, then in order of first appearance across `workers`; HELP and TYPE come from
/// the first input that has the family. Every line of the result ends with a newline (an empty
/// result is the empty string).
#[must_use]
pub fn merge(own: &str, workers: &[(&str, &str)]) -> String {
    let mut merged = Merged::default();
    for family in parse(own) {
        merged.add(family, None);
    }
    for (id, text) in workers {
        let id = escape_label_value(id);
        for family in parse(text) {
            merged.add(family, Some(&id));
        }
    }
    merged.render()
}

/// A metric type from a `# TYPE` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl Kind {
    fn parse(token: &str) -> Option<Self> {
        // expfmt reads the type case-insensitively; we always write it in lower case.
        [
            Self::Counter,
            Self::Gauge,
            Self::Histogram,
            Self::Summary,
            Self::Untyped,
        ]
        .into_iter()
        .find(|kind| token.eq_ignore_ascii_case(kind.as_str()))
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
            Self::Summary => "summary",
            Self::Untyped => "untyped",
        }
    }
}

/// One sample line, split into its parts; label values stay escaped as written.
#[derive(Debug)]
struct Sample<'a> {
    line: &'a str,
    name: &'a str,
    labels: Vec<(&'a str, &'a str)>,
    value: &'a str,
    timestamp: Option<&'a str>,
}

/// One metric family of a single exposition.
#[derive(Debug)]
struct Family<'a> {
    name: &'a str,
    help: Option<&'a str>,
    /// `None` when there was no `# TYPE` line, which Prometheus reads as untyped.
    kind: Option<Kind>,
    samples: Vec<Sample<'a>>,
}

impl<'a> Family<'a> {
    fn new(name: &'a str) -> Self {
        Self {
            name,
            help: None,
            kind: None,
            samples: Vec::new(),
        }
    }

    /// Whether `sample`, already routed here by name, is a sample this family's type allows.
    fn fits(&self, sample: &Sample<'_>) -> bool {
        let label = |wanted: &str| {
            sample
                .labels
                .iter()
                .find(|(name, _)| *name == wanted)
                .map(|(_, value)| *value)
        };
        let suffix = sample.name.strip_prefix(self.name).unwrap_or(sample.name);
        match self.kind {
            Some(Kind::Histogram) => match suffix {
                "_bucket" => label("le").is_some_and(is_float),
                "_sum" | "_count" => label("le").is_none(),
                _ => false,
            },
            Some(Kind::Summary) => match suffix {
                "" => label("quantile").is_some_and(is_float),
                "_sum" | "_count" => label("quantile").is_none(),
                _ => false,
            },
            _ => suffix.is_empty(),
        }
    }
}

/// Parses one exposition into its families, in order of first mention, skipping what does not
/// parse.
fn parse(text: &str) -> Vec<Family<'_>> {
    let mut families: Vec<Family<'_>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for line in text.lines() {
        let line = line.trim_matches(BLANKS);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            parse_comment(comment, &mut families, &mut index);
            continue;
        }
        let Some(sample) = parse_sample(line) else {
            continue;
        };
        match family_of(sample.name, &families, &index) {
            Some(i) => {
                if let Some(family) = families.get_mut(i) {
                    if family.fits(&sample) {
                        family.samples.push(sample);
                    }
                }
            }
            None => {
                index.insert(sample.name, families.len());
                let mut family = Family::new(sample.name);
                family.samples.push(sample);
                families.push(family);
            }
        }
    }
    families
}

/// Handles a `# HELP` or `# TYPE` line; every other comment is ignored.
fn parse_comment<'a>(
    comment: &'a str,
    families: &mut Vec<Family<'a>>,
    index: &mut HashMap<&'a str, usize>,
) {
    let (keyword, rest) = split_token(comment);
    let (name, rest) = split_token(rest);
    if !is_metric_name(name) {
        return;
    }
    let (help, kind) = match keyword {
        "HELP" => {
            let help = rest.trim_start_matches(BLANKS);
            if help.is_empty() || !is_valid_help(help) {
                return;
            }
            (Some(help), None)
        }
        "TYPE" => match Kind::parse(split_token(rest).0) {
            Some(kind) => (None, Some(kind)),
            None => return,
        },
        _ => return,
    };
    let i = *index.entry(name).or_insert_with(|| {
        families.push(Family::new(name));
        families.len() - 1
    });
    let Some(family) = families.get_mut(i) else {
        return;
    };
    family.help = family.help.or(help);
    // A second TYPE, or a TYPE after samples, is an error for Prometheus: keep the first.
    if family.kind.is_none() && family.samples.is_empty() {
        family.kind = kind;
    }
}

/// The family a sample named `name` belongs to, as expfmt decides it: the family of that exact
/// name, else the histogram or summary that the `_bucket`/`_sum`/`_count` suffix points to.
fn family_of(name: &str, families: &[Family<'_>], index: &HashMap<&str, usize>) -> Option<usize> {
    if let Some(&i) = index.get(name) {
        return Some(i);
    }
    ["_bucket", "_sum", "_count"]
        .into_iter()
        .find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            let &i = index.get(base)?;
            match families.get(i)?.kind {
                Some(Kind::Histogram) => Some(i),
                Some(Kind::Summary) if suffix != "_bucket" => Some(i),
                _ => None,
            }
        })
}

/// Parses `name{label="value",...} value [timestamp]`, or `None` if the line is not a valid sample.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let (name, rest) = line.split_at(name_end);
    if !is_metric_name(name) {
        return None;
    }
    let mut rest = rest.trim_start_matches(BLANKS);
    let mut labels = Vec::new();
    if let Some(inside) = rest.strip_prefix('{') {
        rest = parse_labels(inside, &mut labels)?;
    }
    let mut tokens = rest.split(BLANKS).filter(|token| !token.is_empty());
    let value = tokens.next()?;
    let timestamp = tokens.next();
    if tokens.next().is_some()
        || !is_float(value)
        || timestamp.is_some_and(|t| t.parse::<i64>().is_err())
    {
        return None;
    }
    Some(Sample {
        line,
        name,
        labels,
        value,
        timestamp,
    })
}

/// Parses the label pairs after `{` into `labels`; returns what follows the closing `}`.
fn parse_labels<'a>(mut rest: &'a str, labels: &mut Vec<(&'a str, &'a str)>) -> Option<&'a str> {
    loop {
        rest = rest.trim_start_matches(BLANKS);
        if let Some(after) = rest.strip_prefix('}') {
            return Some(after);
        }
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let (name, after) = rest.split_at(name_end);
        // Prometheus rejects a reserved `__name__` label and a label given twice.
        if !is_label_name(name) || name == "__name__" || labels.iter().any(|(n, _)| *n == name) {
            return None;
        }
        let quoted = after
            .trim_start_matches(BLANKS)
            .strip_prefix('=')?
            .trim_start_matches(BLANKS)
            .strip_prefix('"')?;
        let close = closing_quote(quoted)?;
        labels.push((name, quoted.get(..close)?));
        rest = quoted.get(close + 1..)?.trim_start_matches(BLANKS);
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}

/// The byte offset of the `"` that ends a label value, checking that its only escapes are
/// `\\`, `\"` and `\n`.
fn closing_quote(value: &str) -> Option<usize> {
    let mut chars = value.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some(i),
            '\\' if !matches!(chars.next(), Some((_, '\\' | '"' | 'n'))) => return None,
            _ => {}
        }
    }
    None
}

/// Whether HELP text uses only the escapes the format allows there: `\\` and `\n`.
fn is_valid_help(help: &str) -> bool {
    let mut chars = help.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
            return false;
        }
    }
    true
}

/// Whether Go's `strconv.ParseFloat`, which Prometheus uses, accepts `text`.
fn is_float(text: &str) -> bool {
    let Ok(value) = text.parse::<f64>() else {
        return false;
    };
    if value.is_nan() {
        // Rust also takes "+nan" and "-nan"; Go does not.
        return text.eq_ignore_ascii_case("nan");
    }
    if value.is_infinite() {
        // Rust rounds an overflow like "1e999" to infinity; Go reports an error.
        let unsigned = text.trim_start_matches(['+', '-']);
        return unsigned.eq_ignore_ascii_case("inf") || unsigned.eq_ignore_ascii_case("infinity");
    }
    true
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Splits off the first blank-separated token; returns it and the rest of the text.
fn split_token(text: &str) -> (&str, &str) {
    let text = text.trim_start_matches(BLANKS);
    text.split_at(text.find(BLANKS).unwrap_or(text.len()))
}

fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            _ => escaped.push(c),
        }
    }
    escaped
}

/// The sample names a family owns in the output. Two families that share one could not be told
/// apart by a parser, so the second is dropped.
fn series_names(name: &str, kind: Option<Kind>) -> Vec<String> {
    let suffixes: &[&str] = match kind {
        Some(Kind::Histogram) => &["", "_bucket", "_sum", "_count"],
        Some(Kind::Summary) => &["", "_sum", "_count"],
        _ => &[""],
    };
    suffixes
        .iter()
        .map(|suffix| format!("{name}{suffix}"))
        .collect()
}

/// Identifies a series regardless of label order; label values are compared as escaped, which is
/// canonical because the format allows exactly one spelling of each character.
fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut sorted = labels.to_vec();
    sorted.sort_unstable();
    // Written as the exposition writes it, which is unambiguous.
    let mut key = format!("{name}{{");
    for (label, value) in sorted {
        key.push_str(label);
        key.push_str("=\"");
        key.push_str(value);
        key.push_str("\",");
    }
    key
}

/// A family of the merged output, its sample lines already rendered.
struct MergedFamily<'a> {
    name: &'a str,
    help: Option<&'a str>,
    kind: Option<Kind>,
    lines: Vec<String>,
    seen: HashSet<String>,
}

/// The merged output so far.
#[derive(Default)]
struct Merged<'a> {
    families: Vec<MergedFamily<'a>>,
    index: HashMap<&'a str, usize>,
    claimed: HashSet<String>,
}

impl<'a> Merged<'a> {
    /// Adds a family from the sidecar (`worker` is `None`) or from the worker with the given
    /// (already escaped) id.
    fn add(&mut self, family: Family<'a>, worker: Option<&str>) {
        let i = match self.index.get(family.name) {
            Some(&i) => i,
            None => {
                let names = series_names(family.name, family.kind);
                if names.iter().any(|name| self.claimed.contains(name)) {
                    return;
                }
                self.claimed.extend(names);
                self.index.insert(family.name, self.families.len());
                self.families.push(MergedFamily {
                    name: family.name,
                    help: None,
                    kind: family.kind,
                    lines: Vec::new(),
                    seen: HashSet::new(),
                });
                self.families.len() - 1
            }
        };
        let Some(merged) = self.families.get_mut(i) else {
            return;
        };
        // A worker family of the same name as one already here (the sidecar's, or an earlier
        // worker's) joins it only if the types agree; otherwise it is dropped whole, since one
        // name cannot carry two types and the first one seen wins. No separate counter: the
        // sidecar's logs and the worker's own /metrics are where to look.
        let untyped = Some(Kind::Untyped);
        if merged.kind.or(untyped) != family.kind.or(untyped) {
            return;
        }
        merged.kind = merged.kind.or(family.kind);
        merged.help = merged.help.or(family.help);
        for sample in &family.samples {
            let (line, key) = match worker {
                None => (
                    sample.line.to_owned(),
                    series_key(sample.name, &sample.labels),
                ),
                Some(id) => relabel(sample, id),
            };
            // The same series twice (e.g. the sidecar already reports it per worker) would make
            // the exposition ambiguous; the first one wins.
            if merged.seen.insert(key) {
                merged.lines.push(line);
            }
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for family in &self.families {
            if let Some(help) = family.help {
                out.push_str("# HELP ");
                out.push_str(family.name);
                out.push(' ');
                out.push_str(help);
                out.push('\n');
            }
            if let Some(kind) = family.kind {
                out.push_str("# TYPE ");
                out.push_str(family.name);
                out.push(' ');
                out.push_str(kind.as_str());
                out.push('\n');
            }
            for line in &family.lines {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Renders a worker's sample with `worker="<id>"` first; returns the line and its series key.
fn relabel(sample: &Sample<'_>, id: &str) -> (String, String) {
    let taken = |name: &str| sample.labels.iter().any(|(label, _)| *label == name);
    let mut exported = String::from("exported_worker");
    while taken(&exported) {
        exported.insert_str(0, "exported_");
    }
    let mut labels = vec![("worker", id)];
    labels.extend(sample.labels.iter().map(|&(name, value)| {
        if name == "worker" {
            (exported.as_str(), value)
        } else {
            (name, value)
        }
    }));

    let mut line = String::from(sample.name);
    line.push('{');
    for (n, (name, value)) in labels.iter().enumerate() {
        if n > 0 {
            line.push(',');
        }
        line.push_str(name);
        line.push_str("=\"");
        line.push_str(value);
        line.push('"');
    }
    line.push_str("} ");
    line.push_str(sample.value);
    if let Some(timestamp) = sample.timestamp {
        line.push(' ');
        line.push_str(timestamp);
    }
    (line, series_key(sample.name, &labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Write};
    use std::process::{Command, Stdio};

    const WORKER_0: &str = include_str!("../tests/fixtures/worker_metrics_0.txt");
    const WORKER_1: &str = include_str!("../tests/fixtures/worker_metrics_1.txt");

    /// A sidecar exposition as the `prometheus` crate writes it. `mlx_flash_requests_total` is
    /// also a worker family of the same type, so the workers' samples join it.
    const OWN: &str = "\
# HELP mlx_flash_requests_total HTTP requests answered
# TYPE mlx_flash_requests_total counter
mlx_flash_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 7
# HELP mlx_flash_worker_up Whether the worker answered its last health check
# TYPE mlx_flash_worker_up gauge
mlx_flash_worker_up{worker=\"w0\"} 1
mlx_flash_worker_up{worker=\"w1\"} 1
# HELP mlx_flash_proxy_duration_seconds Time the sidecar spent on a request
# TYPE mlx_flash_proxy_duration_seconds histogram
mlx_flash_proxy_duration_seconds_bucket{route=\"/v1/chat/completions\",le=\"0.1\"} 3
mlx_flash_proxy_duration_seconds_bucket{route=\"/v1/chat/completions\",le=\"1\"} 7
mlx_flash_proxy_duration_seconds_bucket{route=\"/v1/chat/completions\",le=\"+Inf\"} 7
mlx_flash_proxy_duration_seconds_sum{route=\"/v1/chat/completions\"} 2.5
mlx_flash_proxy_duration_seconds_count{route=\"/v1/chat/completions\"} 7
";

    /// Checks what promtool would reject, without promtool: every family has at most one HELP
    /// and one TYPE, given before its samples; a family's samples are contiguous; no sample has
    /// a label twice or repeats a series.
    fn assert_well_formed(text: &str) {
        assert!(text.is_empty() || text.ends_with('\n'), "no final newline");
        let mut helped = HashSet::new();
        let mut typed: HashMap<String, Kind> = HashMap::new();
        let mut closed = HashSet::new();
        let mut series = HashSet::new();
        let mut current: Option<String> = None;
        for line in text.lines() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let (name, _) = split_token(help);
                assert!(helped.insert(name.to_owned()), "second HELP: {line}");
                assert!(!closed.contains(name), "HELP after samples: {line}");
                continue;
            }
            if let Some(kind) = line.strip_prefix("# TYPE ") {
                let (name, kind) = split_token(kind);
                let kind = Kind::parse(kind.trim()).expect("a known type");
                assert!(
                    typed.insert(name.to_owned(), kind).is_none(),
                    "second TYPE: {line}"
                );
                assert!(!closed.contains(name), "TYPE after samples: {line}");
                continue;
            }
            let sample = parse_sample(line).unwrap_or_else(|| panic!("bad sample: {line}"));
            let family = ["_bucket", "_sum", "_count", ""]
                .into_iter()
                .find_map(|suffix| {
                    let base = sample.name.strip_suffix(suffix)?;
                    match typed.get(base) {
                        Some(Kind::Histogram) => (!suffix.is_empty()).then_some(base),
                        Some(Kind::Summary) => (suffix != "_bucket").then_some(base),
                        _ => suffix.is_empty().then_some(base),
                    }
                })
                .unwrap_or(sample.name)
                .to_owned();
            if current.as_ref() != Some(&family) {
                assert!(
                    closed.insert(family.clone()),
                    "samples not contiguous: {line}"
                );
                current = Some(family);
            }
            assert!(
                series.insert(series_key(sample.name, &sample.labels)),
                "repeated series: {line}"
            );
        }
    }

    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    fn count(text: &str, line: &str) -> usize {
        text.lines().filter(|l| *l == line).count()
    }

    #[test]
    fn counters_from_several_workers_share_one_family() {
        let worker = "\
# HELP jobs_total Jobs done
# TYPE jobs_total counter
jobs_total{kind=\"a\"} 1.0
jobs_total{kind=\"b\"} 2.0
# HELP jobs_created Jobs done
# TYPE jobs_created gauge
jobs_created{kind=\"a\"} 1.7e+09
jobs_created{kind=\"b\"} 1.7e+09
";
        let out = merge("", &[("w0", worker), ("w1", worker)]);
        assert_well_formed(&out);
        assert_eq!(
            out,
            "\
# HELP jobs_total Jobs done
# TYPE jobs_total counter
jobs_total{worker=\"w0\",kind=\"a\"} 1.0
jobs_total{worker=\"w0\",kind=\"b\"} 2.0
jobs_total{worker=\"w1\",kind=\"a\"} 1.0
jobs_total{worker=\"w1\",kind=\"b\"} 2.0
# HELP jobs_created Jobs done
# TYPE jobs_created gauge
jobs_created{worker=\"w0\",kind=\"a\"} 1.7e+09
jobs_created{worker=\"w0\",kind=\"b\"} 1.7e+09
jobs_created{worker=\"w1\",kind=\"a\"} 1.7e+09
jobs_created{worker=\"w1\",kind=\"b\"} 1.7e+09
"
        );
    }

    #[test]
    fn sample_without_labels_gets_only_the_worker_label() {
        let out = merge("", &[("w0", "# TYPE up gauge\nup 1 1700000000000\n")]);
        assert_eq!(out, "# TYPE up gauge\nup{worker=\"w0\"} 1 1700000000000\n");
    }

    #[test]
    fn histograms_from_several_workers_keep_every_sample_in_one_block() {
        let worker = |sum: &str| {
            format!(
                "\
# HELP lat_seconds Latency
# TYPE lat_seconds histogram
lat_seconds_bucket{{le=\"0.1\",route=\"/a\"}} 1.0
lat_seconds_bucket{{le=\"+Inf\",route=\"/a\"}} 2.0
lat_seconds_count{{route=\"/a\"}} 2.0
lat_seconds_sum{{route=\"/a\"}} {sum}
# HELP lat_seconds_created Latency
# TYPE lat_seconds_created gauge
lat_seconds_created{{route=\"/a\"}} 1.7e+09
# HELP other_total Other
# TYPE other_total counter
other_total 3.0
"
            )
        };
        let (a, b, c) = (worker("0.5"), worker("0.7"), worker("0.9"));
        let out = merge("", &[("w0", &a), ("w1", &b), ("w2", &c)]);
        assert_well_formed(&out);
        assert_eq!(count(&out, "# TYPE lat_seconds histogram"), 1);
        assert_eq!(count(&out, "# HELP lat_seconds Latency"), 1);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.get(..2),
            Some(&["# HELP lat_seconds Latency", "# TYPE lat_seconds histogram"][..])
        );
        let block: Vec<&str> = lines.iter().skip(2).take(12).copied().collect();
        assert!(block
            .iter()
            .all(|l| l.starts_with("lat_seconds_") && !l.starts_with("lat_seconds_created")));
        assert_eq!(
            block.get(..4),
            Some(
                &[
                    "lat_seconds_bucket{worker=\"w0\",le=\"0.1\",route=\"/a\"} 1.0",
                    "lat_seconds_bucket{worker=\"w0\",le=\"+Inf\",route=\"/a\"} 2.0",
                    "lat_seconds_count{worker=\"w0\",route=\"/a\"} 2.0",
                    "lat_seconds_sum{worker=\"w0\",route=\"/a\"} 0.5",
                ][..]
            )
        );
        assert_eq!(
            block.get(11),
            Some(&"lat_seconds_sum{worker=\"w2\",route=\"/a\"} 0.9")
        );
        assert_eq!(lines.get(14), Some(&"# HELP lat_seconds_created Latency"));
        assert_eq!(samples(&out).len(), 3 * 6);
    }

    #[test]
    fn label_values_with_escapes_and_punctuation_pass_through() {
        let worker = "\
# HELP files_total Files seen
# TYPE files_total counter
files_total{path=\"C:\\\\DIR\\\\F.TXT\",msg=\"say \\\"hi\\\"\\n{a,b}=c}\",x=\"\"} 1
";
        let out = merge("", &[("w\"0\\\n", worker)]);
        assert_well_formed(&out);
        assert_eq!(
            samples(&out),
            ["files_total{worker=\"w\\\"0\\\\\\n\",path=\"C:\\\\DIR\\\\F.TXT\",msg=\"say \\\"hi\\\"\\n{a,b}=c}\",x=\"\"} 1"]
        );
    }

    #[test]
    fn an_existing_worker_label_becomes_exported_worker() {
        let worker = "\
# TYPE up gauge
up{worker=\"inner\",zone=\"a\"} 1
up{exported_worker=\"x\",worker=\"inner\"} 1
";
        let out = merge("", &[("w0", worker)]);
        assert_well_formed(&out);
        assert_eq!(
            samples(&out),
            [
                "up{worker=\"w0\",exported_worker=\"inner\",zone=\"a\"} 1",
                "up{worker=\"w0\",exported_worker=\"x\",exported_exported_worker=\"inner\"} 1",
            ]
        );
    }

    #[test]
    fn a_worker_family_joins_the_sidecar_family_of_the_same_type() {
        let own = "\
# HELP up Sidecar view
# TYPE up gauge
up{worker=\"w0\"} 1
up{worker=\"w1\"} 0
";
        let worker = "\
# HELP up Worker view
# TYPE up gauge
up 1
up{zone=\"a\"} 1
";
        let out = merge(own, &[("w0", worker), ("w1", worker)]);
        assert_well_formed(&out);
        // The workers' unlabelled `up` would repeat the sidecar's series, so it is left out.
        assert_eq!(
            out,
            "\
# HELP up Sidecar view
# TYPE up gauge
up{worker=\"w0\"} 1
up{worker=\"w1\"} 0
up{worker=\"w0\",zone=\"a\"} 1
up{worker=\"w1\",zone=\"a\"} 1
"
        );
    }

    #[test]
    fn a_worker_family_whose_type_clashes_is_dropped() {
        let own = "# HELP jobs_total Sidecar jobs\n# TYPE jobs_total counter\njobs_total 5\n";
        let w0 = "\
# HELP jobs_total Worker jobs
# TYPE jobs_total gauge
jobs_total 1
# HELP depth Queue depth
# TYPE depth gauge
depth 2
";
        // w1's `depth` is a histogram, unlike w0's, so it goes; its own `depth_sum` gauge
        // collides with nothing that is left, so it stays.
        let w1 = "\
# TYPE depth histogram
depth_bucket{le=\"+Inf\"} 1
depth_count 1
depth_sum 1
# TYPE depth_sum gauge
depth_sum 9
";
        let out = merge(own, &[("w0", w0), ("w1", w1)]);
        assert_well_formed(&out);
        assert_eq!(
            out,
            "\
# HELP jobs_total Sidecar jobs
# TYPE jobs_total counter
jobs_total 5
# HELP depth Queue depth
# TYPE depth gauge
depth{worker=\"w0\"} 2
# TYPE depth_sum gauge
depth_sum{worker=\"w1\"} 9
"
        );
    }

    #[test]
    fn a_family_whose_sample_names_another_family_claims_is_dropped() {
        let own = "# TYPE lat histogram\nlat_sum 1\nlat_count 1\nlat_bucket{le=\"+Inf\"} 1\n";
        let worker = "# TYPE lat_count gauge\nlat_count 3\n# TYPE ok gauge\nok 1\n";
        let out = merge(own, &[("w0", worker)]);
        assert_well_formed(&out);
        assert!(!out.contains("lat_count{worker"));
        assert!(out.ends_with("# TYPE ok gauge\nok{worker=\"w0\"} 1\n"));
    }

    #[test]
    fn families_come_own_first_then_in_order_of_first_appearance() {
        let own = "# TYPE s gauge\ns 1\n";
        let w0 = "# TYPE b gauge\nb 1\n# TYPE a gauge\na 1\n";
        let w1 = "# TYPE c gauge\nc 1\n# TYPE a gauge\na 2\n# TYPE s gauge\ns 3\n";
        let out = merge(own, &[("w0", w0), ("w1", w1)]);
        assert_well_formed(&out);
        let types: Vec<&str> = out.lines().filter(|l| l.starts_with("# TYPE")).collect();
        assert_eq!(
            types,
            [
                "# TYPE s gauge",
                "# TYPE b gauge",
                "# TYPE a gauge",
                "# TYPE c gauge"
            ]
        );
        assert_eq!(
            samples(&out),
            [
                "s 1",
                "s{worker=\"w1\"} 3",
                "b{worker=\"w0\"} 1",
                "a{worker=\"w0\"} 1",
                "a{worker=\"w1\"} 2",
                "c{worker=\"w1\"} 1"
            ]
        );
    }

    #[test]
    fn help_and_type_come_from_the_first_worker_with_the_family() {
        let w0 = "# HELP g First\n# TYPE g gauge\ng 1\n";
        let w1 = "# HELP g Second\n# TYPE g gauge\ng 2\n";
        let out = merge("", &[("w0", w0), ("w1", w1)]);
        assert_eq!(
            out,
            "# HELP g First\n# TYPE g gauge\ng{worker=\"w0\"} 1\ng{worker=\"w1\"} 2\n"
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let worker = "\
<html><body>502 Bad Gateway</body></html>

# just a comment
#
# HELP
# HELP 0bad Name starts with a digit
# HELP good_total A counter\\q with a bad escape
# TYPE good_total counter
# TYPE good_total gauge
# TYPE odd_thing sometype
good_total 1
good_total{a=\"1\"} not-a-number
good_total{a=\"1\"} 1 not-a-timestamp
good_total{a=\"1\"} 1 2 3
good_total{a=\"1} 1
good_total{a=\"\\q\"} 1
good_total{a=\"1\",a=\"2\"} 1
good_total{__name__=\"x\"} 1
good_total{1a=\"1\"} 1
good_total{a=\"1\" b=\"2\"} 1
good_total{a=1} 1
good_total{a=\"1\"} -nan
good_total{a=\"1\"} 1e999
good_total{a=\"2\"} +Inf
\u{0}\u{1}binary junk
# TYPE h histogram
h 1
h_bucket 1
h_bucket{le=\"x\"} 1
h_count{le=\"1\"} 1
h_bucket{le=\"1\"} 1
h_sum 2
# TYPE good_total counter
good_total{a=\"3\"} 3";
        let out = merge("", &[("w0", worker)]);
        assert_well_formed(&out);
        assert_eq!(
            out,
            "\
# TYPE good_total counter
good_total{worker=\"w0\"} 1
good_total{worker=\"w0\",a=\"2\"} +Inf
good_total{worker=\"w0\",a=\"3\"} 3
# TYPE h histogram
h_bucket{worker=\"w0\",le=\"1\"} 1
h_sum{worker=\"w0\"} 2
"
        );
    }

    #[test]
    fn loose_whitespace_and_crlf_are_accepted() {
        let worker = "# HELP g  Gauge\r\n#\tTYPE\tg gauge\r\n  g { a = \"1\" , }\t4  \r\n";
        let out = merge("", &[("w0", worker)]);
        assert_eq!(
            out,
            "# HELP g Gauge\n# TYPE g gauge\ng{worker=\"w0\",a=\"1\"} 4\n"
        );
    }

    #[test]
    fn empty_inputs_give_an_empty_exposition() {
        assert_eq!(merge("", &[]), "");
        assert_eq!(merge("\n\n", &[("w0", ""), ("w1", "garbage\n")]), "");
    }

    #[test]
    fn real_worker_expositions_merge_into_one_block_per_family() {
        let out = merge(OWN, &[("w0", WORKER_0), ("w1", WORKER_1)]);
        assert_well_formed(&out);
        let families = |text: &str| text.lines().filter(|l| l.starts_with("# TYPE")).count();
        // Every worker family once, plus the sidecar's two that the workers do not have.
        assert_eq!(families(&out), families(WORKER_0) + 2);
        assert_eq!(
            samples(&out).len(),
            samples(OWN).len() + samples(WORKER_0).len() + samples(WORKER_1).len()
        );
        let own: HashSet<&str> = samples(OWN).into_iter().collect();
        for line in samples(&out).into_iter().filter(|l| !own.contains(l)) {
            let sample = parse_sample(line).expect("a sample");
            assert!(
                matches!(sample.labels.first(), Some(("worker", "w0" | "w1"))),
                "{line}"
            );
        }
        assert!(out.contains(
            "mlx_flash_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 7\n\
             mlx_flash_requests_total{worker=\"w0\",route=\"/v1/chat/completions\",status=\"429\"} 1.0\n"
        ));
    }

    /// Runs `promtool check metrics`; `None` if promtool is not installed.
    fn promtool(exposition: &str) -> Option<(bool, String)> {
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Err(e) if e.kind() == ErrorKind::NotFound => return None,
            other => other.expect("promtool starts"),
        };
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(exposition.as_bytes())
            .expect("promtool reads stdin");
        let output = child.wait_with_output().expect("promtool finishes");
        let report = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        Some((output.status.success(), report))
    }

    #[test]
    fn promtool_accepts_merged_expositions() {
        let tricky_worker = "\
# HELP files_total Files seen
# TYPE files_total counter
files_total{worker=\"inner\",path=\"C:\\\\DIR\\\\F.TXT\",msg=\"say \\\"hi\\\"\\n{a,b}=c}\"} 1
# HELP mlx_flash_worker_up Worker view of itself
# TYPE mlx_flash_worker_up counter
mlx_flash_worker_up 1
# HELP garbage_total Garbage around it
# TYPE garbage_total counter
garbage_total{a=\"1} 1
garbage_total{a=\"1\"} 1 2 3
garbage_total 4
<html>oops</html>";
        let cases = [
            merge(OWN, &[("w0", WORKER_0), ("w1", WORKER_1)]),
            merge(
                OWN,
                &[
                    ("w0", WORKER_0),
                    ("w\"1\\", tricky_worker),
                    ("w2", WORKER_1),
                ],
            ),
        ];
        for exposition in cases {
            let Some((ok, report)) = promtool(&exposition) else {
                eprintln!("promtool is not on PATH; skipping the promtool check");
                return;
            };
            // promtool 2.42 also exits non-zero (3) for lint findings; these inputs have none.
            assert!(ok, "promtool rejected the merge:\n{report}\n{exposition}");
        }
    }
}
