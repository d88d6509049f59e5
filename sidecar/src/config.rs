//! The sidecar's configuration: one struct filled from flags (each with an `MLX_FLASH_*` variable),
//! an optional TOML file for remote backends, validated once at start-up.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::error::StartError;
use crate::logging::Format;

/// Routing policies, chosen with `--policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum PolicyName {
    /// Prefer the worker whose recent prompts share the longest prefix, unless it is much busier.
    CacheAware,
    /// Keep each conversation on one worker.
    Sticky,
    /// The worker with the fewest in-flight requests per unit of weight.
    LeastLoaded,
    /// Each worker in turn.
    RoundRobin,
}

/// `mlx-flash serve`: the front door in front of N local workers and any remote backends.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "mlx-flash serve",
    version,
    after_help = "Arguments after `--` are appended to every local worker's command line, after the \
                  sidecar's own (--model, --worker-id, --local-workers, ...): \
                  mlx-flash serve --workers 2 -- --memory-limit 8G --pin demo"
)]
pub struct Config {
    /// Model the local workers serve: 'demo', a local mlx-lm directory, or a Hugging Face repo id.
    #[arg(long, env = "MLX_FLASH_MODEL", default_value = "demo")]
    pub model: String,
    /// Local workers to start (default 1, or 0 when remote backends are given).
    #[arg(long, env = "MLX_FLASH_WORKERS")]
    pub workers: Option<usize>,
    /// Address to listen on.
    #[arg(long, env = "MLX_FLASH_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the chosen port is logged).
    #[arg(long, env = "MLX_FLASH_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Require this key (Bearer or x-api-key) on every route but /health. Mandatory off loopback.
    #[arg(long, env = "MLX_FLASH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow a non-loopback address without an API key.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// A remote backend URL (another mlx-flash host). Repeatable.
    #[arg(long = "backend", value_name = "URL")]
    pub backends: Vec<String>,
    /// TOML file listing backends: [[backend]] url = "...", weight = 1.0, api_key = "...".
    #[arg(long, env = "MLX_FLASH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Routing policy.
    #[arg(long, env = "MLX_FLASH_POLICY", value_enum, default_value_t = PolicyName::CacheAware)]
    pub policy: PolicyName,
    /// cache_aware: shortest shared prefix, as a fraction of the prompt, that counts as a cache hit.
    #[arg(long, default_value_t = 0.5)]
    pub cache_threshold: f64,
    /// cache_aware/sticky: keep a preferred worker unless it has this many more in-flight requests...
    #[arg(long, default_value_t = 4.0)]
    pub balance_abs_threshold: f64,
    /// ...and this many times the load of the least loaded worker.
    #[arg(long, default_value_t = 1.5)]
    pub balance_rel_threshold: f64,
    /// Allow cross-origin browser requests from this origin (CORS). Repeatable; off by default.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Extra Host header values accepted when no API key is set (DNS-rebinding guard). Repeatable.
    #[arg(long = "allowed-host", value_name = "HOST")]
    pub allowed_hosts: Vec<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "MLX_FLASH_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Python interpreter that runs `-m mlx_flash.worker`.
    #[arg(long, env = "MLX_FLASH_PYTHON", default_value = "python3")]
    pub python: String,
    /// Seconds to let in-flight requests finish on shutdown.
    #[arg(long, env = "MLX_FLASH_GRACE_PERIOD", default_value_t = 30.0)]
    pub grace_period: f64,
    /// Restarts of a worker within ten minutes before it is marked failed.
    #[arg(long, default_value_t = 5)]
    pub max_restarts: u32,
    /// Log level of the sidecar and its workers.
    #[arg(long, env = "MLX_FLASH_LOG_LEVEL", default_value = "info",
          value_parser = ["debug", "info", "warning", "error"])]
    pub log_level: String,
    /// Log line format, for the sidecar's lines and its workers'.
    #[arg(long, env = "MLX_FLASH_LOG_FORMAT", value_enum, default_value_t = Format::Json)]
    pub log_format: Format,
    /// Append log lines (the sidecar's and its workers') to this file instead of stderr.
    #[arg(long, env = "MLX_FLASH_LOG_FILE")]
    pub log_file: Option<PathBuf>,
    /// Arguments for every local worker (`mlx-flash worker --help` lists them).
    #[arg(last = true, value_name = "WORKER_ARGS")]
    pub worker_args: Vec<String>,
}

/// A remote backend: routed like a local worker, health-checked, not supervised.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Base URL, e.g. `http://mac-studio.local:8080`.
    pub url: String,
    /// Relative capacity: load is in-flight requests divided by weight.
    #[serde(default = "one")]
    pub weight: f64,
    /// Key sent to the backend (`Authorization: Bearer`).
    pub api_key: Option<String>,
}

fn one() -> f64 {
    1.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    backend: Vec<BackendConfig>,
}

/// Most local workers one sidecar starts.
pub const MAX_WORKERS: usize = 64;

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The flags as given.
    pub flags: Config,
    /// Number of local workers to supervise.
    pub workers: usize,
    /// Remote backends from `--backend` and the config file.
    pub backends: Vec<BackendConfig>,
    /// `--grace-period` as a duration.
    pub grace_period: Duration,
    /// Where local workers reach this sidecar's API (their MCP tools call it); set once listening.
    pub url: Option<String>,
}

