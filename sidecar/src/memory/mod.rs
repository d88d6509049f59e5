//! Memory: one snapshot model and one pressure classification for every platform.
//!
//! Platform modules (`linux`, `macos`) gather raw numbers and call [`assess`],
//! so the sidecar and the Python workers (through `mlx_flash._native`) classify
//! pressure the same way.

use std::path::PathBuf;

#[cfg(target_os = "linux")]
mod linux;
// Compiled everywhere so its pure arithmetic is unit-tested on Linux too;
// only its system calls are macOS-only.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
mod macos;

#[cfg(target_os = "linux")]
pub use linux::snapshot;
#[cfg(target_os = "macos")]
pub use macos::snapshot;

/// Fallback for platforms we do not read yet.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub fn snapshot() -> Result<MemorySnapshot, MemoryError> {
    Err(MemoryError::Unsupported)
}

/// Anything that can go wrong while taking a memory snapshot.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A kernel file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying IO error.
        source: std::io::Error,
    },
    /// A kernel interface returned unexpected contents.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was being parsed, e.g. `"/proc/meminfo"`.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// A system call failed.
    #[error("{call} failed: {detail}")]
    Sys {
        /// The call, e.g. `"host_statistics64"`.
        call: &'static str,
        /// Its error code or message.
        detail: String,
    },
    /// This platform has no memory reader.
    #[error("memory snapshots are not supported on this platform")]
    Unsupported,
}

impl MemoryError {
    /// Shorthand for building a [`MemoryError::Parse`].
    pub fn parse(what: &'static str, detail: impl Into<String>) -> Self {
        MemoryError::Parse {
            what,
            detail: detail.into(),
        }
    }
}

/// Below 5% of effective memory free the kernel is about to reclaim hard or OOM-kill.
pub const CRITICAL_AVAILABLE_FRACTION: f64 = 0.05;
/// Below 15% free, loading another model (or a longer context) is likely to tip us over.
pub const WARNING_AVAILABLE_FRACTION: f64 = 0.15;
/// PSI `full` avg10 >= 10%: every runnable task stalled on memory a tenth of the time (thrashing).
pub const CRITICAL_PSI_FULL_AVG10: f64 = 10.0;
/// PSI `some` avg10 >= 50%: some task is stalled on memory half of the time.
pub const CRITICAL_PSI_SOME_AVG10: f64 = 50.0;
/// PSI `some` avg10 >= 10%: reclaim is noticeably slowing work down.
pub const WARNING_PSI_SOME_AVG10: f64 = 10.0;
/// PSI `full` avg10 >= 1%: any sustained full stall is an early sign of trouble.
pub const WARNING_PSI_FULL_AVG10: f64 = 1.0;

/// Coarse memory-pressure level reported to Python.
///
/// Ordered from least to most severe, so `max` picks the worse level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    /// Plenty of memory available.
    Normal,
    /// Memory is getting tight; avoid growing.
    Warning,
    /// Memory is (nearly) exhausted; shed load.
    Critical,
}

impl Pressure {
    /// The string exposed to Python: `"normal"`, `"warning"` or `"critical"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Pressure::Normal => "normal",
            Pressure::Warning => "warning",
            Pressure::Critical => "critical",
        }
    }
}

/// The more severe of two pressure levels.
///
/// Used to fold a kernel's own verdict (macOS `kern.memorystatus_vm_pressure_level`)
/// into the level [`assess`] derives from the numbers: either can only raise it.
pub fn worst(a: Pressure, b: Pressure) -> Pressure {
    a.max(b)
}

/// Memory limit and usage of the cgroup the process runs in, when a limit applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupMemory {
    /// Hard limit in bytes.
    pub limit_bytes: u64,
    /// Working set in bytes: usage minus inactive file cache (as docker and
    /// kubernetes compute it), since the kernel reclaims that cache first.
    pub usage_bytes: u64,
}

/// Pressure-stall averages over the last 10 seconds, in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Psi {
    /// Share of time at least one task was stalled on memory.
    pub some_avg10: f64,
    /// Share of time all non-idle tasks were stalled on memory.
    pub full_avg10: f64,
}

/// Result of [`assess`]: memory as seen by this process, and its pressure level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessment {
    /// Bytes this process can still allocate before hitting the host or cgroup ceiling.
    pub effective_available_bytes: u64,
    /// The smaller of host memory and the cgroup limit.
    pub effective_total_bytes: u64,
    /// Pressure level derived from the numbers above and PSI.
    pub pressure: Pressure,
}

/// A point-in-time view of system memory. All sizes are in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct MemorySnapshot {
    /// Platform identifier, e.g. `"linux"`.
    pub platform: &'static str,
    /// Physical memory of the host.
    pub total_bytes: u64,
    /// Memory the host can hand out without swapping.
    pub available_bytes: u64,
    /// `total_bytes - available_bytes`.
    pub used_bytes: u64,
    /// Swap in use.
    pub swap_used_bytes: u64,
    /// The process's cgroup memory limit, if one applies.
    pub cgroup: Option<CgroupMemory>,
    /// Memory pressure-stall information, if the kernel provides it.
    pub psi: Option<Psi>,
    /// Effective memory and pressure level, see [`assess`].
    pub assessment: Assessment,
}