impl Config {
    /// Check the flags, read the config file, and settle defaults. Every start-up error is one line.
    pub fn validate(self) -> Result<Settings, StartError> {
        let invalid = |msg: String| Err(StartError::Config(msg));
        if !is_loopback(&self.host) && self.api_key.is_none() && !self.insecure_no_auth {
            return invalid(format!(
                "refusing to listen on {} without an API key: set --api-key (or MLX_FLASH_API_KEY), \
                 bind 127.0.0.1, or pass --insecure-no-auth",
                self.host
            ));
        }
        if self.api_key.as_deref() == Some("") {
            return invalid("--api-key must not be empty".into());
        }
        if !(0.0..=1.0).contains(&self.cache_threshold) {
            return invalid("--cache-threshold must be in [0, 1]".into());
        }
        if self.balance_abs_threshold < 0.0 || self.balance_rel_threshold < 1.0 {
            return invalid(
                "--balance-abs-threshold must be >= 0 and --balance-rel-threshold >= 1".into(),
            );
        }
        if self.max_body_bytes < 1024 {
            return invalid("--max-body-bytes must be at least 1024".into());
        }
        if !(self.grace_period.is_finite() && self.grace_period >= 0.0) {
            return invalid("--grace-period must be a non-negative number of seconds".into());
        }
        let mut backends: Vec<BackendConfig> = self
            .backends
            .iter()
            .map(|url| BackendConfig {
                url: url.clone(),
                weight: 1.0,
                api_key: None,
            })
            .collect();
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| StartError::Config(format!("cannot read {}: {e}", path.display())))?;
            let file: ConfigFile = toml::from_str(&text)
                .map_err(|e| StartError::Config(format!("{}: {e}", path.display())))?;
            backends.extend(file.backend);
        }
        for b in &backends {
            let uri: hyper::Uri = b
                .url
                .parse()
                .map_err(|e| StartError::Config(format!("backend URL {:?}: {e}", b.url)))?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return invalid(format!(
                    "backend URL {:?} must look like http://host:port",
                    b.url
                ));
            }
            if !(b.weight.is_finite() && b.weight > 0.0) {
                return invalid(format!("backend {:?}: weight must be > 0", b.url));
            }
        }
        let workers = self
            .workers
            .unwrap_or(if backends.is_empty() { 1 } else { 0 });
        if workers == 0 && backends.is_empty() {
            return invalid("nothing to serve: --workers 0 and no --backend".into());
        }
        if workers > MAX_WORKERS {
            return invalid(format!(
                "--workers {workers} is more than {MAX_WORKERS}: each worker is a process holding its own models"
            ));
        }
        let grace_period = Duration::from_secs_f64(self.grace_period);
        Ok(Settings {
            flags: self,
            workers,
            backends,
            grace_period,
            url: None,
        })
    }
}

/// `localhost` or a loopback IP literal.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, StartError> {
        Config::try_parse_from(std::iter::once("mlx-flash").chain(args.iter().copied()))
            .expect("flags parse")
            .validate()
    }

    #[test]
    fn non_loopback_needs_a_key() {
        assert!(parse(&["--host", "0.0.0.0"]).is_err());
        assert!(parse(&["--host", "0.0.0.0", "--api-key", "k"]).is_ok());
        assert!(parse(&["--host", "0.0.0.0", "--insecure-no-auth"]).is_ok());
        assert!(parse(&["--host", "::1"]).is_ok());
    }

    #[test]
    fn workers_default_to_one_without_backends() {
        assert_eq!(parse(&[]).unwrap().workers, 1);
        let s = parse(&["--backend", "http://mac2.local:8080"]).unwrap();
        assert_eq!((s.workers, s.backends.len()), (0, 1));
        assert!(parse(&["--workers", "0"]).is_err());
        assert_eq!(parse(&["--workers", "64"]).unwrap().workers, 64);
        assert!(parse(&["--workers", "65"]).is_err());
    }

    #[test]
    fn arguments_after_double_dash_are_for_workers() {
        let s = parse(&[
            "--workers",
            "2",
            "--",
            "--memory-limit",
            "8G",
            "--pin",
            "demo",
        ])
        .unwrap();
        assert_eq!(s.workers, 2);
        assert_eq!(
            s.flags.worker_args,
            ["--memory-limit", "8G", "--pin", "demo"]
        );
        assert!(parse(&[]).unwrap().flags.worker_args.is_empty());
    }

    #[test]
    fn backend_urls_are_checked() {
        assert!(parse(&["--backend", "mac2:8080"]).is_err());
        assert!(parse(&["--backend", "https://x"]).is_err());
    }

    #[test]
    fn config_file_lists_backends() {
        let dir = std::env::temp_dir().join(format!("mlxf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sidecar.toml");
        std::fs::write(
            &path,
            "[[backend]]\nurl = \"http://a:1\"\nweight = 2.0\napi_key = \"s\"\n\n[[backend]]\nurl = \"http://b:2\"\n",
        )
        .unwrap();
        let s = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.backends[0].weight, 2.0);
        assert_eq!(s.backends[0].api_key.as_deref(), Some("s"));
        assert_eq!(s.backends[1].weight, 1.0);
        std::fs::write(&path, "[[backend]]\nurl = \"http://a:1\"\nwieght = 2\n").unwrap();
        assert!(parse(&["--config", path.to_str().unwrap()]).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