impl MemorySnapshot {
    /// The flat JSON object both sides use (`/health`, the admin API, `_native.memory_snapshot()`).
    pub fn to_json(&self) -> serde_json::Value {
        let a = &self.assessment;
        serde_json::json!({
            "platform": self.platform,
            "total_bytes": self.total_bytes,
            "available_bytes": self.available_bytes,
            "used_bytes": self.used_bytes,
            "swap_used_bytes": self.swap_used_bytes,
            "cgroup_limit_bytes": self.cgroup.map(|c| c.limit_bytes),
            "cgroup_usage_bytes": self.cgroup.map(|c| c.usage_bytes),
            "psi_some_avg10": self.psi.map(|p| p.some_avg10),
            "psi_full_avg10": self.psi.map(|p| p.full_avg10),
            "effective_available_bytes": a.effective_available_bytes,
            "effective_total_bytes": a.effective_total_bytes,
            "pressure": a.pressure.as_str(),
        })
    }
}

/// Classify memory pressure for a process.
///
/// * effective available = min(host available, cgroup limit - cgroup usage)
/// * effective total = min(host total, cgroup limit)
/// * `Critical` if effective available / effective total is below
///   [`CRITICAL_AVAILABLE_FRACTION`] or PSI exceeds a critical threshold;
///   `Warning` likewise with the warning thresholds; `Normal` otherwise.
///
/// Without a cgroup limit only host numbers count; without PSI only the
/// available fraction counts.
pub fn assess(
    total_bytes: u64,
    available_bytes: u64,
    cgroup: Option<CgroupMemory>,
    psi: Option<Psi>,
) -> Assessment {
    let (effective_available_bytes, effective_total_bytes) = match cgroup {
        Some(cg) => (
            available_bytes.min(cg.limit_bytes.saturating_sub(cg.usage_bytes)),
            total_bytes.min(cg.limit_bytes),
        ),
        None => (available_bytes, total_bytes),
    };
    let fraction = if effective_total_bytes == 0 {
        0.0
    } else {
        effective_available_bytes as f64 / effective_total_bytes as f64
    };
    let (some, full) = psi.map_or((0.0, 0.0), |p| (p.some_avg10, p.full_avg10));

    let pressure = if fraction < CRITICAL_AVAILABLE_FRACTION
        || full >= CRITICAL_PSI_FULL_AVG10
        || some >= CRITICAL_PSI_SOME_AVG10
    {
        Pressure::Critical
    } else if fraction < WARNING_AVAILABLE_FRACTION
        || some >= WARNING_PSI_SOME_AVG10
        || full >= WARNING_PSI_FULL_AVG10
    {
        Pressure::Warning
    } else {
        Pressure::Normal
    };

    Assessment {
        effective_available_bytes,
        effective_total_bytes,
        pressure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn psi(some_avg10: f64, full_avg10: f64) -> Option<Psi> {
        Some(Psi {
            some_avg10,
            full_avg10,
        })
    }

    #[test]
    fn worst_picks_the_more_severe_level() {
        use Pressure::{Critical, Normal, Warning};
        let levels = [Normal, Warning, Critical];
        for (i, &a) in levels.iter().enumerate() {
            for (j, &b) in levels.iter().enumerate() {
                assert_eq!(worst(a, b), levels[i.max(j)], "worst({a:?}, {b:?})");
            }
        }
    }

    #[test]
    fn host_only_thresholds() {
        assert_eq!(assess(100, 50, None, None).pressure, Pressure::Normal);
        assert_eq!(assess(100, 15, None, None).pressure, Pressure::Normal);
        assert_eq!(assess(100, 14, None, None).pressure, Pressure::Warning);
        assert_eq!(assess(100, 5, None, None).pressure, Pressure::Warning);
        assert_eq!(assess(100, 4, None, None).pressure, Pressure::Critical);
        assert_eq!(assess(0, 0, None, None).pressure, Pressure::Critical);
    }

    #[test]
    fn psi_thresholds() {
        let ok = |p| assess(100, 80, None, p).pressure;
        assert_eq!(ok(psi(9.9, 0.9)), Pressure::Normal);
        assert_eq!(ok(psi(10.0, 0.0)), Pressure::Warning);
        assert_eq!(ok(psi(0.0, 1.0)), Pressure::Warning);
        assert_eq!(ok(psi(50.0, 0.0)), Pressure::Critical);
        assert_eq!(ok(psi(0.0, 10.0)), Pressure::Critical);
    }

    #[test]
    fn cgroup_limit_narrows_effective_memory() {
        let cg = Some(CgroupMemory {
            limit_bytes: 2 * GIB,
            usage_bytes: GIB,
        });
        let a = assess(32 * GIB, 30 * GIB, cg, None);
        assert_eq!(a.effective_total_bytes, 2 * GIB);
        assert_eq!(a.effective_available_bytes, GIB);
        assert_eq!(a.pressure, Pressure::Normal);

        let nearly_full = Some(CgroupMemory {
            limit_bytes: 2 * GIB,
            usage_bytes: 2 * GIB - GIB / 50,
        });
        assert_eq!(
            assess(32 * GIB, 30 * GIB, nearly_full, None).pressure,
            Pressure::Critical
        );
    }

    #[test]
    fn usage_above_limit_saturates() {
        let cg = Some(CgroupMemory {
            limit_bytes: GIB,
            usage_bytes: 2 * GIB,
        });
        let a = assess(8 * GIB, 4 * GIB, cg, None);
        assert_eq!(a.effective_available_bytes, 0);
        assert_eq!(a.pressure, Pressure::Critical);
    }

    #[test]
    fn host_tighter_than_cgroup() {
        let cg = Some(CgroupMemory {
            limit_bytes: 64 * GIB,
            usage_bytes: 0,
        });
        let a = assess(16 * GIB, GIB, cg, None);
        assert_eq!(a.effective_total_bytes, 16 * GIB);
        assert_eq!(a.effective_available_bytes, GIB);
        assert_eq!(a.pressure, Pressure::Warning);
    }
}
